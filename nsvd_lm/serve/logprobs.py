"""Token log-probabilities for the OpenAI API: scoring logits rows, and the ``logprobs`` objects.

Engine-agnostic: the engine hands over logits rows (one per scored position) and the token
chosen or given at each position; this module turns them into

* :class:`TokenScores` — per position the token's log-probability under the model, and the
  ``top_n`` most likely tokens with theirs (the raw model distribution: log-softmax of the
  logits, before temperature or top-p, as OpenAI and vLLM report them);
* the legacy completions object ``choices[].logprobs`` = ``{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}`` (:func:`completion_logprobs`), where with ``echo`` the first
  prompt token has ``null`` log-probability and ``null`` top entries (nothing precedes it);
* the chat object ``choices[].logprobs`` = ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs"}], "refusal": null}`` (:func:`chat_logprobs`).

Conventions (those of vLLM's OpenAI server, which lm-eval's ``local-completions`` is tested on):

* ``tokens[i]`` is token ``i`` decoded alone (special tokens shown). A token holding part of a
  multi-byte character decodes to U+FFFD; ``bytes`` in chat is that string's UTF-8.
* ``top_logprobs[i]`` maps token strings to log-probabilities, most likely first: the ``top_n``
  most likely tokens, plus the token itself when it is not among them (so it may hold
  ``top_n + 1`` entries, as in OpenAI's API). Two tokens that decode to the same string share
  one key, which keeps the larger value, so ``max(top_logprobs[i].values())`` is always the
  most likely token's log-probability (lm-eval's ``is_greedy`` test reads exactly that).
* ``text_offset[i]`` is exact: the number of characters of the returned text completed before
  token ``i`` (incremental detokenization, so characters split over tokens and tokenizers that
  drop a word's leading space at a slice start are counted right, unlike summing the lengths of
  the tokens decoded alone). One exception: a tokenizer whose ``clean_up_tokenization_spaces``
  is on (rare now: off for Llama, Mistral, Qwen2, SmolLM2) deletes a space when the next token is
  punctuation, after that space was decoded, so no offset is exact there; offsets are then those
  of the text without the clean-up, capped at the text's length.
* ``-inf`` (a token the model gives probability 0, e.g. masked out) is reported as ``-9999.0``,
  as vLLM does, because JSON has no infinity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# The largest ``logprobs`` (completions) / ``top_logprobs`` (chat) a request may ask: OpenAI's own
# chat bound, and vLLM's default ``max_logprobs``.
MAX_TOP_LOGPROBS = 20
# How JSON carries a log-probability of -inf.
NEG_INF_LOGPROB = -9999.0
_REPLACEMENT = "\ufffd"


@dataclass
class TokenScores:
    """Per scored position: the token, its log-probability, and the ``top_n`` most likely tokens.

    ``logprobs[i]`` is None only for a position with nothing before it (an echoed prompt's first
    token); then ``top[i]`` is None too."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def append_unscored(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
        self.logprobs.append(None)
        self.top.append(None)

    def extend(self, other: "TokenScores") -> None:
        self.token_ids.extend(other.token_ids)
        self.logprobs.extend(other.logprobs)
        self.top.extend(other.top)


def check_top_n(value: Any, name: str) -> int:
    """``value`` as a top-N count in [0, MAX_TOP_LOGPROBS]; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ValueError(f"'{name}' must be an integer in [0, {MAX_TOP_LOGPROBS}]; got {str(value)[:40]!r}")
    return value


def score_rows(logits: np.ndarray, targets: Sequence[int], top_n: int) -> TokenScores:
    """Log-probabilities of ``targets[i]`` under ``log_softmax(logits[i])``, and each row's ``top_n``.

    ``logits`` is (rows, vocab), any float dtype. The normaliser is accumulated in float64 (the
    exponentials in float32), so a 2048-token prompt's summed log-probability is accurate far
    below lm-eval's printed digits without a float64 copy of the rows."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (rows, vocab); got shape {logits.shape}")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"need one target per logits row; got {targets.shape[0]} targets for {logits.shape[0]} rows")
    check_top_n(top_n, "top_n")
    rows = logits.astype(np.float32, copy=False)
    peak = rows.max(axis=1, keepdims=True)
    finite_peak = np.where(np.isfinite(peak), peak, 0.0).astype(np.float32)
    shifted = rows - finite_peak
    total = np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64)
    logz = finite_peak[:, 0].astype(np.float64) + np.log(total)
    index = np.arange(rows.shape[0])
    chosen = rows[index, targets].astype(np.float64) - logz
    scores = TokenScores(token_ids=[int(t) for t in targets], logprobs=[_finite(v) for v in chosen])
    if top_n == 0:
        scores.top = [[] for _ in index]
        return scores
    k = min(top_n, rows.shape[1])
    if k == 1:  # lm-eval's case: argmax is ~50x cheaper than a partition (first maximum on ties)
        top_ids = rows.argmax(axis=1)[:, None]
        top_vals = rows[index, top_ids[:, 0]][:, None].astype(np.float64) - logz[:, None]
    else:
        part = np.argpartition(-rows, k - 1, axis=1)[:, :k]
        part_vals = np.take_along_axis(rows, part, axis=1)
        # Ties broken by the smaller token id, so the set and its order are deterministic: where
        # more tokens than fit share the k-th value, the partition chose among them arbitrarily.
        kth = part_vals.min(axis=1)
        for r in np.nonzero((rows >= kth[:, None]).sum(axis=1) > k)[0]:
            above = np.nonzero(rows[r] > kth[r])[0]
            tied = np.nonzero(rows[r] == kth[r])[0][: k - len(above)]
            part[r] = np.concatenate([above, tied])
            part_vals[r] = rows[r, part[r]]
        order = np.lexsort((part, -part_vals), axis=1)  # most likely first
        top_ids = np.take_along_axis(part, order, axis=1)
        top_vals = np.take_along_axis(part_vals, order, axis=1).astype(np.float64) - logz[:, None]
    scores.top = [[(int(i), _finite(v)) for i, v in zip(ids, vals)] for ids, vals in zip(top_ids, top_vals)]
    return scores


def _finite(value: float) -> float:
    value = float(value)
    return value if value > NEG_INF_LOGPROB else NEG_INF_LOGPROB


def token_text(tokenizer: Any, token_id: int) -> str:
    """Token ``token_id`` decoded alone, special tokens shown (the ``tokens`` entries)."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def text_offsets(tokenizer: Any, token_ids: Sequence[int], skip_special_tokens: bool = False) -> tuple[list[int], str]:
    """(offsets, text): ``text`` is ``token_ids`` decoded, ``offsets[i]`` the characters of it
    completed before token ``i``.

    Incremental detokenization (as in vLLM and transformers' streamers): each token's new text is
    ``decode(ids[a:i+1])`` minus ``decode(ids[a:i])`` for a few tokens of context ``a``, held back
    while it ends in an incomplete character (U+FFFD), so a character split over byte tokens is
    counted once, at the token that completes it."""
    ids = [int(t) for t in token_ids]

    def decode(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    offsets: list[int] = []
    pieces: list[str] = []
    length = 0
    prefix, read = 0, 0  # decode(ids[prefix:read]): the last text emitted, context for the next token
    before = ""
    for i in range(len(ids)):
        offsets.append(length)
        after = decode(prefix, i + 1)
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            piece = after[len(before) :]
            pieces.append(piece)
            length += len(piece)
            prefix, read = read, i + 1
            before = decode(prefix, read)
    if read < len(ids):  # the text ends inside a character: emit what is left (U+FFFD included)
        tail = decode(prefix, len(ids))[len(decode(prefix, read)) :]
        pieces.append(tail)
    return offsets, "".join(pieces)


def _top_dict(tokenizer: Any, token_id: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, float]:
    entries = list(top)
    if all(i != token_id for i, _ in entries):
        entries.append((token_id, logprob))
    entries.sort(key=lambda e: -e[1])
    out: dict[str, float] = {}
    for i, value in entries:
        out.setdefault(token_text(tokenizer, i), value)  # a shared string keeps the larger value
    return out


def completion_logprobs(tokenizer: Any, scores: TokenScores, text_offset: Sequence[int]) -> dict[str, Any]:
    """The completions API's ``choices[].logprobs`` for ``scores`` (echoed prompt tokens, then
    generated ones), with ``text_offset`` from :func:`text_offsets` of the returned text."""
    if len(text_offset) != len(scores):
        raise ValueError(f"need one text offset per token; got {len(text_offset)} for {len(scores)} tokens")
    tops: list[dict[str, float] | None] = []
    for token_id, logprob, top in zip(scores.token_ids, scores.logprobs, scores.top):
        tops.append(None if logprob is None else _top_dict(tokenizer, token_id, logprob, top or []))
    return {
        "tokens": [token_text(tokenizer, t) for t in scores.token_ids],
        "token_logprobs": list(scores.logprobs),
        "top_logprobs": tops,
        "text_offset": [int(o) for o in text_offset],
    }


def _chat_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, scores: TokenScores) -> dict[str, Any]:
    """The chat API's ``choices[].logprobs`` for generated tokens (every position scored)."""
    content = []
    for token_id, logprob, top in zip(scores.token_ids, scores.logprobs, scores.top):
        if logprob is None:
            raise ValueError("chat logprobs cover generated tokens only; every position must be scored")
        entry = _chat_entry(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [_chat_entry(tokenizer, i, v) for i, v in (top or [])]
        content.append(entry)
    return {"content": content, "refusal": None}
