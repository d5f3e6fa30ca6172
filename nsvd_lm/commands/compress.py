"""``nsvd-lm compress``: load a model, compress it, save a compressed checkpoint."""

from __future__ import annotations

import argparse
import json
import time


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from nsvd_lm.config import DEFAULT_PRETRAINED

    parser.add_argument(
        "--model", default=None, help=f"Hugging Face folder or hub id of a causal LM (default: {DEFAULT_PRETRAINED})"
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default auto)")
    parser.add_argument("--device", default=None, help="device to load the model on (e.g. cuda, cpu)")
    parser.add_argument(
        "--device-map", default=None, help='accelerate device map, e.g. "auto" for models larger than one device'
    )
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nsvd_lm.config import configs_from_arguments

    config, calibration = configs_from_arguments(args)  # bad flags fail here, before the model loads
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
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    load_s = time.perf_counter() - t0
    report = compress_model(model, tokenizer, config, calibration=calibration)
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
    from nsvd_lm.config import add_arguments

    add_arguments(parser)  # one flag per config field (nsvd_lm/config.py)
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--report", default=None, help="also write the per-layer report as JSON here")
    parser.set_defaults(func=run)
