"""Per-window perplexity scores and the paired bootstrap the leaderboard puts behind every comparison.

Window scores
    Every perplexity run keeps, for each scored window, its summed NLL (nats) and its number of
    predicted tokens, under a *window id* ``<dataset>:<index>:<hash>`` where ``hash`` is the first
    10 hex digits of the SHA-1 of the window's scored token ids (``window_id``). Two results are
    compared only on the windows whose ids they share: same dataset, same position, same tokens
    (so a different tokenizer, ``max_length`` or data file never pairs by accident).

    * lm-eval tasks (``tasks/utils.py``): metric ``window_scores_for_stderr`` in every ``nsvd_*``
      task; ``process_results`` gives ``(window_id, loglikelihood, n_tokens)`` per document and the
      aggregation (``summarize_items``) returns the dict of ``WindowScores.to_dict``, which lm-eval
      writes into the results JSON like any metric value (no ``--log_samples`` needed). The name
      ends in ``_stderr`` on purpose: lm-eval 0.4.13's ``make_table`` skips metrics ending in
      ``_stderr``, so the printed table does not show hundreds of numbers in one cell, while the
      results JSON keeps them. Its ``stderr_for_metric`` gives ``"N/A"`` for a custom aggregation.
    * ``nsvd-lm ppl --output``: each row has a ``windows`` entry of the same shape.

Paired bootstrap (``paired_change`` / ``paired_cells``)
    The quantity is the relative perplexity change ``ppl_X / ppl_base - 1`` with
    ``ppl = exp(sum NLL / sum tokens)`` over a set of windows. A replicate resamples the *windows*
    (not tokens) with replacement, the same windows for X and base (paired), and recomputes both
    perplexities from the resampled sums. ``N_RESAMPLES`` = 2000 replicates from a fixed seed
    (``BOOTSTRAP_SEED``), percentile 95 % interval. Implemented as a vectorised numpy bootstrap
    (multinomial window counts, then matrix products) rather than ``scipy.stats.bootstrap``
    because the "Avg. Impro." interval needs the joint replicates of several data sets: the mean
    over sets is taken replicate by replicate (each set's windows resampled independently, with
    one shared seed draw), which ``scipy.stats.bootstrap`` cannot express.

Calibration seeds
    With runs of several calibration seeds (X and base paired by seed), the cell is the mean over
    seeds of the per-seed change. The interval accounts for both sources of variance with a
    two-stage (hierarchical) bootstrap: each replicate draws the seeds with replacement *and* the
    windows with replacement (the same window draw for every seed, since all seeds are scored on
    the same windows), and averages the per-seed changes of the drawn seeds. With one seed it is
    the plain paired window bootstrap. With 3 seeds the seed stage is coarse (10 distinct
    multisets); it widens the interval by the seed-to-seed spread, it does not estimate it well.
    ``resample_seeds=False`` keeps the seeds fixed (windows only): the part of the interval that
    more windows can shrink (the adaptive window budget, ``nsvd_lm.experiments.adaptive``, reads it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WINDOW_SCORES_METRIC = "window_scores_for_stderr"
WINDOW_SCORES_FORMAT = "nsvd-window-scores-v1"
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 20240509
CONFIDENCE = 0.95


def window_id(dataset: str, index: int, token_ids: Iterable[int]) -> str:
    """``<dataset>:<index>:<sha1 of the scored token ids, 10 hex digits>``."""
    digest = hashlib.sha1(np.asarray(list(token_ids), dtype="<i8").tobytes()).hexdigest()[:10]
    return f"{dataset}:{int(index)}:{digest}"


@dataclass(frozen=True)
class WindowScores:
    """Summed NLL and predicted tokens of each window of one run on one data set."""

    ids: tuple[str, ...]
    nll: np.ndarray  # float64, summed negative log-likelihood per window (nats)
    tokens: np.ndarray  # int64, predicted tokens per window

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.nll) == len(self.tokens)):
            raise ValueError("window scores: ids, nll and tokens differ in length")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("window scores: duplicate window ids")

    @property
    def n_windows(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def ppl(self) -> float:
        mean = float(self.nll.sum()) / self.n_tokens
        return math.exp(mean) if mean < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": WINDOW_SCORES_FORMAT,
            "n_windows": self.n_windows,
            "n_tokens": self.n_tokens,
            "ids": list(self.ids),
            "nll": [float(v) for v in self.nll],
            "tokens": [int(v) for v in self.tokens],
        }

    @classmethod
    def from_dict(cls, data: Any) -> WindowScores | None:
        """The scores of a results JSON value, or None when it is not a window-scores dict."""
        if not isinstance(data, dict) or data.get("format") != WINDOW_SCORES_FORMAT:
            return None
        return cls(
            ids=tuple(str(i) for i in data["ids"]),
            nll=np.asarray(data["nll"], dtype=np.float64),
            tokens=np.asarray(data["tokens"], dtype=np.int64),
        )

    @classmethod
    def from_lists(cls, ids: Sequence[str], nll: Sequence[float], tokens: Sequence[int]) -> WindowScores:
        return cls(tuple(ids), np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.int64))


def summarize_items(items: list[tuple[str, float, int]]) -> dict[str, Any]:
    """lm-eval aggregation: ``(window_id, loglikelihood, n_tokens)`` per document → ``WindowScores.to_dict``."""
    ids = [str(i) for i, _, _ in items]
    return WindowScores.from_lists(ids, [-float(ll) for _, ll, _ in items], [int(n) for _, _, n in items]).to_dict()


# ----------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class PairedChange:
    """Relative perplexity change of X vs base, in percent (negative = X has lower perplexity)."""

    estimate: float  # mean over seeds of 100 * (ppl_X / ppl_base - 1) on all shared windows
    low: float  # percentile CI bounds (percent)
    high: float
    n_windows: int  # shared windows
    n_tokens: int  # predicted tokens of the shared windows (per run)
    n_seeds: int
    seed_std: float | None  # std over seeds of the per-seed change (ddof=1), None with one seed
    confidence: float = CONFIDENCE
    n_resamples: int = N_RESAMPLES

    @property
    def significant(self) -> bool:
        """The CI excludes 0."""
        return self.low > 0 or self.high < 0

    def as_improvement(self) -> PairedChange:
        """The same interval in the leaderboard's sign (``-change``: + = lower perplexity)."""
        return PairedChange(
            -self.estimate,
            -self.high,
            -self.low,
            self.n_windows,
            self.n_tokens,
            self.n_seeds,
            self.seed_std,
            self.confidence,
            self.n_resamples,
        )


def _shared_matrix(runs: Sequence[WindowScores], ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    nll = np.empty((len(runs), len(ids)))
    tokens = np.empty((len(runs), len(ids)))
    for s, run in enumerate(runs):
        where = {w: i for i, w in enumerate(run.ids)}
        order = [where[w] for w in ids]
        nll[s], tokens[s] = run.nll[order], run.tokens[order]
    return nll, tokens


def _aligned(x_runs: Sequence[WindowScores], base_runs: Sequence[WindowScores]):
    """(NLL_X, tokens_X, NLL_base, tokens_base), each (seeds, shared windows); None without shared windows."""
    shared = set(x_runs[0].ids)
    for run in (*x_runs, *base_runs):
        shared &= set(run.ids)
    ids = [w for w in x_runs[0].ids if w in shared]
    if not ids:
        return None
    return (*_shared_matrix(x_runs, ids), *_shared_matrix(base_runs, ids))


def _log_ppl_change(nll_x, tok_x, nll_b, tok_b):
    """100 * (exp(mean NLL_X - mean NLL_base) - 1), overflow-safe (collapsed models reach 1e5 ppl)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return 100.0 * np.expm1(nll_x / tok_x - nll_b / tok_b)


def _replicates(
    x_runs: Sequence[WindowScores], base_runs: Sequence[WindowScores], rng: np.random.Generator, seed_draw: np.ndarray
) -> tuple[float, np.ndarray, float | None, int, int] | None:
    """(estimate, replicates (B,), seed std, windows, tokens) for one data set, or None without shared windows."""
    aligned = _aligned(x_runs, base_runs)
    if aligned is None:
        return None
    nx, tx, nb, tb = aligned
    n = nx.shape[1]
    per_seed = _log_ppl_change(nx.sum(1), tx.sum(1), nb.sum(1), tb.sum(1))  # (S,)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=seed_draw.shape[0]).astype(np.float64)  # (B, n)
    change = _log_ppl_change(counts @ nx.T, counts @ tx.T, counts @ nb.T, counts @ tb.T)  # (B, S)
    replicates = (change * seed_draw).sum(1) / seed_draw.sum(1)
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
    return float(per_seed.mean()), replicates, std, n, int(tx[0].sum())


def _interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _seed_draw(rng: np.random.Generator, n_seeds: int, n_resamples: int) -> np.ndarray:
    """(B, S) how often each seed is drawn in each replicate (all ones for one seed)."""
    if n_seeds == 1:
        return np.ones((n_resamples, 1))
    picks = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    return np.stack([(picks == s).sum(1) for s in range(n_seeds)], axis=1).astype(np.float64)


def paired_cells(
    pairs: dict[str, tuple[Sequence[WindowScores], Sequence[WindowScores]]],
    average_over: Iterable[str] = (),
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    resample_seeds: bool = True,
) -> tuple[dict[str, PairedChange], PairedChange | None]:
    """Paired CIs of each set's change, and of the mean change over ``average_over`` (see module docstring).

    ``pairs[task] = (x_runs, base_runs)``: one ``WindowScores`` per calibration seed, X and base
    in the same seed order. The average needs every set in ``average_over`` to have a cell and
    the same number of seeds; otherwise it is None.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    draws: dict[int, np.ndarray] = {}
    cells: dict[str, PairedChange] = {}
    reps: dict[str, np.ndarray] = {}
    for task, (x_runs, base_runs) in pairs.items():
        if not x_runs or len(x_runs) != len(base_runs):
            raise ValueError(f"{task}: X and base need the same, non-zero number of seed runs")
        n_seeds = len(x_runs)
        if n_seeds not in draws:
            # resample_seeds=False: every seed in every replicate, the windows alone vary.
            draws[n_seeds] = (
                _seed_draw(rng, n_seeds, n_resamples) if resample_seeds else np.ones((n_resamples, n_seeds))
            )
        got = _replicates(x_runs, base_runs, rng, draws[n_seeds])
        if got is None:
            continue
        estimate, replicates, std, n_windows, n_tokens = got
        low, high = _interval(replicates, confidence)
        cells[task] = PairedChange(estimate, low, high, n_windows, n_tokens, n_seeds, std, confidence, n_resamples)
        reps[task] = replicates

    averaged = list(average_over)
    average = None
    if averaged and all(t in cells for t in averaged) and len({cells[t].n_seeds for t in averaged}) == 1:
        stacked = np.stack([reps[t] for t in averaged])  # (T, B)
        mean_reps = stacked.mean(0)
        low, high = _interval(mean_reps, confidence)
        n_seeds = cells[averaged[0]].n_seeds
        std = None
        if n_seeds > 1:  # the seed spread of the average: per-seed averages over sets
            per_seed = np.mean([_per_seed(pairs[t]) for t in averaged], axis=0)
            std = float(np.std(per_seed, ddof=1))
        average = PairedChange(
            float(np.mean([cells[t].estimate for t in averaged])),
            low,
            high,
            sum(cells[t].n_windows for t in averaged),
            sum(cells[t].n_tokens for t in averaged),
            n_seeds,
            std,
            confidence,
            n_resamples,
        )
    return cells, average


def _per_seed(pair: tuple[Sequence[WindowScores], Sequence[WindowScores]]) -> np.ndarray:
    nx, tx, nb, tb = _aligned(*pair)
    return _log_ppl_change(nx.sum(1), tx.sum(1), nb.sum(1), tb.sum(1))


def paired_change(
    x_runs: Sequence[WindowScores] | WindowScores,
    base_runs: Sequence[WindowScores] | WindowScores,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
    resample_seeds: bool = True,
) -> PairedChange | None:
    """The paired CI of one comparison (one run each, or one per seed); None without shared windows."""
    x = [x_runs] if isinstance(x_runs, WindowScores) else list(x_runs)
    b = [base_runs] if isinstance(base_runs, WindowScores) else list(base_runs)
    cells, _ = paired_cells(
        {"_": (x, b)}, n_resamples=n_resamples, seed=seed, confidence=confidence, resample_seeds=resample_seeds
    )
    return cells.get("_")


def perplexity_interval(
    runs: Sequence[WindowScores] | WindowScores,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Bootstrap CI of one row's perplexity (the mean over seed runs) on the windows all runs scored.

    The same resampling as ``paired_cells``, unpaired: windows with replacement (and, with several
    calibration seeds, the seeds too); each replicate's perplexity is recomputed from the resampled
    sums. For the cells that are not a comparison (the Original, the baselines).
    """
    runs = [runs] if isinstance(runs, WindowScores) else list(runs)
    shared = set(runs[0].ids).intersection(*(r.ids for r in runs[1:]))
    ids = [w for w in runs[0].ids if w in shared]
    if not ids:
        return None
    nll, tokens = _shared_matrix(runs, ids)
    rng = np.random.default_rng(seed)
    seed_draw = _seed_draw(rng, len(runs), n_resamples)
    n = len(ids)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(np.float64)
    with np.errstate(over="ignore"):
        ppl = np.exp(np.minimum((counts @ nll.T) / (counts @ tokens.T), 700.0))  # (B, S)
    return _interval((ppl * seed_draw).sum(1) / seed_draw.sum(1), confidence)
