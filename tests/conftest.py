"""Test-suite wide settings: offline, and the shared evaluation data beside the repository."""

import os
from pathlib import Path

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread: several tests start subprocesses (lm_eval CLI, servers, two ranks), and
# MKL's spinning OpenMP threads on an oversubscribed 2-core machine run 20-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _SHARED.is_dir():
    os.environ.setdefault("NSVD_LM_DATA_DIR", str(_SHARED))
