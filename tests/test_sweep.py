"""``nsvd-lm sweep``: grid validation, one calibration, atomic results, resume after an interruption."""

from __future__ import annotations

import json

import pytest
from lmeval_helpers import write_text_corpus, write_wiki_ptb_data_dir
from tiny_models import build_tiny_model

import nsvd_lm.experiments.sweep as sweep
from nsvd_lm.experiments.sweep import SweepPoint, build_grid, run_sweep, write_json_atomic


def test_grid_names_order_and_validation():
    grid = build_grid(["svd", "svd-llm", "nsvd-i"], [0.2, 0.4], k1_fracs=[0.9, 0.95], include_original=True)
    assert [p.name for p in grid] == [
        "original",
        "svd_r0.2",
        "svd_r0.4",
        "asvd-i_r0.2",
        "asvd-i_r0.4",  # alias resolved
        "nsvd-i_r0.2_k0.9",
        "nsvd-i_r0.2_k0.95",
        "nsvd-i_r0.4_k0.9",
        "nsvd-i_r0.4_k0.95",  # k1 only for nested
    ]
    assert SweepPoint(None, 0.0).model_args() == {"ratio": 0}
    with pytest.raises(ValueError, match="method='bogus' is not known; allowed values"):
        build_grid(["svd", "bogus"], [0.2])
    with pytest.raises(ValueError, match=r"ratio=1.2 must lie in the open interval"):
        build_grid(["svd"], [0.2, 1.2])
    with pytest.raises(ValueError, match=r"k1_frac=1.5 must lie in \[0, 1\]"):
        build_grid(["nid-ii"], [0.2], k1_fracs=[1.5])
    with pytest.raises(ValueError, match="ratios is empty"):
        build_grid(["svd"], [])


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "svd_r0.2.json"

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {"results": {}})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_json_atomic(target, {"results": {"x": 1}})
    assert json.loads(target.read_text()) == {"results": {"x": 1}} and len(list(tmp_path.iterdir())) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    try:
        model = build_tiny_model(root / "model")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return {
        "model": model,
        "corpus": write_text_corpus(root / "corpus"),
        "data": write_wiki_ptb_data_dir(root / "data"),
        "cache": root / "stats",
    }


def test_sweep_resumes_after_interruption_with_one_calibration(
    tiny, tmp_path, monkeypatch, capsys, calibration_forwards
):
    from nsvd_lm.cli import main
    from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(tiny["data"]))
    out = tmp_path / "grid"
    calls: list[str] = []
    real_evaluate = sweep.evaluate_point
    interrupt_at = {"n": 3}

    def counting_evaluate(point, *args, **kwargs):
        calls.append(point.name)
        if len(calls) == interrupt_at["n"]:
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) in the middle of a configuration
        return real_evaluate(point, *args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate_point", counting_evaluate)
    settings = dict(
        tasks=["nsvd_ptb"],
        limit=2,
        include_original=True,
        device="cpu",
        calibration={
            "calib_dataset": str(tiny["corpus"]),
            "calib_nsamples": 4,
            "calib_seqlen": 32,
            "cache_dir": str(tiny["cache"]),
        },
        model_args={"max_length": 64, "dtype": "float32"},
    )
    runs_before = calibration_forwards.count
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(tiny["model"]), ["asvd-i", "nsvd-i", "svd"], [0.4], output_dir=out, **settings)
    assert calls == ["original", "asvd-i_r0.4", "nsvd-i_r0.4"]
    assert sorted(p.name for p in out.iterdir()) == ["asvd-i_r0.4.json", "original.json"]  # nothing half-written
    (out / ".svd_r0.4.abc123.tmp").write_text('{"results": {"nsvd_pt')  # what a SIGKILL mid-write leaves

    # Restart through the CLI: only the two missing configurations run.
    calls.clear()
    interrupt_at["n"] = 0
    argv = [
        "sweep",
        "--model",
        str(tiny["model"]),
        "--methods",
        "asvd-i,nsvd-i,svd",
        "--ratios",
        "0.4",
        "--tasks",
        "nsvd_ptb",
        "--limit",
        "2",
        "--include-original",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--model-args",
        "max_length=64,dtype=float32",
        "--calib-dataset",
        str(tiny["corpus"]),
        "--calib-nsamples",
        "4",
        "--calib-seqlen",
        "32",
        "--cache-dir",
        str(tiny["cache"]),
    ]
    assert main(argv) == 0
    assert calls == ["nsvd-i_r0.4", "svd_r0.4"]
    printed = capsys.readouterr().out
    assert "ran 2, skipped 2" in printed and "| 0.4 | nsvd-i |" in printed
    assert not list(out.glob(".*.tmp"))
    # One calibration forward for the whole grid: asvd-i computed it, nsvd-i read the cache.
    assert calibration_forwards.count - runs_before == 1

    for name in ("original", "asvd-i_r0.4", "nsvd-i_r0.4", "svd_r0.4"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["nsvd_sweep"]["point"] == name and data["config"]["limit"] == 2
        block = data["config"]["compression"]
        assert (block["method"] or "original") == name.split("_r")[0]
        assert data["results"]["nsvd_ptb"]["token_perplexity,none"] > 1
    nested = json.loads((out / "nsvd-i_r0.4.json").read_text())["config"]["compression"]
    assert nested["stats_cache_hit"] is True and nested["calibration"]["nsamples"] == 4

    board = build_leaderboard(load_results(out))
    assert [r.label for r in board.rows] == ["Original", "svd", "asvd-i", "nsvd-i"]
    assert set(board.capped) == {"nsvd_ptb"} and "windows" in board.capped["nsvd_ptb"]  # --limit is labelled

    # Third run: everything is done, nothing is evaluated.
    calls.clear()
    summary = run_sweep(str(tiny["model"]), ["asvd-i", "nsvd-i", "svd"], [0.4], output_dir=out, **settings)
    assert calls == [] and summary.ran == [] and len(summary.skipped) == 4

    # Same folder, different sweep settings: refused before any work.
    with pytest.raises(ValueError, match="from a different sweep"):
        run_sweep(str(tiny["model"]), ["svd"], [0.4], output_dir=out, **{**settings, "limit": 3})
    assert calls == []


def test_reuse_svd_computes_each_first_step_once_and_changes_nothing(tiny, tmp_path, monkeypatch):
    from nsvd_lm import decompose
    from nsvd_lm.lmeval import adapter

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(tiny["data"]))
    built: list[str] = []

    class CountingSVD(decompose.WhitenedSVD):
        def __init__(self, weight, whitening, **kw):
            built.append(whitening.kind)
            super().__init__(weight, whitening, **kw)

    monkeypatch.setattr(decompose, "WhitenedSVD", CountingSVD)
    settings = dict(
        tasks=["nsvd_ptb"],
        limit=1,
        device="cpu",
        calibration={
            "calib_dataset": str(tiny["corpus"]),
            "calib_nsamples": 4,
            "calib_seqlen": 32,
            "cache_dir": str(tiny["cache"]),
        },
        model_args={"max_length": 64, "dtype": "float32"},
    )
    ppl, first_steps = {}, {}
    for reuse in (False, True):
        built.clear()
        out = tmp_path / f"reuse{reuse}"
        run_sweep(str(tiny["model"]), ["asvd-i", "nsvd-i"], [0.3, 0.5], output_dir=out, reuse_svd=reuse, **settings)
        ppl[reuse] = {
            p.stem: json.loads(p.read_text())["results"]["nsvd_ptb"]["token_perplexity,none"]
            for p in out.glob("*.json")
        }
        first_steps[reuse] = built.count("cholesky")
    # Four configurations of the asvd-i family: four Cholesky-whitened SVDs per layer without
    # reuse, one with it.
    assert first_steps[True] > 0 and first_steps[False] == 4 * first_steps[True]
    # No module-level SVD cache to release: the sweep hands its own to each model it builds.
    assert not hasattr(adapter, "SHARED_SVD_CACHE")
    assert ppl[True].keys() == ppl[False].keys() and len(ppl[True]) == 4
    for name, value in ppl[False].items():
        assert ppl[True][name] == pytest.approx(value, rel=1e-6)


def _calibration(inputs) -> dict:
    return {
        "calib_dataset": str(inputs["corpus"]),
        "calib_nsamples": 4,
        "calib_seqlen": 32,
        "cache_dir": str(inputs["cache"]),
    }


def test_seeds_sweep_one_calibration_per_seed_and_leaderboard_over_seeds(
    sweep_inputs, tmp_path, monkeypatch, calibration_forwards
):
    from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results, to_markdown

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(sweep_inputs["data"]))
    out = tmp_path / "seeds"
    settings = dict(
        tasks=["nsvd_ptb"],
        limit=4,
        include_original=True,
        device="cpu",
        calibration={**_calibration(sweep_inputs), "cache_dir": str(tmp_path / "stats")},
        model_args={"max_length": 64, "dtype": "float32"},
    )
    with pytest.raises(ValueError, match="not both"):
        run_sweep(
            str(sweep_inputs["model"]),
            ["svd"],
            [0.4],
            output_dir=out,
            seeds=[3],
            **{**settings, "calibration": {**settings["calibration"], "seed": 4}},
        )
    summary = run_sweep(
        str(sweep_inputs["model"]), ["asvd-i", "nsvd-i"], [0.4], output_dir=out, seeds=[3, 4], **settings
    )
    names = ["original", "asvd-i_r0.4", "nsvd-i_r0.4", "asvd-i_r0.4_s4", "nsvd-i_r0.4_s4"]
    assert summary.ran == names  # seed by seed; the original once; seed 3 keeps today's names
    assert calibration_forwards.count == 2  # one calibration per seed
    for name in names[1:]:
        data = json.loads((out / f"{name}.json").read_text())
        seed = 4 if name.endswith("_s4") else 3
        assert data["config"]["compression"]["calibration"]["seed"] == seed and data["nsvd_sweep"]["seed"] == seed
    assert (
        json.loads((out / "asvd-i_r0.4.json").read_text())["results"]["nsvd_ptb"]["token_perplexity,none"]
        != (json.loads((out / "asvd-i_r0.4_s4.json").read_text())["results"]["nsvd_ptb"]["token_perplexity,none"])
    )

    board = build_leaderboard(load_results(out))
    nested = next(r for r in board.rows if r.method == "nsvd-i")
    assert nested.seeds == [3, 4] and "nsvd_ptb" in nested.value_std and "nsvd_ptb" in nested.improvement_std
    ci = nested.improvement_ci["nsvd_ptb"]
    assert ci.n_seeds == 2 and ci.n_windows == 4 and ci.low <= ci.high
    md = to_markdown(board)
    assert "| Seeds |" in md and "| 3,4 |" in md and " ± " in md

    # Extending the same folder with a third seed reuses everything done.
    again = run_sweep(
        str(sweep_inputs["model"]), ["asvd-i", "nsvd-i"], [0.4], output_dir=out, seeds=[3, 4, 5], **settings
    )
    assert again.ran == ["asvd-i_r0.4_s5", "nsvd-i_r0.4_s5"] and len(again.skipped) == 5


def test_sigkill_during_a_sweep_loses_at_most_the_running_cell(sweep_inputs, tmp_path):
    """A real kill -9 of a sweep subprocess; the rerun skips the finished cells and produces the rest."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lmeval_helpers import offline_env

    out = tmp_path / "killed"
    cal = _calibration(sweep_inputs)
    argv = ["sweep", "--model", str(sweep_inputs["model"]), "--methods", "svd,asvd-i", "--ratios", "0.3,0.5"]
    argv += ["--tasks", "nsvd_ptb", "--limit", "2", "--include-original", "--device", "cpu", "--output", str(out)]
    argv += ["--model-args", "max_length=64,dtype=float32", "--no-leaderboard"]
    argv += ["--calib-dataset", cal["calib_dataset"], "--calib-nsamples", "4", "--calib-seqlen", "32"]
    argv += ["--cache-dir", cal["cache_dir"]]
    env = offline_env(NSVD_LM_DATA_DIR=str(sweep_inputs["data"]))
    exe = str(Path(sys.executable).parent / "nsvd-lm")
    proc = subprocess.Popen([exe, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(not p.name.startswith(".") for p in out.glob("*.json"))):
            assert proc.poll() is None, "the sweep ended before its first result"
            assert time.monotonic() < deadline, "no result file after 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    finished = sorted(p.stem for p in out.glob("*.json"))
    all_names = ["asvd-i_r0.3", "asvd-i_r0.5", "original", "svd_r0.3", "svd_r0.5"]
    assert finished and len(finished) < len(all_names)
    for name in finished:  # every file there is complete
        assert "results" in json.loads((out / f"{name}.json").read_text())

    result = subprocess.run([exe, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ran {len(all_names) - len(finished)}, skipped {len(finished)}" in result.stdout
    assert sorted(p.stem for p in out.glob("*.json")) == all_names and not list(out.glob(".*.tmp"))


def test_spread_indices_cover_the_set_and_are_nested():
    from nsvd_lm.experiments.sweep import parse_windows, spread_indices

    for total in (1, 9, 51, 103, 297):
        previous: set[int] = set()
        for count in range(1, min(total, 60) + 1):
            chosen = spread_indices(total, count)
            assert len(chosen) == count and chosen == sorted(set(chosen)) and 0 <= chosen[0] and chosen[-1] < total
            assert previous <= set(chosen)  # nested: rows with fewer windows pair with every row that has more
            previous = set(chosen)
            if count >= 4:  # spread: no half of the set is left out
                assert chosen[0] < total / 2 <= chosen[-1]
    assert spread_indices(9, 20) == list(range(9))
    with pytest.raises(ValueError, match="must be >= 1"):
        spread_indices(10, 0)
    assert parse_windows("nsvd_snips=9, *=24") == {"nsvd_snips": 9, "*": 24}
    with pytest.raises(ValueError, match="TASK=COUNT"):
        parse_windows("nsvd_snips")


def test_sweep_scores_the_chosen_windows_per_task(tiny, tmp_path, monkeypatch):
    from nsvd_lm.experiments.leaderboard import load_results
    from nsvd_lm.experiments.sweep import spread_indices

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(tiny["data"]))
    settings = dict(
        tasks=["nsvd_ptb", "nsvd_wikitext2"],
        include_original=True,
        device="cpu",
        model_args={"max_length": 64, "dtype": "float32"},
        calibration={
            "calib_dataset": str(tiny["corpus"]),
            "calib_nsamples": 4,
            "calib_seqlen": 32,
            "cache_dir": str(tiny["cache"]),
        },
    )
    with pytest.raises(ValueError, match="either limit"):
        run_sweep(str(tiny["model"]), ["svd"], [0.4], output_dir=tmp_path / "x", limit=2, windows={"*": 2}, **settings)
    with pytest.raises(ValueError, match="unknown task"):
        run_sweep(str(tiny["model"]), ["svd"], [0.4], output_dir=tmp_path / "y", windows={"nsvd_snips": 2}, **settings)

    out = tmp_path / "grid"
    run_sweep(str(tiny["model"]), ["svd"], [0.4], output_dir=out, windows={"nsvd_wikitext2": 2, "*": 3}, **settings)
    by_label = {e.label: e for e in load_results(out)}
    for entry in by_label.values():
        assert {t: s.n_windows for t, s in entry.windows.items()} == {"nsvd_ptb": 3, "nsvd_wikitext2": 2}
    # The same windows in both runs (they pair window by window), the ones spread_indices names.
    original, svd = by_label["Original"], by_label["svd"]
    for task, count in (("nsvd_ptb", 3), ("nsvd_wikitext2", 2)):
        assert original.windows[task].ids == svd.windows[task].ids
        total = int(json.loads((out / "original.json").read_text())["results"][task]["n_windows_full,none"])
        assert sorted(int(i.split(":")[1]) for i in original.windows[task].ids) == spread_indices(total, count)
    assert json.loads((out / "svd_r0.4.json").read_text())["nsvd_sweep"]["windows"] == {"*": 3, "nsvd_wikitext2": 2}
