"""Adding windows to a finished lm-eval results file of the ``nsvd_*`` tasks, exactly.

A results file of ``nsvd-lm sweep`` keeps, per task, every scored window's summed NLL and
token count under its window id (``nsvd_lm.experiments.paired``). Scoring more windows of the
same configuration later (a sweep rerun with a larger ``--windows``, or the adaptive window
budget of ``nsvd-lm adapt``) must give the file a run over the union of the windows would have
given. So the merge rebuilds every metric from the per-window scores through the task's own
``process_results`` and aggregations (lm-eval's code path, one item per window in window order):
``token_perplexity``, ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``, the counts
and the window scores come out as one lm-eval run over those windows would compute them (the
per-window log-likelihood is stored as ``-nll`` of the same float, so the items are the same
numbers). A stored window whose id does not match the task's document at that index (other
data, tokenizer or ``max_length``) is an error, never merged.

Pure data code over lm-eval ``Task`` objects and results dicts; no model, no torch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

FILTER = "none"  # lm-eval's filter name of a task without filters: metric keys read "<metric>,none"


def window_index(window: str) -> int:
    """The document index inside a window id ``<dataset>:<index>:<hash>``."""
    try:
        return int(window.split(":")[1])
    except (IndexError, ValueError):
        raise ValueError(f"{window!r} is not a window id <dataset>:<index>:<hash>") from None


def stored_scores(task_results: dict[str, Any]) -> WindowScores | None:
    """The per-window scores of one task's results, or None when the file has none."""
    return WindowScores.from_dict(task_results.get(f"{WINDOW_SCORES_METRIC},{FILTER}"))


def scored_indices(task_results: dict[str, Any]) -> list[int]:
    """Document indices of the windows a task's results scored (sorted)."""
    scores = stored_scores(task_results)
    return sorted(window_index(w) for w in scores.ids) if scores is not None else []


def missing_indices(task_results: dict[str, Any] | None, wanted: Iterable[int]) -> list[int]:
    """The windows of ``wanted`` that the results do not hold yet (all of them without results)."""
    have = set(scored_indices(task_results)) if task_results else set()
    return sorted(set(wanted) - have)


def split_windows(task_results: dict[str, Any], indices: Iterable[int]) -> tuple[dict[str, Any], WindowScores]:
    """(``task_results`` without the windows at ``indices``, the scores of those windows).

    Only the window scores are split: ``merge_task_results`` recomputes every metric from them.
    """
    scores = stored_scores(task_results)
    if scores is None:
        raise ValueError("the results have no per-window scores")
    drop = set(indices)
    keep = [i for i, w in enumerate(scores.ids) if window_index(w) not in drop]
    taken = [i for i, w in enumerate(scores.ids) if window_index(w) in drop]

    def pick(rows: list[int]) -> WindowScores:
        return WindowScores(tuple(scores.ids[i] for i in rows), scores.nll[rows], scores.tokens[rows])

    rest = dict(task_results)
    rest[f"{WINDOW_SCORES_METRIC},{FILTER}"] = pick(keep).to_dict()
    return rest, pick(taken)


def anchor_deviation(stored: WindowScores, rescored: WindowScores) -> float:
    """Largest relative difference between a window's stored NLL and the same window scored again.

    A top-up rescored one window the file already holds; a model that is not the one behind the
    file (other code, kernels or statistics) shows here before anything is merged.
    """
    where = {w: float(v) for w, v in zip(stored.ids, stored.nll)}
    deviations = []
    for window, nll in zip(rescored.ids, rescored.nll):
        if window not in where:
            raise ValueError(f"anchor window {window} is not among the stored windows")
        deviations.append(abs(float(nll) - where[window]) / max(abs(where[window]), 1e-300))
    return max(deviations) if deviations else 0.0


def _items(task: Any, docs: Any, scores: WindowScores) -> dict[int, dict[str, Any]]:
    """Each window's ``process_results`` output (the metric items lm-eval aggregates), by index."""
    out: dict[int, dict[str, Any]] = {}
    for window, nll in zip(scores.ids, scores.nll):
        index = window_index(window)
        doc = docs[index]
        if doc.get("window_id") != window:
            raise ValueError(
                f"{task.config.task}: stored window {window} is not the task's window {index} "
                f"({doc.get('window_id')}): the results were scored on other data, tokenizer or max_length"
            )
        # lm-eval hands process_results (loglikelihood, is_greedy); the stored NLL is -loglikelihood.
        out[index] = task.process_results(doc, [(-float(nll), False)])
    return out


def merge_task_results(task: Any, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One task's results over the windows of ``old`` and ``new`` (disjoint), every metric recomputed.

    ``task`` is the lm-eval ``Task`` both were scored with; its documents give each window's
    words and bytes, its ``process_results`` and aggregations compute the metrics.
    """
    old_scores, new_scores = stored_scores(old), stored_scores(new)
    if old_scores is None or new_scores is None:
        raise ValueError(f"{task.config.task}: both results need per-window scores ({WINDOW_SCORES_METRIC}) to merge")
    docs = task.eval_docs
    items = _items(task, docs, old_scores)
    added = _items(task, docs, new_scores)
    overlap = sorted(set(items) & set(added))
    if overlap:
        raise ValueError(f"{task.config.task}: windows {overlap[:5]} were scored twice; nothing merged")
    items.update(added)
    order = sorted(items)
    aggregations = task.aggregation()
    merged = copy.deepcopy(old)
    for metric in items[order[0]]:
        merged[f"{metric},{FILTER}"] = aggregations[metric]([items[i][metric] for i in order])
    merged["sample_len"] = len(order)
    return merged


def merge_results(data: dict[str, Any], extension: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a results dict) with the windows of ``extension`` (a run of the same model) added.

    ``tasks``: leaf task name → lm-eval ``Task``, for every task ``extension`` scored.
    """
    merged = copy.deepcopy(data)
    for name, results in (extension.get("results") or {}).items():
        if name not in tasks:
            continue  # a group's entry: its leaves carry the numbers
        if name not in merged.get("results", {}):
            raise ValueError(f"the results have no task {name!r} to add windows to")
        merged["results"][name] = merge_task_results(tasks[name], merged["results"][name], results)
        counts = merged.setdefault("n-samples", {}).setdefault(name, {})
        counts["effective"] = merged["results"][name]["sample_len"]
    return merged
