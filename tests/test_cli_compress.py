"""``nsvd-lm compress`` end to end in a subprocess, and its bad-input errors."""

import json
import subprocess
import sys

import pytest
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("qwen2", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "nsvd_lm", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_compress_cli_writes_a_loadable_checkpoint(tiny_dir, calib_file, tmp_path):
    out = tmp_path / "out"
    result = _cli(
        "compress",
        "--model",
        tiny_dir,
        "--method",
        "nid-ii",
        "--ratio",
        "0.25",
        "--k1-frac",
        "0.8",
        "--calib-dataset",
        calib_file,
        "--calib-nsamples",
        3,
        "--calib-seqlen",
        24,
        "--cache-dir",
        tmp_path / "stats",
        "--out",
        out,
        "--report",
        tmp_path / "report.json",
    )
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "removed" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "nid-ii" and report["params_after"] < report["params_before"]
    from nsvd_lm import load_compressed
    from nsvd_lm.modules import LowRankLinear

    model = load_compressed(out)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 14
    assert model.nsvd_compression["k1_frac"] == 0.8

    # A non-empty --out is refused (no overwrite by accident).
    again = _cli("compress", "--model", tiny_dir, "--method", "svd", "--ratio", "0.5", "--out", out)
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nsvd-x"], "method='nsvd-x' is not known; allowed values: svd"),
        (["--ratio", "1.5"], "ratio=1.5 must lie in the open interval (0, 1)"),
        (["--k1-frac", "-0.1"], "k1_frac=-0.1 must lie in [0, 1]"),
        (["--calib-nsamples", "0"], "calib_nsamples=0 must be >= 1"),
        (["--dtype", "float8"], "dtype='float8'"),
    ],
)
def test_compress_cli_bad_input(tiny_dir, tmp_path, args, message):
    result = _cli("compress", "--model", tiny_dir, "--out", tmp_path / "o", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
