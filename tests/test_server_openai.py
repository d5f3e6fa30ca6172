"""The server through the official ``openai`` client (server on 127.0.0.1, port 0, in a thread):
completions and chat, streaming (SSE ending in [DONE]), usage, stop, seed, errors as OpenAI
exceptions, concurrent requests batched together with unchanged greedy output, a full queue as
429, and a client that disconnects mid-stream freeing its slot."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

from onnx_models import EXPORT_CASES, onnx_lm  # noqa: E402

from nsvd_lm.serve.engine import BACKENDS, make_engine  # noqa: E402
from nsvd_lm.serve.http import ServerLimits, make_server  # noqa: E402

MODEL = "tiny-qwen2"
LIMITS = ServerLimits(
    max_body_bytes=8192,
    max_prompts=4,
    max_prompt_tokens=64,
    max_tokens=120,
    read_timeout_s=5.0,
    max_batch_seqs=4,
    max_queue=16,
)


@pytest.fixture(scope="module")
def lm():
    return onnx_lm(*EXPORT_CASES[1])


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """Every server test runs on both engines (``nsvd-lm serve --backend ort|genai``)."""
    if request.param == "genai":
        pytest.importorskip("onnxruntime_genai")
    return request.param


class Running:
    """A server in a thread; ``finished`` collects every sequence the engine finished."""

    def __init__(self, lm, limits: ServerLimits, backend: str = "ort", start_engine: bool = True) -> None:
        engine = make_engine(backend, lm, **limits.engine_limits())
        self.srv = make_server(engine, "127.0.0.1", 0, limits, model_name=MODEL)
        self.engine = self.srv.service.engine
        self.finished = []
        self.engine.on_finish = self.finished.append
        if not start_engine:  # the test steps the engine itself
            self.engine.start = lambda: None
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        self.address = self.srv.server_address[:2]
        self.client = openai.OpenAI(
            base_url=f"http://{self.address[0]}:{self.address[1]}/v1", api_key="none", max_retries=0, timeout=60
        )
        wait_for(lambda: _get(self.address, "/health")[0] == 200)

    def close(self) -> None:
        self.client.close()
        self.srv.shutdown()
        self.srv.server_close()
        self.thread.join(timeout=30)


def _get(address, path):
    try:
        conn = http.client.HTTPConnection(*address, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    except OSError:
        return None, None


def wait_for(condition, limit_s: float = 30.0) -> None:
    """Poll until ``condition()`` holds (a liveness wait, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(lm, backend):
    running = Running(lm, LIMITS, backend)
    yield running
    running.close()


def near_tie_or_equal(lm, prompt: list[int], got: list[int], want: list[int]) -> None:
    if got == want:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert k < min(len(got), len(want)), "same prefix, different lengths"
    top2 = np.sort(lm.logits(prompt + want[:k])[-1].astype(np.float64))[-2:]
    assert top2[1] - top2[0] < 1e-4, f"divergence at token {k} is not at a near-tie (gap {top2[1] - top2[0]:.3g})"


def chat_prompt_ids(lm, messages) -> list[int]:
    text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_completion_equals_runtime_greedy(server, lm):
    out = server.client.completions.create(model=MODEL, prompt="The tower is", max_tokens=12, temperature=0)
    expected = lm.generate(["The tower is"], max_new_tokens=12)[0]
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_tokens)
    assert out.usage.completion_tokens == len(expected.tokens)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_completion_equals_the_plain_answer(server, lm):
    expected = lm.generate(["Hello"], max_new_tokens=20)[0]
    chunks = list(
        server.client.completions.create(
            model=MODEL,
            prompt="Hello",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.tokens)


def test_sse_wire_format_ends_with_done(server):
    conn = http.client.HTTPConnection(*server.address, timeout=60)
    body = json.dumps({"prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    raw = response.read().decode("utf-8")
    conn.close()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completion_uses_the_chat_template(server, lm):
    messages = [{"role": "user", "content": "What is the tower?"}]
    ids = chat_prompt_ids(lm, messages)
    assert lm.tokenizer.decode(ids).startswith("<|im_start|>")
    expected = lm.generate([ids], max_new_tokens=16)[0]
    out = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(ids)

    stream = server.client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_stop_strings_streamed_and_not(server, lm):
    full = lm.generate(["The tower is"], max_new_tokens=20)[0].text
    stop = full[5:8]
    expected = lm.generate(["The tower is"], max_new_tokens=20, stop=[stop])[0]
    assert expected.text == full[: full.find(stop)]
    plain = server.client.completions.create(
        model=MODEL, prompt="The tower is", max_tokens=20, temperature=0, stop=[stop]
    )
    streamed = server.client.completions.create(
        model=MODEL, prompt="The tower is", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert plain.choices[0].text == expected.text and plain.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_seeded_sampling_is_reproducible_and_equals_the_runtime(server, lm, backend):
    if backend == "genai":
        pytest.skip("onnxruntime-genai's static-batching engine has no per-request seed (refused with 400)")
    kwargs = dict(model=MODEL, prompt="The tower is", max_tokens=10, temperature=0.9, top_p=0.9, seed=11)
    first = server.client.completions.create(**kwargs).choices[0].text
    second = server.client.completions.create(**kwargs).choices[0].text
    assert (
        first == second == lm.generate(["The tower is"], max_new_tokens=10, temperature=0.9, top_p=0.9, seed=11)[0].text
    )


def test_concurrent_clients_are_batched_and_greedy_output_is_unchanged(lm, backend):
    # The engine is held until every request is queued, so they are batched for sure; with 7
    # requests and 4 slots, the last ones join the running batch as earlier ones finish.
    running = Running(lm, LIMITS, backend, start_engine=False)
    try:
        prompts = ["The tower is", "Hello", "In the beginning", "Paris is", "The tallest structure", "Its base is", "A"]
        lengths = [6, 20, 11, 3, 15, 9, 13]
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            futures = [
                pool.submit(running.client.completions.create, model=MODEL, prompt=p, max_tokens=n, temperature=0)
                for p, n in zip(prompts, lengths)
            ]
            wait_for(lambda: running.engine.stats()["waiting"] == len(prompts))
            del running.engine.start  # back to the real method: start the engine now
            running.engine.start()
            results = [f.result() for f in futures]
        snap = running.engine.stats()
        assert snap["max_batch_rows"] == 4 and snap["joined_running_batch"] >= 1
        by_prompt = {tuple(s.prompt_tokens): s.tokens for s in running.finished}
        for prompt, n, out in zip(prompts, lengths, results):
            ids = lm.encode(prompt)
            want = lm.generate([ids], max_new_tokens=n)[0]
            near_tie_or_equal(lm, ids, by_prompt[tuple(ids)], want.tokens)
            if by_prompt[tuple(ids)] == want.tokens:
                assert out.choices[0].text == want.text
    finally:
        running.close()


def test_queue_full_is_429_and_a_disconnected_stream_frees_its_slot(lm, backend):
    limits = ServerLimits(max_prompt_tokens=64, max_tokens=100, max_batch_seqs=1, max_queue=2, read_timeout_s=5.0)
    running = Running(lm, limits, backend, start_engine=False)
    engine = running.engine
    try:
        first = running.client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=100, temperature=0, stream=True
        )
        second = running.client.completions.create(
            model=MODEL, prompt="Paris is", max_tokens=3, temperature=0, stream=True
        )
        wait_for(lambda: engine.stats()["waiting"] == 2)
        with pytest.raises(openai.RateLimitError) as err:
            running.client.completions.create(model=MODEL, prompt="A", max_tokens=3)
        assert err.value.status_code == 429
        assert err.value.body["code"] == 429 and "retry later" in err.value.body["message"]

        for _ in range(5):  # `first` is admitted (max_batch_seqs=1) and decodes; `second` waits
            engine.step()
        assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
        stream = iter(first)
        assert next(stream).choices[0].text is not None
        first.close()  # the client goes away mid-stream
        wait_for(lambda: any(s.cancelled for s in engine._running))
        engine.step()
        snap = engine.stats()
        assert snap["cancelled"] == 1
        cancelled = [s for s in running.finished if s.finish_reason == "cancelled"]
        assert len(cancelled) == 1 and len(cancelled[0].tokens) < 100
        while engine.step():  # `second` gets the freed slot and completes
            pass
        assert "".join(c.choices[0].text for c in second) == lm.generate(["Paris is"], max_new_tokens=3)[0].text
        assert engine.stats()["tokens_reserved"] == 0
        wait_for(lambda: _get(running.address, "/stats")[1]["http_requests_active"] == 0)  # no request left counted
    finally:
        running.close()


def test_errors_are_openai_exceptions(server):
    client = server.client
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=121)
    assert "'max_tokens' must be an integer in [1, 120]" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="the limit is 64"):
        client.completions.create(model=MODEL, prompt="word " * 100, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={"mystery": 1})
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert client.models.list().data[0].id == MODEL  # still serving


def test_stats_endpoint(server):
    server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    status, body = _get(server.address, "/stats")
    assert status == 200
    assert body["limits"]["max_seqs"] == 4 and body["limits"]["max_waiting"] == 16
    assert body["completed"] >= 1 and body["running"] == 0 and body["http_requests_active"] == 0


def test_stalled_body_gets_408_and_stalled_headers_are_cut_off(lm, backend):
    running = Running(lm, ServerLimits(read_timeout_s=1.0), backend)
    try:
        with socket.create_connection(running.address, timeout=30) as sock:
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": "he')
            reply = _read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b"timed out reading the request body" in reply
        with socket.create_connection(running.address, timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            assert _read_until_closed(sock) == b""  # closed by the server, nothing to answer
        assert _get(running.address, "/health")[0] == 200
    finally:
        running.close()


def _read_until_closed(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_disconnected_stream_leaves_the_batch_before_the_next_decode_step(lm, backend):
    """The row of a client that goes away is freed by the very next step: it is not decoded again,
    its tokens are released, and the other row goes on."""
    running = Running(lm, LIMITS, backend, start_engine=False)
    engine = running.engine
    try:
        leaver = running.client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=100, temperature=0, stream=True
        )
        stayer = running.client.completions.create(
            model=MODEL, prompt="Paris is", max_tokens=12, temperature=0, stream=True
        )
        wait_for(lambda: engine.stats()["waiting"] == 2)
        for _ in range(3):
            engine.step()
        assert engine.stats()["running"] == 2
        next(iter(leaver))
        leaver.close()  # the client goes away mid-stream
        wait_for(lambda: any(s.cancelled for s in engine._running))
        gone = next(s for s in engine._running if s.cancelled)
        tokens_before = len(gone.tokens)
        reserved_before = engine.stats()["tokens_reserved"]
        engine.step()  # one step: the row is out of the batch before it decodes
        snap = engine.stats()
        assert gone.finish_reason == "cancelled" and len(gone.tokens) == tokens_before
        assert snap["running"] == 1
        if backend == "ort":  # the rows of its own KV cache (GenAI's cache is internal to it)
            assert snap["cache_rows"] == 1
        assert snap["tokens_reserved"] == reserved_before - gone.reserved_tokens
        while engine.step():
            pass
        assert "".join(c.choices[0].text for c in stayer) == lm.generate(["Paris is"], max_new_tokens=12)[0].text
    finally:
        running.close()


def test_64_concurrent_clients_on_16_rows_all_finish_and_only_the_65th_is_429(lm, backend):
    """64 clients at once against 16 rows and a 64-sequence queue: all are queued (none rejected),
    a 65th gets 429, and every one of the 64 then gets the greedy text of its prompt served alone."""
    limits = ServerLimits(max_prompt_tokens=64, max_tokens=16, max_batch_seqs=16, max_queue=64, read_timeout_s=30.0)
    running = Running(lm, limits, backend, start_engine=False)
    engine = running.engine
    try:
        prompts = [
            "The tower is",
            "Hello",
            "In the beginning",
            "Paris is",
            "The tallest structure",
            "Its base",
            "A",
            "B",
        ]
        work = [(prompts[i % len(prompts)], 4 + i % 9) for i in range(64)]
        with ThreadPoolExecutor(max_workers=64) as pool:
            futures = [
                pool.submit(running.client.completions.create, model=MODEL, prompt=p, max_tokens=n, temperature=0)
                for p, n in work
            ]
            wait_for(lambda: engine.stats()["waiting"] == 64, limit_s=120)
            with pytest.raises(openai.RateLimitError):
                running.client.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
            del engine.start  # back to the real method: start the engine now
            engine.start()
            results = [f.result() for f in futures]
        snap = engine.stats()
        assert snap["completed"] == 64 and snap["rejected_queue_full"] == 1 and snap["max_batch_rows"] == 16
        by_key = {(tuple(s.prompt_tokens), s.max_tokens): s.tokens for s in running.finished}
        for (prompt, n), out in zip(work, results):
            ids = lm.encode(prompt)
            want = lm.generate([ids], max_new_tokens=n)[0]
            got = by_key[(tuple(ids), n)]
            near_tie_or_equal(lm, ids, got, want.tokens)
            if got == want.tokens:
                assert out.choices[0].text == want.text and out.choices[0].finish_reason == want.finish_reason
    finally:
        running.close()


def test_past_the_concurrent_request_limit_is_503_and_the_others_still_finish(lm, backend):
    limits = ServerLimits(max_prompt_tokens=64, max_tokens=8, max_concurrent_requests=2, read_timeout_s=5.0)
    running = Running(lm, limits, backend, start_engine=False)
    engine = running.engine
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [
                pool.submit(running.client.completions.create, model=MODEL, prompt=p, max_tokens=4, temperature=0)
                for p in ("Hello", "Paris is")
            ]
            wait_for(lambda: engine.stats()["waiting"] == 2)
            status, body = _post_raw(running.address, {"model": MODEL, "prompt": "A", "max_tokens": 2})
            assert status == 503 and body["error"]["code"] == 503 and "retry later" in body["error"]["message"]
            del engine.start  # back to the real method: start the engine now
            engine.start()
            texts = [f.result().choices[0].text for f in futures]
        assert texts == [lm.generate([p], max_new_tokens=4)[0].text for p in ("Hello", "Paris is")]
    finally:
        running.close()


def _post_raw(address, payload):
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(payload), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.getheader("Retry-After") == "1"
        return response.status, json.loads(response.read())
    finally:
        conn.close()
