"""``compress_model``: the one in-place entry point (torchao ``quantize_`` style: config → module swap)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nsvd_lm import __version__
from nsvd_lm.allocation import ALLOCATIONS, PROBE_TOKENS, PROBE_WINDOWS, Probe, plan_ranks
from nsvd_lm.calibration import CalibrationConfig, CalibrationStats, calibrate, calibration_token_windows
from nsvd_lm.config import CompressionConfig, split_flat_arguments
from nsvd_lm.decompose import LayerFactorizer, all_finite, propagation_target, relative_activation_loss
from nsvd_lm.distributed import Processes, broadcast_from_first_process
from nsvd_lm.files import write_json_atomic
from nsvd_lm.modules import LowRankLinear, Target, dense_weight_and_bias
from nsvd_lm.targets import select_targets
from nsvd_lm.windows import windows_fingerprint

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
class CompressionRecord:
    """What a compression did: the one record of it.

    Written once by ``compress_model`` (as ``model.nsvd_compression``, a plain dict so it travels
    in the checkpoint's config.json), read back with ``from_dict`` by ``load_compressed`` and the
    lm-eval adapter, which puts ``results_block`` into the results JSON.
    """

    method: str | None
    ratio: float
    k1_frac: float | None = None
    asvd_alpha: float | None = None
    asvd3_beta: float | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    svd_driver: str | None = None
    calibration: dict[str, Any] | None = None  # settings, source, tokens, bos_per_window
    ranks: dict[str, int] = field(default_factory=dict)
    params_before: int = 0  # whole model
    params_after: int = 0
    target_params_before: int | None = None  # the compressed layers only
    target_params_after: int | None = None
    base_model: str | None = None
    nsvd_lm_version: str = __version__
    seconds: dict[str, float] = field(default_factory=dict)
    stats_cache_hit: bool | None = None
    rank_allocation: str = "uniform"
    # Propagation-aware: each block fitted to the outputs of the blocks before it, already compressed.
    sequential: bool = False
    # A measured allocation: budget, spent, uniform_ranks, curve_seconds, curves_cache_hit.
    allocation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: CompressionConfig, **outcome: Any) -> "CompressionRecord":
        """The record of a run of ``config``: its settings (every record field ``config`` has, from
        ``config.to_dict``) and ``outcome`` (ranks, parameters, timings, calibration, ...)."""
        settings = config.to_dict()
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings}, **outcome)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionRecord":
        """From ``model.nsvd_compression`` / a checkpoint (older checkpoints lack the newer keys)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def uncompressed(cls, model: nn.Module) -> "CompressionRecord":
        params = sum(p.numel() for p in model.parameters())
        return cls(method=None, ratio=0.0, params_before=params, params_after=params)

    def results_block(self, source: str) -> dict[str, Any]:
        """The ``compression`` entry of an lm-eval results JSON (per-layer ranks stay in the checkpoint,
        except a measured allocation's, which are what it decided)."""
        block = self.to_dict()
        block.pop("ranks")
        if block.get("allocation"):  # a measured allocation's ranks are its result: kept with the scores
            block["allocation"] = {"ranks": self.ranks, **block["allocation"]}
        block["source"] = source
        block["compression_seconds"] = self.seconds.get("total")
        if self.params_before:
            block["params_removed_fraction"] = round(1 - self.params_after / self.params_before, 6)
        return block


@dataclass
class CompressionReport:
    """A compression run: its record plus the per-layer detail (ranks, activation loss)."""

    record: CompressionRecord
    config: dict
    modules: list[ModuleReport]
    # True when torch.distributed ranks were made to hold rank 0's weights (``processes``).
    weights_broadcast: bool = False

    @property
    def method(self) -> str | None:
        return self.record.method

    @property
    def ratio(self) -> float:
        return self.record.ratio

    @property
    def params_before(self) -> int:
        return self.record.params_before

    @property
    def params_after(self) -> int:
        return self.record.params_after

    @property
    def seconds(self) -> dict[str, float]:
        return self.record.seconds

    @property
    def calibration(self) -> dict[str, Any]:
        return self.record.calibration or {}

    @property
    def stats_cache_hit(self) -> bool | None:
        return self.record.stats_cache_hit

    @property
    def target_params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def target_params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "config": self.config, "modules": [asdict(m) for m in self.modules]}

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


def _check_finite_weights(model: nn.Module) -> None:
    """Refuse NaN/Inf weights in any linear layer of the decoder blocks, selected or not: such a
    layer would also poison the calibration inputs of every later layer."""
    for t in select_targets(model):
        weight, bias = dense_weight_and_bias(t.module)
        if weight.device.type == "meta":  # offloaded by accelerate: nothing to read here
            continue
        if not all_finite(weight) or (bias is not None and not all_finite(bias)):
            raise ValueError(f"weights of {t.name} contain NaN/Inf; refusing to compress")


def get_statistics(
    model: nn.Module,
    tokenizer,
    calibration: CalibrationConfig,
    targets: list[Target] | None = None,
    progress: bool = True,
    include: Any = None,
    exclude: Any = None,
) -> CalibrationStats:
    """Calibration statistics at ``targets`` (default: the layers ``include``/``exclude`` select)."""
    return calibrate(model, tokenizer, calibration, targets or select_targets(model, include, exclude), progress)


def sequential_identity(config: CompressionConfig, ranks: dict[str, int]) -> dict[str, Any]:
    """What decides a sequential run's statistics besides the dense entry's key: the method, its knobs,
    the SVD driver and every layer's rank (``ranks``: however the allocation chose them)."""
    method = config.method_spec
    return {
        "method": config.method,
        "knobs": {k: getattr(config, k) for k in method.knobs},
        "svd_driver": config.svd_driver,
        "rank_allocation": config.rank_allocation,  # for the reader of meta.json; the ranks decide
        "ranks": dict(sorted(ranks.items())),
    }


def _factor_and_swap(
    model: nn.Module, target: Target, rank: int | None, factorize: LayerFactorizer, config: CompressionConfig
) -> ModuleReport:
    """One layer: its factors at ``rank`` (None: kept dense), the module swap, its report.

    With sequential statistics the method factors ``propagation_target`` (the weight that maps the
    compressed prefix's inputs to the dense outputs) instead of the layer's own weight.
    """
    weight, bias = dense_weight_and_bias(target.module)
    m, n = weight.shape
    dtype, home = weight.dtype, weight.device  # where the factors go (the target may be W*)
    params_dense = weight.numel() + (bias.numel() if bias is not None else 0)
    if rank is None:
        logger.info("%s (%d x %d): no rank saves parameters at ratio %s; dense", target.name, m, n, config.ratio)
        return ModuleReport(target.name, m, n, None, None, None, params_dense, params_dense, kept_dense="no saving")
    stats = factorize.stats
    if stats is not None and getattr(stats, "sequential", False):
        device = factorize.device(weight)
        weight = propagation_target(
            weight.detach().to(device), stats.gram(target.name).to(device), stats.cross(target.name).to(device)
        )
    factors = factorize(target.name, weight, rank)
    gram, _ = factorize.statistics(target.name, weight)
    if not (all_finite(factors.up) and all_finite(factors.down)):
        raise ValueError(f"decomposition of {target.name} produced NaN/Inf (method {config.method})")
    w = weight.detach().to(factors.up.device)
    relative_loss = relative_activation_loss(w, factors, gram) if gram is not None else None
    replacement = LowRankLinear.from_factors(
        factors.up, factors.down, bias, method=config.method, dtype=dtype, device=home
    )
    model.set_submodule(target.name, replacement)
    return ModuleReport(
        target.name,
        m,
        n,
        factors.rank,
        factors.first_rank,
        factors.residual_rank,
        params_dense,
        sum(p.numel() for p in replacement.parameters()),
        relative_activation_loss=relative_loss,
        gram_shift=factors.gram_shift,
    )


@torch.no_grad()
def compress_model(
    model: nn.Module,
    tokenizer=None,
    config: CompressionConfig | None = None,
    *,
    calibration: CalibrationConfig | None = None,
    stats: CalibrationStats | None = None,
    processes: Processes | None = None,
    progress: bool = True,
    svd_cache: dict | None = None,
    **overrides: Any,
) -> CompressionReport:
    """Compress ``model`` in place: every target linear becomes a ``LowRankLinear``.

    ``config`` says how (default ``CompressionConfig()``: nsvd-i at ratio 0.4); ``stats`` are the
    calibration statistics, or ``calibration`` says where they come from (default
    ``CalibrationConfig()``, computed or read from the cache by ``nsvd_lm.calibration.calibrate``,
    which needs ``tokenizer``). Flat keyword overrides of either config work too, e.g.
    ``compress_model(model, tokenizer, method="asvd-i", ratio=0.3, calib_nsamples=64)``; they
    win over the fields of ``config``/``calibration``.
    Returns a report with per-layer ranks, parameter counts and the activation loss; the
    record of the compression is also stored on ``model.nsvd_compression`` for ``save_compressed``.

    ``processes``: this process among several that compress the same model together
    (``nsvd_lm.distributed.Processes``): one calibration forward pass for all of them, and rank 0's
    weights broadcast at the end.

    ``svd_cache``: pass the same dict to several calls on copies of one model (a sweep) and each
    matrix's first-step SVD is computed once per whitening kind and reused for every ratio and
    ``k1_frac`` (exact driver only). It holds float64 factors: clear it between whitening kinds
    if memory is tight.

    The steps, in order: the configs; the weights checked; the target layers; their statistics;
    the ranks (``ratio → k`` for every target, or the same budget spread by ``rank_allocation``:
    ``nsvd_lm.allocation.plan_ranks``); for every target ``k → k1 → factors``
    (``LayerFactorizer`` → ``nsvd_lm.decompose.low_rank_factors``) and the module swap; the record.

    ``sequential`` (a config field): the ranks are decided first (a measured allocation's curves on
    the dense model, as without it), then the calibration forward fits each block as it reaches it,
    to statistics collected on the outputs of the blocks before it, already compressed. Those
    statistics are cached under a key that holds the method, its knobs and the ranks as well, so
    the same run again reads them and factors every layer from them (the same factors).
    """
    if overrides:
        compression_overrides, calibration_overrides = split_flat_arguments(overrides)
        config = CompressionConfig(**{**(config.to_dict() if config else {}), **compression_overrides})
        calibration = CalibrationConfig(**{**(calibration.to_dict() if calibration else {}), **calibration_overrides})
    config = config or CompressionConfig()
    # Statistics handed in describe themselves; a calibration config handed in describes this run.
    described_run = calibration.describe() if calibration is not None else {}
    calibration = calibration or CalibrationConfig()
    method, allocation = config.method_spec, ALLOCATIONS[config.rank_allocation]
    # The dense model's statistics: what the method reads (unless each block is fitted sequentially,
    # to statistics of the compressed prefix), and what a measured allocation reads (G for fisher,
    # the method's dense factors for its probes), whatever the method needs.
    needs_statistics = (method.needs_calibration and not config.sequential) or allocation.measured
    if getattr(model, "nsvd_compression", None):
        raise ValueError("model is already compressed; load the base model again to compress it another way")
    if needs_statistics and stats is None and tokenizer is None:
        raise ValueError(f"method={config.method} needs calibration: pass the model's tokenizer")
    if allocation.measured and tokenizer is None:
        raise ValueError(
            f"rank_allocation={allocation.name} measures on calibration windows: pass the model's tokenizer"
        )
    if config.sequential and tokenizer is None:
        raise ValueError("sequential=True collects statistics on the compressed blocks: pass the model's tokenizer")
    started = time.perf_counter()
    _check_finite_weights(model)
    params_before = sum(p.numel() for p in model.parameters())
    seconds: dict[str, float] = {}

    # 1. The layers to factor and the dense model's calibration statistics.
    targets = select_targets(model, config.include, config.exclude)
    if needs_statistics and stats is None:
        stats = calibrate(model, tokenizer, calibration, targets, progress=progress, processes=processes)
        seconds["calibration"] = time.perf_counter() - started

    def factorizer(layer_stats: CalibrationStats | None, cache: dict | None) -> LayerFactorizer:
        return LayerFactorizer(
            config.method,
            layer_stats if method.needs_calibration else None,
            knobs=config.knobs,
            svd_driver=config.svd_driver,
            compute_device=config.compute_device,
            svd_cache=cache,
        )

    # A sequential run's SVDs belong to its own statistics, which no other configuration shares.
    factorize = factorizer(stats, None if config.sequential else svd_cache)

    # 2. The ranks: ratio → k for every layer (the paper), or the same parameter budget spread by
    # a criterion's curves, measured on the dense model on the first calibration windows
    # (nsvd_lm.allocation). A sequential run decides them here too, before fitting anything.
    probe, identity = None, None
    if allocation.measured:
        windows = calibration_token_windows(tokenizer, calibration)[0][:PROBE_WINDOWS, :PROBE_TOKENS]
        probe = Probe(model, targets, windows, factorize, stats, progress)
        knobs = [getattr(config, k) for k in method.knobs]
        identity = [stats.path.name, windows_fingerprint(windows), config.method, knobs, config.svd_driver]
        identity.append([t.name for t in targets])
    allocation_started = time.perf_counter()
    plan = plan_ranks(
        {t.name: t.shape for t in targets},
        config.ratio,
        config.rank_allocation,
        probe,
        calibration.cache_root,
        identity,
    )
    if plan.measured is not None:
        seconds["allocation"] = time.perf_counter() - allocation_started

    # 3. Every layer: factors at its rank (k → k1 → factors), then the module swap. Sequentially,
    # block by block inside the calibration forward: block l is fitted to statistics collected on
    # the outputs of blocks < l, already swapped (nsvd_lm.calibration.collect_statistics).
    reports: dict[str, ModuleReport] = {}
    decomposition_s = 0.0

    def fit(target: Target, fitter: LayerFactorizer) -> None:
        nonlocal decomposition_s
        t0 = time.perf_counter()
        reports[target.name] = _factor_and_swap(model, target, plan.ranks.get(target.name), fitter, config)
        decomposition_s += time.perf_counter() - t0

    if config.sequential:
        by_block: dict[int, list[Target]] = {}
        for target in targets:
            by_block.setdefault(target.block_index, []).append(target)

        def fit_block(index: int, so_far: CalibrationStats) -> None:
            fitter = factorizer(so_far, None)
            for target in by_block.get(index, []):
                fit(target, fitter)

        sequential_started = time.perf_counter()
        stats = calibrate(
            model,
            tokenizer,
            calibration,
            targets,
            progress=progress,
            processes=processes,
            sequential=sequential_identity(config, plan.ranks),
            fit_block=fit_block,
        )
        seconds["sequential"] = time.perf_counter() - sequential_started
        # From the cache (or another process's run) nothing was fitted yet: the same statistics give
        # the same factors, layer by layer, below.
        factorize = factorizer(stats, None)
    for target in tqdm(
        [t for t in targets if t.name not in reports], desc=f"decompose ({config.method})", disable=not progress
    ):
        fit(target, factorize)
    reports = [reports[t.name] for t in targets]
    seconds["decomposition"] = decomposition_s
    if plan.curves_to_store is not None:  # newly measured allocation curves: cached for the next ratio
        write_json_atomic(*plan.curves_to_store)
    seconds["total"] = time.perf_counter() - started

    # 4. Every process holds rank 0's weights (a no-op for one process).
    weights_broadcast = broadcast_from_first_process(model) if processes is not None else False

    # 5. The record.
    described: dict[str, Any] = {}
    if stats is not None:
        # This run's settings over the cached entry's (a no-BOS tokenizer shares one entry for bos=auto/never).
        described = {**stats.meta.get("calibration", {}), **described_run, "tokens": stats.token_count}
    record = CompressionRecord.from_config(
        config,
        calibration=described or None,
        ranks={m.name: m.rank for m in reports if m.rank is not None},
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        target_params_before=sum(m.params_before for m in reports),
        target_params_after=sum(m.params_after for m in reports),
        base_model=getattr(getattr(model, "config", None), "name_or_path", None),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        stats_cache_hit=stats.cache_hit if stats is not None else None,
        allocation=plan.describe(),
    )
    model.nsvd_compression = record.to_dict()
    report = CompressionReport(
        record=record, config=config.to_dict(), modules=reports, weights_broadcast=weights_broadcast
    )
    logger.debug("compressed with %s:\n%s", config.method, report.summary())
    return report
