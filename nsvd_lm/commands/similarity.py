"""``nsvd-lm similarity``: activation similarity of evaluation sets to the calibration set (paper Table 2 / Fig. 1)."""

from __future__ import annotations

import argparse
import shlex


def register(subparsers: argparse._SubParsersAction) -> None:
    from nsvd_lm.experiments.evaldata import DATA_DIR_ENV, DATASET_NAMES

    parser = subparsers.add_parser(
        "similarity",
        help="cosine similarity of each dataset's layer-input statistics to the calibration set's",
        description=(
            "For every distinct input of the compressed linears of the uncompressed model, the cosine "
            "similarity between the calibration set's and each dataset's Gram matrix (Frobenius) and "
            "mean-|x| vector; mean/std/min over inputs per dataset. Writes DIR/similarity.{md,csv,json,png} "
            "and DIR/similarity_layers.csv. Calibration statistics are cached; each summary has a bootstrap "
            "95% CI over the windows of the dataset."
        ),
    )
    parser.add_argument("--model", required=True, help="Hugging Face folder or hub id (uncompressed)")
    parser.add_argument(
        "--calib", default="wikitext2", help="calibration set, as calib_dataset of `compress` (default wikitext2)"
    )
    parser.add_argument(
        "--datasets", default="all", help=f"comma-separated, from: {','.join(DATASET_NAMES)} (or 'all', the default)"
    )
    parser.add_argument(
        "--nsamples", type=int, default=64, help="windows per dataset (default 64; fewer if the text is shorter)"
    )
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--calib-nsamples", type=int, default=None, help="calibration windows (default: --nsamples)")
    parser.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (default: --seqlen)")
    parser.add_argument("--seed", type=int, default=3, help="seed of the calibration windows (default 3)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument(
        "--bos",
        default="auto",
        choices=["auto", "always", "never"],
        help="BOS at the start of every window: auto = when the tokenizer adds one by default (default)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="statistics cache (default ~/.cache/nsvd_lm/stats, shared with compress)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"local data folder for the datasets and the calibration text (default: ${DATA_DIR_ENV})",
    )
    parser.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--command", default=None, help="command line to record in the outputs (default: this one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _this_command(args: argparse.Namespace) -> str:
    parts = [
        "nsvd-lm",
        "similarity",
        "--model",
        args.model,
        "--calib",
        args.calib,
        "--datasets",
        args.datasets,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
    ]
    for flag in ("calib_nsamples", "calib_seqlen"):
        if getattr(args, flag) is not None:
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    parts += ["--seed", str(args.seed)]
    if args.bos != "auto":
        parts += ["--bos", args.bos]
    for flag in ("data_dir", "cache_dir"):
        if getattr(args, flag):
            parts += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    parts += ["--out", args.out]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    import os
    import platform

    from nsvd_lm import __version__
    from nsvd_lm.commands.ppl import parse_datasets
    from nsvd_lm.experiments.evaldata import DATA_DIR_ENV

    datasets = parse_datasets(args.datasets)  # validates names before loading anything
    for name in ("nsamples", "seqlen", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.data_dir:
        # The calibration text resolves `wikitext2`/`c4` through the same variable.
        os.environ[DATA_DIR_ENV] = args.data_dir

    import torch
    import transformers

    from nsvd_lm.experiments.similarity import activation_similarity, write_report
    from nsvd_lm.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    report = activation_similarity(
        model,
        tokenizer,
        datasets,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        calib_nsamples=args.calib_nsamples,
        calib_seqlen=args.calib_seqlen,
        seed=args.seed,
        cache_dir=args.cache_dir,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        model_name=args.model,
        bos=args.bos,
    )
    report.settings = {
        "dtype": args.dtype,
        "device": args.device,
        "versions": {
            "nsvd_lm": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    command = args.command or _this_command(args)
    paths = write_report(report, args.out, command=command)
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
