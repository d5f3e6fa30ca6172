"""The ``logits_to_keep`` input: a prefill that samples from its last position need not run the
LM head (vocab x hidden, the largest matrix of a small model) at every prompt position.

:func:`add_logits_to_keep` rewrites an exported graph so that the LM head's activation input is
``hidden[:, -logits_to_keep:, :]`` (a ``Slice`` on the sequence axis). The new input has an
initializer of the same name holding 0, which ONNX Runtime uses when the caller does not feed it:
``-0:`` keeps every position, so a reader that knows nothing of the input (lm-eval's onnxruntime
backend, onnxruntime-genai, an older engine) gets the graph's old outputs unchanged. Only the
graph file is rewritten; the external weights are referenced, not touched.

The walk from ``logits`` back to the LM head's ``MatMul`` passes through position-wise ops only
(a final soft-cap's Div/Tanh/Mul, a Cast), so slicing before the MatMul equals slicing the logits.
"""

from __future__ import annotations

import os

from . import io_names

# Ops between the LM head's MatMul and ``logits`` that act on each position alone.
_POSITION_WISE = {"Cast", "Mul", "Div", "Tanh", "Add", "Sub", "Identity"}
_INT64_MAX = 2**63 - 1


def add_logits_to_keep(onnx_path: str | os.PathLike) -> bool:
    """Add the ``logits_to_keep`` input to the graph at ``onnx_path`` (in place). Returns False
    (graph unchanged) when it already has it; raises ValueError when the LM head is not found."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    if any(i.name == io_names.LOGITS_TO_KEEP for i in graph.input):
        return False
    producers = {out: node for node in graph.node for out in node.output}
    node = producers.get(io_names.LOGITS)
    chain = {io_names.LOGITS}  # tensors from the LM head to the logits: their shapes change
    while node is not None and node.op_type in _POSITION_WISE:
        chain.update(node.output)
        node = producers.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits"):
        found = "nothing" if node is None else node.op_type
        raise ValueError(f"{onnx_path}: no LM-head MatMul behind {io_names.LOGITS!r} (found {found})")

    hidden, kept = node.input[0], f"{node.input[0]}/logits_to_keep"
    neg, ends, axes = (f"{io_names.LOGITS_TO_KEEP}/{n}" for n in ("start", "ends", "axes"))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(1, dtype=np.int64), io_names.LOGITS_TO_KEEP),
            numpy_helper.from_array(np.array([_INT64_MAX], dtype=np.int64), ends),
            numpy_helper.from_array(np.array([1], dtype=np.int64), axes),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(io_names.LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    position = list(graph.node).index(node)
    graph.node.insert(
        position, helper.make_node("Slice", [hidden, neg, ends, axes], [kept], name="logits_to_keep/slice")
    )
    graph.node.insert(position, helper.make_node("Neg", [io_names.LOGITS_TO_KEEP], [neg], name="logits_to_keep/neg"))
    node.input[0] = kept
    for out in graph.output:
        if out.name == io_names.LOGITS:
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_value")
                dims[1].dim_param = io_names.LOGITS_AXIS
    # Stale value_info of the LM head's outputs would pin the old sequence axis.
    chain.update(node.output)
    keep_info = [v for v in graph.value_info if v.name not in chain]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)
    onnx.save(model, str(onnx_path))
    return True
