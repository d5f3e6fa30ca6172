"""``nsvd-lm`` console script: one subcommand per module in ``nsvd_lm.commands``.

Each command module defines ``register(subparsers)`` which adds its parser and sets
``func`` (called with the parsed args, returns an exit code). Command modules keep heavy
imports (torch, transformers, onnxruntime) inside their functions so ``nsvd-lm --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order = order in --help. A name whose module is missing is skipped (optional extras).
COMMAND_MODULES = [
    "compress",
    "prepare_smollm2",
    "eval",
    "ppl",
    "sweep",
    "adapt",
    "leaderboard",
    "similarity",
    "export",
    "generate",
    "serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsvd-lm",
        description="Nested activation-aware low-rank compression (NSVD/NID) of Hugging Face causal LMs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"nsvd_lm.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"nsvd_lm.commands.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"nsvd-lm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
