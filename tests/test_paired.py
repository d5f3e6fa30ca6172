"""Per-window scores and paired bootstrap CIs (issue 9): identical models tie, a broken model does not,
the windows add up to the reported perplexity, and the leaderboard shows the CIs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results, to_csv, to_markdown, write_leaderboard
from nsvd_lm.experiments.paired import (
    N_RESAMPLES,
    WINDOW_SCORES_METRIC,
    WindowScores,
    paired_cells,
    paired_change,
    window_id,
)

TASKS = ("nsvd_wikitext2", "nsvd_ptb")


def _scores(path, task):
    data = json.loads(path.read_text())
    return WindowScores.from_dict(data["results"][task][f"{WINDOW_SCORES_METRIC},none"])


def test_window_ids_and_bootstrap_basics():
    assert window_id("ptb", 3, [1, 2, 3]) == window_id("ptb", 3, (1, 2, 3)) != window_id("ptb", 3, [1, 2, 4])
    assert window_id("ptb", 3, [1]).startswith("ptb:3:")
    rng = np.random.default_rng(0)
    ids = [f"d:{i}:h" for i in range(40)]
    base = WindowScores.from_lists(ids, rng.uniform(100, 300, 40), [63] * 40)
    better = WindowScores.from_lists(ids, base.nll * 0.9, [63] * 40)
    ci = paired_change(better, base)
    assert ci.n_resamples == N_RESAMPLES >= 2000 and ci.n_windows == 40 and ci.n_tokens == 40 * 63
    assert ci.estimate == pytest.approx((better.ppl / base.ppl - 1) * 100, rel=1e-9)
    assert ci.high < 0 and ci.significant and ci.low < ci.estimate < ci.high
    assert paired_change(better, base) == ci  # fixed seed: reproducible
    # Only shared windows are compared: a run with extra windows gives the same cell.
    extra = WindowScores.from_lists([*ids, "d:99:z"], [*better.nll, 1e9], [*better.tokens, 63])
    assert paired_change(extra, base).estimate == pytest.approx(ci.estimate, rel=1e-12)
    # Seeds: three copies of the same runs give the same estimate, and a seed spread of 0.
    cells, average = paired_cells({"a": ([better] * 3, [base] * 3), "b": ([base] * 3, [base] * 3)}, ["a", "b"])
    assert cells["a"].n_seeds == 3 and cells["a"].seed_std == 0 and cells["a"].estimate == pytest.approx(ci.estimate)
    assert average.estimate == pytest.approx(ci.estimate / 2) and average.low < average.estimate < average.high
    assert not cells["b"].significant


def test_per_window_scores_sum_to_the_reported_perplexity(paired_sweep):
    files = [*paired_sweep["sweep"].glob("*.json"), paired_sweep["hf"]]
    assert len(files) == 5
    for path in files:
        data = json.loads(path.read_text())
        for task in TASKS:
            row = data["results"][task]
            scores = _scores(path, task)
            assert scores.n_windows == row["n_windows,none"] == row["n_windows_full,none"] > 5
            reported = row["token_perplexity,none"]
            assert math.exp(scores.nll.sum() / scores.tokens.sum()) == pytest.approx(reported, rel=1e-9)


def test_identical_models_tie_and_a_broken_model_does_not(paired_sweep):
    original = paired_sweep["sweep"] / "original.json"  # --model nsvd ratio=0, inside the sweep
    hf = paired_sweep["hf"]  # --model hf of the same weights, made elsewhere
    broken = paired_sweep["sweep"] / "svd_r0.5.json"
    for task in TASKS:
        a, b = _scores(original, task), _scores(hf, task)
        assert a.ids == b.ids  # the same windows across configurations and model classes
        same = paired_change(a, b)
        assert same.low <= 0 <= same.high and not same.significant
        # A random model's perplexity is ~ its vocabulary size whatever svd does to it: no claim here.
        assert paired_change(_scores(broken, task), a).n_windows == a.n_windows


def test_broken_model_gives_a_ci_excluding_zero(trained_tiny_lm):
    import copy

    from nsvd_lm.compress import compress_model
    from nsvd_lm.config import CompressionConfig
    from nsvd_lm.experiments.ppl import perplexity

    model, tokenizer, text = trained_tiny_lm
    base = perplexity(model, tokenizer, text, seqlen=64, batch_size=4, progress=False).window_scores()
    twin = perplexity(copy.deepcopy(model), tokenizer, text, seqlen=64, batch_size=4, progress=False)
    same = paired_change(twin.window_scores(), base)
    assert same.low <= 0 <= same.high and not same.significant
    broken = copy.deepcopy(model)
    compress_model(broken, tokenizer, CompressionConfig(method="svd", ratio=0.5), progress=False)
    scores = perplexity(broken, tokenizer, text, seqlen=64, batch_size=4, progress=False).window_scores()
    bad = paired_change(scores, base)
    assert bad.n_windows == base.n_windows > 20
    assert bad.significant and bad.low > 0, bad  # higher perplexity, and the CI says so


def test_leaderboard_shows_cis_from_folders_and_files(paired_sweep, tmp_path):
    entries = load_results([paired_sweep["sweep"], paired_sweep["hf"]])
    assert len(entries) == 5 and all(set(e.windows) == set(TASKS) for e in entries)
    board = build_leaderboard(entries)
    nested = next(r for r in board.rows if r.method == "nsvd-i")
    assert set(nested.improvement_ci) == set(TASKS) and nested.avg_ci is not None
    for task in TASKS:
        ci = nested.improvement_ci[task]
        assert ci.low <= nested.improvements[task] <= ci.high  # one seed: the point estimate is inside
    md = to_markdown(board)
    assert "Windows behind each CI" in md and "paired bootstrap 95% CI" in md
    cell = f"({nested.improvements['nsvd_ptb']:+.1f}%) [{nested.improvement_ci['nsvd_ptb'].low:+.1f}, "
    assert cell in md
    csv_text = to_csv(board)
    assert "nsvd_ptb_impro_ci_low" in csv_text and "avg_impro_ci_high" in csv_text
    paths = write_leaderboard([paired_sweep["sweep"], paired_sweep["hf"]], tmp_path / "lb")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_results_without_window_scores_still_load(paired_sweep, tmp_path):
    for path in paired_sweep["sweep"].glob("*.json"):
        data = json.loads(path.read_text())
        for task in TASKS:
            del data["results"][task][f"{WINDOW_SCORES_METRIC},none"]
        (tmp_path / path.name).write_text(json.dumps(data))
    board = build_leaderboard(load_results(tmp_path))
    nested = next(r for r in board.rows if r.method == "nsvd-i")
    assert nested.improvements and not nested.improvement_ci and nested.avg_ci is None
    assert "†" in to_markdown(board)


def test_reference_perplexity_keeps_window_scores(sweep_inputs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nsvd_lm.cli import main
    from nsvd_lm.experiments.evaldata import load_eval_text
    from nsvd_lm.experiments.ppl import perplexity

    model = AutoModelForCausalLM.from_pretrained(sweep_inputs["model"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(sweep_inputs["model"])
    text = load_eval_text("wikitext2", data_dir=sweep_inputs["data"]).text
    one = perplexity(model, tokenizer, text, seqlen=64, batch_size=1, progress=False, dataset="wikitext2")
    scores = one.window_scores()
    assert scores.n_windows == one.n_windows and scores.n_tokens == one.n_tokens_predicted
    assert math.exp(scores.nll.sum() / scores.tokens.sum()) == pytest.approx(one.ppl, rel=1e-9)
    batched = perplexity(model, tokenizer, text, seqlen=64, batch_size=3, progress=False, dataset="wikitext2")
    assert batched.window_ids == one.window_ids
    assert batched.window_scores().ppl == pytest.approx(batched.ppl, rel=1e-5)  # float32 rounding of the batch sum
    bos = perplexity(model, tokenizer, text, seqlen=64, batch_size=3, progress=False, bos="always")
    assert bos.window_scores().n_tokens == bos.n_tokens_predicted

    out = tmp_path / "ppl.json"
    argv = ["ppl", "--model", str(sweep_inputs["model"]), "--datasets", "wikitext2", "--seqlen", "64"]
    argv += ["--data-dir", str(sweep_inputs["data"]), "--output", str(out), "--no-progress", "--batch-size", "1"]
    assert main(argv) == 0
    row = json.loads(out.read_text())["results"][0]
    written = WindowScores.from_dict(row["windows"])
    assert written.ids == one.window_ids
    assert math.exp(written.nll.sum() / written.tokens.sum()) == pytest.approx(row["token_perplexity"], rel=1e-9)
