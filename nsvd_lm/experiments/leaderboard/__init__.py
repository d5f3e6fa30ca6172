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

Modules: ``parse`` (results files -> :class:`ResultEntry`), ``rows`` (entries -> :class:`Row` /
:class:`Leaderboard`, with the improvements and CIs) and ``render`` (Markdown, CSV, PNG).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from nsvd_lm.experiments.leaderboard.parse import (
    BASELINE_METHODS,
    DEFAULT_K1_FRAC,
    DEFAULT_METRIC,
    IMPROVED_METHODS,
    ORIGINAL,
    ResultEntry,
    find_result_files,
    load_results,
    parse_result,
)
from nsvd_lm.experiments.leaderboard.render import comparisons_csv, plot_png, to_csv, to_markdown
from nsvd_lm.experiments.leaderboard.rows import (
    BASELINE_TIE_PCT,
    CALIBRATION_TASKS,
    DATASET_LABELS,
    VERSUS,
    Comparison,
    Leaderboard,
    Row,
    build_leaderboard,
)
from nsvd_lm.files import write_text_atomic

__all__ = [
    "BASELINE_METHODS",
    "BASELINE_TIE_PCT",
    "CALIBRATION_TASKS",
    "DATASET_LABELS",
    "DEFAULT_K1_FRAC",
    "DEFAULT_METRIC",
    "VERSUS",
    "Comparison",
    "comparisons_csv",
    "IMPROVED_METHODS",
    "ORIGINAL",
    "Leaderboard",
    "ResultEntry",
    "Row",
    "build_leaderboard",
    "find_result_files",
    "load_results",
    "parse_result",
    "plot_png",
    "to_csv",
    "to_markdown",
    "write_leaderboard",
]


def write_leaderboard(
    directory: str | os.PathLike | Iterable[str | os.PathLike],
    out_prefix: str | os.PathLike | None = None,
    metric: str = DEFAULT_METRIC,
    model: str | None = None,
    calibration_task: str | None = None,
    plot: bool = True,
    versus: Iterable[str] = (),
) -> dict[str, Path]:
    """Write ``PREFIX.md``, ``PREFIX.csv`` and ``PREFIX.png`` (default prefix ``DIR/leaderboard``), atomically.

    ``directory``: a results folder, a results file, or several of either (the default prefix
    then lies in the first folder, or beside the first file). ``versus``: extra paired
    comparisons (``VERSUS``), a section of the Markdown and ``PREFIX.versus.csv``.
    """
    sources = [Path(directory)] if isinstance(directory, (str, os.PathLike)) else [Path(d) for d in directory]
    if not sources:
        raise ValueError("no results folder or file given")
    board = build_leaderboard(load_results(sources, metric), metric, model, calibration_task, versus=versus)
    if out_prefix is not None:
        prefix = Path(out_prefix)
    else:
        prefix = (sources[0] if sources[0].is_dir() else sources[0].parent) / "leaderboard"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": prefix.with_name(prefix.name + ".md"), "csv": prefix.with_name(prefix.name + ".csv")}
    write_text_atomic(paths["markdown"], to_markdown(board))
    write_text_atomic(paths["csv"], to_csv(board))
    if board.comparisons:
        paths["versus"] = write_text_atomic(prefix.with_name(prefix.name + ".versus.csv"), comparisons_csv(board))
    if plot:
        paths["png"] = plot_png(board, prefix.with_name(prefix.name + ".png"))
    return paths
