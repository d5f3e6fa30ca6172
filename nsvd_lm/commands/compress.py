"""``nsvd-lm compress``: load a model, compress it, save a compressed checkpoint."""

from __future__ import annotations

import argparse
import json
import time


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The compression/calibration flags shared by ``compress`` and other commands."""
    from nsvd_lm.config import METHOD_ALIASES, METHODS

    group = parser.add_argument_group("compression")
    group.add_argument("--method", default="nsvd-i", help=f"one of {', '.join(METHODS + tuple(METHOD_ALIASES))} (default nsvd-i)")
    group.add_argument("--ratio", type=float, default=0.4, help="fraction of each matrix's parameters removed, in (0, 1) (default 0.4)")
    group.add_argument("--k1-frac", type=float, default=0.95, help="share of the rank for the activation-aware step of nsvd-*/nid-* (default 0.95)")
    group.add_argument("--asvd-alpha", type=float, default=0.5, help="exponent of ASVD-0's scaling (default 0.5)")
    group.add_argument("--asvd3-beta", type=float, default=0.5, help="eigenvalue exponent of asvd-iii (default 0.5)")
    group.add_argument("--include", default=None, help="comma-separated glob patterns of layers to compress (default: all linears in the decoder blocks)")
    group.add_argument("--exclude", default=None, help="comma-separated glob patterns of layers to keep dense")
    group.add_argument("--svd-driver", default="exact", choices=["exact", "lowrank"], help="exact LAPACK SVD or randomized torch.svd_lowrank")
    group.add_argument("--compute-device", default=None, help="device for the decompositions (default: the weight's)")
    cal = parser.add_argument_group("calibration")
    cal.add_argument("--calib-dataset", default="wikitext2", help="wikitext2, c4, a hub id[:config] or a local .txt/.json/.jsonl/.parquet file or folder")
    cal.add_argument("--calib-nsamples", type=int, default=256, help="number of calibration windows (default 256)")
    cal.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    cal.add_argument("--calib-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    cal.add_argument("--seed", type=int, default=3, help="seed of the window positions (default 3)")
    cal.add_argument("--calib-bos", default="auto", choices=["auto", "always", "never"], help="BOS at the start of every calibration window: auto = when the tokenizer adds one by default")
    cal.add_argument("--cache-dir", default=None, help="statistics cache folder (default ~/.cache/nsvd_lm/stats)")


def config_from_args(args: argparse.Namespace):
    from nsvd_lm.config import CompressionConfig

    return CompressionConfig.from_kwargs(
        method=args.method, ratio=args.ratio, k1_frac=args.k1_frac, asvd_alpha=args.asvd_alpha,
        asvd3_beta=args.asvd3_beta, include=args.include, exclude=args.exclude,
        calib_dataset=args.calib_dataset, calib_nsamples=args.calib_nsamples, calib_seqlen=args.calib_seqlen,
        calib_batch_size=args.calib_batch_size, seed=args.seed, cache_dir=args.cache_dir,
        svd_driver=args.svd_driver, compute_device=args.compute_device, calib_bos=args.calib_bos,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from nsvd_lm.config import DEFAULT_PRETRAINED

    parser.add_argument(
        "--model", default=None, help=f"Hugging Face folder or hub id of a causal LM (default: {DEFAULT_PRETRAINED})"
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default auto)")
    parser.add_argument("--device", default=None, help="device to load the model on (e.g. cuda, cpu)")
    parser.add_argument("--device-map", default=None, help='accelerate device map, e.g. "auto" for models larger than one device')
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    config = config_from_args(args)  # bad flags fail here, before the model loads
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty (pass --overwrite)")

    from nsvd_lm.checkpoint import is_compressed_checkpoint, save_compressed
    from nsvd_lm.compress import compress_model
    from nsvd_lm.loading import load_model_and_tokenizer

    if args.model is None:
        from nsvd_lm.smollm2 import default_pretrained

        args.model = str(default_pretrained(argument="--model "))
        print(f"no --model given: using the default model {args.model}")
    if is_compressed_checkpoint(args.model):
        raise ValueError(f"--model {args.model} is already a compressed checkpoint; compress the base model")
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        args.model, dtype=args.dtype, device=args.device, device_map=args.device_map, trust_remote_code=args.trust_remote_code
    )
    load_s = time.perf_counter() - t0
    report = compress_model(model, tokenizer, config)
    t1 = time.perf_counter()
    save_compressed(model, out, tokenizer, overwrite=args.overwrite)
    save_s = time.perf_counter() - t1
    print(report.summary())
    print(f"load {load_s:.1f}s, save {save_s:.1f}s -> {out}")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("compress", help="compress a model and save a compressed checkpoint")
    add_model_arguments(parser)
    add_compression_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--report", default=None, help="also write the per-layer report as JSON here")
    parser.set_defaults(func=run)
