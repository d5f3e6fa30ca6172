"""Rewrite the path fields of results files made on another machine, in place, as nsvd-lm now writes them.

    python bench/portable_results.py FILE_OR_DIR... [--from-data DIR] [--from-checkout DIR] [--from-home DIR]
                                                   [--name-only PREFIX ...] [--check]

Results written before ``nsvd_lm.names.portable`` existed hold the absolute paths of the machine
they were made on. This rewrites every string of every JSON file as ``portable`` would have on
that machine (its data folder, checkout and home given with ``--from-*``; default: this
machine's); a path under a ``--name-only`` prefix (a temp folder, which no other machine has)
keeps only its last component. Only strings change: the file is written back with the same
JSON layout (indent, key order, trailing newline), so a diff shows the path fields and nothing
else. ``--check`` writes nothing and exits 1 if a file would change. Markdown and CSV are not
touched here: they are rendered again from the JSON (``bench/protocol.sh tables``,
``nsvd_lm.experiments.similarity``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from nsvd_lm.datadir import DATA_DIR_ENV, resolve_data_dir
from nsvd_lm.files import write_text_atomic
from nsvd_lm.names import ABSOLUTE_PATH, portable, project_root


def name_only(value: Any, prefixes: list[Path]) -> Any:
    """Paths under ``prefixes`` cut to their last component (lossy: only for folders no one has)."""
    if isinstance(value, dict):
        return {k: name_only(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [name_only(v, prefixes) for v in value]
    if isinstance(value, str):

        def cut(match: re.Match) -> str:
            path = Path(match.group(0))
            return path.name if any(path.is_relative_to(prefix) for prefix in prefixes) else match.group(0)

        return ABSOLUTE_PATH.sub(cut, value)
    return value


def layout(raw: str, data: Any) -> dict[str, Any] | None:
    """The ``json.dumps`` arguments that give back ``raw`` exactly, or None."""
    for indent in (1, 2, 4, None):
        for ensure_ascii in (True, False):
            text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii)
            for end in ("\n", ""):
                if text + end == raw:
                    return {"indent": indent, "ensure_ascii": ensure_ascii, "end": end}
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="JSON files or folders (searched recursively)")
    parser.add_argument("--from-data", default=None, help=f"the data folder of the machine (default: ${DATA_DIR_ENV})")
    parser.add_argument("--from-checkout", default=None, help="its checkout of nsvd-lm (default: this one)")
    parser.add_argument("--from-home", default=None, help="its home folder (default: this machine's)")
    parser.add_argument("--name-only", action="append", default=[], metavar="PREFIX", help="e.g. /tmp")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)

    data_dir = Path(args.from_data) if args.from_data else resolve_data_dir()
    bases = [(data_dir, f"${DATA_DIR_ENV}")] if data_dir is not None else []
    bases += [(Path(args.from_checkout or project_root()), ""), (Path(args.from_home or Path.home()), "~")]
    prefixes = [Path(p) for p in args.name_only]
    files: list[Path] = []
    for given in map(Path, args.paths):
        files += sorted(given.rglob("*.json")) if given.is_dir() else [given]
    changed = 0
    for path in files:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw)
        how = layout(raw, data)
        if how is None:
            raise ValueError(f"{path}: not in a layout json.dumps writes; rewrite it by hand")
        new = name_only(portable(data, bases), prefixes)
        if new == data:
            continue
        changed += 1
        print(("would rewrite " if args.check else "rewrote ") + str(path))
        if not args.check:
            text = json.dumps(new, indent=how["indent"], ensure_ascii=how["ensure_ascii"]) + how["end"]
            write_text_atomic(path, text)
    print(f"{changed} of {len(files)} file(s) {'to change' if args.check else 'changed'}", file=sys.stderr)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
