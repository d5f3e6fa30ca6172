"""What a rank-allocation criterion's own measurement costs on SmolLM2 (issue 12), on a subset of layers.

The curves of ``sensitivity`` cost one forward per probe (6 per matrix, 210 matrices), from the
probed matrix's block to the LM head; a whole measurement takes the better part of an hour on one
CPU thread. This times the criterion on the matrices of a few decoder blocks and scales the time
per matrix to every target layer. A probe's forward is shorter the later its block, so the blocks
must be spread evenly (the default 0, 15, 29 average the model's mean block). The full
measurement's own time is recorded in the curves cache and in every allocated run's compression
record (``curve_seconds``). Uses the statistics cache of ``bench/protocol.sh`` (seed 3).

    python bench/bench_allocation_cost.py --criterion sensitivity --blocks 0,15,29
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--criterion", default="sensitivity")
    parser.add_argument("--method", default="asvd-i")
    parser.add_argument("--blocks", default="0,15,29", help="decoder blocks whose matrices are measured")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/nsvd_lm/stats-protocol"))
    parser.add_argument("--out", default=None, help="JSON file for the numbers")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm.allocation import ALLOCATIONS, PROBE_TOKENS, PROBE_WINDOWS, Probe, measure_curves
    from nsvd_lm.calibration import CalibrationConfig, calibrate, calibration_token_windows
    from nsvd_lm.decompose import LayerFactorizer
    from nsvd_lm.smollm2 import smollm2_path
    from nsvd_lm.targets import select_targets

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = CalibrationConfig(
        calib_dataset="wikitext2", calib_nsamples=64, calib_seqlen=512, seed=3, cache_dir=args.cache_dir
    )
    every = select_targets(model)
    stats = calibrate(model, tokenizer, calibration, every, progress=False)
    blocks = {int(b) for b in args.blocks.split(",")}
    subset = [t for t in every if t.block_index in blocks]
    windows = calibration_token_windows(tokenizer, calibration)[0][:PROBE_WINDOWS, :PROBE_TOKENS]
    probe = Probe(model, subset, windows, LayerFactorizer(args.method, stats), stats, progress=True)
    if args.criterion not in ALLOCATIONS or not ALLOCATIONS[args.criterion].measured:
        raise SystemExit(f"--criterion must be one of {', '.join(n for n, a in ALLOCATIONS.items() if a.measured)}")
    started = time.perf_counter()
    measured = measure_curves(args.criterion, probe)
    seconds = time.perf_counter() - started
    result = {
        "criterion": args.criterion,
        "method": args.method,
        "matrices_measured": len(subset),
        "matrices_total": len(every),
        "seconds": round(seconds, 1),
        "seconds_per_matrix": round(seconds / len(subset), 2),
        "extrapolated_seconds": round(seconds / len(subset) * len(every), 1),
        "probe_tokens": int(windows.numel()),
        "threads": torch.get_num_threads(),
        "curves": {name: {str(k): v for k, v in c.items()} for name, c in measured.curves.items()},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
    if args.out:
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
