"""``nsvd-lm eval ...`` / ``python -m nsvd_lm eval ...``: the ``lm_eval`` CLI with ``--model nsvd``.

Every argument is handed to lm-eval's own CLI unchanged (same flags, same output files); only
``--model nsvd`` is added when no ``--model`` is given, and our lm-eval hook is installed first
so this works from a source checkout as well as from an installed package.
"""

from __future__ import annotations

import argparse
import sys

LM_EVAL_SUBCOMMANDS = ("run", "ls", "validate")


def register(subparsers: argparse._SubParsersAction) -> None:
    # prefix_chars="+": this parser treats "--tasks" etc. as plain words, so every argument
    # reaches lm-eval untouched (argparse.REMAINDER alone stops at the first "--option").
    parser = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness (lm_eval) with --model nsvd; all arguments go to lm_eval",
        description=(
            "Same as `lm_eval --model nsvd ...`. Example: nsvd-lm eval --model_args "
            "pretrained=PATH,method=nsvd-i,ratio=0.4 --tasks nsvd_ppl --limit 4 --output_path results/"
        ),
        prefix_chars="+",
        add_help=False,
    )
    parser.add_argument("lm_eval_args", nargs="*", help="arguments for lm_eval (see `nsvd-lm eval --help`)")
    parser.set_defaults(func=run)


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval CLI arguments: ``--model nsvd`` unless a model is named (also for ``run``)."""
    args = list(args)
    if not args or args[0] in ("-h", "--help"):
        return ["run", "--help"]
    if args[0] in LM_EVAL_SUBCOMMANDS:
        command, rest = args[0], args[1:]
    else:
        command, rest = "run", args
    if command == "run" and not any(a in ("--model", "-M") or a.startswith("--model=") for a in rest):
        rest = ["--model", "nsvd", *rest]
    return [command, *rest]


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.lmeval import hook

    hook.install()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *lm_eval_argv(args.lm_eval_args)]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse errors / --help inside lm-eval
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
