"""Adaptive window budget: more windows merged exactly into finished files, the cell rule, resume after a kill."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nsvd_lm.experiments import adaptive, window_results
from nsvd_lm.experiments.adaptive import classify, next_count, requests_for, seeds_needed
from nsvd_lm.experiments.leaderboard import build_leaderboard, load_results
from nsvd_lm.experiments.paired import WINDOW_SCORES_METRIC, WindowScores

# ----------------------------------------------------------------------------- the rule, on hand-made files


def _result(method, ratio, windows_by_task, totals, seed=3):
    results = {}
    for task, scores in windows_by_task.items():
        results[task] = {
            "token_perplexity,none": scores.ppl,
            "n_windows,none": scores.n_windows,
            "n_windows_full,none": totals[task],
            WINDOW_SCORES_METRIC + ",none": scores.to_dict(),
        }
    compression = {"method": method, "ratio": ratio, "base_model": "tiny", "calibration": {"seed": seed}}
    return {
        "results": results,
        "config": {"model_args": {"pretrained": "tiny"}, **({"compression": compression} if method else {})},
        "date": 1.0,
    }


def _scores(task, nll):
    ids = tuple(f"{task}:{i}:h{i}" for i in range(len(nll)))
    return WindowScores(ids, np.asarray(nll, float), np.full(len(nll), 100))


def test_cells_are_classified_by_the_rule_and_open_ones_ask_for_nested_windows(tmp_path):
    rng = np.random.default_rng(0)
    totals = {"nsvd_ptb": 50, "nsvd_c4": 50, "nsvd_snips": 9, "nsvd_cmrc": 40, "nsvd_mctest": 40}
    base = {t: 300.0 + rng.normal(0, 20, 9 if t == "nsvd_snips" else 8) for t in totals}
    # X - base, in nats per window of 100 tokens: per window (shared by the seeds), and per seed.
    window_noise = {
        "nsvd_ptb": -30.0 + rng.normal(0, 1, 8),  # 26 % lower perplexity everywhere: decided
        "nsvd_c4": rng.normal(0, 0.5, 8),  # a tie measured to a fraction of a point: narrow
        "nsvd_snips": rng.normal(0, 25, 9),  # a noisy tie on the whole set: exhausted
        "nsvd_cmrc": rng.normal(0, 25, 8),  # a noisy tie with windows left: open
        "nsvd_mctest": rng.normal(0, 0.5, 8),  # windows agree ...
    }
    for seed, seed_shift in ((3, 0.0), (4, 25.0), (5, -25.0)):  # ... seeds do not (MCTest): seed-limited
        x = {t: _scores(t, base[t] + window_noise[t] + (seed_shift if t == "nsvd_mctest" else 0.0)) for t in totals}
        b = {t: _scores(t, base[t]) for t in totals}
        (tmp_path / f"nsvd_s{seed}.json").write_text(json.dumps(_result("nsvd-i", 0.3, x, totals, seed)))
        (tmp_path / f"asvd_s{seed}.json").write_text(json.dumps(_result("asvd-i", 0.3, b, totals, seed)))
    entries = load_results(tmp_path)
    cells = {c.task: c for c in classify(build_leaderboard(entries), entries, target=5.0)}
    assert {t: c.status for t, c in cells.items()} == {
        "nsvd_ptb": "decided",
        "nsvd_c4": "narrow",
        "nsvd_snips": "exhausted",
        "nsvd_cmrc": "open",
        "nsvd_mctest": "seed-limited",
    }
    mctest = cells["nsvd_mctest"]
    assert mctest.windows_half_width < 1.0 < 5.0 < mctest.half_width and mctest.n_seeds == 3
    # How many seeds it would take (the report says so): more than the three it has.
    assert mctest.seeds_wanted == seeds_needed(3, 8, 40, mctest.half_width, mctest.windows_half_width, 5.0) > 3
    assert all(c.seeds_wanted is None for c in cells.values() if c.status != "seed-limited")
    # Rows are selected by their rank_allocation too: these are all uniform.
    assert len(classify(build_leaderboard(entries), entries, allocations=["uniform"])) == len(cells)
    assert classify(build_leaderboard(entries), entries, allocations=["fisher"]) == []
    cmrc = cells["nsvd_cmrc"]
    assert cmrc.wanted == next_count(8, 40, cmrc.half_width, cmrc.windows_half_width, 5.0, adaptive.MARGIN) > 8
    # Fewer windows than min_windows: never decided (nor a tie), whatever the CI says.
    screened = {c.task: c for c in classify(build_leaderboard(entries), entries, target=5.0, min_windows=12)}
    assert (screened["nsvd_ptb"].status, screened["nsvd_ptb"].wanted) == ("open", 12)
    assert screened["nsvd_snips"].status == "exhausted"  # 9 windows are the whole set
    requests = requests_for(cells.values())
    assert set(requests) == set(cmrc.files) and len(cmrc.files) == 6  # X and baseline, every seed
    assert all(counts == {"nsvd_cmrc": cmrc.wanted} for counts in requests.values())


def test_next_count_extrapolates_and_stops_where_seeds_dominate():
    # 8 windows at +-10 points, windows only: (10/5)^2 = 4x the windows, x1.5 margin.
    assert next_count(8, 1000, 10.0, 10.0, 5.0, 1.5) == math.ceil(1.5 * 8 * 4)
    assert next_count(8, 20, 10.0, 10.0, 5.0, 1.5) == 20  # capped at the set
    assert next_count(100, 1000, 5.1, 5.1, 5.0, 1.0) == 126  # always a real step: n + n/4 + 1
    assert next_count(8, 1000, 12.0, 3.0, 5.0, 1.5) is None  # sqrt(144 - 9) > 5: the seeds' spread
    with pytest.raises(ValueError, match="target"):
        adaptive.adapt([], target=0)
    with pytest.raises(ValueError, match=r"allocations=\['bogus'\] not known; allowed values: uniform"):
        adaptive.adapt([], allocations=["bogus"])


def test_seeds_needed_extrapolates_the_seed_part_over_the_whole_set():
    # seed part 144 - 9 = 135; with all 1000 windows the windows part is 9 * 8 / 1000: 3 * 135 / 24.93.
    assert seeds_needed(3, 8, 1000, 12.0, 3.0, 5.0) == math.ceil(3 * 135 / (25 - 9 * 8 / 1000))
    assert seeds_needed(3, 8, 1000, 5.5, 5.0, 5.0) == 4  # always at least one more seed
    assert seeds_needed(3, 8, 8, 12.0, 6.0, 5.0) is None  # the whole set's windows alone are too wide
    assert seeds_needed(1, 8, 1000, 12.0, 3.0, 5.0) is None  # one seed: no seed part to extrapolate
    with pytest.raises(ValueError, match="method='nsvd' is not known; allowed values"):
        adaptive.adapt([], methods=["nsvd"])


# ----------------------------------------------------------------------------- real sweeps of the tiny model


def _settings(inputs, tmp_path):
    return dict(
        tasks=["nsvd_ptb", "nsvd_wikitext2"],
        device="cpu",
        calibration={
            "calib_dataset": str(inputs["corpus"]),
            "calib_nsamples": 4,
            "calib_seqlen": 32,
            "cache_dir": str(tmp_path / "stats"),
        },
        model_args={"max_length": 64, "dtype": "float32"},
    )


METRICS = ("token_perplexity,none", "word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")


def test_more_windows_later_equal_one_run_over_all_of_them(sweep_inputs, tmp_path, monkeypatch):
    from nsvd_lm.experiments import evaldata
    from nsvd_lm.experiments.sweep import run_sweep

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(sweep_inputs["data"]))
    reads: list[str] = []
    real_read = evaldata._read_local

    def counting_read(spec, *args):
        reads.append(spec.name)
        return real_read(spec, *args)

    monkeypatch.setattr(evaldata, "_read_local", counting_read)
    settings = _settings(sweep_inputs, tmp_path)
    grown = tmp_path / "grown"
    first = run_sweep(
        str(sweep_inputs["model"]),
        ["asvd-i"],
        [0.4],
        output_dir=grown,
        include_original=True,
        windows={"*": 2},
        **settings,
    )
    assert first.ran == ["original", "asvd-i_r0.4"]
    assert sorted(reads) == ["ptb", "wikitext2"]  # each set read and tokenized once for both configurations
    more = run_sweep(
        str(sweep_inputs["model"]),
        ["asvd-i"],
        [0.4],
        output_dir=grown,
        include_original=True,
        windows={"*": 5},
        **settings,
    )
    assert more.ran == [] and more.extended == ["original", "asvd-i_r0.4"]
    fresh = tmp_path / "fresh"
    run_sweep(
        str(sweep_inputs["model"]),
        ["asvd-i"],
        [0.4],
        output_dir=fresh,
        include_original=True,
        windows={"*": 5},
        **settings,
    )
    for name in ("original", "asvd-i_r0.4"):
        a = json.loads((grown / f"{name}.json").read_text())
        b = json.loads((fresh / f"{name}.json").read_text())
        for task in settings["tasks"]:
            assert a["results"][task]["n_windows,none"] == 5 == a["results"][task]["sample_len"]
            ids_a = a["results"][task][WINDOW_SCORES_METRIC + ",none"]["ids"]
            assert ids_a == b["results"][task][WINDOW_SCORES_METRIC + ",none"]["ids"]
            for metric in METRICS:  # every metric as one lm-eval run over the five windows computes it
                assert a["results"][task][metric] == pytest.approx(b["results"][task][metric], rel=1e-12)
        (extension,) = a["nsvd_sweep"]["extensions"]
        assert extension["windows"] == {t: 3 for t in settings["tasks"]}
        assert extension["anchor_max_relative_deviation"] == 0.0  # the stored window came back bit for bit
    # Asking for no more than a file has changes nothing, and builds no task (the files know their sets' sizes).
    reads_before = len(reads)
    again = run_sweep(
        str(sweep_inputs["model"]),
        ["asvd-i"],
        [0.4],
        output_dir=grown,
        include_original=True,
        windows={"*": 3},
        **settings,
    )
    assert again.extended == [] and len(again.skipped) == 2 and len(reads) == reads_before

    # A file whose stored window no longer matches the model is refused, and left as it was.
    path = grown / "asvd-i_r0.4.json"
    data = json.loads(path.read_text())
    for task in settings["tasks"]:
        data["results"][task][WINDOW_SCORES_METRIC + ",none"]["nll"][0] *= 1.01
    path.write_text(json.dumps(data))
    before = path.read_text()
    with pytest.raises(ValueError, match="not the one behind the file"):
        run_sweep(str(sweep_inputs["model"]), ["asvd-i"], [0.4], output_dir=grown, windows={"*": 6}, **settings)
    assert path.read_text() == before


def test_merge_refuses_windows_of_other_data(sweep_inputs, tmp_path, monkeypatch):
    from nsvd_lm.experiments.sweep import _task_manager, build_tasks, run_sweep

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(sweep_inputs["data"]))
    settings = {**_settings(sweep_inputs, tmp_path), "tasks": ["nsvd_ptb"]}
    out = tmp_path / "one"
    run_sweep(str(sweep_inputs["model"]), [], [], output_dir=out, include_original=True, windows={"*": 3}, **settings)
    data = json.loads((out / "original.json").read_text())
    manager = _task_manager(["nsvd_ptb"], None, {"pretrained": str(sweep_inputs["model"]), "max_length": 64})
    task = build_tasks(["nsvd_ptb"], manager).leaves["nsvd_ptb"]
    results = data["results"]["nsvd_ptb"]
    rest, taken = window_results.split_windows(results, [window_results.scored_indices(results)[0]])
    merged = window_results.merge_task_results(task, rest, {WINDOW_SCORES_METRIC + ",none": taken.to_dict()})
    for metric in METRICS:  # split and merged back: lm-eval's own numbers, exactly
        assert merged[metric] == results[metric]
    with pytest.raises(ValueError, match="scored twice"):
        window_results.merge_task_results(task, results, {WINDOW_SCORES_METRIC + ",none": taken.to_dict()})
    other = taken.to_dict()
    other["ids"] = [i.rsplit(":", 1)[0] + ":0000000000" for i in other["ids"]]  # same index, other tokens
    with pytest.raises(ValueError, match="other data, tokenizer or max_length"):
        window_results.merge_task_results(task, rest, {WINDOW_SCORES_METRIC + ",none": other})


def test_adapt_extends_the_runs_behind_an_open_cell_and_writes_its_report(sweep_inputs, tmp_path, monkeypatch):
    from nsvd_lm.experiments.sweep import run_sweep

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(sweep_inputs["data"]))
    settings = {**_settings(sweep_inputs, tmp_path), "tasks": ["nsvd_ptb"]}
    out = tmp_path / "table"
    run_sweep(str(sweep_inputs["model"]), ["asvd-i", "nsvd-i"], [0.4], output_dir=out, windows={"*": 2}, **settings)
    real_classify = adaptive.classify
    rounds = []

    def first_round_open(board, entries, **kwargs):  # whatever the tiny model says, open the cell once
        cells = real_classify(board, entries, **kwargs)
        rounds.append([c.n_windows for c in cells])
        if len(rounds) == 1:
            cells = [adaptive.Cell(**{**c.__dict__, "status": "open", "wanted": 4}) for c in cells]
        return cells

    monkeypatch.setattr(adaptive, "classify", first_round_open)
    report_path = tmp_path / "adaptive.json"
    report = adaptive.adapt([out], report=report_path, device="cpu", min_windows=4)
    assert rounds == [[2], [4]]  # extended once, then re-read from the files
    assert len(report.rounds) == 1 and all(v == {"nsvd_ptb": 2} for v in report.rounds[0]["windows_added"].values())
    for name in ("asvd-i_r0.4", "nsvd-i_r0.4"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["results"]["nsvd_ptb"]["n_windows,none"] == 4
    saved = json.loads(report_path.read_text())
    assert saved["format"] == adaptive.REPORT_FORMAT and saved["cells"][0]["n_windows"] == 4
    assert saved["cells"][0]["status"] in adaptive.STATUSES and saved["cells"][0]["status"] != "open"


def test_a_top_up_killed_midway_resumes_without_redoing_finished_files(sweep_inputs, tmp_path):
    """kill -9 of `nsvd-lm sweep` while it adds windows to finished files; the rerun does only the rest."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lmeval_helpers import offline_env

    out = tmp_path / "killed"
    argv = ["sweep", "--model", str(sweep_inputs["model"]), "--methods", "svd,asvd-i", "--ratios", "0.3,0.5"]
    argv += ["--tasks", "nsvd_ptb", "--include-original", "--device", "cpu", "--output", str(out)]
    argv += ["--model-args", "max_length=64,dtype=float32", "--no-leaderboard"]
    argv += ["--calib-dataset", str(sweep_inputs["corpus"]), "--calib-nsamples", "4", "--calib-seqlen", "32"]
    argv += ["--cache-dir", str(tmp_path / "stats")]
    env = offline_env(NSVD_LM_DATA_DIR=str(sweep_inputs["data"]))
    exe = str(Path(sys.executable).parent / "nsvd-lm")
    subprocess.run([exe, *argv, "--windows", "*=1"], env=env, check=True, capture_output=True, timeout=600)
    names = ["asvd-i_r0.3", "asvd-i_r0.5", "original", "svd_r0.3", "svd_r0.5"]

    def extended() -> list[str]:
        done = []
        for name in names:
            try:
                data = json.loads((out / f"{name}.json").read_text())
            except ValueError:  # pragma: no cover - would be a half-written file
                raise AssertionError(f"{name}.json is not complete JSON") from None
            if data["nsvd_sweep"].get("extensions"):
                done.append(name)
        return done

    proc = subprocess.Popen(
        [exe, *argv, "--windows", "*=3"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not extended():
            assert proc.poll() is None, "the top-up ended before its first file"
            assert time.monotonic() < deadline, "no file got more windows within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    first = extended()
    assert first and len(first) < len(names)
    result = subprocess.run([exe, *argv, "--windows", "*=3"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ran 0, skipped {len(first)} (already done), extended {len(names) - len(first)}" in result.stdout
    for name in names:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["results"]["nsvd_ptb"]["n_windows,none"] == 3
        assert len(data["nsvd_sweep"]["extensions"]) == 1  # no file got its windows twice
    assert not list(out.glob(".*.tmp"))


def test_a_budget_takes_the_cheapest_open_cells_first():
    def cell(task, n, wanted, files):
        return adaptive.Cell(0.3, "nsvd-i", task, "asvd-i", 0.0, -9.0, 9.0, n, 100, 1, 9.0, "open", wanted, files)

    cheap = cell("nsvd_ptb", 8, 12, ("a", "b"))  # 2 files x (4 windows x 5.4 s + 50 s) = 143.2 s
    dear = cell("nsvd_cmrc", 8, 60, ("a", "b"))  # 2 x (52 x 5.4 + 50) = 661.6 s
    assert adaptive.cell_cost(cheap) == pytest.approx(2 * (4 * adaptive.WINDOW_SECONDS + adaptive.COMPRESS_SECONDS))
    assert adaptive.affordable([dear, cheap], None) == [dear, cheap]
    assert adaptive.affordable([dear, cheap], 700.0) == [cheap]  # both would cost 804.8 s
    assert adaptive.affordable([dear, cheap], 100.0) == []
    assert requests_for(adaptive.affordable([dear, cheap], 900.0)) == {
        "a": {"nsvd_ptb": 12, "nsvd_cmrc": 60},
        "b": {"nsvd_ptb": 12, "nsvd_cmrc": 60},
    }


def test_the_protocol_estimate_plans_what_the_sweep_itself_would_run(sweep_inputs, tmp_path, monkeypatch):
    """bench/protocol_estimate.py reads sweep command lines; its plan must be the sweep's own --dry-run."""
    import importlib.util
    import shlex
    from pathlib import Path

    from nsvd_lm.experiments.sweep import run_sweep

    spec = importlib.util.spec_from_file_location(
        "protocol_estimate", Path(__file__).resolve().parents[1] / "bench" / "protocol_estimate.py"
    )
    estimate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(estimate)
    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(sweep_inputs["data"]))
    settings = _settings(sweep_inputs, tmp_path)
    summary = run_sweep(
        str(sweep_inputs["model"]),
        ["asvd-i", "nsvd-i"],
        [0.3, 0.4],
        output_dir=tmp_path / "plan",
        include_original=True,
        seeds=[3, 4],
        windows={"nsvd_ptb": 3, "*": 50},
        dry_run=True,
        **settings,
    )
    sizes = {"nsvd_ptb": 13, "nsvd_wikitext2": 14}  # windows of the fixture sets at max_length 64
    argv = shlex.split(
        "nsvd-lm sweep --model M --output O --methods asvd-i,nsvd-i --ratios 0.3,0.4 --seeds 3,4 --include-original "
        "--windows 'nsvd_ptb=3,*=50' --model-args dtype=float32,max_length=64"
    )
    jobs = estimate.sweep_jobs(argv, sizes)
    assert {j["name"]: j["windows"] for j in jobs} == {
        name: sum(job["windows"].values()) for name, job in summary.planned.items()
    }
    assert [j["name"] for j in jobs if j["method"] is None] == ["original"]
