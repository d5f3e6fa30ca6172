"""Continuous batching engine (nsvd_lm/serve/ort_engine.py), driven step by step so it is exact when a
sequence joins or leaves: batched greedy output equals the same prompt generated alone, rows join
a running batch (shorter and longer than it), leave without disturbing the others, cancellation
and the bounds on sequences / tokens / the queue."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from onnx_models import onnx_lm  # noqa: E402

from nsvd_lm.serve.engine import GenSequence, QueueFull  # noqa: E402
from nsvd_lm.serve.ort_engine import OrtEngine  # noqa: E402
from nsvd_lm.serve.stops import held_back  # noqa: E402

NEAR_TIE = 1e-4


@pytest.fixture(scope="module", params=[("qwen2", "nsvd-i", "api"), ("llama", "nid-i", "cli")], ids=["qwen2", "llama"])
def lm(request):
    return onnx_lm(*request.param)


def assert_same_as_alone(lm, prompt: list[int], got: list[int], want: list[int]) -> None:
    """``got`` (batched) must equal ``want`` (alone), except from a step where the alone run's
    top-2 logits are within NEAR_TIE of each other: there float rounding may pick either."""
    if got == want:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert k < min(len(got), len(want)), f"same prefix but different lengths: {len(got)} vs {len(want)}"
    logits = lm.logits(prompt + want[:k])[-1].astype(np.float64)
    top2 = np.sort(logits)[-2:]
    gap = float(top2[1] - top2[0])
    assert gap < NEAR_TIE, f"batched output diverges at token {k} where the top-2 gap is {gap:.3g} (not a near-tie)"


def alone(lm, prompt: list[int], max_tokens: int, **kw) -> list[int]:
    return lm.generate([prompt], max_new_tokens=max_tokens, **kw)[0].tokens


def run_until_idle(engine: OrtEngine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("engine did not become idle")


def test_rows_join_and_leave_a_running_batch_with_unchanged_greedy_output(lm):
    tok = lm.encode
    prompts = {
        "a": tok("The tower is"),
        "b": tok("Hello"),  # shorter than the running batch: padded on the left
        "c": tok(
            "In the beginning there was a very long sentence about towers and bridges"
        ),  # longer: the batch is padded
        "d": tok("Paris is"),
    }
    max_tokens = {"a": 8, "b": 20, "c": 14, "d": 6}
    engine = OrtEngine(lm, max_seqs=8)
    seqs = {k: GenSequence(prompt_tokens=p, max_tokens=max_tokens[k]) for k, p in prompts.items()}
    engine.submit([seqs["a"]])
    for _ in range(3):
        engine.step()
    assert len(seqs["a"].tokens) == 4  # prefill token + 3 decode steps
    engine.submit([seqs["b"], seqs["c"]])
    engine.step()
    engine.step()
    engine.submit([seqs["d"]])
    run_until_idle(engine)

    stats = engine.stats()
    assert stats["joined_running_batch"] == 3
    assert stats["max_batch_rows"] == 4
    assert stats["running"] == stats["waiting"] == stats["tokens_reserved"] == 0
    for key, seq in seqs.items():
        assert seq.finish_reason in ("stop", "length")
        want = alone(lm, prompts[key], max_tokens[key])
        assert_same_as_alone(lm, prompts[key], seq.tokens, want)
        assert seq.final_text() == lm.generate([prompts[key]], max_new_tokens=max_tokens[key])[0].text


def test_chunked_prefill_gives_the_same_tokens(lm):
    prompt = lm.encode("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest")
    assert len(prompt) > 16
    engine = OrtEngine(lm, prefill_chunk_tokens=7)
    other = GenSequence(prompt_tokens=lm.encode("Hello"), max_tokens=30)
    seq = GenSequence(prompt_tokens=prompt, max_tokens=10)
    engine.submit([other])
    engine.step()
    engine.submit([seq])
    engine.step()
    assert seq.prefilled == 7 and not seq.tokens  # one chunk per step while `other` keeps decoding
    run_until_idle(engine)
    assert_same_as_alone(lm, prompt, seq.tokens, alone(lm, prompt, 10))
    assert_same_as_alone(lm, other.prompt_tokens, other.tokens, alone(lm, other.prompt_tokens, 30))


def test_seeded_sampling_matches_the_runtime_alone(lm):
    prompt = lm.encode("The tower is")
    engine = OrtEngine(lm)
    seq = GenSequence(prompt_tokens=prompt, max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    engine.submit([seq])
    run_until_idle(engine)
    assert seq.tokens == alone(lm, prompt, 12, temperature=0.9, top_p=0.9, seed=7)


def test_cancel_frees_the_slot_and_the_tokens(lm):
    events = []
    engine = OrtEngine(lm, max_seqs=1)
    first = GenSequence(
        prompt_tokens=lm.encode("Hello"), max_tokens=50, sink=lambda s, k, p: events.append((s.index, k, p))
    )
    second = GenSequence(prompt_tokens=lm.encode("Paris is"), max_tokens=3)
    engine.submit([first, second])
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1  # max_seqs=1
    engine.cancel(first)
    engine.step()
    assert first.finish_reason == "cancelled" and len(first.tokens) < 50
    assert (0, "done", "cancelled") in events
    run_until_idle(engine)
    assert second.finish_reason in ("stop", "length") and len(second.tokens) >= 1
    snap = engine.stats()
    assert snap["cancelled"] == 1 and snap["tokens_reserved"] == 0 and snap["running"] == 0


def test_a_cancelled_waiting_sequence_never_runs(lm):
    engine = OrtEngine(lm)
    seq = GenSequence(prompt_tokens=lm.encode("Hello"), max_tokens=5)
    engine.submit([seq])
    engine.cancel(seq)
    run_until_idle(engine)
    assert seq.finish_reason == "cancelled" and seq.tokens == []
    assert engine.stats()["prefill_tokens"] == 0


def test_bounds_on_sequences_tokens_and_queue(lm):
    prompt = lm.encode("Hello")
    engine = OrtEngine(lm, max_seqs=2, max_tokens_in_flight=40, max_waiting=2)
    with pytest.raises(ValueError, match="tokens-in-flight budget 40"):
        engine.submit([GenSequence(prompt_tokens=prompt, max_tokens=40)])
    with pytest.raises(ValueError, match="context length"):
        engine.check_fits(GenSequence(prompt_tokens=prompt, max_tokens=lm.context_length))
    seqs = [GenSequence(prompt_tokens=prompt, max_tokens=15) for _ in range(2)]
    engine.submit(seqs)
    with pytest.raises(QueueFull, match="limit 2"):
        engine.submit([GenSequence(prompt_tokens=prompt, max_tokens=5)])

    # Two sequences reserve 2 x (1 + 15) = 32 of 40 tokens: a third of 16 waits although a slot is free.
    engine = OrtEngine(lm, max_seqs=3, max_tokens_in_flight=40)
    seqs = [GenSequence(prompt_tokens=prompt, max_tokens=15) for _ in range(3)]
    engine.submit(seqs)
    engine.step()
    snap = engine.stats()
    assert snap["running"] + snap["prefilling"] == 2 and snap["waiting"] == 1 and snap["tokens_reserved"] == 32
    run_until_idle(engine)
    assert all(s.finish_reason in ("stop", "length") for s in seqs)
    with pytest.raises(ValueError, match="max_seqs"):
        OrtEngine(lm, max_seqs=0)


def test_streamed_deltas_never_show_a_stop_string(lm):
    prompt = lm.encode("The tower is")
    full = lm.generate([prompt], max_new_tokens=20)[0].text
    assert len(full) > 8
    stop = full[4:7]
    deltas = []
    engine = OrtEngine(lm)
    seq = GenSequence(
        prompt_tokens=prompt, max_tokens=20, stop=(stop,), stream_text=True, sink=lambda s, k, p: deltas.append((k, p))
    )
    engine.submit([seq])
    run_until_idle(engine)
    streamed = "".join(p for k, p in deltas if k == "delta")
    expected = lm.generate([prompt], max_new_tokens=20, stop=[stop])[0]
    assert streamed == seq.final_text() == expected.text == full[: full.find(stop)]
    assert seq.finish_reason == "stop" and deltas[-1] == ("done", "stop")


def test_held_back_suffix():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("abc\ufffd", []) == 1
    assert held_back("ab", ["abc", "b"]) == 2
