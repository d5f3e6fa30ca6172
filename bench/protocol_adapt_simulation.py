"""What the adaptive pass would do after a cheap first pass, replayed on the committed windows.

The committed Table 1 runs (``sweeps/headline``, ``seed4``, ``seed5``) scored nested windows
(``spread_indices``), so any smaller count's windows are a subset of them, with their scores.
This replays the protocol: a first pass of ``--first`` windows per set (the committed files cut
down to those windows), then ``nsvd_lm.experiments.adaptive.classify`` round by round, each open
cell's runs given their next count *from the committed windows* (a count beyond what was
committed is capped there and flagged), and prices every round with the adaptive pass's cost
model (windows x ``WINDOW_SECONDS`` + one recompression per file). Nothing is scored.

    python bench/protocol_adapt_simulation.py [--first 4] [--ratios 0.1,0.2,0.3] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

from nsvd_lm.experiments.adaptive import COMPRESS_SECONDS, WINDOW_SECONDS, classify, requests_for
from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results
from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores
from nsvd_lm.experiments.sweep import spread_indices
from nsvd_lm.experiments.window_results import stored_scores, window_index

SWEEPS = Path(__file__).resolve().parent / "results" / "protocol" / "sweeps"
KEY = WINDOW_SCORES_METRIC + ",none"


def cut(data: dict, counts: dict[str, int]) -> dict:
    """The results with each task's windows cut to ``spread_indices(set, count)`` (a nested subset)."""
    out = copy.deepcopy(data)
    for task, results in out["results"].items():
        scores = stored_scores(results)
        if scores is None or task not in counts:
            continue
        keep_index = set(spread_indices(int(results["n_windows_full,none"]), counts[task]))
        rows = [i for i, w in enumerate(scores.ids) if window_index(w) in keep_index]
        kept = WindowScores(tuple(scores.ids[i] for i in rows), scores.nll[rows], scores.tokens[rows])
        results[KEY] = kept.to_dict()
        results["token_perplexity,none"] = kept.ppl
        results["n_windows,none"] = kept.n_windows
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=4, help="first-pass windows per set")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--methods", default="nsvd-i")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    originals = {}
    for part in ("headline", "seed4", "seed5"):
        for path in sorted((SWEEPS / part).glob("*.json")):
            originals[f"{part}/{path.name}"] = json.loads(path.read_text())
    committed = {
        name: {t: stored_scores(r).n_windows for t, r in data["results"].items() if stored_scores(r) is not None}
        for name, data in originals.items()
    }
    counts = {name: {t: min(args.first, n) for t, n in c.items()} for name, c in committed.items()}
    ratios = [float(r) for r in args.ratios.split(",")]
    rounds, capped = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for index in range(args.rounds + 1):
            for name, data in originals.items():
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(cut(data, counts[name])))
            entries = load_results(root)
            cells = classify(build_leaderboard(entries), entries, methods=args.methods.split(","), ratios=ratios)
            statuses = {}
            for cell in cells:
                statuses[cell.status] = statuses.get(cell.status, 0) + 1
            requests = requests_for(cells)
            if index == args.rounds or not requests:
                break
            windows = files = 0
            for path, wanted in requests.items():
                name = str(Path(path).relative_to(root))
                files += 1
                for task, count in wanted.items():
                    if count > committed[name][task]:
                        capped.add((name, task, count))
                    new = min(count, committed[name][task])
                    windows += max(0, new - counts[name][task])
                    counts[name][task] = max(counts[name][task], new)
            seconds = windows * WINDOW_SECONDS + files * COMPRESS_SECONDS
            rounds.append(
                {
                    "round": index + 1,
                    "statuses": statuses,
                    "files": files,
                    "windows": windows,
                    "seconds": round(seconds, 1),
                }
            )
        final = [
            {
                "ratio": c.ratio,
                "label": c.label,
                "task": c.task,
                "status": c.status,
                "n_windows": c.n_windows,
                "estimate": round(c.estimate, 2),
                "low": round(c.low, 2),
                "high": round(c.high, 2),
            }
            for c in cells
        ]
    first_windows = sum(min(args.first, n) for c in committed.values() for n in c.values())
    report = {
        "first_pass_windows_per_set": args.first,
        "first_pass_windows_uniform_rows": first_windows,
        "rounds": rounds,
        "adaptive_seconds": round(sum(r["seconds"] for r in rounds), 1),
        "final_statuses": {s: sum(1 for c in final if c["status"] == s) for s in {c["status"] for c in final}},
        "capped_at_committed": sorted(f"{n} {t} wanted {c}" for n, t, c in capped),
        "cells": final,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "cells"}, indent=1))
    if args.json:
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
