"""nsvd_lm.experiments.ppl (SVD-LLM protocol) against an independent computation, and ``nsvd-lm ppl``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

torch = pytest.importorskip("torch")

from nsvd_lm.experiments.evaldata import load_eval_text  # noqa: E402
from nsvd_lm.experiments.ppl import dataset_perplexity, perplexity  # noqa: E402

SEQLEN = 32


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def independent_ppl(model, ids: list[int], seqlen: int, n_windows: int) -> float:
    """Few-line reference: each window alone, token t+1 scored from logits at t, mean over all."""
    total, count = 0.0, 0
    for k in range(n_windows):
        window = torch.tensor([ids[k * seqlen : (k + 1) * seqlen]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(window).logits[0].double(), dim=-1)
        total -= logprobs[torch.arange(seqlen - 1), window[0, 1:]].sum().item()
        count += seqlen - 1
    return math.exp(total / count)


def test_matches_independent_computation(model_and_tokenizer, fixture_data_dir):
    model, tokenizer = model_and_tokenizer
    text = load_eval_text("wikitext2", data_dir=fixture_data_dir).text
    ids = tokenizer(text)["input_ids"]
    result = perplexity(model, tokenizer, text, seqlen=SEQLEN, batch_size=3, max_windows=5, progress=False)
    assert result.n_windows == 5 and result.n_tokens_predicted == 5 * (SEQLEN - 1)
    assert result.n_windows_available == len(ids) // SEQLEN and result.capped
    assert result.ppl == pytest.approx(independent_ppl(model, ids, SEQLEN, 5), rel=1e-5)
    assert result.nll_mean == pytest.approx(math.log(result.ppl))


def test_all_windows_batching_and_ids_input(model_and_tokenizer, fixture_data_dir):
    model, tokenizer = model_and_tokenizer
    text = load_eval_text("ptb", data_dir=fixture_data_dir).text[:1500]  # a few windows are enough
    ids = tokenizer(text)["input_ids"]
    full = perplexity(model, tokenizer, text, seqlen=SEQLEN, batch_size=4, progress=False)
    assert full.n_windows == len(ids) // SEQLEN > 4 and not full.capped
    one_by_one = perplexity(model, torch.tensor(ids), seqlen=SEQLEN, batch_size=1, progress=False)
    assert one_by_one.ppl == pytest.approx(full.ppl, rel=1e-5)
    assert full.ppl == pytest.approx(independent_ppl(model, ids, SEQLEN, full.n_windows), rel=1e-5)


def test_c4_protocol_cap(model_and_tokenizer, fixture_data_dir):
    model, tokenizer = model_and_tokenizer
    result, eval_text = dataset_perplexity(
        model, tokenizer, "c4", data_dir=fixture_data_dir, seqlen=4, batch_size=128, progress=False
    )
    assert result.n_windows_available > 256  # the fixture has more than the cap
    assert result.n_windows == result.n_windows_full == 256 and not result.capped
    quick, _ = dataset_perplexity(
        model, tokenizer, "c4", data_dir=fixture_data_dir, seqlen=4, max_windows=3, progress=False
    )
    assert quick.n_windows == 3 and quick.n_windows_full == 256 and quick.capped


def test_bad_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="larger than the model allows"):
        perplexity(model, tokenizer, "some text", seqlen=10_000)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokenizer, "too short", seqlen=SEQLEN)
    with pytest.raises(ValueError, match="either a tokenizer and text"):
        perplexity(model, [1, 2, 3], "text", seqlen=SEQLEN)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, list(range(100)), seqlen=SEQLEN, max_windows=0)


def test_cli(tiny_model_dir, fixture_data_dir, tmp_path, capsys):
    from nsvd_lm.cli import main

    out = tmp_path / "res" / "ppl.json"
    code = main(
        [
            "ppl",
            "--model",
            str(tiny_model_dir),
            "--datasets",
            "wikitext2,alpaca_eval_ja",
            "--seqlen",
            str(SEQLEN),
            "--max-windows",
            "2",
            "--data-dir",
            str(fixture_data_dir),
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| wikitext2 |" in table and "QUICK" in table and "(substitute)" in table
    report = json.loads(out.read_text())
    rows = {row["dataset"]: row for row in report["results"]}
    assert rows["wikitext2"]["n_windows"] == 2 and rows["wikitext2"]["capped"]
    assert rows["alpaca_eval_ja"]["data"]["substitute"]
    # Same number as the library call.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    direct, _ = dataset_perplexity(
        model, tokenizer, "wikitext2", data_dir=fixture_data_dir, seqlen=SEQLEN, max_windows=2, progress=False
    )
    assert rows["wikitext2"]["token_perplexity"] == pytest.approx(direct.ppl, rel=1e-6)


def test_cli_bad_dataset_fails_before_loading(capsys):
    from nsvd_lm.cli import main

    assert main(["ppl", "--model", "/no/such/model", "--datasets", "wikitext2,wiki103"]) == 2
    assert "unknown wiki103; allowed: wikitext2" in capsys.readouterr().err
