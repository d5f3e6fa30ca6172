"""The adaptive window budget (issue 22): more windows only where a leaderboard cell is still open.

After a first pass (every row scored on a few windows per set), each selected leaderboard cell
(an NSVD/NID row's paired CI against its best baseline, per set) is one of

A cell on fewer than ``min_windows`` windows (and a set that has more) is ``open`` whatever its CI
says: a percentile bootstrap over a handful of windows is too optimistic to decide or to tie
on (a first pass of 4 windows is a screen, not a verdict). Otherwise a cell is

* ``decided``: the CI excludes 0;
* ``narrow``: it contains 0 but its half-width is within the target (±5 points): a measured tie;
* ``exhausted``: it is neither, and every window of the set is scored already (marked in the report
  and the table: the set cannot say more);
* ``seed-limited``: it is neither, and the calibration seeds' spread alone is wider than the
  target: the windows-only half-width (seeds held fixed, ``paired.paired_change(...,
  resample_seeds=False)``) leaves more than the target for the seed part,
  ``sqrt(h² - h_windows²) > target``, so no number of windows can bring the cell to the target
  (more seeds could); not extended. The report gives ``seeds_wanted``: the calibration seeds the
  cell would need with every window of the set scored (``seeds_needed``: the seed part shrinks
  like 1/sqrt(seeds), the windows part like 1/sqrt(windows)), or None where even that cannot do it;
* ``open``: more windows are wanted: a half-width shrinks like 1/sqrt(windows), so the next
  count is ``margin · n · h_windows² / (target² - h_seeds²)`` (at least ``n + n/4 + 1``,
  at most the set), the same extrapolation as the protocol's pilot.

A time budget (``budget_seconds``) bounds the pass: each round the open cells are taken cheapest
first (``cell_cost``: the windows to add times ``window_seconds``, plus one recompression per
file) while the budget lasts; the rest stay ``open`` and are reported so.

An open cell's X runs and baseline runs (every calibration seed) all get the new count
(``sweep.extend_results``: ``spread_indices`` is nested, so the added windows extend every run's
windows alike and the cell stays paired window by window). Then the table is rebuilt and the
cells re-read, until none is open or ``max_rounds`` is reached (what is still open then is
reported as such). The results files are the state: a killed pass resumes where it stopped,
rerun with the same arguments (finished top-ups are not redone).

``adapt`` returns, and writes as JSON (atomically, after every round), each cell's status.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nsvd_lm.config import CompressionConfig, canonical_method
from nsvd_lm.experiments.leaderboard.rows import seed_pairs
from nsvd_lm.experiments.paired import paired_change
from nsvd_lm.files import write_json_atomic

# The rule's rows by default: the paper's main method, the one `method` defaults to.
DEFAULT_METHODS: tuple[str, ...] = (CompressionConfig().method,)

logger = logging.getLogger(__name__)

TARGET_HALF_WIDTH = 5.0  # percentage points (issue 22)
# Cost model of a top-up on SmolLM2-135M, one CPU thread (bench/results/protocol/README.md):
# lm-eval scores a 1024-token window in ~5.4 s; a configuration recompresses in ~50 s (--reuse-svd).
WINDOW_SECONDS = 5.4
COMPRESS_SECONDS = 50.0
MARGIN = 1.5  # on the extrapolated count: a few windows' percentile CI is optimistic (the pilot's factor)
MAX_ROUNDS = 4
MIN_WINDOWS = 8  # no cell is decided on fewer windows (the pilot's count)
STATUSES = ("decided", "narrow", "exhausted", "seed-limited", "open")
REPORT_FORMAT = "nsvd-lm-adaptive-v1"


@dataclass(frozen=True)
class Cell:
    """One leaderboard cell under the rule (improvement sign: + = the row has lower perplexity)."""

    ratio: float
    label: str
    task: str
    baseline: str
    estimate: float
    low: float
    high: float
    n_windows: int  # shared windows behind the CI
    set_windows: int  # windows in the whole set (a full run)
    n_seeds: int
    windows_half_width: float  # the CI's half-width with the seeds held fixed
    status: str
    wanted: int | None = None  # next window count (open cells)
    files: tuple[str, ...] = field(default=(), repr=False)  # X and baseline results files
    seeds_wanted: int | None = None  # seed-limited cells: calibration seeds needed on the whole set

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def next_count(n: int, total: int, half: float, windows_half: float, target: float, margin: float) -> int | None:
    """Windows the cell needs next, or None when windows cannot bring it to ``target`` (seed-limited)."""
    seed_part_sq = max(0.0, half**2 - windows_half**2)
    room = target**2 - seed_part_sq
    if room <= 0:
        return None
    want = math.ceil(margin * n * windows_half**2 / room)
    return min(total, max(want, n + n // 4 + 1))


def seeds_needed(n_seeds: int, n: int, total: int, half: float, windows_half: float, target: float) -> int | None:
    """Calibration seeds a seed-limited cell needs to reach ``target`` with all ``total`` windows scored.

    The interval's square half-width splits into a seed part and a windows part (``next_count``);
    with every window of the set the windows part is ``windows_half² · n / total``, and the seed
    part shrinks like 1/seeds: ``seeds · seed_part² / (target² - windows_part_full)``. None when
    the windows part alone, on the whole set, is wider than the target, or for a single seed
    (whose interval has no seed part to extrapolate).
    """
    if n_seeds < 2:
        return None
    seed_part_sq = max(0.0, half**2 - windows_half**2)
    room = target**2 - windows_half**2 * n / max(total, 1)
    if room <= 0:
        return None
    return max(n_seeds + 1, math.ceil(n_seeds * seed_part_sq / room))


def _set_windows(path: Path, task: str) -> int:
    data = json.loads(path.read_text(encoding="utf-8"))
    return int(data["results"][task]["n_windows_full,none"])


def _runs_by_row(entries: list[Any]) -> dict[tuple[float, str], dict[Any, Any]]:
    """(ratio, label) -> {seed: entry}, the newest file per seed winning (as the leaderboard chooses)."""
    runs: dict[tuple[float, str], dict[Any, Any]] = {}
    for entry in sorted(entries, key=lambda e: e.date):
        runs.setdefault((entry.ratio, entry.label), {})[entry.seed] = entry
    return runs


def classify(
    board: Any,
    entries: list[Any],
    *,
    methods: Iterable[str] | None = None,
    ratios: Iterable[float] | None = None,
    target: float = TARGET_HALF_WIDTH,
    margin: float = MARGIN,
    min_windows: int = MIN_WINDOWS,
    allocations: Iterable[str] | None = None,
) -> list[Cell]:
    """Every selected cell of ``board`` (``leaderboard.build_leaderboard`` of ``entries``) with its status.

    ``methods``, ``ratios``, ``allocations`` (the rows' ``rank_allocation``) select rows; None: all.
    """
    methods = set(methods) if methods is not None else None
    allocations = set(allocations) if allocations is not None else None
    ratios = {round(float(r), 6) for r in ratios} if ratios is not None else None
    runs = _runs_by_row(entries)
    cells: list[Cell] = []
    for row in board.rows:
        if row.method is None or not row.improvement_ci:
            continue
        if methods is not None and row.method not in methods:
            continue
        if ratios is not None and round(row.ratio, 6) not in ratios:
            continue
        x_runs = runs[(row.ratio, row.label)]
        if allocations is not None and next(iter(x_runs.values())).rank_allocation not in allocations:
            continue
        for task, ci in row.improvement_ci.items():
            base_runs = runs[(row.ratio, row.baselines[task])]
            pairs = seed_pairs(x_runs, base_runs)
            files = tuple(dict.fromkeys(str(e.path) for pair in pairs for e in pair))
            total = _set_windows(pairs[0][0].path, task)
            half = (ci.high - ci.low) / 2
            windows_only = paired_change(
                [x.windows[task] for x, _ in pairs], [b.windows[task] for _, b in pairs], resample_seeds=False
            )
            windows_half = (windows_only.high - windows_only.low) / 2 if windows_only else half
            wanted = seeds_wanted = None
            if ci.n_windows < min(min_windows, total):  # too few to say anything: at least min_windows
                status, wanted = "open", min(total, min_windows)
                if not ci.significant and half > target:  # and as many as a wide tie would want
                    wanted = max(wanted, next_count(ci.n_windows, total, half, windows_half, target, margin) or 0)
            elif ci.significant:
                status = "decided"
            elif half <= target:
                status = "narrow"
            elif ci.n_windows >= total:
                status = "exhausted"
            else:
                wanted = next_count(ci.n_windows, total, half, windows_half, target, margin)
                status = "open" if wanted is not None else "seed-limited"
                if wanted is None:
                    seeds_wanted = seeds_needed(ci.n_seeds, ci.n_windows, total, half, windows_half, target)
            cells.append(
                Cell(
                    ratio=row.ratio,
                    label=row.label,
                    task=task,
                    baseline=row.baselines[task],
                    estimate=ci.estimate,
                    low=ci.low,
                    high=ci.high,
                    n_windows=ci.n_windows,
                    set_windows=total,
                    n_seeds=ci.n_seeds,
                    windows_half_width=windows_half,
                    status=status,
                    wanted=wanted,
                    seeds_wanted=seeds_wanted,
                    files=files,
                )
            )
    return cells


def cell_cost(cell: Cell, window_seconds: float = WINDOW_SECONDS, compress_seconds: float = COMPRESS_SECONDS) -> float:
    """Estimated seconds to give an open cell its next count (every file behind it recompressed once)."""
    if cell.wanted is None:
        return 0.0
    return len(cell.files) * ((cell.wanted - cell.n_windows) * window_seconds + compress_seconds)


def affordable(
    cells: Iterable[Cell],
    budget_seconds: float | None,
    window_seconds: float = WINDOW_SECONDS,
    compress_seconds: float = COMPRESS_SECONDS,
) -> list[Cell]:
    """The open cells a budget pays for this round, cheapest first (all of them without a budget)."""
    open_cells = [c for c in cells if c.status == "open" and c.wanted is not None]
    if budget_seconds is None:
        return open_cells
    chosen, left = [], budget_seconds
    for cell in sorted(open_cells, key=lambda c: (cell_cost(c, window_seconds, compress_seconds), c.ratio, c.task)):
        cost = cell_cost(cell, window_seconds, compress_seconds)
        if cost <= left:
            chosen.append(cell)
            left -= cost
    return chosen


def requests_for(cells: Iterable[Cell]) -> dict[str, dict[str, int]]:
    """file -> {task: window count}: every run behind an open cell gets the cell's next count."""
    requests: dict[str, dict[str, int]] = {}
    for cell in cells:
        if cell.status != "open" or cell.wanted is None:
            continue
        for path in cell.files:
            counts = requests.setdefault(path, {})
            counts[cell.task] = max(counts.get(cell.task, 0), cell.wanted)
    return requests


@dataclass
class AdaptiveReport:
    target_half_width: float
    margin: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for c in self.cells if c.status == s) for s in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "target_half_width_pct": self.target_half_width,
            "margin": self.margin,
            "statuses": self.counts(),
            "rounds": self.rounds,
            "cells": [{**asdict(c), "half_width": round(c.half_width, 4)} for c in self.cells],
        }


def adapt(
    sources: Iterable[str | os.PathLike],
    *,
    methods: Iterable[str] | None = DEFAULT_METHODS,
    ratios: Iterable[float] | None = None,
    target: float = TARGET_HALF_WIDTH,
    margin: float = MARGIN,
    max_rounds: int = MAX_ROUNDS,
    device: str | None = None,
    batch_size: int | str = 1,
    reuse_svd: bool = False,
    report: str | os.PathLike | None = None,
    dry_run: bool = False,
    budget_seconds: float | None = None,
    window_seconds: float = WINDOW_SECONDS,
    compress_seconds: float = COMPRESS_SECONDS,
    min_windows: int = MIN_WINDOWS,
    allocations: Iterable[str] | None = None,
) -> AdaptiveReport:
    """Give the open cells of the table made from ``sources`` more windows until none is open (module docstring).

    ``methods``/``ratios``/``allocations`` (``rank_allocation`` values) select the rows whose cells
    the rule applies to (None: every NSVD/NID row); two processes on disjoint selections of the same
    folders can run at once (each top-up rewrites only its own rows' files, atomically).
    ``dry_run``: classify and plan one round, score nothing. ``budget_seconds``: stop starting
    top-ups once their estimated cost (``cell_cost``) would exceed what is left.
    """
    from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results
    from nsvd_lm.experiments.sweep import extend_results

    if target <= 0:
        raise ValueError(f"target={target} must be a positive half-width in percentage points")
    if max_rounds < 0:
        raise ValueError(f"max_rounds={max_rounds} must be >= 0")
    if min_windows < 1:
        raise ValueError(f"min_windows={min_windows} must be >= 1")
    sources = [Path(s) for s in sources]
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"results folder or file {source} does not exist")
    # canonical_method: a misspelt method is an error naming the allowed ones, not an empty selection.
    methods = [canonical_method(m) for m in methods] if methods is not None else None
    if allocations is not None:
        from nsvd_lm.allocation import ALLOCATIONS

        allocations = list(allocations)
        unknown = [a for a in allocations if a not in ALLOCATIONS]
        if unknown:
            raise ValueError(f"allocations={unknown} not known; allowed values: {', '.join(ALLOCATIONS)}")
    result = AdaptiveReport(target, margin)
    spent = 0.0
    for round_index in range(max_rounds + 1):
        entries = load_results(sources)
        cells = classify(
            build_leaderboard(entries),
            entries,
            methods=methods,
            ratios=ratios,
            target=target,
            margin=margin,
            min_windows=min_windows,
            allocations=allocations,
        )
        result.cells = cells
        left = None if budget_seconds is None else budget_seconds - spent
        chosen = affordable(cells, left, window_seconds, compress_seconds)
        requests = requests_for(chosen)
        if report is not None:
            write_json_atomic(report, result.to_dict())
        if not requests or round_index == max_rounds:
            break
        started = time.perf_counter()
        added = extend_results(requests, device=device, batch_size=batch_size, reuse_svd=reuse_svd, dry_run=dry_run)
        spent += time.perf_counter() - started
        result.rounds.append(
            {
                "round": round_index + 1,
                "open_cells": sum(1 for c in cells if c.status == "open"),
                "cells_extended": len(chosen),
                "estimated_seconds": round(sum(cell_cost(c, window_seconds, compress_seconds) for c in chosen), 1),
                "windows_added": {str(p): n for p, n in added.items()},
                "seconds": round(time.perf_counter() - started, 3),
                "dry_run": dry_run,
            }
        )
        if dry_run:
            break
    if report is not None:
        write_json_atomic(report, result.to_dict())
    return result
