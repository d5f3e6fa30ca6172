"""``nsvd-lm sweep``: methods × ratios (× k1 fractions) through lm-eval, one results file each, resumable."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="evaluate a grid of methods x ratios with lm-eval (one calibration, resumable)",
        description=(
            "Evaluate every method x ratio with `lm_eval --model nsvd` in-process, writing one lm-eval "
            "results JSON per configuration to --output (atomically). Re-running skips finished "
            "configurations. Then: nsvd-lm leaderboard DIR."
        ),
    )
    parser.add_argument("--model", required=True, help="base model: Hugging Face folder or hub id")
    parser.add_argument(
        "--methods", default="", help="comma-separated, e.g. svd,asvd-0,asvd-i,asvd-ii,nsvd-i,nsvd-ii,nid-i,nid-ii"
    )
    parser.add_argument(
        "--ratios", default="", help="comma-separated parameter ratios removed, e.g. 0.1,0.2,0.3,0.4,0.5"
    )
    parser.add_argument(
        "--k1-fracs", default=None, help="comma-separated k1 fractions for nsvd-*/nid-* (default: 0.95)"
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated calibration seeds, e.g. 3,4,5: the grid once per seed (files <name>_s<seed>.json; "
        "seed 3 keeps the plain name); the leaderboard shows mean ± std over seeds",
    )
    parser.add_argument("--tasks", default="nsvd_ppl", help="lm-eval tasks/groups (default: nsvd_ppl)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the per-configuration results")
    parser.add_argument("--include-original", action="store_true", help="also evaluate the uncompressed model")
    parser.add_argument(
        "--limit", type=float, default=None, help="lm-eval --limit (windows per task; quick, capped numbers)"
    )
    parser.add_argument(
        "--windows",
        default=None,
        help="windows scored per task (at least: a rerun with more scores only the missing ones), spread evenly "
        "over each set, e.g. 'nsvd_snips=9,*=24' (* = every other "
        "task; a count above a set's size takes the whole set); exclusive with --limit",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available)")
    parser.add_argument("--batch-size", default="1", help="lm-eval batch size (int or auto)")
    parser.add_argument(
        "--model-args", default="", help="extra model_args for every run, e.g. dtype=bfloat16,max_length=2048"
    )
    parser.add_argument("--metadata", default=None, help="task metadata as JSON, e.g. '{\"max_windows\": 8}'")
    parser.add_argument("--include-path", default=None, help="extra lm-eval task folder")
    from nsvd_lm.config import add_arguments

    add_arguments(parser, calibration_only=True)  # shared by every configuration (nsvd_lm/config.py)
    parser.add_argument(
        "--reuse-svd",
        action="store_true",
        help="keep each matrix's first-step SVD in memory across the grid (one SVD per whitening kind "
        "instead of one per configuration; costs about 2x the model's parameters in float64 RAM)",
    )
    parser.add_argument(
        "--no-leaderboard", action="store_true", help="do not write DIR/leaderboard.{md,csv,png} at the end"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the tasks, then print (as JSON) what would be scored: per configuration the windows per task "
        "and whether it compresses; nothing is evaluated or written",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from lm_eval.utils import simple_parse_args_string

    from nsvd_lm.config import calibration_arguments
    from nsvd_lm.experiments.sweep import parse_list, parse_windows, run_sweep

    metadata = json.loads(args.metadata) if args.metadata else None
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"--metadata must be a JSON object, got {args.metadata!r}")
    batch_size = int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size
    summary = run_sweep(
        args.model,
        parse_list(args.methods),
        parse_list(args.ratios, float),
        parse_list(args.tasks),
        args.output,
        k1_fracs=parse_list(args.k1_fracs, float) or None,
        include_original=args.include_original,
        limit=args.limit,
        calibration=calibration_arguments(args),
        model_args=simple_parse_args_string(args.model_args),
        metadata=metadata,
        include_path=args.include_path,
        device=args.device,
        batch_size=batch_size,
        reuse_svd=args.reuse_svd,
        seeds=parse_list(args.seeds, int) if args.seeds is not None else None,
        windows=parse_windows(args.windows) if args.windows else None,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(json.dumps({"output": str(summary.output_dir), "planned": summary.planned}, indent=1))
        return 0
    print(
        f"sweep {summary.output_dir}: ran {len(summary.ran)}, skipped {len(summary.skipped)} (already done)"
        + (f", extended {len(summary.extended)}" if summary.extended else "")
    )
    for name in summary.ran:
        print(f"  ran     {name} ({summary.seconds[name]:.1f}s)")
    for name in summary.extended:
        print(f"  more windows {name}")
    for name in summary.skipped:
        print(f"  skipped {name}")
    if not args.no_leaderboard:
        from nsvd_lm.experiments.leaderboard import write_leaderboard

        paths = write_leaderboard(summary.output_dir)
        print(paths["markdown"].read_text(encoding="utf-8"))
        print("leaderboard: " + ", ".join(str(p) for p in paths.values()))
    return 0
