"""Test-suite wide settings (offline, the shared evaluation data beside the repository) and every fixture.

Plain builders (tiny models, fixture data folders, tokenizers) live in tiny_models.py, eval_data.py,
lmeval_helpers.py and onnx_models.py; the pytest fixtures made from them live here.
"""

import os
import random
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread: several tests start subprocesses (lm_eval CLI, servers, two ranks), and
# MKL's spinning OpenMP threads on an oversubscribed 2-core machine run 20-30x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if _SHARED.is_dir():
    os.environ.setdefault("NSVD_LM_DATA_DIR", str(_SHARED))


# ----------------------------------------------------------------------------- tokenizers of each kind


@pytest.fixture(scope="session", params=["bpe", "spm"])
def tokenizer_kind_model(request, tmp_path_factory):
    """(kind, folder): a 2-block random Llama saved with a fixture tokenizer of each kind."""
    import torch
    from tiny_models import build_fixture_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_fixture_tokenizer(request.param)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, folder


# ----------------------------------------------------------------------------- calibration forward passes


class CalibrationForwards:
    """How many real calibration forward passes ran (cache hits run none)."""

    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def calibration_forwards(monkeypatch) -> CalibrationForwards:
    """Counts calls of ``nsvd_lm.calibration.collect_statistics`` (the only place a calibration forward runs)."""
    from nsvd_lm import calibration

    counter = CalibrationForwards()
    collect = calibration.collect_statistics

    def counting(*args, **kwargs):
        counter.count += 1
        return collect(*args, **kwargs)

    monkeypatch.setattr(calibration, "collect_statistics", counting)
    return counter


# ----------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from nsvd_lm.smollm2 import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small local calibration text (the .txt path form of calib_dataset)."""
    from tiny_models import _WORDS

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(_WORDS) for _ in range(60)) for _ in range(40)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (eval_data.build_tiny_model)."""
    from eval_data import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(data dir, {name: expected text}) shaped like the shared data folder."""
    from eval_data import write_fixture_data_dir

    root = tmp_path_factory.mktemp("eval_data")
    return root, write_fixture_data_dir(root)


@pytest.fixture(scope="session")
def fixture_data_dir(fixture_data: tuple[Path, dict[str, str]]) -> Path:
    return fixture_data[0]
