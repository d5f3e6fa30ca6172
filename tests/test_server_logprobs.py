"""``echo`` and ``logprobs`` on the server (through the ``openai`` client and raw HTTP): prompt
scores equal the PyTorch model's log-softmax, also when the prompt is prefilled in several
chunks; generated tokens' scores; the chat ``logprobs`` object; and 400s naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

from onnx_models import EXPORT_CASES, exported_tiny, onnx_lm  # noqa: E402
from test_server_openai import MODEL, Running  # noqa: E402

from nsvd_lm.serve.http import ServerLimits  # noqa: E402

CASE = EXPORT_CASES[1]
LIMITS = ServerLimits(
    max_body_bytes=1 << 16,
    max_prompts=4,
    max_prompt_tokens=400,  # above the tiny model's 256-token context: the context check must refuse
    max_tokens=32,
    read_timeout_s=5.0,
    max_batch_seqs=4,
    prefill_chunk_tokens=16,  # prompts below are prefilled (and scored) in several chunks
)
TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side."
)


@pytest.fixture(scope="module")
def lm():
    return onnx_lm(*CASE)


@pytest.fixture(scope="module")
def server(lm):
    running = Running(lm, LIMITS)
    yield running
    running.close()


def torch_logprobs(ids: list[int]) -> np.ndarray:
    """(len, vocab) float64 log-softmax of the PyTorch model the export was made from."""
    model = exported_tiny(*CASE).model
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def post(server, path: str, body) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection(*server.address, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def test_echo_scores_the_prompt_like_the_model(server, lm):
    ids = lm.encode(TEXT)
    assert len(ids) > 2 * LIMITS.prefill_chunk_tokens
    out = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    reference = torch_logprobs(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = np.array(lp.token_logprobs[1:])
    want = reference[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, lm.token_logprobs(ids), rtol=0, atol=1e-5)  # one pass, no chunks
    assert lp.tokens == [lm.tokenizer.decode([i]) for i in ids]
    assert choice.text == lm.tokenizer.decode(ids) == TEXT
    assert lp.text_offset == [len(lm.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    for pos, top in enumerate(lp.top_logprobs[1:]):
        assert 3 <= len(top) <= 4
        assert abs(max(top.values()) - reference[pos].max()) < 1e-4
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == len(ids)


def test_echo_with_one_generated_token_is_what_lm_eval_reads(server, lm):
    """lm-eval's local-completions: echo, logprobs=1, max_tokens=1, temperature 0; it sums
    token_logprobs[ctxlen:-1] and tests greediness against max(top_logprobs)."""
    ids = lm.encode("The tower is 324 metres tall")
    out = server.client.completions.create(
        model=MODEL, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    greedy = lm.generate([ids], max_new_tokens=1)[0]
    reference = torch_logprobs(ids + greedy.tokens)
    assert abs(lp.token_logprobs[-1] - reference[len(ids) - 1, greedy.tokens[0]]) < 1e-4
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the token is the top one
    assert out.choices[0].text == lm.tokenizer.decode(ids) + greedy.text
    assert lp.text_offset[-1] == len(lm.tokenizer.decode(ids))


def test_logprobs_of_generated_tokens(server, lm):
    out = server.client.completions.create(model=MODEL, prompt="The tower is", max_tokens=8, temperature=0, logprobs=2)
    choice = out.choices[0]
    expected = lm.generate(["The tower is"], max_new_tokens=8)[0]
    lp = choice.logprobs
    assert choice.text == expected.text
    assert lp.tokens == [lm.tokenizer.decode([t]) for t in expected.tokens]
    reference = torch_logprobs(expected.prompt_tokens + expected.tokens)
    start = len(expected.prompt_tokens) - 1
    want = [reference[start + k, t] for k, t in enumerate(expected.tokens)]
    np.testing.assert_allclose(lp.token_logprobs, want, rtol=0, atol=1e-4)
    assert all(v == max(top.values()) for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_string_prompt_echo_uses_the_servers_tokens(server, lm):
    out = server.client.completions.create(
        model=MODEL, prompt=["Hello world", TEXT], max_tokens=0, echo=True, logprobs=0
    )
    for choice, text in zip(sorted(out.choices, key=lambda c: c.index), ["Hello world", TEXT]):
        ids = lm.encode(text)
        assert choice.logprobs.tokens == [lm.tokenizer.decode([i]) for i in ids]
        assert choice.text == text
        # logprobs=0: no alternatives, only the token itself
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])


def test_echo_without_logprobs_returns_the_prompt(server, lm):
    out = server.client.completions.create(model=MODEL, prompt="The tower is", max_tokens=4, temperature=0, echo=True)
    expected = lm.generate(["The tower is"], max_new_tokens=4)[0]
    assert out.choices[0].text == "The tower is" + expected.text and out.choices[0].logprobs is None


def test_chat_logprobs(server, lm):
    messages = [{"role": "user", "content": "What is the tower?"}]
    out = server.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(out.choices[0].message.content[:1])
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.logprob == entry.top_logprobs[0].logprob  # greedy
        assert entry.bytes == list(entry.token.encode("utf-8"))
    plain = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == out.choices[0].message.content


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, r"'logprobs' must be an integer in \[0, 20\]"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, r"'logprobs' must be an integer"),
        ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "'echo' must be a boolean"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, r"'max_tokens' must be an integer in \[1, 32\]"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": True}, r"0 only with echo=true and logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 1, "n": 2}, "only n=1"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 1, "stream": True}, "'logprobs' is not supported with stream"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "stream": True}, "'echo' is not supported with stream"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, r"token id 1000000000 is outside the vocabulary"),
        ("/v1/completions", {"prompt": [[1, 2], []]}, "'prompt' must be a string"),
        ("/v1/completions", {"prompt": [1, "a"]}, "'prompt' must be a string"),
        ("/v1/completions", {"prompt": "word " * 300, "echo": True, "logprobs": 1, "max_tokens": 0}, "'echo'"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "needs 'logprobs'",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            r"'top_logprobs' must be an integer in \[0, 20\]",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "must be a boolean"),
    ],
)
def test_bad_logprobs_requests_get_400_naming_the_field(server, path, body, message):
    import re

    status, got = post(server, path, body)
    assert status == 400, got
    assert re.search(message, got["error"]["message"]), got["error"]["message"]


def test_echo_past_the_context_names_echo_and_the_context(server, lm):
    ids = lm.encode("word " * 300)
    assert lm.context_length < len(ids) <= LIMITS.max_prompt_tokens
    status, got = post(server, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert status == 400
    assert f"exceeds the context length {lm.context_length}" in got["error"]["message"]
    assert "'echo'" in got["error"]["message"]


def test_a_backend_without_scores_refuses_logprobs_before_queueing(lm):
    from nsvd_lm.serve.engine import Engine, GenSequence

    class NoScores(Engine):
        backend = "noscores"

        def step(self) -> bool:
            return False

    engine = NoScores(
        tokenizer=lm.tokenizer, context_length=256, eos_token_ids={0}, device="cpu", model_name="x", max_seqs=2
    )
    engine.check_fits(GenSequence(prompt_tokens=[1, 2], max_tokens=2))
    for fields in ({"logprobs": 1}, {"prompt_logprobs": 0, "max_tokens": 0}):
        seq = GenSequence(prompt_tokens=[1, 2], **{"max_tokens": 2, **fields})
        with pytest.raises(ValueError, match="not supported by the noscores backend; use --backend ort"):
            engine.submit([seq])
    assert engine.stats()["submitted"] == 0
