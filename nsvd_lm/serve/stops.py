"""Stop strings on generated text: where to cut it, and how much of it must not be streamed yet."""

from __future__ import annotations

from typing import Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop string (unchanged if none occurs)."""
    cut = len(text)
    for s in stops:
        if s:
            found = text.find(s)
            if found != -1:
                cut = min(cut, found)
    return text[:cut]


def contains_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s and s in text for s in stops)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` must not be streamed yet: a suffix that may be the
    start of a stop string, or an incomplete multi-byte character (decoded as U+FFFD)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    tail = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, tail)
