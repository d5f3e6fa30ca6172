"""``compress_model``: the one in-place entry point (torchao ``quantize_`` style: config → module swap)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nsvd_lm import __version__
from nsvd_lm.calib_data import load_calibration_text
from nsvd_lm.windows import bos_per_window, calibration_windows, windows_fingerprint
from nsvd_lm.calibration import CalibrationStats, cache_key, collect_statistics, default_stats_dir, load_cached_statistics
from nsvd_lm.config import CompressionConfig
from nsvd_lm.decompose import Reuse, all_finite, factors_for_ratio, rank_for_ratio, relative_activation_loss
from nsvd_lm.methods import get_method
from nsvd_lm.modules import LowRankLinear, dense_weight_and_bias
from nsvd_lm.targets import Target, get_parent, select_targets

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense
    first_rank: int | None
    residual_rank: int | None
    params_before: int
    params_after: int
    # ‖(W − Ŵ)X‖_F / ‖W X‖_F on the calibration inputs (None for methods without G).
    relative_activation_loss: float | None = None
    gram_shift: float = 0.0
    kept_dense: str | None = None


@dataclass
class CompressionReport:
    method: str
    ratio: float
    config: dict
    modules: list[ModuleReport]
    params_before: int  # whole model
    params_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    stats_cache_hit: bool | None = None

    @property
    def target_params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def target_params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_params_before"] = self.target_params_before
        d["target_params_after"] = self.target_params_after
        return d

    def summary(self) -> str:
        compressed = [m for m in self.modules if m.rank is not None]
        removed = self.params_before - self.params_after
        lines = [
            f"method {self.method}, ratio {self.ratio}: {len(compressed)}/{len(self.modules)} layers factored",
            f"parameters {self.params_before:,} -> {self.params_after:,} "
            f"({removed:,} removed, {removed / self.params_before:.1%} of the model; "
            f"{1 - self.target_params_after / max(1, self.target_params_before):.1%} of the compressed layers)",
            "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
        ]
        losses = [m.relative_activation_loss for m in compressed if m.relative_activation_loss is not None]
        if losses:
            lines.append(f"relative activation loss: mean {sum(losses) / len(losses):.4f}, max {max(losses):.4f}")
        if self.stats_cache_hit is not None:
            lines.append("calibration statistics: " + ("reused from cache" if self.stats_cache_hit else "computed"))
        return "\n".join(lines)


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_finite_weights(targets: list[Target]) -> None:
    for t in targets:
        weight, bias = dense_weight_and_bias(t.module)
        if not all_finite(weight) or (bias is not None and not all_finite(bias)):
            raise ValueError(f"weights of {t.name} contain NaN/Inf; refusing to compress")


def get_statistics(
    model: nn.Module,
    tokenizer,
    config: CompressionConfig,
    targets: list[Target] | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Calibration statistics for ``model`` under ``config``: from the cache, else computed and cached."""
    targets = targets or select_targets(model, config.include, config.exclude)
    if tokenizer is None:
        raise ValueError(f"method={config.method} needs calibration: pass the model's tokenizer")
    context = _context_length(model)
    if context is not None and config.calib_seqlen > context:
        raise ValueError(f"calib_seqlen={config.calib_seqlen} exceeds the model's context length {context}")
    text = load_calibration_text(config.calib_dataset)
    bos = bos_per_window(tokenizer, config.calib_bos)
    windows = calibration_windows(tokenizer, text.text, config.calib_nsamples, config.calib_seqlen, config.seed, bos=bos)
    # One cache entry per model x calibration windows x layer list: every method and ratio reuses it.
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_stats_dir()
    folder = root / cache_key(model, windows_fingerprint(windows), targets, bos_per_window=bos)
    cached = load_cached_statistics(folder, targets)
    if cached is not None:
        logger.info("reusing calibration statistics from %s", folder)
        return cached
    meta = {"calibration": {**config.calibration_dict(), "bos_per_window": bos, "source": text.source}, "model": getattr(model, "name_or_path", "")}
    return collect_statistics(
        model, windows, targets, folder, batch_size=config.calib_batch_size, progress=progress, meta=meta
    )


@torch.no_grad()
def compress_model(
    model: nn.Module,
    tokenizer=None,
    config: CompressionConfig | None = None,
    *,
    stats: CalibrationStats | None = None,
    progress: bool = True,
    svd_cache: dict | None = None,
    **overrides: Any,
) -> CompressionReport:
    """Compress ``model`` in place: every target linear becomes a ``LowRankLinear``.

    ``config`` (or keyword overrides such as ``method="nsvd-i", ratio=0.4``) says how; ``tokenizer``
    is needed for the calibration pass of activation-aware methods (statistics are cached, see
    ``nsvd_lm.calibration``). Returns a report with per-layer ranks, parameter counts and the
    whitened truncation loss; the compression settings are also stored on ``model.nsvd_compression``
    for ``save_compressed``.

    ``svd_cache``: pass the same dict to several calls on copies of one model (a sweep) and each
    matrix's first-step SVD is computed once per whitening kind and reused for every ratio and
    ``k1_frac`` (exact driver only). It holds float64 factors: clear it between whitening kinds
    if memory is tight.
    """
    if config is None:
        config = CompressionConfig.from_kwargs(**overrides)
    elif overrides:
        config = CompressionConfig.from_kwargs(**{**config.to_dict(), **overrides})
    started = time.perf_counter()
    if getattr(model, "nsvd_compression", None):
        raise ValueError("model is already compressed; load the base model again to compress it another way")
    targets = select_targets(model, config.include, config.exclude)
    _check_finite_weights(targets)
    params_before = sum(p.numel() for p in model.parameters())
    seconds: dict[str, float] = {}

    if config.needs_calibration and stats is None:
        stats = get_statistics(model, tokenizer, config, targets, progress=progress)
        seconds["calibration"] = time.perf_counter() - started
    t0 = time.perf_counter()
    reports: list[ModuleReport] = []
    # Layers fed the same input (q/k/v, gate/up) come one after another and share one G, so the
    # last whitening (a Cholesky or eigendecomposition of G) is kept for the next layer.
    whitenings: dict = {}
    for target in tqdm(targets, desc=f"decompose ({config.method})", disable=not progress):
        reports.append(_compress_one(model, target, config, stats, svd_cache, whitenings))
    seconds["decomposition"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - started

    params_after = sum(p.numel() for p in model.parameters())
    calibration = {}
    if config.needs_calibration and stats is not None:
        # This run's settings over the cached entry's (a no-BOS tokenizer shares one entry for bos=auto/never).
        calibration = {**stats.meta.get("calibration", {}), **config.calibration_dict(), "tokens": stats.token_count}
    report = CompressionReport(
        method=config.method,
        ratio=config.ratio,
        config=config.to_dict(),
        modules=reports,
        params_before=params_before,
        params_after=params_after,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        calibration=calibration,
        stats_cache_hit=stats.cache_hit if stats is not None else None,
    )
    model.nsvd_compression = {
        "method": config.method,
        "ratio": config.ratio,
        "k1_frac": config.k1_frac,
        "asvd_alpha": config.asvd_alpha,
        "asvd3_beta": config.asvd3_beta,
        "include": list(config.include) if config.include else None,
        "exclude": list(config.exclude) if config.exclude else None,
        "svd_driver": config.svd_driver,
        "calibration": calibration or None,
        "ranks": {m.name: m.rank for m in reports if m.rank is not None},
        "params_before": params_before,
        "params_after": params_after,
        "base_model": getattr(getattr(model, "config", None), "name_or_path", None),
        "nsvd_lm_version": __version__,
    }
    logger.debug("compressed with %s:\n%s", config.method, report.summary())
    return report


def _compress_one(
    model: nn.Module,
    target: Target,
    config: CompressionConfig,
    stats: CalibrationStats | None,
    svd_cache: dict | None,
    whitenings: dict,
) -> ModuleReport:
    weight, bias = dense_weight_and_bias(target.module)
    m, n = weight.shape
    params_before = weight.numel() + (bias.numel() if bias is not None else 0)
    method = get_method(config.method)
    device = torch.device(config.compute_device) if config.compute_device else weight.device
    gram = stats.gram(target.name).to(device) if method.needs_gram and stats is not None else None
    mean_abs = stats.mean_abs(target.name).to(device) if method.statistics == "mean_abs" and stats is not None else None
    # Same statistics entry (a shared input) + same whitening settings = the same S; the statistics
    # folder is part of the SVD key, so a sweep's cache never mixes calibrations or models.
    knobs = tuple(getattr(config, k) for k in method.knobs if k != "k1_frac")
    input_key = stats.module_to_key.get(target.name, target.name) if stats is not None else None
    reuse = Reuse(
        whitenings,
        whitening_key=(input_key, str(device), method.whitening, config.svd_driver, *knobs),
        svds=svd_cache,
        svd_key=(str(stats.path) if stats is not None else None, target.name, method.whitening, config.svd_driver, *knobs),
    )
    w = weight.detach().to(device)
    factors = factors_for_ratio(
        w, config.ratio, config.method, gram=gram, mean_abs=mean_abs, k1_frac=config.k1_frac,
        asvd_alpha=config.asvd_alpha, asvd3_beta=config.asvd3_beta, svd_driver=config.svd_driver, reuse=reuse,
    )
    if factors is None:
        logger.info("%s (%d x %d): rank %d would not save parameters at ratio %s; kept dense", target.name, m, n,
                    rank_for_ratio(m, n, config.ratio), config.ratio)
        return ModuleReport(target.name, m, n, None, None, None, params_before, params_before, kept_dense="no saving")
    if not (all_finite(factors.up) and all_finite(factors.down)):
        raise ValueError(f"decomposition of {target.name} produced NaN/Inf (method {config.method})")
    relative_loss = relative_activation_loss(w, factors, gram) if gram is not None else None

    replacement = LowRankLinear.from_factors(
        factors.up, factors.down, bias, method=config.method, dtype=weight.dtype, device=weight.device
    )
    parent, child = get_parent(model, target.name)
    setattr(parent, child, replacement)
    params_after = sum(p.numel() for p in replacement.parameters())
    return ModuleReport(
        target.name, m, n, factors.rank, factors.first_rank, factors.residual_rank, params_before, params_after,
        relative_activation_loss=relative_loss, gram_shift=factors.gram_shift,
    )
