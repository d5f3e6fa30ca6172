"""The OpenAI logprobs pieces (nsvd_lm.serve.logprobs): scoring rows against torch's float64
log-softmax, top-N order, exact text offsets against brute-force prefix decoding on byte-level
and SentencePiece-style tokenizers, and the completions / chat objects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nsvd_lm.serve.logprobs import (
    MAX_TOP_LOGPROBS,
    NEG_INF_LOGPROB,
    TokenScores,
    chat_logprobs,
    check_top_n,
    completion_logprobs,
    score_rows,
    text_offsets,
    token_text,
)

TEXTS = (
    "The tower is 324 metres tall,  about the same height\n\nas an 81-storey building.",
    "héllo 日本語 wörld — naïve café ☕ end",
    "   leading spaces and trailing ones   ",
)


@pytest.fixture(scope="module", params=["smollm2", "bpe", "spm"])
def any_tokenizer(request):
    if request.param == "smollm2":
        from transformers import AutoTokenizer

        from nsvd_lm.smollm2 import smollm2_path

        return AutoTokenizer.from_pretrained(smollm2_path())
    from tiny_models import build_fixture_tokenizer

    return build_fixture_tokenizer(request.param)


def test_score_rows_equals_float64_log_softmax_and_top_n_is_sorted():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 1000)) * 6).astype(np.float32)
    targets = rng.integers(0, 1000, size=7)
    scores = score_rows(logits, targets, top_n=5)
    reference = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    np.testing.assert_allclose(scores.logprobs, reference[np.arange(7), targets], rtol=0, atol=1e-6)
    assert scores.token_ids == [int(t) for t in targets]
    for row, top in enumerate(scores.top):
        want = np.argsort(-reference[row], kind="stable")[:5]
        assert [i for i, _ in top] == [int(i) for i in want]
        np.testing.assert_allclose([v for _, v in top], reference[row, want], rtol=0, atol=1e-6)
    assert all(top == [] for top in score_rows(logits, targets, top_n=0).top)
    assert score_rows(logits, targets, top_n=1).top == [top[:1] for top in scores.top]  # the argmax path


def test_top_n_ties_go_to_the_smaller_token_id():
    logits = np.zeros((1, 10), dtype=np.float32)
    logits[0, [7, 3]] = 5.0
    assert [i for i, _ in score_rows(logits, [0], top_n=1).top[0]] == [3]
    assert [i for i, _ in score_rows(logits, [0], top_n=3).top[0]] == [3, 7, 0]


def test_score_rows_reports_minus_inf_as_json_number():
    logits = np.array([[0.0, -np.inf, 1.0]], dtype=np.float32)
    scores = score_rows(logits, [1], top_n=3)
    assert scores.logprobs == [NEG_INF_LOGPROB]
    assert scores.top[0][-1] == (1, NEG_INF_LOGPROB)
    assert math.isclose(scores.top[0][0][1], 1.0 - math.log(1.0 + math.e), abs_tol=1e-6)


@pytest.mark.parametrize("bad", [-1, MAX_TOP_LOGPROBS + 1, 1.5, True, "3", None])
def test_check_top_n_names_the_field(bad):
    with pytest.raises(ValueError, match=r"'logprobs' must be an integer in \[0, 20\]"):
        check_top_n(bad, "logprobs")


def test_score_rows_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="one target per logits row"):
        score_rows(np.zeros((3, 10), np.float32), [1, 2], top_n=1)


@pytest.mark.parametrize("text", TEXTS)
def test_text_offsets_match_prefix_decoding(any_tokenizer, text):
    """offsets[i] == len(decode(ids[:i])) wherever that prefix ends on a whole character, and the
    pieces join to the full decode: the definition, checked by brute force."""
    ids = any_tokenizer(text)["input_ids"]
    offsets, joined = text_offsets(any_tokenizer, ids)
    full = any_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert joined == full
    assert offsets == sorted(offsets) and len(offsets) == len(ids) and offsets[0] == 0
    for i in range(1, len(ids)):
        prefix = any_tokenizer.decode(ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not prefix.endswith("\ufffd"):
            assert offsets[i] == len(prefix), (i, prefix)
            assert full.startswith(prefix)


def test_text_offsets_count_a_split_character_once():
    from transformers import AutoTokenizer

    from nsvd_lm.smollm2 import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tok("a 日 b")["input_ids"]
    assert any(token_text(tok, i).endswith("\ufffd") for i in ids), "the fixture needs a character split over tokens"
    offsets, text = text_offsets(tok, ids)
    assert text == "a 日 b"
    # Summing the lengths of tokens decoded alone (two U+FFFD for one character) overcounts.
    assert sum(len(token_text(tok, i)) for i in ids) > len(text)
    assert offsets[-1] == len("a 日")


def test_text_offsets_skip_special_tokens(any_tokenizer):
    eos = any_tokenizer.eos_token_id
    ids = any_tokenizer("one two", add_special_tokens=False)["input_ids"] + [eos]
    offsets, text = text_offsets(any_tokenizer, ids, skip_special_tokens=True)
    assert text == any_tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert offsets[-1] == len(text)  # EOS adds no text


def test_completion_logprobs_object(tokenizer):
    ids = tokenizer("The tower is tall")["input_ids"]
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((len(ids) - 1, len(tokenizer))).astype(np.float32) * 4
    scores = TokenScores()
    scores.append_unscored(ids[0])
    scores.extend(score_rows(logits, ids[1:], top_n=2))
    offsets, text = text_offsets(tokenizer, ids)
    obj = completion_logprobs(tokenizer, scores, offsets)
    assert set(obj) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert obj["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert obj["token_logprobs"][0] is None and obj["top_logprobs"][0] is None
    assert obj["text_offset"] == offsets
    reference = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    for pos, (lp, top) in enumerate(zip(obj["token_logprobs"][1:], obj["top_logprobs"][1:])):
        assert math.isclose(lp, reference[pos, ids[pos + 1]], abs_tol=1e-6)
        # top-2 plus the token itself when it is not among them, most likely first
        assert len(top) == (2 if lp >= sorted(reference[pos])[-2] - 1e-9 else 3)
        assert math.isclose(max(top.values()), reference[pos].max(), abs_tol=1e-6)
        assert math.isclose(top[obj["tokens"][pos + 1]], lp, abs_tol=1e-6)
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_top_dict_keeps_the_larger_value_of_a_shared_string(tokenizer):
    """Two ids decoding to the same string (byte pieces of characters: U+FFFD) share a key."""
    ids = tokenizer("日本", add_special_tokens=False)["input_ids"]
    pieces = [i for i in ids if token_text(tokenizer, i) == "\ufffd"]
    if len(pieces) < 1:
        pytest.skip("no lone byte token in this tokenizer")
    other = next(i for i in range(len(tokenizer)) if token_text(tokenizer, i) == "\ufffd" and i != pieces[0])
    scores = TokenScores([pieces[0]], [-3.0], [[(other, -1.0)]])
    obj = completion_logprobs(tokenizer, scores, [0])
    assert obj["top_logprobs"][0] == {"\ufffd": -1.0}


def test_chat_logprobs_object(tokenizer):
    ids = tokenizer("Hi there", add_special_tokens=False)["input_ids"]
    logits = np.random.default_rng(2).standard_normal((len(ids), len(tokenizer))).astype(np.float32)
    scores = score_rows(logits, ids, top_n=3)
    obj = chat_logprobs(tokenizer, scores)
    assert obj["refusal"] is None
    assert [e["token"] for e in obj["content"]] == [tokenizer.decode([i]) for i in ids]
    for entry, lp, top in zip(obj["content"], scores.logprobs, scores.top):
        assert entry["logprob"] == lp and entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert [t["logprob"] for t in entry["top_logprobs"]] == [v for _, v in top]
        assert len(entry["top_logprobs"]) == 3
    with pytest.raises(ValueError, match="every position must be scored"):
        unscored = TokenScores()
        unscored.append_unscored(ids[0])
        chat_logprobs(tokenizer, unscored)
