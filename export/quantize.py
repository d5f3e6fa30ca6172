"""Weight-only int8 on top of the low-rank factors (ONNX Runtime's MatMulNBits, 8 bits).

Each float MatMul weight (the ``down`` and ``up`` factors, dense linears, an untied LM head) becomes
8-bit blocks of 32 values with one float scale each; inputs and outputs stay float, so the rank
bottleneck and the KV cache are untouched. A tied LM head (read through a Transpose of the
embedding table, which the Gather also uses) stays float. Quantization and low-rank compression stack: the
factors are smaller matrices, and int8 stores each of their entries in a quarter of the bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import io_names

INT8_BLOCK_SIZE = 32


# accuracy_level 4 lets the CPU kernel quantize activations to int8 per block and use integer dot
# products: on SmolLM2 (ONNX Runtime 1.32, x86) decode runs ~1.3x faster than float, whereas
# level 0 (float compute, weights dequantized on the fly) decodes ~5x slower than float. The cost
# is a slightly larger perplexity change (+0.5 % instead of -0.05 % at ratio 0.4; docs/onnx.md).
INT8_ACCURACY_LEVEL = 4


def quantize_int8_weight_only(
    onnx_path: str | os.PathLike, block_size: int = INT8_BLOCK_SIZE, accuracy_level: int = INT8_ACCURACY_LEVEL
) -> None:
    """Rewrite ``onnx_path`` (and its external data) in place with 8-bit MatMul weights.

    ``accuracy_level``: the MatMulNBits compute type, 0 (unset: float), 1 fp32, 2 fp16, 3 bf16,
    4 int8 activations."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=True)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, bits=8, accuracy_level=accuracy_level
    )
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, algo_config=config
    )
    # The quantizer logs every node at INFO; keep the user's console readable.
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    previous = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        quiet.setLevel(previous)
    quantized = quantizer.model.model
    data_path = onnx_path.parent / io_names.ONNX_DATA_FILENAME
    onnx_path.unlink()
    if data_path.exists():
        data_path.unlink()
    onnx.save_model(
        quantized,
        str(onnx_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=io_names.ONNX_DATA_FILENAME,
        size_threshold=1024,
    )
