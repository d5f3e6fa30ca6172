"""The protocol's wall time, estimated from what is left to score and the measured unit costs.

``bench/protocol.sh estimate`` prints every stage's command line instead of running it (a plan
file); this parses each sweep's arguments with the sweep's own CLI parser and grid
(``build_grid``, ``spread_indices`` over the sets' window counts of a committed full run) and
prices what a run into an empty folder would do:

* a scored window: lm-eval's time per 1024-token window, ``scoring_throughput.json`` (``bench/bench_scoring.py``:
  the slope between a full and a half call; its fixed cost per call, less the task building a
  sweep does once, is charged per configuration);
* a recompression with ``--reuse-svd``: the median ``compression_seconds`` of the committed results
  that read their statistics from the cache; a calibration (one per seed): the median of those that
  computed them;
* allocation curves (once per criterion, method and seed, then cached for every ratio): the largest
  ``curve_seconds`` each method's committed fisher results recorded;
* the similarity analysis: ``SIMILARITY_SECONDS`` per seed (the 2026-12-02 run, README);
* the adaptive pass: its budget per worker (``ADAPT_BUDGET_S``; it starts no top-up beyond it).

Each worker's sweeps run one after the other on one core; the two workers run at once, so the
first pass costs the longer worker; the adaptive pass runs after it, one half per worker.

    python bench/protocol_estimate.py PLAN --sweeps bench/results/protocol/sweeps [--adapt-budget 1500]
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIMILARITY_SECONDS = 300.0  # one similarity run (16 x 512 tokens x 8 sets), bench/results/protocol/README.md
TABLES_SECONDS = 60.0  # three leaderboards with 2000-resample bootstraps


def unit_costs() -> dict[str, float]:
    """Seconds per window, recompression, calibration, and curves per method, from committed measurements."""
    scoring = json.loads((RESULTS / "protocol" / "scoring_throughput.json").read_text())
    if scoring.get("lm_eval_seconds_per_window"):  # the slope of a full and a half call
        window = scoring["lm_eval_seconds_per_window"]
        # lm-eval's fixed cost per call, less the task building a sweep now does once
        call = max(0.0, scoring["lm_eval_fixed_seconds_per_call"] - min(scoring["task_building_seconds"]))
    else:  # issue 9's measurement: every second not spent building the task, per window
        window = (min(scoring["lm_eval_seconds"]) - min(scoring["task_building_seconds"])) / scoring["windows"]
        call = 0.0
    cached, computed = [], []
    for path in glob.glob(str(RESULTS / "protocol" / "sweeps" / "*" / "*.json")):
        block = json.loads(Path(path).read_text())["config"].get("compression") or {}
        if block.get("compression_seconds") and block.get("stats_cache_hit") is True:
            cached.append(block["compression_seconds"])
        elif block.get("compression_seconds") and block.get("stats_cache_hit") is False:
            computed.append(block["compression_seconds"] - (block.get("seconds") or {}).get("decomposition", 0.0))
    curves: dict[str, float] = {}
    for path in glob.glob(str(RESULTS / "rank_allocation" / "sweeps" / "fisher" / "*.json")):
        block = json.loads(Path(path).read_text())["config"]["compression"]
        seconds = (block.get("allocation") or {}).get("curve_seconds")
        if seconds:
            curves[block["method"]] = max(curves.get(block["method"], 0.0), float(seconds))
    return {
        "window": window,
        "call": call,
        "compress": statistics.median(cached),
        "calibration": statistics.median(computed),
        **{f"curves {m}": s for m, s in sorted(curves.items())},
    }


def read_plan(path: Path) -> dict[str, list[tuple[str, list[str]]]]:
    """section -> [(stage name, argv)] from ``bench/protocol.sh estimate``'s ``PLAN`` lines."""
    plan: dict[str, list[tuple[str, list[str]]]] = {}
    section = "?"
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            plan.setdefault(section, [])
        elif line.startswith("PLAN\t"):
            _, name, command = line.split("\t", 2)
            plan.setdefault(section, []).append((name, shlex.split(command)))
    return plan


def set_sizes() -> dict[str, int]:
    """Windows per set at the protocol's window length, from a committed full-protocol results file."""
    data = json.loads((RESULTS / "protocol" / "sweeps" / "headline" / "original.json").read_text())
    return {task: int(r["n_windows_full,none"]) for task, r in data["results"].items() if "n_windows_full,none" in r}


def sweep_jobs(argv: list[str], sizes: dict[str, int]) -> list[dict]:
    """What ``nsvd-lm sweep ARGV`` would run in an empty folder: one entry per configuration (the CLI's own parser
    and grid; windows per task ``len(spread_indices(set, count))``)."""
    import argparse

    from nsvd_lm.commands import sweep as sweep_command
    from nsvd_lm.experiments.sweep import build_grid, parse_list, parse_windows, result_name, spread_indices

    parser = argparse.ArgumentParser()
    sweep_command.register(parser.add_subparsers())
    args = parser.parse_args(argv[1:])  # argv[0] is "nsvd-lm"
    points = build_grid(
        parse_list(args.methods),
        parse_list(args.ratios, float),
        parse_list(args.k1_fracs, float) or None,
        args.include_original,
    )
    seeds = parse_list(args.seeds, int) if args.seeds else [None]
    windows = parse_windows(args.windows) if args.windows else {}
    counts = {t: len(spread_indices(n, windows.get(t, windows.get("*", n)))) for t, n in sizes.items()}
    allocation = dict(kv.split("=", 1) for kv in args.model_args.split(",") if "=" in kv).get("rank_allocation")
    jobs = []
    for seed in seeds:
        for point in points:
            if point.method is None and seed != seeds[0]:
                continue
            jobs.append(
                {
                    "name": result_name(point, seed),
                    "method": point.method,
                    "seed": seed or 3,
                    "allocation": allocation or "uniform",
                    "windows": sum(counts.values()),
                }
            )
    return jobs


def price(stages: list[tuple[str, list[str]]], costs: dict[str, float], sizes: dict[str, int], seen: set) -> dict:
    """Windows, recompressions, calibrations, curves and similarity runs of one worker, and their seconds."""
    windows = compressions = calibrations = curve_seconds = similarity = calls = 0.0
    for name, argv in stages:
        if name.startswith("similarity"):
            similarity += 1
            continue
        if not name.startswith("sweep"):
            continue
        for job in sweep_jobs(argv, sizes):
            windows += job["windows"]
            calls += 1
            if job["method"] is None:
                continue
            compressions += 1
            if ("calibration", job["seed"]) not in seen:
                seen.add(("calibration", job["seed"]))
                calibrations += 1
            key = (job["allocation"], job["method"], job["seed"])
            if job["allocation"] != "uniform" and f"curves {job['method']}" in costs and key not in seen:
                seen.add(key)
                curve_seconds += costs[f"curves {job['method']}"]
    seconds = (
        windows * costs["window"]
        + calls * costs["call"]
        + compressions * costs["compress"]
        + calibrations * costs["calibration"]
        + curve_seconds
        + similarity * SIMILARITY_SECONDS
    )
    return {
        "windows": windows,
        "compressions": compressions,
        "calibrations": calibrations,
        "curve_seconds": curve_seconds,
        "similarity_runs": similarity,
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--sweeps", type=Path, default=None, help="(unused; recorded)")
    parser.add_argument("--adapt-budget", type=float, default=1500.0, help="adaptive pass budget per worker, s")
    parser.add_argument("--json", type=Path, default=None, help="also write the estimate here")
    args = parser.parse_args()

    costs = unit_costs()
    sizes = set_sizes()
    plan = read_plan(args.plan)
    seen: set = set()
    workers = {w: price(s, costs, sizes, seen) for w, s in plan.items() if w.startswith("worker")}
    first = max(w["seconds"] for w in workers.values())
    total = first + args.adapt_budget + TABLES_SECONDS
    print("unit costs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    for name, w in workers.items():
        print(
            f"{name}: {w['windows']:.0f} windows, {w['compressions']:.0f} compressions, {w['calibrations']:.0f} "
            f"calibrations, {w['curve_seconds']:.0f} s of curves, {w['similarity_runs']:.0f} similarity runs "
            f"-> {w['seconds'] / 3600:.2f} h"
        )
    print(
        f"first pass {first / 3600:.2f} h (the longer worker) + adaptive pass <= {args.adapt_budget / 3600:.2f} h "
        f"+ tables {TABLES_SECONDS / 60:.0f} min = {total:.0f} s = {total / 3600:.2f} h wall (target 10,800 s)"
    )
    if args.json:
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(
            args.json,
            {
                "unit_costs_s": costs,
                "workers": workers,
                "first_pass_s": first,
                "adapt_budget_s": args.adapt_budget,
                "total_s": total,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
