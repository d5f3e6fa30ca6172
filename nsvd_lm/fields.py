"""Helpers for declaring config fields once: help text in ``field(metadata=...)`` and value checks
whose errors name the argument (``calib_nsamples='x' is not an integer``).

Used by both configs (``CompressionConfig`` in ``config.py``, ``CalibrationConfig`` in
``calibration.py``); ``config.py`` turns the fields into ``model_args``, CLI flags and the docs table.
"""

from __future__ import annotations

import math
from typing import Any


def described(text: str, **extra: Any) -> dict[str, Any]:
    """``field(metadata=...)`` of a config field: its help text (+ ``choices``)."""
    return {"help": text, **extra}


def as_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}={value!r} must be finite")
    return out


TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def as_bool(name: str, value: Any) -> bool:
    """A switch from a bool or a word (lm-eval ``model_args`` and CLI strings: true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    also = ", ".join(TRUE_WORDS[1:] + FALSE_WORDS[1:])
    raise ValueError(f"{name}={value!r} is not a switch; allowed values: true, false (also {also})")


def as_int(name: str, value: Any) -> int:
    try:
        out = int(str(value)) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not an integer") from None
    return out
