"""The paper's Table 1 from lm-eval result files: perplexity per dataset, rows ratio × method.

Input: any folder holding lm-eval results JSON files (``results*.json`` written by
``lm_eval --output_path``, or the per-configuration files of ``nsvd-lm sweep``), searched
recursively. A file is classified by its ``config.compression`` block (written by
``--model nsvd``), else by ``config.model_args`` (``method``/``ratio``); results without either
(``--model hf``, or ``--model nsvd`` with ``ratio=0``) are the uncompressed "Original" row.

Improvement (the paper's bracketed numbers): an NSVD/NID cell shows
``(best - ppl) / best * 100`` where ``best`` is the lowest perplexity among the
activation-aware baselines ``asvd-0``, ``asvd-i`` and ``asvd-ii`` at the same ratio (and the
same dataset); positive = better than every baseline. ``asvd-iii`` (experimental) and plain
``svd`` are not baselines. "Avg. Impro." averages the improvements over every dataset except
the calibration set (WikiText-2 unless the results say otherwise).

Uncertainty (issue 9): every improvement cell also carries a paired bootstrap 95 % CI over the
windows both results scored (``nsvd_lm.experiments.paired``: 2000 resamples of windows, fixed
seed; the CI of ``ppl_X / ppl_best - 1`` shown in the table's sign, ``-(ppl_X / ppl_best - 1)``).
A cell is significant only when its CI excludes 0. "Avg. Impro." gets the CI of the mean over
sets (each set's windows resampled independently, the mean taken per replicate). Result files
without per-window scores (older runs, other tasks) still load; their cells have no CI and are
marked ``†``.

Calibration seeds: results of one configuration under several calibration seeds
(``compression.calibration.seed``; ``nsvd-lm sweep --seeds``) form one row: values and
improvements are the mean over seeds (``±`` the std over seeds, ddof=1), X and the baseline are
paired seed by seed (a baseline with a single run is paired with every seed of X), and the CI is
the two-stage bootstrap of ``paired.py`` (seeds and windows resampled), so it covers both
sources.

Inputs: folders (searched recursively) and single results files, so plain ``lm_eval --model hf``
/ ``--model nsvd`` runs made elsewhere (any results JSON with the ``nsvd_*`` tasks) sit next to
sweep results.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nsvd_lm.decompose import METHOD_TABLE, METHODS, canonical_method
from nsvd_lm.experiments.paired import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    N_RESAMPLES,
    WINDOW_SCORES_METRIC,
    PairedChange,
    WindowScores,
    paired_cells,
    paired_change,
    perplexity_interval,
)

log = logging.getLogger(__name__)

DEFAULT_METRIC = "token_perplexity"
# A fuller baseline counts as tied with a lower one unless its paired CI lies above this (percent).
BASELINE_TIE_PCT = 0.1
BASELINE_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE.values() if m.paper_baseline)
IMPROVED_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE.values() if m.nested)
DEFAULT_K1_FRAC = 0.95
ORIGINAL = "Original"

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
class ResultEntry:
    """One lm-eval results file, reduced to what the table needs."""

    path: Path
    model: str
    method: str | None  # None = uncompressed "Original"
    ratio: float
    k1_frac: float | None
    values: dict[str, float]  # task -> metric value
    calibration_dataset: str | None = None
    limit: float | None = None
    capped: dict[str, str] = field(default_factory=dict)  # task -> why the number is partial
    date: float = 0.0
    seed: int | None = None  # calibration seed (None: uncompressed, or not recorded)
    windows: dict[str, WindowScores] = field(default_factory=dict)  # task -> per-window scores
    rank_allocation: str = "uniform"  # how the ratio's budget was spread (nsvd_lm.allocation)
    sequential: bool = False  # blocks fitted to the compressed prefix's statistics (compress_model)

    @property
    def label(self) -> str:
        if self.method is None:
            return ORIGINAL
        label = self.method
        if (
            self.method in IMPROVED_METHODS
            and self.k1_frac is not None
            and not math.isclose(self.k1_frac, DEFAULT_K1_FRAC)
        ):
            label = f"{self.method} (k1={self.k1_frac:g})"
        variant = [self.rank_allocation] if self.rank_allocation != "uniform" else []
        if self.sequential:
            variant.append("sequential")
        if variant:
            label += f" [{', '.join(variant)}]"
        return label

    @property
    def paper_baseline(self) -> bool:
        """A baseline of the paper: ASVD-0/I/II with the paper's uniform ranks, fitted to dense statistics."""
        return self.method in BASELINE_METHODS and self.rank_allocation == "uniform" and not self.sequential


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

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


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

    def column_label(self, task: str) -> str:
        label = DATASET_LABELS.get(task, task)
        if task == self.calibration_task:
            label += " (calib.)"
        if task in self.capped:
            label += f" [capped: {self.capped[task]}]"
        return label


# ----------------------------------------------------------------------------- reading


def _model_args(config: dict[str, Any]) -> dict[str, Any]:
    args = config.get("model_args") or {}
    if isinstance(args, str):  # lm-eval keeps the CLI string when given as "k=v,k2=v2"
        out: dict[str, Any] = {}
        for part in args.split(","):
            if "=" in part:
                key, _, value = part.partition("=")
                out[key.strip()] = value.strip()
        return out
    return dict(args)


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _metric_value(task_results: dict[str, Any], metric: str) -> float | None:
    for key, value in task_results.items():
        if key == metric or key.startswith(metric + ","):
            if "_stderr" in key:
                continue
            return _float_or_none(value)
    return None


def _find_key(obj: Any, name: str) -> Any:
    """First value of ``name`` anywhere in a nested dict (task configs nest metadata)."""
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        for value in obj.values():
            found = _find_key(value, name)
            if found is not None:
                return found
    return None


def parse_result(path: str | os.PathLike, data: dict[str, Any], metric: str = DEFAULT_METRIC) -> ResultEntry | None:
    """Classify one results dict; ``None`` if it has no task with ``metric``."""
    config = data.get("config") or {}
    args = _model_args(config)
    compression = config.get("compression") or {}
    groups = set(data.get("group_subtasks") or {})

    values: dict[str, float] = {}
    for task, task_results in (data.get("results") or {}).items():
        if task in groups or not isinstance(task_results, dict):
            continue
        value = _metric_value(task_results, metric)
        if value is not None:
            values[task] = value
    if not values:
        return None

    method = compression.get("method", args.get("method"))
    ratio = _float_or_none(compression.get("ratio", args.get("ratio"))) or 0.0
    if method in (None, "", "none") or ratio == 0.0:
        method, ratio = None, 0.0
    else:
        method = canonical_method(str(method))
    k1 = _float_or_none(compression.get("k1_frac", args.get("k1_frac")))
    if method is not None and k1 is None and method in IMPROVED_METHODS:
        k1 = DEFAULT_K1_FRAC

    model = compression.get("base_model") or args.get("pretrained") or config.get("model") or "?"
    model = str(model).rstrip("/")
    calibration = compression.get("calibration") or {}
    calib_dataset = calibration.get("dataset") or compression.get("calib_dataset") or args.get("calib_dataset")

    capped: dict[str, str] = {}
    limit = _float_or_none(config.get("limit"))
    n_samples = data.get("n-samples") or {}
    for task in values:
        task_results = data["results"][task]
        # The nsvd_* tasks report windows scored vs. windows of a full run (after --limit and
        # max_windows); other tasks only have lm-eval's n-samples.
        scored, full = _metric_value(task_results, "n_windows"), _metric_value(task_results, "n_windows_full")
        if scored is not None and full is not None:
            if scored < full:
                capped[task] = f"{scored:g}/{full:g} windows"
            continue
        notes = []
        counts = n_samples.get(task) or {}
        original, effective = counts.get("original"), counts.get("effective")
        if original is not None and effective is not None and effective < original:
            notes.append(f"{effective}/{original} docs")
        max_windows = _find_key((data.get("configs") or {}).get(task), "max_windows")
        if max_windows not in (None, 0, "", "None"):
            notes.append(f"max_windows={max_windows}")
        if notes:
            capped[task] = ", ".join(notes)
    if limit is not None and not capped:
        capped = {task: f"limit={limit:g}" for task in values}

    windows: dict[str, WindowScores] = {}
    for task in values:
        for key, value in data["results"][task].items():
            if key == WINDOW_SCORES_METRIC or key.startswith(WINDOW_SCORES_METRIC + ","):
                try:
                    scores = WindowScores.from_dict(value)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("%s: unreadable window scores of %s (%s)", path, task, exc)
                    scores = None
                if scores is not None and scores.n_windows:
                    windows[task] = scores
                break
    seed = calibration.get("seed", (compression.get("config") or {}).get("seed", args.get("seed")))
    seed = int(seed) if method is not None and seed not in (None, "", "None") else None

    date = _float_or_none(data.get("date")) or Path(path).stat().st_mtime
    return ResultEntry(
        path=Path(path),
        model=model,
        method=method,
        ratio=ratio,
        k1_frac=k1 if method is not None else None,
        values=values,
        calibration_dataset=str(calib_dataset) if calib_dataset else None,
        limit=limit,
        capped=capped,
        date=date,
        seed=seed,
        windows=windows,
        rank_allocation=str(compression.get("rank_allocation") or args.get("rank_allocation") or "uniform"),
        sequential=bool(compression.get("sequential", False)),
    )


def find_result_files(directory: str | os.PathLike) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    # Temp files of an interrupted sweep start with "." and are never read.
    return sorted(p for p in root.rglob("*.json") if not p.name.startswith("."))


def load_results(
    directory: str | os.PathLike | Iterable[str | os.PathLike], metric: str = DEFAULT_METRIC
) -> list[ResultEntry]:
    """Every lm-eval results file under ``directory`` (a folder, a file, or several) that reports ``metric``."""
    sources = [directory] if isinstance(directory, (str, os.PathLike)) else list(directory)
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        files += [source] if source.is_file() else find_result_files(source)
    entries = []
    for path in dict.fromkeys(files):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping %s: not readable JSON (%s)", path, exc)
            continue
        if not isinstance(data, dict) or "results" not in data:
            continue
        entry = parse_result(path, data, metric)
        if entry is not None:
            entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- table


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


def _seed_pairs(
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
        pairs = _seed_pairs(runs[label], runs[best])
        change = paired_change([x.windows[task] for x, _ in pairs], [b.windows[task] for _, b in pairs])
        if change is not None and change.low <= BASELINE_TIE_PCT:
            return label
    return best


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
                (x, b) for x, b in _seed_pairs(seeds, at_ratio[best[task]]) if task in x.values and task in b.values
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
    )


def build_leaderboard(
    entries: list[ResultEntry],
    metric: str = DEFAULT_METRIC,
    model: str | None = None,
    calibration_task: str | None = None,
) -> Leaderboard:
    """Rows: Original, then each ratio with its methods in the paper's order."""
    if not entries:
        raise ValueError(f"no lm-eval results with metric {metric!r} found")
    models = sorted({e.model for e in entries})
    if model is not None:
        entries = [e for e in entries if e.model.rstrip("/") == model.rstrip("/")]
        if not entries:
            raise ValueError(f"model={model!r} has no results; models found: {', '.join(models)}")
    elif len(models) > 1:
        raise ValueError(f"results of several base models found ({', '.join(models)}); pick one with --model")
    model_name = entries[0].model

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
    # Rows scored on fewer windows than the fullest row of a column (sweep --windows per row group):
    # marked, since their cells rest on fewer tokens.
    most = {t: max(r.windows.get(t, 0) for r in rows) for t in tasks}
    for row in rows:
        row.reduced = any(0 < row.windows.get(t, 0) < most[t] for t in tasks)

    capped: dict[str, str] = {}
    # A column's note is that of its fullest row (rows scored on fewer windows are marked ‡).
    for task in tasks:
        column = [
            (e.windows[task].n_windows if task in e.windows else 0, e) for e in chosen.values() if task in e.values
        ]
        if column:
            fullest = max(column, key=lambda count_entry: count_entry[0])[1]
            if task in fullest.capped:  # the fullest row scored the whole set: no cap to report
                capped[task] = fullest.capped[task]
    seeded = {(r.label, r.n_seeds) for r in rows if r.n_seeds > 1}
    if seeded:
        notes.append("rows over several calibration seeds: mean ± std over seeds; CIs cover seeds and windows")
    return Leaderboard(
        model=model_name,
        metric=metric,
        tasks=tasks,
        rows=rows,
        calibration_task=calibration_task if calibration_task in tasks else None,
        notes=notes,
        capped=capped,
    )


# ----------------------------------------------------------------------------- output


def _fmt_value(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"


def _fmt_pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.1f}%"


def _fmt_ci(ci: PairedChange) -> str:
    return f"[{ci.low:+.1f}, {ci.high:+.1f}]"


def _fmt_improvement(value: float | None, std: float | None, ci: PairedChange | None, has_ci: bool) -> str:
    """``(+4.5%) [+1.0, +8.0]``; ``**bold**`` = CI excludes 0, ``n.s.`` = it does not, ``†`` = no window scores."""
    if value is None:
        return ""
    text = f"({_fmt_pct(value)}" + (f" ± {std:.1f}" if std is not None else "") + ")"
    if ci is not None:
        return text + " " + _fmt_ci(ci)
    return text + (" †" if not has_ci else "")


def _mark(cell: str, ci: PairedChange | None) -> str:
    if ci is None:
        return cell
    return f"**{cell}**" if ci.significant else f"{cell} n.s."


def _windows_note(board: Leaderboard) -> str | None:
    """How many windows / tokens stand behind the CIs of each column."""
    parts = []
    for task in board.tasks:
        counts = sorted(
            {(c.n_windows, c.n_tokens) for r in board.rows for t, c in r.improvement_ci.items() if t == task}
        )
        if not counts:
            continue
        lo, hi = counts[0], counts[-1]
        text = f"{lo[0]} windows / {lo[1]:,} tokens"
        if lo != hi:
            text = f"{lo[0]}-{hi[0]} windows / {lo[1]:,}-{hi[1]:,} tokens"
        parts.append(f"{DATASET_LABELS.get(task, task)}: {text}")
    return "; ".join(parts) if parts else None


def to_markdown(board: Leaderboard) -> str:
    seeded = any(r.n_seeds > 1 for r in board.rows)
    header = ["Ratio", "Method", *(board.column_label(t) for t in board.tasks), "Avg. Impro."]
    if seeded:
        header.append("Seeds")
    any_ci = any(r.improvement_ci for r in board.rows)
    lines = [
        f"# {board.metric} — {board.model}",
        "",
        f"NSVD/NID cells: {board.metric} (relative improvement over the best of "
        f"{', '.join(BASELINE_METHODS)} at the same ratio, ranked on the windows they share; a baseline "
        f"scored on fewer windows that is not lower by a significant {BASELINE_TIE_PCT:g} % gives way to the fuller "
        "one; + = lower perplexity). "
        f"Avg. Impro. excludes the calibration set"
        + (
            f" ({DATASET_LABELS.get(board.calibration_task, board.calibration_task)})."
            if board.calibration_task
            else "."
        ),
        "",
        f"[low, high]: paired bootstrap {board.confidence:.0%} CI of the improvement over the windows both "
        f"results scored ({board.n_resamples} resamples of windows, seed {BOOTSTRAP_SEED}); **bold** = the CI "
        "excludes 0 (significant), n.s. = it contains 0 (a tie); † = no per-window scores in the results, no CI. "
        f"Other cells: perplexity [low, high] = its own bootstrap {board.confidence:.0%} CI over the windows "
        "(and the calibration seeds) behind it; ± = std over calibration seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in board.rows:
        cells = [("–" if row.method is None else f"{row.ratio:g}"), row.label + (" ‡" if row.reduced else "")]
        for task in board.tasks:
            cell = _fmt_value(row.values.get(task))
            if task in row.value_std:
                cell += f" ± {_fmt_value(row.value_std[task])}"
            if task in row.value_ci:
                low, high = row.value_ci[task]
                cell += f" [{_fmt_value(low)}, {_fmt_value(high)}]"
            ci = row.improvement_ci.get(task)
            if task in row.improvements:
                cell += " " + _fmt_improvement(
                    row.improvements[task], row.improvement_std.get(task), ci, has_ci=ci is not None
                )
                cell = _mark(cell, ci)
            cells.append(cell)
        avg = _fmt_pct(row.avg_improvement)
        if row.avg_improvement is not None:
            avg = _mark(
                avg + (" " + _fmt_ci(row.avg_ci) if row.avg_ci else (" †" if not row.avg_ci else "")), row.avg_ci
            )
        cells.append(avg)
        if seeded:
            cells.append(",".join("–" if s is None else str(s) for s in row.seeds))
        lines.append("| " + " | ".join(cells) + " |")
    if board.capped:
        lines += [
            "",
            "**Capped results** (not comparable to full-set numbers): "
            + "; ".join(f"{DATASET_LABELS.get(t, t)}: {n}" for t, n in board.capped.items()),
        ]
    if any_ci:
        lines += ["", "Windows behind each CI (per run): " + (_windows_note(board) or "–")]
    reduced = [r for r in board.rows if r.reduced]
    if reduced:
        most = {t: max(r.windows.get(t, 0) for r in board.rows) for t in board.tasks}
        lines += [
            "",
            "‡ = scored on fewer windows than the fullest rows (a nested subset of theirs, so pairs still match "
            "window by window; wider CIs): "
            + "; ".join(
                f"{DATASET_LABELS.get(t, t)} {min(r.windows.get(t, most[t]) for r in reduced)} of {most[t]}"
                for t in board.tasks
                if any(r.windows.get(t, most[t]) < most[t] for r in reduced)
            )
            + ".",
        ]
    for note in board.notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def to_csv(board: Leaderboard) -> str:
    """One row per table row; the CI columns follow the original ones (impro = + lower perplexity)."""
    out = io.StringIO()
    writer = csv.writer(out)
    ci_columns = [
        f"{t}_{c}"
        for t in board.tasks
        for c in ("impro_ci_low", "impro_ci_high", "significant", "n_windows", "n_tokens", "std", "impro_std")
    ]
    writer.writerow(
        [
            "model",
            "ratio",
            "method",
            *board.tasks,
            *(f"{t}_impro_pct" for t in board.tasks),
            "avg_impro_pct",
            "capped",
            *ci_columns,
            "avg_impro_ci_low",
            "avg_impro_ci_high",
            "avg_significant",
            "n_seeds",
            "seeds",
            "reduced",
            *(f"{t}_windows" for t in board.tasks),
            *(f"{t}_ci_{end}" for t in board.tasks for end in ("low", "high")),
        ]
    )
    capped = "; ".join(f"{t}: {n}" for t, n in board.capped.items())

    def num(value: float | None, fmt: str = ".4f") -> str:
        return "" if value is None else format(value, fmt)

    def exact(value: float | None) -> str:  # perplexities keep every digit, as the value columns do
        return "" if value is None else repr(float(value))

    for row in board.rows:
        extra = []
        for task in board.tasks:
            ci = row.improvement_ci.get(task)
            extra += [
                num(ci.low if ci else None),
                num(ci.high if ci else None),
                "" if ci is None else str(ci.significant).lower(),
                "" if ci is None else str(ci.n_windows),
                "" if ci is None else str(ci.n_tokens),
                exact(row.value_std.get(task)),
                num(row.improvement_std.get(task)),
            ]
        avg = row.avg_ci
        writer.writerow(
            [
                board.model,
                f"{row.ratio:g}",
                row.label,
                *(("" if row.values.get(t) is None else repr(row.values[t])) for t in board.tasks),
                *(("" if t not in row.improvements else f"{row.improvements[t]:.4f}") for t in board.tasks),
                "" if row.avg_improvement is None else f"{row.avg_improvement:.4f}",
                capped,
                *extra,
                num(avg.low if avg else None),
                num(avg.high if avg else None),
                "" if avg is None else str(avg.significant).lower(),
                str(row.n_seeds),
                " ".join("" if s is None else str(s) for s in row.seeds).strip(),
                str(row.reduced).lower(),
                *(str(row.windows[t]) if t in row.windows else "" for t in board.tasks),
                *(exact(row.value_ci[t][i] if t in row.value_ci else None) for t in board.tasks for i in (0, 1)),
            ]
        )
    return out.getvalue()


def plot_png(board: Leaderboard, path: str | os.PathLike) -> Path:
    """Perplexity vs ratio per dataset (log y), one line per method, Original dashed.

    With CIs, a second block of panels shows each NSVD/NID improvement with its CI as an error
    bar: filled markers = significant, hollow grey = the CI contains 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(board.tasks)
    cols = min(4, n)
    block = math.ceil(n / cols)
    with_ci = any(r.improvement_ci for r in board.rows)
    nrows = block * (2 if with_ci else 1)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    labels = []
    for row in board.rows:
        if row.method is not None and row.label not in labels:
            labels.append(row.label)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    flat = list(axes.flat)
    for ax, task in zip(flat[: block * cols], board.tasks):
        for label in labels:
            points = sorted((r.ratio, r.values[task]) for r in board.rows if r.label == label and task in r.values)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        original = [r.values[task] for r in board.rows if r.method is None and task in r.values]
        if original:
            ax.axhline(original[0], color="black", linestyle="--", linewidth=1, label=ORIGINAL)
        ax.set_yscale("log")
        ax.set_title(board.column_label(task), fontsize=9)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel(board.metric)
        ax.grid(True, which="both", alpha=0.3)
    for ax in flat[n : block * cols]:
        ax.axis("off")
    if with_ci:
        for ax, task in zip(flat[block * cols :], board.tasks):
            for i, label in enumerate(labels):
                for r in board.rows:
                    ci = r.improvement_ci.get(task)
                    if r.label != label or ci is None:
                        continue
                    x = r.ratio + (i - len(labels) / 2) * 0.004  # side by side at one ratio
                    significant = ci.significant
                    ax.errorbar(
                        [x],
                        [r.improvements[task]],
                        yerr=[[r.improvements[task] - ci.low], [ci.high - r.improvements[task]]],
                        fmt="o",
                        color=colors[label] if significant else "0.6",
                        markerfacecolor=colors[label] if significant else "white",
                        capsize=2,
                    )
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(f"{DATASET_LABELS.get(task, task)}: improvement, {board.confidence:.0%} CI", fontsize=9)
            ax.set_xlabel("compression ratio")
            ax.set_ylabel("% vs best baseline")
            ax.grid(True, alpha=0.3)
        for ax in flat[block * cols + n :]:
            ax.axis("off")
    handles, names = flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.suptitle(f"{board.model}" + (" (capped results)" if board.capped else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.14 / nrows, 1, 0.97))  # room for the legend
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_leaderboard(
    directory: str | os.PathLike | Iterable[str | os.PathLike],
    out_prefix: str | os.PathLike | None = None,
    metric: str = DEFAULT_METRIC,
    model: str | None = None,
    calibration_task: str | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png`` (default prefix ``DIR/leaderboard``).

    ``directory``: a results folder, a results file, or several of either (the default prefix
    then lies in the first folder, or beside the first file).
    """
    sources = [Path(directory)] if isinstance(directory, (str, os.PathLike)) else [Path(d) for d in directory]
    if not sources:
        raise ValueError("no results folder or file given")
    board = build_leaderboard(load_results(sources, metric), metric, model, calibration_task)
    if out_prefix is not None:
        prefix = Path(out_prefix)
    else:
        prefix = (sources[0] if sources[0].is_dir() else sources[0].parent) / "leaderboard"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": prefix.with_name(prefix.name + ".md"), "csv": prefix.with_name(prefix.name + ".csv")}
    paths["markdown"].write_text(to_markdown(board), encoding="utf-8")
    paths["csv"].write_text(to_csv(board), encoding="utf-8")
    if plot:
        paths["png"] = plot_png(board, prefix.with_name(prefix.name + ".png"))
    return paths
