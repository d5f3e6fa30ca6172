"""The protocol's wall time, estimated from what is left to score and the measured unit costs.

``bench/protocol.sh estimate`` dry-runs every sweep of both workers (``nsvd-lm sweep --dry-run``:
the windows per task and the recompressions still to do) and writes their JSON to a plan file;
this reads it and prices it:

* a scored window: lm-eval's time per 1024-token window, ``scoring_throughput.json`` (``bench/bench_scoring.py``:
  the fastest round less the task building, per window);
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
import re
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIMILARITY_SECONDS = 300.0  # one similarity run (16 x 512 tokens x 8 sets), bench/results/protocol/README.md
TABLES_SECONDS = 60.0  # three leaderboards with 2000-resample bootstraps


def unit_costs() -> dict[str, float]:
    """Seconds per window, recompression, calibration, and curves per method, from committed measurements."""
    scoring = json.loads((RESULTS / "protocol" / "scoring_throughput.json").read_text())
    window = (min(scoring["lm_eval_seconds"]) - min(scoring["task_building_seconds"])) / scoring["windows"]
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
        "compress": statistics.median(cached),
        "calibration": statistics.median(computed),
        **{f"curves {m}": s for m, s in sorted(curves.items())},
    }


def read_plan(path: Path) -> dict[str, list[dict]]:
    """worker -> the dry-run JSON of each of its sweeps (``## worker a`` headers, then sweep output)."""
    text = path.read_text()
    decoder = json.JSONDecoder()
    plan: dict[str, list[dict]] = {}
    worker = "?"
    position = 0
    for match in re.finditer(r"^## (.+)$|^\{", text, flags=re.M):
        if match.start() < position:
            continue
        if match.group(1):
            worker = match.group(1).strip()
            plan.setdefault(worker, [])
            continue
        data, end = decoder.raw_decode(text, match.start())
        position = end
        if isinstance(data, dict) and "planned" in data:
            plan.setdefault(worker, []).append(data)
    return plan


def price(sweeps: list[dict], costs: dict[str, float], seen: set) -> dict[str, float]:
    """windows, recompressions, calibrations and curve measurements of one worker's sweeps, and their seconds."""
    windows = compressions = calibrations = curve_seconds = 0.0
    for sweep in sweeps:
        for name, job in sweep["planned"].items():
            windows += sum(job["windows"].values())
            if not job["compress"]:
                continue
            compressions += 1
            seed = re.search(r"_s(\d+)$", name)
            seed = seed.group(1) if seed else "3"
            if ("calibration", seed) not in seen:
                seen.add(("calibration", seed))
                calibrations += 1
            allocation = Path(sweep["output"]).name
            method = name.split("_r")[0]
            if (
                allocation not in ("headline", "reduced", "collapse", "table3", "table4")
                and f"curves {method}" in costs
            ):
                key = (allocation, method, seed)
                if key not in seen:
                    seen.add(key)
                    curve_seconds += costs[f"curves {method}"]
    seconds = (
        windows * costs["window"]
        + compressions * costs["compress"]
        + calibrations * costs["calibration"]
        + curve_seconds
    )
    return {
        "windows": windows,
        "compressions": compressions,
        "calibrations": calibrations,
        "curve_seconds": curve_seconds,
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("--sweeps", type=Path, default=None, help="(unused; recorded)")
    parser.add_argument("--adapt-budget", type=float, default=1500.0, help="adaptive pass budget per worker, s")
    parser.add_argument("--similarity-runs", type=int, default=3, help="similarity runs (on worker b)")
    parser.add_argument("--json", type=Path, default=None, help="also write the estimate here")
    args = parser.parse_args()

    costs = unit_costs()
    plan = read_plan(args.plan)
    seen: set = set()
    workers = {w: price(s, costs, seen) for w, s in plan.items() if w.startswith("worker")}
    if "worker b" in workers:
        workers["worker b"]["seconds"] += args.similarity_runs * SIMILARITY_SECONDS
    first = max(w["seconds"] for w in workers.values())
    total = first + args.adapt_budget + TABLES_SECONDS
    print("unit costs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    for name, w in workers.items():
        print(
            f"{name}: {w['windows']:.0f} windows, {w['compressions']:.0f} compressions, {w['calibrations']:.0f} "
            f"calibrations, {w['curve_seconds']:.0f} s of curves -> {w['seconds'] / 3600:.2f} h"
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
