"""lm-eval hooks for the ``nsvd_*`` perplexity tasks: one document per scored window.

lm-eval 0.4.13 merges ``--model_args`` and ``--metadata`` into each task's metadata and calls
``custom_dataset(**metadata)``. So the dataset builder sees ``pretrained=`` / ``tokenizer=``
and ``max_length=``: it tokenizes the text with the model's tokenizer and cuts the windows
itself, the same windows as ``nsvd-lm ppl --bos auto`` (``nsvd_lm.windows``). Without
``pretrained=`` it uses the tokenizer of the default model, like ``--model nsvd`` does.

Each document is scored as a ``loglikelihood`` request with an empty context: lm-eval puts the
model's prefix token (BOS, else EOS) before it and scores every token of the document, with
the document tokenized *without* special tokens. (``loglikelihood_rolling`` would tokenize it
*with* them, so a tokenizer that adds BOS by default got BOS twice and a scored P(BOS | BOS).)

* Tokenizers that add BOS by default (Llama, Mistral, Gemma): document k is the k-th piece of
  the text, of at most L-1 tokens (L = ``max_length``, default 2048), cut at a word boundary
  and tokenized on its own, so it re-tokenizes to exactly the tokens the exact path scores
  after BOS. No decode → re-encode round trip is involved.
* Tokenizers without BOS (SmolLM2, GPT-2): window k is stream tokens ``[k*L, (k+1)*L)`` (the
  SVD-LLM protocol), whose last L-1 tokens are scored; document k is the decoded text of those
  L-1 tokens (less the pieces of a character split by a window edge, see ``_window_text``),
  and the prefix token stands where the window's first (context-only) token was. Every
  document is checked to re-tokenize to its window's tokens.

Quick mode: ``--limit N`` scores the first N windows; ``max_windows`` (metadata) caps the
document list itself. Either way the ``n_windows`` metric says how many windows were scored
and ``n_windows_full`` how many a full run scores, in the printed table and the results JSON.

This file is loaded by lm-eval from its path (not as ``nsvd_lm.tasks.utils``), so it only uses
absolute imports.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import re
from typing import Any

from nsvd_lm.context import context_length
from nsvd_lm.experiments.evaldata import DATASET_NAMES, EvalText, load_eval_text
from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, summarize_items, window_id
from nsvd_lm.experiments.ppl import count_windows, encode_text
from nsvd_lm.lmeval.model_args import TaskOptions, known_model_args, option_default, option_names
from nsvd_lm.windows import encode_plain, text_windows, tokenizer_adds_bos

logger = logging.getLogger("nsvd_lm.tasks")

# Keys these tasks read from metadata (model_args | --metadata): declared, with defaults and help,
# in nsvd_lm/lmeval/model_args.py, the one list of model_args that --model nsvd reads too.
TASK_KEYS = option_names(TaskOptions)
DEFAULT_MAX_LENGTH = option_default(TaskOptions, "max_length")  # lm-eval HFLM's default window
# Keys passed to AutoTokenizer like HFLM does.
TOKENIZER_KEYS = ("revision", "trust_remote_code", "use_fast_tokenizer", "add_bos_token")
# Put there by lm-eval itself (YAML metadata, task factory).
LM_EVAL_KEYS = ("version", "config_source")


# --------------------------------------------------------------------------- metadata


@functools.lru_cache(maxsize=1)
def _known_model_keys() -> frozenset[str]:
    """Every model_args key of ``--model nsvd`` (a superset of ``--model hf``'s), and lm-eval's own."""
    return frozenset(known_model_args()) | set(TOKENIZER_KEYS) | set(LM_EVAL_KEYS)


def check_metadata_keys(metadata: dict[str, Any]) -> None:
    """Reject a key that looks like a misspelt task key; other unknown keys are model args."""
    known = _known_model_keys() | set(TASK_KEYS)
    for key in metadata:
        if key in known:
            continue
        close = difflib.get_close_matches(key, TASK_KEYS, n=1, cutoff=0.75)
        if close:
            raise ValueError(
                f"unknown metadata key {key!r} for the nsvd tasks (did you mean {close[0]!r}?); "
                f"task keys: {', '.join(TASK_KEYS)}"
            )
        logger.warning("nsvd tasks ignore metadata key %r (taken to be a model argument)", key)


def _default_window_length(metadata: dict[str, Any]) -> int:
    """The window length when ``max_length`` is not given: HFLM's default (2048), except for lm-eval's
    OpenAI-API clients (``local-completions`` & co., recognised by ``base_url`` in model_args).

    Those keep one token of their ``max_length`` (default 2048) for generation and left-truncate a
    longer request, so a 2048-token window would lose its first token; the windows are then one
    token shorter than the client's default, which it scores whole. To score the same 2048-token
    windows as ``--model nsvd``, give the client ``max_length=2049`` and the tasks ``--metadata
    '{"max_length": 2048}'`` (docs/onnx.md).
    """
    if "base_url" not in metadata:
        return DEFAULT_MAX_LENGTH
    import inspect

    from lm_eval.models.api_models import TemplateAPI

    client_default = inspect.signature(TemplateAPI.__init__).parameters["max_length"].default
    window = int(client_default) - 1
    logger.warning(
        "nsvd tasks: lm-eval's API client keeps 1 of its max_length=%d tokens for generation, so the windows "
        "are %d tokens; for %d-token windows pass max_length=%d in --model_args and --metadata "
        "'{\"max_length\": %d}'",
        client_default,
        window,
        DEFAULT_MAX_LENGTH,
        DEFAULT_MAX_LENGTH + 1,
        DEFAULT_MAX_LENGTH,
    )
    return window


def _positive_int(metadata: dict[str, Any], key: str, default: int | None) -> int | None:
    value = metadata.get(key, default)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"metadata {key}={value!r} must be a positive integer") from None
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"metadata {key}={value!r} must be a positive integer")
    return number


def _tokenizer_name(metadata: dict[str, Any]) -> str:
    """``tokenizer=``, else ``pretrained=``, else the default model of ``--model nsvd``."""
    for key in ("tokenizer", "pretrained"):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    from nsvd_lm.smollm2 import default_pretrained

    return str(default_pretrained(argument="pretrained="))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str, revision: str | None, trust_remote_code: bool, use_fast: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        name, revision=revision or "main", trust_remote_code=trust_remote_code, use_fast=use_fast
    )


def _model_max_positions(name: str, revision: str | None, trust_remote_code: bool) -> int | None:
    """The model's context length from its config, or None when there is no config to read."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, revision=revision or "main", trust_remote_code=trust_remote_code)
    except Exception as exc:  # a tokenizer-only folder, or offline without the config
        logger.debug("cannot read the model config of %s: %s", name, exc)
        return None
    return context_length(config)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


# --------------------------------------------------------------------------- dataset


_REPLACEMENT = "\ufffd"
_MAX_PARTIAL_TOKENS = 3  # a UTF-8 character has at most 4 bytes


def _window_text(tokenizer: Any, ids: list[int], start: int, end: int) -> tuple[list[int], str]:
    """Decoded text of ``ids[start:end]``, dropping tokens that hold part of a character.

    Byte-level tokenizers split CJK characters over several tokens, so a window boundary can
    fall inside a character; decoding that gives U+FFFD, which re-tokenizes into other tokens.
    Those boundary pieces (at most 3 tokens a side) are left unscored instead.
    """

    def decode(a: int, b: int) -> str:
        return tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(start, end)
    for _ in range(_MAX_PARTIAL_TOKENS):
        if not text.startswith(_REPLACEMENT) or end - start < 2:
            break
        start += 1
        text = decode(start, end)
    for _ in range(_MAX_PARTIAL_TOKENS):
        if not text.endswith(_REPLACEMENT) or end - start < 2:
            break
        end -= 1
        text = decode(start, end)
    return list(ids[start:end]), text


_MAX_EDGE_TRIM = 4


def _roundtrip_window(tokenizer: Any, ids: list[int], start: int, end: int) -> tuple[list[int], str]:
    """``_window_text``, then edge tokens left unscored until the text re-tokenizes to the window's ids.

    Byte-level BPE merges runs of whitespace differently when the text after them is cut off
    ("\n" "\n" in the stream, "\n\n" alone), so a window ending in whitespace can come back one
    token shorter; dropping the window's last tokens (at most 4, then its first ones) fixes that.
    """
    for cut_end in range(_MAX_EDGE_TRIM + 1):
        for cut_start in range(_MAX_EDGE_TRIM + 1):
            if end - cut_end - (start + cut_start) < 2:
                break
            window_ids, text = _window_text(tokenizer, ids, start + cut_start, end - cut_end)
            if encode_plain(tokenizer, text) == list(window_ids):
                return window_ids, text
    return _window_text(tokenizer, ids, start, end)


def _document(
    eval_text: EvalText, tokenizer_name: str, text: str, window: int, window_ids: list[int], **counts: Any
) -> dict:
    n_tokens = len(window_ids)
    return {
        "text": text,
        "window": window,
        "window_id": window_id(eval_text.name, window, window_ids),
        **counts,
        "window_tokens": n_tokens,
        "scored_tokens": n_tokens,
        "roundtrip_exact": True,
        "dataset": eval_text.name,
        "label": eval_text.label,
        "split": eval_text.split,
        "source": eval_text.source,
        "origin": eval_text.origin,
        "substitute": eval_text.substitute,
        "tokenizer": tokenizer_name,
    }


def window_documents(
    eval_text: EvalText,
    tokenizer: Any,
    max_length: int,
    max_windows: int | None = None,
) -> list[dict[str, Any]]:
    """One lm-eval document per scored window of ``eval_text`` (see the module docstring)."""
    tokenizer_name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    bos = tokenizer_adds_bos(tokenizer)
    if bos:
        pieces = text_windows(tokenizer, eval_text.text, max_length - 1)
        n_available = len(pieces)
        n_full = n_available if eval_text.max_windows is None else min(n_available, eval_text.max_windows)
        n_stream = len(encode_plain(tokenizer, eval_text.text))
    else:
        ids = encode_text(tokenizer, eval_text.text)
        n_stream = len(ids)
        n_full, n_available = count_windows(len(ids), max_length, eval_text.max_windows)
    if n_full == 0:
        raise ValueError(
            f"dataset {eval_text.name!r} has {n_stream} tokens, fewer than one window of max_length={max_length}"
        )
    cap = n_full if max_windows is None else min(n_full, max_windows)
    counts = {
        "n_windows": cap,
        "n_windows_full": n_full,
        "n_windows_available": n_available,
        "capped": cap < n_full,
        "stream_tokens": n_stream,
        "max_length": max_length,
        "bos_per_window": bos,
    }

    documents = []
    for k in range(cap):
        if bos:
            window_ids, text = pieces[k].ids, pieces[k].text
        else:
            window_ids, text = _roundtrip_window(tokenizer, ids, k * max_length + 1, (k + 1) * max_length)
        # What the harness scores: the document tokenized without special tokens (HFLM.loglikelihood).
        if encode_plain(tokenizer, text) != list(window_ids):
            raise ValueError(
                f"nsvd_{eval_text.name}: window {k} does not re-tokenize to its own tokens with {tokenizer_name}; "
                "the task would score other tokens than nsvd-lm ppl"
            )
        documents.append(_document(eval_text, tokenizer_name, text, k, list(window_ids), **counts))

    if cap < n_full:
        logger.warning(
            "nsvd_%s: QUICK MODE, scoring %d of %d windows (max_windows=%s); not a full-protocol number",
            eval_text.name,
            cap,
            n_full,
            max_windows,
        )
    if eval_text.substitute:
        logger.warning("nsvd_%s: %s", eval_text.name, eval_text.notes)
    return documents


def build_dataset(name: str, **metadata: Any) -> Any:
    """The ``custom_dataset`` of task ``nsvd_<name>``: a DatasetDict with one "test" split."""
    import datasets

    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    check_metadata_keys(metadata)
    max_length = _positive_int(metadata, "max_length", _default_window_length(metadata))
    max_windows = _positive_int(metadata, "max_windows", None)
    assert max_length is not None
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too short for a perplexity window")

    tokenizer_name = _tokenizer_name(metadata)
    revision = metadata.get("revision")
    trust_remote_code = _as_bool(metadata.get("trust_remote_code", False))
    model_name = metadata.get("pretrained") if isinstance(metadata.get("pretrained"), str) else tokenizer_name
    max_positions = _model_max_positions(model_name, revision, trust_remote_code)
    if max_positions is not None and max_length > max_positions:
        raise ValueError(
            f"max_length={max_length} is larger than the model allows ({max_positions} positions in "
            f"{model_name}'s config); pass a smaller max_length in --model_args"
        )

    eval_text = load_eval_text(name, data_dir=metadata.get("data_dir"), split=metadata.get("split"))
    tokenizer = _load_tokenizer(
        tokenizer_name, revision, trust_remote_code, _as_bool(metadata.get("use_fast_tokenizer", True))
    )
    documents = window_documents(eval_text, tokenizer, max_length, max_windows=max_windows)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(documents)})


def nsvd_wikitext2(**metadata: Any) -> Any:
    return build_dataset("wikitext2", **metadata)


def nsvd_ptb(**metadata: Any) -> Any:
    return build_dataset("ptb", **metadata)


def nsvd_c4(**metadata: Any) -> Any:
    return build_dataset("c4", **metadata)


def nsvd_snips(**metadata: Any) -> Any:
    return build_dataset("snips", **metadata)


def nsvd_alpaca_eval(**metadata: Any) -> Any:
    return build_dataset("alpaca_eval", **metadata)


def nsvd_mctest(**metadata: Any) -> Any:
    return build_dataset("mctest", **metadata)


def nsvd_cmrc(**metadata: Any) -> Any:
    return build_dataset("cmrc", **metadata)


def nsvd_alpaca_eval_ja(**metadata: Any) -> Any:
    return build_dataset("alpaca_eval_ja", **metadata)


# --------------------------------------------------------------------------- metrics


# Chinese and Japanese are written without spaces: each hanzi/kanji/kana counts as one word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def count_words(text: str) -> int:
    """Whitespace-separated words, with every CJK character counted as a word."""
    return len(_WORD.findall(text))


def process_results(doc: dict[str, Any], results: list[float]) -> dict[str, Any]:
    """Per-window (loglikelihood, weight) pairs for lm-eval's weighted aggregations.

    ``window_scores_for_stderr`` keeps each window's (id, loglikelihood, tokens) for the
    leaderboard's paired bootstrap (``nsvd_lm.experiments.paired``; why the name ends in
    ``_stderr``: lm-eval's printed table skips such metrics, the results JSON keeps them).
    """
    (result,) = results
    # loglikelihood requests give (logprob, is_greedy); loglikelihood_rolling gives the logprob.
    loglikelihood = result[0] if isinstance(result, (tuple, list)) else result
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    n_words = count_words(text)  # windows cut mid-word: a split word counts in both windows
    return {
        "token_perplexity": (loglikelihood, doc["scored_tokens"]),
        "word_perplexity": (loglikelihood, n_words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
        "n_windows": 1,
        "n_windows_full": doc["n_windows_full"],
        WINDOW_SCORES_METRIC: (doc["window_id"], loglikelihood, doc["scored_tokens"]),
    }


def weighted_perplexity(items: list[tuple[float, int]]) -> float:
    """lm-eval's ``weighted_perplexity``, but inf instead of an OverflowError that ends the run."""
    from lm_eval.api.metrics import weighted_perplexity as lm_eval_weighted_perplexity

    try:
        return lm_eval_weighted_perplexity(items)
    except OverflowError:
        return math.inf


def windows_scored(items: list[int]) -> int:
    """Aggregation of ``n_windows``: windows this run scored (after --limit and max_windows)."""
    return int(sum(items))


def windows_full(items: list[int]) -> int:
    """Aggregation of ``n_windows_full``: windows a full run scores (same value on every doc)."""
    return int(max(items)) if items else 0


def window_scores(items: list[tuple[str, float, int]]) -> dict[str, Any]:
    """Aggregation of ``window_scores_for_stderr``: every window's id, summed NLL and token count (a dict)."""
    return summarize_items(items)
