"""The method table and the decomposition math, as pure functions on tensors (nothing here knows
about transformers): rank k → k1 (``first_rank``) → factors (``low_rank_factors``). How a ``ratio``
becomes each matrix's rank k is ``nsvd_lm.allocation``'s (``rank_for_ratio``, the paper's rule).

Notation follows the NSVD paper: ``W`` is a weight (m out × n in), ``X`` its calibration
inputs (n × N), ``G = X Xᵀ`` (n × n). Every method returns a factor pair ``up`` (m × k) and
``down`` (k × n) with ``W ≈ up @ down``.

* ``svd``      – truncated SVD of W.
* ``asvd-0``   – ``S = diag(mean|x|)^α``; ``TSVD_k(W S) S⁻¹``.
* ``asvd-i``   – ``S = chol(G)`` (SVD-LLM); ``‖(W − Ŵ)X‖_F² = Σ_{i>k} σ_i(W S)²``.
* ``asvd-ii``  – ``G = U Λ Uᵀ``, ``S = U Λ^{1/2}``, ``S⁺`` drops zero eigenvalues.
* ``asvd-iii`` – ``S = U Λ^β`` (the paper's negative "scaling eigenvalues" result; experimental).
* ``nsvd-*``   – rank ``k1`` from the activation-aware step, then TSVD of the residual at ``k − k1``.
* ``nid-*``    – same first step, the residual by an interpolative decomposition (real columns).

All work is done in float64: Cholesky factors of Gram matrices of LLM activations are badly
conditioned, and float32 loses the small directions that whitening is meant to keep.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# The method table: what each ``method`` does, in one place. Everything that asks reads it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One method of the paper (its tables' names and order); the record everything else reads.

    * ``whitening``: the activation-aware factor ``S`` of the first step (``whitening_factor``):
      ``identity`` (plain SVD), ``diagonal`` (``diag(mean |x|)^α``), ``cholesky`` (``chol(G)``),
      ``eigen`` (``U Λ^½``), ``eigen-beta`` (``U Λ^β``).
    * ``residual``: the second step on ``W − W1`` at rank ``k2 = k − k1`` (``nested_factors``):
      ``None`` (not nested), ``svd`` (truncated SVD) or ``id`` (interpolative decomposition).
    * ``statistics``: the calibration statistic it needs: ``gram`` (``G = X Xᵀ``), ``mean_abs`` or None.
    * ``knobs``: the config fields that change its result besides ``ratio`` (others are ignored).
    * ``paper_baseline``: one of the activation-aware baselines the paper improves on (ASVD-0/I/II);
      the leaderboard's "improvement" is measured against the best of them.

    The table sits beside the math it dispatches to. Strings stay the outward interface
    (``model_args``, CLI flags); torchao dispatches by config type, but lm-eval passes strings.
    """

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


@dataclass(frozen=True)
class MethodKnobs:
    """The settings besides the rank that change a method's factors, as one object.

    ``Method.knobs`` names the ones each method reads; ``CompressionConfig`` declares its fields of
    the same names with these defaults and hands ``config.knobs`` to ``LayerFactorizer`` whole.
    ``k1_frac`` splits the rank after the first-step SVD; the others shape the whitening ``S``.
    """

    k1_frac: float = 0.95  # share of the rank for the activation-aware step of the nested methods
    asvd_alpha: float = 0.5  # ASVD-0's exponent on diag(mean |x|)
    asvd3_beta: float = 0.5  # asvd-iii's eigenvalue exponent

    def whitening_values(self, method: Method) -> tuple[float, ...]:
        """The values of ``method``'s knobs that shape ``S`` (and so its first-step SVD)."""
        return tuple(getattr(self, name) for name in method.knobs if name != "k1_frac")


DEFAULT_KNOBS = MethodKnobs()

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


@dataclass
class Factors:
    """``W ≈ up @ down`` with ``up`` (m × k) and ``down`` (k × n), float64."""

    up: torch.Tensor
    down: torch.Tensor
    # Rank given to the activation-aware step (k1) and to the residual step (k2) of nested methods.
    first_rank: int
    residual_rank: int
    # Diagonal shift added to G so Cholesky succeeds (0 when not needed).
    gram_shift: float = 0.0
    # The first-step SVD the factors were cut from (for the activation-loss shortcut).
    source: "WhitenedSVD | None" = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in ``tensor``: one min/max pass (``isfinite().all()`` builds a bool copy, 10x slower
    on the n × n Gram matrices of big models). NaN propagates to both ends, ±Inf shows at one."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


@dataclass
class Whitening:
    """A factor ``S`` given implicitly: ``apply(W) = W S`` and ``unapply(B) = B S⁻¹`` (or ``B S⁺``)."""

    kind: str
    factor: torch.Tensor | None  # S (n × r) or diagonal (n,) or None for identity
    shift: float = 0.0
    lower_cholesky: bool = False
    inverse: torch.Tensor | None = None  # S⁺ (r × n) for eigen-based kinds
    # True when S Sᵀ = G + shift·I (Cholesky; eigen with exponent ½, up to the dropped null space):
    # then ‖E X‖_F² = ‖E S‖_F² − shift·‖E‖_F², which lets the loss be read off the SVD of W S.
    gram_exact: bool = False

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        if self.factor is None:
            return weight
        if self.factor.ndim == 1:
            return weight * self.factor
        return weight @ self.factor

    def unapply(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ S⁻¹`` for rows living in the whitened space (k × r → k × n)."""
        if self.factor is None:
            return rows
        if self.factor.ndim == 1:
            return rows / self.factor
        if self.lower_cholesky:
            # X L = B  ⇔  X = B L⁻¹ ; a triangular solve is more stable than forming L⁻¹.
            return torch.linalg.solve_triangular(self.factor, rows, upper=False, left=False)
        assert self.inverse is not None
        return rows @ self.inverse


def cholesky_whitening(gram: torch.Tensor) -> Whitening:
    """``S = chol(G)``, shifting ``G`` by ``(−λ_min + ε)·I`` if it is not positive definite (as SVD-LLM)."""
    gram = gram.to(COMPUTE_DTYPE)
    factor, info = torch.linalg.cholesky_ex(gram)
    shift = 0.0
    if int(info) != 0:
        eigenvalues = torch.linalg.eigvalsh(gram)
        # ε relative to the scale of G so the shift means the same for any activation scale.
        eps = max(1e-6, 1e-8 * float(gram.diagonal().abs().mean()))
        shift = float(-eigenvalues[0]) + eps
        logger.info(
            "Gram matrix not positive definite (λ_min=%.3e); shifted by %.3e·I for Cholesky", eigenvalues[0], shift
        )
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor, info = torch.linalg.cholesky_ex(gram + shift * eye)
        if int(info) != 0:
            raise ValueError("Cholesky of the shifted Gram matrix failed; the statistics are degenerate")
    return Whitening("cholesky", factor, shift=shift, lower_cholesky=True, gram_exact=True)


def eigen_whitening(gram: torch.Tensor, exponent: float = 0.5) -> Whitening:
    """``S = U Λ^exponent`` from ``G = U Λ Uᵀ``; zero eigenvalues are dropped (pseudo-inverse, no shift)."""
    gram = gram.to(COMPUTE_DTYPE)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    # numpy/torch pinv's cut-off: relative to the largest eigenvalue and the dimension.
    tol = float(eigenvalues.abs().max()) * gram.shape[0] * torch.finfo(COMPUTE_DTYPE).eps
    keep = eigenvalues > tol
    vals, vecs = eigenvalues[keep], eigenvectors[:, keep]
    scale = vals.pow(exponent)
    factor = vecs * scale  # U Λ^e  (n × r)
    inverse = (vecs / scale).T  # Λ^-e Uᵀ (r × n)
    return Whitening("eigen", factor, inverse=inverse, gram_exact=exponent == 0.5)


def diagonal_whitening(mean_abs: torch.Tensor, alpha: float) -> Whitening:
    """ASVD-0: ``S = diag(mean |x|)^α``; channels that never fire get the smallest positive scale."""
    scale = mean_abs.to(COMPUTE_DTYPE).clamp_min(0).pow(alpha)
    positive = scale[scale > 0]
    floor = float(positive.min()) if positive.numel() else 1.0
    return Whitening("diagonal", scale.clamp_min(floor))


def whitening_factor(
    method: str,
    gram: torch.Tensor | None = None,
    mean_abs: torch.Tensor | None = None,
    asvd_alpha: float = DEFAULT_KNOBS.asvd_alpha,
    asvd3_beta: float = DEFAULT_KNOBS.asvd3_beta,
) -> Whitening:
    """The activation-aware ``S`` of ``method``'s first step (its ``whitening`` in the method table)."""
    kind = get_method(method).whitening
    if kind == "identity":
        return Whitening("identity", None)
    if kind == "diagonal":
        if mean_abs is None:
            raise ValueError(f"{method} needs mean |x| statistics")
        return diagonal_whitening(mean_abs, asvd_alpha)
    if gram is None:
        raise ValueError(f"{method} needs the Gram matrix G = X Xᵀ")
    if kind == "cholesky":
        return cholesky_whitening(gram)
    if kind == "eigen":
        return eigen_whitening(gram, 0.5)
    if kind == "eigen-beta":
        return eigen_whitening(gram, asvd3_beta)
    raise ValueError(f"unknown whitening {kind!r} of method {method!r}")


# ---------------------------------------------------------------------------------------------
# Truncated SVD in the whitened space, computed once and truncated at any rank
# ---------------------------------------------------------------------------------------------


class WhitenedSVD:
    """SVD of ``W S`` computed once; ``factors(k)`` truncates it at any rank without recomputing.

    A sweep over ratios and ``k1_frac`` values therefore costs one SVD per matrix and whitening.
    With ``driver="lowrank"`` a randomized SVD (``torch.svd_lowrank``) of ``max_rank`` components
    is used instead, which is much faster for big matrices and small ranks.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        whitening: Whitening,
        driver: str = "exact",
        max_rank: int | None = None,
        oversample: int = 16,
        niter: int = 4,
        seed: int = 0,
    ) -> None:
        self.weight = weight.to(COMPUTE_DTYPE)
        self.whitening = whitening
        self.driver = driver
        whitened = whitening.apply(self.weight)
        if driver == "exact":
            self.U, self.singular_values, self.Vh = torch.linalg.svd(whitened, full_matrices=False)
        elif driver == "lowrank":
            q = min(min(whitened.shape), (max_rank or min(whitened.shape)) + oversample)
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)  # randomized SVD: deterministic for a given seed
            try:
                U, S, V = torch.svd_lowrank(whitened, q=q, niter=niter)
            finally:
                torch.random.set_rng_state(generator_state)
            self.U, self.singular_values, self.Vh = U, S, V.T
        else:
            raise ValueError(f"svd driver {driver!r}; allowed values: exact, lowrank")

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``up`` (m × rank) and ``down`` (rank × n); zero-padded if ``W S`` has lower rank."""
        available = self.singular_values.shape[0]
        k = min(rank, available)
        root = self.singular_values[:k].sqrt()  # split σ evenly: balanced factor norms for fp16 inference
        up = self.U[:, :k] * root
        down = self.whitening.unapply(root[:, None] * self.Vh[:k])
        if k < rank:
            m, n = self.weight.shape
            up = torch.cat([up, up.new_zeros(m, rank - k)], dim=1)
            down = torch.cat([down, down.new_zeros(rank - k, n)], dim=0)
        return up, down

    def truncated_energy(self, rank: int) -> float:
        """``Σ_{i>rank} σ_i²`` of ``W S`` (= ‖(W − Ŵ)X‖_F² for exact whitening, e.g. ASVD-I)."""
        return float(self.singular_values[rank:].pow(2).sum())


def whitened_activation_loss(svd: WhitenedSVD, factors: Factors) -> tuple[float, float] | None:
    """``(‖(W − up·down) X‖_F, ‖W X‖_F)`` read off the first-step SVD of ``W S``, or None.

    Why: the direct ``activation_loss`` costs two m × n × n products per matrix, as much as the
    decomposition itself. With ``S Sᵀ = G`` (ASVD-I/II), ``‖E X‖_F = ‖E S‖_F``; the first ``k1``
    rows of ``down`` are ``√Σ Vᵀ S⁻¹``, so ``(W − up1·down1) S = U₂ Σ₂ V₂ᵀ`` (the discarded
    singular triplets, energy ``Σ_{i>k1} σ_i²``) and only the residual pair needs ``down2 S``
    (k2 × n × n, k2 small). A shifted Cholesky (``S Sᵀ = G + δI``, G singular) takes ``δ‖E‖_F²``
    back out, computed from the factors (k × m × n). None where ``S Sᵀ`` is not G (a randomized
    SVD, ASVD-0/III, plain SVD): use ``activation_loss`` there.
    """
    whitening = svd.whitening
    if svd.driver != "exact" or not whitening.gram_exact:
        return None
    k1 = factors.first_rank
    energy = svd.singular_values.pow(2)
    loss2 = float(energy[k1:].sum())
    if factors.residual_rank:
        up2 = factors.up[:, k1:]
        down2_whitened = whitening.apply(factors.down[k1:])  # down2 S (k2 × r)
        # ‖U₂Σ₂V₂ᵀ − up2·down2S‖² = ‖U₂Σ₂V₂ᵀ‖² − 2⟨U₂Σ₂V₂ᵀ, up2·down2S⟩ + ‖up2·down2S‖²
        projected = ((up2.T @ svd.U[:, k1:]) * svd.singular_values[k1:]) @ svd.Vh[k1:]  # up2ᵀ U₂Σ₂V₂ᵀ (k2 × r)
        cross = float((projected * down2_whitened).sum())
        norm2 = float(((up2.T @ up2) * (down2_whitened @ down2_whitened.T)).sum())
        loss2 += norm2 - 2.0 * cross
    reference2 = float(energy.sum())
    if whitening.shift:
        # ‖E‖_F² = ‖W‖² − 2⟨W, up·down⟩ + ‖up·down‖², without forming an m × n product.
        weight, up, down = svd.weight, factors.up, factors.down
        weight2 = float(weight.pow(2).sum())
        error2 = weight2 - 2.0 * float(((up.T @ weight) * down).sum()) + float(((up.T @ up) * (down @ down.T)).sum())
        loss2 -= whitening.shift * max(error2, 0.0)
        reference2 -= whitening.shift * weight2
    return math.sqrt(max(loss2, 0.0)), math.sqrt(max(reference2, 0.0))


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain rank-``rank`` SVD factors of ``matrix`` (σ split evenly between the factors)."""
    return WhitenedSVD(matrix, Whitening("identity", None)).factors(rank)


def interpolative_decomposition(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column interpolative decomposition ``matrix ≈ matrix[:, J] @ T`` with ``|J| = rank``.

    Uses a column-pivoted QR (LAPACK geqp3): ``A P = Q R``; the first ``rank`` pivots are the
    skeleton columns J and ``T P = [I, R11⁻¹ R12]``. Returns ``(matrix[:, J], T)``; the first
    factor is made of actual columns of ``matrix`` (the point of ID). Deterministic.
    """
    import numpy as np
    import scipy.linalg

    m, n = matrix.shape
    if rank == 0:
        return matrix.new_zeros(m, 0), matrix.new_zeros(0, n)
    a = matrix.detach().to("cpu", COMPUTE_DTYPE).numpy()
    _, r, perm = scipy.linalg.qr(a, mode="economic", pivoting=True)
    k = min(rank, r.shape[0])
    r11, r12 = r[:k, :k], r[:k, k:]
    # R11 is upper triangular; tiny pivots mean the residual has numerical rank < k.
    coeff = scipy.linalg.solve_triangular(r11, r12, lower=False, check_finite=False) if k else np.zeros((0, n - k))
    interp = np.zeros((k, n))
    interp[:, perm[:k]] = np.eye(k)
    interp[:, perm[k:]] = coeff
    columns = torch.from_numpy(np.ascontiguousarray(a[:, perm[:k]])).to(matrix.device)
    interp_t = torch.from_numpy(interp).to(matrix.device)
    if not all_finite(interp_t):
        # Rank-deficient residual: fall back to least squares for T (same columns).
        interp_t = torch.linalg.lstsq(columns, matrix.to(COMPUTE_DTYPE)).solution
    if k < rank:
        columns = torch.cat([columns, columns.new_zeros(m, rank - k)], dim=1)
        interp_t = torch.cat([interp_t, interp_t.new_zeros(rank - k, n)], dim=0)
    return columns, interp_t


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def first_rank(rank: int, method: str, k1_frac: float) -> int:
    """k1: the activation-aware share of the rank (all of it for non-nested methods); round half up."""
    if get_method(method).nested:
        return min(rank, int(math.floor(k1_frac * rank + 0.5)))
    return rank


def nested_factors(
    weight: torch.Tensor,
    whitened_svd: WhitenedSVD,
    rank: int,
    method: str,
    k1_frac: float = DEFAULT_KNOBS.k1_frac,
) -> Factors:
    """Factors for ``method`` at ``rank`` from a precomputed first-step SVD (reused across ranks/k1)."""
    k1 = first_rank(rank, method, k1_frac)
    k2 = rank - k1
    up1, down1 = whitened_svd.factors(k1)
    if k2 == 0:
        return Factors(up1, down1, k1, 0, whitened_svd.whitening.shift, whitened_svd)
    residual = weight.to(COMPUTE_DTYPE) - up1 @ down1
    residual_step = get_method(method).residual
    if residual_step == "svd":
        up2, down2 = truncated_svd(residual, k2)
    elif residual_step == "id":
        up2, down2 = interpolative_decomposition(residual, k2)
    else:
        raise ValueError(f"{method} is not a nested method")
    # [A1 A2] [B1; B2] = A1 B1 + A2 B2: one rank-k pair, same inference cost as ASVD.
    return Factors(
        torch.cat([up1, up2], 1), torch.cat([down1, down2], 0), k1, k2, whitened_svd.whitening.shift, whitened_svd
    )


@dataclass
class Reuse:
    """What one matrix may take from earlier matrices instead of recomputing (explicit, never global).

    * ``whitenings``: the last whitening by ``whitening_key``; layers fed the same input (q/k/v,
      gate/up) share one G, so one Cholesky/eigendecomposition serves them all. One entry at a
      time (an n × n float64 factor each).
    * ``svds``: a sweep's first-step SVDs by ``svd_key``, reused for every ratio, ``k1_frac`` and
      nested method on the same whitening (exact driver only: a randomized SVD is good only to
      its rank). None: nothing is kept.
    """

    whitenings: dict
    whitening_key: tuple | None = None
    svds: dict | None = None
    svd_key: tuple | None = None


def low_rank_factors(
    weight: torch.Tensor,
    rank: int,
    method: str,
    gram: torch.Tensor | None = None,
    mean_abs: torch.Tensor | None = None,
    k1_frac: float = DEFAULT_KNOBS.k1_frac,
    asvd_alpha: float = DEFAULT_KNOBS.asvd_alpha,
    asvd3_beta: float = DEFAULT_KNOBS.asvd3_beta,
    svd_driver: str = "exact",
    reuse: Reuse | None = None,
) -> Factors:
    """Rank-``rank`` factors of ``weight`` (m × n) by ``method`` (one of ``METHODS``).

    ``gram`` is ``X Xᵀ`` (n × n) of the layer's calibration inputs, ``mean_abs`` is ``mean |x|``
    per input channel (n,). This is the whole algorithm for one matrix, GPTQ-reference style, and
    the code ``compress_model`` runs for every matrix:

    1. the activation-aware factor ``S`` (``whitening_factor``);
    2. the SVD of ``W S``, truncated at ``k1 = first_rank(rank)`` (``WhitenedSVD``);
    3. for nested methods, the residual ``W − W1`` at ``k2 = rank − k1`` by SVD or ID, and the two
       pairs concatenated into one rank-``rank`` pair (``nested_factors``).

    ``reuse`` lets steps 1 and 2 come from earlier matrices (see ``Reuse``).
    """
    get_method(method)  # a ValueError naming the allowed values
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank={rank} must lie in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight")
    svd = reuse.svds.get(reuse.svd_key) if reuse is not None and reuse.svds is not None else None
    if svd is None:
        whitening = reuse.whitenings.get(reuse.whitening_key) if reuse is not None else None
        if whitening is None:
            whitening = whitening_factor(method, gram, mean_abs, asvd_alpha, asvd3_beta)
            if reuse is not None:
                reuse.whitenings.clear()
                reuse.whitenings[reuse.whitening_key] = whitening
        svd = WhitenedSVD(weight, whitening, driver=svd_driver, max_rank=rank)
        if reuse is not None and reuse.svds is not None and svd_driver == "exact":
            reuse.svds[reuse.svd_key] = svd
    return nested_factors(weight, svd, rank, method, k1_frac)


@dataclass
class LayerFactorizer:
    """How one layer is factored at a given rank: ``factorize(name, weight, k)`` → ``Factors``.

    The method and its knobs, the layer's statistics (``stats``: a ``calibration.CalibrationStats``,
    anything with ``gram(name)``, ``mean_abs(name)``, ``module_to_key`` and ``path``; read once per
    layer), and what may be reused instead of recomputed (``Reuse``): layers fed the same input
    (q/k/v, gate/up) come one after another and share one G, so the last whitening is kept for the
    next layer; first-step SVDs are kept in a sweep's ``svd_cache`` when given, else for the
    current layer only (the rank allocation's probes of one layer share one SVD). The allocation's
    probes and ``compress_model``'s final factors both go through it, so both see the same factors.
    """

    method: str
    stats: Any = None
    knobs: MethodKnobs = DEFAULT_KNOBS
    svd_driver: str = "exact"
    compute_device: str | None = None
    svd_cache: dict | None = None
    whitenings: dict = field(default_factory=dict, repr=False)
    layer_svds: dict = field(default_factory=dict, repr=False)
    layer: tuple | None = field(default=None, repr=False)  # (name, G, mean |x|) of the last layer read

    def device(self, weight: torch.Tensor) -> torch.device:
        return torch.device(self.compute_device) if self.compute_device else weight.device

    def statistics(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(G, mean |x|)`` of the layer's input, each where the method uses it (else None)."""
        if self.layer is None or self.layer[0] != name:
            self.layer_svds.clear()
            spec, stats, device = get_method(self.method), self.stats, self.device(weight)
            gram = stats.gram(name).to(device) if spec.needs_gram and stats is not None else None
            mean_abs = stats.mean_abs(name).to(device) if spec.statistics == "mean_abs" and stats is not None else None
            self.layer = (name, gram, mean_abs)
        return self.layer[1], self.layer[2]

    def __call__(self, name: str, weight: torch.Tensor, rank: int) -> Factors:
        spec, stats, device = get_method(self.method), self.stats, self.device(weight)
        gram, mean_abs = self.statistics(name, weight)
        knobs = self.knobs.whitening_values(spec)
        # Same statistics entry (a shared input) + same whitening settings = the same S; the statistics
        # folder is part of the SVD key, so a sweep's cache never mixes calibrations or models.
        input_key = stats.module_to_key.get(name, name) if stats is not None else None
        stats_folder = str(stats.path) if stats is not None else None
        reuse = Reuse(
            self.whitenings,
            whitening_key=(input_key, str(device), spec.whitening, self.svd_driver, *knobs),
            svds=self.svd_cache if self.svd_cache is not None else self.layer_svds,
            svd_key=(stats_folder, name, spec.whitening, self.svd_driver, *knobs),
        )
        return low_rank_factors(
            weight.detach().to(device),
            rank,
            self.method,
            gram=gram,
            mean_abs=mean_abs,
            **dataclasses.asdict(self.knobs),
            svd_driver=self.svd_driver,
            reuse=reuse,
        )


# Ridge of the propagation-aware target, relative to the mean eigenvalue of G̃ (= mean diag G̃):
# directions whose compressed-prefix energy is below ~1 % of the mean keep the dense weight
# instead of an ill-determined least-squares fit (a decision: README "Sequential").
PROPAGATION_RIDGE = 1e-2


def propagation_target(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float = PROPAGATION_RIDGE
) -> torch.Tensor:
    """``W* = (W C + λ W)(G̃ + λ I)⁻¹``: the weight that maps the compressed model's inputs to the dense outputs.

    ``gram`` is ``G̃ = X̃ X̃ᵀ`` of the inputs the compressed prefix feeds the layer, ``cross`` is
    ``C = X X̃ᵀ`` against the dense model's inputs ``X``, ``λ = ridge · mean diag G̃``. For ``λ = 0``,
    ``W*`` is the least-squares solution of ``W* X̃ ≈ W X`` and, since ``W X − W* X̃`` is orthogonal
    to the rows of ``X̃``, ``‖W X − Ŵ X̃‖² = ‖W X − W* X̃‖² + ‖(W* − Ŵ) X̃‖²`` for any ``Ŵ``: a
    method that minimises its activation loss for ``W*`` on ``G̃`` (ASVD-I exactly) minimises the
    error against the dense model's outputs, correcting what the earlier blocks' compression changed.
    The ridge pulls ``W*`` toward ``W`` where ``X̃`` has little energy. When ``X̃ = X``, ``W* = W``.
    """
    w = weight.to(COMPUTE_DTYPE)
    g = gram.to(device=w.device, dtype=COMPUTE_DTYPE)
    lam = ridge * float(g.diagonal().mean().clamp_min(0))
    regularised = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    rhs = w @ cross.to(device=w.device, dtype=COMPUTE_DTYPE) + lam * w
    factor, info = torch.linalg.cholesky_ex(regularised)
    if int(info) != 0 or lam == 0.0:
        return torch.linalg.lstsq(regularised, rhs.T).solution.T  # singular G̃ without a ridge
    return torch.cholesky_solve(rhs.T, factor).T


def relative_activation_loss(weight: torch.Tensor, factors: Factors, gram: torch.Tensor) -> float:
    """``‖(W − up·down) X‖_F / ‖W X‖_F``: read off the first-step SVD where it can, else from ``G``."""
    losses = whitened_activation_loss(factors.source, factors) if factors.source is not None else None
    if losses is None:  # no shortcut for this whitening: the two n × n products
        w64 = weight.to(COMPUTE_DTYPE)
        losses = activation_loss(w64, factors.dense(), gram), activation_loss(w64, torch.zeros_like(w64), gram)
    return losses[0] / losses[1] if losses[1] > 0 else 0.0


def activation_loss(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``‖(W − Ŵ) X‖_F`` computed from ``G = X Xᵀ`` as ``sqrt(tr(E G Eᵀ))``."""
    error = weight.to(COMPUTE_DTYPE) - approx.to(COMPUTE_DTYPE)
    value = float(((error @ gram.to(COMPUTE_DTYPE)) * error).sum())
    return math.sqrt(max(value, 0.0))
