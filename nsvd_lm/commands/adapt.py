"""``nsvd-lm adapt DIR...``: more windows for the leaderboard cells that are still open (issue 22)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from nsvd_lm.experiments.adaptive import (
        COMPRESS_SECONDS,
        DEFAULT_METHODS,
        MARGIN,
        MAX_ROUNDS,
        MIN_WINDOWS,
        TARGET_HALF_WIDTH,
        WINDOW_SECONDS,
    )

    parser = subparsers.add_parser(
        "adapt",
        help="adaptive window budget: score more windows where a paired CI contains 0 and is wide",
        description=(
            "Build the leaderboard of DIR... (nsvd-lm sweep folders), and for every selected NSVD/NID cell whose "
            "paired CI contains 0 and is wider than +-TARGET points, score more windows of the runs behind it "
            "(the X row and its baseline, every seed; nested windows, so pairing holds), until each cell is "
            "decided, narrow, the set is exhausted, or the seeds' spread alone is wider than the target. "
            "Resumable: rerun the same command after a kill."
        ),
    )
    parser.add_argument("directory", metavar="DIR", nargs="+", help="sweep folders or results files of one table")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="rows the rule applies to (comma-separated; 'all' = every NSVD/NID row)",
    )
    parser.add_argument("--ratios", default=None, help="comma-separated ratios (default: every ratio)")
    parser.add_argument(
        "--allocations",
        default=None,
        help="rows of these rank_allocation values only (comma-separated; default: every allocation)",
    )
    parser.add_argument("--target", type=float, default=TARGET_HALF_WIDTH, help="CI half-width in points (default 5)")
    parser.add_argument("--margin", type=float, default=MARGIN, help="factor on the extrapolated window count")
    parser.add_argument(
        "--min-windows", type=int, default=MIN_WINDOWS, help="no cell is decided on fewer windows (default 8)"
    )
    parser.add_argument("--max-rounds", type=int, default=MAX_ROUNDS, help="rounds of top-ups at most")
    parser.add_argument("--report", default=None, metavar="JSON", help="write each cell's status here (atomically)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--batch-size", default="1", help="lm-eval batch size")
    parser.add_argument("--reuse-svd", action="store_true", help="share first-step SVDs between configurations")
    parser.add_argument("--dry-run", action="store_true", help="classify the cells and plan one round; score nothing")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="start no top-up whose estimated cost exceeds what is left of this (cheapest cells first)",
    )
    parser.add_argument(
        "--window-seconds", type=float, default=WINDOW_SECONDS, help="cost model: seconds per window scored"
    )
    parser.add_argument(
        "--compress-seconds", type=float, default=COMPRESS_SECONDS, help="cost model: seconds per recompression"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.experiments.adaptive import adapt
    from nsvd_lm.experiments.sweep import parse_list

    methods = None if args.methods.strip() == "all" else parse_list(args.methods)
    batch_size = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    report = adapt(
        args.directory,
        methods=methods,
        ratios=parse_list(args.ratios, float) if args.ratios else None,
        target=args.target,
        margin=args.margin,
        max_rounds=args.max_rounds,
        device=args.device,
        batch_size=batch_size,
        reuse_svd=args.reuse_svd,
        report=args.report,
        dry_run=args.dry_run,
        budget_seconds=args.budget_seconds,
        window_seconds=args.window_seconds,
        compress_seconds=args.compress_seconds,
        min_windows=args.min_windows,
        allocations=parse_list(args.allocations) if args.allocations else None,
    )
    for cell in report.cells:
        extra = f" -> {cell.wanted} windows" if cell.status == "open" else ""
        if cell.seeds_wanted is not None:
            extra = f" (about {cell.seeds_wanted} seeds on all {cell.set_windows} windows would do)"
        print(
            f"{cell.ratio:g} {cell.label:24} {cell.task:22} {cell.estimate:+7.1f} "
            f"[{cell.low:+7.1f}, {cell.high:+7.1f}] "
            f"±{cell.half_width:5.1f} ({cell.n_windows}/{cell.set_windows} windows, {cell.n_seeds} seeds) "
            f"{cell.status}{extra}"
        )
    print("cells: " + ", ".join(f"{s} {n}" for s, n in report.counts().items()))
    for done in report.rounds:
        print(f"round {done['round']}: {len(done['windows_added'])} files got more windows in {done['seconds']:.0f} s")
    return 0
