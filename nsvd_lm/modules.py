"""The layers: the factored ``LowRankLinear`` that replaces a dense ``nn.Linear`` (or GPT-2
``Conv1D``), what counts as linear, and where a model keeps its decoder blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``rank`` replacement for a dense linear layer.

    ``down`` is ``nn.Linear(in_features, rank, bias=False)`` and ``up`` is
    ``nn.Linear(rank, out_features, bias=...)`` carrying the original bias. Keeping two plain
    ``nn.Linear`` children (instead of a custom matmul) means every backend that understands
    ``nn.Linear`` - ``torch.onnx``, accelerate dispatch, dtype casts - sees two small GEMMs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        method: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.method = method
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls,
        up_weight: torch.Tensor,
        down_weight: torch.Tensor,
        bias: torch.Tensor | None,
        method: str = "",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "LowRankLinear":
        """Build from ``up_weight`` (out × rank), ``down_weight`` (rank × in) and an optional bias."""
        out_features, rank = up_weight.shape
        rank2, in_features = down_weight.shape
        if rank != rank2:
            raise ValueError(
                f"factor shapes do not chain: up {tuple(up_weight.shape)}, down {tuple(down_weight.shape)}"
            )
        dtype = dtype or (bias.dtype if bias is not None else up_weight.dtype)
        module = cls(in_features, out_features, rank, bias=bias is not None, method=method, device="meta", dtype=dtype)
        device = device if device is not None else up_weight.device
        module.down.weight = nn.Parameter(down_weight.detach().to(device=device, dtype=dtype).contiguous())
        module.up.weight = nn.Parameter(up_weight.detach().to(device=device, dtype=dtype).contiguous())
        if bias is not None:
            module.up.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone())
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``up.weight @ down.weight`` (out × in); for inspection, not inference."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}, method={self.method!r}"
        )


def dense_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight in (out × in) orientation and bias of an ``nn.Linear`` or transformers' ``Conv1D``.

    GPT-2's ``Conv1D`` stores its weight as (in × out) and computes ``x @ W + b``.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t(), module.bias
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' GPT-2 style ``Conv1D``."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


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
