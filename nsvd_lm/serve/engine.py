"""The engine interface the HTTP service talks to, and the bookkeeping every backend shares.

An engine owns a model and generates for many sequences at once. The service (``.http``) only
calls :meth:`Engine.check_fits`, :meth:`Engine.submit`, :meth:`Engine.cancel`, :meth:`Engine.stats`,
:meth:`Engine.start` / :meth:`Engine.stop`, and reads the model facts (``tokenizer``,
``context_length``, ``device``, ``model_name``). A backend implements :meth:`Engine.step` (admit
what fits, run one round of work) and :meth:`Engine._reset` (drop all state after a failure);
queueing, cancellation, seeded generators, stop strings, streamed text and counters live here once.

Backends: :class:`~nsvd_lm.serve.ort_engine.OrtEngine` (ONNX Runtime, step-level continuous
batching over one preallocated KV cache) and :class:`~nsvd_lm.serve.genai_engine.GenaiEngine`
(onnxruntime-genai's own engine); :func:`make_engine` picks one by name.

Bounds: ``max_seqs`` sequences in flight (prefilling + decoding), ``max_tokens_in_flight`` tokens
reserved by them (prompt + max_tokens each, reserved at admission so the cache cannot outgrow it),
and ``max_waiting`` sequences waiting; :meth:`Engine.submit` raises :class:`QueueFull` past that.
"""

from __future__ import annotations

import abc
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .logprobs import TokenScores, check_top_n
from .sampling import check_sampling_args
from .stops import contains_stop, cut_at_stop, held_back

logger = logging.getLogger(__name__)

BACKENDS = ("ort", "genai")

# (sequence, kind, payload): kind "delta" (payload: new text), "done" (payload: finish reason),
# "error" (payload: message). Called from the engine thread; must not block.
EventSink = Callable[["GenSequence", str, str], None]


class QueueFull(Exception):
    """The wait queue is full: the caller should answer 429 / retry later."""


@dataclass
class GenSequence:
    """One prompt's generation request: its parameters, its progress, and where its events go.

    New per-request options are new fields here (with an "off" default), read by the backends
    that support them; the service checks a backend supports an option before it submits."""

    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    index: int = 0  # the choice index within its request
    stream_text: bool = False  # emit "delta" events (text held back while it may start a stop string)
    sink: EventSink | None = None
    # Log-probabilities (backends with ``supports_logprobs``): score the prompt / each generated
    # token, keeping this many most likely tokens a position (0..20); None: off. With
    # ``prompt_logprobs`` set, ``max_tokens=0`` scores the prompt and generates nothing.
    prompt_logprobs: int | None = None
    logprobs: int | None = None

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
    prefilled: int = 0  # prompt tokens already run through the model
    prompt_scores: TokenScores | None = None  # with prompt_logprobs: every prompt token (the first unscored)
    token_scores: TokenScores | None = None  # with logprobs: every generated token
    _emitted: int = 0
    _rng: np.random.Generator | None = None
    _state: Any = None  # the backend's per-sequence state (cache, generator, ...)

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_tokens) + self.max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def final_text(self) -> str:
        """The generated text cut before the first stop string (what a non-streaming answer returns)."""
        return cut_at_stop(self.text, self.stop)


class Engine(abc.ABC):
    """A generation engine: a bounded FIFO queue in front of a backend that runs many sequences at
    once. Drive it with :meth:`start` (a daemon thread) or call :meth:`step` yourself (tests do, to
    control exactly when a sequence joins)."""

    backend: str = ""
    # Whether the backend fills GenSequence.prompt_scores / token_scores (the service refuses
    # echo / logprobs requests otherwise).
    supports_logprobs: bool = False

    def __init__(
        self,
        *,
        tokenizer,
        context_length: int,
        eos_token_ids: set[int],
        device: str,
        model_name: str,
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
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        self.eos_token_ids = set(eos_token_ids)
        self.device = device
        self.model_name = model_name
        self.max_seqs = max_seqs
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.on_finish = on_finish  # observer (tests, logging): called in the engine thread per finished sequence
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenSequence] = collections.deque()
        self._prefilling: list[GenSequence] = []
        self._running: list[GenSequence] = []  # decoding rows, in batch order
        self._reserved = 0
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {
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
            # Seconds in decode steps, and the part of them inside the model call: the rest is engine work.
            "decode_step_s": 0.0,
            "decode_model_s": 0.0,
        }

    # ---------------------------------------------------------------------------------------
    # Public API (any thread)
    # ---------------------------------------------------------------------------------------

    def check_fits(self, seq: GenSequence) -> None:
        """Raise ValueError if ``seq`` could never be admitted (before it is queued)."""
        if not seq.prompt_tokens:
            raise ValueError("a sequence needs at least one prompt token")
        least = 0 if seq.prompt_logprobs is not None else 1  # 0: score the prompt, generate nothing
        if isinstance(seq.max_tokens, bool) or not isinstance(seq.max_tokens, int) or seq.max_tokens < least:
            raise ValueError(f"max_tokens must be an integer >= {least}; got {seq.max_tokens!r}")
        for name in ("prompt_logprobs", "logprobs"):
            if getattr(seq, name) is not None:
                if not self.supports_logprobs:
                    raise ValueError(
                        f"'logprobs' and 'echo' scoring are not supported by the {self.backend} backend; "
                        "use --backend ort"
                    )
                check_top_n(getattr(seq, name), name)
        check_sampling_args(seq.temperature, seq.top_p)
        if seq.reserved_tokens > self.context_length:
            raise ValueError(
                f"prompt ({len(seq.prompt_tokens)} tokens) + max_tokens ({seq.max_tokens}) "
                f"exceeds the context length {self.context_length}"
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
                self.counters["rejected_queue_full"] += 1
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
            self.counters["submitted"] += len(seqs)
            self._cv.notify_all()

    def cancel(self, seq: GenSequence) -> None:
        """Free ``seq``'s slot at the next step (a client went away). Safe from any thread."""
        seq.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def stats(self) -> dict:
        """Counters, occupancy and limits (``GET /stats``)."""
        with self._cv:
            return {
                "backend": self.backend,
                **self.counters,
                "waiting": len(self._waiting),
                "prefilling": len(self._prefilling),
                "running": len(self._running),
                "tokens_reserved": self._reserved,
                **self._extra_stats(),
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
        self._thread = threading.Thread(target=self._loop, name=f"nsvd-{self.backend}-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._fail_all("server shutting down")

    @abc.abstractmethod
    def step(self) -> bool:
        """Admit what fits, run one round of work (prefill and/or one decode step). Returns whether
        there was anything to do."""

    # ---------------------------------------------------------------------------------------
    # For the backends (engine thread)
    # ---------------------------------------------------------------------------------------

    def _extra_stats(self) -> dict:
        return {}

    def _reset(self) -> None:
        """Drop the backend's batch state (after an engine error or at shutdown)."""

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
                logger.exception("engine step failed")
                self._fail_all(f"internal error: {type(exc).__name__}: {exc}")

    def _admit(self) -> list[GenSequence]:
        """Move waiting sequences into ``_prefilling`` while they fit (FIFO); returns the admitted."""
        admitted = []
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
                admitted.append(seq)
            self._waiting = kept
        return admitted

    def _joined(self, seq: GenSequence) -> None:
        """Book a sequence that moved from prefilling to the decoding rows."""
        if seq.joined_running_batch:
            self.counters["joined_running_batch"] += 1
        self.counters["max_batch_rows"] = max(self.counters["max_batch_rows"], len(self._running))

    def _accept(self, seq: GenSequence, token: int) -> bool:
        """Record a token; emit text; return True if the sequence is finished."""
        seq.tokens.append(token)
        finished = None
        need_text = seq.stream_text or bool(seq.stop)
        if need_text:
            seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if token in self.eos_token_ids or (seq.stop and contains_stop(seq.text, seq.stop)):
            finished = "stop"
        elif len(seq.tokens) >= seq.max_tokens:
            finished = "length"
        if seq.stream_text and seq.sink is not None:
            if finished:
                end = len(seq.final_text())
            else:
                end = len(seq.text) - held_back(seq.text, seq.stop)
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
            seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        seq.finish_reason = reason
        seq.finished_at = time.monotonic()
        seq._state = None
        self.counters["cancelled" if reason == "cancelled" else "completed"] += 1
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
            self._reserved = 0
            self._reset()
        for seq in victims:
            seq.finish_reason = "error"
            seq.finished_at = time.monotonic()
            seq._state = None
            self.counters["errors"] += 1
            if seq.sink is not None:
                seq.sink(seq, "error", message)


def make_engine(backend: str, model, **limits) -> Engine:
    """An engine of ``backend`` (one of :data:`BACKENDS`) over ``model``: an exported folder, or for
    ``ort`` an already open :class:`~nsvd_lm.serve.runtime.OnnxCausalLM`. ``limits`` are the
    :class:`Engine` bounds (``max_seqs``, ``max_tokens_in_flight``, ``max_waiting``,
    ``prefill_chunk_tokens``) and, for a folder, ``provider`` / ``intra_op_threads``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "ort":
        from .ort_engine import OrtEngine

        return OrtEngine.open(model, **limits)
    from .genai_engine import GenaiEngine

    return GenaiEngine.open(model, **limits)
