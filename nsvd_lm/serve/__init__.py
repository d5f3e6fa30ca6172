"""Serving exported models: the ONNX Runtime model wrapper, generation engines behind one
interface, and the OpenAI-compatible HTTP service; see docs/onnx.md.

    runtime.py     OnnxCausalLM: one exported folder on ONNX Runtime (generate, score, one step)
    engine.py      Engine (submit, cancel, step, stats), GenSequence (a request), make_engine
    ort_engine.py  OrtEngine: continuous batching on ONNX Runtime
    genai_engine.py GenaiEngine: onnxruntime-genai's engine behind the same interface
    http.py        the Starlette app, ServerLimits, make_server (talks only to an Engine)
    sampling.py    greedy / temperature / top-p next-token choice
    stops.py       stop strings: cut, detect, hold back while streaming

Names resolve lazily so ``import nsvd_lm.serve`` stays cheap (no onnxruntime / starlette import).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "OnnxCausalLM": "runtime",
    "Completion": "runtime",
    "Engine": "engine",
    "GenSequence": "engine",
    "QueueFull": "engine",
    "make_engine": "engine",
    "OrtEngine": "ort_engine",
    "GenaiEngine": "genai_engine",
    "make_server": "http",
    "ServerLimits": "http",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
