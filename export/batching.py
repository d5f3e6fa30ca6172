"""Continuous batching at decode-step level over an exported decoder (:class:`OnnxCausalLM`).

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
and is bound to the graph by pointer (IO binding): past and present never pass through numpy, and
only the last position's logits come to the host for sampling.

Bounds: ``max_seqs`` sequences in flight (prefilling + decoding), ``max_tokens_in_flight`` tokens
reserved by them (prompt + max_tokens each, reserved at admission so the cache cannot outgrow it),
and ``max_waiting`` sequences waiting; :meth:`BatchEngine.submit` raises :class:`QueueFull` past that.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import io_names
from .sampling import check_sampling_args, choose_next_tokens

logger = logging.getLogger(__name__)

# (sequence, kind, payload): kind "delta" (payload: new text), "done" (payload: finish reason),
# "error" (payload: message). Called from the engine thread; must not block.
EventSink = Callable[["GenSequence", str, str], None]


class QueueFull(Exception):
    """The wait queue is full: the caller should answer 429 / retry later."""


@dataclass
class GenSequence:
    """One prompt's generation: its parameters, its progress, and where its events go."""

    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    index: int = 0  # the choice index within its request
    stream_text: bool = False  # emit "delta" events (text held back while it may start a stop string)
    sink: EventSink | None = None

    # Progress (written by the engine thread only).
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    id: int = -1
    cancelled: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    joined_running_batch: bool = False  # admitted while other rows were decoding
    _emitted: int = 0
    _prefilled: int = 0
    _kv: list | None = None  # own cache while prefilling
    _position: int = 0
    _rng: np.random.Generator | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_tokens) + self.max_tokens

    def final_text(self) -> str:
        """The generated text cut before the first stop string (what a non-streaming answer returns)."""
        text = self.text
        for s in self.stop:
            cut = text.find(s)
            if cut != -1:
                text = text[:cut]
        return text


def _held_back(text: str, stops: Sequence[str]) -> int:
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


class _KVOps:
    """Device tensors for the cache (torch), bound to the ONNX Runtime graph by pointer."""

    def __init__(self, lm) -> None:
        import torch

        self.torch = torch
        self.lm = lm
        self.device_type = lm.device  # "cpu" or "cuda"
        self.device = torch.device("cuda", 0) if lm.device == "cuda" else torch.device("cpu")
        self.np_dtype = np.dtype(lm.float_dtype)
        self.dtype = torch.float16 if self.np_dtype == np.float16 else torch.float32
        out = {o.name: o for o in lm.session.get_outputs()}
        vocab = out[io_names.LOGITS].shape[-1]
        self.vocab = int(vocab) if isinstance(vocab, int) else None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list | None):
        """One graph call. Returns (last-position logits as float32 numpy (batch, vocab), presents)."""
        torch = self.torch
        lm = self.lm
        batch, seq = input_ids.shape
        past_len = 0 if past is None else int(past[0].shape[2])
        binding = lm.session.io_binding()
        binding.bind_cpu_input(io_names.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(io_names.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        if lm.has_position_ids:
            binding.bind_cpu_input(io_names.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        if past is None:
            for name, value in zip(lm.past_names, lm.empty_past(batch)):
                binding.bind_ortvalue_input(name, value)
        else:
            for name, t in zip(lm.past_names, past):
                binding.bind_input(name, self.device_type, 0, self.np_dtype, tuple(t.shape), t.data_ptr())
        if self.vocab is None:  # symbolic vocab axis: let ORT allocate the logits
            binding.bind_output(io_names.LOGITS, self.device_type, 0)
            logits_t = None
        else:
            logits_t = torch.empty((batch, seq, self.vocab), dtype=self.dtype, device=self.device)
            binding.bind_output(
                io_names.LOGITS, self.device_type, 0, self.np_dtype, tuple(logits_t.shape), logits_t.data_ptr()
            )
        shape = (batch, lm.num_kv_heads, past_len + seq, lm.head_dim)
        presents = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in lm.present_names]
        for name, t in zip(lm.present_names, presents):
            binding.bind_output(name, self.device_type, 0, self.np_dtype, shape, t.data_ptr())
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # torch wrote the past on its own stream; ORT reads it on its own
        lm.session.run_with_iobinding(binding)
        if self.device_type == "cuda":
            binding.synchronize_outputs()
        if logits_t is None:
            last = binding.get_outputs()[0].numpy()[:, -1, :]
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


class BatchEngine:
    """The continuous-batching scheduler. Drive it with :meth:`start` (a daemon thread) or call
    :meth:`step` yourself (tests do, to control exactly when a sequence joins)."""

    def __init__(
        self,
        lm,
        max_seqs: int = 16,
        max_tokens_in_flight: int = 16384,
        max_waiting: int = 64,
        prefill_chunk_tokens: int = 256,
        on_finish: Callable[[GenSequence], None] | None = None,
    ) -> None:
        for name, value in (
            ("max_seqs", max_seqs),
            ("max_tokens_in_flight", max_tokens_in_flight),
            ("max_waiting", max_waiting),
            ("prefill_chunk_tokens", prefill_chunk_tokens),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        self.lm = lm
        self.max_seqs = max_seqs
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.on_finish = on_finish  # observer (tests, logging): called in the engine thread per finished sequence
        self._ops = _KVOps(lm)
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenSequence] = collections.deque()
        self._prefilling: list[GenSequence] = []
        self._running: list[GenSequence] = []  # rows of the batch, in order
        self._kv: list | None = None  # batch cache: 2 * layers tensors (rows, kv_heads, length, head_dim)
        self._mask: np.ndarray | None = None  # (rows, length) int64, 0 = left padding
        self._reserved = 0
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {
            "submitted": 0,
            "completed": 0,
            "cancelled": 0,
            "rejected_queue_full": 0,
            "errors": 0,
            "decode_steps": 0,
            "decode_tokens": 0,
            "prefill_tokens": 0,
            "max_batch_rows": 0,
            "joined_running_batch": 0,
        }

    # ---------------------------------------------------------------------------------------
    # Public API (any thread)
    # ---------------------------------------------------------------------------------------

    def check_fits(self, seq: GenSequence) -> None:
        """Raise ValueError if ``seq`` could never be admitted (before it is queued)."""
        if not seq.prompt_tokens:
            raise ValueError("a sequence needs at least one prompt token")
        if isinstance(seq.max_tokens, bool) or not isinstance(seq.max_tokens, int) or seq.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1; got {seq.max_tokens!r}")
        check_sampling_args(seq.temperature, seq.top_p)
        if seq.reserved_tokens > self.lm.context_length:
            raise ValueError(
                f"prompt ({len(seq.prompt_tokens)} tokens) + max_tokens ({seq.max_tokens}) "
                f"exceeds the context length {self.lm.context_length}"
            )
        if seq.reserved_tokens > self.max_tokens_in_flight:
            raise ValueError(
                f"prompt ({len(seq.prompt_tokens)} tokens) + max_tokens ({seq.max_tokens}) "
                f"exceeds the server's tokens-in-flight budget {self.max_tokens_in_flight}"
            )

    def submit(self, seqs: Sequence[GenSequence]) -> None:
        """Queue sequences (all or none). Raises ValueError (cannot fit) or QueueFull."""
        for seq in seqs:
            self.check_fits(seq)
        with self._cv:
            if len(self._waiting) + len(seqs) > self.max_waiting:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(
                    f"server busy: {len(self._waiting)} sequences waiting (limit {self.max_waiting}); retry later"
                )
            now = time.monotonic()
            for seq in seqs:
                seq.id = next(self._ids)
                seq.submitted_at = now
                # Prompt 0 of a request uses the seed as is, so a one-prompt request samples like
                # OnnxCausalLM.generate([prompt], seed=seed); further prompts get their own streams.
                if seq.seed is None:
                    seq._rng = np.random.default_rng()
                elif seq.index == 0:
                    seq._rng = np.random.default_rng(seq.seed)
                else:
                    seq._rng = np.random.default_rng((seq.seed, seq.index))
                self._waiting.append(seq)
            self.stats["submitted"] += len(seqs)
            self._cv.notify_all()

    def cancel(self, seq: GenSequence) -> None:
        """Free ``seq``'s slot at the next step (a client went away). Safe from any thread."""
        seq.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def snapshot(self) -> dict:
        with self._cv:
            return {
                **self.stats,
                "waiting": len(self._waiting),
                "prefilling": len(self._prefilling),
                "running": len(self._running),
                "tokens_reserved": self._reserved,
                "cache_length": 0 if self._mask is None else int(self._mask.shape[1]),
                "limits": {
                    "max_seqs": self.max_seqs,
                    "max_tokens_in_flight": self.max_tokens_in_flight,
                    "max_waiting": self.max_waiting,
                    "prefill_chunk_tokens": self.prefill_chunk_tokens,
                },
            }

    def idle(self) -> bool:
        with self._cv:
            return not (self._waiting or self._prefilling or self._running)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="nsvd-batch-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("server shutting down")

    # ---------------------------------------------------------------------------------------
    # The loop (engine thread)
    # ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not (self._waiting or self._prefilling or self._running):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug or a runtime failure must not kill the engine
                logger.exception("batch step failed")
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")

    def step(self) -> bool:
        """Admit what fits, run one round of prefill chunks and one decode step. Returns whether
        there was anything to do."""
        self._admit()
        did = False
        if self._prefilling:
            self._prefill_round()
            did = True
        if self._running:
            self._decode_step()
            did = True
        return did

    def _admit(self) -> None:
        with self._cv:
            kept: collections.deque[GenSequence] = collections.deque()
            while self._waiting:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled", release=False)
                    continue
                in_flight = len(self._prefilling) + len(self._running)
                # FIFO: the head waits for room rather than being overtaken by smaller requests.
                if (
                    kept
                    or in_flight >= self.max_seqs
                    or self._reserved + seq.reserved_tokens > self.max_tokens_in_flight
                ):
                    kept.append(seq)
                    continue
                self._reserved += seq.reserved_tokens
                seq.joined_running_batch = bool(self._running)
                self._prefilling.append(seq)
            self._waiting = kept

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
            start = seq._prefilled
            chunk = seq.prompt_tokens[start : start + budget]
            n = len(chunk)
            ids = np.asarray([chunk], dtype=np.int64)
            mask = np.ones((1, start + n), dtype=np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)[None]
            logits, seq._kv = self._ops.run(ids, mask, pos, seq._kv)
            seq._prefilled += n
            budget -= n
            self.stats["prefill_tokens"] += n
            if seq._prefilled < len(seq.prompt_tokens):
                continue
            self._prefilling.remove(seq)
            seq._position = len(seq.prompt_tokens)
            token = int(choose_next_tokens(logits, seq.temperature, seq.top_p, seq._rng)[0])
            seq.first_token_at = time.monotonic()
            if self._accept(seq, token):
                seq._kv = None
                self._finish(seq, seq.finish_reason or "stop")
            else:
                self._join(seq)

    def _join(self, seq: GenSequence) -> None:
        kv, seq._kv = seq._kv, None
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
        if seq.joined_running_batch:
            self.stats["joined_running_batch"] += 1
        self._running.append(seq)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(self._running))

    def _decode_step(self) -> None:
        rows = len(self._running)
        ids = np.asarray([[s.tokens[-1]] for s in self._running], dtype=np.int64)
        pos = np.asarray([[s._position] for s in self._running], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((rows, 1), np.int64)], 1)
        logits, self._kv = self._ops.run(ids, mask, pos, self._kv)
        self._mask = mask
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += rows
        done: list[int] = []
        for row, seq in enumerate(self._running):
            seq._position += 1
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                done.append(row)
                continue
            token = int(choose_next_tokens(logits[row : row + 1], seq.temperature, seq.top_p, seq._rng)[0])
            if self._accept(seq, token):
                done.append(row)
        if done:
            self._drop_rows(done)

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

    def _accept(self, seq: GenSequence, token: int) -> bool:
        """Record a token; emit text; return True if the sequence is finished."""
        seq.tokens.append(token)
        finished = None
        need_text = seq.stream_text or bool(seq.stop)
        if need_text:
            seq.text = self.lm.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if token in self.lm.eos_token_ids or (seq.stop and any(s in seq.text for s in seq.stop)):
            finished = "stop"
        elif len(seq.tokens) >= seq.max_tokens:
            finished = "length"
        if seq.stream_text and seq.sink is not None:
            if finished:
                end = len(seq.final_text())
            else:
                end = len(seq.text) - _held_back(seq.text, seq.stop)
            if end > seq._emitted:
                seq.sink(seq, "delta", seq.text[seq._emitted : end])
                seq._emitted = end
        if finished:
            seq.finish_reason = finished
            return True
        return False

    def _finish(self, seq: GenSequence, reason: str, release: bool = True) -> None:
        if release:
            with self._cv:
                self._reserved -= seq.reserved_tokens
        if reason != "cancelled" and not seq.stream_text:
            # The final text is decoded once here when nothing needed it per token.
            seq.text = self.lm.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        self.stats["cancelled" if reason == "cancelled" else "completed"] += 1
        if self.on_finish is not None:
            self.on_finish(seq)
        if seq.sink is not None:
            seq.sink(seq, "done", reason)

    def _fail_all(self, message: str) -> None:
        """Fail every sequence in flight or waiting and reset the batch (after an engine error)."""
        with self._cv:
            victims = list(self._waiting) + list(self._prefilling) + list(self._running)
            self._waiting.clear()
            self._prefilling, self._running = [], []
            self._kv, self._mask = None, None
            self._reserved = 0
        for seq in victims:
            seq.finish_reason = "error"
            seq.finished_at = time.monotonic()
            seq._kv = None
            self.stats["errors"] += 1
            if seq.sink is not None:
                seq.sink(seq, "error", message)
