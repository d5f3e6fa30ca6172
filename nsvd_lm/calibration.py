"""Calibration statistics: ``G = X Xᵀ`` and ``mean |x|`` at the input of every target layer.

Design (knows nothing of lm-eval):

* Statistics come from the uncompressed model ("whitening only", as in the paper).
* Streaming, block by block (GPTQ style): the inputs of decoder block 0 are captured for every
  calibration window, then each block runs over all windows while hooks accumulate its
  layers' statistics, its outputs become the next block's inputs, and its statistics go to disk.
  Only one block's statistics and one block's activations live in memory, never raw
  activations of the whole model; with ``device_map="auto"`` each block runs where accelerate
  placed it.
* Layers fed the very same tensor (q/k/v, gate/up) share one ``G``: detected at run time from
  tensor identity, so no per-architecture table is needed.
* ``G`` is computed per batch in float32 (BLAS ``ssyrk``, one triangle, on CPU; a GEMM
  elsewhere), summed in place in float32 over up to ``FLUSH_EVERY`` batches and across those
  groups in float64, so thousands of batches do not accumulate float32 rounding. It is
  stored as float32 (half the disk of float64; the relative rounding, 6e-8, is far below the
  spread of the calibration estimate itself) and widened to float64 for the decompositions.
* Cached as safetensors in a folder keyed by model fingerprint + calibration windows + layer
  list, written to a temporary folder and renamed, so one calibration serves every method and
  ratio and an interrupted run leaves nothing half-written.

``calibrate`` is the one entry (compression, similarity): text → windows → cache lookup → collect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nsvd_lm.calib_data import check_calibration_source, load_calibration_text
from nsvd_lm.context import context_length
from nsvd_lm.decompose import all_finite
from nsvd_lm.distributed import Processes
from nsvd_lm.fields import as_int, described
from nsvd_lm.files import atomic_dir
from nsvd_lm.modules import Target, capture_block_inputs, capture_block_kwargs, find_decoder_blocks
from nsvd_lm.windows import (
    CALIBRATION_BOS_MODES,
    bos_per_window,
    calibration_windows,
    check_bos_mode,
    windows_fingerprint,
)

logger = logging.getLogger(__name__)

STATS_FORMAT = "nsvd-lm-stats-v1"


@dataclass(frozen=True)
class CalibrationConfig:
    """Which calibration statistics a compression uses (one cache entry per distinct setting)."""

    calib_dataset: str = field(
        default="wikitext2",
        metadata=described(
            "wikitext2 (hub train split online, $NSVD_LM_DATA_DIR offline), c4, a hub id (id or id:config, train "
            "split, text column) or a local .txt/.raw/.json/.jsonl/.parquet file or folder"
        ),
    )
    calib_nsamples: int = field(default=256, metadata=described("number of calibration windows"))
    calib_seqlen: int = field(default=2048, metadata=described("tokens per calibration window"))
    calib_batch_size: int = field(default=1, metadata=described("windows per forward pass during calibration"))
    seed: int = field(default=3, metadata=described("seed of the random window positions"))
    calib_bos: str = field(
        default="auto",
        metadata=described(
            "BOS at the start of every window: auto = when the tokenizer adds one by default (nsvd_lm.windows)",
            choices=CALIBRATION_BOS_MODES,
        ),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=described("statistics cache folder (default $NSVD_LM_CACHE/stats or ~/.cache/nsvd_lm/stats)"),
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise once here
        for name in ("calib_nsamples", "calib_seqlen", "calib_batch_size"):
            value = as_int(name, getattr(self, name))
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
            set_(self, name, value)
        set_(self, "seed", as_int("seed", self.seed))
        set_(self, "calib_bos", check_bos_mode(self.calib_bos, CALIBRATION_BOS_MODES, "calib_bos"))
        if not str(self.calib_dataset).strip():
            raise ValueError("calib_dataset must be a dataset name, hub id or local path, got ''")
        check_calibration_source(self.calib_dataset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def cache_root(self) -> Path:
        """Where statistics are cached: ``cache_dir``, else ``$NSVD_LM_CACHE/stats`` / ``~/.cache/nsvd_lm/stats``."""
        from nsvd_lm.files import default_stats_dir

        return Path(self.cache_dir).expanduser() if self.cache_dir else default_stats_dir()

    def describe(self) -> dict[str, Any]:
        """The settings that decide the statistics, as recorded with them (checkpoint, results JSON)."""
        return {
            "dataset": str(self.calib_dataset),
            "nsamples": self.calib_nsamples,
            "seqlen": self.calib_seqlen,
            "seed": self.seed,
            "bos": self.calib_bos,
        }


@dataclass
class CalibrationStats:
    """Statistics of one calibration, read lazily from its cache folder."""

    path: Path
    module_to_key: dict[str, str]  # module name → name of the layer whose input it shares
    key_to_file: dict[str, str]
    token_count: int
    meta: dict = field(default_factory=dict)
    cache_hit: bool = False

    def _load(self, name: str, suffix: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.module_to_key:
            raise KeyError(f"no calibration statistics for {name} in {self.path}")
        key = self.module_to_key[name]
        with safe_open(str(self.path / self.key_to_file[key]), framework="pt") as f:
            tensor = f.get_tensor(f"{key}.{suffix}")
        if not all_finite(tensor):
            raise ValueError(f"calibration statistics for {name} contain NaN/Inf ({self.path}); delete the cache")
        return tensor

    def gram(self, name: str) -> torch.Tensor:
        """``X Xᵀ`` (n × n, float64) over all calibration tokens at the input of ``name``."""
        return self._load(name, "gram").to(torch.float64)

    def mean_abs(self, name: str) -> torch.Tensor:
        """Per-channel ``mean |x|`` (n,, float64)."""
        return self._load(name, "abs_sum").to(torch.float64) / self.token_count

    @property
    def sequential(self) -> bool:
        """Collected on the compressed prefix (``collect_statistics`` with ``fit_block``): ``cross`` exists."""
        return bool(self.meta.get("cross"))

    def cross(self, name: str) -> torch.Tensor:
        """``X X̃ᵀ`` (n × n, float64): the dense model's inputs of ``name`` against the compressed prefix's
        (sequential entries only; ``gram`` is then ``X̃ X̃ᵀ``)."""
        return self._load(name, "cross").to(torch.float64)


def model_fingerprint(model: nn.Module) -> str:
    """Identity of a model's weights: config + shape and a sample of values of every parameter."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "name_or_path"):
            cfg.pop(volatile, None)
        digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256]
        digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(
    model: nn.Module,
    windows_id: str,
    targets: list[Target],
    bos_per_window: bool = False,
    sequential: dict | None = None,
) -> str:
    """The statistics entry's folder name. ``sequential`` (what decides a sequential run's statistics:
    method, knobs, ranks) is part of it only when given, so dense entries keep their keys and a
    sequential run never reads dense statistics, nor the other way round."""
    payload = {
        "bos_per_window": bool(bos_per_window),
        "format": STATS_FORMAT,
        "model": model_fingerprint(model),
        "windows": windows_id,
        "targets": [t.name for t in targets],
        "dtype": str(next(model.parameters()).dtype),
    }
    if sequential is not None:
        payload["sequential"] = sequential
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_cached_statistics(folder: Path, targets: list[Target]) -> CalibrationStats | None:
    """The cached statistics in ``folder`` or None; a folder that does not match is a loud error."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        module_to_key = meta["module_to_key"]
        key_to_file = meta["key_to_file"]
        token_count = int(meta["token_count"])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"corrupt calibration cache {folder} ({exc}); delete the folder and rerun") from exc
    if meta.get("format") != STATS_FORMAT:
        raise ValueError(
            f"calibration cache {folder} has format {meta.get('format')!r}, expected {STATS_FORMAT}; delete it"
        )
    missing = [t.name for t in targets if t.name not in module_to_key]
    absent_files = sorted({f for f in key_to_file.values() if not (folder / f).exists()})
    if missing or absent_files:
        raise ValueError(
            f"calibration cache {folder} does not match this model (missing layers: {missing[:3]}, "
            f"missing files: {absent_files[:3]}); delete the folder and rerun"
        )
    return CalibrationStats(folder, module_to_key, key_to_file, token_count, meta, cache_hit=True)


def _add_gram(partial, rows: torch.Tensor):
    """``partial + rowsᵀ rows`` in float32, in place where possible.

    On CPU BLAS ``ssyrk`` computes only the upper triangle of the symmetric product: about 40%
    less time than the full GEMM at these shapes (the Gram updates are 40-80% of the forward
    FLOPs, so this pays). ``partial`` is then a Fortran-ordered numpy array holding the upper
    triangle; ``_full_gram`` mirrors it. Elsewhere (CUDA) an in-place ``addmm_``.
    """
    if rows.device.type == "cpu" and _SSYRK is not None:
        import numpy as np

        if partial is None:
            partial = np.zeros((rows.shape[1], rows.shape[1]), dtype=np.float32, order="F")
        # rows.numpy().T is the n × tokens matrix A in Fortran order; ssyrk: C += A Aᵀ (upper).
        return _SSYRK(1.0, rows.numpy().T, beta=1.0, c=partial, trans=0, overwrite_c=1)
    if partial is None:
        return rows.T @ rows
    return partial.addmm_(rows.T, rows)


def _full_gram(partial) -> torch.Tensor:
    """The symmetric float32 tensor from what ``_add_gram`` accumulated."""
    if isinstance(partial, torch.Tensor):
        return partial
    # The Fortran-ordered upper triangle U, seen from torch, is the transpose of a C-contiguous
    # lower-triangular L = Uᵀ (zeros above the diagonal). G = U + L − diag: one blocked transposed
    # copy and contiguous adds (a plain `U + U.T` walks memory with stride n: 8x slower at n = 11008).
    upper = torch.from_numpy(partial)
    lower = upper.T
    full = torch.empty_like(lower)
    full.copy_(upper)
    full += lower
    full.diagonal().sub_(lower.diagonal())
    return full


def _find_ssyrk():
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:  # scipy is a dependency; without it the GEMM path still works
        return None
    return ssyrk


_SSYRK = _find_ssyrk()


# Batches whose float32 Gram products are summed before they are added to the float64 total:
# float32 sums of 16 batches of ≤ 2048 tokens lose nothing that matters next to sampling noise.
FLUSH_EVERY = 16


class _BlockAccumulator:
    """Forward pre-hooks on one block's target layers; shared inputs accumulate once."""

    def __init__(self, targets: list[Target], want_gram: bool, want_abs: bool):
        self.targets = targets
        self.want_gram = want_gram
        self.want_abs = want_abs
        self.module_to_key: dict[str, str] = {}
        self.gram: dict[str, torch.Tensor] = {}  # float64 (float32 after one flush), complete after ``with``
        self.abs_sum: dict[str, torch.Tensor] = {}
        # Per-batch products are summed in place in float32 (addmm_: no temporary n × n matrix)
        # and folded into the float64 totals every FLUSH_EVERY batches: a float64 += float32 of an
        # n × n matrix per batch costs half as much as the Gram GEMM itself.
        self._gram32: dict[str, torch.Tensor] = {}
        self._batches_since_flush = 0
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = []
        self.tokens = 0
        self._first_batch = True
        # Sequential compression, per batch: while ``recording`` is a dict the hooks only store each
        # layer's input rows in it (the dense model's inputs X); with ``reference`` set to those rows,
        # the next pass (the compressed prefix's inputs X̃) also sums the cross products X X̃ᵀ.
        self.recording: dict[str, torch.Tensor] | None = None
        self.reference: dict[str, torch.Tensor] | None = None
        self.cross: dict[str, torch.Tensor] = {}
        self._cross32: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for target in self.targets:
            self._handles.append(target.module.register_forward_pre_hook(self._hook(target.name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._flush()

    def end_batch(self):
        self._seen.clear()
        self._first_batch = False
        self._batches_since_flush += 1
        if self._batches_since_flush >= FLUSH_EVERY:
            self._flush()

    def _flush(self):
        for name, partial in self._gram32.items():
            partial = _full_gram(partial)
            total = self.gram.get(name)
            if total is None:
                self.gram[name] = partial  # one flush only: stored as float32 anyway, no round trip
            else:
                if total.dtype != torch.float64:
                    self.gram[name] = total = total.to(torch.float64)
                total += partial
        self._gram32.clear()
        for name, partial in self._cross32.items():
            total = self.cross.get(name)
            self.cross[name] = partial.to(torch.float64) if total is None else total.add_(partial)
        self._cross32.clear()
        self._batches_since_flush = 0

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0]
            if self.recording is not None:
                self.recording[name] = x.detach().reshape(-1, x.shape[-1]).float()
                return
            if self._first_batch:
                seen = self._seen.get(id(x))
                if seen is not None and seen[0] is x:
                    self.module_to_key[name] = seen[1]  # same tensor as an earlier layer: share its G
                    return
                self._seen[id(x)] = (x, name)
                self.module_to_key[name] = name
            elif self.module_to_key[name] != name:
                return
            rows = x.detach().reshape(-1, x.shape[-1]).float()
            if self.want_gram:
                self._gram32[name] = _add_gram(self._gram32.get(name), rows)
            if self.reference is not None:
                reference = self.reference[name]
                partial = self._cross32.get(name)
                self._cross32[name] = reference.T @ rows if partial is None else partial.addmm_(reference.T, rows)
            if self.want_abs:
                # float32 over one batch's rows, float64 across batches (a float64 reduction of
                # the whole batch is 6x slower and buys nothing at this length).
                batch_abs = rows.abs().sum(0).to(torch.float64)
                acc = self.abs_sum.get(name)
                if acc is None:
                    self.abs_sum[name] = batch_abs
                else:
                    acc += batch_abs

        return hook


def _targets_by_block(model: nn.Module, targets: list[Target]) -> tuple[nn.ModuleList, dict[int, list[Target]]]:
    """The model's decoder blocks, and the targets of each (by block index)."""
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block_index, []).append(t)
    return blocks, by_block


# Sequential compression's callback: (block index, the statistics collected so far) -> None; it
# replaces that block's target layers in the model (``compress_model`` builds it).
BlockFitter = Callable[[int, "CalibrationStats"], None]


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    targets: list[Target],
    out_dir: Path,
    batch_size: int = 1,
    want_gram: bool = True,
    want_abs: bool = True,
    progress: bool = True,
    meta: dict | None = None,
    fit_block: BlockFitter | None = None,
) -> CalibrationStats:
    """Run the calibration forward and write the statistics to ``out_dir`` (atomically).

    ``fit_block`` (sequential compression): two streams of hidden states go through the blocks, the
    dense model's (X) and the compressed prefix's (X̃). At each block, batch by batch, the dense block
    runs on X (its layers' inputs recorded for that batch only) and then on X̃, accumulating
    ``G = X̃ X̃ᵀ``, ``Σ|x̃|`` and the cross products ``C = X X̃ᵀ``. Once the block's statistics are
    written, ``fit_block`` gets the block index and the statistics so far (read from the files just
    written, so a later run reading this entry from the cache sees exactly the same numbers) and
    replaces the block's layers; the compressed block then runs on X̃ to give the next block's X̃.
    Three block forwards per block; two blocks' worth of hidden states (the two streams) in memory.
    """
    started = time.perf_counter()
    blocks, by_block = _targets_by_block(model, targets)

    was_training = model.training
    model.eval()
    hidden = capture_block_inputs(model, blocks, windows, batch_size, progress)
    kwargs_by_size = {}
    for h in hidden:
        if h.shape[0] not in kwargs_by_size:
            kwargs_by_size[h.shape[0]] = capture_block_kwargs(model, blocks, windows[: h.shape[0]])
    forward_s = 0.0
    # Sequential: the dense model's stream beside ``hidden``, which becomes the compressed prefix's.
    dense_hidden = [h.clone() for h in hidden] if fit_block is not None else None

    module_to_key: dict[str, str] = {}
    key_to_file: dict[str, str] = {}
    token_count = int(windows.numel())
    from safetensors.torch import save_file

    try:
        with atomic_dir(out_dir) as tmp:
            bar = tqdm(range(len(blocks)), desc="calibration: blocks", disable=not progress)
            for index in bar:
                block = blocks[index]
                block_targets = by_block.get(index, [])
                refit = dense_hidden is not None and bool(block_targets)
                t0 = time.perf_counter()
                with _BlockAccumulator(block_targets, want_gram, want_abs) as acc:
                    for b, h in enumerate(hidden):
                        args, kwargs = kwargs_by_size[h.shape[0]][index]
                        if dense_hidden is not None:  # sequential: the dense stream first, its inputs kept
                            acc.recording = {}
                            dense_hidden[b] = _block_output(block(dense_hidden[b], *args, **kwargs))
                            acc.recording, acc.reference = None, acc.recording
                        out = block(h, *args, **kwargs)
                        acc.reference = None
                        if not refit:  # a refitted block's outputs come from its compressed layers, below
                            hidden[b] = _block_output(out)
                        acc.end_batch()
                forward_s += time.perf_counter() - t0
                if not block_targets:
                    continue
                tensors = {}
                for key, g in acc.gram.items():
                    tensors[f"{key}.gram"] = g.to("cpu", torch.float32).contiguous()
                for key, a in acc.abs_sum.items():
                    tensors[f"{key}.abs_sum"] = a.to("cpu", torch.float32).contiguous()
                for key, c in acc.cross.items():
                    tensors[f"{key}.cross"] = c.to("cpu", torch.float32).contiguous()
                for name, tensor in tensors.items():
                    if not all_finite(tensor):
                        raise ValueError(f"calibration produced NaN/Inf statistics at {name}: check the model weights")
                fname = f"block_{index:04d}.safetensors"
                save_file(tensors, str(tmp / fname))
                module_to_key.update(acc.module_to_key)
                for key in set(acc.module_to_key.values()):
                    key_to_file[key] = fname
                if refit:
                    so_far_meta = {**(meta or {}), "cross": True}
                    so_far = CalibrationStats(tmp, dict(module_to_key), dict(key_to_file), token_count, so_far_meta)
                    fit_block(index, so_far)
                    t0 = time.perf_counter()
                    for b, h in enumerate(hidden):
                        args, kwargs = kwargs_by_size[h.shape[0]][index]
                        hidden[b] = _block_output(block(h, *args, **kwargs))
                    forward_s += time.perf_counter() - t0
            full_meta = {
                "format": STATS_FORMAT,
                "module_to_key": module_to_key,
                "key_to_file": key_to_file,
                "token_count": token_count,
                "nsamples": int(windows.shape[0]),
                "seqlen": int(windows.shape[1]),
                "gram": want_gram,
                "abs": want_abs,
                "cross": dense_hidden is not None,
                "seconds": {"forward": round(forward_s, 3), "total": round(time.perf_counter() - started, 3)},
                **(meta or {}),
            }
            (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1))
    finally:
        model.train(was_training)
    logger.info(
        "calibration statistics: %d layers, %d tokens, %.1fs -> %s",
        len(module_to_key),
        token_count,
        time.perf_counter() - started,
        out_dir,
    )
    return CalibrationStats(out_dir, module_to_key, key_to_file, token_count, full_meta, cache_hit=False)


@torch.no_grad()
def window_statistics(
    model: nn.Module, windows: torch.Tensor, targets: list[Target], progress: bool = True
) -> Iterator[tuple[int, dict[str, str], dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]]:
    """Per decoder block, every window's own statistics at the distinct inputs of its targets.

    The same block-by-block streaming forward as ``collect_statistics`` (one window per batch),
    but nothing is summed over windows and nothing is cached: for each block with targets it
    yields ``(block index, module_to_key, grams, abs_sums)`` with ``grams[key][w] = X_wᵀ X_w``
    (float32, n × n) and ``abs_sums[key][w] = Σ_t |x_t|`` of window ``w``. Only one block's
    per-window statistics are alive at a time. For statistics of a sum over windows resampled
    (bootstrap CIs of the activation similarity, ``nsvd_lm.experiments.similarity``).
    """
    blocks, by_block = _targets_by_block(model, targets)
    was_training = model.training
    model.eval()
    try:
        hidden = capture_block_inputs(model, blocks, windows, 1, progress)
        block_kwargs = capture_block_kwargs(model, blocks, windows[:1])
        for index in tqdm(range(len(blocks)), desc="per-window statistics: blocks", disable=not progress):
            block, block_targets = blocks[index], by_block.get(index, [])
            args, kwargs = block_kwargs[index]
            grams: dict[str, list[torch.Tensor]] = {}
            abs_sums: dict[str, list[torch.Tensor]] = {}
            module_to_key: dict[str, str] = {}
            for b, h in enumerate(hidden):
                with _BlockAccumulator(block_targets, True, True) as acc:
                    out = block(h, *args, **kwargs)
                hidden[b] = _block_output(out)
                module_to_key.update(acc.module_to_key)
                for key, g in acc.gram.items():
                    grams.setdefault(key, []).append(g.to(torch.float32))
                for key, a in acc.abs_sum.items():
                    abs_sums.setdefault(key, []).append(a)
            if block_targets:
                yield index, module_to_key, grams, abs_sums
    finally:
        model.train(was_training)


LOCK_NAME = ".calibration.lock"


@contextlib.contextmanager
def calibration_lock(cache_root: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive ``flock`` on ``cache_root/.calibration.lock`` (no-op where fcntl is missing).

    Held only around the statistics (load-or-compute), so a second process that wants the same
    statistics waits and then reads them from the cache instead of running its own forward pass.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the cache is still written atomically
        yield
        return
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / LOCK_NAME, "a+") as handle:
        started = time.monotonic()
        waited = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.info("waiting for another process calibrating into %s", cache_root)
                    waited = True
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"calibration lock {cache_root / LOCK_NAME} held for over {timeout_s:.0f}s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def calibration_token_windows(tokenizer, calibration: CalibrationConfig):
    """``(windows, text, bos_per_window)``: the token windows (nsamples × seqlen) ``calibration`` draws."""
    text = load_calibration_text(calibration.calib_dataset)
    bos = bos_per_window(tokenizer, calibration.calib_bos)
    windows = calibration_windows(
        tokenizer, text.text, calibration.calib_nsamples, calibration.calib_seqlen, calibration.seed, bos=bos
    )
    return windows, text, bos


def calibrate(
    model: nn.Module,
    tokenizer,
    calibration: CalibrationConfig,
    targets: list[Target],
    progress: bool = True,
    processes: Processes | None = None,
    sequential: dict | None = None,
    fit_block: BlockFitter | None = None,
) -> CalibrationStats:
    """Statistics of ``model`` under ``calibration``: text → windows → cache lookup → collect (and cache).

    ``sequential`` and ``fit_block`` (sequential compression, ``compress_model``): the entry is keyed
    by ``sequential`` as well (what decides the compressed prefix: method, knobs, ranks), and
    ``fit_block`` compresses each block once its statistics are in (``collect_statistics``). From
    the cache, or in a process that waited for another's, ``fit_block`` is not called: the caller
    factors every layer from the returned statistics, which gives the very same factors.

    ``processes`` (several processes compressing together, ``nsvd_lm.distributed``): the cache
    folder's file lock is held and the processes take turns, process 0 first while the others wait at the barrier, then
    the rest read what it cached; one forward pass for all of them.
    """
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer: pass it to compress_model")
    context = context_length(getattr(model, "config", None))
    if context is not None and calibration.calib_seqlen > context:
        raise ValueError(f"calib_seqlen={calibration.calib_seqlen} exceeds the model's context length {context}")
    windows, text, bos = calibration_token_windows(tokenizer, calibration)
    meta = {
        "calibration": {**calibration.describe(), "bos_per_window": bos, "source": text.source},
        "model": getattr(model, "name_or_path", ""),
    }
    if sequential is not None:
        meta["sequential"] = sequential
    settings = {
        "batch_size": calibration.calib_batch_size,
        "progress": progress,
        "bos_per_window": bos,
        "meta": meta,
        "sequential": sequential,
        "fit_block": fit_block,
    }
    root = calibration.cache_root
    if processes is None:
        return statistics_for_windows(model, windows, targets, root, **settings)
    stats = None
    for turn, mine in enumerate(processes.turns()):
        if stats is None and mine:
            with calibration_lock(root):
                stats = statistics_for_windows(model, windows, targets, root, **settings)
        if turn < 2:  # the last turn needs no barrier after it
            processes.barrier()
    return stats


def statistics_for_windows(
    model: nn.Module,
    windows: torch.Tensor,
    targets: list[Target],
    cache_root: Path,
    batch_size: int = 1,
    progress: bool = True,
    meta: dict | None = None,
    bos_per_window: bool = False,
    sequential: dict | None = None,
    fit_block: BlockFitter | None = None,
) -> CalibrationStats:
    """Gram + mean |x| statistics of ``windows`` at ``targets``, from the cache or computed and cached.

    One cache entry per model × windows × layer list: every method and ratio reuses it. A
    sequential run's entry (``sequential``: its identity; ``fit_block``: see ``collect_statistics``)
    serves only the same method, knobs and ranks.
    """
    key = cache_key(model, windows_fingerprint(windows), targets, bos_per_window=bos_per_window, sequential=sequential)
    folder = cache_root / key
    cached = load_cached_statistics(folder, targets)
    if cached is not None:
        logger.info("reusing %scalibration statistics from %s", "sequential " if sequential else "", folder)
        return cached
    return collect_statistics(
        model, windows, targets, folder, batch_size=batch_size, progress=progress, meta=meta, fit_block=fit_block
    )
