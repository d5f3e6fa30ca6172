"""Paired comparisons behind bench/results/README.md that Table 1 does not print (issue 9).

Table 1 compares NSVD/NID rows with the best ASVD baseline. The point-by-point comparison with
the paper also claims "ASVD-II equals ASVD-I" and "NSVD-II equals NSVD-I"; this prints those
pairs per ratio and set: the relative perplexity change with its paired bootstrap 95 % CI on the
windows both runs scored (the same machinery as the leaderboard), and the largest |change|.

    python bench/protocol_claims.py [bench/results/protocol/sweeps]
"""

from __future__ import annotations

import sys
from pathlib import Path

from nsvd_lm.experiments.leaderboard import load_results
from nsvd_lm.experiments.paired import paired_change

PAIRS = (("asvd-ii", "asvd-i"), ("nsvd-ii", "nsvd-i"))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/protocol/sweeps")
    entries = [e for part in ("headline", "reduced") for e in load_results(root / part)]
    runs = {(e.method, e.ratio): e for e in entries if e.seed in (None, 3)}
    for x, base in PAIRS:
        print(f"## {x} vs {base} (seed 3): change % [95 % CI], shared windows")
        largest = 0.0
        for ratio in sorted({r for m, r in runs if m == x}):
            if (base, ratio) not in runs:
                continue
            cells = []
            for task, scores in sorted(runs[(x, ratio)].windows.items()):
                other = runs[(base, ratio)].windows.get(task)
                change = paired_change(scores, other) if other is not None else None
                if change is None:
                    continue
                largest = max(largest, abs(change.estimate))
                mark = "*" if change.significant else ""
                cells.append(
                    f"{task.removeprefix('nsvd_')} {change.estimate:+.4f} [{change.low:+.3f}, {change.high:+.3f}]"
                    f"{mark} ({change.n_windows} w)"
                )
            print(f"ratio {ratio:g}: " + "; ".join(cells))
        print(f"largest |change|: {largest:.4f} %  (* = CI excludes 0)\n")


if __name__ == "__main__":
    main()
