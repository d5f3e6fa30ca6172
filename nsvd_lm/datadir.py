"""The local data folder, and the one rule by which WikiText files become rows.

Both the calibration text (``nsvd_lm.calib_data``) and the evaluation texts
(``nsvd_lm.experiments.evaldata``) read the same folder, found the same way, and cut WikiText's
raw files into the Hub's rows the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "NSVD_LM_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir`` if given, else ``$NSVD_LM_DATA_DIR`` if set, else None (= use the Hub)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return None


def wikitext_rows(raw: str) -> list[str]:
    """HF wikitext rows: the file's lines with their "\\n", whitespace-only lines turned into ""."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
