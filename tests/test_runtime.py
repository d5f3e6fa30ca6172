"""ONNX Runtime wrapper on exported tiny compressed models: greedy generation identical to
``model.generate``, batching with left padding, sampling, streaming, stops, perplexity parity
(our wrapper and lm-eval's built-in ``onnxruntime`` backend), ONNX Runtime GenAI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from onnx_models import CALIBRATION_TEXT, EXPORT_CASES, exported_tiny, onnx_lm, tokenizer  # noqa: E402

CASE_IDS = [f"{arch}-{method}" for arch, method, _ in EXPORT_CASES]
PROMPTS = ["The tower is", "Hello", "In the beginning of the twentieth century, the city"]


@pytest.fixture(scope="module", params=EXPORT_CASES, ids=CASE_IDS)
def case(request):
    return exported_tiny(*request.param), onnx_lm(*request.param)


def _torch_greedy(model, prompts, max_new_tokens):
    tok = tokenizer()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _strip_after_eos(tokens, eos_ids):
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_matches_transformers_generate(case, batch):
    exported, lm = case
    prompts = PROMPTS[:batch]
    expected = _torch_greedy(exported.model, prompts, 32)
    got = lm.generate(prompts, max_new_tokens=32)
    for completion, reference in zip(got, expected):
        assert completion.tokens == _strip_after_eos(reference, lm.eos_token_ids)
        assert completion.finish_reason == ("stop" if len(completion.tokens) < 32 else "length")


def test_kv_cache_stays_on_device_as_ortvalues(case):
    import onnxruntime as ort

    _, lm = case
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    logits, presents = lm.forward(ids, np.ones_like(ids), np.arange(3)[None], None)
    assert logits.shape == (1, 3, len(tokenizer()))
    assert len(presents) == 2 * lm.num_layers
    assert all(isinstance(p, ort.OrtValue) for p in presents)
    assert presents[0].device_name().lower() == lm.device
    assert presents[0].shape() == [1, lm.num_kv_heads, 3, lm.head_dim]


def test_logits_to_keep_returns_the_last_positions_unchanged(case):
    """The export's ``logits_to_keep`` input: N = last N positions (what a prefill samples from),
    0 or not fed = every position (what scoring and readers unaware of the input get)."""
    _, lm = case
    assert lm.has_logits_to_keep
    ids = np.array([[5, 6, 7, 8, 9]], dtype=np.int64)
    mask, pos = np.ones_like(ids), np.arange(5)[None]
    full, _ = lm.run(ids, mask, pos, None)
    assert full.shape == (1, 5, len(tokenizer()))
    for keep in (1, 2):
        last, _ = lm.run(ids, mask, pos, None, logits_to_keep=keep)
        assert last.shape == (1, keep, full.shape[2])
        np.testing.assert_allclose(last, full[:, -keep:], rtol=0, atol=1e-5)
    all_again, _ = lm.run(ids, mask, pos, None, logits_to_keep=0)
    np.testing.assert_array_equal(all_again, full)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    lm = onnx_lm(*EXPORT_CASES[1])
    kwargs = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = lm.generate(PROMPTS, seed=7, **kwargs)
    b = lm.generate(PROMPTS, seed=7, **kwargs)
    c = lm.generate(PROMPTS, seed=8, **kwargs)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    greedy = lm.generate(PROMPTS, max_new_tokens=12)
    nucleus_of_one = lm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-9, seed=3)
    assert [x.tokens for x in nucleus_of_one] == [x.tokens for x in greedy]


def test_streaming_callback_sees_every_token_in_order():
    lm = onnx_lm(*EXPORT_CASES[1])
    seen: dict[int, list[int]] = {0: [], 1: []}
    text: dict[int, str] = {0: "", 1: ""}

    def on_token(row, token, delta):
        seen[row].append(token)
        text[row] += delta

    result = lm.generate(PROMPTS[:2], max_new_tokens=10, on_token=on_token)
    for row in (0, 1):
        assert seen[row] == result[row].tokens
        assert text[row] == result[row].text


def test_stops_on_eos_and_on_stop_strings():
    lm = onnx_lm(*EXPORT_CASES[1])
    greedy = lm.generate(PROMPTS[:1], max_new_tokens=16)[0]
    saved = set(lm.eos_token_ids)
    try:
        lm.eos_token_ids = {greedy.tokens[3]}  # pretend the 4th greedy token is EOS
        stopped = lm.generate(PROMPTS[:1], max_new_tokens=16)[0]
    finally:
        lm.eos_token_ids = saved
    first = greedy.tokens.index(greedy.tokens[3])
    assert stopped.tokens == greedy.tokens[: first + 1]
    assert stopped.finish_reason == "stop"

    stop = greedy.text[len(greedy.text) // 2 :][:3]
    cut = lm.generate(PROMPTS[:1], max_new_tokens=16, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == greedy.text[: greedy.text.find(stop)]
    assert stop not in cut.text


def test_bad_generation_arguments_are_clear():
    lm = onnx_lm(*EXPORT_CASES[1])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        lm.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be a number"):
        lm.generate(PROMPTS, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        lm.generate(PROMPTS, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="exceeds the context length"):
        lm.generate(PROMPTS, max_new_tokens=lm.context_length)
    with pytest.raises(ValueError, match="list of prompts"):
        lm.generate("just a string")


def test_missing_folder_is_a_clear_error(tmp_path):
    from nsvd_lm.serve.runtime import OnnxCausalLM

    with pytest.raises(FileNotFoundError, match="not an exported folder"):
        OnnxCausalLM(tmp_path)
    with pytest.raises(ValueError, match="provider must be one of auto, cpu, cuda"):
        OnnxCausalLM(tmp_path, provider="tpu")


def _torch_perplexity(model, ids, window):
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
        nll -= logp[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum().item()
        count += len(chunk) - 1
    return float(np.exp(nll / count))


def test_perplexity_matches_pytorch(case):
    exported, lm = case
    ids = tokenizer()(CALIBRATION_TEXT)["input_ids"][:300]
    onnx_ppl = lm.perplexity(ids, window=128)
    torch_ppl = _torch_perplexity(exported.model, ids, 128)
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-3)


def test_lm_eval_builtin_onnxruntime_backend_scores_the_export():
    """lm-eval 0.4.13's own `--model onnxruntime` reads our folder (genai_config.json + names)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.onnxruntime_ort import ONNXRuntimeLM

    exported = exported_tiny(*EXPORT_CASES[0])
    backend = ONNXRuntimeLM(pretrained=str(exported.onnx_dir))
    text = CALIBRATION_TEXT[:700]
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (onnx_ll,) = backend.loglikelihood_rolling([request], disable_tqdm=True)

    ids = tokenizer().encode(text, add_special_tokens=False)
    assert len(ids) + 1 <= backend.max_length  # one window: the reference is one forward pass
    full = [backend.prefix_token_id, *ids]
    with torch.no_grad():
        logp = torch.log_softmax(exported.model(torch.tensor([full])).logits[0].double(), -1)
    torch_ll = logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    assert onnx_ll == pytest.approx(torch_ll, rel=1e-3)


def test_onnxruntime_genai_generates_like_pytorch():
    og = pytest.importorskip("onnxruntime_genai")
    exported = exported_tiny(*EXPORT_CASES[0])
    model = og.Model(str(exported.onnx_dir))
    prompt_ids = tokenizer()(PROMPTS[0])["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    expected = _torch_greedy(exported.model, PROMPTS[:1], 16)[0]
    assert tokens == _strip_after_eos(expected, {tokenizer().eos_token_id})


def test_nsvd_onnx_lm_eval_model_generates_and_scores():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.onnxruntime_ort import ONNXRuntimeLM

    from nsvd_lm.lmeval.onnx_adapter import NSVDOnnxLM

    exported = exported_tiny(*EXPORT_CASES[1])
    ours = NSVDOnnxLM(pretrained=str(exported.onnx_dir), max_gen_toks=10)
    builtin = ONNXRuntimeLM(pretrained=str(exported.onnx_dir))
    text = CALIBRATION_TEXT[:300]
    rolling = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    assert ours.loglikelihood_rolling([rolling], disable_tqdm=True) == builtin.loglikelihood_rolling(
        [rolling], disable_tqdm=True
    )

    expected = onnx_lm(*EXPORT_CASES[1]).generate(
        [tokenizer().encode(PROMPTS[0], add_special_tokens=False)], max_new_tokens=10
    )[0]
    generate = Instance(
        request_type="generate_until", doc={}, arguments=(PROMPTS[0], {"until": ["\n\n"], "max_gen_toks": 10}), idx=0
    )
    (text_out,) = ours.generate_until([generate], disable_tqdm=True)
    assert text_out == expected.text.split("\n\n")[0]
