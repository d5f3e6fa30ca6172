"""``nsvd-lm export --model DIR --out DIR``: ONNX decoder with KV cache for ONNX Runtime serving."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a compressed checkpoint (or a Hugging Face model) to ONNX with KV cache",
        description=(
            "Write model.onnx (+ model.onnx.data), config/tokenizer files and genai_config.json to OUT. "
            "Each low-rank layer stays two MatMuls, so the ONNX weights shrink like the parameter count. "
            "Inputs: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs: "
            "logits, present.{i}.key/value. OUT must not exist or be empty."
        ),
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR", help="compressed nsvd-lm checkpoint, Hugging Face folder or hub id"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or float16 (for GPU serving)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset, 18-23 (default: the exporter's)")
    parser.add_argument("--quantize", default=None, help="int8: weight-only 8-bit MatMul weights on top of the factors")
    parser.add_argument("--no-verify", action="store_true", help="skip the ORT-vs-PyTorch logits probe")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nsvd_lm.export.onnx_export import check_export_args, export_onnx

    check_export_args(args.dtype, args.opset, args.quantize)  # before importing torch
    report = export_onnx(
        args.model, args.out, dtype=args.dtype, opset=args.opset, quantize=args.quantize, verify=not args.no_verify
    )
    print(report.summary())
    return 0
