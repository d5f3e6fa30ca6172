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

The KV cache lives in torch tensors on the session's device (CPU, or CUDA with onnxruntime-gpu)
and is bound to the graph by pointer (IO binding, :meth:`OnnxCausalLM.run`): past and present
never pass through numpy, and only the last position's logits come to the host for sampling.
"""

from __future__ import annotations

import os
import time

import numpy as np

from nsvd_lm.export import io_names

from .engine import Engine, GenSequence
from .sampling import choose_next_tokens


class _KVOps:
    """Device tensors for the cache (torch), bound to the ONNX Runtime graph by pointer."""

    def __init__(self, lm) -> None:
        import torch

        self.torch = torch
        self.lm = lm
        self.device = torch.device("cuda", 0) if lm.device == "cuda" else torch.device("cpu")
        self.dtype = torch.float16 if np.dtype(lm.float_dtype) == np.float16 else torch.float32
        out = {o.name: o for o in lm.session.get_outputs()}
        vocab = out[io_names.LOGITS].shape[-1]
        self.vocab = int(vocab) if isinstance(vocab, int) else None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list | None):
        """One graph call. Returns (last-position logits as float32 numpy (batch, vocab), presents)."""
        torch = self.torch
        lm = self.lm
        batch, seq = input_ids.shape
        past_len = 0 if past is None else int(past[0].shape[2])
        logits_t = None
        if self.vocab is not None:
            logits_t = torch.empty((batch, seq, self.vocab), dtype=self.dtype, device=self.device)
        shape = (batch, lm.num_kv_heads, past_len + seq, lm.head_dim)
        presents = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in lm.present_names]
        logits, presents = lm.run(input_ids, attention_mask, position_ids, past, presents, logits_t)
        if logits_t is None:  # symbolic vocab axis: ORT allocated host logits
            last = logits[:, -1, :]
        else:
            last = logits_t[:, -1, :].float().cpu().numpy()
        return np.asarray(last, dtype=np.float32), presents

    def pad_left(self, kv: list, extra: int) -> list:
        if extra <= 0:
            return kv
        f = self.torch.nn.functional
        return [f.pad(t, (0, 0, extra, 0)) for t in kv]

    def cat_rows(self, a: list, b: list) -> list:
        return [self.torch.cat([x, y], dim=0) for x, y in zip(a, b)]

    def keep_rows(self, kv: list, rows: list[int], first_col: int) -> list:
        index = self.torch.tensor(rows, dtype=self.torch.long, device=self.device)
        return [t.index_select(0, index)[:, :, first_col:, :].contiguous() for t in kv]


class OrtEngine(Engine):
    """Continuous batching over one ONNX Runtime session (see the module docstring)."""

    backend = "ort"

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
        self.lm = lm
        self._ops = _KVOps(lm)
        self._kv: list | None = None  # batch cache: 2 * layers tensors (rows, kv_heads, length, head_dim)
        self._mask: np.ndarray | None = None  # (rows, length) int64, 0 = left padding

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
        return {"cache_length": 0 if self._mask is None else int(self._mask.shape[1])}

    def _reset(self) -> None:
        self._kv, self._mask = None, None

    def step(self) -> bool:
        self._admit()
        did = False
        if self._prefilling:
            self._prefill_round()
            did = True
        if self._running:
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
            state = seq._state if seq._state is not None else {"kv": None}
            seq._state = state
            start = seq.prefilled
            chunk = seq.prompt_tokens[start : start + budget]
            n = len(chunk)
            ids = np.asarray([chunk], dtype=np.int64)
            mask = np.ones((1, start + n), dtype=np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)[None]
            logits, state["kv"] = self._ops.run(ids, mask, pos, state["kv"])
            seq.prefilled += n
            budget -= n
            self.counters["prefill_tokens"] += n
            if seq.prefilled < len(seq.prompt_tokens):
                continue
            self._prefilling.remove(seq)
            state["position"] = len(seq.prompt_tokens)
            token = int(choose_next_tokens(logits, seq.temperature, seq.top_p, seq._rng)[0])
            seq.first_token_at = time.monotonic()
            if self._accept(seq, token):
                self._finish(seq, seq.finish_reason or "stop")
            else:
                self._join(seq)

    def _join(self, seq: GenSequence) -> None:
        kv, seq._state["kv"] = seq._state["kv"], None
        length = int(kv[0].shape[2])
        if not self._running:
            self._kv, self._mask = kv, np.ones((1, length), dtype=np.int64)
        else:
            batch_len = int(self._mask.shape[1])
            if length < batch_len:
                kv = self._ops.pad_left(kv, batch_len - length)
                row_mask = np.concatenate(
                    [np.zeros((1, batch_len - length), np.int64), np.ones((1, length), np.int64)], 1
                )
            else:
                row_mask = np.ones((1, length), np.int64)
                if length > batch_len:
                    self._kv = self._ops.pad_left(self._kv, length - batch_len)
                    self._mask = np.concatenate(
                        [np.zeros((len(self._running), length - batch_len), np.int64), self._mask], 1
                    )
            self._kv = self._ops.cat_rows(self._kv, kv)
            self._mask = np.concatenate([self._mask, row_mask], 0)
        self._running.append(seq)
        self._joined(seq)

    def _decode_step(self) -> None:
        started = time.perf_counter()
        rows = len(self._running)
        ids = np.asarray([[s.tokens[-1]] for s in self._running], dtype=np.int64)
        pos = np.asarray([[s._state["position"]] for s in self._running], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((rows, 1), np.int64)], 1)
        logits, self._kv = self._ops.run(ids, mask, pos, self._kv)
        self.counters["decode_model_s"] += self.lm.last_run_s
        self._mask = mask
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += rows
        done: list[int] = []
        for row, seq in enumerate(self._running):
            seq._state["position"] += 1
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                done.append(row)
                continue
            token = int(choose_next_tokens(logits[row : row + 1], seq.temperature, seq.top_p, seq._rng)[0])
            if self._accept(seq, token):
                done.append(row)
        if done:
            self._drop_rows(done)
        self.counters["decode_step_s"] += time.perf_counter() - started

    def _drop_rows(self, rows: list[int]) -> None:
        gone = set(rows)
        leaving = [s for i, s in enumerate(self._running) if i in gone]
        keep = [i for i in range(len(self._running)) if i not in gone]
        if keep:
            mask = self._mask[keep]
            first_col = int(np.argmax(mask.any(axis=0)))  # columns that are padding for every row left
            self._kv = self._ops.keep_rows(self._kv, keep, first_col)
            self._mask = mask[:, first_col:]
            self._running = [self._running[i] for i in keep]
        else:
            self._kv, self._mask, self._running = None, None, []
        for seq in leaving:
            self._finish(seq, seq.finish_reason or "stop")
