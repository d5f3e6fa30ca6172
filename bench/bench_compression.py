"""Compression speed and memory, phase by phase, against the bare work it has to do (prints numbers; not a test).

    python bench/bench_compression.py --part smollm2 [--nsamples 32 --seqlen 512] [--json out.json]
    python bench/bench_compression.py --part llama7b [--layers 1 --nsamples-7b 16 --seqlen-7b 512] [--device cuda]
    python bench/bench_compression.py --part llama7b --device cuda --layers 32 --whole-model   # a GPU run

Targets of issue #5, all measured as ratios within one run:

* calibration (``nsvd_lm.calibration.collect_statistics``) ≤ 1.2 × (a plain forward of the
  decoder over the same tokens + the bare Gram GEMMs ``XᵀX`` on the same activations, one per
  distinct layer input, timed separately);
* decomposing every matrix (``compress_model`` with precomputed statistics) ≤ 1.5 × the bare
  LAPACK calls a method needs on the same matrices (``torch.linalg.svd`` of each m × n matrix,
  ``cholesky``/``eigh`` of each distinct Gram, a pivoted QR for NID, all float64 as the library);
* a sweep of M methods × R ratios runs exactly one calibration forward;
* peak RSS while compressing (calibration + decomposition) minus the RSS before the model is
  loaded ≤ 1.5 × (model weights + statistics), statistics counted as the float32 Gram matrices
  and mean-|x| vectors the cache holds.

On CPU each timing is reported as process CPU time and wall time; with one thread the CPU time
is the work itself and barely moves when other jobs share the machine, so the ratios use it.
On CUDA wall time (synchronised) is used. ``--part llama7b`` builds a randomly initialised model
with LLaMA-7B shapes from a config (no download) and times statistics and the decomposition of
one matrix of each shape (4096×4096: q/k/v/o, 11008×4096: gate/up, 4096×11008: down), then
extrapolates per layer and per model; with ``--whole-model`` (meant for a GPU) it compresses
every layer. It also compares ``svd_driver="lowrank"`` (``torch.svd_lowrank``) with the exact SVD.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
METHODS = ("svd", "asvd-0", "asvd-i", "asvd-ii", "nsvd-i", "nsvd-ii", "nid-i", "nid-ii")
K1_GRID = (0.99, 0.95, 0.90, 0.85, 0.80)
RATIO_GRID = (0.1, 0.2, 0.3, 0.4, 0.5)


# ----------------------------------------------------------------------------- measuring


@dataclass
class Clock:
    """Wall + process CPU seconds of a block (CUDA synchronised before and after)."""

    device: str = "cpu"
    wall: float = 0.0
    cpu: float = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator["Clock"]:
        self._sync()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield self
        finally:
            self._sync()
            self.wall += time.perf_counter() - wall0
            self.cpu += time.process_time() - cpu0

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    @property
    def seconds(self) -> float:
        """The number ratios use: CPU time on CPU, wall time on CUDA."""
        return self.wall if self.device.startswith("cuda") else self.cpu

    def to_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3)}


class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread; peak per named phase."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.phase: str | None = None
        self.peaks: dict[str, int] = {}
        self.baseline = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self.phase is not None:
                value = self.rss()
                if value > self.peaks.get(self.phase, 0):
                    self.peaks[self.phase] = value

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        self.phase = name
        self.peaks[name] = max(self.peaks.get(name, 0), self.rss())
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks[name], self.rss())
            self.phase = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# Real calibration forward passes in this process (nsvd_lm.calibration.collect_statistics is wrapped by
# count_calibration_forwards() before the measurements; cache hits run none).
CALIBRATION_FORWARDS = {"count": 0}


def count_calibration_forwards() -> None:
    from nsvd_lm import calibration

    if getattr(calibration.collect_statistics, "_counted", False):
        return
    collect = calibration.collect_statistics

    def counting(*args, **kwargs):
        CALIBRATION_FORWARDS["count"] += 1
        return collect(*args, **kwargs)

    counting._counted = True
    calibration.collect_statistics = counting


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- the phases


def batches(windows, batch_size: int):
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


def decoder_of(model):
    """The model without its LM head (embeddings + blocks + final norm): what calibration runs."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None else model.base_model


def plain_forward(model, windows, batch_size: int, device: str) -> Clock:
    """A plain forward of the decoder over ``windows`` (no hooks, no statistics)."""
    import torch

    decoder = decoder_of(model)
    clock = Clock(device)
    with torch.no_grad():
        for batch in batches(windows, batch_size):
            batch = batch.to(device)
            with clock.measure():
                decoder(input_ids=batch, use_cache=False)
    return clock


def bare_gram_gemms(model, targets, windows, batch_size: int, device: str) -> tuple[Clock, int]:
    """Time ``XᵀX`` (float32) on the real activations, once per distinct layer input and batch.

    The activations are captured by an untimed forward with pre-hooks that only keep references;
    inputs shared by several linears (same tensor object) count once, as the library does.
    Returns the clock and the number of GEMMs.
    """
    import torch

    decoder = decoder_of(model)
    clock = Clock(device)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def keep(_module, args):
        captured.setdefault(id(args[0]), args[0])

    handles = [t.module.register_forward_pre_hook(keep) for t in targets]
    try:
        with torch.no_grad():
            for batch in batches(windows, batch_size):
                captured.clear()
                decoder(input_ids=batch.to(device), use_cache=False)
                inputs = [x.detach().reshape(-1, x.shape[-1]) for x in captured.values()]
                captured.clear()
                with clock.measure():
                    for rows in inputs:
                        rows.T @ rows
                count += len(inputs)
                del inputs
    finally:
        for h in handles:
            h.remove()
    return clock, count


def calibrate(model, windows, targets, out_dir: Path, batch_size: int, device: str):
    from nsvd_lm.calibration import collect_statistics

    clock = Clock(device)
    with clock.measure():
        stats = collect_statistics(model, windows, targets, out_dir, batch_size=batch_size, progress=False)
    return stats, clock


def statistics_bytes(stats_dir: Path) -> int:
    """Bytes of the float32 statistics in a cache folder (tensor data, not file headers)."""
    from safetensors import safe_open

    total = 0
    for path in stats_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                total += math.prod(t.get_shape()) * 4
    return total


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decompose(
    model,
    stats,
    method: str,
    ratio: float,
    device: str,
    *,
    svd_cache: dict | None = None,
    keep: bool = False,
    **overrides,
) -> tuple[Any, Clock]:
    """``compress_model`` on ``model`` itself with precomputed statistics; returns (report, clock).

    Unless ``keep``, the original linear modules are put back afterwards (no model copies: a copy
    would double the memory the RSS measurement sees and cost a copy per configuration).
    """
    from nsvd_lm.compress import compress_model
    from nsvd_lm.config import CompressionConfig
    from nsvd_lm.targets import get_parent, select_targets

    config = CompressionConfig.from_kwargs(method=method, ratio=ratio, **overrides)
    # With ``keep`` no reference to the dense layers is held, so they are freed as they are
    # replaced, exactly as in ``nsvd-lm compress`` (the memory measurement relies on it).
    originals = [] if keep else [(t.name, t.module) for t in select_targets(model, config.include, config.exclude)]
    clock = Clock(device)
    with clock.measure():
        report = compress_model(
            model, None, config, stats=stats if config.needs_calibration else None, progress=False, svd_cache=svd_cache
        )
    if not keep:
        for name, module in originals:
            parent, child = get_parent(model, name)
            setattr(parent, child, module)
        del model.nsvd_compression
    return report, clock


@dataclass
class BareTimes:
    """Seconds of each bare LAPACK call, per target matrix and per distinct Gram matrix."""

    svd: dict[str, float] = field(default_factory=dict)  # per target: svd of an m × n float64 matrix
    qr: dict[str, float] = field(default_factory=dict)  # per target: pivoted QR (NID's residual step)
    cholesky: dict[str, float] = field(default_factory=dict)  # per distinct input
    eigh: dict[str, float] = field(default_factory=dict)  # per distinct input
    key_of: dict[str, str] = field(default_factory=dict)  # target -> distinct input

    def for_method(self, method: str, names: list[str] | None = None) -> float:
        """The bare work of ``method``: first step per matrix (+ one factorisation per distinct Gram)
        and, for nested methods, one more SVD (NSVD) or pivoted QR (NID) of an m × n residual."""
        names = list(self.svd) if names is None else names
        keys = {self.key_of[n] for n in names}
        total = sum(self.svd[n] for n in names)
        if method.endswith("-i") and method != "asvd-0":
            total += sum(self.cholesky[k] for k in keys)
        if method.endswith("-ii"):
            total += sum(self.eigh[k] for k in keys)
        if method.startswith("nsvd"):
            total += sum(self.svd[n] for n in names)  # residual: same shape as W
        if method.startswith("nid"):
            total += sum(self.qr[n] for n in names)
        return total


def bare_linalg(model, targets, stats, device: str, with_qr: bool = True) -> BareTimes:
    """Time the bare calls on the real matrices (float64 on ``device``; QR with scipy on CPU like NID)."""
    import scipy.linalg
    import torch

    from nsvd_lm.modules import dense_weight_and_bias

    bare = BareTimes()
    for target in targets:
        weight, _ = dense_weight_and_bias(target.module)
        w64 = weight.detach().to(device, torch.float64)
        clock = Clock(device)
        with clock.measure():
            torch.linalg.svd(w64, full_matrices=False)
        bare.svd[target.name] = clock.seconds
        if with_qr:
            a = w64.cpu().numpy()
            clock = Clock("cpu")
            with clock.measure():
                scipy.linalg.qr(a, mode="economic", pivoting=True)
            bare.qr[target.name] = clock.cpu if not device.startswith("cuda") else clock.wall
        key = stats.module_to_key[target.name]
        bare.key_of[target.name] = key
        if key not in bare.cholesky:
            g64 = stats.gram(key).to(device)
            clock = Clock(device)
            with clock.measure():
                torch.linalg.cholesky_ex(g64)
            bare.cholesky[key] = clock.seconds
            clock = Clock(device)
            with clock.measure():
                torch.linalg.eigh(g64)
            bare.eigh[key] = clock.seconds
    return bare


# ----------------------------------------------------------------------------- SmolLM2-135M


def bench_smollm2(args: argparse.Namespace, sampler: RssSampler) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm.calib_data import load_calibration_text
    from nsvd_lm.config import parse_configs
    from nsvd_lm.names import portable_path, portable_text
    from nsvd_lm.smollm2 import smollm2_path
    from nsvd_lm.targets import select_targets
    from nsvd_lm.windows import calibration_windows

    count_calibration_forwards()
    device, ratio, out = args.device, args.ratio, {}
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = load_calibration_text("wikitext2")
    windows = calibration_windows(tokenizer, text.text, args.nsamples, args.seqlen, seed=3)
    out["setup"] = {
        "model": portable_path(path),
        "include": args.include,
        "calibration_text": portable_text(text.source),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "tokens": int(windows.numel()),
        "batch_size": args.batch_size,
        "ratio": ratio,
    }
    log(
        f"[smollm2] {args.nsamples} x {args.seqlen} tokens from {text.source}; "
        f"device {device}, {torch.get_num_threads()} thread(s)"
    )

    # Baseline: interpreter, libraries, tokenizer and tokenized calibration text; not the model.
    sampler.baseline = sampler.rss()
    with sampler.in_phase("load"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    weights_b = weight_bytes(model)
    include = tuple(args.include) if args.include else None
    targets = select_targets(model, include)
    scope = {"include": list(include)} if include else {}  # passed to every decomposition
    work = Path(tempfile.mkdtemp(prefix="nsvd-bench-"))

    # 1. what `nsvd-lm compress` does, in order, with RSS sampled: calibration, then nsvd-i
    runs_before = CALIBRATION_FORWARDS["count"]
    with sampler.in_phase("calibration"):
        stats, calib_clock = calibrate(model, windows, targets, work / "stats", args.batch_size, device)
    forwards = CALIBRATION_FORWARDS["count"] - runs_before
    reports, clocks = {}, {}
    with sampler.in_phase("decomposition"):
        reports["nsvd-i"], clocks["nsvd-i"] = decompose(model, stats, "nsvd-i", ratio, device, keep=True, **scope)
    out["memory"] = _memory(sampler, weights_b, stats_dir=work / "stats")
    # The rest times each method on the dense model again (untimed reload, same weights).
    del model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    targets = select_targets(model, include)

    # 2. calibration vs plain forward + bare Gram GEMMs, two interleaved rounds with the fastest of
    #    each kept: on a shared machine a round slowed by another job measures that job, not ours.
    forward_clock = plain_forward(model, windows, args.batch_size, device)
    gram_clock, n_gemms = bare_gram_gemms(model, targets, windows, args.batch_size, device)
    _, calib_again = calibrate(model, windows, targets, work / "stats_round2", args.batch_size, device)
    forward_again = plain_forward(model, windows, args.batch_size, device)
    gram_again, _ = bare_gram_gemms(model, targets, windows, args.batch_size, device)
    calib_rounds = [round(c.seconds, 1) for c in (calib_clock, calib_again)]
    calib_clock = min(calib_clock, calib_again, key=lambda c: c.seconds)
    forward_clock = min(forward_clock, forward_again, key=lambda c: c.seconds)
    gram_clock = min(gram_clock, gram_again, key=lambda c: c.seconds)
    baseline = forward_clock.seconds + gram_clock.seconds
    out["calibration"] = {
        "collect_statistics": calib_clock.to_dict(),
        "plain_forward": forward_clock.to_dict(),
        "bare_gram_gemms": {**gram_clock.to_dict(), "gemms": n_gemms},
        "ratio": round(calib_clock.seconds / baseline, 3),
        "target": 1.2,
        "forwards_counted": forwards,
        "collect_statistics_rounds_s": calib_rounds,
        "distinct_inputs": len(set(stats.module_to_key.values())),
        "layers": len(targets),
    }
    log(
        f"[smollm2] calibration {calib_clock.seconds:.1f}s vs forward {forward_clock.seconds:.1f}s + "
        f"grams {gram_clock.seconds:.1f}s -> ratio {out['calibration']['ratio']:.2f} (target <= 1.2)"
    )

    # 3. decomposition per method vs bare LAPACK calls
    bare = bare_linalg(model, targets, stats, device)
    out["decomposition"] = {}
    for method in args.methods:
        if method not in clocks:
            reports[method], clocks[method] = decompose(model, stats, method, ratio, device, **scope)
        report, clock = reports[method], clocks[method]
        bare_s = bare.for_method(method)
        out["decomposition"][method] = {
            **clock.to_dict(),
            "bare_s": round(bare_s, 3),
            "ratio": round(clock.seconds / bare_s, 3),
            "target": 1.5,
            "mean_relative_activation_loss": _mean_loss(report),
        }
        log(
            f"[smollm2] decompose {method:8s} {clock.seconds:7.1f}s vs bare {bare_s:7.1f}s "
            f"-> ratio {clock.seconds / bare_s:.2f}"
        )
    out["bare_calls_total_s"] = {
        "svd": round(sum(bare.svd.values()), 3),
        "pivoted_qr": round(sum(bare.qr.values()), 3),
        "cholesky": round(sum(bare.cholesky.values()), 3),
        "eigh": round(sum(bare.eigh.values()), 3),
    }

    # 4. reuse across a k1 sweep and a ratio sweep (svd_cache)
    cache: dict = {}
    k1_clock = Clock(device)
    for k1 in K1_GRID:
        _, clock = decompose(model, stats, "nsvd-i", ratio, device, svd_cache=cache, k1_frac=k1, **scope)
        k1_clock.wall, k1_clock.cpu = k1_clock.wall + clock.wall, k1_clock.cpu + clock.cpu
    bare_k1 = bare.for_method("asvd-i") + len(K1_GRID) * sum(bare.svd.values())
    ratio_clock = Clock(device)
    for r in RATIO_GRID:
        _, clock = decompose(model, stats, "asvd-i", r, device, svd_cache=cache, **scope)
        ratio_clock.wall, ratio_clock.cpu = ratio_clock.wall + clock.wall, ratio_clock.cpu + clock.cpu
    cache.clear()
    out["sweeps_with_svd_cache"] = {
        "nsvd-i_k1_grid": {
            "k1": list(K1_GRID),
            **k1_clock.to_dict(),
            "bare_s": round(bare_k1, 3),
            "ratio": round(k1_clock.seconds / bare_k1, 3),
        },
        "asvd-i_ratio_grid_after_k1_grid": {
            "ratios": list(RATIO_GRID),
            **ratio_clock.to_dict(),
            "note": "first-step SVDs already cached by the k1 grid: bare work 0",
        },
    }
    log(
        f"[smollm2] nsvd-i k1 grid {K1_GRID} with svd_cache: {k1_clock.seconds:.1f}s vs bare {bare_k1:.1f}s; "
        f"asvd-i over {len(RATIO_GRID)} ratios from the same cache: {ratio_clock.seconds:.1f}s"
    )

    # 5. lowrank driver on real weights
    report, clock = decompose(model, stats, "asvd-i", ratio, device, svd_driver="lowrank", **scope)
    exact = reports.get("asvd-i")
    out["lowrank_asvd-i"] = {
        **clock.to_dict(),
        "mean_relative_activation_loss": _mean_loss(report),
        "exact_mean_relative_activation_loss": _mean_loss(exact) if exact else None,
        "exact_s": out["decomposition"].get("asvd-i", {}).get("cpu_s" if device == "cpu" else "wall_s"),
    }
    log(
        f"[smollm2] asvd-i lowrank {clock.seconds:.1f}s, loss {_mean_loss(report):.5f} vs exact "
        f"{_mean_loss(exact) if exact else float('nan'):.5f}"
    )

    # 6. one calibration forward for methods x ratios (fresh cache; block 0 only to keep it short)
    runs_before = CALIBRATION_FORWARDS["count"]
    grid_cache = work / "grid_stats"
    sweep_svd: dict = {}
    sweep_methods = ("svd", "asvd-0", "asvd-i", "asvd-ii", "nsvd-i", "nsvd-ii")
    for method in sweep_methods:
        for r in RATIO_GRID:
            config, calib = parse_configs(
                method=method,
                ratio=r,
                calib_dataset="wikitext2",
                calib_nsamples=args.nsamples,
                calib_seqlen=args.seqlen,
                seed=3,
                cache_dir=str(grid_cache),
                calib_batch_size=args.batch_size,
                include=("model.layers.0.*",),
            )
            _compress_and_restore(model, tokenizer, config, calib, sweep_svd)
        sweep_svd.clear()
    out["grid_calibration_forwards"] = {
        "methods": list(sweep_methods),
        "ratios": list(RATIO_GRID),
        "configurations": len(sweep_methods) * len(RATIO_GRID),
        "forwards": CALIBRATION_FORWARDS["count"] - runs_before,
        "scope": "layers of block 0 (include=model.layers.0.*)",
    }
    log(
        f"[smollm2] {len(sweep_methods)} methods x {len(RATIO_GRID)} ratios: "
        f"{out['grid_calibration_forwards']['forwards']} calibration forward(s)"
    )

    return out


def _compress_and_restore(model, tokenizer, config, calib, svd_cache: dict) -> None:
    """``compress_model`` with calibration through the cache (as a sweep does), then undo it."""
    from nsvd_lm.compress import compress_model
    from nsvd_lm.targets import get_parent, select_targets

    originals = [(t.name, t.module) for t in select_targets(model, config.include, config.exclude)]
    compress_model(model, tokenizer, config, calibration=calib, progress=False, svd_cache=svd_cache)
    for name, module in originals:
        parent, child = get_parent(model, name)
        setattr(parent, child, module)
    del model.nsvd_compression


def _pct_increase(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(100 * (value / reference - 1), 4)


def _mean_loss(report) -> float | None:
    losses = [m.relative_activation_loss for m in report.modules if m.relative_activation_loss is not None]
    return round(sum(losses) / len(losses), 6) if losses else None


def _memory(sampler: RssSampler, weight_bytes_: int, stats_dir: Path) -> dict[str, Any]:
    stats_b = statistics_bytes(stats_dir)
    peak = max(sampler.peaks.get("calibration", 0), sampler.peaks.get("decomposition", 0))
    budget = weight_bytes_ + stats_b
    used = peak - sampler.baseline
    result = {
        "rss_before_model_gib": round(gib(sampler.baseline), 3),  # libraries, tokenizer, calibration tokens
        "peak_rss_gib": {k: round(gib(v), 3) for k, v in sampler.peaks.items()},
        "weights_gib": round(gib(weight_bytes_), 3),
        "statistics_fp32_gib": round(gib(stats_b), 3),
        "peak_above_baseline_gib": round(gib(used), 3),
        "ratio": round(used / budget, 3) if budget else None,
        "target": 1.5,
    }
    log(
        f"[memory] peak RSS above the pre-model baseline {gib(used):.2f} GiB vs weights {gib(weight_bytes_):.2f} + "
        f"statistics {gib(stats_b):.2f} GiB -> ratio {result['ratio']}"
    )
    return result


# ----------------------------------------------------------------------------- LLaMA-7B shapes


def llama7b_model(layers: int, vocab_size: int, device: str, dtype, hidden: int = 4096, intermediate: int = 11008):
    """LLaMA-7B's block (hidden 4096, intermediate 11008, 32 heads, no GQA), randomly initialised."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


REPRESENTATIVE = {  # one matrix of each shape in a LLaMA-7B block, and how many of it a block has
    "self_attn.q_proj": 4,  # q, k, v, o: 4096 x 4096
    "mlp.gate_proj": 2,  # gate, up: 11008 x 4096
    "mlp.down_proj": 1,  # 4096 x 11008
}


def bench_llama7b(args: argparse.Namespace, sampler: RssSampler) -> dict[str, Any]:
    import torch

    from nsvd_lm.allocation import rank_for_ratio
    from nsvd_lm.targets import select_targets

    device, ratio, out = args.device, args.ratio, {}
    dtype = getattr(torch, args.dtype_7b)
    sampler.baseline = sampler.rss()  # interpreter + libraries, before the model
    with sampler.in_phase("load"):
        model = llama7b_model(args.layers, args.vocab_7b, device, dtype, args.hidden_7b, args.intermediate_7b)
    weights_b = weight_bytes(model)
    targets = select_targets(model)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, args.vocab_7b, (args.nsamples_7b, args.seqlen_7b), generator=generator)
    out["setup"] = {
        "layers": args.layers,
        "hidden": args.hidden_7b,
        "intermediate": args.intermediate_7b,
        "heads": 32,
        "vocab": args.vocab_7b,
        "dtype": args.dtype_7b,
        "nsamples": args.nsamples_7b,
        "seqlen": args.seqlen_7b,
        "tokens": int(windows.numel()),
        "ratio": ratio,
        "weights_gib": round(gib(weight_bytes(model)), 3),
    }
    log(
        f"[llama7b] {args.layers} layer(s) of LLaMA-7B shape, {args.dtype_7b} on {device}, "
        f"{windows.shape[0]} x {windows.shape[1]} random tokens, {torch.get_num_threads()} thread(s)"
    )
    work = Path(tempfile.mkdtemp(prefix="nsvd-bench-7b-"))

    with sampler.in_phase("calibration"):
        stats, calib_clock = calibrate(model, windows, targets, work / "stats", args.batch_size, device)
    forward_clock = plain_forward(model, windows, args.batch_size, device)
    gram_clock, n_gemms = bare_gram_gemms(model, targets, windows, args.batch_size, device)
    baseline = forward_clock.seconds + gram_clock.seconds
    out["calibration"] = {
        "collect_statistics": calib_clock.to_dict(),
        "plain_forward": forward_clock.to_dict(),
        "bare_gram_gemms": {**gram_clock.to_dict(), "gemms": n_gemms},
        "ratio": round(calib_clock.seconds / baseline, 3),
        "target": 1.2,
        "statistics_s_per_layer": round(calib_clock.seconds / args.layers, 3),
        "statistics_s_per_layer_per_1k_tokens": round(calib_clock.seconds / args.layers / windows.numel() * 1000, 3),
    }
    log(
        f"[llama7b] calibration {calib_clock.seconds:.1f}s vs forward {forward_clock.seconds:.1f}s + grams "
        f"{gram_clock.seconds:.1f}s -> ratio {out['calibration']['ratio']:.2f}; "
        f"{out['calibration']['statistics_s_per_layer_per_1k_tokens']:.2f}s per layer per 1k tokens"
    )

    if args.whole_model:
        with sampler.in_phase("decomposition"):
            report, clock = decompose(model, stats, args.whole_method, ratio, device, keep=True)
        out["whole_model"] = {
            "method": args.whole_method,
            **clock.to_dict(),
            "seconds_per_layer": round(clock.seconds / args.layers, 3),
            "mean_relative_activation_loss": _mean_loss(report),
        }
        log(
            f"[llama7b] whole model {args.whole_method}: {clock.seconds:.1f}s "
            f"({clock.seconds / args.layers:.1f}s per layer)"
        )
        out["memory"] = _memory(sampler, weights_b, work / "stats")
        return out

    # Decomposition of one matrix per shape: exact asvd-i, nsvd-i on top of it (svd_cache), lowrank asvd-i.
    per_shape = {}
    for suffix, per_block in REPRESENTATIVE.items():
        name = f"model.layers.0.{suffix}"
        target = next(t for t in targets if t.name == name)
        m, n = target.module.weight.shape
        bare = bare_linalg(model, [target], stats, device, with_qr=False)
        include = (name,)
        cache: dict = {}
        with sampler.in_phase("decomposition"):
            rep_exact, exact_clock = decompose(model, stats, "asvd-i", ratio, device, include=include, svd_cache=cache)
            if suffix in args.nsvd_shapes:
                rep_nsvd, nsvd_clock = decompose(
                    model, stats, "nsvd-i", ratio, device, include=include, svd_cache=cache
                )
            else:  # not timed (CPU budget): NSVD's extra work is one SVD of the m x n residual
                rep_nsvd, nsvd_clock = None, Clock(device, wall=bare.svd[name], cpu=bare.svd[name])
        cache.clear()
        rep_low, low_clock = decompose(model, stats, "asvd-i", ratio, device, include=include, svd_driver="lowrank")
        bare_asvd = bare.for_method("asvd-i")
        per_shape[suffix] = {
            "shape": [m, n],
            "per_block": per_block,
            "rank": rank_for_ratio(m, n, ratio),
            "bare_svd_s": round(bare.svd[name], 3),
            "bare_cholesky_s": round(sum(bare.cholesky.values()), 3),
            "asvd-i": {
                **exact_clock.to_dict(),
                "ratio_to_bare": round(exact_clock.seconds / bare_asvd, 3),
                "relative_activation_loss": _mean_loss(rep_exact),
            },
            "nsvd-i_after_asvd-i": {
                **nsvd_clock.to_dict(),
                "ratio_to_bare_residual_svd": round(nsvd_clock.seconds / bare.svd[name], 3),
                "measured": rep_nsvd is not None,
                "relative_activation_loss": _mean_loss(rep_nsvd) if rep_nsvd else None,
            },
            "asvd-i_lowrank": {
                **low_clock.to_dict(),
                "speedup_vs_exact": round(exact_clock.seconds / low_clock.seconds, 3),
                "relative_activation_loss": _mean_loss(rep_low),
                "loss_increase_vs_exact_pct": _pct_increase(_mean_loss(rep_low), _mean_loss(rep_exact)),
            },
        }
        log(
            f"[llama7b] {suffix} {m}x{n} k={per_shape[suffix]['rank']}: bare svd {bare.svd[name]:.1f}s + chol "
            f"{sum(bare.cholesky.values()):.1f}s; asvd-i {exact_clock.seconds:.1f}s "
            f"(x{exact_clock.seconds / bare_asvd:.2f}); "
            f"nsvd-i extra {nsvd_clock.seconds:.1f}s; lowrank {low_clock.seconds:.1f}s "
            f"(loss {_mean_loss(rep_low):.5f} vs exact {_mean_loss(rep_exact):.5f})"
        )
    out["per_shape"] = per_shape

    def per_layer(key: str) -> float:
        return sum(v[key]["cpu_s" if device == "cpu" else "wall_s"] * v["per_block"] for v in per_shape.values())

    layer = {
        "asvd-i_exact_s": per_layer("asvd-i"),
        "nsvd-i_exact_s": per_layer("asvd-i") + per_layer("nsvd-i_after_asvd-i"),
        "asvd-i_lowrank_s": per_layer("asvd-i_lowrank"),
        "bare_asvd-i_s": sum((v["bare_svd_s"] + v["bare_cholesky_s"]) * v["per_block"] for v in per_shape.values()),
    }
    out["per_layer_estimate"] = {k: round(v, 1) for k, v in layer.items()}
    out["llama7b_32_layers_estimate_h"] = {k: round(v * 32 / 3600, 2) for k, v in layer.items()}
    log(
        f"[llama7b] per layer: asvd-i {layer['asvd-i_exact_s']:.0f}s, nsvd-i {layer['nsvd-i_exact_s']:.0f}s, "
        f"lowrank asvd-i {layer['asvd-i_lowrank_s']:.0f}s (bare asvd-i {layer['bare_asvd-i_s']:.0f}s); x32 layers = "
        f"{layer['nsvd-i_exact_s'] * 32 / 3600:.1f} h for nsvd-i"
    )
    out["memory"] = _memory(sampler, weights_b, work / "stats")
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("smollm2", "llama7b"), required=True)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch CPU threads (default $OMP_NUM_THREADS, else 1)",
    )
    parser.add_argument("--ratio", type=float, default=0.3, help="compression ratio of the timed decompositions")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    smol = parser.add_argument_group("smollm2")
    smol.add_argument("--nsamples", type=int, default=32)
    smol.add_argument("--seqlen", type=int, default=512)
    smol.add_argument("--methods", default=",".join(METHODS))
    smol.add_argument(
        "--include",
        action="append",
        default=None,
        help="only these layers (glob, repeatable), e.g. 'model.layers.0.*' for a quick smoke run",
    )
    big = parser.add_argument_group("llama7b")
    big.add_argument("--layers", type=int, default=1, help="decoder layers of LLaMA-7B shape (32 = the whole model)")
    # 16 x 512 = 8192 tokens from a 32000-token vocabulary: the activations must have rank above
    # the kept rank (1433 for 4096 x 4096 at 0.3), or every method's activation loss is 0 and the
    # lowrank-vs-exact comparison means nothing (4 x 512 tokens of a 1024 vocabulary did that).
    big.add_argument("--nsamples-7b", type=int, default=16)
    big.add_argument("--seqlen-7b", type=int, default=512)
    big.add_argument("--hidden-7b", type=int, default=4096, help="LLaMA-7B: 4096 (smaller only for a smoke run)")
    big.add_argument("--intermediate-7b", type=int, default=11008, help="LLaMA-7B: 11008")
    big.add_argument("--vocab-7b", type=int, default=32000, help="LLaMA's vocabulary (embeddings are not compressed)")
    big.add_argument("--dtype-7b", default="float32", help="model dtype (float16/bfloat16 on GPU)")
    big.add_argument(
        "--nsvd-shapes",
        default="self_attn.q_proj",
        help="shapes whose nsvd-i step is timed (comma-separated of self_attn.q_proj,mlp.gate_proj,mlp.down_proj); "
        "the others count one bare SVD of the residual",
    )
    big.add_argument(
        "--whole-model", action="store_true", help="compress every layer (a GPU run) instead of one matrix per shape"
    )
    big.add_argument("--whole-method", default="nsvd-i")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.nsvd_shapes = [m for m in args.nsvd_shapes.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("NSVD_LM_DATA_DIR", str(REPO.parent / "shared" / "data"))
    args = parse_args(argv)
    import psutil  # noqa: F401  (imported before the RSS baseline, like everything below)
    import scipy.linalg  # noqa: F401
    import torch
    import transformers

    import nsvd_lm.compress  # noqa: F401

    torch.set_num_threads(args.threads)
    sampler = RssSampler()  # baseline: interpreter + torch + transformers, before any model
    started = time.perf_counter()
    try:
        result = bench_smollm2(args, sampler) if args.part == "smollm2" else bench_llama7b(args, sampler)
    finally:
        sampler.stop()
    result["environment"] = {
        "command": "python bench/bench_compression.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
