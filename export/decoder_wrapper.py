"""A causal LM seen through flat tensors: what ``torch.onnx.export`` traces.

ONNX graphs take and return plain tensors, while transformers models take a ``Cache`` object.
``FlatKVDecoder`` builds a ``DynamicCache`` from per-layer past key/value tensors, runs the model
and returns the logits followed by the per-layer presents (past concatenated with the new
positions). A past of length 0 (empty tensors) is the prefill case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one layer's key (and value) cache: (batch, num_kv_heads, length, head_dim)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "KVGeometry":
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            num_attention_heads=heads,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
        )


class FlatKVDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, [k0, v0, k1, v1, ...]) -> (logits, k0', v0', ...)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.geometry = KVGeometry.from_config(model.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        n = self.geometry.num_layers
        # No config: every layer is a plain DynamicLayer that keeps all positions, so the graph's
        # present = concat(past, new) for every architecture (sliding windows are applied by the mask).
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        presents: list[torch.Tensor] = []
        for layer in out.cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)

    def example_inputs(
        self, batch: int = 2, seq_len: int = 3, past_len: int = 5
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Inputs for tracing; sizes > 1 and pairwise distinct so torch.export keeps them symbolic."""
        param = next(self.model.parameters())
        g = self.geometry
        input_ids = torch.randint(0, min(g.vocab_size, 1000), (batch, seq_len), device=param.device)
        attention_mask = torch.ones(batch, past_len + seq_len, dtype=torch.long, device=param.device)
        position_ids = torch.arange(past_len, past_len + seq_len, device=param.device).expand(batch, seq_len)
        past = [
            torch.zeros(batch, g.num_kv_heads, past_len, g.head_dim, dtype=param.dtype, device=param.device)
            for _ in range(2 * g.num_layers)
        ]
        return input_ids, attention_mask, position_ids.contiguous(), past
