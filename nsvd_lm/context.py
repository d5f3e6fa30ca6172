"""A model's context length, looked up the one way lm-eval's HFLM does.

``lm_eval.models.utils.resolve_max_length`` (what ``HFLM.max_length`` returns when no
``max_length`` is given): the nested ``text_config`` if there is one, else the config; the first
of ``n_positions``, ``max_position_embeddings``, ``n_ctx`` it has; then the tokenizer's
``model_max_length`` unless that is transformers' "unset" value; then the default. Every module
that needs the number (calibration, perplexity, the lm-eval tasks, the ONNX runtime and its
genai_config) asks here, so they agree with each other and with lm-eval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# HFLM's order (lm_eval/models/utils.py, SEQLEN_CONFIG_ATTRS).
CONFIG_ATTRIBUTES: tuple[str, ...] = ("n_positions", "max_position_embeddings", "n_ctx")
# lm-eval's DEFAULT_MAX_LENGTH: what HFLM assumes when nothing says (the ONNX runtime and genai_config too).
DEFAULT_CONTEXT_LENGTH = 2048
# transformers' VERY_LARGE_INTEGER: what a tokenizer reports when it sets no model_max_length.
TOKENIZER_INFINITY = int(1e30)


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def context_length(config: Any, tokenizer: Any = None, default: int | None = None) -> int | None:
    """Positions the model takes: from ``config`` (a transformers config or a config.json dict),
    else ``tokenizer.model_max_length``, else ``default`` (None: unknown)."""
    if config is not None:
        config = _get(config, "text_config") or config
        for name in CONFIG_ATTRIBUTES:
            value = _get(config, name)
            if value is not None:
                return int(value)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and int(model_max_length) != TOKENIZER_INFINITY:
        return int(model_max_length)
    return default
