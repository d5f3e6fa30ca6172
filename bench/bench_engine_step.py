"""Where one decode step of the ONNX Runtime engine goes: model time vs engine time, at batch 1, 8, 16.

For each exported folder (--onnx NAME=DIR, repeatable) and each batch size B, an ``OrtEngine`` with
``max_seqs=B`` gets B streaming sequences (text decoded and held back per token, as the server
does; greedy) and is stepped by hand. Only steps where all B rows decode are kept (the joins,
prefills and leaves around them are not decode steps). Per step:

* **model** = the time inside ``InferenceSession.run_with_iobinding`` (the graph itself);
* **engine** = the rest of the decode step: building inputs, binding the cache and outputs,
  sampling, recording tokens, decoding streamed text, stop checks, events, cache bookkeeping.

EOS is switched off for the profile (every row runs to ``--steps`` tokens), so every batch has
the same number of full-width steps; nothing else changes. Rounds are interleaved over (model,
batch); per (model, batch) the median over all kept steps of all rounds is reported, with the
25th-75th percentiles.

    flock /tmp/nsvd-bench.lock nice -n 5 python bench/bench_engine_step.py \
        --onnx dense=DIR --onnx "nsvd-i 0.4"=DIR --out bench/results/engine_step.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from nsvd_lm.names import portable_text

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the history of the city of Rome from its founding to the fall of the empire.",
    "Write a detailed recipe for sourdough bread, with every step explained.",
    "Tell me everything you know about the planets of the solar system, one by one.",
    "Write an essay on why people should learn to play a musical instrument.",
    "Describe a journey across the Atlantic Ocean on a sailing ship in the 18th century.",
    "Explain how the internet works, from cables to web pages, for a beginner.",
]


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def profile(lm, batch: int, steps: int) -> dict:
    from nsvd_lm.serve.engine import GenSequence
    from nsvd_lm.serve.ort_engine import OrtEngine

    engine = OrtEngine(lm, max_seqs=batch, max_tokens_in_flight=1 << 20)
    engine.eos_token_ids = set()  # every row runs to `steps` tokens (see the module docstring)
    seqs = [
        GenSequence(prompt_tokens=chat_ids(lm.tokenizer, PROMPTS[i % len(PROMPTS)]), max_tokens=steps, stream_text=True)
        for i in range(batch)
    ]
    for s in seqs:
        s.sink = lambda seq, kind, payload: None
    engine.submit(seqs)
    model, total = [], []
    while True:
        before = dict(engine.counters)
        rows_before = len(engine._running)
        if not engine.step():
            break
        prefilled = engine.counters["prefill_tokens"] != before["prefill_tokens"]
        if rows_before == batch and len(engine._running) == batch and not prefilled:
            total.append(engine.counters["decode_step_s"] - before["decode_step_s"])
            model.append(engine.counters["decode_model_s"] - before["decode_model_s"])
    assert all(s.finish_reason == "length" and len(s.tokens) == steps for s in seqs), "a row did not run to the end"
    return {"step_s": total, "model_s": model}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--onnx", action="append", default=[], metavar="NAME=DIR", help="an exported folder (repeatable)"
    )
    parser.add_argument("--batches", default="1,8,16", help="batch sizes (default 1,8,16)")
    parser.add_argument("--steps", type=int, default=48, help="tokens per row (default 48)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "engine_step.md"))
    args = parser.parse_args()
    if not args.onnx:
        parser.error("give at least one --onnx NAME=DIR")
    batches = [int(b) for b in args.batches.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from nsvd_lm.serve.runtime import OnnxCausalLM

    models = {}
    for spec in args.onnx:
        name, _, folder = spec.partition("=")
        if not (Path(folder) / "model.onnx").is_file():
            parser.error(f"--onnx {spec}: {folder} has no model.onnx")
        models[name] = OnnxCausalLM(folder, provider="cpu", intra_op_threads=args.threads)
    samples = {(n, b): {"step_s": [], "model_s": []} for n in models for b in batches}
    start = time.perf_counter()
    for name, lm in models.items():  # warm-up: ORT kernels and the allocator at every shape
        for b in batches:
            profile(lm, b, 4)
    for r in range(args.rounds):
        for name, lm in models.items():
            for b in batches:
                got = profile(lm, b, args.steps)
                for k in got:
                    samples[(name, b)][k] += got[k]
                print(f"[bench] round {r + 1}: {name} batch {b}: {len(got['step_s'])} steps", flush=True)
    wall = time.perf_counter() - start

    rows = []
    for (name, b), s in samples.items():
        step = np.asarray(s["step_s"]) * 1e3
        model = np.asarray(s["model_s"]) * 1e3
        engine = step - model
        share = engine / step
        rows.append(
            {
                "model": name,
                "batch": b,
                "steps": int(step.size),
                "step_ms_median": float(np.median(step)),
                "model_ms_median": float(np.median(model)),
                "engine_ms_median": float(np.median(engine)),
                "engine_ms_p25_p75": [float(np.percentile(engine, 25)), float(np.percentile(engine, 75))],
                "engine_share_median": float(np.median(share)),
                "engine_share_p25_p75": [float(np.percentile(share, 25)), float(np.percentile(share, 75))],
                "tok_per_s_decode": float(b / np.median(step) * 1e3),
            }
        )
    import onnxruntime

    result = {
        "command": "python bench/bench_engine_step.py " + portable_text(" ".join(shlex.quote(a) for a in sys.argv[1:])),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "load_average_end": os.getloadavg()[0],
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "steps_per_row": args.steps,
        "rounds": args.rounds,
        "wall_s": wall,
        "rows": rows,
    }
    out = Path(args.out)
    lines = [
        "# One decode step of the ONNX Runtime engine: model time vs engine time (SmolLM2-135M, CPU)",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"Machine: {result['machine']}, shared with other jobs (load average at the end "
        f"{result['load_average_end']:.1f}); onnxruntime {result['onnxruntime']}, {args.threads} intra-op threads. "
        f"{args.rounds} interleaved rounds; per round and batch size B, B streaming greedy rows of "
        f"{args.steps} tokens (EOS off); only steps where all B rows decode are kept. "
        "model = inside `run_with_iobinding`; engine = the rest of the decode step. Medians (p25-p75).",
        "",
        "| model | batch | steps | step ms | model ms | engine ms | engine share | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["engine_share_p25_p75"]
        elo, ehi = r["engine_ms_p25_p75"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['steps']} | {r['step_ms_median']:.1f} | {r['model_ms_median']:.1f} "
            f"| {r['engine_ms_median']:.2f} ({elo:.2f}-{ehi:.2f}) | {100 * r['engine_share_median']:.1f}% "
            f"({100 * lo:.1f}-{100 * hi:.1f}%) | {r['tok_per_s_decode']:.1f} |"
        )
    lines += [""]
    for r in rows:
        if r["batch"] == 16:
            ok = r["engine_share_median"] <= 0.10
            lines.append(
                f"- {r['model']}, batch 16: engine time {100 * r['engine_share_median']:.1f}% of the step "
                f"(target <= 10%: {'met' if ok else 'NOT met'})."
            )
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out.with_suffix(".json"))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
