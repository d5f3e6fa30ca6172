"""Leaderboard from hand-made lm-eval result files: values, improvements, capping, outputs."""

from __future__ import annotations

import csv
import io
import json
import math
import random

import pytest

from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results, to_csv, to_markdown, write_leaderboard

TASKS = ["nsvd_wikitext2", "nsvd_ptb", "nsvd_c4"]
BASELINES = ("asvd-0", "asvd-i", "asvd-ii")
NESTED = ("nsvd-i", "nid-i")


def result_file(
    values: dict[str, float],
    *,
    method=None,
    ratio=None,
    k1=None,
    model="tiny",
    style="compression",
    limit=None,
    n_samples=None,
    date=1.0,
):
    """A results dict shaped like lm-eval 0.4.13's (only the keys the leaderboard reads, plus noise)."""
    results = {
        t: {
            "alias": t,
            "token_perplexity,none": v,
            "token_perplexity_stderr,none": "N/A",
            "word_perplexity,none": v * 3,
        }
        for t, v in values.items()
    }
    results["nsvd_ppl"] = {"alias": "nsvd_ppl", "token_perplexity,none": 1.0}  # a group row: ignored
    config = {"model": "nsvd" if style != "hf" else "hf", "model_args": {"pretrained": model}, "limit": limit}
    if style == "compression" and method is not None:
        config["compression"] = {
            "method": method,
            "ratio": ratio,
            "k1_frac": k1,
            "base_model": model,
            "calibration": {"dataset": "wikitext2", "nsamples": 4},
        }
    elif style == "model_args" and method is not None:
        config["model_args"] = f"pretrained={model},method={method},ratio={ratio}"
    data = {
        "results": results,
        "group_subtasks": {"nsvd_ppl": list(values)},
        "config": config,
        "date": date,
        "configs": {t: {"task": t, "metadata": {"version": 1}} for t in values},
    }
    if n_samples:
        data["n-samples"] = n_samples
    return data


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture()
def grid(tmp_path):
    """Random perplexities for 2 ratios × (baselines + nested + svd) + Original (an hf result)."""
    rng = random.Random(7)
    table = {}
    for ratio in (0.2, 0.4):
        for method in ("svd", *BASELINES, *NESTED):
            table[(ratio, method)] = {t: rng.uniform(5, 50) for t in TASKS}
            style = "model_args" if method == "asvd-0" else "compression"
            write(
                tmp_path / "res" / f"{method}_{ratio}.json",
                result_file(table[(ratio, method)], method=method, ratio=ratio, style=style),
            )
    table["original"] = {t: rng.uniform(3, 5) for t in TASKS}
    write(tmp_path / "res" / "hf" / "results_2024.json", result_file(table["original"], style="hf"))
    return tmp_path / "res", table


def test_values_and_improvements_match_inputs(grid):
    folder, table = grid
    board = build_leaderboard(load_results(folder))
    assert board.tasks == TASKS
    assert board.calibration_task == "nsvd_wikitext2"
    assert board.rows[0].label == "Original" and board.rows[0].values == pytest.approx(table["original"])
    assert [r.label for r in board.rows[1:7]] == ["svd", *BASELINES, *NESTED]  # paper order within a ratio
    assert [r.ratio for r in board.rows[1:]] == [0.2] * 6 + [0.4] * 6

    for row in board.rows[1:]:
        assert row.values == pytest.approx(table[(row.ratio, row.method)])
        if row.method not in NESTED:
            assert row.improvements == {} and row.avg_improvement is None
            continue
        expected = {}
        for task in TASKS:
            best = min(table[(row.ratio, b)][task] for b in BASELINES)
            expected[task] = (best - table[(row.ratio, row.method)][task]) / best * 100
        assert row.improvements == pytest.approx(expected)
        # Avg. Impro. leaves out the calibration set (WikiText-2).
        assert row.avg_improvement == pytest.approx((expected["nsvd_ptb"] + expected["nsvd_c4"]) / 2)


def test_markdown_and_csv_carry_the_numbers(grid, tmp_path):
    folder, table = grid
    paths = write_leaderboard(folder, tmp_path / "out" / "table")
    md = paths["markdown"].read_text()
    assert "| Ratio | Method | WikiText-2 (calib.) | PTB | C4 | Avg. Impro. |" in md
    value = table[(0.4, "nsvd-i")]["nsvd_ptb"]
    best = min(table[(0.4, b)]["nsvd_ptb"] for b in BASELINES)
    assert f"{value:.2f} ({(best - value) / best * 100:+.1f}%)" in md
    assert "capped" not in md.lower()

    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 13
    nid = next(r for r in rows if r["method"] == "nid-i" and r["ratio"] == "0.2")
    assert float(nid["nsvd_c4"]) == pytest.approx(table[(0.2, "nid-i")]["nsvd_c4"])
    best_c4 = min(table[(0.2, b)]["nsvd_c4"] for b in BASELINES)
    assert float(nid["nsvd_c4_impro_pct"]) == pytest.approx(
        (best_c4 - table[(0.2, "nid-i")]["nsvd_c4"]) / best_c4 * 100, abs=1e-3
    )
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_capped_results_are_labelled(tmp_path):
    n = {"nsvd_wikitext2": {"original": 10, "effective": 2}, "nsvd_ptb": {"original": 5, "effective": 5}}
    write(
        tmp_path / "a.json", result_file({"nsvd_wikitext2": 9.0, "nsvd_ptb": 12.0}, style="hf", limit=2.0, n_samples=n)
    )
    board = build_leaderboard(load_results(tmp_path))
    md = to_markdown(board)
    assert "WikiText-2 (calib.) [capped: 2/10 docs]" in md
    assert "PTB |" in md  # not capped: every doc scored
    assert "Capped results" in md and "capped" in to_csv(board)


def test_newest_duplicate_wins_and_k1_rows_are_separate(tmp_path):
    write(tmp_path / "old.json", result_file({"nsvd_ptb": 30.0}, method="nsvd-i", ratio=0.4, k1=0.95, date=1.0))
    write(tmp_path / "new.json", result_file({"nsvd_ptb": 20.0}, method="nsvd-i", ratio=0.4, k1=0.95, date=2.0))
    write(tmp_path / "k1.json", result_file({"nsvd_ptb": 25.0}, method="nsvd-i", ratio=0.4, k1=0.8, date=1.0))
    write(tmp_path / ".tmp-partial.json", "{not json")  # an interrupted sweep's temp file: ignored
    board = build_leaderboard(load_results(tmp_path))
    got = {r.label: r.values["nsvd_ptb"] for r in board.rows}
    # Next to another k1 the default one says its k1 too; k1 variants run from the largest down.
    assert got == {"nsvd-i (k1=0.95)": 20.0, "nsvd-i (k1=0.8)": 25.0}
    assert [r.label for r in board.rows] == ["nsvd-i (k1=0.95)", "nsvd-i (k1=0.8)"]
    assert any("replaces" in note for note in board.notes)


def test_allocated_rows_are_labelled_and_never_a_paper_baseline(tmp_path):
    def allocated(values, method, allocation):
        data = result_file(values, method=method, ratio=0.4)
        data["config"]["compression"]["rank_allocation"] = allocation
        return data

    write(tmp_path / "a.json", result_file({"nsvd_ptb": 20.0}, method="asvd-i", ratio=0.4))
    write(tmp_path / "b.json", allocated({"nsvd_ptb": 10.0}, "asvd-i", "fisher"))
    write(tmp_path / "c.json", result_file({"nsvd_ptb": 15.0}, method="nsvd-i", ratio=0.4))
    write(tmp_path / "d.json", allocated({"nsvd_ptb": 12.0}, "nsvd-i", "fisher"))
    board = build_leaderboard(load_results(tmp_path))
    rows = {r.label: r for r in board.rows}
    assert set(rows) == {"asvd-i", "asvd-i [fisher]", "nsvd-i", "nsvd-i [fisher]"}
    # The paper's baselines are uniform: the allocated ASVD-I (10) is not the best baseline (20).
    assert rows["nsvd-i"].improvements["nsvd_ptb"] == pytest.approx(25.0)
    assert rows["nsvd-i [fisher]"].improvements["nsvd_ptb"] == pytest.approx(40.0)


def test_rows_over_several_seeds_give_mean_and_std_in_every_output(tmp_path):
    for seed, (base, nested) in {3: (20.0, 16.0), 4: (24.0, 20.0)}.items():
        for method, value in (("asvd-i", base), ("nsvd-i", nested)):
            data = result_file({"nsvd_ptb": value}, method=method, ratio=0.4)
            data["config"]["compression"]["calibration"]["seed"] = seed
            write(tmp_path / f"{method}_s{seed}.json", data)
    board = build_leaderboard(load_results(tmp_path))
    rows = {r.label: r for r in board.rows}
    assert rows["asvd-i"].values["nsvd_ptb"] == pytest.approx(22.0) and rows["asvd-i"].n_seeds == 2
    assert rows["asvd-i"].value_std["nsvd_ptb"] == pytest.approx(2.0**0.5 * 2)
    table = list(csv.DictReader(io.StringIO(to_csv(board))))
    asvd = next(r for r in table if r["method"] == "asvd-i")
    assert float(asvd["nsvd_ptb_std"]) == pytest.approx(2.0**0.5 * 2)
    assert "±" in to_markdown(board)


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="no lm-eval results"):
        build_leaderboard(load_results(tmp_path))
    write(tmp_path / "a.json", result_file({"nsvd_ptb": 3.0}, style="hf", model="m1"))
    write(tmp_path / "b.json", result_file({"nsvd_ptb": 4.0}, style="hf", model="m2"))
    with pytest.raises(ValueError, match="several base models"):
        build_leaderboard(load_results(tmp_path))
    assert build_leaderboard(load_results(tmp_path), model="m2").rows[0].values == {"nsvd_ptb": 4.0}


def test_cli(grid, tmp_path, capsys):
    from nsvd_lm.cli import main

    folder, _ = grid
    assert main(["leaderboard", str(folder), "--out", str(tmp_path / "x" / "lb"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "Avg. Impro." in out and (tmp_path / "x" / "lb.csv").exists() and not (tmp_path / "x" / "lb.png").exists()
    assert main(["leaderboard", str(tmp_path / "nope")]) == 2


def test_window_counts_of_nsvd_tasks_decide_capping(tmp_path):
    data = result_file({"nsvd_wikitext2": 9.0, "nsvd_ptb": 12.0}, style="hf", limit=3.0)
    data["results"]["nsvd_wikitext2"].update({"n_windows,none": 3, "n_windows_full,none": 140})
    data["results"]["nsvd_ptb"].update({"n_windows,none": 3, "n_windows_full,none": 3})  # limit above the size
    write(tmp_path / "a.json", data)
    board = build_leaderboard(load_results(tmp_path))
    assert board.capped == {"nsvd_wikitext2": "3/140 windows"}


def test_rows_scored_on_fewer_windows_are_marked(tmp_path):
    import numpy as np

    from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

    rng = np.random.default_rng(0)
    ids = [f"ptb:{i}:abc" for i in range(8)]

    def scored(method, nll_shift, keep):
        nll = 100.0 + nll_shift + rng.normal(0, 1, len(ids))
        windows = WindowScores(tuple(ids[i] for i in keep), nll[list(keep)], np.full(len(keep), 50))
        data = result_file({"nsvd_ptb": windows.ppl}, method=method, ratio=0.4)
        data["results"]["nsvd_ptb"][WINDOW_SCORES_METRIC + ",none"] = windows.to_dict()
        return data

    everything, half = range(8), range(0, 8, 2)
    write(tmp_path / "r" / "a.json", scored("asvd-i", 0.0, everything))
    write(tmp_path / "r" / "b.json", scored("nsvd-i", -5.0, everything))
    write(tmp_path / "r" / "c.json", scored("nsvd-ii", -5.0, half))  # the nested subset a reduced row scores
    board = build_leaderboard(load_results(tmp_path / "r"))
    rows = {r.label: r for r in board.rows}
    assert {label: r.reduced for label, r in rows.items()} == {"asvd-i": False, "nsvd-i": False, "nsvd-ii": True}
    assert rows["nsvd-ii"].windows == {"nsvd_ptb": 4} and rows["nsvd-i"].windows == {"nsvd_ptb": 8}
    assert rows["nsvd-ii"].improvement_ci["nsvd_ptb"].n_windows == 4  # paired on the shared windows
    assert rows["nsvd-i"].improvement_ci["nsvd_ptb"].n_windows == 8
    # The improvement itself is the paired one too: on the 4 shared windows, not against the
    # baseline's perplexity over all 8.
    entries = {e.label: e for e in load_results(tmp_path / "r")}
    base, reduced = entries["asvd-i"].windows["nsvd_ptb"], entries["nsvd-ii"].windows["nsvd_ptb"]
    shared = [base.ids.index(i) for i in reduced.ids]
    base_ppl = float(np.exp(base.nll[shared].sum() / base.tokens[shared].sum()))
    expected = (base_ppl - reduced.ppl) / base_ppl * 100
    assert rows["nsvd-ii"].improvements["nsvd_ptb"] == pytest.approx(expected, rel=1e-9)
    assert rows["nsvd-ii"].avg_improvement == pytest.approx(expected, rel=1e-9)  # PTB is the only non-calib set
    full = (entries["asvd-i"].values["nsvd_ptb"] - entries["nsvd-i"].values["nsvd_ptb"]) / entries["asvd-i"].values[
        "nsvd_ptb"
    ]
    assert rows["nsvd-i"].improvements["nsvd_ptb"] == pytest.approx(full * 100, rel=1e-9)  # same windows: unchanged
    text = to_markdown(board)
    assert "| nsvd-ii ‡ |" in text and "| nsvd-i |" in text and "PTB 4 of 8" in text
    table = list(csv.DictReader(io.StringIO(to_csv(board))))
    assert [(r["method"], r["reduced"], r["nsvd_ptb_windows"]) for r in table] == [
        ("asvd-i", "false", "8"),
        ("nsvd-i", "false", "8"),
        ("nsvd-ii", "true", "4"),
    ]


def test_best_baseline_is_ranked_on_shared_windows(tmp_path):
    import numpy as np

    from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

    ids = [f"ptb:{i}:abc" for i in range(8)]

    def scored(method, nll, keep):
        windows = WindowScores(tuple(ids[i] for i in keep), np.asarray(nll, float)[list(keep)], np.full(len(keep), 10))
        data = result_file({"nsvd_ptb": windows.ppl}, method=method, ratio=0.4)
        data["results"]["nsvd_ptb"][WINDOW_SCORES_METRIC + ",none"] = windows.to_dict()
        return data

    # asvd-i: easy windows 0-3 (NLL 10), hard windows 4-7 (NLL 40); asvd-ii scored only 0-3, at NLL 12.
    write(tmp_path / "r" / "a.json", scored("asvd-i", [10] * 4 + [40] * 4, range(8)))
    write(tmp_path / "r" / "b.json", scored("asvd-ii", [12] * 8, range(4)))
    write(tmp_path / "r" / "c.json", scored("nsvd-i", [11] * 8, range(8)))
    board = build_leaderboard(load_results(tmp_path / "r"))
    row = next(r for r in board.rows if r.label == "nsvd-i")
    # Over all its windows asvd-i looks worse (ppl e^2.5) than asvd-ii (e^1.2); on the shared windows 0-3 it is better.
    assert row.baselines["nsvd_ptb"] == "asvd-i"


def test_a_reduced_baseline_tied_with_a_full_one_does_not_shrink_the_headline_cells(tmp_path):
    import numpy as np

    from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

    rng = np.random.default_rng(5)
    ids = [f"ptb:{i}:abc" for i in range(12)]
    noise = rng.normal(0, 2.0, len(ids))

    def scored(folder, method, nll, keep):
        windows = WindowScores(tuple(ids[i] for i in keep), np.asarray(nll, float)[list(keep)], np.full(len(keep), 10))
        data = result_file({"nsvd_ptb": windows.ppl}, method=method, ratio=0.4)
        data["results"]["nsvd_ptb"][WINDOW_SCORES_METRIC + ",none"] = windows.to_dict()
        write(tmp_path / folder / f"{method}.json", data)

    base = 30.0 + noise
    for folder, asvd2_shift, jitter in (("tie", -0.01, 0.3), ("rounding", -1e-5, 0.0), ("better", -3.0, 0.3)):
        scored(folder, "asvd-i", base, range(12))
        scored(folder, "asvd-ii", base + asvd2_shift + rng.normal(0, jitter, 12), range(4))  # reduced: 4 windows
        scored(folder, "nsvd-i", base - 1.0, range(12))
    rows = {r.label: r for r in build_leaderboard(load_results(tmp_path / "tie")).rows}
    # asvd-ii is lowest on its 4 windows by a hair (not significant): the 12-window asvd-i is the baseline.
    assert rows["nsvd-i"].baselines["nsvd_ptb"] == "asvd-i"
    assert rows["nsvd-i"].improvement_ci["nsvd_ptb"].n_windows == 12
    # Lower on every window by a float-rounding margin: "significant", but no reason to drop 8 windows.
    rows = {r.label: r for r in build_leaderboard(load_results(tmp_path / "rounding")).rows}
    assert rows["nsvd-i"].baselines["nsvd_ptb"] == "asvd-i"
    rows = {r.label: r for r in build_leaderboard(load_results(tmp_path / "better")).rows}
    assert rows["nsvd-i"].baselines["nsvd_ptb"] == "asvd-ii"  # really better: it stays the baseline
    assert rows["nsvd-i"].improvement_ci["nsvd_ptb"].n_windows == 4


def test_cells_that_are_no_comparison_carry_their_own_perplexity_ci(tmp_path):
    import numpy as np

    from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

    rng = np.random.default_rng(9)
    ids = [f"ptb:{i}:abc" for i in range(10)]

    def scored(name, method, nll):
        windows = WindowScores(tuple(ids), np.asarray(nll, float), np.full(len(ids), 10))
        data = result_file({"nsvd_ptb": windows.ppl}, method=method, ratio=0.4)
        data["results"]["nsvd_ptb"][WINDOW_SCORES_METRIC + ",none"] = windows.to_dict()
        write(tmp_path / f"{name}.json", data)
        return windows

    noisy = scored("a", "asvd-i", 30.0 + rng.normal(0, 3.0, len(ids)))
    flat = scored("b", "asvd-0", np.full(len(ids), 50.0))  # every window alike: no spread to resample
    scored("c", "nsvd-i", 29.0 + rng.normal(0, 3.0, len(ids)))
    board = build_leaderboard(load_results(tmp_path))
    rows = {r.label: r for r in board.rows}
    low, high = rows["asvd-i"].value_ci["nsvd_ptb"]
    assert low < noisy.ppl < high
    assert rows["asvd-0"].value_ci["nsvd_ptb"] == pytest.approx((flat.ppl, flat.ppl))
    assert "nsvd_ptb" not in rows["nsvd-i"].value_ci  # a comparison cell has the paired CI instead
    text = to_markdown(board)
    assert f"{noisy.ppl:.2f} [{low:.2f}, {high:.2f}]" in text
    table = {r["method"]: r for r in csv.DictReader(io.StringIO(to_csv(board)))}
    assert float(table["asvd-i"]["nsvd_ptb_ci_low"]) == pytest.approx(low)
    assert table["nsvd-i"]["nsvd_ptb_ci_low"] == ""


def test_the_cis_do_not_depend_on_the_interpreters_hash_seed(tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np

    from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

    rng = np.random.default_rng(11)
    tasks = ["nsvd_ptb", "nsvd_c4", "nsvd_snips", "nsvd_cmrc"]
    for method, shift in (("asvd-i", 0.0), ("nsvd-i", -1.0)):
        data = result_file({t: 1.0 for t in tasks}, method=method, ratio=0.4)
        for task in tasks:
            ids = tuple(f"{task}:{i}:abc" for i in range(10))
            windows = WindowScores(ids, 30.0 + shift + rng.normal(0, 3.0, 10), np.full(10, 10))
            data["results"][task]["token_perplexity,none"] = windows.ppl
            data["results"][task][WINDOW_SCORES_METRIC + ",none"] = windows.to_dict()
        write(tmp_path / f"{method}.json", data)
    script = (
        "import sys; from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results, to_csv; "
        "sys.stdout.write(to_csv(build_leaderboard(load_results(sys.argv[1]))))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def _scored(task, nll, full, method, ratio, k1=None, allocation=None):
    """A results file with per-window scores of one task (10 tokens per window)."""
    import numpy as np

    from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

    windows = WindowScores(
        tuple(f"{task}:{i}:h" for i in range(len(nll))), np.asarray(nll, float), np.full(len(nll), 10)
    )
    data = result_file({task: windows.ppl}, method=method, ratio=ratio, k1=k1)
    data["results"][task][WINDOW_SCORES_METRIC + ",none"] = windows.to_dict()
    data["results"][task]["n_windows,none"] = len(nll)
    data["results"][task]["n_windows_full,none"] = full
    if allocation:
        data["config"]["compression"]["rank_allocation"] = allocation
    return data


def test_versus_compares_allocated_rows_with_uniform_and_with_allocated_asvd(tmp_path):
    from nsvd_lm.experiments.leaderboard import comparisons_csv

    base = [30.0, 32.0, 29.0, 31.0, 30.5, 29.5]
    files = {
        "asvd-i.json": _scored("nsvd_ptb", base, 40, "asvd-i", 0.4),
        "nsvd-i.json": _scored("nsvd_ptb", [v - 1 for v in base], 40, "nsvd-i", 0.4),
        "asvd-i-fisher.json": _scored("nsvd_ptb", [v - 5 for v in base], 40, "asvd-i", 0.4, allocation="fisher"),
        "nsvd-i-fisher.json": _scored("nsvd_ptb", [v - 6 for v in base], 40, "nsvd-i", 0.4, allocation="fisher"),
    }
    for name, data in files.items():
        write(tmp_path / name, data)
    entries = load_results(tmp_path)
    plain = build_leaderboard(entries)
    assert plain.comparisons == []
    board = build_leaderboard(entries, versus=["uniform"])
    got = {(c.label, c.reference): c for c in board.comparisons}
    assert set(got) == {
        ("asvd-i [fisher]", "asvd-i"),
        ("nsvd-i [fisher]", "nsvd-i"),
        ("nsvd-i [fisher]", "best ASVD [fisher]"),
    }
    # 5 nats less per 10 tokens than the uniform row: ppl x exp(-0.5), every window: significant.
    vs_uniform = got[("nsvd-i [fisher]", "nsvd-i")].cells["nsvd_ptb"]
    assert vs_uniform.estimate == pytest.approx(100 * (1 - math.exp(-0.5))) and vs_uniform.significant
    vs_asvd = got[("nsvd-i [fisher]", "best ASVD [fisher]")]
    assert vs_asvd.references == {"nsvd_ptb": "asvd-i [fisher]"}
    assert vs_asvd.cells["nsvd_ptb"].estimate == pytest.approx(100 * (1 - math.exp(-0.1)))
    # The main table's cells stay against the paper's (uniform) baselines.
    rows = {r.label: r for r in board.rows}
    assert rows["nsvd-i [fisher]"].baselines == {"nsvd_ptb": "asvd-i"}
    md = to_markdown(board)
    assert "## Paired comparisons" in md and "| 0.4 | nsvd-i [fisher] | best ASVD [fisher] |" in md
    lines = comparisons_csv(board).splitlines()
    assert len(lines) == 1 + 3 * 2  # header; per comparison one set + the average
    with pytest.raises(ValueError, match="versus=bogus is not known; allowed values: uniform, nsvd"):
        build_leaderboard(entries, versus=["bogus"])


def test_versus_nsvd_pairs_nid_with_nsvd_at_the_same_k1_and_marks_exhausted_sets(tmp_path):
    nll = [30.0, 31.0, 29.0, 30.5]
    noisy = [30.5, 29.0, 31.5, 29.8]  # a tie with spread, on every window of a 4-window set
    write(tmp_path / "a.json", _scored("nsvd_snips", nll, 4, "asvd-i", 0.3))
    write(tmp_path / "n9.json", _scored("nsvd_snips", nll, 4, "nsvd-i", 0.3, k1=0.9))
    write(tmp_path / "n8.json", _scored("nsvd_snips", [v + 2 for v in nll], 4, "nsvd-i", 0.3, k1=0.8))
    write(tmp_path / "d9.json", _scored("nsvd_snips", noisy, 4, "nid-i", 0.3, k1=0.9))
    write(tmp_path / "d8.json", _scored("nsvd_snips", nll, 4, "nid-ii", 0.3, k1=0.8))
    board = build_leaderboard(load_results(tmp_path), versus=["nsvd"])
    got = {c.label: c for c in board.comparisons}
    assert {lb: c.reference for lb, c in got.items()} == {
        "nid-i (k1=0.9)": "nsvd-i (k1=0.9)",
        "nid-ii (k1=0.8)": "nsvd-i (k1=0.8)",
    }
    assert got["nid-ii (k1=0.8)"].cells["nsvd_snips"].estimate == pytest.approx(100 * (1 - math.exp(-0.2)))
    assert got["nid-i (k1=0.9)"].exhausted == {"nsvd_snips"}  # a tie on the whole set
    rows = {r.label: r for r in board.rows}
    assert rows["nid-i (k1=0.9)"].exhausted == {"nsvd_snips"} and rows["nsvd-i (k1=0.8)"].exhausted == set()
    md = to_markdown(board)
    assert " n.s. §" in md and "§ = the CI contains 0 although every window of the set is scored" in md


def test_rows_given_more_windows_later_do_not_mark_the_others_reduced(tmp_path):
    write(tmp_path / "a.json", _scored("nsvd_ptb", [30.0 + i % 3 for i in range(8)], 40, "asvd-i", 0.4))
    write(tmp_path / "b.json", _scored("nsvd_ptb", [29.0 + i % 3 for i in range(8)], 40, "nsvd-i", 0.4))
    write(tmp_path / "c.json", _scored("nsvd_ptb", [29.0 + i % 3 for i in range(4)], 40, "nsvd-ii", 0.4))
    extended = _scored("nsvd_ptb", [30.0 + i % 3 for i in range(16)], 40, "asvd-ii", 0.4)
    extended["nsvd_sweep"] = {"extensions": [{"windows": {"nsvd_ptb": 8}}]}  # 8 from its sweep, 8 added later
    write(tmp_path / "d.json", extended)
    board = build_leaderboard(load_results(tmp_path))
    assert {r.label: r.reduced for r in board.rows} == {
        "asvd-i": False,
        "asvd-ii": False,
        "nsvd-i": False,
        "nsvd-ii": True,
    }
    assert {r.label: r.first_windows["nsvd_ptb"] for r in board.rows}["asvd-ii"] == 8
