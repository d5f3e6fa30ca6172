"""Compare the two lm_eval runs of bench/lm_eval_api_parity.sh (``WORK/out_api``: local-completions
on the served model, ``WORK/out_nsvd``: ``--model nsvd`` on the checkpoint) and write
bench/results/lm_eval_api_parity.{json,md}.

    python bench/lm_eval_api_parity.py WORK LIMIT
"""

import glob
import json
import sys

from nsvd_lm.files import write_json_atomic, write_text_atomic

work, limit = sys.argv[1], int(sys.argv[2])
task = "nsvd_wikitext2"


def load(name):
    results = json.load(open(sorted(glob.glob(f"{work}/{name}/**/results_*.json", recursive=True))[-1]))
    samples = sorted(glob.glob(f"{work}/{name}/**/samples_{task}_*.jsonl", recursive=True))[-1]
    nll = {json.loads(line)["doc_id"]: -float(json.loads(line)["filtered_resps"][0][0]) for line in open(samples)}
    return results["results"][task], nll


api, api_nll = load("out_api")
ref, ref_nll = load("out_nsvd")
metrics = {}
for m in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
    a, b = float(api[f"{m},none"]), float(ref[f"{m},none"])
    metrics[m] = {"local_completions": a, "nsvd": b, "relative_difference": abs(a - b) / abs(b)}
windows = {
    str(k): {
        "local_completions": api_nll[k],
        "nsvd": ref_nll[k],
        "relative_difference": abs(api_nll[k] - ref_nll[k]) / ref_nll[k],
    }
    for k in sorted(ref_nll)
}
out = {
    "model": "SmolLM2-135M-Instruct, nsvd-i ratio 0.4 (calibration 32 x 512 wikitext2 train), fp32 ONNX export",
    "task": task,
    "limit": limit,
    "windows_scored": int(ref["n_windows,none"]),
    "window_tokens": 2048,
    "client": "lm_eval --model local-completions (tokenized_requests=True) against nsvd-lm serve",
    "reference": "lm_eval --model nsvd --model_args pretrained=<checkpoint>,dtype=float32",
    "metrics": metrics,
    "window_nll": windows,
}
write_json_atomic("bench/results/lm_eval_api_parity.json", out)
lines = [
    "# lm-eval `local-completions` on `nsvd-lm serve` vs `--model nsvd` (bench/lm_eval_api_parity.sh)",
    "",
    f"{out['model']}; `{task}`, `--limit {limit}` ({out['windows_scored']} windows of 2048 tokens).",
    "",
    "| metric | local-completions (served ONNX) | --model nsvd (PyTorch) | relative difference |",
    "|---|---:|---:|---:|",
]
for m, v in metrics.items():
    lines.append(f"| {m} | {v['local_completions']:.6f} | {v['nsvd']:.6f} | {v['relative_difference']:.1e} |")
for k, v in windows.items():
    lines.append(
        f"| window {k} NLL | {v['local_completions']:.4f} | {v['nsvd']:.4f} | {v['relative_difference']:.1e} |"
    )
write_text_atomic("bench/results/lm_eval_api_parity.md", "\n".join(lines) + "\n")
print("\n".join(lines))
