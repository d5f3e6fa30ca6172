"""Table rows from parsed results: values over seeds, improvements over the best baseline, paired CIs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from nsvd_lm.config import CompressionConfig
from nsvd_lm.decompose import METHODS
from nsvd_lm.experiments.leaderboard.parse import (
    BASELINE_METHODS,
    DEFAULT_K1_FRAC,
    DEFAULT_METRIC,
    IMPROVED_METHODS,
    ResultEntry,
)
from nsvd_lm.experiments.paired import (
    CONFIDENCE,
    N_RESAMPLES,
    PairedChange,
    paired_cells,
    paired_change,
    perplexity_interval,
)
from nsvd_lm.names import model_name

# A fuller baseline counts as tied with a lower one unless its paired CI lies above this (percent).
BASELINE_TIE_PCT = 0.1
# Extra paired comparisons (``build_leaderboard(versus=...)``, ``nsvd-lm leaderboard --versus``):
# "uniform": every row with allocated ranks or sequential fitting vs the same method with the paper's
#   uniform, dense-statistics ranks, and (NSVD/NID rows) vs the best ASVD row of the same variant
#   (issue 21: NSVD with allocation vs ASVD with allocation);
# "nsvd": every NID row vs NSVD-I at the same ratio, k1 and variant (Table 4).
VERSUS = ("uniform", "nsvd")

# The NSVD row every NID row is paired with: the main method (`method`'s default, NSVD-I), the one row
# the protocol scores on full windows at every ratio (NSVD-II rows are screens).
NID_REFERENCE: str = CompressionConfig().method

# The paper's column order and names; other tasks with the metric follow alphabetically.
DATASET_LABELS: dict[str, str] = {
    "nsvd_wikitext2": "WikiText-2",
    "nsvd_ptb": "PTB",
    "nsvd_c4": "C4",
    "nsvd_snips": "SNIPS",
    "nsvd_alpaca_eval": "AlpacaEval",
    "nsvd_mctest": "MCTest",
    "nsvd_cmrc": "CMRC (CN)",
    "nsvd_alpaca_eval_ja": "AlpacaEval (JA)",
}
# calib_dataset value -> task that is the calibration set (excluded from "Avg. Impro.").
CALIBRATION_TASKS: dict[str, str] = {"wikitext2": "nsvd_wikitext2", "c4": "nsvd_c4", "ptb": "nsvd_ptb"}


@dataclass
class Row:
    ratio: float
    label: str
    method: str | None
    values: dict[str, float]  # mean over seeds
    improvements: dict[str, float]  # task -> percent (only NSVD/NID rows), mean over seeds
    avg_improvement: float | None
    seeds: list[int | None] = field(default_factory=lambda: [None])
    value_std: dict[str, float] = field(default_factory=dict)  # std over seeds (only with > 1 seed)
    improvement_std: dict[str, float] = field(default_factory=dict)
    improvement_ci: dict[str, PairedChange] = field(default_factory=dict)  # in the improvement's sign
    avg_ci: PairedChange | None = None
    baselines: dict[str, str] = field(default_factory=dict)  # task -> label of the best baseline
    windows: dict[str, int] = field(default_factory=dict)  # task -> windows scored (fewest over seeds)
    value_ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # cells that are no comparison
    reduced: bool = False  # fewer windows than the fullest row in some column (set by build_leaderboard)
    exhausted: set[str] = field(default_factory=set)  # tasks whose CI contains 0 on every window of the set
    first_windows: dict[str, int] = field(default_factory=dict)  # task -> windows before any top-up (fewest)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass
class Comparison:
    """One row against another at the same ratio (``VERSUS``), per set and averaged, in the improvement sign."""

    ratio: float
    label: str
    reference: str  # label of the reference row, or "best <methods> [variant]" for a best-of
    cells: dict[str, PairedChange]  # task -> + = the row has lower perplexity
    average: PairedChange | None
    references: dict[str, str] = field(default_factory=dict)  # task -> reference row label (best-of)
    exhausted: set[str] = field(default_factory=set)


@dataclass
class Leaderboard:
    model: str
    metric: str
    tasks: list[str]
    rows: list[Row]
    calibration_task: str | None
    notes: list[str]
    capped: dict[str, str]  # task -> note, merged over all entries
    n_resamples: int = N_RESAMPLES
    confidence: float = CONFIDENCE
    comparisons: list[Comparison] = field(default_factory=list)

    def column_label(self, task: str) -> str:
        label = DATASET_LABELS.get(task, task)
        if task == self.calibration_task:
            label += " (calib.)"
        if task in self.capped:
            label += f" [capped: {self.capped[task]}]"
        return label


def _method_order(label_method: tuple[str, str | None], entries: dict[str, ResultEntry]) -> tuple[int, float, str]:
    """Methods in the paper's order; one method's k1 variants from the largest k1 down (its Table 3)."""
    label, method = label_method
    k1 = entries[label].k1_frac
    k1 = DEFAULT_K1_FRAC if k1 is None else k1
    return (METHODS.index(method) if method in METHODS else len(METHODS), -k1, label)


def _improvement(value: float, best_baseline: float) -> float:
    return (best_baseline - value) / best_baseline * 100.0


def _ordered_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    known = [t for t in DATASET_LABELS if t in tasks]
    return known + sorted(tasks - set(known))


def _seed_key(seed: int | None) -> tuple[int, int]:
    return (0, 0) if seed is None else (1, seed)


def _mean_values(seeds: dict[int | None, ResultEntry]) -> dict[str, float]:
    out: dict[str, float] = {}
    # In first-seen order, not a set's: the bootstrap draws follow the task order, and a set's order
    # changes with PYTHONHASHSEED (the "fixed-seed" CIs moved between runs).
    for task in dict.fromkeys(t for e in seeds.values() for t in e.values):
        got = [e.values[task] for e in seeds.values() if task in e.values]
        out[task] = sum(got) / len(got)
    return out


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_pairs(
    x: dict[int | None, ResultEntry], base: dict[int | None, ResultEntry]
) -> list[tuple[ResultEntry, ResultEntry]]:
    """X and baseline runs paired by calibration seed; a single baseline run pairs with every X seed."""
    common = [s for s in x if s in base]
    if common:
        return [(x[s], base[s]) for s in common]
    if len(base) == 1:
        only = next(iter(base.values()))
        return [(e, only) for e in x.values()]
    return []


def _shared_window_ppl(runs: dict[str, dict[int | None, ResultEntry]], task: str) -> dict[str, float] | None:
    """Each label's perplexity (mean over seeds) on the windows every run of every label scored.

    Baselines scored on different numbers of windows (sweep --windows) are ranked on the same
    windows; None when a run has no window scores or nothing is shared.
    """
    scores = [e.windows.get(task) for seeds in runs.values() for e in seeds.values()]
    if not scores or any(s is None for s in scores):
        return None
    shared = set(scores[0].ids).intersection(*(s.ids for s in scores[1:]))
    if not shared:
        return None
    out = {}
    for label, seeds in runs.items():
        ppls = []
        for entry in seeds.values():
            w = entry.windows[task]
            keep = [i for i, window in enumerate(w.ids) if window in shared]
            ppls.append(math.exp(min(700.0, float(w.nll[keep].sum()) / float(w.tokens[keep].sum()))))
        out[label] = sum(ppls) / len(ppls)
    return out


def _windows_scored(seeds: dict[int | None, ResultEntry], task: str) -> int:
    return min((e.windows[task].n_windows if task in e.windows else 0) for e in seeds.values())


def _best_baseline(
    runs: dict[str, dict[int | None, ResultEntry]], means: dict[str, dict[str, float]], task: str
) -> str:
    """The paper baseline an NSVD/NID cell is measured against: the lowest perplexity on shared windows.

    Why the tie rule: a baseline scored on fewer windows (a reduced row, ‡) that comes out lowest
    on the shared windows by a margin its paired CI cannot tell from zero would cut every NSVD
    cell down to its few windows. Among the baselines not significantly worse than the lowest
    (paired bootstrap on their shared windows) by more than ``BASELINE_TIE_PCT``, the one scored
    on the most windows is used. The margin exists because ASVD-I and ASVD-II give the same
    factors up to float rounding (1e-4 % apart on SmolLM2): a consistent rounding difference is
    "significant" to the bootstrap and must not decide which windows a cell rests on.
    """
    shared = _shared_window_ppl(runs, task)
    ranked = sorted(runs, key=lambda lb: (shared[lb] if shared else means[lb][task], lb))
    best = ranked[0]
    if shared is None:
        return best
    for label in sorted(ranked[1:], key=lambda lb: -_windows_scored(runs[lb], task)):
        if _windows_scored(runs[label], task) <= _windows_scored(runs[best], task):
            break
        pairs = seed_pairs(runs[label], runs[best])
        change = paired_change([x.windows[task] for x, _ in pairs], [b.windows[task] for _, b in pairs])
        if change is not None and change.low <= BASELINE_TIE_PCT:
            return label
    return best


def _exhausted(cells: dict[str, PairedChange], runs: Iterable[ResultEntry]) -> set[str]:
    """Tasks whose CI contains 0 although the shared windows are the whole set (more windows cannot exist)."""
    runs = list(runs)
    out = set()
    for task, cell in cells.items():
        full = [e.full_windows.get(task) for e in runs]
        if not cell.significant and all(full) and cell.n_windows >= min(full):
            out.add(task)
    return out


def _paired(
    x: dict[int | None, ResultEntry],
    reference: dict[str, dict[int | None, ResultEntry]],
    tasks: Iterable[str],
    calibration_task: str | None,
) -> tuple[dict[str, PairedChange], PairedChange | None]:
    """Paired cells of X against ``reference[task]`` (runs by seed) per task, and their average (improvement sign)."""
    pairs_for_ci = {}
    for task in tasks:
        if task not in reference:
            continue
        pairs = [(a, b) for a, b in seed_pairs(x, reference[task]) if task in a.windows and task in b.windows]
        if pairs:
            pairs_for_ci[task] = ([a.windows[task] for a, _ in pairs], [b.windows[task] for _, b in pairs])
    averaged = [t for t in pairs_for_ci if t != calibration_task]
    cells, average = paired_cells(pairs_for_ci, average_over=averaged)
    return {t: c.as_improvement() for t, c in cells.items()}, (average.as_improvement() if average else None)


def _comparisons(
    versus: list[str],
    runs: dict[tuple[float, str], dict[int | None, ResultEntry]],
    tasks: list[str],
    calibration_task: str | None,
) -> list[Comparison]:
    """The ``VERSUS`` comparisons of every row that has a reference at its ratio."""
    out: list[Comparison] = []
    for ratio in sorted({r for r, _ in runs}):
        at_ratio = {label: seeds for (r, label), seeds in runs.items() if r == ratio}
        first = {label: next(iter(seeds.values())) for label, seeds in at_ratio.items()}

        def find(method: str, k1: float | None, variant: tuple[str, bool]) -> str | None:
            for label, entry in first.items():
                same_k1 = (entry.k1_frac is None and k1 is None) or (
                    entry.k1_frac is not None and k1 is not None and math.isclose(entry.k1_frac, k1)
                )
                if entry.method == method and same_k1 and entry.variant == variant:
                    return label
            return None

        def add(label: str, reference: str, by_task: dict[str, str]) -> None:
            seeds = at_ratio[label]
            cells, average = _paired(seeds, {t: at_ratio[lb] for t, lb in by_task.items()}, tasks, calibration_task)
            if cells:
                involved = [e for lb in {label, *by_task.values()} for e in at_ratio[lb].values()]
                out.append(Comparison(ratio, label, reference, cells, average, by_task, _exhausted(cells, involved)))

        for label, entry in sorted(first.items(), key=lambda kv: _method_order((kv[0], kv[1].method), first)):
            if entry.method is None:
                continue
            if "uniform" in versus and entry.variant != ("uniform", False):
                same = find(entry.method, entry.k1_frac, ("uniform", False))
                if same is not None:
                    add(label, same, {t: same for t in tasks})
                if entry.method in IMPROVED_METHODS:
                    candidates = [
                        lb for lb, e in first.items() if e.method in BASELINE_METHODS and e.variant == entry.variant
                    ]
                    if candidates:
                        means = {lb: _mean_values(at_ratio[lb]) for lb in candidates}
                        best = {
                            t: _best_baseline({lb: at_ratio[lb] for lb in candidates if t in means[lb]}, means, t)
                            for t in tasks
                            if any(t in means[lb] for lb in candidates)
                        }
                        tag = ", ".join(
                            v for v in (entry.rank_allocation, "sequential" if entry.sequential else "") if v
                        )
                        add(label, f"best ASVD [{tag}]", best)
            if "nsvd" in versus and entry.method is not None and entry.method.startswith("nid"):
                k1 = entry.k1_frac if entry.k1_frac is not None else DEFAULT_K1_FRAC
                nsvd = find(NID_REFERENCE, k1, entry.variant)
                if nsvd is None and math.isclose(k1, DEFAULT_K1_FRAC):
                    nsvd = find(NID_REFERENCE, None, entry.variant)
                if nsvd is not None:
                    add(label, nsvd, {t: nsvd for t in tasks})
    return out


def _row(
    ratio: float,
    label: str,
    method: str | None,
    seeds: dict[int | None, ResultEntry],
    at_ratio: dict[str, dict[int | None, ResultEntry]],
    best: dict[str, str],
    calibration_task: str | None,
) -> Row:
    """One table row: values over seeds, and for NSVD/NID the improvements over the best baseline with CIs."""
    values = _mean_values(seeds)
    value_std = {}
    if len(seeds) > 1:
        for task in values:
            got = [e.values[task] for e in seeds.values() if task in e.values]
            if len(got) > 1:
                value_std[task] = _std(got)
    improvements: dict[str, float] = {}
    improvement_std: dict[str, float] = {}
    pairs_for_ci = {}
    baselines = {}
    if method in IMPROVED_METHODS:
        for task in values:
            if task not in best:
                continue
            pairs = [
                (x, b) for x, b in seed_pairs(seeds, at_ratio[best[task]]) if task in x.values and task in b.values
            ]
            if not pairs:
                continue
            baselines[task] = best[task]
            per_pair = [_improvement(x.values[task], b.values[task]) for x, b in pairs]
            improvements[task] = sum(per_pair) / len(per_pair)
            if len(per_pair) > 1:
                improvement_std[task] = _std(per_pair)
            if all(task in x.windows and task in b.windows for x, b in pairs):
                pairs_for_ci[task] = ([x.windows[task] for x, _ in pairs], [b.windows[task] for _, b in pairs])
    averaged = [t for t in improvements if t != calibration_task]
    cells, average = paired_cells(pairs_for_ci, average_over=averaged)
    # With per-window scores the improvement is the paired one, on the windows X and the baseline
    # share (a row scored on fewer windows is compared on those, not against the baseline's others).
    for task, cell in cells.items():
        improvements[task] = cell.as_improvement().estimate
        if cell.seed_std is not None:
            improvement_std[task] = cell.seed_std
    avg_improvement = sum(improvements[t] for t in averaged) / len(averaged) if averaged else None
    if average is not None:
        avg_improvement = average.as_improvement().estimate
    value_ci = {}
    for task in values:  # every cell that is not a comparison gets its perplexity's own CI
        runs = [e.windows[task] for e in seeds.values() if task in e.windows]
        if task not in cells and runs and len(runs) == len(seeds):
            interval = perplexity_interval(runs)
            if interval is not None:
                value_ci[task] = interval
    return Row(
        ratio=ratio,
        label=label,
        method=method,
        values=values,
        improvements=improvements,
        avg_improvement=avg_improvement,
        seeds=sorted(seeds, key=_seed_key),
        value_std=value_std,
        improvement_std=improvement_std,
        improvement_ci={t: c.as_improvement() for t, c in cells.items()},
        avg_ci=average.as_improvement() if average is not None else None,
        baselines=baselines,
        windows={
            task: min(e.windows[task].n_windows for e in seeds.values() if task in e.windows)
            for task in values
            if any(task in e.windows for e in seeds.values())
        },
        value_ci=value_ci,
        first_windows={
            task: min(
                e.windows[task].n_windows - e.added_windows.get(task, 0) for e in seeds.values() if task in e.windows
            )
            for task in values
            if any(task in e.windows for e in seeds.values())
        },
        exhausted=_exhausted(
            cells, [*seeds.values(), *(e for t in baselines for e in at_ratio[baselines[t]].values())]
        ),
    )


def usual_windows(rows: Iterable[Row], tasks: Iterable[str]) -> dict[str, int]:
    """Per column, the most windows a row had from its own sweep (before any top-up): rows below are reduced (‡).

    Not simply the largest count: the adaptive pass (``nsvd_lm.experiments.adaptive``) gives single
    rows more windows, and that must not mark every other row as reduced.
    """
    rows = list(rows)
    return {t: max((r.first_windows.get(t, 0) for r in rows), default=0) for t in tasks}


def build_leaderboard(
    entries: list[ResultEntry],
    metric: str = DEFAULT_METRIC,
    model: str | None = None,
    calibration_task: str | None = None,
    versus: Iterable[str] = (),
) -> Leaderboard:
    """Rows: Original, then each ratio with its methods in the paper's order.

    ``versus``: extra paired comparisons (``VERSUS``), in ``Leaderboard.comparisons``.
    """
    versus = list(dict.fromkeys(versus))
    unknown = sorted(set(versus) - set(VERSUS))
    if unknown:
        raise ValueError(f"versus={','.join(unknown)} is not known; allowed values: {', '.join(VERSUS)}")
    if not entries:
        raise ValueError(f"no lm-eval results with metric {metric!r} found")
    models = sorted({e.model for e in entries})
    if model is not None:
        entries = [e for e in entries if e.model == model_name(model)]
        if not entries:
            raise ValueError(f"model={model!r} has no results; models found: {', '.join(models)}")
    elif len(models) > 1:
        raise ValueError(f"results of several base models found ({', '.join(models)}); pick one with --model")
    board_model = entries[0].model

    notes: list[str] = []
    # One entry per (ratio, label, seed): the newest wins (a re-run replaces an old result).
    chosen: dict[tuple[float, str, int | None], ResultEntry] = {}
    for entry in sorted(entries, key=lambda e: e.date):
        key = (entry.ratio, entry.label, entry.seed)
        if key in chosen:
            notes.append(f"{entry.label} @ {entry.ratio:g}: {entry.path.name} replaces {chosen[key].path.name}")
        chosen[key] = entry
    runs: dict[tuple[float, str], dict[int | None, ResultEntry]] = {}
    for (ratio, label, seed), entry in sorted(chosen.items(), key=lambda kv: (kv[0][0], kv[0][1], _seed_key(kv[0][2]))):
        runs.setdefault((ratio, label), {})[seed] = entry

    tasks = _ordered_tasks(t for e in chosen.values() for t in e.values)
    if calibration_task is None:
        calib = {e.calibration_dataset for e in chosen.values() if e.calibration_dataset}
        names = {CALIBRATION_TASKS.get(c.lower()) for c in calib} - {None}
        if len(names) > 1:
            notes.append(f"results use several calibration sets ({', '.join(sorted(calib))})")
        calibration_task = sorted(names)[0] if len(names) == 1 else "nsvd_wikitext2"

    rows: list[Row] = []
    for ratio in sorted({r for r, _ in runs}):
        at_ratio = {label: seeds for (r, label), seeds in runs.items() if r == ratio}
        first = {label: next(iter(seeds.values())) for label, seeds in at_ratio.items()}
        means = {label: _mean_values(seeds) for label, seeds in at_ratio.items()}
        best: dict[str, str] = {}  # task -> label of the baseline with the lowest (mean) perplexity
        for task in tasks:
            labels = [lb for lb, e in first.items() if e.paper_baseline and task in means[lb]]
            if labels:
                best[task] = _best_baseline({lb: at_ratio[lb] for lb in labels}, means, task)
        for label, method in sorted(
            ((lbl, e.method) for lbl, e in first.items()), key=lambda lm: _method_order(lm, first)
        ):
            seeds = at_ratio[label]
            row = _row(ratio, label, method, seeds, at_ratio, best, calibration_task)
            variants = [
                e for e in first.values() if e.method == method and e.rank_allocation == "uniform" and not e.sequential
            ]
            if label == method and len(variants) > 1:
                row.label = f"{method} (k1={DEFAULT_K1_FRAC:g})"  # next to other k1 values: say which
            rows.append(row)
    rows.sort(key=lambda r: (r.method is not None, r.ratio))  # Original first, stable otherwise
    # Rows scored on fewer windows than most rows of a column (sweep --windows per row group):
    # marked, since their cells rest on fewer tokens.
    usual = usual_windows(rows, tasks)
    for row in rows:
        row.reduced = any(0 < row.windows.get(t, 0) < usual[t] for t in tasks)

    capped: dict[str, str] = {}
    # A column's note is that of a row with the usual window count (rows with fewer are marked ‡;
    # a row the adaptive pass scored on the whole set does not make the column uncapped).
    for task in tasks:
        column = [
            (e.windows[task].n_windows if task in e.windows else 0, e) for e in chosen.values() if task in e.values
        ]
        if column:
            at_usual = [e for n, e in column if n == usual[task]]
            typical = at_usual[0] if at_usual else max(column, key=lambda count_entry: count_entry[0])[1]
            if task in typical.capped:  # such a row scored the whole set: no cap to report
                capped[task] = typical.capped[task]
    seeded = {(r.label, r.n_seeds) for r in rows if r.n_seeds > 1}
    if seeded:
        notes.append("rows over several calibration seeds: mean ± std over seeds; CIs cover seeds and windows")
    calibration_task = calibration_task if calibration_task in tasks else None
    return Leaderboard(
        model=board_model,
        metric=metric,
        tasks=tasks,
        rows=rows,
        calibration_task=calibration_task,
        notes=notes,
        capped=capped,
        comparisons=_comparisons(versus, runs, tasks, calibration_task) if versus else [],
    )
