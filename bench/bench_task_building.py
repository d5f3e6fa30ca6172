"""What building the ``nsvd_*`` tasks costs, once per sweep now instead of once per configuration.

Before issue 22 every configuration of a sweep called ``simple_evaluate`` with task *names*, so
lm-eval built each task again: the set read, tokenized with the model's tokenizer, cut into
windows and every window's round trip checked. ``nsvd-lm sweep`` now builds the tasks once
(``sweep.build_tasks``) and hands the built objects to every configuration. This times that
build (the saving per configuration after the first) and checks that building again gives the
same documents.

    OMP_NUM_THREADS=1 python bench/bench_task_building.py [--tasks nsvd_ppl] [--rounds 2] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--tasks", default="nsvd_ppl")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from nsvd_lm.experiments.sweep import _task_manager, build_tasks
    from nsvd_lm.names import portable_path
    from nsvd_lm.smollm2 import smollm2_path

    model = args.model or str(smollm2_path())
    tasks = args.tasks.split(",")
    manager = _task_manager(tasks, None, {"pretrained": model, "max_length": args.max_length})
    seconds, per_task, documents = [], {}, None
    for _ in range(args.rounds):
        started = time.perf_counter()
        built = build_tasks(tasks, manager)
        seconds.append(time.perf_counter() - started)
        ids = {name: [d["window_id"] for d in task.eval_docs] for name, task in built.leaves.items()}
        assert documents is None or ids == documents, "building again gave other windows"
        documents = ids
    for name in built.leaves:  # each leaf alone, for the per-set cost
        started = time.perf_counter()
        build_tasks([name], manager)
        per_task[name] = round(time.perf_counter() - started, 3)
    report = {
        "model": portable_path(model),
        "tasks": tasks,
        "max_length": args.max_length,
        "windows": {name: len(w) for name, w in documents.items()},
        "build_seconds": [round(s, 3) for s in seconds],
        "build_seconds_per_task": per_task,
        "saved_per_configuration_seconds": round(min(seconds), 3),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
