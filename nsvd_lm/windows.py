"""Token windows: which tokens a model is calibrated on and scored on, and where BOS goes.

Many causal LMs (Llama 2/3, Mistral, Gemma) are trained with a BOS token at the start of every
sequence, and their tokenizer adds it by default. A window cut out of one long token stream
has no BOS, so the model sees inputs it never saw in training (a Gemma-family model scores
WikiText-2 at ~30 with a BOS per 256-token window and 115-140 without). So every window here
starts with BOS when the tokenizer adds one by default (``bos="auto"``):

* **calibration** windows are ``BOS + (seqlen - 1)`` text tokens at random stream positions
  (``calibration_windows``); a tokenizer that adds no BOS (SmolLM2, GPT-2) gets exactly the
  windows it always got: ``seqlen`` stream tokens;
* **perplexity** windows (``nsvd-lm ppl``, the ``nsvd_*`` lm-eval tasks) are, with BOS, pieces of
  the *text*, each tokenized on its own to at most ``seqlen - 1`` tokens and scored in full
  after BOS (``text_windows``). Cutting text instead of tokens means a window's text
  re-tokenizes to exactly its tokens on any tokenizer (SentencePiece's dummy prefix and byte
  fallback break a decode → re-encode round trip of a token slice), so lm-eval, which only
  sees text, scores the same tokens as the exact path. Without BOS they are disjoint
  ``seqlen``-token stream slices whose first token is context only (SVD-LLM's protocol).

``bos`` modes: ``auto`` (BOS per window iff the tokenizer adds one by default), ``always``
(BOS per window; the tokenizer must have a BOS token), ``never`` (plain stream windows), and
for perplexity also ``first``: SVD-LLM's exact protocol, the text tokenized once with the
tokenizer's defaults, so only the first window starts with BOS. The paper's tables come from
SVD-LLM's evaluation code, i.e. ``first``; for tokenizers without BOS all four are the same.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: config.py reads this module's modes
    import torch

BOS_MODES: tuple[str, ...] = ("auto", "always", "never", "first")
CALIBRATION_BOS_MODES: tuple[str, ...] = ("auto", "always", "never")


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True when ``tokenizer("x")`` starts with the BOS token that ``add_special_tokens=False`` leaves out."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = list(tokenizer("x", verbose=False)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False, verbose=False)["input_ids"])
    return len(with_special) > len(plain) and with_special[0] == bos and with_special[1 : 1 + len(plain)] == plain


def check_bos_mode(mode: str, allowed: tuple[str, ...] = BOS_MODES, name: str = "bos") -> str:
    value = str(mode).strip().lower()
    if value not in allowed:
        raise ValueError(f"{name}={mode!r}; allowed values: {', '.join(allowed)}")
    return value


def bos_per_window(tokenizer: Any, mode: str = "auto") -> bool:
    """Whether every window starts with BOS under ``mode`` (``first`` and ``never``: no)."""
    mode = check_bos_mode(mode)
    if mode == "always":
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise ValueError("bos=always: this tokenizer has no BOS token; use bos=auto or bos=never")
        return True
    if mode == "auto":
        return tokenizer_adds_bos(tokenizer)
    return False


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (verbose=False: long streams on purpose)."""
    return list(tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"])


# ----------------------------------------------------------------------------- calibration


def calibration_windows(
    tokenizer: Any, text: str, nsamples: int, seqlen: int, seed: int, bos: bool = False
) -> "torch.Tensor":
    """``nsamples`` random windows of ``seqlen`` tokens from ``text`` tokenized once (SVD-LLM style).

    With ``bos`` each window is BOS + ``seqlen - 1`` text tokens. Returns a LongTensor
    (nsamples × seqlen). Positions come from ``random.Random(seed)``, so the same settings give
    the same windows on every machine; without BOS these are SVD-LLM's windows, byte for byte.
    """
    import torch

    ids = encode_plain(tokenizer, text)
    body = seqlen - 1 if bos else seqlen
    if body < 1 or len(ids) <= body:
        raise ValueError(f"calibration text has {len(ids)} tokens; calib_seqlen={seqlen} needs more")
    ids_t = torch.tensor(ids, dtype=torch.long)
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - body - 1) for _ in range(nsamples)]
    windows = torch.stack([ids_t[s : s + body] for s in starts])
    if bos:
        prefix = torch.full((nsamples, 1), int(tokenizer.bos_token_id), dtype=torch.long)
        windows = torch.cat([prefix, windows], dim=1)
    return windows


def windows_fingerprint(windows: "torch.Tensor") -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- perplexity windows


@dataclass(frozen=True)
class TextWindow:
    """A piece of the evaluation text and its own tokens (``tokenizer(text, add_special_tokens=False)``)."""

    text: str
    ids: list[int]


def _cut_points(text: str) -> list[int]:
    """Positions where a word starts after whitespace: a window ends with its whitespace."""
    return [i for i in range(1, len(text)) if text[i - 1].isspace() and not text[i].isspace()]


def text_windows(tokenizer: Any, text: str, budget: int, max_windows: int | None = None) -> list[TextWindow]:
    """Consecutive pieces of ``text`` of at most ``budget`` tokens each, every one as long as it can be.

    Each piece ends at a word boundary (after whitespace; anywhere in text without spaces, e.g.
    Chinese) and is tokenized on its own, so its text re-tokenizes to exactly its ids. The rest
    of the text that cannot fill a piece is dropped, as a trailing partial window is.
    """
    if budget < 1:
        raise ValueError(f"window budget must be at least 1 token, got {budget}")
    n_chars = len(text)
    total_tokens = max(1, len(encode_plain(tokenizer, text)))
    chars_per_token = n_chars / total_tokens
    cuts = _cut_points(text)
    windows: list[TextWindow] = []
    pos = 0

    def tokens(a: int, b: int) -> list[int]:
        return encode_plain(tokenizer, text[a:b])

    def longest_fit(candidates: list[int]) -> tuple[int, list[int]] | None:
        """The largest end in ``candidates`` whose piece fits the budget (token count grows with it)."""
        lo, hi, best = 0, len(candidates) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            piece = tokens(pos, candidates[mid])
            if len(piece) <= budget:
                best, lo = (candidates[mid], piece), mid + 1
            else:
                hi = mid - 1
        return best

    while pos < n_chars and (max_windows is None or len(windows) < max_windows):
        span = int(2 * budget * chars_per_token) + 64
        while True:
            reach = min(n_chars, pos + span)
            if reach == n_chars:  # near the end: does the rest still fill a window?
                rest = tokens(pos, n_chars)
                if len(rest) <= budget:
                    if len(rest) == budget:
                        windows.append(TextWindow(text[pos:], rest))
                    return windows
            lo_i, hi_i = bisect.bisect_right(cuts, pos), bisect.bisect_right(cuts, reach)
            word_ends = cuts[lo_i:hi_i]
            best = longest_fit(word_ends) if word_ends else None
            if best is not None and best[0] == word_ends[-1] and reach < n_chars:
                span *= 2  # every candidate fit: the text is denser than guessed, look further
                continue
            if best is None or len(best[1]) < 0.9 * budget:
                # No word boundary near the budget (text without spaces, a very long word): any character.
                anywhere = longest_fit(list(range(pos + 1, reach + 1)))
                if anywhere is not None and (best is None or len(anywhere[1]) > len(best[1])):
                    best = anywhere
            if best is None:
                raise ValueError(f"cannot cut the text at character {pos} into pieces of at most {budget} tokens")
            break
        end, piece = best
        windows.append(TextWindow(text[pos:end], piece))
        pos = end
    return windows
