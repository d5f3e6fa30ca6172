"""The attention the exporter traces: grouped-query attention without copies of the KV cache.

What the stock ``sdpa`` path gives ONNX Runtime per layer and decode step (SmolLM2-135M, 16 rows,
profiled in ``bench/results/engine_step.md``): ``repeat_kv`` expands the cache to every query head
(an ``Expand`` + ``Reshape``, 3x the cache for 9 query / 3 KV heads), and torchlib's
``scaled_dot_product_attention`` lowering transposes the expanded keys and multiplies them by
``sqrt(scale)`` before the ``MatMul``. That is two passes over 3x the whole cache per layer and
step, about a third of the step at batch 16, none of it shrunk by compressing the linears.

``grouped_query_attention`` computes the same thing (it is the ``pack_gqa`` form transformers
uses for one query token, for every query length):

* the query heads of one KV group are stacked along the query axis, ``(b, kv, rep·q, d)``, so
  each KV head is read once and nothing is expanded;
* the scale goes on the query (``q`` rows, not the cache), and the keys' transpose feeds the
  ``MatMul`` directly, which ONNX Runtime fuses into one ``FusedMatMul`` (transB): no copy;
* the mask is transformers' additive ``eager_mask`` (always materialized: no ``is_causal``
  shortcut that a traced graph could not take), broadcast over the group axis.

It is registered in transformers' attention and mask registries under ``EXPORT_ATTENTION`` (their
extension points) and switched on only while the exporter traces (``traced_attention``); the
PyTorch model keeps its own implementation, and the export's parity probe compares the two.
Attention with sinks (``s_aux``) or a position bias goes to transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

EXPORT_ATTENTION = "nsvd_lm_export"  # the name in transformers' AttentionInterface / AttentionMaskInterface


def grouped_query_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``softmax(q kᵀ · scale + mask) v`` for ``query`` (b, h, q, d) and ``key``/``value`` (b, kv, L, d).

    Returns ``(b, q, h, d)`` and no weights, as transformers' attention functions do. ``dropout`` is
    ignored (the exporter traces in eval mode).
    """
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None or attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    # Head h reads KV head h // groups (repeat_kv's order): a plain reshape groups them.
    grouped = (query * scale).reshape(batch, kv_heads, groups * q_len, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3))  # (b, kv, groups·q, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask[:, :, :, :kv_len].unsqueeze(2)  # (b, 1, 1, q, L) over (b, kv, groups, q, L)
    scores = (scores.reshape(batch, kv_heads, groups, q_len, kv_len) + mask).reshape(
        batch, kv_heads, groups * q_len, kv_len
    )
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # (b, kv, groups·q, d)
    return out.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(EXPORT_ATTENTION, grouped_query_attention)
    AttentionMaskInterface.register(EXPORT_ATTENTION, eager_mask)


@contextlib.contextmanager
def traced_attention(model: nn.Module) -> Iterator[None]:
    """While the block runs, ``model`` (and every sub-config) attends with ``grouped_query_attention``."""
    _register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = EXPORT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
