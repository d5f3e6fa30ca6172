"""Activation similarity (nsvd_lm.experiments.similarity, `nsvd-lm similarity`) on a tiny random Llama
+ fixture data."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from nsvd_lm.calibration import statistics_for_windows
from nsvd_lm.cli import main
from nsvd_lm.compress import get_statistics
from nsvd_lm.config import CalibrationConfig
from nsvd_lm.experiments.similarity import (
    compare_statistics,
    evaluation_windows,
    gram_cosine,
    vector_cosine,
)
from nsvd_lm.targets import select_targets
from nsvd_lm.windows import calibration_windows

SEQLEN = 32
INPUTS_PER_LLAMA_BLOCK = 4  # {q,k,v}, o, {gate,up}, down


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def texts(fixture_data_dir):
    wiki = fixture_data_dir / "wikitext2"
    return {"calib": (wiki / "wiki.valid.raw").read_text(), "test": (wiki / "wiki.test.raw").read_text()}


def test_cosines_of_known_matrices():
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    g = x.T @ x
    assert gram_cosine(g, 3.0 * g) == pytest.approx(1.0, abs=1e-12)  # token count does not matter
    e0, e1 = torch.zeros(4, 4), torch.zeros(4, 4)
    e0[0, 0], e1[1, 1] = 1.0, 1.0
    assert gram_cosine(e0, e1) == 0.0  # activations in orthogonal directions
    assert gram_cosine(e0 + e1, e0) == pytest.approx(2**-0.5)
    assert vector_cosine(torch.zeros(3), torch.ones(3)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        vector_cosine(torch.ones(3), torch.ones(4))


def test_evaluation_windows_are_disjoint_evenly_spaced_slices(model_and_tokenizer, texts):
    _, tokenizer = model_and_tokenizer
    ids = tokenizer(texts["test"], add_special_tokens=False)["input_ids"]
    available = len(ids) // SEQLEN
    assert available >= 6
    windows = evaluation_windows(tokenizer, texts["test"], 3, SEQLEN)
    starts = [int(i * available / 3) * SEQLEN for i in range(3)]
    assert windows.tolist() == [ids[s : s + SEQLEN] for s in starts]
    everything = evaluation_windows(tokenizer, texts["test"], 10_000, SEQLEN)
    assert everything.shape == (available, SEQLEN)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluation_windows(tokenizer, "two words", 4, SEQLEN)


def test_a_set_is_identical_to_itself(model_and_tokenizer, texts, tmp_path):
    """Calibration statistics (compression path) vs the same windows computed again elsewhere: cosine 1."""
    model, tokenizer = model_and_tokenizer
    targets = select_targets(model)
    (tmp_path / "calib.txt").write_text(texts["calib"])  # before the config: it checks that the file exists
    config = CalibrationConfig(
        calib_dataset=str(tmp_path / "calib.txt"), calib_nsamples=6, calib_seqlen=SEQLEN, cache_dir=str(tmp_path / "a")
    )
    reference = get_statistics(model, tokenizer, config, targets, progress=False)
    windows = calibration_windows(tokenizer, texts["calib"], 6, SEQLEN, config.seed)
    again = statistics_for_windows(model, windows, targets, tmp_path / "b", progress=False)
    assert not again.cache_hit  # really computed a second time
    rows = compare_statistics(reference, again, targets)
    assert len(rows) == INPUTS_PER_LLAMA_BLOCK * model.config.num_hidden_layers
    assert [r.kind for r in rows[:4]] == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    for row in rows:
        assert row.gram_cosine == pytest.approx(1.0, abs=1e-6)
        assert row.mean_abs_cosine == pytest.approx(1.0, abs=1e-6)


def test_scrambled_text_is_less_similar_than_same_domain_text(model_and_tokenizer, texts, tmp_path):
    model, tokenizer = model_and_tokenizer
    targets = select_targets(model)
    calib = calibration_windows(tokenizer, texts["calib"], 8, SEQLEN, seed=3)
    same_domain = evaluation_windows(tokenizer, texts["test"], 8, SEQLEN)
    generator = torch.Generator().manual_seed(0)
    # Every token swapped for another through a random permutation of the vocabulary: the text
    # keeps its structure but uses other tokens.
    vocab_permuted = torch.randperm(len(tokenizer), generator=generator)[same_domain]
    # The same tokens in random order: identical embeddings (block 0), different contexts.
    order_shuffled = same_domain.reshape(-1)[torch.randperm(same_domain.numel(), generator=generator)]
    order_shuffled = order_shuffled.reshape(same_domain.shape)

    def similarity(windows):
        stats = statistics_for_windows(model, windows, targets, tmp_path, progress=False)
        return compare_statistics(reference, stats, targets)

    reference = statistics_for_windows(model, calib, targets, tmp_path, progress=False)
    same, permuted, shuffled = similarity(same_domain), similarity(vocab_permuted), similarity(order_shuffled)
    for s, p in zip(same, permuted):
        assert p.gram_cosine < s.gram_cosine
    mean = lambda rows: sum(r.gram_cosine for r in rows) / len(rows)  # noqa: E731
    assert mean(shuffled) < mean(same)
    assert shuffled[0].gram_cosine == pytest.approx(same[0].gram_cosine, abs=1e-6)  # block 0 input = embeddings
    assert min(r.gram_cosine for r in shuffled[1:]) < max(r.gram_cosine for r in same[1:])
    assert all(0.0 <= r.gram_cosine <= 1.0 + 1e-9 for r in same + permuted + shuffled)


def test_command_writes_table_csv_json_and_histogram(
    tiny_model_dir, fixture_data_dir, tmp_path, monkeypatch, capsys, calibration_forwards
):
    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(fixture_data_dir))
    out = tmp_path / "out"
    args = [
        "similarity",
        "--model",
        str(tiny_model_dir),
        "--calib",
        "wikitext2",
        "--datasets",
        "wikitext2,cmrc,snips",
        "--nsamples",
        "4",
        "--seqlen",
        str(SEQLEN),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--no-progress",
    ]
    from nsvd_lm.experiments import similarity as similarity_module

    per_window_passes = {"count": 0}
    real_window_statistics = similarity_module.window_statistics

    def counting(*a, **k):
        per_window_passes["count"] += 1
        return real_window_statistics(*a, **k)

    monkeypatch.setattr(similarity_module, "window_statistics", counting)
    before = calibration_forwards.count
    assert main(args) == 0
    assert calibration_forwards.count == before + 1  # the calibration set
    assert per_window_passes["count"] == 3  # the three datasets, window by window
    for name in ("similarity.md", "similarity.csv", "similarity_layers.csv", "similarity.json", "similarity.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = list(csv.DictReader((out / "similarity.csv").open()))
    assert [r["dataset"] for r in summary] == ["wikitext2", "cmrc", "snips"]
    layers = list(csv.DictReader((out / "similarity_layers.csv").open()))
    assert len(layers) == 3 * 2 * INPUTS_PER_LLAMA_BLOCK
    for row in summary:  # the summary is the mean/min over the per-input rows
        values = [float(r["gram_cosine"]) for r in layers if r["dataset"] == row["dataset"]]
        assert float(row["gram_cosine_mean"]) == pytest.approx(sum(values) / len(values), abs=1e-6)
        assert float(row["gram_cosine_min"]) == pytest.approx(min(values), abs=1e-6)
        assert int(row["windows"]) <= 4 and int(row["tokens"]) == int(row["windows"]) * SEQLEN
    report = json.loads((out / "similarity.json").read_text())
    assert report["calibration"]["nsamples"] == 4 and report["calibration"]["source"].endswith("wiki.valid.raw")
    assert "nsvd-lm similarity" in report["command"]
    markdown = (out / "similarity.md").read_text()
    assert "| cmrc |" in markdown and "gram cos. mean [95% CI]" in markdown and "(no CI)" not in markdown
    for row in summary:  # every summary has a bootstrap CI near it (the basic interval is bias-corrected)
        for name in ("gram_cosine_mean", "gram_cosine_min", "mean_abs_cosine_mean"):
            low, high = float(row[f"{name}_ci_low"]), float(row[f"{name}_ci_high"])
            assert 0.0 <= low <= high <= 1.0 + 1e-9 and low - 0.05 <= float(row[name]) <= high + 0.05

    # A rerun reads every statistic from the cache: no forward pass.
    assert main(args) == 0
    assert calibration_forwards.count == before + 1 and per_window_passes["count"] == 3
    assert list(csv.DictReader((out / "similarity.csv").open())) == summary  # the same numbers and CIs
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--datasets", "wikitext2,klingon"], "unknown klingon; allowed: wikitext2"),
        (["--nsamples", "0"], "--nsamples=0 must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path, capsys, extra, message):
    args = ["similarity", "--model", str(tiny_model_dir), "--out", str(tmp_path), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_window_parts_give_the_cosines_of_the_summed_statistics(model_and_tokenizer, texts, tmp_path):
    """The bootstrap's inner products, at "every window once", are the cosines of the summed statistics."""
    import numpy as np

    from nsvd_lm.experiments.similarity import _summarize_parts, bootstrap_counts, window_parts

    model, tokenizer = model_and_tokenizer
    targets = select_targets(model)
    reference = statistics_for_windows(
        model, calibration_windows(tokenizer, texts["calib"], 6, SEQLEN, seed=3), targets, tmp_path, progress=False
    )
    windows = evaluation_windows(tokenizer, texts["test"], 5, SEQLEN)
    summed = compare_statistics(
        reference, statistics_for_windows(model, windows, targets, tmp_path, progress=False), targets
    )
    parts = window_parts(model, windows, reference, targets, progress=False)
    inputs, intervals = _summarize_parts(parts, windows.shape[0])
    assert [(r.key, r.kind) for r in inputs] == [(r.key, r.kind) for r in summed]
    for mine, theirs in zip(inputs, summed):
        assert mine.gram_cosine == pytest.approx(theirs.gram_cosine, abs=1e-5)
        assert mine.mean_abs_cosine == pytest.approx(theirs.mean_abs_cosine, abs=1e-5)
    # One resample = one window counted twice and another left out: the same as summing those windows.
    counts = bootstrap_counts(windows.shape[0], n_resamples=3, seed=1)
    chosen = [w for w, c in enumerate(counts[0]) for _ in range(int(c))]
    again = compare_statistics(
        reference, statistics_for_windows(model, windows[chosen], targets, tmp_path / "r", progress=False), targets
    )
    gram, _ = parts[0].cosines(counts)
    assert gram[0] == pytest.approx(again[0].gram_cosine, abs=1e-5)
    assert np.all(np.diff(bootstrap_counts(5, 3, seed=1).sum(1)) == 0)  # every resample draws W windows
    assert set(intervals) >= {"gram_cosine:mean", "gram_cosine:min", "mean_abs_cosine:mean"}
    low, high = intervals["gram_cosine:mean"]
    assert low < high  # windows differ, so the mean moves between resamples


def test_basic_interval_corrects_the_resampling_bias_and_stays_a_cosine():
    import numpy as np

    from nsvd_lm.experiments.similarity import basic_interval

    # Replicates biased low by ~0.15 around an estimate of 0.5: the interval moves up by as much.
    replicates = np.linspace(0.30, 0.40, 2001)
    low, high = basic_interval(0.5, replicates)
    assert low == pytest.approx(2 * 0.5 - np.quantile(replicates, 0.975))
    assert high == pytest.approx(2 * 0.5 - np.quantile(replicates, 0.025))
    assert 0.5 < low < high
    # Unbiased, symmetric replicates: the interval is the percentile one, around the estimate.
    low, high = basic_interval(0.5, np.linspace(0.45, 0.55, 2001))
    assert low == pytest.approx(0.4525) and high == pytest.approx(0.5475)
    # A cosine never leaves [-1, 1].
    assert basic_interval(0.99, np.linspace(0.90, 0.95, 2001))[1] == 1.0
