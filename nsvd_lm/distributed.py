"""Several processes, one calibration: file lock, process-0-first statistics, weight broadcast.

Used by the lm-eval adapter for ``accelerate launch -m lm_eval --model nsvd`` (process 0 computes
the statistics while the others wait at a barrier, every process then decomposes from the shared
cache, and process 0's weights are broadcast) and by independent processes sharing one cache
folder (serialised by a file lock around the calibration, so the forward pass runs once).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nsvd_lm.calibration import CalibrationStats, calibrate
from nsvd_lm.compress import CompressionReport, compress_model
from nsvd_lm.config import CalibrationConfig, CompressionConfig
from nsvd_lm.targets import Target, select_targets

logger = logging.getLogger(__name__)


def statistics_once(
    model: torch.nn.Module,
    tokenizer: Any,
    calibration: CalibrationConfig,
    targets: list[Target],
    *,
    process_index: int = 0,
    local_process_index: int = 0,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> CalibrationStats:
    """Calibration statistics with one forward pass for all processes.

    Process 0 computes (or reads) them first; the others wait at ``barrier``. Then the first
    process of every other node reads them, computing only if its node cannot see process 0's
    cache; then everyone else reads them. Every step holds the cache folder's file lock
    (``nsvd_lm.calibration.calibrate``).
    """

    def load_or_compute() -> CalibrationStats:
        return calibrate(model, tokenizer, calibration, targets, progress=progress, lock=True)

    stats = None
    if process_index == 0:
        stats = load_or_compute()
    barrier()
    if stats is None and local_process_index == 0:
        stats = load_or_compute()
    barrier()
    if stats is None:
        stats = load_or_compute()
    return stats


def _unique_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    tensors = []
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.data_ptr() in seen:  # tied weights: send once
            continue
        seen.add(tensor.data_ptr())
        tensors.append(tensor)
    return tensors


def broadcast_from_first_process(model: torch.nn.Module) -> bool:
    """Make every rank's weights equal to rank 0's (torch.distributed); False if not distributed.

    The decompositions are deterministic, so this normally changes nothing; it guarantees that
    data-parallel ranks evaluate the very same model even across GPU types or library versions.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    tensors = _unique_tensors(model)
    if any(t.device.type == "meta" for t in tensors):
        logger.warning("weights are offloaded (meta tensors); ranks rely on deterministic decomposition instead")
        return False
    backend = dist.get_backend()
    for tensor in tensors:
        if backend == "nccl" and tensor.device.type != "cuda":
            continue
        dist.broadcast(tensor.data, src=0)
    return True


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (bit-exact identity of a model's weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class DistributedCompression:
    report: CompressionReport
    statistics_seconds: float
    total_seconds: float
    weights_broadcast: bool


def compress_on_every_process(
    model: torch.nn.Module,
    tokenizer: Any,
    config: CompressionConfig,
    calibration: CalibrationConfig,
    *,
    process_index: int = 0,
    local_process_index: int = 0,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
    svd_cache: dict | None = None,
) -> DistributedCompression:
    """Compress ``model`` in place on this process: one calibration for all processes, rank 0's weights."""
    started = time.perf_counter()
    stats = None
    if config.needs_calibration:
        stats = statistics_once(
            model,
            tokenizer,
            calibration,
            select_targets(model, config.include, config.exclude),
            process_index=process_index,
            local_process_index=local_process_index,
            barrier=barrier,
            progress=progress,
        )
    statistics_s = time.perf_counter() - started
    report = compress_model(
        model, tokenizer, config, calibration=calibration, stats=stats, progress=progress, svd_cache=svd_cache
    )
    synced = broadcast_from_first_process(model)
    return DistributedCompression(report, statistics_s, time.perf_counter() - started, synced)
