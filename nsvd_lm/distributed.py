"""Several processes, one compression: who calibrates first, and rank 0's weights for everyone.

Used for ``accelerate launch -m lm_eval --model nsvd``: the adapter describes this process with
``Processes.current`` and hands it to ``compress_model``. There ``calibrate`` lets process 0
compute (or read) the statistics while the others wait at the barrier, then they read them from
the shared cache; every process decomposes from the same statistics; at the end
``broadcast_from_first_process`` makes every rank hold rank 0's very weights. Independent processes
sharing one cache folder (several ``lm_eval`` runs started at once) are serialised by the cache
folder's file lock (``nsvd_lm.calibration.calibration_lock``), so the forward pass runs once.

Nothing here knows about compression: it is torch.distributed / accelerate bookkeeping only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Processes:
    """This process among those that compress the same model together (one process: the defaults).

    ``turns`` says when this process may load or compute the calibration statistics: process 0
    first, then the first process of every other node (for nodes that cannot see process 0's
    cache), then everyone else; ``barrier`` separates the turns.
    """

    index: int = 0
    local_index: int = 0
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)

    @classmethod
    def current(cls, accelerator: Any = None) -> "Processes":
        """From an accelerate ``Accelerator`` (what HFLM holds), else from torch.distributed, else one process."""
        if accelerator is not None and accelerator.num_processes > 1:
            return cls(accelerator.process_index, accelerator.local_process_index, accelerator.wait_for_everyone)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank = dist.get_rank()
            return cls(rank, int(os.environ.get("LOCAL_RANK", rank)), dist.barrier)
        return cls()

    def turns(self) -> tuple[bool, bool, bool]:
        """Whether this process takes the first, second and third turn (see the class docstring)."""
        return (self.index == 0, self.local_index == 0, True)


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
