"""Read an exported graph without running it: weight bytes, and the low-rank MatMul pairs.

Used by the export report and by the tests that check the factorization survived export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class MatMulWeight:
    node: str  # the MatMul node's name
    output: str  # its output tensor
    activation: str  # its data input
    shape: tuple[int, ...]  # the weight as the MatMul sees it: (in, out)


@dataclass(frozen=True)
class LowRankPair:
    """Two chained MatMuls ``x @ D @ U`` with D (in, rank) and U (rank, out), rank < min(in, out)."""

    down: MatMulWeight
    up: MatMulWeight

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    @property
    def in_features(self) -> int:
        return self.down.shape[0]

    @property
    def out_features(self) -> int:
        return self.up.shape[1]


def load_graph(model_path: str | os.PathLike) -> onnx.ModelProto:
    """The graph without its external weights (shapes and names only; fast, little memory)."""
    return onnx.load(str(model_path), load_external_data=False)


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return count * itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers (inline and external), as stored: the weight footprint."""
    return sum(_tensor_nbytes(t) for t in model.graph.initializer)


def initializer_count(model: onnx.ModelProto) -> int:
    """Number of stored weight elements."""
    return sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer)


def matmul_weights(model: onnx.ModelProto) -> list[MatMulWeight]:
    """Every MatMul whose second input is a stored 2-D weight, directly or through a Transpose."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    transposed: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in shapes and len(shapes[node.input[0]]) == 2:
            transposed[node.output[0]] = tuple(reversed(shapes[node.input[0]]))
    found: list[MatMulWeight] = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = node.input[1]
        shape = shapes.get(weight) or transposed.get(weight)
        if shape is not None and len(shape) == 2:
            found.append(MatMulWeight(node.name, node.output[0], node.input[0], shape))
    return found


def low_rank_pairs(model: onnx.ModelProto) -> list[LowRankPair]:
    """MatMul pairs where the first one's output feeds the second directly, with a rank bottleneck."""
    by_activation: dict[str, list[MatMulWeight]] = {}
    weights = matmul_weights(model)
    for w in weights:
        by_activation.setdefault(w.activation, []).append(w)
    pairs: list[LowRankPair] = []
    for down in weights:
        for up in by_activation.get(down.output, []):
            rank = down.shape[1]
            if up.shape[0] == rank and rank < min(down.shape[0], up.shape[1]):
                pairs.append(LowRankPair(down, up))
    return pairs
