"""``lm_eval --model nsvd-onnx``: registered like ``nsvd``, run through the real ``lm_eval`` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from eval_data import REPO  # noqa: E402
from lmeval_helpers import offline_env, write_wiki_ptb_data_dir  # noqa: E402
from onnx_models import compressed_tiny_model, tokenizer  # noqa: E402

BIN = Path(sys.executable).parent


def test_entry_points_are_the_hook_models():
    """pyproject's lm_eval.models entry points (newer lm-eval) name what the .pth hook registers (0.4.13)."""
    from nsvd_lm.lmeval.hook import MODELS

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["lm_eval.models"] == MODELS
    assert set(MODELS) == {"nsvd", "nsvd-onnx"}


@pytest.fixture(scope="module")
def checkpoint_and_export(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny nsvd-i 0.4 checkpoint and its fp32 ONNX export (``nsvd-lm export``, the user path)."""
    from nsvd_lm.checkpoint import save_compressed
    from nsvd_lm.cli import main

    root = tmp_path_factory.mktemp("nsvd_onnx")
    checkpoint = save_compressed(compressed_tiny_model("llama", "nsvd-i"), root / "ckpt", tokenizer=tokenizer())
    assert main(["export", "--model", str(checkpoint), "--out", str(root / "onnx")]) == 0
    return checkpoint, root / "onnx"


def _lm_eval(model: str, model_args: str, out: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [str(BIN / "lm_eval"), "--model", model, "--model_args", model_args, "--tasks", "nsvd_wikitext2"]
    command += ["--limit", "2", "--device", "cpu", "--output_path", str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_lm_eval_cli_runs_nsvd_onnx_like_nsvd(checkpoint_and_export, tmp_path):
    checkpoint, onnx_dir = checkpoint_and_export
    env = offline_env(NSVD_LM_DATA_DIR=str(write_wiki_ptb_data_dir(tmp_path / "data")))
    procs = {
        "nsvd-onnx": _lm_eval("nsvd-onnx", f"pretrained={onnx_dir},max_length=64", tmp_path / "onnx", env),
        "nsvd": _lm_eval("nsvd", f"pretrained={checkpoint},max_length=64,dtype=float32", tmp_path / "nsvd", env),
    }
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    results = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"lm_eval --model {name} failed:\n{logs[name][-4000:]}"
        (path,) = sorted((tmp_path / ("onnx" if name == "nsvd-onnx" else "nsvd")).rglob("results_*.json"))
        results[name] = json.loads(path.read_text())
    assert results["nsvd-onnx"]["config"]["model"] == "nsvd-onnx"
    onnx_row, torch_row = (results[name]["results"]["nsvd_wikitext2"] for name in ("nsvd-onnx", "nsvd"))
    assert onnx_row["n_windows,none"] == torch_row["n_windows,none"] == 2
    onnx_ppl, torch_ppl = onnx_row["token_perplexity,none"], torch_row["token_perplexity,none"]
    print(
        f"nsvd_wikitext2 token_perplexity onnx {onnx_ppl!r} torch {torch_ppl!r} rel {abs(onnx_ppl / torch_ppl - 1):.2e}"
    )
    # fp32 export: logits agree with PyTorch to ~1e-5 (tests/test_export.py), perplexity far closer than 1e-4.
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-4)
