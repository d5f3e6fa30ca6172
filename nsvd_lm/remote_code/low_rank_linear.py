"""``LowRankLinear``, the factored replacement of a dense linear layer, and ``factor_layers``, the
module swap that rebuilds a saved checkpoint's structure.

Part of the custom code copied into every checkpoint folder (see ``nsvd_lm/remote_code/__init__.py``):
imports only torch, never nsvd_lm. ``nsvd_lm.modules`` re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding submodule ``name`` and the attribute it is stored under."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def factor_layers(
    model: nn.Module,
    ranks: Mapping[str, int],
    method: str = "",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Replace each dense layer named in ``ranks`` by an (uninitialised) ``LowRankLinear`` of that rank.

    The structure of a compressed checkpoint (``nsvd_compression.ranks`` in its config.json); the
    factors are loaded into it afterwards. ``dtype``/``device`` default to torch's current defaults,
    so under transformers' ``from_pretrained`` (meta device, the requested dtype) they follow it.
    """
    for name, rank in ranks.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name} (named in nsvd_compression.ranks)") from None
        weight, bias = dense_weight_and_bias(dense)
        out_features, in_features = weight.shape
        parent, child = get_parent(model, name)
        module = LowRankLinear(
            in_features, out_features, int(rank), bias=bias is not None, method=method, device=device, dtype=dtype
        )
        setattr(parent, child, module)
