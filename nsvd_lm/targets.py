"""Which layers of a model get compressed: the linear layers inside its decoder blocks."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from nsvd_lm.modules import LowRankLinear, is_linear


@dataclass(frozen=True)
class Target:
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    block_index: int
    module: nn.Module


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


def _matches(name: str, patterns: tuple[str, ...] | None) -> bool:
    return bool(patterns) and any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.split(".")[-1], p) for p in patterns
    )


def select_targets(
    model: nn.Module,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] | None = None,
) -> list[Target]:
    """Every linear layer inside the decoder blocks, filtered by ``include``/``exclude`` globs.

    A pattern matches either the full module name (``model.layers.0.mlp.up_proj``) or its last
    component (``up_proj``). Embeddings and ``lm_head`` live outside the blocks and are never
    compressed; an ``include`` pattern that only matches such layers is an error.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    targets: list[Target] = []
    for index, block in enumerate(blocks):
        for sub_name, module in block.named_modules():
            if not is_linear(module):
                continue
            name = f"{blocks_name}.{index}.{sub_name}"
            if include and not _matches(name, include):
                continue
            if _matches(name, exclude):
                continue
            targets.append(Target(name, index, module))
    if include:
        outside = [
            n
            for n, m in model.named_modules()
            if is_linear(m) and not n.startswith(blocks_name + ".") and _matches(n, include)
        ]
        if outside:
            raise ValueError(
                f"include={','.join(include)} matches layers outside the decoder blocks ({', '.join(outside)}); "
                "only linear layers inside the blocks can be compressed"
            )
    if not targets:
        raise ValueError(
            f"no compressible linear layers in {type(model).__name__} "
            f"(include={include or 'all'}, exclude={exclude or 'none'})"
        )
    return targets


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
