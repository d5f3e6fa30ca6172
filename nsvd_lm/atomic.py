"""Write folders and files so that an interrupted run never leaves a half-written result."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
