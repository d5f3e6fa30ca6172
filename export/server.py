"""A small OpenAI-style completion endpoint over :class:`~nsvd_lm.export.runtime.OnnxCausalLM`.

    GET  /health          -> {"status": "ok", "model": ..., "provider": ...}
    GET  /v1/models       -> the one served model
    POST /v1/completions  -> {"prompt": str | [str], "max_tokens": int, "temperature": float,
                              "top_p": float, "stop": str | [str], "seed": int}

Every request is bounded (body bytes, prompts per request, prompt tokens, max_tokens); malformed
ones get a 4xx JSON error ``{"error": {"message", "type", "code"}}`` and never reach the model.
Requests are served by a thread each (``ThreadingHTTPServer``); generation runs one batch at a time
behind a lock, so concurrent requests queue instead of oversubscribing the CPU/GPU. A request
with a list of prompts is generated as one left-padded batch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

OPENAI_DEFAULT_MAX_TOKENS = 16
OPENAI_DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_prompts: int = 8
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_stop_strings: int = 4
    read_timeout_s: float = 30.0  # a client that stalls mid-body does not hold a thread forever


class RequestError(Exception):
    """A client error: becomes an HTTP 4xx with a JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


def parse_completion_request(payload: Any, limits: ServerLimits) -> CompletionRequest:
    """Validate an OpenAI-style completion body; raise RequestError(400, ...) naming the field."""
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object")
    if "prompt" not in payload:
        raise RequestError(400, "missing field 'prompt' (a string or a list of strings)")
    prompt = payload["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError(400, "'prompt' must be a string or a non-empty list of strings")
    if len(prompts) > limits.max_prompts:
        raise RequestError(400, f"at most {limits.max_prompts} prompts per request; got {len(prompts)}")
    if any(not p for p in prompts):
        raise RequestError(400, "'prompt' must not be empty")

    max_tokens = payload.get("max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
    if not _is_int(max_tokens) or not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(400, f"'max_tokens' must be an integer in [1, {limits.max_tokens}]; got {max_tokens!r}")
    temperature = payload.get("temperature", OPENAI_DEFAULT_TEMPERATURE)
    if temperature is None:
        temperature = OPENAI_DEFAULT_TEMPERATURE
    if not _is_number(temperature) or not 0.0 <= temperature <= 2.0:
        raise RequestError(400, f"'temperature' must be a number in [0, 2] (0 = greedy); got {temperature!r}")
    top_p = payload.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_number(top_p) or not 0.0 < top_p <= 1.0:
        raise RequestError(400, f"'top_p' must be a number in (0, 1]; got {top_p!r}")
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
    seed = payload.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(400, f"'seed' must be a non-negative integer; got {seed!r}")
    n = payload.get("n", 1)
    if n != 1:
        raise RequestError(400, "only n=1 is supported")
    if payload.get("stream"):
        raise RequestError(400, "stream=true is not supported by this server; use `nsvd-lm generate` for streaming")
    if payload.get("echo"):
        raise RequestError(400, "'echo' is not supported")
    if payload.get("logprobs") is not None:
        raise RequestError(400, "'logprobs' is not supported")
    if payload.get("best_of") not in (None, 1):
        raise RequestError(400, "'best_of' is not supported (only 1)")
    if payload.get("suffix") not in (None, ""):
        raise RequestError(400, "'suffix' is not supported")
    return CompletionRequest(prompts, max_tokens, float(temperature), float(top_p), stops, seed)


class CompletionService:
    """Checks requests against the limits and the model's context, then generates (one at a time)."""

    def __init__(self, lm, limits: ServerLimits = ServerLimits(), model_name: str | None = None) -> None:
        self.lm = lm
        self.limits = limits
        self.model_name = model_name or lm.model_dir.name
        self._lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "provider": self.lm.device}

    def complete(self, payload: Any) -> dict[str, Any]:
        request = parse_completion_request(payload, self.limits)
        # Tokenizing happens under the same lock as generation: fast tokenizers are not safe to
        # share between threads ("Already borrowed"), and generation decodes with the same one.
        with self._lock:
            encoded = [self.lm.encode(p) for p in request.prompts]
            self._check_prompt_lengths(encoded, request.max_tokens)
            completions = self.lm.generate(
                encoded,
                max_new_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=request.stop,
            )
        prompt_tokens = sum(len(c.prompt_tokens) for c in completions)
        completion_tokens = sum(len(c.tokens) for c in completions)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                for i, c in enumerate(completions)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _check_prompt_lengths(self, encoded: list[list[int]], max_tokens: int) -> None:
        for i, tokens in enumerate(encoded):
            if not tokens:
                raise RequestError(400, f"prompt {i} has no tokens")
            if len(tokens) > self.limits.max_prompt_tokens:
                raise RequestError(400, f"prompt {i} has {len(tokens)} tokens; the limit is {self.limits.max_prompt_tokens}")
            if len(tokens) + max_tokens > self.lm.context_length:
                raise RequestError(
                    400,
                    f"prompt {i} ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the context length {self.lm.context_length}",
                )


class CompletionHandler(BaseHTTPRequestHandler):
    """HTTP plumbing only: body bounds, JSON in/out, error mapping. The service does the rest."""

    server_version = "nsvd-lm-onnx/0.1"
    protocol_version = "HTTP/1.1"
    service: CompletionService  # set on the subclass made by make_server

    def setup(self) -> None:
        self.timeout = self.service.limits.read_timeout_s
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.info("%s %s", self.address_string(), format % args)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, self.service.health())
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.service.model_name, "object": "model"}]})
        else:
            self._send_error_json(404, f"no route GET {path}")

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0]
        try:
            if path != "/v1/completions":
                self._drain_or_close()
                raise RequestError(404, f"no route POST {path}")
            payload = self._read_json_body()
            self._send_json(200, self.service.complete(payload))
        except RequestError as exc:
            self._send_error_json(exc.status, exc.message)
        except Exception as exc:  # a bug must not kill the server thread silently
            logger.exception("completion failed")
            self.close_connection = True
            self._send_error_json(500, f"internal error: {type(exc).__name__}: {exc}")

    def _drain_or_close(self) -> None:
        # We will not read this body; close after replying so its bytes are not parsed as a request.
        self.close_connection = True

    def _read_json_body(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not supported; send Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length header required")
        try:
            length = int(length_header)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length_header!r}") from None
        if length < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length_header!r}")
        if length > self.service.limits.max_body_bytes:
            self.close_connection = True  # the unread body would otherwise be parsed as the next request
            raise RequestError(413, f"request body is {length} bytes; the limit is {self.service.limits.max_body_bytes}")
        try:
            raw = self.rfile.read(length)
        except (TimeoutError, OSError):
            self.close_connection = True
            raise RequestError(408, "timed out reading the request body") from None
        if len(raw) != length:
            self.close_connection = True
            raise RequestError(400, "request body shorter than Content-Length")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"body is not valid JSON: {exc}") from None


def make_server(
    lm, host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits = ServerLimits(), model_name: str | None = None
) -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) server; call ``serve_forever()`` on it, ``shutdown()`` to stop.
    ``port=0`` picks a free port (``server.server_address[1]``)."""
    service = CompletionService(lm, limits, model_name)
    handler = type("BoundCompletionHandler", (CompletionHandler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
