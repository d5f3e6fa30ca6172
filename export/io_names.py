"""Names of the exported decoder's inputs, outputs and dynamic axes (no heavy imports).

They follow optimum's ``ORTModelForCausalLM`` and ONNX Runtime GenAI Model Builder exports, which
lm-eval's ``onnxruntime`` backend also reads. lm-eval binds symbolic dimensions by name
(``batch`` -> 1, ``past`` -> 0, ``total``/``seq`` -> prompt length), so the axis names matter too.
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Optional input (int64, shape [1]): logits for the last N positions only; 0 (its default) = all.
# Same meaning as transformers' ``logits_to_keep`` argument.
LOGITS_TO_KEEP = "logits_to_keep"

PAST_KEY_TEMPLATE = "past_key_values.%d.key"
PAST_VALUE_TEMPLATE = "past_key_values.%d.value"
PRESENT_KEY_TEMPLATE = "present.%d.key"
PRESENT_VALUE_TEMPLATE = "present.%d.value"

BATCH_AXIS = "batch_size"
SEQUENCE_AXIS = "sequence_length"
PAST_AXIS = "past_sequence_length"
TOTAL_AXIS = "total_sequence_length"
LOGITS_AXIS = "logits_length"  # positions with logits: sequence_length, or logits_to_keep

ONNX_FILENAME = "model.onnx"
ONNX_DATA_FILENAME = "model.onnx.data"
EXPORT_INFO_FILENAME = "nsvd_export.json"


def past_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for each layer, in graph order."""
    names: list[str] = []
    for layer in range(num_layers):
        names += [PAST_KEY_TEMPLATE % layer, PAST_VALUE_TEMPLATE % layer]
    return names


def present_names(num_layers: int) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for each layer, in graph order."""
    names: list[str] = []
    for layer in range(num_layers):
        names += [PRESENT_KEY_TEMPLATE % layer, PRESENT_VALUE_TEMPLATE % layer]
    return names


def input_names(num_layers: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(num_layers)]


def output_names(num_layers: int) -> list[str]:
    return [LOGITS, *present_names(num_layers)]
