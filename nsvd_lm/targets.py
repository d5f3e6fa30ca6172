"""Which layers of a model get compressed: the linear layers inside its decoder blocks."""

from __future__ import annotations

import fnmatch

from torch import nn

from nsvd_lm.modules import Target, find_decoder_blocks, is_linear
from nsvd_lm.remote_code.low_rank_linear import get_parent

__all__ = ["Target", "find_decoder_blocks", "select_targets", "get_parent"]


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
