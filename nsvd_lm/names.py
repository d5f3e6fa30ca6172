"""Names that mean the same on every machine: what results and reports call a model or a file.

A results file or a report names a model by its hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``)
or, for a local folder, by the folder's name (``SmolLM2-135M-Instruct``): the folder a model
happened to live in on the machine that made the result says nothing to the reader and makes
results from two machines look like two models. A data file is named relative to the data folder
(``$NSVD_LM_DATA_DIR/wikitext2/wiki.valid.raw``), a file of this checkout relative to it, and a
file under the home folder as ``~/...`` (the prepared models' cache, ``~/.cache/nsvd_lm/models``,
is the same on every machine, so a results file still finds its model). The in-memory records
(``EvalText.source``, a checkpoint's ``name_or_path``) keep the real paths; only what is written
for readers goes through here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from nsvd_lm.datadir import DATA_DIR_ENV, resolve_data_dir

# An absolute POSIX path inside a longer string ("checkpoint /x/y", "pretrained=/x/y,ratio=0.4").
ABSOLUTE_PATH = re.compile(r"(?<![\w.~$/:])/(?:[\w.@+-]+/)*[\w.@+-]+")


def is_local_path(identifier: str | os.PathLike) -> bool:
    """True for a filesystem path, False for a hub id (``name`` or ``org/name``, never more parts)."""
    text = str(identifier)
    return os.path.isabs(text) or text.startswith(("~", ".")) or text.count("/") > 1 or Path(text).exists()


def model_name(identifier: str | os.PathLike) -> str:
    """The model's name: a hub id as given, a local folder's (or file's) last component."""
    text = str(identifier).rstrip("/\\")
    if not text:
        return str(identifier)
    return Path(text).name if is_local_path(text) else text


def project_root() -> Path:
    """The checkout this package runs from (its ``tasks/``, ``bench/``, ``docs/``)."""
    return Path(__file__).resolve().parent.parent


def path_bases() -> list[tuple[Path, str]]:
    """This machine's folders a portable path is written relative to, each with what stands for it.

    The data folder (``$NSVD_LM_DATA_DIR``), the project's checkout (``""``: relative to it) and
    home (``~``), in that order: the first that holds a path names it.
    """
    data_dir = resolve_data_dir()
    bases = [(data_dir, f"${DATA_DIR_ENV}")] if data_dir is not None else []
    return bases + [(project_root(), ""), (Path.home(), "~")]


def portable_path(path: str | os.PathLike, bases: list[tuple[Path, str]] | None = None) -> str:
    """``path`` as another machine can read it, losing nothing that finds it again.

    Under the data folder: ``$NSVD_LM_DATA_DIR/...``; under the project's checkout: relative to it
    (``tasks/nsvd_c4.yaml``); under home: ``~/...``; anywhere else (a temp folder) as given.
    ``bases``: other folders than :func:`path_bases` (another machine's).
    """
    text = str(path)
    if not os.path.isabs(text):
        return text
    for base, shown in path_bases() if bases is None else bases:
        try:
            relative = Path(text).relative_to(base)
        except ValueError:
            continue
        if not shown:
            return relative.as_posix()
        return shown if relative == Path(".") else f"{shown}/{relative.as_posix()}"
    return text


def portable_text(text: str, bases: list[tuple[Path, str]] | None = None) -> str:
    """Every absolute path inside ``text`` through :func:`portable_path`."""
    return ABSOLUTE_PATH.sub(lambda match: portable_path(match.group(0), bases), text)


def portable(value: Any, bases: list[tuple[Path, str]] | None = None) -> Any:
    """A JSON-like result with every absolute path in its strings made portable (:func:`portable_text`).

    Model paths stay loadable where the model lies in the same place under home (the prepared
    models' cache, ``~/.cache/nsvd_lm/models/<name>``): :func:`localize` turns them back.
    """
    if isinstance(value, dict):
        return {k: portable(v, bases) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v, bases) for v in value)
    return portable_text(value, bases) if isinstance(value, str) else value


def localize(value: Any) -> Any:
    """The inverse of :func:`portable` for what can be found again: ``~/...`` and ``$NSVD_LM_DATA_DIR/...``."""
    if isinstance(value, dict):
        return {k: localize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(localize(v) for v in value)
    if isinstance(value, str):
        if value == "~" or value.startswith("~/"):
            return os.path.expanduser(value)
        data_dir = resolve_data_dir()
        prefix = f"${DATA_DIR_ENV}"
        if data_dir is not None and (value == prefix or value.startswith(prefix + "/")):
            return str(data_dir) + value[len(prefix) :]
    return value
