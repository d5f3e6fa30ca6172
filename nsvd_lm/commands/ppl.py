"""``nsvd-lm ppl``: exact token perplexity (SVD-LLM protocol) on the paper's datasets, in PyTorch."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from nsvd_lm.experiments.evaldata import DATA_DIR_ENV, DATASET_NAMES
    from nsvd_lm.windows import BOS_MODES

    parser = subparsers.add_parser(
        "ppl",
        help="exact token perplexity on the paper's datasets (SVD-LLM protocol)",
        description=(
            "Token perplexity as in the paper's tables: the text is tokenized once, cut into disjoint "
            "--seqlen windows, and each window predicts its last seqlen-1 tokens. C4 scores at most 256 windows."
        ),
    )
    parser.add_argument(
        "--model", required=True, help="Hugging Face folder or hub id, or a compressed checkpoint folder"
    )
    parser.add_argument(
        "--datasets",
        default="wikitext2",
        help=f"comma-separated, from: {','.join(DATASET_NAMES)} (or 'all'); default wikitext2",
    )
    parser.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument(
        "--max-windows", type=int, default=None, help="quick mode: score only the first N windows of each dataset"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument(
        "--bos",
        default="auto",
        choices=list(BOS_MODES),
        help="BOS per window: auto (default) = when the tokenizer adds one by default, e.g. Llama/Mistral/Gemma; "
        "always; never; first = SVD-LLM's protocol (BOS only before the first window; what the paper's tables use)",
    )
    parser.add_argument(
        "--data-dir", default=None, help=f"local data folder (default: ${DATA_DIR_ENV}, else the Hugging Face Hub)"
    )
    parser.add_argument(
        "--split", default=None, help="split to score (default: test, else validation, else the only one)"
    )
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def parse_datasets(value: str) -> list[str]:
    """Validated dataset names from a comma-separated list ('all' = the eight sets)."""
    from nsvd_lm.experiments.evaldata import DATASET_NAMES

    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return list(DATASET_NAMES)
    if not names:
        raise ValueError(f"--datasets is empty; allowed: {', '.join(DATASET_NAMES)}")
    unknown = [n for n in names if n not in DATASET_NAMES]
    if unknown:
        raise ValueError(f"--datasets: unknown {', '.join(unknown)}; allowed: {', '.join(DATASET_NAMES)}")
    return names


def _check_args(args: argparse.Namespace) -> list[str]:
    names = parse_datasets(args.datasets)
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be a positive integer, got {args.max_windows}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir}: no such folder")
    return names


def run(args: argparse.Namespace) -> int:
    names = _check_args(args)  # bad input fails before the model is loaded

    from nsvd_lm.experiments.evaldata import load_eval_text
    from nsvd_lm.experiments.ppl import eval_text_perplexity
    from nsvd_lm.loading import load_model_and_tokenizer

    # Read every text first: a missing file should not cost a model load.
    texts = {name: load_eval_text(name, data_dir=args.data_dir, split=args.split) for name in names}

    started = time.time()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    rows: list[dict[str, Any]] = []
    for name in names:
        eval_text = texts[name]
        t0 = time.time()
        result = eval_text_perplexity(
            model,
            tokenizer,
            eval_text,
            seqlen=args.seqlen,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
            device=args.device,
            progress=not args.no_progress,
            bos=args.bos,
        )
        n_full = result.n_windows_full
        row = {
            "dataset": name,
            "token_perplexity": result.ppl,
            "nll_mean": result.nll_mean,
            "n_windows": result.n_windows,
            "n_windows_full": n_full,
            "capped": result.n_windows < n_full,
            "n_tokens_predicted": result.n_tokens_predicted,
            "n_tokens_total": result.n_tokens_total,
            "bos_per_window": result.bos_per_window,
            "seconds": round(time.time() - t0, 2),
            "data": eval_text.describe(),
            # Per-window scores for paired comparisons (nsvd_lm.experiments.paired.WindowScores).
            "windows": result.window_scores().to_dict(),
        }
        rows.append(row)
        print(f"{name}: token perplexity {result.ppl:.4f} ({result.n_windows}/{n_full} windows)", file=sys.stderr)

    print(format_table(rows, args.seqlen))
    if args.output:
        report = {
            "model": args.model,
            "protocol": (
                "SVD-LLM: disjoint seqlen windows, each predicting its last seqlen-1 tokens"
                if not any(r["bos_per_window"] for r in rows)
                else "BOS + a piece of text of at most seqlen-1 tokens per window, every text token predicted"
            ),
            "bos": args.bos,
            "seqlen": args.seqlen,
            "max_windows": args.max_windows,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": args.device,
            "data_dir": args.data_dir or os.environ.get("NSVD_LM_DATA_DIR") or "hub",
            "seconds": round(time.time() - started, 2),
            "results": rows,
        }
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(Path(args.output), report)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def format_table(rows: list[dict[str, Any]], seqlen: int) -> str:
    """Markdown table of the results; quick-mode rows are marked so they are not taken as full."""
    lines = [
        f"| dataset | token perplexity | windows (seqlen {seqlen}) | tokens predicted | data |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        windows = f"{row['n_windows']}/{row['n_windows_full']}" + (" QUICK" if row["capped"] else "")
        data = row["data"]
        where = f"{data['origin']} {data['split']}" + (" (substitute)" if data["substitute"] else "")
        lines.append(
            f"| {row['dataset']} | {row['token_perplexity']:.4f} | {windows} | {row['n_tokens_predicted']} | {where} |"
        )
    return "\n".join(lines)
