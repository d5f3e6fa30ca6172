"""``nsvd-lm leaderboard DIR``: the paper's Table 1 (Markdown, CSV, PNG) from lm-eval results."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="perplexity table (paper's Table 1 layout) + plot from lm-eval result files",
        description=(
            "Read every lm-eval results JSON under DIR (from `nsvd-lm sweep`, `lm_eval --model nsvd "
            "--output_path ...` or `--model hf` baselines) and write PREFIX.md, PREFIX.csv and PREFIX.png. "
            "NSVD/NID cells show the relative improvement over the best of asvd-0/asvd-i/asvd-ii at "
            "the same ratio, with a paired bootstrap 95% CI over windows; Avg. Impro. excludes the calibration set."
        ),
    )
    parser.add_argument(
        "directory",
        metavar="DIR",
        nargs="+",
        help="folders with lm-eval results JSON files (searched recursively) or single results files, e.g. "
        "plain `lm_eval --model hf|nsvd --output_path` runs made elsewhere",
    )
    parser.add_argument("--out", metavar="PREFIX", default=None, help="output prefix (default: DIR/leaderboard)")
    parser.add_argument("--metric", default="token_perplexity", help="metric to tabulate (default: token_perplexity)")
    parser.add_argument("--model", default=None, help="base model to tabulate when DIR holds several")
    parser.add_argument(
        "--calibration-task",
        default=None,
        help="task excluded from Avg. Impro. (default: from the results' calibration dataset, else nsvd_wikitext2)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--versus",
        default="",
        help="extra paired comparisons, comma-separated: 'uniform' (allocated/sequential rows vs the same method "
        "with uniform ranks, and NSVD/NID vs the best ASVD row of the same variant), 'nsvd' (NID rows vs NSVD-I "
        "at the same ratio and k1)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.experiments.leaderboard import write_leaderboard

    paths = write_leaderboard(
        args.directory,
        out_prefix=args.out,
        metric=args.metric,
        model=args.model,
        calibration_task=args.calibration_task,
        plot=not args.no_plot,
        versus=[v.strip() for v in args.versus.split(",") if v.strip()],
    )
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
