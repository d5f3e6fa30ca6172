"""The method table: what each ``method`` does, in one place. Everything that asks reads it.

One record per method (the paper's names, in the order of its tables):

* ``whitening``: the activation-aware factor ``S`` of the first step (``nsvd_lm.decompose``):
  ``identity`` (plain SVD), ``diagonal`` (``diag(mean |x|)^α``), ``cholesky`` (``chol(G)``),
  ``eigen`` (``U Λ^½``), ``eigen-beta`` (``U Λ^β``).
* ``residual``: the second step on ``W − W1`` at rank ``k2 = k − k1``: ``None`` (not nested),
  ``svd`` (truncated SVD) or ``id`` (interpolative decomposition).
* ``statistics``: the calibration statistic it needs: ``gram`` (``G = X Xᵀ``), ``mean_abs`` or None.
* ``knobs``: the config fields that change its result besides ``ratio`` (others are ignored).
* ``paper_baseline``: one of the activation-aware baselines the paper improves on (ASVD-0/I/II);
  the leaderboard's "improvement" is measured against the best of them.

Strings stay the outward interface (``model_args``, CLI flags); torchao dispatches by config
type, but lm-eval passes strings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    whitening: str
    residual: str | None
    statistics: str | None
    knobs: tuple[str, ...] = ()
    paper_baseline: bool = False

    @property
    def nested(self) -> bool:
        return self.residual is not None

    @property
    def needs_calibration(self) -> bool:
        return self.statistics is not None

    @property
    def needs_gram(self) -> bool:
        return self.statistics == "gram"


METHOD_TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("svd", "identity", None, None),
        Method("asvd-0", "diagonal", None, "mean_abs", ("asvd_alpha",), paper_baseline=True),
        Method("asvd-i", "cholesky", None, "gram", paper_baseline=True),
        Method("asvd-ii", "eigen", None, "gram", paper_baseline=True),
        Method("asvd-iii", "eigen-beta", None, "gram", ("asvd3_beta",)),
        Method("nsvd-i", "cholesky", "svd", "gram", ("k1_frac",)),
        Method("nsvd-ii", "eigen", "svd", "gram", ("k1_frac",)),
        Method("nid-i", "cholesky", "id", "gram", ("k1_frac",)),
        Method("nid-ii", "eigen", "id", "gram", ("k1_frac",)),
    )
}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)
METHOD_ALIASES: dict[str, str] = {"svd-llm": "asvd-i"}


def canonical_method(method: str) -> str:
    """Lower-case name with aliases resolved; raises ValueError naming the allowed values."""
    name = str(method).strip().lower()
    name = METHOD_ALIASES.get(name, name)
    if name not in METHOD_TABLE:
        allowed = ", ".join(METHODS + tuple(METHOD_ALIASES))
        raise ValueError(f"method={method!r} is not known; allowed values: {allowed}")
    return name


def get_method(method: str) -> Method:
    """The table's record for ``method`` (aliases allowed)."""
    return METHOD_TABLE[canonical_method(method)]
