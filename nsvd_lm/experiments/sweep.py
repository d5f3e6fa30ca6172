"""``nsvd-lm sweep``: evaluate a grid of methods × ratios (× k1 fractions) with lm-eval, resumably.

* One calibration for the whole grid: every configuration loads the base model fresh and
  compresses it through ``--model nsvd`` (``NSVDLM``); the calibration statistics depend only on
  the model and the calibration settings, so the first activation-aware configuration computes
  them and every later one reads the on-disk cache.
* One lm-eval results JSON per configuration (``<method>_r<ratio>[_k<k1>].json``, ``original.json``),
  the same dict ``lm_eval --output_path`` writes (``config.compression`` included) plus an
  ``nsvd_sweep`` block describing the sweep. Written to a dot-temp file and renamed, so a killed
  sweep never leaves a half-written result; a restarted sweep skips configurations whose file
  exists and refuses to mix in results of a different sweep (other tasks, limit, calibration...).
* Calibration seeds (``seeds=[3, 4, 5]``, ``--seeds 3,4,5``): the grid runs once per seed, seed
  by seed (so the statistics cache computes one calibration per seed and ``reuse_svd`` never mixes
  seeds). File names carry the seed, ``<name>_s<seed>.json``, except for the default seed 3,
  which keeps the plain name: a one-seed sweep's folder can later be extended with more seeds
  and its files are reused. The uncompressed original does not depend on the seed and runs
  once. The sweep signature then leaves the seed out of ``calibration`` and each file records
  its own ``nsvd_sweep.seed``. ``seeds`` and a ``seed`` in ``calibration`` are exclusive.
* Resume: results are written per configuration, atomically, so a kill (even SIGKILL) loses at
  most the configuration being computed (tests/test_sweep.py kills a sweep subprocess).
* More windows later: ``--windows`` counts are "at least". A rerun with larger counts scores only
  the windows a finished file lacks (``spread_indices`` is nested, so the new windows extend the
  old ones) and merges them into the file (``nsvd_lm.experiments.window_results``: every metric
  recomputed as one run over all the windows would give); ``extend_results`` does the same for
  any sweep file (the adaptive window budget, ``nsvd_lm.experiments.adaptive``). A top-up
  recompresses the configuration and checks it is the one the file describes.
* The tasks are built once per sweep (every set tokenized and cut into windows once, not once
  per configuration); every configuration is scored on those same task objects.
* ``nsvd-lm leaderboard DIR`` turns the folder into the paper's table.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from nsvd_lm.config import CalibrationConfig, CompressionConfig, canonical_method
from nsvd_lm.decompose import get_method
from nsvd_lm.experiments.window_results import (
    anchor_deviation,
    merge_results,
    missing_indices,
    scored_indices,
    split_windows,
    stored_scores,
)
from nsvd_lm.files import write_json_atomic
from nsvd_lm.names import localize, portable

logger = logging.getLogger(__name__)

CALIBRATION_KEYS = tuple(f.name for f in dataclasses.fields(CalibrationConfig))
DEFAULT_SEED: int = next(f.default for f in dataclasses.fields(CalibrationConfig) if f.name == "seed")
SWEEP_FORMAT = "nsvd-lm-sweep-v1"


@dataclass(frozen=True)
class SweepPoint:
    """One configuration of the grid; ``method=None`` is the uncompressed original."""

    method: str | None
    ratio: float
    k1_frac: float | None = None

    @property
    def name(self) -> str:
        if self.method is None:
            return "original"
        name = f"{self.method}_r{self.ratio:g}"
        return name + (f"_k{self.k1_frac:g}" if self.k1_frac is not None else "")

    def model_args(self) -> dict[str, Any]:
        if self.method is None:
            return {"ratio": 0}
        args: dict[str, Any] = {"method": self.method, "ratio": self.ratio}
        if self.k1_frac is not None:
            args["k1_frac"] = self.k1_frac
        return args


def result_name(point: SweepPoint, seed: int | None) -> str:
    """File stem of a configuration under a calibration seed (the default seed keeps the plain name)."""
    if seed is None or seed == DEFAULT_SEED or point.method is None:
        return point.name
    return f"{point.name}_s{seed}"


@dataclass
class SweepSummary:
    output_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    extended: list[str] = field(default_factory=list)  # finished files that got more windows
    # dry_run: what a run would do, name -> {"windows": {task: windows to score}, "compress": bool}
    planned: dict[str, dict[str, Any]] = field(default_factory=dict)


def parse_list(value: str | Iterable[Any] | None, kind=str) -> list:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        if item == "":
            continue
        try:
            out.append(kind(item))
        except ValueError:
            raise ValueError(f"{item!r} is not a valid {kind.__name__}") from None
    return out


def build_grid(
    methods: Iterable[str],
    ratios: Iterable[float],
    k1_fracs: Iterable[float] | None = None,
    include_original: bool = False,
) -> list[SweepPoint]:
    """The configurations, validated (method names, ratio in (0, 1), k1 in [0, 1]) before any work."""
    methods = [canonical_method(m) for m in methods]
    ratios = [float(r) for r in ratios]
    k1_fracs = [float(k) for k in (k1_fracs or [])]
    if not methods and not include_original:
        raise ValueError("methods is empty: pass --methods (e.g. svd,asvd-i,nsvd-i) or --include-original")
    if methods and not ratios:
        raise ValueError("ratios is empty: pass --ratios, e.g. 0.1,0.2,0.3,0.4,0.5")
    points = [SweepPoint(None, 0.0)] if include_original else []
    for method in dict.fromkeys(methods):
        for ratio in dict.fromkeys(ratios):
            for k1 in dict.fromkeys(k1_fracs) if get_method(method).nested and k1_fracs else [None]:
                CompressionConfig(method=method, ratio=ratio, **({"k1_frac": k1} if k1 is not None else {}))  # validate
                points.append(SweepPoint(method, ratio, k1))
    return points


def _finished(path: Path) -> dict[str, Any] | None:
    """The stored results of a finished configuration, or None if it must (re)run."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("%s is unreadable; running that configuration again", path)
        return None
    return data if isinstance(data, dict) and "results" in data else None


def _write_results(path: Path, results: dict[str, Any]) -> None:
    """One configuration's results, atomically, with paths another machine reads (``names.portable``)."""
    from lm_eval import utils as lm_eval_utils

    serializable = json.loads(json.dumps(results, default=lm_eval_utils.handle_non_serializable))
    write_json_atomic(path, portable(serializable))


def _remove_stale_temp_files(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp"):  # left by a sweep killed while writing
        tmp.unlink(missing_ok=True)


def _task_manager(tasks: list[str], include_path: str | None, metadata: dict[str, Any]):
    """A TaskManager indexing only our tasks (+ include_path) when that covers ``tasks``.

    Indexing lm-eval's thousands of built-in YAMLs takes seconds; the nsvd_* tasks do not need it.
    """
    from lm_eval.tasks import TaskManager

    from nsvd_lm.lmeval.hook import nsvd_tasks_dir

    paths = [p for p in (nsvd_tasks_dir(), include_path) if p]
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(manager.match_tasks([t]) for t in tasks):
        return manager
    return TaskManager(include_path=paths, metadata=metadata)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def evaluate_point(
    point: SweepPoint,
    model_args: dict[str, Any],
    tasks: list[Any],
    task_manager: Any,
    limit: float | None,
    device: str | None,
    batch_size: int | str,
    svd_cache: dict | None = None,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """One lm-eval run of ``--model nsvd`` with this point's model_args (base model loaded fresh).

    The model is built here and handed to ``simple_evaluate`` as an instance (which lm-eval
    accepts), so the sweep can give it its ``svd_cache``; the results JSON records the same
    ``model_args`` as ``lm_eval --model nsvd`` would. ``tasks``: names, or lm-eval Task/Group
    objects built once for the whole sweep (``build_tasks``).
    """
    import lm_eval

    from nsvd_lm.lmeval.adapter import NSVDLM

    args = {**model_args, **point.model_args()}
    if device is None:  # "cuda if available" (--device's help); HFLM refuses None and assumes cuda otherwise
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = NSVDLM(**args, batch_size=batch_size, device=device, svd_cache=svd_cache)
    results = lm_eval.simple_evaluate(
        model=lm,
        model_args=args,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        samples=samples,
        log_samples=False,
    )
    del lm
    _free_memory()
    if results is None:  # not rank 0
        raise RuntimeError("lm-eval returned no results (run the sweep in a single process)")
    return results


@dataclass
class BuiltTasks:
    """The sweep's lm-eval tasks, built once: what ``simple_evaluate`` is given, and the leaf tasks by name."""

    objects: list[Any]  # Task/Group objects (or names lm-eval resolves itself, for tags)
    leaves: dict[str, Any]  # leaf task name -> Task (its eval_docs are the windows)


def build_tasks(tasks: list[str], task_manager: Any) -> BuiltTasks:
    """Build every task once: its set read, tokenized and cut into windows (seconds per set).

    ``simple_evaluate`` accepts built Task and Group objects and rebuilds only their requests, so
    every configuration of a sweep reuses the same documents instead of re-tokenizing each set.
    """
    objects: list[Any] = []
    leaves: dict[str, Any] = {}
    for name in tasks:
        loaded = task_manager.load([name])
        found = loaded["groups"].get(name) or loaded["tasks"].get(name)
        objects.append(found if found is not None else name)  # a tag: lm-eval expands the name itself
        leaves.update(loaded["tasks"])
    return BuiltTasks(objects, leaves)


def parse_windows(value: str) -> dict[str, int]:
    """``"nsvd_snips=9,*=24"`` → ``{"nsvd_snips": 9, "*": 24}`` (``--windows``)."""
    out: dict[str, int] = {}
    for item in parse_list(value):
        task, sep, count = item.partition("=")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--windows item {item!r}: expected TASK=COUNT with COUNT >= 1 (TASK may be *)")
        out[task.strip()] = int(count)
    return out


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` of ``total`` windows spread over the whole set, nested: a larger count keeps the smaller's.

    Position ``floor(v_i · total)`` for the base-2 van der Corput sequence ``v = 0, ½, ¼, ¾, ⅛, ...``
    (duplicates skipped), sorted. Spread rather than the first ``count``, so the windows cover
    several documents of the set, not one article; nested, so rows scored on fewer windows (see
    ``--windows``) share all of them with the rows scored on more, and pair with them window by
    window. ``count >= total``: every window.
    """
    if count < 1:
        raise ValueError(f"window count {count} must be >= 1")
    if count >= total:
        return list(range(total))
    chosen: dict[int, None] = {}
    i = 0
    while len(chosen) < count:
        v, denominator, n = 0.0, 1.0, i
        while n:
            denominator *= 2
            v += (n % 2) / denominator
            n //= 2
        chosen.setdefault(int(v * total), None)
        i += 1
    return sorted(chosen)


def window_samples(windows: dict[str, int], leaves: dict[str, Any]) -> dict[str, list[int]]:
    """lm-eval ``samples`` (task → document indices) for per-task window counts ``windows``.

    ``windows`` names leaf tasks (``nsvd_snips``) or ``"*"`` for every other leaf task of ``leaves``
    (leaf task name → built Task, ``build_tasks``).
    """
    unknown = sorted(set(windows) - set(leaves) - {"*"})
    if unknown:
        raise ValueError(f"windows= names unknown task(s) {', '.join(unknown)}; tasks: {', '.join(sorted(leaves))}")
    samples = {}
    for name, task in leaves.items():
        count = windows.get(name, windows.get("*"))
        total = len(task.eval_docs)
        samples[name] = spread_indices(total, int(count)) if count is not None else list(range(total))
    return samples


# A top-up rescores one window the file holds per task (its "anchor") and merges only if the
# stored NLL comes back within this relative difference. Same code, kernels (bench/env.sh pins
# them) and statistics give the same bits; anything else means another model.
ANCHOR_RTOL = 1e-6


def extend_file(
    path: Path,
    data: dict[str, Any],
    missing: dict[str, list[int]],
    built: BuiltTasks,
    task_manager: Any,
    device: str | None,
    batch_size: int | str,
    svd_cache: dict | None = None,
) -> dict[str, Any]:
    """Score the ``missing`` windows (task → indices) of a finished sweep file and merge them in, atomically.

    The configuration is rebuilt from the file's own ``config.model_args`` (so this works on any
    sweep file) and compressed again; with the missing windows it rescores the first window the
    file holds of each task, and nothing is merged unless that window's NLL comes back as stored
    (``ANCHOR_RTOL``): the top-up is then the model behind the file.
    """

    missing = {t: idx for t, idx in missing.items() if idx}
    lacking = sorted(t for t in missing if stored_scores(data["results"].get(t) or {}) is None)
    if lacking:
        raise ValueError(f"{path}: no per-window scores for {', '.join(lacking)}; more windows cannot be merged")
    args = localize(dict(data["config"]["model_args"]))  # the file holds portable paths
    ratio = float(args.get("ratio") or 0.0)
    point = SweepPoint(args.get("method") if ratio else None, ratio, args.get("k1_frac"))
    anchors = {t: scored_indices(data["results"][t])[:1] for t in missing}
    started = time.perf_counter()
    extension = evaluate_point(
        point,
        args,
        [built.leaves[t] for t in missing],
        task_manager,
        None,
        device,
        batch_size,
        svd_cache=svd_cache,
        samples={t: sorted({*idx, *anchors[t]}) for t, idx in missing.items()},
    )
    deviation = 0.0
    for task, anchor in anchors.items():
        extension["results"][task], rescored = split_windows(extension["results"][task], anchor)
        deviation = max(deviation, anchor_deviation(stored_scores(data["results"][task]), rescored))
    if deviation > ANCHOR_RTOL:
        raise ValueError(
            f"{path}: {point.name} rescored a stored window {deviation:.2e} (relative) away from its stored NLL: "
            "the model is not the one behind the file (code, kernels or statistics changed); nothing merged. "
            "Delete the file to score it anew."
        )
    merged = merge_results(data, extension, built.leaves)
    sweep_block = dict(merged.get("nsvd_sweep") or {})
    sweep_block["extensions"] = [
        *sweep_block.get("extensions", []),
        {
            "windows": {t: len(i) for t, i in missing.items()},
            "anchor_windows": {t: a for t, a in anchors.items()},
            "anchor_max_relative_deviation": deviation,
            "seconds": round(time.perf_counter() - started, 3),
        },
    ]
    merged["nsvd_sweep"] = sweep_block
    _write_results(path, merged)
    return merged


def _holds(data: dict[str, Any], windows: dict[str, int]) -> bool:
    """The finished results hold every window ``windows`` asks of each of their tasks (read from the file alone)."""
    for task, results in (data.get("results") or {}).items():
        full = results.get("n_windows_full,none") if isinstance(results, dict) else None
        if full is None:
            continue  # a group's entry, or a task without window counts
        count = windows.get(task, windows.get("*"))
        wanted = spread_indices(int(full), int(count)) if count is not None else range(int(full))
        if missing_indices(results, wanted):
            return False
    return True


def _limited(total: int, limit: float | None) -> range:
    """The documents lm-eval scores under ``--limit`` (a count, or a fraction of the set when < 1)."""
    if limit is None:
        return range(total)
    return range(min(total, int(limit) if limit >= 1 else int(math.ceil(total * limit))))


def _family(method: str | None) -> str:
    return get_method(method).whitening if method else ""


def extend_results(
    requests: dict[str | os.PathLike, dict[str, int]],
    *,
    device: str | None = None,
    batch_size: int | str = 1,
    reuse_svd: bool = False,
    include_path: str | None = None,
    dry_run: bool = False,
) -> dict[Path, dict[str, int]]:
    """Give sweep result files at least the requested windows per task (``{file: {task: count}}``).

    Each file gets ``spread_indices(set size, count)`` of its task, less what it scored already
    (nested: the new windows extend the old ones, rows stay paired window by window). Files of
    one sweep signature share one TaskManager and one build of the tasks; with ``reuse_svd``
    configurations of one whitening kind and calibration seed share their first-step SVDs. Each
    file is written atomically when its windows are in, so a kill loses at most one file's
    top-up. Returns what was (``dry_run``: would be) added, file → {task: windows}.
    """
    by_signature: dict[str, list[tuple[Path, dict[str, Any], dict[str, int]]]] = {}
    for raw_path, counts in requests.items():
        path = Path(raw_path)
        data = _finished(path)
        if data is None or "nsvd_sweep" not in data:
            raise ValueError(f"{path}: not a finished nsvd-lm sweep result (only those can get more windows)")
        sig = data["nsvd_sweep"]
        key = json.dumps([sig.get("model"), sig.get("tasks"), sig.get("model_args"), sig.get("metadata")])
        by_signature.setdefault(key, []).append((path, data, dict(counts)))
    added: dict[Path, dict[str, int]] = {}
    from tqdm.auto import tqdm

    for key, files in by_signature.items():
        model, tasks, extra, metadata = localize(json.loads(key))
        manager = _task_manager(tasks, include_path, {"pretrained": str(model), **(extra or {}), **(metadata or {})})
        built = build_tasks(tasks, manager)
        jobs = []
        for path, data, counts in files:
            unknown = sorted(set(counts) - set(built.leaves))
            if unknown:
                raise ValueError(f"{path}: no task(s) {', '.join(unknown)}; tasks: {', '.join(sorted(built.leaves))}")
            missing = {
                task: missing_indices(
                    data["results"].get(task), spread_indices(len(built.leaves[task].eval_docs), int(count))
                )
                for task, count in counts.items()
            }
            missing = {t: i for t, i in missing.items() if i}
            if missing:
                jobs.append((path, data, missing))
                added[path] = {t: len(i) for t, i in missing.items()}
        if dry_run or not jobs:
            continue

        def order(job: tuple[Path, dict[str, Any], dict[str, list[int]]]) -> tuple[str, str]:
            args = job[1]["config"]["model_args"]
            return (str(args.get("seed")), _family(args.get("method") if args.get("ratio") else None))

        jobs.sort(key=order)  # stable: one whitening kind and seed at a time for the SVD cache
        current, svd_cache = None, None
        for path, data, missing in tqdm(jobs, desc="more windows", unit="config"):
            if reuse_svd and order((path, data, missing)) != current:
                current, svd_cache = order((path, data, missing)), {}
            logger.info("more windows: %s %s", path.name, {t: len(i) for t, i in missing.items()})
            extend_file(path, data, missing, built, manager, device, batch_size, svd_cache)
    return added


def run_sweep(
    model: str,
    methods: Iterable[str],
    ratios: Iterable[float],
    tasks: Iterable[str],
    output_dir: str | os.PathLike,
    *,
    k1_fracs: Iterable[float] | None = None,
    include_original: bool = False,
    limit: float | None = None,
    calibration: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    include_path: str | None = None,
    device: str | None = None,
    batch_size: int | str = 1,
    reuse_svd: bool = False,
    seeds: Iterable[int] | None = None,
    windows: dict[str, int] | None = None,
    dry_run: bool = False,
) -> SweepSummary:
    """Evaluate every configuration not finished yet; see the module docstring.

    ``seeds``: calibration seeds, the grid once per seed (None: one run, seed from ``calibration``).

    ``windows``: windows scored per task (``{"nsvd_wikitext2": 40, "*": 20}``), spread evenly over
    each set (``spread_indices``); exclusive with ``limit`` (the first windows of every task). A
    finished file with fewer windows than asked gets the missing ones (the module docstring).

    ``reuse_svd``: share each matrix's first-step SVD between configurations (grouped by
    whitening kind, so at most one kind's SVDs are held at a time).

    ``dry_run``: build the tasks, then only report what would be scored (``summary.planned``).
    """
    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("tasks is empty: pass --tasks, e.g. nsvd_ppl")
    if windows is not None and limit is not None:
        raise ValueError("pass either limit (the first windows of every task) or windows (per task), not both")
    points = build_grid(methods, ratios, k1_fracs, include_original)
    calibration = {k: v for k, v in (calibration or {}).items() if v is not None}
    unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
    if unknown:
        raise ValueError(f"unknown calibration setting(s) {', '.join(unknown)}; known: {', '.join(CALIBRATION_KEYS)}")
    extra = dict(model_args or {})
    clash = sorted(set(extra) & {"pretrained", "method", "ratio", "k1_frac"})
    if clash:
        raise ValueError(f"model_args must not set {', '.join(clash)}: the sweep sets them per configuration")
    seed_list: list[int | None] = [None]
    if seeds is not None:
        seed_list = list(dict.fromkeys(int(x) for x in seeds))
        if not seed_list:
            raise ValueError("seeds is empty: pass e.g. --seeds 3,4,5")
        if "seed" in calibration:
            raise ValueError("pass the calibration seed either as seed (--seed) or as seeds (--seeds), not both")
    if isinstance(model, str) and (os.sep in model or model.startswith(".")) and not Path(model).exists():
        raise FileNotFoundError(f"model {model!r}: no such folder")

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    signature = {
        "format": SWEEP_FORMAT,
        "model": str(model),
        "tasks": sorted(tasks),
        "limit": limit,
        **({"windows": dict(sorted(windows.items()))} if windows is not None else {}),
        "calibration": dict(sorted(calibration.items())),
        "model_args": dict(sorted(extra.items())),
        "metadata": dict(sorted((metadata or {}).items())),
    }
    # Window counts are "at least": a file with fewer windows is extended, not refused.
    # Compared as written: result files hold portable paths (nsvd_lm.names.portable).
    compared = {k: v for k, v in portable(json.loads(json.dumps(signature))).items() if k != "windows"}
    todo: list[tuple[SweepPoint, int | None]] = []
    finished: dict[str, tuple[SweepPoint, int | None, dict[str, Any]]] = {}
    summary = SweepSummary(out)
    jobs = [(p, s) for s in seed_list for p in points if p.method is not None or s == seed_list[0]]
    for point, seed in jobs:
        name = result_name(point, seed)
        done = _finished(out / f"{name}.json")
        if done is None:
            todo.append((point, seed))
            continue
        theirs = {k: v for k, v in (done.get("nsvd_sweep") or {}).items() if k in compared}
        if theirs != compared:
            raise ValueError(
                f"{out} already holds {point.name}.json from a different sweep ({theirs} vs {signature}); "
                "use another --output folder or delete the old results"
            )
        finished[name] = (point, seed, done)
    if not todo and (windows is None or all(_holds(done, windows) for _, _, done in finished.values())):
        # Everything done (each file knows its sets' sizes): no need to build the tasks at all.
        summary.skipped = list(finished)
        logger.info("resuming: all %d configuration(s) already done", len(finished))
        return summary

    base_args = {"pretrained": str(model), **extra, **calibration}
    # Tasks read pretrained/max_length/... from metadata; one TaskManager and one build of the
    # tasks (every set tokenized once) serve every point.
    manager = _task_manager(tasks, include_path, {"pretrained": str(model), **extra, **(metadata or {})})
    built = build_tasks(tasks, manager)
    samples = window_samples(windows, built.leaves) if windows is not None else None
    # Finished files that hold fewer windows than asked now: only the missing ones are scored.
    top_ups: dict[str, dict[str, list[int]]] = {}
    for name, (_, _, done) in finished.items():
        missing = {t: missing_indices(done["results"].get(t), idx) for t, idx in (samples or {}).items()}
        missing = {t: i for t, i in missing.items() if i}
        if missing:
            top_ups[name] = missing
        else:
            summary.skipped.append(name)
    if summary.skipped:
        logger.info("resuming: %d configuration(s) already done (%s)", len(summary.skipped), ", ".join(summary.skipped))
    if dry_run:
        for point, seed in todo:
            if samples is not None:
                counts = {t: len(i) for t, i in samples.items()}
            else:  # --limit N (or a fraction), else the whole set
                counts = {t: len(_limited(len(task.eval_docs), limit)) for t, task in built.leaves.items()}
            summary.planned[result_name(point, seed)] = {"windows": counts, "compress": point.method is not None}
        for name, missing in top_ups.items():
            windows_added = {t: len(i) for t, i in missing.items()}
            summary.planned[name] = {"windows": windows_added, "compress": finished[name][0].method is not None}
        return summary

    from tqdm.auto import tqdm

    runs: list[tuple[SweepPoint, int | None, str | None]] = [(p, s, None) for p, s in todo]
    runs += [(finished[name][0], finished[name][1], name) for name in top_ups]
    if reuse_svd:
        # Stable: seed by seed, grid order within a whitening kind (SVDs depend on the seed's statistics).
        runs.sort(key=lambda job: (seed_list.index(job[1]), _family(job[0].method)))
    current_family, svd_cache = None, None
    for point, seed, top_up in tqdm(runs, desc="sweep", unit="config"):
        if reuse_svd and (_family(point.method), seed) != current_family:
            current_family, svd_cache = (_family(point.method), seed), {}  # drop the previous kind's SVDs
        name = result_name(point, seed)
        if top_up is not None:
            logger.info("sweep: %s gets more windows %s", name, {t: len(i) for t, i in top_ups[name].items()})
            extend_file(
                out / f"{name}.json", finished[name][2], top_ups[name], built, manager, device, batch_size, svd_cache
            )
            summary.extended.append(name)
            continue
        started = time.perf_counter()
        logger.info("sweep: %s (%d/%d)", name, len(summary.ran) + 1, len(todo))
        args = base_args if point.method is not None else {"pretrained": str(model), **extra}
        if seed is not None and point.method is not None:
            args = {**args, "seed": seed}
        results = evaluate_point(
            point, args, built.objects, manager, limit, device, batch_size, svd_cache=svd_cache, samples=samples
        )
        results["nsvd_sweep"] = {
            **signature,
            "point": point.name,
            **({"seed": seed} if seed is not None else {}),
            "seconds": round(time.perf_counter() - started, 3),
        }
        _write_results(out / f"{name}.json", results)
        summary.ran.append(name)
        summary.seconds[name] = round(time.perf_counter() - started, 3)
    return summary
