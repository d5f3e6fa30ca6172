"""Reading lm-eval results files into :class:`ResultEntry` objects (the leaderboard's input).

A file is classified by its ``config.compression`` block (written by ``--model nsvd``), else by
``config.model_args`` (``method``/``ratio``); results without either are the uncompressed
"Original" row. Models are named by :func:`nsvd_lm.names.model_name` (a hub id, or a local
folder's name), so results made on different machines, with the model in different folders,
fall in one table.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nsvd_lm.decompose import METHOD_TABLE, canonical_method
from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores
from nsvd_lm.names import model_name

log = logging.getLogger(__name__)

DEFAULT_METRIC = "token_perplexity"
BASELINE_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE.values() if m.paper_baseline)
IMPROVED_METHODS: tuple[str, ...] = tuple(m.name for m in METHOD_TABLE.values() if m.nested)
DEFAULT_K1_FRAC = 0.95
ORIGINAL = "Original"


@dataclass
class ResultEntry:
    """One lm-eval results file, reduced to what the table needs."""

    path: Path
    model: str  # nsvd_lm.names.model_name of the base model: a hub id or a local folder's name
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
    full_windows: dict[str, int] = field(default_factory=dict)  # task -> windows of a full run (the whole set)
    added_windows: dict[str, int] = field(default_factory=dict)  # task -> windows added later (sweep top-ups)

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
    def variant(self) -> tuple[str, bool]:
        """How the ranks were chosen and fitted: (rank_allocation, sequential); the paper's is ("uniform", False)."""
        return (self.rank_allocation, self.sequential)

    @property
    def paper_baseline(self) -> bool:
        """A baseline of the paper: ASVD-0/I/II with the paper's uniform ranks, fitted to dense statistics."""
        return self.method in BASELINE_METHODS and self.rank_allocation == "uniform" and not self.sequential


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

    model = model_name(compression.get("base_model") or args.get("pretrained") or config.get("model") or "?")
    calibration = compression.get("calibration") or {}
    calib_dataset = calibration.get("dataset") or compression.get("calib_dataset") or args.get("calib_dataset")

    capped: dict[str, str] = {}
    full_windows: dict[str, int] = {}
    limit = _float_or_none(config.get("limit"))
    n_samples = data.get("n-samples") or {}
    for task in values:
        task_results = data["results"][task]
        # The nsvd_* tasks report windows scored vs. windows of a full run (after --limit and
        # max_windows); other tasks only have lm-eval's n-samples.
        scored, full = _metric_value(task_results, "n_windows"), _metric_value(task_results, "n_windows_full")
        if scored is not None and full is not None:
            full_windows[task] = int(full)
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

    added: dict[str, int] = {}  # nsvd-lm sweep / adapt top-ups (nsvd_sweep.extensions)
    for extension in (data.get("nsvd_sweep") or {}).get("extensions") or []:
        for task, count in (extension.get("windows") or {}).items():
            added[task] = added.get(task, 0) + int(count)
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
        full_windows=full_windows,
        added_windows=added,
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
