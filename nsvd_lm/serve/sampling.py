"""Next-token choice from a batch of logits: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0.0 <= temperature <= 100.0:
        raise ValueError(f"temperature must be a number in [0, 100] (0 = greedy); got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1]; got {top_p!r}")


def choose_next_tokens(
    logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``logits`` (batch, vocab) -> token ids (batch,). ``temperature == 0`` means greedy (argmax)."""
    logits = np.asarray(logits, dtype=np.float32)
    if temperature <= 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    rng = rng if rng is not None else np.random.default_rng()
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    chosen = np.empty(probs.shape[0], dtype=np.int64)
    for row, p in enumerate(probs):
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            sorted_p = p[order]
            # Keep the smallest prefix whose mass reaches top_p (a token is kept if the mass
            # before it is still below top_p; the most likely token is always kept).
            before = np.cumsum(sorted_p) - sorted_p
            keep = order[before < top_p]
            kept = p[keep] / p[keep].sum()
            chosen[row] = keep[rng.choice(len(keep), p=kept)]
        else:
            chosen[row] = rng.choice(len(p), p=p)
    return chosen


def choose_per_row(
    logits: np.ndarray, temperatures: np.ndarray, top_ps: np.ndarray, rngs: list[np.random.Generator]
) -> np.ndarray:
    """``logits`` (batch, vocab), one temperature / top-p / generator per row -> token ids (batch,).
    Greedy rows are chosen together with one argmax; a sampled row draws from its own generator
    exactly as :func:`choose_next_tokens` does for a batch of one (so seeds reproduce)."""
    sampled = np.flatnonzero(temperatures > 0.0)
    if sampled.size == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    chosen = logits.argmax(axis=-1).astype(np.int64) if sampled.size < len(logits) else np.empty(len(logits), np.int64)
    for row in sampled:
        chosen[row] = choose_next_tokens(
            logits[row : row + 1], float(temperatures[row]), float(top_ps[row]), rngs[row]
        )[0]
    return chosen
