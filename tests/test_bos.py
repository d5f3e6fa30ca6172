"""BOS-correct windows on every tokenizer: calibration, ``nsvd-lm ppl --bos`` and the ``nsvd_*`` tasks.

Two tokenizer kinds built in code (tests/conftest.py): byte-level BPE without BOS (like SmolLM2)
and a SentencePiece-style Unigram that adds BOS by default (like Llama/Mistral/Gemma).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
from tiny_models import build_fixture_tokenizer

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tasks"))


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the river carries sediment from distant mountains toward a quiet delta where farmers plant".split()
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(n))


def test_tokenizer_kinds_are_told_apart(tokenizer):
    from nsvd_lm.windows import bos_per_window, tokenizer_adds_bos

    spm, bpe = build_fixture_tokenizer("spm"), build_fixture_tokenizer("bpe")
    assert tokenizer_adds_bos(spm) and not tokenizer_adds_bos(bpe) and not tokenizer_adds_bos(tokenizer)
    assert bos_per_window(spm, "auto") and not bos_per_window(spm, "never") and not bos_per_window(spm, "first")
    assert bos_per_window(tokenizer, "always")  # SmolLM2 has a BOS token, it just does not add it
    with pytest.raises(ValueError, match="bos=always: this tokenizer has no BOS token"):
        bos_per_window(bpe, "always")
    with pytest.raises(ValueError, match="bos='sometimes'; allowed values: auto, always, never, first"):
        bos_per_window(spm, "sometimes")


def test_calibration_windows_without_bos_are_todays_byte_for_byte(tokenizer):
    """SmolLM2 adds no BOS: its windows are SVD-LLM's (an independent re-implementation here)."""
    from nsvd_lm.windows import bos_per_window, calibration_windows

    text = _words(60)
    bos = bos_per_window(tokenizer, "auto")
    assert bos is False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(3)
    starts = [rng.randint(0, len(ids) - 32 - 1) for _ in range(5)]
    expected = torch.tensor([ids[s : s + 32] for s in starts])
    assert torch.equal(calibration_windows(tokenizer, text, 5, 32, 3, bos=bos), expected)


def test_calibration_windows_with_bos_are_bos_plus_text_tokens():
    from nsvd_lm.windows import calibration_windows

    spm = build_fixture_tokenizer("spm")
    text = _words(60)
    ids = spm(text, add_special_tokens=False)["input_ids"]
    windows = calibration_windows(spm, text, 6, 32, 3, bos=True)
    assert windows.shape == (6, 32)
    assert (windows[:, 0] == spm.bos_token_id).all()
    stream = " ".join(map(str, ids))
    for row in windows[:, 1:].tolist():  # 31 consecutive stream tokens
        assert " ".join(map(str, row)) in stream and spm.bos_token_id not in row


def test_bos_setting_is_in_cache_key_meta_and_checkpoint(tokenizer_kind_model, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm import compress_model, save_compressed

    kind, folder = tokenizer_kind_model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text(_words(40))
    settings = dict(
        method="asvd-i",
        ratio=0.4,
        calib_dataset=str(calib),
        calib_nsamples=4,
        calib_seqlen=32,
        cache_dir=str(tmp_path / "stats"),
    )
    paths = {}
    for mode in ("auto", "never"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        report = compress_model(model, tokenizer, calib_bos=mode, **settings)
        paths[mode] = report.calibration
        assert report.calibration["bos"] == mode
        assert report.calibration["bos_per_window"] is (kind == "spm" and mode == "auto")
    folders = sorted(p for p in (tmp_path / "stats").iterdir() if p.is_dir())
    # BOS per window changes the statistics, so it is a separate cache entry (spm); bpe: the same one.
    assert len(folders) == (2 if kind == "spm" else 1)
    metas = [json.loads((f / "meta.json").read_text())["calibration"] for f in folders]
    assert {m["bos_per_window"] for m in metas} == ({True, False} if kind == "spm" else {False})
    out = save_compressed(model, tmp_path / "ckpt", tokenizer)
    saved = json.loads((out / "config.json").read_text())["nsvd_compression"]["calibration"]
    assert saved["bos"] == "never" and saved["bos_per_window"] is False


def test_text_windows_re_tokenize_exactly_and_fill_the_budget():
    from nsvd_lm.windows import text_windows

    spm = build_fixture_tokenizer("spm")
    text = _words(80) + "\n\n基于游戏开发与发行中国大陆运营" * 20
    windows = text_windows(spm, text, 63)
    assert len(windows) > 5
    assert text.startswith("".join(w.text for w in windows))  # consecutive pieces, nothing skipped
    for w in windows:
        assert spm(w.text, add_special_tokens=False)["input_ids"] == w.ids
        assert 0.9 * 63 <= len(w.ids) <= 63
    # A decode -> re-encode round trip of stream slices fails on this tokenizer (why pieces of text).
    ids = spm(text, add_special_tokens=False)["input_ids"]
    slices = [ids[k * 63 + 1 : (k + 1) * 63] for k in range(len(ids) // 63)]
    broken = sum(spm(spm.decode(s), add_special_tokens=False)["input_ids"] != s for s in slices)
    assert broken > 0


def _independent_bos_ppl(model, bos_id: int, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in windows:
        x = torch.tensor([[bos_id, *ids]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(x).logits[0].double(), dim=-1)
        total += logprobs[torch.arange(len(ids)), x[0, 1:]].sum().item()
        count += len(ids)
    return math.exp(-total / count)


def test_ppl_bos_modes(tokenizer_kind_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm.experiments.ppl import perplexity
    from nsvd_lm.windows import text_windows

    kind, folder = tokenizer_kind_model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = _words(40)
    results = (
        {
            mode: perplexity(model, tokenizer, text, seqlen=64, max_windows=5, progress=False, bos=mode)
            for mode in ("auto", "always", "never", "first")
        }
        if kind == "spm"
        else {
            mode: perplexity(model, tokenizer, text, seqlen=64, max_windows=5, progress=False, bos=mode)
            for mode in ("auto", "never", "first")
        }
    )
    if kind == "bpe":  # no BOS: every mode is SVD-LLM's protocol on the same stream
        assert results["auto"].ppl == results["never"].ppl == results["first"].ppl
        assert not results["auto"].bos_per_window
        return
    assert results["auto"].bos_per_window and results["auto"].ppl == results["always"].ppl
    windows = [w.ids for w in text_windows(tokenizer, text, 63)[:5]]
    assert results["auto"].n_tokens_predicted == sum(map(len, windows))
    assert results["auto"].ppl == pytest.approx(_independent_bos_ppl(model, tokenizer.bos_token_id, windows), rel=1e-6)
    # first = SVD-LLM: tokenizer defaults once (BOS only at the start), 64-token windows.
    stream = tokenizer(text)["input_ids"]
    assert stream[0] == tokenizer.bos_token_id
    assert results["first"].n_tokens_predicted == 5 * 63 and not results["first"].bos_per_window
    assert results["never"].ppl != results["first"].ppl  # the one BOS at the start moves every window


def test_ppl_cli_bos_flag_is_checked_before_loading():
    from nsvd_lm.cli import main

    with pytest.raises(SystemExit):
        main(["ppl", "--model", "/nonexistent", "--bos", "sometimes"])


def test_task_and_exact_path_agree_on_each_tokenizer_kind(tokenizer_kind_model, fixture_data_dir):
    """``lm_eval --tasks nsvd_wikitext2`` and ``nsvd-lm ppl --bos auto`` on the same windows: within 1 %."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm.experiments.evaldata import load_eval_text
    from nsvd_lm.experiments.ppl import perplexity
    from nsvd_lm.lmeval.hook import nsvd_tasks_dir

    kind, folder = tokenizer_kind_model
    n, length = 4, 128
    model_args = {"pretrained": str(folder), "max_length": length, "dtype": "float32", "device": "cpu"}
    manager = TaskManager(
        include_path=nsvd_tasks_dir(), metadata={**model_args, "data_dir": str(fixture_data_dir), "max_windows": n}
    )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=["nsvd_wikitext2"],
        task_manager=manager,
        batch_size=2,
        bootstrap_iters=0,
    )
    row = results["results"]["nsvd_wikitext2"]
    assert row["n_windows,none"] == n
    harness = row["token_perplexity,none"]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = load_eval_text("wikitext2", data_dir=fixture_data_dir).text
    exact = perplexity(model, tokenizer, text, seqlen=length, max_windows=n, progress=False, bos="auto")
    assert exact.bos_per_window is (kind == "spm")
    assert harness == pytest.approx(exact.ppl, rel=0.01)
    if kind == "spm":  # same tokens after the same BOS: equal up to float rounding
        assert harness == pytest.approx(exact.ppl, rel=1e-4)


def test_task_documents_round_trip_on_both_kinds(tokenizer_kind_model, fixture_data_dir):
    from transformers import AutoTokenizer
    from utils import window_documents

    from nsvd_lm.experiments.evaldata import DATASET_NAMES, load_eval_text

    kind, folder = tokenizer_kind_model
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in DATASET_NAMES:
        docs = window_documents(load_eval_text(name, data_dir=fixture_data_dir), tokenizer, 64)
        assert docs and all(d["bos_per_window"] is (kind == "spm") for d in docs)
        for d in docs:  # the builder checks this itself; the test checks the builder
            assert len(tokenizer(d["text"], add_special_tokens=False)["input_ids"]) == d["scored_tokens"]
