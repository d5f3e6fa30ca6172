"""Committed results and docs name models and data by name, never by a path of the machine that made them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("bench/results", "docs", "README.md")
# An absolute path of two or more parts, not inside a URL or after a word ("tok/s", "ASVD-I/II").
ABSOLUTE = re.compile(r"(?<![\w.~$/:\])])/[\w.@+-]+/[\w.@+-]+(?:/[\w.@+-]+)*")
# Not machine paths: the server's routes and the docs' placeholder for "your folder".
ALLOWED_PREFIXES = ("/v1/", "/path/to/")


def tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = subprocess.run(
        ["git", "ls-files", "-z", *CHECKED], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [REPO / name for name in names if name]


def machine_paths(text: str) -> list[str]:
    return [m.group(0) for m in ABSOLUTE.finditer(text) if not m.group(0).startswith(ALLOWED_PREFIXES)]


def test_the_pattern_finds_paths_and_leaves_the_rest():
    text = "from `/root/.cache/x` and /work/shared/data; 3 tok/s, ASVD-I/II, https://a.b/c/d, /v1/models, ~/x/y"
    assert machine_paths(text) == ["/root/.cache/x", "/work/shared/data"]


def test_no_absolute_paths_in_tracked_results_and_docs():
    found = {}
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # images; a file deleted in the working tree
        paths = machine_paths(text)
        if paths:
            found[str(path.relative_to(REPO))] = sorted(set(paths))[:3]
    assert not found, (
        "machine paths in tracked files (name models by name, data relative to $NSVD_LM_DATA_DIR; "
        f"`python bench/portable_results.py` rewrites results JSON): {found}"
    )
