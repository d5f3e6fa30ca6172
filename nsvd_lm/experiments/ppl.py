"""Exact reference perplexity, directly in PyTorch; the windows and BOS come from ``nsvd_lm.windows``.

Without BOS per window (``bos="never"``, ``"first"``, or ``"auto"`` on a tokenizer that adds
none, e.g. SmolLM2) this is SVD-LLM's protocol: the text is tokenized once, cut into
``n = numel // seqlen`` disjoint full windows (a trailing partial window is dropped), and each
window predicts its last ``seqlen - 1`` tokens from the tokens before them. ``"first"``
tokenizes with the tokenizer's defaults (SVD-LLM's ``tokenizer(text)``: BOS only at the very
start) and is what the paper's tables use. With BOS per window (``"auto"`` on Llama/Mistral/
Gemma tokenizers, or ``"always"``) each window is BOS + a piece of the text of at most
``seqlen - 1`` tokens, all of them predicted. Perplexity is ``exp(mean NLL over all predicted
tokens)``.

``count_windows`` is shared with the lm-eval tasks (``nsvd_lm.tasks``) so both paths score the
same windows.

Per-window scores: every result also keeps each window's summed NLL and predicted-token count
(``window_nll``, ``window_tokens``) under a window id (``nsvd_lm.experiments.paired.window_id``:
dataset, index, hash of the scored tokens), for paired comparisons between models. The aggregate
``nll_sum`` is still accumulated batch by batch exactly as before (so ``ppl`` keeps its bits);
each window's sum is the same ``cross_entropy(..., reduction="sum")`` over that window's rows,
identical to the batch sum when ``batch_size=1`` and equal to it up to float32 rounding otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from nsvd_lm.context import context_length

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll_mean)
    nll_mean: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int  # windows scored
    n_tokens_predicted: int  # = n_windows * (seqlen - 1)
    n_windows_available: int = 0  # full windows in the text
    n_windows_full: int = 0  # windows a full run scores: all, or the dataset's protocol cap (C4: 256)
    n_tokens_total: int = 0  # tokens in the whole stream
    seqlen: int = 0
    max_windows: int | None = None  # cap that was applied (None = all windows)
    bos_per_window: bool = False  # windows were BOS + a piece of text (nsvd_lm.windows)
    window_ids: tuple[str, ...] = ()  # nsvd_lm.experiments.paired.window_id of each scored window
    window_nll: tuple[float, ...] = ()  # summed NLL (nats) of each scored window
    window_tokens: tuple[int, ...] = ()  # predicted tokens of each scored window

    @property
    def capped(self) -> bool:
        """True when a quick-mode cap scored fewer windows than a full run would."""
        return self.n_windows < self.n_windows_full

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "capped": self.capped}

    def window_scores(self) -> Any:
        """The per-window scores as ``nsvd_lm.experiments.paired.WindowScores``."""
        from nsvd_lm.experiments.paired import WindowScores

        return WindowScores.from_lists(self.window_ids, self.window_nll, self.window_tokens)


def _row_sums(loss_sum: Any, logits: Any, labels: Any, **kwargs: Any) -> list[float]:
    """Each row's summed cross-entropy; the batch's own sum when the batch has one row (same bits)."""
    import torch.nn.functional as F

    if logits.size(0) == 1:
        return [float(loss_sum)]
    return [
        float(F.cross_entropy(logits[i].reshape(-1, logits.size(-1)), labels[i].reshape(-1), reduction="sum", **kwargs))
        for i in range(logits.size(0))
    ]


def _score_bos_windows(
    model: Any,
    windows: list[list[int]],
    bos_id: int,
    batch_size: int,
    device: Any,
    progress: bool,
    per_window: list | None = None,
):
    """Summed NLL and predicted-token count of ``[BOS] + ids`` over all windows (right-padded batches).

    ``per_window``: a list that receives ``(nll_sum, n_tokens)`` of each window.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    nll_sum, n_predicted = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        rows = [[bos_id, *ids] for ids in windows[start : start + batch_size]]
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        batch, mask = batch.to(device), mask.to(device)
        logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits[:, :-1, :].float()
        labels = batch[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # padding is not predicted
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum", ignore_index=-100
        )
        nll_sum += float(loss)
        n_predicted += int((labels != -100).sum())
        if per_window is not None:
            counts = (labels != -100).sum(dim=1).tolist()
            per_window.extend(zip(_row_sums(loss, logits, labels, ignore_index=-100), counts))
        del logits
    return nll_sum, n_predicted


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of the whole stream, with the tokenizer's default special tokens (SVD-LLM)."""
    # verbose=False: a 300k-token stream is longer than model_max_length on purpose.
    return list(tokenizer(text, verbose=False)["input_ids"])


def count_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> tuple[int, int]:
    """(windows scored, full windows available) for a stream of ``n_tokens``."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows}")
    available = n_tokens // seqlen
    scored = available if max_windows is None else min(available, max_windows)
    return scored, available


def perplexity(
    model: Any,
    tokenizer_or_ids: Any,
    text: str | None = None,
    seqlen: int = 2048,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: "str | torch.device | None" = None,
    progress: bool = True,
    bos: str = "auto",
    dataset: str = "text",
) -> PerplexityResult:
    """Token perplexity of ``model`` on ``text`` in disjoint windows of ``seqlen`` positions.

    ``tokenizer_or_ids`` is a tokenizer (then ``text`` is tokenized once) or the already
    tokenized stream (1-D tensor or sequence of ints; ``text`` must be None; no BOS is added).
    ``bos`` is one of ``nsvd_lm.windows.BOS_MODES`` (see the module docstring).
    ``max_windows`` scores only the first N windows. ``device`` defaults to the model's.
    ``dataset`` names the windows in ``window_ids``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    max_positions = context_length(getattr(model, "config", None))
    if max_positions is not None and seqlen > max_positions:
        raise ValueError(f"seqlen {seqlen} is larger than the model allows (max_position_embeddings={max_positions})")

    if isinstance(tokenizer_or_ids, torch.Tensor) or (
        isinstance(tokenizer_or_ids, Sequence) and not isinstance(tokenizer_or_ids, str)
    ):
        if text is not None:
            raise ValueError("pass either a tokenizer and text, or token ids with text=None")
        ids = torch.as_tensor(tokenizer_or_ids, dtype=torch.long).reshape(-1)
    else:
        if text is None:
            raise ValueError("text is required when a tokenizer is given")
        from nsvd_lm.windows import bos_per_window, check_bos_mode, encode_plain, text_windows

        mode = check_bos_mode(bos)
        if bos_per_window(tokenizer_or_ids, mode):
            return _text_window_perplexity(
                model,
                tokenizer_or_ids,
                text_windows(tokenizer_or_ids, text, seqlen - 1),
                seqlen,
                batch_size,
                max_windows,
                device,
                progress,
                n_tokens_total=len(encode_plain(tokenizer_or_ids, text)),
                dataset=dataset,
            )
        encode = encode_text if mode == "first" else encode_plain
        ids = torch.tensor(encode(tokenizer_or_ids, text), dtype=torch.long)

    n_scored, n_available = count_windows(ids.numel(), seqlen, max_windows)
    if n_scored == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids[: n_scored * seqlen].view(n_scored, seqlen)

    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0  # float64 accumulation: ~500k token losses
    n_predicted = 0
    per_window: list[float] = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, n_scored, batch_size), desc="perplexity", unit="batch", disable=not progress):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                # Position t predicts token t+1: the window's first token is context only.
                shift_logits = logits[:, :-1, :].float()
                labels = batch[:, 1:]
                loss = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), labels.reshape(-1), reduction="sum"
                )
                nll_sum += float(loss)
                n_predicted += labels.numel()
                per_window.extend(_row_sums(loss, shift_logits, labels))
                del logits, shift_logits
    finally:
        model.train(was_training)

    nll_mean = nll_sum / n_predicted
    if not math.isfinite(nll_mean):
        logger.warning("non-finite loss: the model produced inf/nan logits")
    ppl = math.exp(nll_mean) if nll_mean < 700 else math.inf
    from nsvd_lm.experiments.paired import window_id

    return PerplexityResult(
        ppl=ppl,
        nll_mean=nll_mean,
        n_windows=n_scored,
        n_tokens_predicted=n_predicted,
        n_windows_available=n_available,
        n_windows_full=n_available,
        n_tokens_total=int(ids.numel()),
        seqlen=seqlen,
        max_windows=max_windows,
        window_ids=tuple(window_id(dataset, k, windows[k, 1:].tolist()) for k in range(n_scored)),
        window_nll=tuple(per_window),
        window_tokens=(seqlen - 1,) * n_scored,
    )


def _text_window_perplexity(
    model: Any,
    tokenizer: Any,
    windows: list,
    seqlen: int,
    batch_size: int,
    max_windows: int | None,
    device: Any,
    progress: bool,
    n_tokens_total: int,
    dataset: str = "text",
) -> PerplexityResult:
    """BOS + text-piece windows (``nsvd_lm.windows.text_windows``), every text token predicted."""
    n_available = len(windows)
    scored = windows if max_windows is None else windows[:max_windows]
    if not scored:
        raise ValueError(f"text has {n_tokens_total} tokens, fewer than one window of seqlen={seqlen}")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_window: list[tuple[float, int]] = []
    try:
        import torch

        with torch.no_grad():
            nll_sum, n_predicted = _score_bos_windows(
                model, [w.ids for w in scored], int(tokenizer.bos_token_id), batch_size, device, progress, per_window
            )
    finally:
        model.train(was_training)
    nll_mean = nll_sum / n_predicted
    from nsvd_lm.experiments.paired import window_id

    return PerplexityResult(
        ppl=math.exp(nll_mean) if nll_mean < 700 else math.inf,
        nll_mean=nll_mean,
        n_windows=len(scored),
        n_tokens_predicted=n_predicted,
        n_windows_available=n_available,
        n_windows_full=n_available,
        n_tokens_total=n_tokens_total,
        seqlen=seqlen,
        max_windows=max_windows,
        bos_per_window=True,
        window_ids=tuple(window_id(dataset, k, w.ids) for k, w in enumerate(scored)),
        window_nll=tuple(nll for nll, _ in per_window),
        window_tokens=tuple(int(n) for _, n in per_window),
    )


def dataset_perplexity(
    model: Any,
    tokenizer: Any,
    name: str,
    data_dir: str | None = None,
    split: str | None = None,
    seqlen: int = 2048,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: "str | torch.device | None" = None,
    progress: bool = True,
    bos: str = "auto",
) -> tuple[PerplexityResult, Any]:
    """Perplexity on one registry dataset (``nsvd_lm.experiments.evaldata``), with its protocol cap (C4: 256).

    Returns (result, EvalText). ``max_windows`` is a further cap for quick runs.
    """
    from nsvd_lm.experiments.evaldata import load_eval_text

    eval_text = load_eval_text(name, data_dir=data_dir, split=split)
    result = eval_text_perplexity(
        model,
        tokenizer,
        eval_text,
        seqlen=seqlen,
        batch_size=batch_size,
        max_windows=max_windows,
        device=device,
        progress=progress,
        bos=bos,
    )
    return result, eval_text


def eval_text_perplexity(
    model: Any,
    tokenizer: Any,
    eval_text: Any,
    seqlen: int = 2048,
    batch_size: int = 4,
    max_windows: int | None = None,
    device: "str | torch.device | None" = None,
    progress: bool = True,
    bos: str = "auto",
) -> PerplexityResult:
    """Perplexity on an already loaded ``EvalText`` under its protocol cap (C4: 256) and ``max_windows``."""
    result = perplexity(
        model,
        tokenizer,
        eval_text.text,
        seqlen=seqlen,
        batch_size=batch_size,
        max_windows=_combine_caps(eval_text.max_windows, max_windows),
        device=device,
        progress=progress,
        bos=bos,
        dataset=eval_text.name,
    )
    return with_protocol_cap(result, eval_text.max_windows)


def with_protocol_cap(result: PerplexityResult, protocol_cap: int | None) -> PerplexityResult:
    """``result`` with ``n_windows_full`` = the windows a full run of the dataset's protocol scores."""
    if result.bos_per_window:
        full = result.n_windows_available if protocol_cap is None else min(result.n_windows_available, protocol_cap)
    else:
        full = count_windows(result.n_tokens_total, result.seqlen, protocol_cap)[0]
    return dataclasses.replace(result, n_windows_full=full)


def _combine_caps(protocol_cap: int | None, user_cap: int | None) -> int | None:
    caps = [c for c in (protocol_cap, user_cap) if c is not None]
    return min(caps) if caps else None
