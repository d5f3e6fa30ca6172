"""ONNX export of (compressed) causal LMs; see docs/onnx.md. Serving is :mod:`nsvd_lm.serve`.

Names resolve lazily so ``import nsvd_lm.export`` stays cheap (no torch / onnxruntime import).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_onnx": "onnx_export",
    "ExportReport": "onnx_export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
