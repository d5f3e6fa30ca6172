"""Files on disk: where caches live, and writes that never leave a half-written result behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "NSVD_LM_CACHE"


def default_cache_root() -> Path:
    """``$NSVD_LM_CACHE`` or ``~/.cache/nsvd_lm``: prepared models under ``models/``, statistics under ``stats/``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "nsvd_lm"))


def default_stats_dir() -> Path:
    return default_cache_root() / "stats"


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``target``; on success it is renamed to ``target``.

    On an exception the temporary folder is removed and ``target`` is left as it was. With
    ``replace``, an existing ``target`` is replaced; otherwise it is an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists")
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` via a dot-temp file in the same folder (``.NAME.*.tmp``), fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """``data`` as indented UTF-8 JSON, written atomically (``default`` as in ``json.dumps``)."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=default) + "\n")
