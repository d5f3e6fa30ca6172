"""nsvd-lm: nested activation-aware low-rank compression of Hugging Face causal LMs.

    from nsvd_lm import CompressionConfig, CalibrationConfig, compress_model, save_compressed, load_compressed

    # or flat: compress_model(model, tokenizer, method=..., calib_nsamples=...)
    report = compress_model(model, tokenizer, CompressionConfig(method="nsvd-i", ratio=0.4),
                            calibration=CalibrationConfig(calib_nsamples=64))
    save_compressed(model, "out/", tokenizer)
    model = load_compressed("out/")

Attributes are imported lazily so that ``import nsvd_lm`` (done at interpreter start by the
lm-eval registration hook) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CompressionConfig": "nsvd_lm.config",
    "CalibrationConfig": "nsvd_lm.config",
    "parse_configs": "nsvd_lm.config",
    "CompressionRecord": "nsvd_lm.compress",
    "calibrate": "nsvd_lm.calibration",
    "METHODS": "nsvd_lm.decompose",
    "rank_for_ratio": "nsvd_lm.allocation",
    "compress_model": "nsvd_lm.compress",
    "CompressionReport": "nsvd_lm.compress",
    "get_statistics": "nsvd_lm.compress",
    "save_compressed": "nsvd_lm.checkpoint",
    "load_compressed": "nsvd_lm.checkpoint",
    "is_compressed_checkpoint": "nsvd_lm.checkpoint",
    "load_model_and_tokenizer": "nsvd_lm.loading",
    "LowRankLinear": "nsvd_lm.modules",
    "low_rank_factors": "nsvd_lm.decompose",
    "smollm2_path": "nsvd_lm.smollm2",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nsvd_lm' has no attribute {name!r}")
