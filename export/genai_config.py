"""``genai_config.json``: the manifest ONNX Runtime GenAI (``og.Model(DIR)``) and lm-eval's ONNX
backends read to find the graph, its tensor names, the KV geometry and the special tokens.

Our graph concatenates past and new keys (present length = past + new), unlike Model Builder's
GroupQueryAttention graphs that write into a preallocated buffer, so ``past_present_share_buffer``
must be false.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nsvd_lm.context import DEFAULT_CONTEXT_LENGTH
from nsvd_lm.context import context_length as model_context_length

from . import io_names
from .decoder_wrapper import KVGeometry

# GenAI model types whose decoder-only loop matches our plain graph; anything else is declared as
# "llama" (the generic decoder-only path: same inputs, same outputs).
GENAI_DECODER_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "granite", "olmo"}


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def build_genai_config(config, generation_config=None, provider: str | None = None) -> dict[str, Any]:
    """The manifest for a graph exported by :func:`nsvd_lm.export.onnx_export.export_onnx`."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    geometry = KVGeometry.from_config(config)
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    bos = getattr(generation_config, "bos_token_id", None) if generation_config is not None else None
    if bos is None:
        bos = getattr(text, "bos_token_id", None)
    pad = getattr(generation_config, "pad_token_id", None) if generation_config is not None else None
    if pad is None:
        pad = getattr(text, "pad_token_id", None)
    if pad is None:
        pad = _first(eos)
    context_length = model_context_length(text, default=DEFAULT_CONTEXT_LENGTH)
    model_type = text.model_type if text.model_type in GENAI_DECODER_TYPES else "llama"
    provider_options = [{provider: {}}] if provider else []
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": io_names.ONNX_FILENAME,
                "head_size": geometry.head_dim,
                "hidden_size": geometry.hidden_size,
                "inputs": {
                    "input_ids": io_names.INPUT_IDS,
                    "attention_mask": io_names.ATTENTION_MASK,
                    "position_ids": io_names.POSITION_IDS,
                    "past_key_names": io_names.PAST_KEY_TEMPLATE,
                    "past_value_names": io_names.PAST_VALUE_TEMPLATE,
                },
                "outputs": {
                    "logits": io_names.LOGITS,
                    "present_key_names": io_names.PRESENT_KEY_TEMPLATE,
                    "present_value_names": io_names.PRESENT_VALUE_TEMPLATE,
                },
                "num_attention_heads": geometry.num_attention_heads,
                "num_hidden_layers": geometry.num_layers,
                "num_key_value_heads": geometry.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": geometry.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(out_dir: str | os.PathLike, config, generation_config=None, provider: str | None = None) -> None:
    manifest = build_genai_config(config, generation_config, provider)
    with open(os.path.join(out_dir, "genai_config.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
