"""Several processes, one calibration: data-parallel ranks (gloo on CPU) and independent runs.

* Two ranks built exactly as ``accelerate launch -m lm_eval --model nsvd`` builds them (HFLM's
  Accelerator on a gloo process group, ``ACCELERATE_USE_CPU=1``): rank 0 calibrates, rank 1
  waits at the barrier and reads the cache, both end with bit-identical weights.
* Two unrelated processes racing on one cache folder: the file lock lets one calibrate while the
  other waits and then reads the cache.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from lmeval_helpers import offline_env, write_text_corpus
from tiny_models import build_tiny_model

RANK_WORKER = textwrap.dedent(
    """
    import json, sys
    import nsvd_lm.calibration as calibration
    calibration_runs = {"count": 0}
    _collect = calibration.collect_statistics
    def _counting(*args, **kwargs):  # counts real calibration forward passes in this process
        calibration_runs["count"] += 1
        return _collect(*args, **kwargs)
    calibration.collect_statistics = _counting
    from nsvd_lm.distributed import weights_digest
    from nsvd_lm.lmeval.adapter import NSVDLM

    model, corpus, cache, out = sys.argv[1:5]
    lm = NSVDLM(pretrained=model, method="asvd-ii", ratio=0.3, calib_dataset=corpus, calib_nsamples=8,
                calib_seqlen=32, cache_dir=cache, dtype="float32", device="cpu", progress=False)
    acc = lm.accelerator
    json.dump({"rank": acc.process_index, "world": acc.num_processes, "digest": weights_digest(lm.model),
               "calibration_runs": calibration_runs["count"], "info": lm.compression_info}, open(out, "w"))
    """
)

RACE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import nsvd_lm.calibration as calibration
    calibration_runs = {"count": 0}
    _collect = calibration.collect_statistics
    def _counting(*args, **kwargs):  # counts real calibration forward passes in this process
        calibration_runs["count"] += 1
        return _collect(*args, **kwargs)
    calibration.collect_statistics = _counting
    from nsvd_lm.compress import compress_model
    from nsvd_lm.config import parse_configs
    from nsvd_lm.distributed import Processes, weights_digest

    model_dir, corpus, cache, go, out = sys.argv[1:6]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config, calibration = parse_configs(method="nsvd-ii", ratio=0.3, calib_dataset=corpus, calib_nsamples=16,
                                        calib_seqlen=32, cache_dir=cache)
    open(out + ".ready", "w").close()
    while not os.path.exists(go):  # start the calibration together with the other process
        time.sleep(0.01)
    report = compress_model(model, tokenizer, config, calibration=calibration, processes=Processes.current(),
                            progress=False)
    json.dump({"digest": weights_digest(model), "calibration_runs": calibration_runs["count"],
               "cache_hit": report.stats_cache_hit}, open(out, "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiproc")
    try:
        model = build_tiny_model(root / "model")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return {"model": model, "corpus": write_text_corpus(root / "corpus")}


def _wait_all(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


def test_two_ranks_share_one_calibration_and_end_identical(tiny, tmp_path):
    port = _free_port()
    cache = tmp_path / "stats"
    procs = []
    for rank in range(2):
        env = offline_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            ACCELERATE_USE_CPU="1",
        )
        args = [
            sys.executable,
            "-c",
            RANK_WORKER,
            str(tiny["model"]),
            str(tiny["corpus"]),
            str(cache),
            str(tmp_path / f"rank{rank}.json"),
        ]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    _wait_all(procs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {2}
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert [r["calibration_runs"] for r in ranks] == [1, 0]  # exactly one calibration forward in total
    assert [r["info"]["stats_cache_hit"] for r in ranks] == [False, True]
    assert all(r["info"]["weights_broadcast_from_rank0"] for r in ranks)
    assert ranks[0]["info"]["params_after"] < ranks[0]["info"]["params_before"]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1  # one cache entry


def test_independent_processes_racing_on_one_cache_calibrate_once(tiny, tmp_path):
    cache, go = tmp_path / "stats", tmp_path / "go"
    procs = []
    for i in range(2):
        args = [
            sys.executable,
            "-c",
            RACE_WORKER,
            str(tiny["model"]),
            str(tiny["corpus"]),
            str(cache),
            str(go),
            str(tmp_path / f"p{i}.json"),
        ]
        procs.append(
            subprocess.Popen(args, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"p{i}.json.ready").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
        time.sleep(0.05)
    go.touch()
    _wait_all(procs)
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]

    assert sum(r["calibration_runs"] for r in results) == 1
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    assert results[0]["digest"] == results[1]["digest"]
