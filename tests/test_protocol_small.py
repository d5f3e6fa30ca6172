"""bench/protocol.sh end to end on the tiny model: killed mid-run, rerun, nothing recomputed, every output there."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _digests(sweeps: Path) -> dict[str, str]:
    out = {}
    for path in sorted(sweeps.rglob("*.json")):
        data = path.read_bytes()
        assert "results" in json.loads(data), f"{path} is not a complete results file"
        out[str(path.relative_to(sweeps))] = hashlib.sha256(data).hexdigest()
    return out


def test_protocol_killed_midway_resumes_and_renders_every_table(sweep_inputs, tmp_path):
    from lmeval_helpers import offline_env

    out = tmp_path / "protocol"
    env = offline_env(
        MODEL=str(sweep_inputs["model"]),
        NSVD_LM_DATA_DIR=str(sweep_inputs["data"]),
        OUT=str(out),
        CACHE=str(tmp_path / "stats"),
        TASKS="nsvd_wikitext2,nsvd_ptb",
        MAX_LENGTH="64",
        CALIB=str(sweep_inputs["corpus"]),
        CALIB_NSAMPLES="4",
        CALIB_SEQLEN="32",
        RATIOS="0.4",
        FIRST_WINDOWS="*=3",
        SCREEN_WINDOWS="*=2",
        SEED_RATIOS="0.4",
        TABLE34_RATIOS="0.4",
        K1_TABLE3="0.9",
        K1_TABLE4="0.9",
        ADAPT_RATIOS="0.4",
        ADAPT_WINDOW_S="0.3",
        ADAPT_COMPRESS_S="2",
        ADAPT_BUDGET_S="60",
        SIM_SEEDS="3",
        SIM_NSAMPLES="2",
        SIM_SEQLEN="32",
        SIM_DATASETS="wikitext2,ptb",
    )
    env.pop("ATEN_CPU_CAPABILITY", None)
    script = str(ROOT / "bench" / "protocol.sh")
    proc = subprocess.Popen(
        ["bash", script, "first"],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sweeps = out / "sweeps"
    try:
        deadline = time.monotonic() + 300
        while len([p for p in sweeps.rglob("*.json") if not p.name.startswith(".")]) < 4:
            assert proc.poll() is None, "the protocol ended before its fourth result"
            assert time.monotonic() < deadline, "fewer than four results after 300 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # both workers and every sweep they run
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _digests(sweeps)  # every file there is complete
    assert 4 <= len(before) < 20

    result = subprocess.run(["bash", script, "first"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    after = _digests(sweeps)
    assert {k: after[k] for k in before} == before  # finished cells were not recomputed
    expected = {
        "headline": [
            "original",
            "asvd-i_r0.4",
            "nsvd-i_r0.4",
            "asvd-i_r0.4_s4",
            "nsvd-i_r0.4_s4",
            "asvd-i_r0.4_s5",
            "nsvd-i_r0.4_s5",
        ],
        "fisher": [
            "asvd-i_r0.4",
            "nsvd-i_r0.4",
            "asvd-i_r0.4_s4",
            "nsvd-i_r0.4_s4",
            "asvd-i_r0.4_s5",
            "nsvd-i_r0.4_s5",
        ],
        "table3": ["nsvd-i_r0.4_k0.9"],
        "table4": ["nid-i_r0.4_k0.9", "nid-ii_r0.4_k0.9"],
        "reduced": ["asvd-ii_r0.4", "nsvd-ii_r0.4"],
        "collapse": ["svd_r0.4", "asvd-0_r0.4"],
    }
    assert set(after) == {f"{part}/{name}.json" for part, names in expected.items() for name in names}
    assert not list(sweeps.rglob(".*.tmp"))
    fisher = json.loads((sweeps / "fisher" / "nsvd-i_r0.4_s4.json").read_text())["config"]["compression"]
    assert fisher["rank_allocation"] == "fisher" and fisher["calibration"]["seed"] == 4

    result = subprocess.run(["bash", script, "all"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    stages = [line.split("\t") for line in (out / "logs" / "stages.tsv").read_text().splitlines()]
    names = {s[0] for s in stages}
    assert {"sweep headline", "sweep fisher", "adapt a", "adapt b", "tables", "similarity seed 3"} <= names
    assert all(s[2] == "0" for s in stages)  # the killed run logged nothing half-done
    wall = (out / "logs" / "wall.txt").read_text().splitlines()[-1]
    assert wall.startswith("protocol: ") and "s wall for all of it" in wall and wall.endswith("exit 0")
    for name in ("table1", "table3", "table4"):
        assert (out / f"{name}.md").is_file() and (out / f"{name}.csv").is_file()
    table1 = (out / "table1.md").read_text()
    assert "| nsvd-i [fisher] | nsvd-i |" in table1 and "| nsvd-i [fisher] | best ASVD [fisher] |" in table1
    table4 = (out / "table4.md").read_text()
    assert "| nid-i (k1=0.9) | nsvd-i (k1=0.9) |" in table4 and "| nid-ii (k1=0.9) | nsvd-i (k1=0.9) |" in table4
    for worker in ("a", "b"):
        report = json.loads((out / f"adaptive_{worker}.json").read_text())
        assert report["cells"] and all(
            c["status"] in ("decided", "narrow", "exhausted", "seed-limited", "open") for c in report["cells"]
        )
    assert (out / "similarity_s3").is_dir()
