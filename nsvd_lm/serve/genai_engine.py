"""The onnxruntime-genai engine: the same :class:`~nsvd_lm.serve.engine.Engine` interface over
``onnxruntime_genai.Engine`` (onnxruntime-genai >= 0.18).

GenAI's Engine schedules requests itself. Its continuous ("dynamic") batching needs a paged KV
cache in the graph (a Model Builder export with ``engine.dynamic_batching``); our exporter writes a
plain past/present graph, so GenAI runs it with its **static** batching engine. Static batches of
prompts of different lengths give wrong tokens on our exports (seen in ``tests/test_server.py``'s
concurrent test; the cause, likely how GenAI pads rows, was not pinned down), and GenAI
batches every request it holds whatever ``engine.static_batching.max_batch_size`` says, so this
engine hands GenAI one request at a time: up to ``max_seqs`` are admitted (and count as running),
GenAI decodes them one after the other in arrival order. Correct, but no batching across
requests: this backend is the reference / portability path, the ORT engine the fast one.
Per-turn seeds need the dynamic engine too, so sampled requests with a ``seed`` are refused
(``check_fits``); greedy ones ignore it.

What this module does: tokens, stop strings and streamed text go through the shared bookkeeping of
:class:`Engine` (the same HF tokenizer and stop-string rules as the ORT engine, so outputs compare
one to one); a sequence that our side finishes (stop string, cancel) has its GenAI turn cancelled.
GenAI does not report the EOS token it stopped on; it is appended, so usage counts agree with the
ORT engine. GenAI's Engine must be driven from one thread: the first thread that steps it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .engine import Engine, GenSequence

PROVIDERS = ("auto", "cpu", "cuda")
GENAI_BATCH = 1  # rows per GenAI static batch (see the module docstring: larger ones are wrong on our graph)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class GenaiEngine(Engine):
    """Generation on ``onnxruntime_genai.Engine`` (see the module docstring)."""

    backend = "genai"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        provider: str = "auto",
        intra_op_threads: int | None = None,
        tokenizer=None,
        max_seqs: int = 16,
        max_tokens_in_flight: int = 16384,
        max_waiting: int = 64,
        prefill_chunk_tokens: int = 256,
        on_finish=None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
        import onnxruntime_genai as og

        self._og = og
        model_dir = Path(model_dir)
        if not (model_dir / "genai_config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no genai_config.json: not an exported folder (`nsvd-lm export`)")
        config = og.Config(str(model_dir))
        overlay: dict = {"engine": {"static_batching": {"max_batch_size": GENAI_BATCH}}}
        if intra_op_threads:
            overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": int(intra_op_threads)}}}
        config.overlay(json.dumps(overlay))
        want_cuda = provider == "cuda" or (provider == "auto" and og.is_cuda_available())
        config.clear_providers()
        if want_cuda:
            config.append_provider("cuda")
        self._model = og.Model(config)
        # GenAI's Engine may only be used from the thread that created it: it is created by the
        # first step, so the thread that steps the engine (``start``'s, or a test's) owns it.
        self._engine = None
        self._events = None

        hf_config = _read_json(model_dir / "config.json")
        generation = _read_json(model_dir / "generation_config.json")
        genai = _read_json(model_dir / "genai_config.json")
        context = int(hf_config.get("max_position_embeddings") or genai.get("model", {}).get("context_length") or 2048)
        max_length = int(genai.get("search", {}).get("max_length") or context)
        eos = set(_ids(generation.get("eos_token_id", hf_config.get("eos_token_id"))))
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if not eos and tokenizer.eos_token_id is not None:
            eos = {int(tokenizer.eos_token_id)}
        self._eos_reported = _ids(genai.get("model", {}).get("eos_token_id")) or sorted(eos)
        super().__init__(
            tokenizer=tokenizer,
            context_length=min(context, max_length),
            eos_token_ids=eos,
            device="cuda" if want_cuda else "cpu",
            model_name=model_dir.name,
            max_seqs=max_seqs,
            max_tokens_in_flight=max_tokens_in_flight,
            max_waiting=max_waiting,
            prefill_chunk_tokens=prefill_chunk_tokens,
            on_finish=on_finish,
        )
        self._by_request: dict[int, GenSequence] = {}
        self._handoff: list[GenSequence] = []  # admitted, not yet given to GenAI (it holds one at a time)

    @classmethod
    def open(cls, model, provider: str = "auto", intra_op_threads: int | None = None, **limits) -> "GenaiEngine":
        if not isinstance(model, (str, os.PathLike)):  # an open OnnxCausalLM: GenAI opens its folder itself
            limits.setdefault("tokenizer", model.tokenizer)
            provider = model.device if provider == "auto" else provider
            model = model.model_dir
        return cls(model, provider=provider, intra_op_threads=intra_op_threads, **limits)

    def check_fits(self, seq: GenSequence) -> None:
        super().check_fits(seq)
        if seq.seed is not None and not seq.greedy:
            raise ValueError(
                "'seed' with temperature > 0 is not supported by the genai backend (its static-batching engine "
                "has no per-request seed); use --backend ort"
            )

    # ---------------------------------------------------------------------------------------
    # The loop (engine thread)
    # ---------------------------------------------------------------------------------------

    def step(self) -> bool:
        og = self._og
        if self._engine is None:
            self._engine = og.Engine(self._model)
            self._events = self._engine.create_event_buffer(4 * self.max_seqs + 16)
        for seq in self._admit():
            self._prefilling.remove(seq)
            self._running.append(seq)
            self._handoff.append(seq)
            self._joined(seq)
        for seq in list(self._running):
            if seq.cancelled:
                self._release(seq, cancel=seq._state is not None)
                self._finish(seq, "cancelled")
        if not self._by_request and self._handoff:
            self._begin(self._handoff.pop(0))
        if not self._engine.has_pending_requests():
            return False
        started = time.perf_counter()
        events = self._engine.run(self._events)
        model_s = time.perf_counter() - started
        rows = sum(1 for event in events if event.token is not None)
        for event in events:
            seq = self._by_request.get(id(event.request))
            if seq is None or seq.finish_reason is not None:
                continue
            if event.token is not None:
                if seq.first_token_at is None:
                    seq.first_token_at = time.monotonic()
                if self._accept(seq, int(event.token)):
                    self._release(seq, cancel=not (int(event.flags) & int(og.EngineEventFlags.TURN_FINISHED)))
                    self._finish(seq, seq.finish_reason)
                    continue
            flags = int(event.flags)
            if flags & int(og.EngineEventFlags.FAILED):
                self._release(seq, cancel=False)
                self._fail(seq, f"onnxruntime-genai failed the request ({event.error_code.name})")
            elif flags & int(og.EngineEventFlags.TURN_FINISHED):
                reason = event.finish_reason
                if reason == og.FinishReason.EOS:
                    self._accept(seq, self._eos_reported[0])  # records it and flushes held-back text
                self._release(seq, cancel=False)
                self._finish(seq, "length" if reason == og.FinishReason.MAX_GENERATED_TOKENS else "stop")
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += rows
        self.counters["decode_model_s"] += model_s
        self.counters["decode_step_s"] += time.perf_counter() - started
        return True

    def _begin(self, seq: GenSequence) -> None:
        og = self._og
        request = self._engine.create_request()
        options = og.TurnOptions(request)
        options.set_max_generated_tokens(seq.max_tokens)
        if seq.greedy:
            options.set_do_sample(False)
        else:
            options.set_do_sample(True)
            options.set_temperature(seq.temperature)
            options.set_top_p(seq.top_p)
            options.set_top_k(0)  # the export's search defaults say top_k = 1 (greedy)
        turn = request.begin_turn(np.asarray(seq.prompt_tokens, dtype=np.int32), options)
        seq._state = (request, turn)
        self._by_request[id(request)] = seq

    def _release(self, seq: GenSequence, cancel: bool) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._handoff:
            self._handoff.remove(seq)
        if seq._state is None:  # never given to GenAI
            return
        request, turn = seq._state
        if cancel:
            request.cancel_turn(turn)
        request.close()
        self._by_request.pop(id(request), None)

    def _fail(self, seq: GenSequence, message: str) -> None:
        with self._cv:
            self._reserved -= seq.reserved_tokens
        seq.finish_reason = "error"
        seq.finished_at = time.monotonic()
        seq._state = None
        self.counters["errors"] += 1
        if seq.sink is not None:
            seq.sink(seq, "error", message)

    def _reset(self) -> None:
        for seq in list(self._by_request.values()):
            try:
                request, turn = seq._state
                request.cancel_turn(turn)
                request.close()
            except Exception:  # the engine is failing already; nothing more to free
                pass
        self._by_request = {}
        self._handoff = []
