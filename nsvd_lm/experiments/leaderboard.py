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

from nsvd_lm.methods import METHOD_TABLE, METHODS, canonical_method

log = logging.getLogger(__name__)

DEFAULT_METRIC = "token_perplexity"
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

    @property
    def label(self) -> str:
        if self.method is None:
            return ORIGINAL
        if (
            self.method in IMPROVED_METHODS
            and self.k1_frac is not None
            and not math.isclose(self.k1_frac, DEFAULT_K1_FRAC)
        ):
            return f"{self.method} (k1={self.k1_frac:g})"
        return self.method


@dataclass
class Row:
    ratio: float
    label: str
    method: str | None
    values: dict[str, float]
    improvements: dict[str, float]  # task -> percent (only NSVD/NID rows)
    avg_improvement: float | None


@dataclass
class Leaderboard:
    model: str
    metric: str
    tasks: list[str]
    rows: list[Row]
    calibration_task: str | None
    notes: list[str]
    capped: dict[str, str]  # task -> note, merged over all entries

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
    )


def find_result_files(directory: str | os.PathLike) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    # Temp files of an interrupted sweep start with "." and are never read.
    return sorted(p for p in root.rglob("*.json") if not p.name.startswith("."))


def load_results(directory: str | os.PathLike, metric: str = DEFAULT_METRIC) -> list[ResultEntry]:
    """Every lm-eval results file under ``directory`` that reports ``metric``."""
    entries = []
    for path in find_result_files(directory):
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
    # One entry per (ratio, label): the newest wins (a re-run replaces an old result).
    chosen: dict[tuple[float, str], ResultEntry] = {}
    for entry in sorted(entries, key=lambda e: e.date):
        key = (entry.ratio, entry.label)
        if key in chosen:
            notes.append(f"{entry.label} @ {entry.ratio:g}: {entry.path.name} replaces {chosen[key].path.name}")
        chosen[key] = entry

    tasks = _ordered_tasks(t for e in chosen.values() for t in e.values)
    if calibration_task is None:
        calib = {e.calibration_dataset for e in chosen.values() if e.calibration_dataset}
        names = {CALIBRATION_TASKS.get(c.lower()) for c in calib} - {None}
        if len(names) > 1:
            notes.append(f"results use several calibration sets ({', '.join(sorted(calib))})")
        calibration_task = sorted(names)[0] if len(names) == 1 else "nsvd_wikitext2"

    rows: list[Row] = []
    for ratio in sorted({r for r, _ in chosen}):
        at_ratio = {label: e for (r, label), e in chosen.items() if r == ratio}
        best: dict[str, float] = {}
        for task in tasks:
            baseline_values = [
                e.values[task] for e in at_ratio.values() if e.method in BASELINE_METHODS and task in e.values
            ]
            if baseline_values:
                best[task] = min(baseline_values)
        for label, method in sorted(
            ((lbl, e.method) for lbl, e in at_ratio.items()), key=lambda lm: _method_order(lm, at_ratio)
        ):
            entry = at_ratio[label]
            improvements = {}
            if method in IMPROVED_METHODS:
                improvements = {t: _improvement(v, best[t]) for t, v in entry.values.items() if t in best}
            averaged = [v for t, v in improvements.items() if t != calibration_task]
            if label == method and sum(e.method == method for e in at_ratio.values()) > 1:
                label = f"{method} (k1={DEFAULT_K1_FRAC:g})"  # next to other k1 values: say which
            rows.append(
                Row(
                    ratio=ratio,
                    label=label,
                    method=method,
                    values=dict(entry.values),
                    improvements=improvements,
                    avg_improvement=sum(averaged) / len(averaged) if averaged else None,
                )
            )
    rows.sort(key=lambda r: (r.method is not None, r.ratio))  # Original first, stable otherwise

    capped: dict[str, str] = {}
    for entry in chosen.values():
        for task, note in entry.capped.items():
            capped.setdefault(task, note)
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


def to_markdown(board: Leaderboard) -> str:
    header = ["Ratio", "Method", *(board.column_label(t) for t in board.tasks), "Avg. Impro."]
    lines = [
        f"# {board.metric} — {board.model}",
        "",
        f"NSVD/NID cells: {board.metric} (relative improvement over the best of "
        f"{', '.join(BASELINE_METHODS)} at the same ratio; + = lower perplexity). "
        f"Avg. Impro. excludes the calibration set"
        + (
            f" ({DATASET_LABELS.get(board.calibration_task, board.calibration_task)})."
            if board.calibration_task
            else "."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in board.rows:
        cells = [("–" if row.method is None else f"{row.ratio:g}"), row.label]
        for task in board.tasks:
            cell = _fmt_value(row.values.get(task))
            if task in row.improvements:
                cell += f" ({_fmt_pct(row.improvements[task])})"
            cells.append(cell)
        cells.append(_fmt_pct(row.avg_improvement))
        lines.append("| " + " | ".join(cells) + " |")
    if board.capped:
        lines += [
            "",
            "**Capped results** (not comparable to full-set numbers): "
            + "; ".join(f"{DATASET_LABELS.get(t, t)}: {n}" for t, n in board.capped.items()),
        ]
    for note in board.notes:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def to_csv(board: Leaderboard) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["model", "ratio", "method", *board.tasks, *(f"{t}_impro_pct" for t in board.tasks), "avg_impro_pct", "capped"]
    )
    capped = "; ".join(f"{t}: {n}" for t, n in board.capped.items())
    for row in board.rows:
        writer.writerow(
            [
                board.model,
                f"{row.ratio:g}",
                row.label,
                *(("" if row.values.get(t) is None else repr(row.values[t])) for t in board.tasks),
                *(("" if t not in row.improvements else f"{row.improvements[t]:.4f}") for t in board.tasks),
                "" if row.avg_improvement is None else f"{row.avg_improvement:.4f}",
                capped,
            ]
        )
    return out.getvalue()


def plot_png(board: Leaderboard, path: str | os.PathLike) -> Path:
    """Perplexity vs ratio per dataset (log y), one line per method, Original dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(board.tasks)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    labels = []
    for row in board.rows:
        if row.method is not None and row.label not in labels:
            labels.append(row.label)
    for ax, task in zip(axes.flat, board.tasks):
        for label in labels:
            points = sorted((r.ratio, r.values[task]) for r in board.rows if r.label == label and task in r.values)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        original = [r.values[task] for r in board.rows if r.method is None and task in r.values]
        if original:
            ax.axhline(original[0], color="black", linestyle="--", linewidth=1, label=ORIGINAL)
        ax.set_yscale("log")
        ax.set_title(board.column_label(task), fontsize=9)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel(board.metric)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.suptitle(f"{board.model}" + (" (capped results)" if board.capped else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.14 / nrows, 1, 0.97))  # room for the legend
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_leaderboard(
    directory: str | os.PathLike,
    out_prefix: str | os.PathLike | None = None,
    metric: str = DEFAULT_METRIC,
    model: str | None = None,
    calibration_task: str | None = None,
    plot: bool = True,
) -> dict[str, Path]:
    """Write ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png`` (default prefix ``DIR/leaderboard``)."""
    board = build_leaderboard(load_results(directory, metric), metric, model, calibration_task)
    prefix = Path(out_prefix) if out_prefix is not None else Path(directory) / "leaderboard"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": prefix.with_name(prefix.name + ".md"), "csv": prefix.with_name(prefix.name + ".csv")}
    paths["markdown"].write_text(to_markdown(board), encoding="utf-8")
    paths["csv"].write_text(to_csv(board), encoding="utf-8")
    if plot:
        paths["png"] = plot_png(board, prefix.with_name(prefix.name + ".png"))
    return paths
