"""The layers: the factored ``LowRankLinear`` that replaces a dense ``nn.Linear`` (or GPT-2
``Conv1D``), what counts as linear, where a model keeps its decoder blocks, and how to run those
blocks one at a time on recorded inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

# Defined in the custom code that checkpoints carry (one source; see nsvd_lm/remote_code/__init__.py).
from nsvd_lm.remote_code.low_rank_linear import LowRankLinear, dense_weight_and_bias, factor_layers  # noqa: F401


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' GPT-2 style ``Conv1D``."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


@dataclass(frozen=True)
class Target:
    """A linear layer to compress: its full name, its decoder block, the module itself."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block_index: int
    module: nn.Module

    def dense_weight(self) -> torch.Tensor:
        """The weight in (out × in) orientation (``dense_weight_and_bias``)."""
        return dense_weight_and_bias(self.module)[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: out and in features."""
        m, n = self.dense_weight().shape
        return int(m), int(n)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks (``model.layers``, ``transformer.h``, ``model.decoder.layers``...).

    Chosen structurally, so any Hugging Face causal LM works without a per-architecture table:
    the ``nn.ModuleList`` holding the most parameters among those whose children contain linear
    layers.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(is_linear(m) or isinstance(m, LowRankLinear) for m in child.modules()) for child in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of decoder blocks with linear layers to compress")
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# Running the decoder blocks one at a time (calibration, the allocation criteria)
# ---------------------------------------------------------------------------------------------


class StopForward(Exception):
    """Raised in a pre-hook to end a forward pass once what was wanted is recorded."""


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, batch_size: int, progress: bool
):
    """Hidden states entering block 0 for every batch, and the block call's extra args per batch size."""
    inputs: list[torch.Tensor] = []

    def catch(_module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    device = input_device(model)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in tqdm(
            range(0, len(windows), batch_size), desc="calibration: embed", disable=not progress, leave=False
        ):
            try:
                model(windows[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return inputs


def capture_block_kwargs(model: nn.Module, blocks: nn.ModuleList, batch: torch.Tensor) -> list[tuple[tuple, dict]]:
    """What the model passes to each block besides the hidden states (masks, rotary embeddings...).

    Recorded from one real forward, per block, because some architectures give blocks different
    masks (sliding-window vs full attention layers). Calibration windows have no padding, so
    these depend only on the batch shape and are reused for every batch of that shape.
    """
    recorded: list[tuple[tuple, dict] | None] = [None] * len(blocks)

    def make_hook(i):
        def hook(_module, args, kwargs):
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            recorded[i] = (tuple(args[1:]), rest)
            if i == len(blocks) - 1:
                raise StopForward  # all recorded: the last block and the LM head need not run

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(batch.to(input_device(model)), use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return recorded  # type: ignore[return-value]


def input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device
