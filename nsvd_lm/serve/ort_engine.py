"""The ONNX Runtime engine: continuous batching at decode-step level over an exported decoder
(:class:`~nsvd_lm.serve.runtime.OnnxCausalLM`).

One engine thread owns the ONNX Runtime session. Between two decode steps it admits waiting
sequences: each is prefilled on its own (batch 1, in chunks of ``prefill_chunk_tokens`` so a long
prompt does not stall the running batch for its whole length), then its KV cache joins the running
batch as a new row. Every decode step then runs the whole batch at once, and each row samples its
next token with its own temperature / top-p / random generator and checks its own stop conditions.
A finished (or cancelled) row leaves the batch at the end of the step; the others go on.

Why this works with the exported graph: it takes a per-row ``attention_mask`` over past + new
tokens, per-row ``position_ids`` and a past of any length, and returns ``concat(past, new)``. So the
batch cache is kept *left-padded*: every row's real tokens are right-aligned, the columns before
them are zeros masked out by ``attention_mask``. A row that joins is padded on the left to the
batch length (or the batch is padded to the row's length); a row that leaves is dropped from the
batch axis, and columns that are padding for every remaining row are trimmed off. Masked keys get
exactly zero attention weight, so a row's result does not depend on its neighbours beyond float
rounding (tested: greedy output equals the same prompt generated alone).

The batch KV cache is preallocated (:class:`_BatchCache`): two flat buffers on the session's device
(CPU, or CUDA with onnxruntime-gpu), bound to the graph by pointer with IO binding
(:meth:`OnnxCausalLM.run`). A decode step reads the past from one buffer and the graph writes the
present (``concat(past, new)``, the graph's own copy) straight into the other; the buffers swap
roles and nothing is allocated, concatenated or copied by the engine. Rows join and leave between
steps in one repack (one gather of the kept rows and the new rows into the other buffer), deferred
so that a step where rows leave and a step where rows join share it. Logits land in a
preallocated host buffer; greedy rows are chosen with one argmax over the batch, and the per-row
inputs (last token, position) live in arrays, not in per-row Python.

Log-probabilities (:mod:`.logprobs`): a sequence with ``prompt_logprobs`` has its prompt scored
from its own prefill — each chunk's logits at every position are on the host already, so scoring
is one batched pass over the prompt, not a step per token; one with ``logprobs`` has each
generated token scored from the logits row it was sampled from (the raw distribution, before
temperature). ``max_tokens=0`` sequences finish after their prefill and never join the batch.
"""

from __future__ import annotations

import os
import time

import numpy as np

from nsvd_lm.export import io_names

from .engine import Engine, GenSequence
from .logprobs import TokenScores, score_rows
from .sampling import choose_next_tokens, choose_per_row


class _BatchCache:
    """The decoding rows' KV cache: ``2 * layers`` tensors (rows, kv_heads, length, head_dim), all
    of them views of one flat buffer laid out as (names, rows, kv_heads, length, head_dim). Two such
    buffers alternate: one holds the past, the graph writes the present into the other. A buffer
    grows (never shrinks) when a step needs more room; its old contents are dead by then."""

    GROWTH = 1.25

    def __init__(self, lm, torch) -> None:
        self.torch = torch
        self.names = len(lm.past_names)
        self.heads, self.head_dim = lm.num_kv_heads, lm.head_dim
        self.device = torch.device("cuda", 0) if lm.device == "cuda" else torch.device("cpu")
        self.dtype = torch.float16 if np.dtype(lm.float_dtype) == np.float16 else torch.float32
        self._flat: list = [None, None]
        self._cur = 0
        self.rows = 0
        self.length = 0

    def _numel(self, rows: int, length: int) -> int:
        return self.names * rows * self.heads * length * self.head_dim

    def _view(self, side: int, rows: int, length: int, grow: bool = False):
        need = self._numel(rows, length)
        flat = self._flat[side]
        if flat is None or flat.numel() < need:
            if not grow:
                raise RuntimeError("cache buffer too small")  # a bug: only the written side grows
            flat = self.torch.empty(int(need * self.GROWTH) + 1, dtype=self.dtype, device=self.device)
            self._flat[side] = flat
        return flat[:need].view(self.names, rows, self.heads, length, self.head_dim)

    def past(self) -> list:
        return list(self._view(self._cur, self.rows, self.length).unbind(0))

    def presents(self) -> list:
        """Where the next decode step writes (rows, heads, length + 1, head_dim) per name."""
        return list(self._view(1 - self._cur, self.rows, self.length + 1, grow=True).unbind(0))

    def advance(self) -> None:
        """After a decode step: the presents are the new past."""
        self._cur = 1 - self._cur
        self.length += 1

    def repack(self, keep: list[int], keep_length: int, new_rows: list, new_length: int) -> None:
        """Rebuild the batch in the other buffer: the rows ``keep`` of the current batch (whose real
        tokens are their last ``keep_length`` columns at most), then ``new_rows`` (each one
        sequence's 5-d cache (names, 1, heads, len, head_dim)), right-aligned at ``new_length``
        columns, zeros before them (padding is masked out; zeros keep it finite)."""
        torch = self.torch
        rows = len(keep) + len(new_rows)
        if rows == 0:
            self.rows, self.length = 0, 0
            return
        dst = self._view(1 - self._cur, rows, new_length, grow=True)
        if keep:
            src = self._view(self._cur, self.rows, self.length)[:, :, :, self.length - keep_length :, :]
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            if not new_rows and keep_length == new_length:
                torch.index_select(src, 1, index, out=dst)
            else:
                dst[:, : len(keep), :, new_length - keep_length :, :] = src.index_select(1, index)
                dst[:, : len(keep), :, : new_length - keep_length, :].zero_()
        for j, kv in enumerate(new_rows):
            row, n = len(keep) + j, int(kv.shape[3])
            dst[:, row, :, new_length - n :, :] = kv[:, 0]
            dst[:, row, :, : new_length - n, :].zero_()
        self._cur = 1 - self._cur
        self.rows, self.length = rows, new_length

    def sequence_buffer(self, length: int):
        """A fresh 5-d cache (names, 1, heads, length, head_dim) for one prefilling sequence."""
        return self.torch.empty(
            (self.names, 1, self.heads, length, self.head_dim), dtype=self.dtype, device=self.device
        )


class OrtEngine(Engine):
    """Continuous batching over one ONNX Runtime session (see the module docstring)."""

    backend = "ort"
    supports_logprobs = True

    def __init__(
        self,
        lm,
        max_seqs: int = 16,
        max_tokens_in_flight: int = 16384,
        max_waiting: int = 64,
        prefill_chunk_tokens: int = 256,
        on_finish=None,
    ) -> None:
        super().__init__(
            tokenizer=lm.tokenizer,
            context_length=lm.context_length,
            eos_token_ids=lm.eos_token_ids,
            device=lm.device,
            model_name=lm.model_dir.name,
            max_seqs=max_seqs,
            max_tokens_in_flight=max_tokens_in_flight,
            max_waiting=max_waiting,
            prefill_chunk_tokens=prefill_chunk_tokens,
            on_finish=on_finish,
        )
        import torch

        self.lm = lm
        self._torch = torch
        self._cache = _BatchCache(lm, torch)
        out = {o.name: o for o in lm.session.get_outputs()}
        vocab = out[io_names.LOGITS].shape[-1]
        logits_dtype = torch.float16 if out[io_names.LOGITS].type == "tensor(float16)" else torch.float32
        # Host logits of a decode step (rows, 1, vocab), written by the graph (None: symbolic vocab
        # axis, ONNX Runtime allocates them).
        self._logits = torch.empty((max_seqs, 1, int(vocab)), dtype=logits_dtype) if isinstance(vocab, int) else None
        self._rows: list[GenSequence] = []  # the cache's rows in order; finished ones until the next repack
        self._mask = np.zeros((0, 0), dtype=np.int64)  # (rows, length), 0 = left padding
        self._last = np.zeros(0, dtype=np.int64)  # each row's last token (the next step's input)
        self._lengths = np.zeros(0, dtype=np.int64)  # real tokens in each row's cache = its next position
        self._temperatures = np.zeros(0)
        self._top_ps = np.ones(0)
        self._ready: list[GenSequence] = []  # prefilled, waiting for the next repack to join

    @classmethod
    def open(
        cls,
        model,
        provider: str = "auto",
        intra_op_threads: int | None = None,
        **limits,
    ) -> "OrtEngine":
        """An engine over ``model``: an open :class:`OnnxCausalLM` or an exported folder."""
        if isinstance(model, (str, os.PathLike)):
            from .runtime import OnnxCausalLM

            model = OnnxCausalLM(model, provider=provider, intra_op_threads=intra_op_threads)
        return cls(model, **limits)

    def _extra_stats(self) -> dict:
        return {"cache_length": self._cache.length, "cache_rows": self._cache.rows}

    def _fail_all(self, message: str) -> None:
        with self._cv:  # prefilled sequences not yet in the batch fail too
            self._prefilling += self._ready
            self._ready = []
        super()._fail_all(message)

    def _reset(self) -> None:
        self._rows, self._ready = [], []
        self._cache.repack([], 0, [], 0)
        self._set_rows()

    def step(self) -> bool:
        self._admit()
        did = False
        # A cancelled row leaves before the next decode step (its slot is free for this step's joiners).
        for seq in self._running:
            if seq.cancelled:
                self._finish(seq, "cancelled")
        if self._prefilling:
            self._prefill_round()
            did = True
        if self._ready or any(s.finish_reason is not None for s in self._rows):
            self._repack()
        if self._rows:
            self._decode_step()
            did = True
        return did

    def _prefill_round(self) -> None:
        """Prefill chunks, oldest sequence first, until ``prefill_chunk_tokens`` tokens were run."""
        budget = self.prefill_chunk_tokens
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.cancelled:
                self._prefilling.remove(seq)
                self._finish(seq, "cancelled")
                continue
            start = seq.prefilled
            chunk = seq.prompt_tokens[start : start + budget]
            n = len(chunk)
            ids = np.asarray([chunk], dtype=np.int64)
            mask = np.ones((1, start + n), dtype=np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)[None]
            past = None if seq._state is None else list(seq._state.unbind(0))
            kv = self._cache.sequence_buffer(start + n)
            # Only a scored prompt needs every position's logits; else the last one (the LM head
            # is the largest matrix: at every position it costs a prefill about a fifth more).
            scored = seq.prompt_logprobs is not None
            logits, _ = self.lm.run(ids, mask, pos, past, list(kv.unbind(0)), logits_to_keep=0 if scored else 1)
            seq._state = kv  # logits: host (1, n or 1, vocab)
            if scored:
                self._score_prompt_chunk(seq, start, logits[0])
            seq.prefilled += n
            budget -= n
            self.counters["prefill_tokens"] += n
            if seq.prefilled < len(seq.prompt_tokens):
                continue
            self._prefilling.remove(seq)
            seq.first_token_at = time.monotonic()
            if seq.max_tokens == 0:  # scoring only
                self._finish(seq, "length")
                continue
            token = int(choose_next_tokens(logits[:, -1, :], seq.temperature, seq.top_p, seq._rng)[0])
            self._score_token(seq, logits[:, -1, :], token)
            if self._accept(seq, token):
                self._finish(seq, seq.finish_reason or "stop")
            else:
                self._ready.append(seq)

    @staticmethod
    def _score_prompt_chunk(seq: GenSequence, start: int, rows: np.ndarray) -> None:
        """Score the prompt tokens that ``rows`` (a chunk's logits, one row per position from
        ``start``) predict; the last prompt position predicts the first generated token instead."""
        if seq.prompt_scores is None:
            seq.prompt_scores = TokenScores()
            seq.prompt_scores.append_unscored(seq.prompt_tokens[0])  # nothing predicts the first token
        targets = seq.prompt_tokens[start + 1 : start + 1 + rows.shape[0]]
        if targets:
            seq.prompt_scores.extend(score_rows(rows[: len(targets)], targets, seq.prompt_logprobs))

    @staticmethod
    def _score_token(seq: GenSequence, row: np.ndarray, token: int) -> None:
        if seq.logprobs is None:
            return
        if seq.token_scores is None:
            seq.token_scores = TokenScores()
        seq.token_scores.extend(score_rows(row, [token], seq.logprobs))

    def _repack(self) -> None:
        """Drop finished rows, add the prefilled ones, trim columns that are padding for every row."""
        keep = [i for i, s in enumerate(self._rows) if s.finish_reason is None]
        keep_length = int(self._lengths[keep].max()) if keep else 0
        new_rows = [s._state for s in self._ready]
        new_length = max([keep_length] + [len(s.prompt_tokens) for s in self._ready])
        self._cache.repack(keep, keep_length, new_rows, new_length)
        for s in self._ready:
            s._state = None
        self._rows = [self._rows[i] for i in keep] + self._ready
        self._ready = []
        self._set_rows()
        for seq in self._rows[len(keep) :]:
            self._joined(seq)

    def _set_rows(self) -> None:
        """Per-row arrays from ``_rows`` (after a repack: rows and their order changed)."""
        rows = self._rows
        self._running = list(rows)
        self._lengths = np.asarray([len(s.prompt_tokens) + len(s.tokens) - 1 for s in rows], dtype=np.int64)
        self._last = np.asarray([s.tokens[-1] for s in rows], dtype=np.int64)
        self._temperatures = np.asarray([s.temperature for s in rows], dtype=np.float64)
        self._top_ps = np.asarray([s.top_p for s in rows], dtype=np.float64)
        length = self._cache.length
        self._mask = (np.arange(length)[None, :] >= (length - self._lengths)[:, None]).astype(np.int64)

    def _decode_step(self) -> None:
        started = time.perf_counter()
        rows = len(self._rows)
        mask = np.concatenate([self._mask, np.ones((rows, 1), np.int64)], 1)
        logits_out = None if self._logits is None else self._logits[:rows]
        logits, _ = self.lm.run(
            self._last[:, None], mask, self._lengths[:, None], self._cache.past(), self._cache.presents(), logits_out
        )
        self.counters["decode_model_s"] += self.lm.last_run_s
        self._cache.advance()
        self._mask = mask
        self._lengths += 1
        last = logits.numpy()[:, -1, :] if logits_out is not None else logits[:, -1, :]
        tokens = choose_per_row(last, self._temperatures, self._top_ps, [s._rng for s in self._rows])
        self._last = tokens
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += rows
        finished = False
        for row, (seq, token) in enumerate(zip(self._rows, tokens.tolist())):
            if seq.finish_reason is None and seq.logprobs is not None:
                self._score_token(seq, last[row : row + 1], token)
            if seq.finish_reason is None and self._accept(seq, token):
                self._finish(seq, seq.finish_reason)
                finished = True
        if finished:
            self._running = [s for s in self._rows if s.finish_reason is None]
        self.counters["decode_step_s"] += time.perf_counter() - started
