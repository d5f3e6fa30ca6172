"""Window counts for the leaderboard protocol, from a pilot sweep (bench/protocol.sh).

The pilot scores NSVD-I and ASVD-I on a few windows per set (``nsvd-lm sweep --windows '*=8'``).
For each set and ratio, the paired bootstrap CI of NSVD-I vs ASVD-I on those n windows has a
half-width h (percentage points); a CI's half-width shrinks like 1/sqrt(windows), so the windows
that give the target half-width T are about ``n (h / T)²``. A small pilot underestimates the
spread (percentile bootstrap on 8 windows), hence ``--margin``. Per set the count is the largest
over the pilot's ratios, capped at the set's size.

    python bench/protocol_pilot.py PILOT_DIR [--target 5] [--margin 1.5]

Prints a table and the ``HEADLINE_WINDOWS`` value for bench/protocol.sh.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CELL_KEYS = ("task", "ratio", "change_pct", "ci_low", "ci_high", "half_width", "windows", "wanted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pilot", type=Path)
    parser.add_argument("--target", type=float, default=5.0, help="target CI half-width, percentage points")
    parser.add_argument("--margin", type=float, default=1.5, help="factor on the extrapolated window count")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    from nsvd_lm.experiments.leaderboard import load_results
    from nsvd_lm.experiments.paired import paired_change

    entries = load_results(args.pilot)
    by = {(e.method, e.ratio): e for e in entries if e.method is not None}
    ratios = sorted({r for m, r in by if m == "nsvd-i" and ("asvd-i", r) in by})
    if not ratios:
        raise SystemExit(f"{args.pilot}: no nsvd-i / asvd-i pair at one ratio")
    totals: dict[str, int] = {}
    for path in sorted(args.pilot.glob("*.json")):
        for task, res in (json.loads(path.read_text()).get("results") or {}).items():
            if "n_windows_full,none" in res:
                totals[task] = int(res["n_windows_full,none"])
    rows, counts = [], {}
    for task in sorted(totals):
        need = 1
        for ratio in ratios:
            x, b = by[("nsvd-i", ratio)], by[("asvd-i", ratio)]
            if task not in x.windows or task not in b.windows:
                continue
            ci = paired_change(x.windows[task], b.windows[task])
            half = (ci.high - ci.low) / 2
            want = math.ceil(args.margin * ci.n_windows * (half / args.target) ** 2)
            need = max(need, want)
            rows.append((task, ratio, ci.estimate, ci.low, ci.high, half, ci.n_windows, want))
        counts[task] = min(need, totals[task])
    print(f"{'set':22} {'ratio':>5} {'change %':>9} {'CI':>20} {'half':>6} {'n':>3} {'wanted':>6}")
    for task, ratio, est, low, high, half, n, want in rows:
        print(f"{task:22} {ratio:5g} {est:+9.1f} [{low:+8.1f}, {high:+8.1f}] {half:6.1f} {n:3d} {want:6d}")
    print()
    for task, count in counts.items():
        print(f"{task:22} {count:4d} of {totals[task]}" + ("  (whole set)" if count == totals[task] else ""))
    print("HEADLINE_WINDOWS=" + ",".join(f"{t}={c}" for t, c in counts.items()))
    if args.json:
        from nsvd_lm.files import write_json_atomic

        write_json_atomic(
            args.json,
            {
                "target_half_width_pct": args.target,
                "margin": args.margin,
                "cells": [dict(zip(CELL_KEYS, r)) for r in rows],
                "windows": counts,
                "set_sizes": totals,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
