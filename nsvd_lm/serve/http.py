"""An OpenAI-compatible HTTP endpoint over a generation engine (:class:`~nsvd_lm.serve.engine.Engine`).

    GET  /health               -> {"status": "ok", "model": ..., "provider": ...}
    GET  /v1/models            -> the one served model
    GET  /stats                -> the batch engine's counters and limits
    POST /v1/completions       -> {"prompt": str | [str] | [int] | [[int]], "max_tokens", "temperature",
                                   "top_p", "stop", "seed", "stream", "stream_options": {"include_usage"},
                                   "echo", "logprobs": 0..20}
    POST /v1/chat/completions  -> {"messages": [{"role", "content"}], same sampling fields,
                                   "max_completion_tokens" as an alias of "max_tokens",
                                   "logprobs": bool, "top_logprobs": 0..20}

Log-probabilities (the objects: :mod:`nsvd_lm.serve.logprobs`): ``logprobs: N`` scores every
generated token with its N most likely alternatives; with ``echo: true`` the prompt comes back in
``text`` and its tokens are scored too (the first has ``null``), in one batched prefill pass over
the prompt. ``echo`` with ``max_tokens: 0`` scores the prompt and generates nothing. (lm-eval's
``local-completions`` sends ``echo``, ``logprobs: 1``, ``max_tokens: 1`` for loglikelihood tasks
and drops the generated token's entry; tests/test_lm_eval_api.py runs it.) Prompts may be token ids, used as
given (no special tokens added), so a client that tokenized them scores exactly its own tokens.
Not supported (a 400 naming the field): ``logprobs`` or ``echo`` with ``stream: true``,
``logprobs`` above 20, ``n`` other than 1.

HTTP is Starlette on uvicorn (asyncio): a connection costs a coroutine, not a thread, so stalled or
slow clients do not tie up workers. Generation runs in the engine's thread (:mod:`.engine`; the
ONNX Runtime backend batches at step level: every sequence joins the running batch at the next
decode step and leaves when it is done, so concurrent requests share decode steps instead of
queueing behind a lock). This module only talks to the engine interface: ``check_fits``,
``submit``, ``cancel``, ``stats``, ``start`` / ``stop`` and the model facts it exposes. ``stream: true`` answers with
server-sent events ending in ``data: [DONE]``; a client that disconnects frees its batch slot.

Every request is bounded (body bytes and read time, prompts per request, messages, prompt tokens,
max_tokens, prompt + max_tokens within the context, sequences and tokens in flight, a bounded wait
queue, concurrent HTTP requests). Malformed ones get a 4xx JSON error
``{"error": {"message", "type", "code"}}`` before any model work; a full queue is a 429 with
``Retry-After``; an unexpected failure is a 500 JSON and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .engine import Engine, GenSequence, QueueFull, make_engine
from .logprobs import TokenScores, chat_logprobs, check_top_n, completion_logprobs, text_offsets

logger = logging.getLogger(__name__)

OPENAI_DEFAULT_MAX_TOKENS = 16
OPENAI_DEFAULT_TEMPERATURE = 1.0
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompts: int = 8
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_stop_strings: int = 4
    read_timeout_s: float = 30.0  # whole-body deadline: a client that stalls mid-body is cut off (408)
    max_batch_seqs: int = 16  # sequences decoding (or prefilling) together
    max_tokens_in_flight: int = 32768  # sum of prompt + max_tokens over those sequences
    max_queue: int = 64  # sequences waiting for a slot; beyond it a 429
    max_messages: int = 64  # chat messages per request
    max_concurrent_requests: int = 256  # HTTP requests being handled at once; beyond it a 503
    prefill_chunk_tokens: int = 256  # prompt tokens prefilled between two decode steps

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ServerLimits.{name} must be a positive number; got {value!r}")

    def engine_limits(self) -> dict[str, int]:
        """The bounds the engine enforces, as :class:`~nsvd_lm.serve.engine.Engine` arguments."""
        return {
            "max_seqs": self.max_batch_seqs,
            "max_tokens_in_flight": self.max_tokens_in_flight,
            "max_waiting": self.max_queue,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
        }


class RequestError(Exception):
    """A client error: becomes an HTTP 4xx with a JSON message."""

    def __init__(self, status: int, message: str, close: bool = False, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close  # the body was not read: close so its bytes are not parsed as a request
        self.headers = headers or {}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool = False
    include_usage: bool = False
    messages: list[dict] | None = None  # chat requests: the prompt is the templated conversation
    max_tokens_given: bool = True
    prompt_ids: list[list[int]] | None = None  # completions prompts given as token ids (used as is)
    echo: bool = False  # completions: return (and with logprobs score) the prompt before the completion
    logprobs: int | None = None  # top tokens per position; None: no logprobs (chat: top_logprobs)


# Fields a client may send. Supported ones are parsed; the others are accepted only at their
# "off" value (so OpenAI clients that always send them still work) and refused otherwise.
_SAMPLING_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
}
_COMPLETION_FIELDS = _SAMPLING_FIELDS | {
    "prompt",
    "echo",
    "logprobs",
    "best_of",
    "suffix",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
}
_CHAT_FIELDS = _SAMPLING_FIELDS | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}


def _reject_unknown_fields(payload: dict, known: set[str]) -> None:
    unknown = sorted(str(k) for k in payload if k not in known)
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise RequestError(400, f"unknown field(s) {shown}; supported: {', '.join(sorted(known))}")


def _parse_sampling(
    payload: dict, limits: ServerLimits, default_max_tokens: int, least_max_tokens: int = 1
) -> dict[str, Any]:
    max_tokens = payload.get("max_tokens", default_max_tokens)
    given = "max_tokens" in payload and payload["max_tokens"] is not None
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not _is_int(max_tokens) or not least_max_tokens <= max_tokens <= limits.max_tokens:
        hint = "" if least_max_tokens == 0 else " (0 only with echo=true and logprobs: it scores the prompt alone)"
        raise RequestError(
            400,
            f"'max_tokens' must be an integer in [{least_max_tokens}, {limits.max_tokens}]{hint}; "
            f"got {str(max_tokens)[:40]!r}",
        )
    temperature = payload.get("temperature", OPENAI_DEFAULT_TEMPERATURE)
    if temperature is None:
        temperature = OPENAI_DEFAULT_TEMPERATURE
    if not _is_number(temperature) or not 0.0 <= temperature <= 2.0:
        raise RequestError(400, f"'temperature' must be a number in [0, 2] (0 = greedy); got {str(temperature)[:40]!r}")
    top_p = payload.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise RequestError(400, f"'top_p' must be a number in (0, 1]; got {str(top_p)[:40]!r}")
    stop = payload.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError(400, "'stop' must be a string or a list of strings")
    if len(stops) > limits.max_stop_strings:
        raise RequestError(400, f"at most {limits.max_stop_strings} stop strings; got {len(stops)}")
    if any(len(s) > 256 for s in stops):
        raise RequestError(400, "a stop string may have at most 256 characters")
    stops = [s for s in stops if s]
    seed = payload.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise RequestError(400, f"'seed' must be a non-negative 64-bit integer; got {str(seed)[:40]!r}")
    n = payload.get("n", 1)
    if n not in (1, None) or isinstance(n, bool):
        raise RequestError(400, "only n=1 is supported")
    stream = payload.get("stream", False)
    if stream not in (True, False, None):
        raise RequestError(400, "'stream' must be a boolean")
    include_usage = False
    options = payload.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(400, "'stream_options' must be an object with at most 'include_usage'")
        if not stream:
            raise RequestError(400, "'stream_options' is only allowed with stream=true")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError(400, "'stream_options.include_usage' must be a boolean")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(400, "'user' must be a string")
    for name in ("frequency_penalty", "presence_penalty"):
        if payload.get(name) not in (None, 0, 0.0) or isinstance(payload.get(name), bool):
            raise RequestError(400, f"'{name}' is not supported (only 0)")
    if payload.get("logit_bias") not in (None, {}):
        raise RequestError(400, "'logit_bias' is not supported")
    return dict(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        stop=stops,
        seed=seed,
        stream=bool(stream),
        include_usage=include_usage,
        max_tokens_given=given,
    )


def parse_completion_request(payload: Any, limits: ServerLimits) -> CompletionRequest:
    """Validate an OpenAI-style completion body; raise RequestError(400, ...) naming the field."""
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object")
    if "prompt" not in payload:
        raise RequestError(400, "missing field 'prompt' (a string, a list of strings, or token ids)")
    prompts, prompt_ids = _parse_prompt(payload["prompt"])
    count = len(prompt_ids if prompt_ids is not None else prompts)
    if count > limits.max_prompts:
        raise RequestError(400, f"at most {limits.max_prompts} prompts per request; got {count}")
    _reject_unknown_fields(payload, _COMPLETION_FIELDS)
    echo = payload.get("echo", False)
    if echo not in (True, False, None):
        raise RequestError(400, "'echo' must be a boolean")
    echo = bool(echo)
    logprobs = payload.get("logprobs")
    if logprobs is not None:
        try:
            check_top_n(logprobs, "logprobs")
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
    sampling = _parse_sampling(
        payload, limits, OPENAI_DEFAULT_MAX_TOKENS, least_max_tokens=0 if echo and logprobs is not None else 1
    )
    if sampling["stream"] and (echo or logprobs is not None):
        raise RequestError(400, f"'{'echo' if echo else 'logprobs'}' is not supported with stream=true")
    if payload.get("best_of") not in (None, 1):
        raise RequestError(400, "'best_of' is not supported (only 1)")
    if payload.get("suffix") not in (None, ""):
        raise RequestError(400, "'suffix' is not supported")
    return CompletionRequest(prompts=prompts, prompt_ids=prompt_ids, echo=echo, logprobs=logprobs, **sampling)


def _parse_prompt(prompt: Any) -> tuple[list[str], list[list[int]] | None]:
    """(texts, None) for a string / list of strings; ([], token-id lists) for token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if any(not p for p in prompt):
            raise RequestError(400, "'prompt' must not be empty")
        return list(prompt), None
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        if all(p and all(_is_int(t) for t in p) for p in prompt):
            return [], [list(p) for p in prompt]
    raise RequestError(
        400, "'prompt' must be a string, a non-empty list of strings, a list of token ids, or a list of those"
    )


def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    400, f"messages[{i}].content: only text parts {{'type': 'text', 'text': str}} are supported"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts")


def parse_chat_request(payload: Any, limits: ServerLimits) -> CompletionRequest:
    """Validate an OpenAI-style chat completion body; raise RequestError(400, ...) naming the field."""
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "missing field 'messages' (a non-empty list of {'role', 'content'})")
    if len(messages) > limits.max_messages:
        raise RequestError(400, f"at most {limits.max_messages} messages per request; got {len(messages)}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(400, f"messages[{i}] has unsupported field(s) {sorted(str(k)[:40] for k in extra)[:5]}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(
                400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {str(role)[:40]!r}"
            )
        clean.append({"role": "system" if role == "developer" else role, "content": _message_text(m.get("content"), i)})
    _reject_unknown_fields(payload, _CHAT_FIELDS)
    if payload.get("max_completion_tokens") is not None:
        if payload.get("max_tokens") is not None:
            raise RequestError(400, "give 'max_tokens' or 'max_completion_tokens', not both")
        payload = {**payload, "max_tokens": payload["max_completion_tokens"]}
    # Chat has no small default in OpenAI (the rest of the context); here: the server's max_tokens,
    # cut to what the context leaves once the prompt is known.
    sampling = _parse_sampling(payload, limits, limits.max_tokens)
    logprobs = payload.get("logprobs")
    if logprobs not in (None, True, False):
        raise RequestError(400, "'logprobs' must be a boolean (chat); the number of alternatives is 'top_logprobs'")
    top = payload.get("top_logprobs")
    if top is not None:
        if not logprobs:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true")
        try:
            check_top_n(top, "top_logprobs")
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
    if logprobs and sampling["stream"]:
        raise RequestError(400, "'logprobs' is not supported with stream=true")
    if payload.get("tools") not in (None, []) or payload.get("tool_choice") not in (None, "none"):
        raise RequestError(400, "tools are not supported")
    fmt = payload.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(400, "only response_format {'type': 'text'} is supported")
    return CompletionRequest(prompts=[""], messages=clean, logprobs=(top or 0) if logprobs else None, **sampling)


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "code": status}}


class CompletionService:
    """Validates requests against the limits and the model's context, tokenizes them, and hands
    them to the engine. Framework-free; the Starlette app below only does HTTP."""

    def __init__(self, engine: Engine, limits: ServerLimits = ServerLimits(), model_name: str | None = None) -> None:
        self.engine = engine
        self.limits = limits
        self.model_name = model_name or engine.model_name
        # Fast tokenizers must not be used from two threads at once ("Already borrowed"): the engine
        # thread decodes with its tokenizer, request handlers encode with their own copy, one at a time.
        try:
            self._tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # an uncopyable tokenizer: share it (decode and encode then may race)
            self._tokenizer = engine.tokenizer
        self._tokenizer_lock = threading.Lock()
        self.has_chat_template = bool(getattr(engine.tokenizer, "chat_template", None))

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "provider": self.engine.device}

    def check_model(self, request_payload: dict) -> None:
        model = request_payload.get("model")
        if model is not None and model != self.model_name:
            raise RequestError(404, f"model {model[:100]!r} is not served here; this server serves {self.model_name!r}")

    def encode(self, request: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt (chat: of the templated conversation); bounded before and after."""
        limit = self.limits.max_prompt_tokens
        if request.prompt_ids is not None:
            vocab = len(self._tokenizer)
            for i, tokens in enumerate(request.prompt_ids):
                if len(tokens) > limit:
                    raise RequestError(400, f"prompt {i} has {len(tokens)} tokens; the limit is {limit}")
                bad = next((t for t in tokens if not 0 <= t < vocab), None)
                if bad is not None:
                    raise RequestError(400, f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})")
            return [list(tokens) for tokens in request.prompt_ids]
        with self._tokenizer_lock:
            if request.messages is not None:
                if not self.has_chat_template:
                    raise RequestError(
                        400, f"the tokenizer of {self.model_name!r} has no chat template; use /v1/completions"
                    )
                try:
                    text = self._tokenizer.apply_chat_template(
                        request.messages, add_generation_prompt=True, tokenize=False
                    )
                except Exception as exc:  # a template may raise on a conversation it does not accept
                    raise RequestError(400, f"the chat template rejected these messages: {exc}") from None
                texts, special = [text], False
            else:
                texts, special = request.prompts, True
            encoded = []
            for i, text in enumerate(texts):
                # A prompt far longer in characters than the limit allows is refused from a prefix,
                # so a megabyte of text costs a 16k-character tokenization, not a full one.
                probe = 8 * limit + 64
                if len(text) > probe:
                    head = self._tokenizer(text[:probe], add_special_tokens=special)["input_ids"]
                    if len(head) > limit + 1:
                        raise RequestError(400, f"prompt {i} has more than {limit} tokens; the limit is {limit}")
                encoded.append(list(self._tokenizer(text, add_special_tokens=special)["input_ids"]))
        for i, tokens in enumerate(encoded):
            if not tokens:
                raise RequestError(400, f"prompt {i} has no tokens")
            if len(tokens) > limit:
                raise RequestError(400, f"prompt {i} has {len(tokens)} tokens; the limit is {limit}")
        return encoded

    def sequences(self, request: CompletionRequest, encoded: list[list[int]]) -> list[GenSequence]:
        seqs = []
        for i, tokens in enumerate(encoded):
            max_tokens = request.max_tokens
            if request.messages is not None and not request.max_tokens_given:
                max_tokens = max(1, min(max_tokens, self.engine.context_length - len(tokens)))
            if len(tokens) + max_tokens > self.engine.context_length:
                why = " ('echo' scores the whole prompt, so it must fit)" if request.echo else ""
                raise RequestError(
                    400,
                    f"prompt {i} ({len(tokens)} tokens) + max_tokens ({max_tokens}) "
                    f"exceeds the context length {self.engine.context_length}{why}",
                )
            score_prompt = request.echo and request.logprobs is not None
            seq = GenSequence(
                prompt_tokens=tokens,
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=tuple(request.stop),
                seed=request.seed,
                index=i,
                stream_text=request.stream,
                prompt_logprobs=request.logprobs if score_prompt else None,
                logprobs=request.logprobs if max_tokens > 0 else None,
            )
            try:
                self.engine.check_fits(seq)
            except ValueError as exc:
                raise RequestError(400, str(exc)) from None
            seqs.append(seq)
        return seqs

    def choices(self, request: CompletionRequest, seqs: list[GenSequence]) -> list[dict[str, Any]]:
        """The ``choices`` of a finished non-streaming answer (decoding for echo and logprobs)."""
        with self._tokenizer_lock:
            if request.messages is not None:
                return [
                    {
                        "index": s.index,
                        "message": {"role": "assistant", "content": s.final_text()},
                        "logprobs": None
                        if request.logprobs is None
                        else chat_logprobs(self._tokenizer, s.token_scores or TokenScores()),
                        "finish_reason": s.finish_reason,
                    }
                    for s in seqs
                ]
            return [self._completion_choice(request, s) for s in seqs]

    def _completion_choice(self, request: CompletionRequest, seq: GenSequence) -> dict[str, Any]:
        text = seq.final_text()
        if not request.echo and request.logprobs is None:
            return {"text": text, "index": seq.index, "logprobs": None, "finish_reason": seq.finish_reason}
        # The echoed prompt is the prompt's tokens decoded (special tokens shown), so text_offset
        # indexes the returned text exactly whatever the tokenizer adds or normalises.
        prompt_offsets, prompt_text = text_offsets(self._tokenizer, seq.prompt_tokens) if request.echo else ([], "")
        gen_offsets, _ = text_offsets(self._tokenizer, seq.tokens, skip_special_tokens=True)
        logprobs = None
        if request.logprobs is not None:
            scores = TokenScores()
            offsets: list[int] = []
            if request.echo:
                scores.extend(seq.prompt_scores)
                offsets += prompt_offsets
            if seq.token_scores is not None:
                scores.extend(seq.token_scores)
            # Tokens past a stop string point at the end of the cut text.
            offsets += [len(prompt_text) + min(o, len(text)) for o in gen_offsets]
            logprobs = completion_logprobs(self._tokenizer, scores, offsets)
        return {
            "text": prompt_text + text,
            "index": seq.index,
            "logprobs": logprobs,
            "finish_reason": seq.finish_reason,
        }


# ---------------------------------------------------------------------------------------------
# HTTP (Starlette)
# ---------------------------------------------------------------------------------------------


def _json_response(status: int, body: dict[str, Any], close: bool = False, headers: dict[str, str] | None = None):
    from starlette.responses import JSONResponse

    extra = dict(headers or {})
    if close:
        extra["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=extra)


def _error_response(exc: RequestError):
    return _json_response(exc.status, _error_body(exc.status, exc.message), close=exc.close, headers=exc.headers)


class _ClientGone(Exception):
    pass


async def _read_json_body(request, limits: ServerLimits) -> Any:
    from starlette.requests import ClientDisconnect

    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        raise RequestError(411, "chunked bodies are not supported; send Content-Length", close=True)
    length_header = request.headers.get("content-length")
    if length_header is None:
        raise RequestError(411, "Content-Length header required", close=True)
    try:
        length = int(length_header)
    except ValueError:
        raise RequestError(400, f"bad Content-Length {length_header[:40]!r}", close=True) from None
    if length < 0:
        raise RequestError(400, f"bad Content-Length {length_header[:40]!r}", close=True)
    if length > limits.max_body_bytes:
        raise RequestError(413, f"request body is {length} bytes; the limit is {limits.max_body_bytes}", close=True)

    chunks: list[bytes] = []

    async def collect() -> None:
        got = 0
        async for chunk in request.stream():
            got += len(chunk)
            if got > length:
                raise RequestError(400, "request body longer than Content-Length", close=True)
            chunks.append(chunk)

    try:
        # One deadline for the whole body: a slowloris client trickling bytes is cut off too.
        await asyncio.wait_for(collect(), timeout=limits.read_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise RequestError(408, "timed out reading the request body", close=True) from None
    except ClientDisconnect:
        raise _ClientGone() from None
    raw = b"".join(chunks)
    if len(raw) != length:
        raise RequestError(400, "request body shorter than Content-Length", close=True)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise RequestError(400, f"body is not valid JSON: {str(exc)[:200]}") from None


class _Events:
    """Engine events of one request, delivered onto the event loop (the engine thread must not block)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def sink(self, seq: GenSequence, kind: str, payload: str) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (seq.index, kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


def _usage(seqs: list[GenSequence]) -> dict[str, int]:
    prompt = sum(len(s.prompt_tokens) for s in seqs)
    completion = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")


def build_app(service: CompletionService):
    """The Starlette application serving ``service`` (no server, no engine thread started)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    class _CleanStream(StreamingResponse):
        """A stream whose cleanup runs however it ends: also when the client left before the first
        chunk (Starlette then never starts the generator, so its ``finally`` would not run)."""

        def __init__(self, content, cleanup, **kwargs) -> None:
            super().__init__(content, **kwargs)
            self._cleanup = cleanup

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._cleanup()

    limits = service.limits
    active = {"n": 0}

    async def health(request):
        return _json_response(200, service.health())

    async def models(request):
        return _json_response(
            200, {"object": "list", "data": [{"id": service.model_name, "object": "model", "owned_by": "nsvd-lm"}]}
        )

    async def stats(request):
        return _json_response(200, {**service.engine.stats(), "http_requests_active": active["n"]})

    async def completions(request):
        return await handle(request, chat=False)

    async def chat_completions(request):
        return await handle(request, chat=True)

    async def handle(request, chat: bool):
        if active["n"] >= limits.max_concurrent_requests:
            return _error_response(
                RequestError(
                    503,
                    "server overloaded: too many concurrent requests; retry later",
                    close=True,
                    headers={"Retry-After": "1"},
                )
            )
        active["n"] += 1
        release_in_stream = False
        try:
            payload = await _read_json_body(request, limits)
            req = parse_chat_request(payload, limits) if chat else parse_completion_request(payload, limits)
            service.check_model(payload)
            from starlette.concurrency import run_in_threadpool

            encoded = await run_in_threadpool(service.encode, req)
            seqs = service.sequences(req, encoded)
            events = _Events(asyncio.get_running_loop())
            for s in seqs:
                s.sink = events.sink
            try:
                service.engine.submit(seqs)
            except QueueFull as exc:
                raise RequestError(429, str(exc), headers={"Retry-After": "1"}) from None
            except ValueError as exc:
                raise RequestError(400, str(exc)) from None
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            if req.stream:
                release_in_stream = True
                return _CleanStream(
                    stream(rid, chat, req, seqs, events),
                    cleanup=_once(lambda: release(seqs)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            return await answer(request, rid, chat, req, seqs, events)
        except RequestError as exc:
            return _error_response(exc)
        except _ClientGone:
            from starlette.responses import Response

            return Response(status_code=400)  # nobody is listening; uvicorn drops it
        except Exception as exc:  # a bug must not take the server down
            logger.exception("completion failed")
            return _error_response(RequestError(500, f"internal error: {type(exc).__name__}: {exc}", close=True))
        finally:
            if not release_in_stream:
                active["n"] -= 1

    async def wait_all(seqs: list[GenSequence], events: _Events) -> str | None:
        """Wait until every sequence is done; returns an error message if the engine failed one."""
        remaining, error = len(seqs), None
        while remaining:
            _, kind, payload = await events.queue.get()
            if kind == "done":
                remaining -= 1
            elif kind == "error":
                remaining -= 1
                error = payload
        return error

    async def answer(request, rid: str, chat: bool, req: CompletionRequest, seqs: list[GenSequence], events: _Events):
        # Watch for the client going away while it waits: then its sequences leave the batch.
        waiter = asyncio.ensure_future(wait_all(seqs, events))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():
                for s in seqs:
                    service.engine.cancel(s)
                waiter.cancel()
            gone.cancel()
        if waiter.cancelled():
            from starlette.responses import Response

            return Response(status_code=499)
        error = waiter.result()
        if error is not None:
            raise RuntimeError(error)
        created = int(time.time())
        from starlette.concurrency import run_in_threadpool

        choices = await run_in_threadpool(service.choices, req, seqs)
        obj = "chat.completion" if chat else "text_completion"
        return _json_response(
            200,
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": service.model_name,
                "choices": choices,
                "usage": _usage(seqs),
            },
        )

    async def stream(
        rid: str, chat: bool, req: CompletionRequest, seqs: list[GenSequence], events: _Events
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, str] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [choice]}

        try:
            if chat:
                for s in seqs:
                    yield _sse(chunk(s.index, "", None, role=True))
            remaining = len(seqs)
            while remaining:
                index, kind, payload = await events.queue.get()
                if kind == "delta":
                    yield _sse(chunk(index, payload, None))
                elif kind == "done":
                    remaining -= 1
                    yield _sse(chunk(index, None if chat else "", seqs[index].finish_reason))
                elif kind == "error":
                    remaining -= 1
                    yield _sse(_error_body(500, payload))
            if req.include_usage:
                yield _sse(
                    {
                        "id": rid,
                        "object": obj,
                        "created": created,
                        "model": service.model_name,
                        "choices": [],
                        "usage": _usage(seqs),
                    }
                )
            yield _sse("[DONE]")
        finally:
            # Reached also when the client disconnects (Starlette cancels the stream): free the slots.
            for s in seqs:
                if s.finish_reason is None:
                    service.engine.cancel(s)

    def release(seqs: list[GenSequence]) -> None:
        for s in seqs:
            if s.finish_reason is None:
                service.engine.cancel(s)
        active["n"] -= 1

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        if status == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        elif status == 404:
            message = f"no route {request.method} {request.url.path}"
        else:
            message = str(getattr(exc, "detail", "bad request"))
        # The body of an unknown route is never read: close after replying.
        return _error_response(RequestError(status, message, close=request.method not in ("GET", "HEAD")))

    async def server_error(request, exc):
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(RequestError(500, f"internal error: {type(exc).__name__}", close=True))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, 500: server_error})


def _once(fn):
    done = []

    def call() -> None:
        if not done:
            done.append(True)
            fn()

    return call


async def _wait_disconnect(request) -> None:
    # After the body has been read, the next ASGI message is the disconnect (if the client leaves).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServer:
    """A bound uvicorn server with the ``http.server``-like surface ``nsvd-lm serve`` and the tests
    use: ``server_address``, ``serve_forever()`` (blocks; starts the batch engine), ``shutdown()``
    (from another thread), ``server_close()``."""

    def __init__(self, service: CompletionService, sock: socket.socket) -> None:
        import uvicorn

        self.service = service
        self.socket = sock
        self.server_address = sock.getsockname()
        config = uvicorn.Config(
            build_app(service),
            http=_h11_with_header_deadline(service.limits.read_timeout_s),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=64 * 1024,  # header block limit: larger is a 400 from h11
        )
        self._server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        self.service.engine.start()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self.service.engine.stop()
            self._stopped.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        self.service.engine.stop()  # ends streams still in flight, so graceful shutdown does not wait on them
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()


def _h11_with_header_deadline(seconds: float):
    """uvicorn's h11 protocol plus a deadline for a connection's first request head: uvicorn has
    none, so a client trickling header bytes (slowloris) would hold its connection forever. The
    body has its own deadline (408, in ``_read_json_body``); idle keep-alive connections have
    uvicorn's ``timeout_keep_alive``."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # another uvicorn layout: plain h11, without this guard
        return "h11"

    class H11WithHeaderDeadline(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_too_slow)

        def _head_too_slow(self) -> None:
            if getattr(self, "cycle", None) is None and not self.transport.is_closing():
                self.transport.close()  # no request head yet: nothing to answer

        def connection_lost(self, exc) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return H11WithHeaderDeadline


def make_server(
    model,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits = ServerLimits(),
    model_name: str | None = None,
) -> OpenAIServer:
    """A ready (bound, not yet serving) server; call ``serve_forever()`` on it, ``shutdown()`` to stop.
    ``model``: an :class:`~nsvd_lm.serve.engine.Engine` (built with ``limits.engine_limits()``), or an
    open :class:`~nsvd_lm.serve.runtime.OnnxCausalLM`, served by the ONNX Runtime engine.
    ``port=0`` picks a free port (``server.server_address[1]``)."""
    engine = model if isinstance(model, Engine) else make_engine("ort", model, **limits.engine_limits())
    service = CompletionService(engine, limits, model_name)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return OpenAIServer(service, sock)
