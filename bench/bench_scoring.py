"""Scoring throughput: lm-eval's ``nsvd_*`` perplexity scoring vs a bare ``model(x)`` forward.

Both run over the very same windows (the documents of one ``nsvd_*`` task, the tokens lm-eval
feeds: the model's prefix token + the window, minus the last token), in the same process, on the
same model object, with the same torch thread count:

* ``bare``: ``model(input_ids)`` under ``torch.inference_mode``, one window at a time, logits
  discarded: the floor any scorer has to pay.
* ``lm_eval``: ``lm_eval.simple_evaluate(model=HFLM-instance, tasks=[task], samples=...)``, i.e.
  what ``lm_eval --model nsvd`` / ``nsvd-lm sweep`` do per configuration (tokenization, request
  building, log-softmax over the vocabulary, metric aggregation included);
* ``task building``: the part of that which does not depend on how many windows are scored (the
  task's documents: every window of the set cut and round-trip checked), timed alone and
  subtracted for the per-window ratio (``nsvd-lm sweep`` now pays it once per sweep, not once per
  configuration: ``bench/bench_task_building.py``);
* ``lm_eval, half the windows``: the same call on the first half of the windows; the difference
  to the full call is what lm-eval costs per window (the slope), the rest a fixed cost per call
  (task building, requests, the environment report lm-eval writes into every results file);
* ``bare + scoring math``: the bare forward plus what lm-eval does with its logits per window
  (``log_softmax`` over the vocabulary at every position, ``argmax`` for the greedy check, the
  ``gather`` of the window's tokens): where the per-window overhead goes.

Rounds alternate (bare, lm-eval, bare, lm-eval ...) so drift on a shared machine hits both; the
fastest round of each is kept. Prints one JSON object; ``--out`` also writes it (atomically).

    OMP_NUM_THREADS=1 python bench/bench_scoring.py --windows 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--task", default="nsvd_wikitext2")
    parser.add_argument("--windows", type=int, default=8, help="windows scored per round")
    parser.add_argument("--max-length", type=int, default=1024, help="window length (tokens)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import lm_eval
    import torch

    from nsvd_lm.experiments.sweep import _task_manager, spread_indices
    from nsvd_lm.lmeval.adapter import NSVDLM
    from nsvd_lm.names import portable_path
    from nsvd_lm.smollm2 import smollm2_path

    model_path = args.model or str(smollm2_path())
    metadata = {"pretrained": model_path, "max_length": args.max_length}
    manager = _task_manager([args.task], None, metadata)
    lm = NSVDLM(
        pretrained=model_path,
        dtype="float32",
        device="cpu",
        batch_size=args.batch_size,
        max_length=args.max_length,
        progress=False,
    )
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([args.task], manager)[args.task]
    docs = list(task.eval_docs)
    indices = spread_indices(len(docs), args.windows)
    # lm-eval's request for a doc: empty context → [prefix token], continuation = the window's tokens.
    prefix = lm.prefix_token_id
    inputs = []
    for i in indices:
        ids = lm.tok_encode(task.doc_to_target(docs[i]))
        inputs.append(torch.tensor([prefix, *ids][:-1]).unsqueeze(0))
    scored_tokens = sum(int(x.shape[1]) for x in inputs)

    def bare() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for x in inputs:
                lm.model(x)
        return time.perf_counter() - started

    targets = []
    for x in inputs:
        targets.append(torch.tensor([*x[0, 1:].tolist(), 0]).view(1, -1, 1))  # any ids: the cost is the same

    def bare_with_scoring_math() -> float:
        import torch.nn.functional as F

        started = time.perf_counter()
        with torch.no_grad():
            for x, target in zip(inputs, targets):
                logprobs = F.log_softmax(lm.model(x).logits, dim=-1)
                logprobs.argmax(dim=-1)
                torch.gather(logprobs, 2, target).sum()
        return time.perf_counter() - started

    def task_building() -> float:  # what simple_evaluate pays per task before scoring anything
        started = time.perf_counter()
        get_task_dict([args.task], manager)
        return time.perf_counter() - started

    def scored(chosen: list[int] = indices) -> float:
        started = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[args.task], task_manager=manager, samples={args.task: chosen}, log_samples=False
        )
        elapsed = time.perf_counter() - started
        assert results["results"][args.task]["n_windows,none"] == len(chosen)
        return elapsed

    half = indices[: max(1, len(indices) // 2)]

    bare_s, scored_s, build_s, math_s, half_s = [], [], [], [], []
    for _ in range(args.rounds):
        bare_s.append(bare())
        scored_s.append(scored())
        build_s.append(task_building())
        math_s.append(bare_with_scoring_math())
        half_s.append(scored(half))
    best_bare, best_scored, best_build, best_math = min(bare_s), min(scored_s), min(build_s), min(math_s)
    per_window = (best_scored - min(half_s)) / (len(indices) - len(half)) if len(indices) > len(half) else None
    report = {
        "model": portable_path(model_path),
        "task": args.task,
        "windows": len(indices),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "tokens_per_round": scored_tokens,
        "torch_threads": torch.get_num_threads(),
        "bare_forward_seconds": [round(s, 3) for s in bare_s],
        "lm_eval_seconds": [round(s, 3) for s in scored_s],
        "bare_forward_tokens_per_s": round(scored_tokens / best_bare, 1),
        "lm_eval_tokens_per_s": round(scored_tokens / best_scored, 1),
        "lm_eval_over_bare_time": round(best_scored / best_bare, 3),
        # The task's documents are built once per simple_evaluate call (a fixed cost per task and
        # configuration); what scoring adds per window is the rest.
        "task_building_seconds": [round(s, 3) for s in build_s],
        "lm_eval_scoring_only_over_bare_time": round((best_scored - best_build) / best_bare, 3),
        # The bare forward plus lm-eval's per-window math on its logits (log_softmax, argmax, gather).
        "bare_plus_scoring_math_seconds": [round(s, 3) for s in math_s],
        "bare_plus_scoring_math_over_bare_time": round(best_math / best_bare, 3),
        # Slope and intercept from the full and the half call: lm-eval's cost per window, and per call.
        "lm_eval_half_windows_seconds": [round(s, 3) for s in half_s],
        "lm_eval_seconds_per_window": None if per_window is None else round(per_window, 3),
        "lm_eval_per_window_over_bare": None
        if per_window is None
        else round(per_window / (best_bare / len(indices)), 3),
        "lm_eval_fixed_seconds_per_call": None
        if per_window is None
        else round(best_scored - per_window * len(indices), 3),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
