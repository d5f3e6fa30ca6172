"""The OpenAI-style completion endpoint: answers, rejects malformed requests with 4xx JSON, survives
them, and serves concurrent requests correctly (server on 127.0.0.1, port 0, in a thread)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("onnxruntime")

from onnx_models import EXPORT_CASES, onnx_lm  # noqa: E402

from nsvd_lm.serve.engine import BACKENDS, make_engine  # noqa: E402
from nsvd_lm.serve.http import ServerLimits, make_server  # noqa: E402

LIMITS = ServerLimits(max_body_bytes=4096, max_prompts=4, max_prompt_tokens=64, max_tokens=24, read_timeout_s=5.0)


@pytest.fixture(scope="module")
def lm():
    return onnx_lm(*EXPORT_CASES[1])


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    if request.param == "genai":
        pytest.importorskip("onnxruntime_genai")
    return request.param


@pytest.fixture(scope="module")
def server(lm, backend):
    srv = make_server(
        make_engine(backend, lm, **LIMITS.engine_limits()), "127.0.0.1", 0, LIMITS, model_name="tiny-qwen2"
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[:2]
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def request(address, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = json.loads(response.read() or b"null")
        return response.status, payload
    finally:
        conn.close()


def test_health(server):
    status, body = request(server, "GET", "/health")
    assert status == 200
    assert body == {"status": "ok", "model": "tiny-qwen2", "provider": "cpu"}


def test_completion_matches_runtime_greedy(server, lm):
    status, body = request(
        server, "POST", "/v1/completions", {"prompt": "The tower is", "max_tokens": 12, "temperature": 0}
    )
    assert status == 200, body
    expected = lm.generate(["The tower is"], max_new_tokens=12)[0]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.tokens)
    assert body["usage"]["prompt_tokens"] == len(expected.prompt_tokens)


def test_list_prompt_and_sampling_with_seed(server, backend):
    if backend == "genai":
        pytest.skip("onnxruntime-genai's static-batching engine has no per-request seed (refused with 400)")
    payload = {"prompt": ["Hello", "The tower is"], "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 4}
    first = request(server, "POST", "/v1/completions", payload)
    second = request(server, "POST", "/v1/completions", payload)
    assert first[0] == second[0] == 200
    assert [c["index"] for c in first[1]["choices"]] == [0, 1]
    assert [c["text"] for c in first[1]["choices"]] == [c["text"] for c in second[1]["choices"]]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"max_tokens": 4}, 400, "missing field 'prompt'"),
        ({"prompt": 42}, 400, "'prompt' must be a string"),
        ({"prompt": []}, 400, "'prompt' must be a string"),
        ({"prompt": ""}, 400, "must not be empty"),
        ({"prompt": ["a"] * 5}, 400, "at most 4 prompts"),
        ({"prompt": "hi", "max_tokens": 25}, 400, r"'max_tokens' must be an integer in \[1, 24\]"),
        ({"prompt": "hi", "max_tokens": "3"}, 400, "'max_tokens' must be an integer"),
        ({"prompt": "hi", "max_tokens": True}, 400, "'max_tokens' must be an integer"),
        ({"prompt": "hi", "temperature": -0.5}, 400, "'temperature' must be a number"),
        ({"prompt": "hi", "top_p": 0}, 400, "'top_p' must be a number"),
        ({"prompt": "hi", "stop": 3}, 400, "'stop' must be a string"),
        ({"prompt": "hi", "n": 2}, 400, "only n=1"),
        ({"prompt": "hi", "stream": "yes"}, 400, "'stream' must be a boolean"),
        ({"prompt": "word " * 80}, 400, "the limit is 64"),
        ([1, 2, 3], 400, "must be a JSON object"),
    ],
)
def test_malformed_requests_get_4xx_json(server, body, status, message):
    got_status, got = request(server, "POST", "/v1/completions", body)
    assert got_status == status
    assert got["error"]["code"] == status
    assert got["error"]["message"]
    assert re.search(message, got["error"]["message"]), got


def test_bad_json_oversize_body_and_unknown_route(server):
    status, body = request(server, "POST", "/v1/completions", raw=b'{"prompt": "hi",')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = request(server, "POST", "/v1/completions", raw=b"\xff\xfe")
    assert status == 400
    status, body = request(server, "POST", "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "limit is 4096" in body["error"]["message"]
    status, body = request(server, "GET", "/nope")
    assert status == 404
    status, body = request(server, "POST", "/v1/edits", {"prompt": "hi"})
    assert status == 404
    assert request(server, "GET", "/health")[0] == 200  # still serving


def test_missing_content_length_is_411(server):
    with socket.create_connection(server, timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):  # the server closes after this error
            chunks.append(chunk)
        reply = b"".join(chunks).decode("latin-1")
    assert reply.startswith("HTTP/1.1 411")
    assert "Content-Length header required" in reply


def test_concurrent_requests_each_get_their_own_answer(server, lm):
    prompts = ["The tower is", "Hello", "In the beginning", "Paris is"]
    expected = {p: lm.generate([p], max_new_tokens=6)[0].text for p in prompts}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(
                lambda p: (
                    p,
                    request(server, "POST", "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0}),
                ),
                prompts * 2,
            )
        )
    for prompt, (status, body) in results:
        assert status == 200, body
        assert body["choices"][0]["text"] == expected[prompt]
