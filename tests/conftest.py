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
    from tiny_models import smollm2_tokenizer

    return smollm2_tokenizer()


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
    """A 2-layer random Llama (untied head) with SmolLM2's tokenizer (tiny_models.build_tiny_model).

    Default init (std 0.02): near-uniform predictions, so window-edge effects stay small. With
    larger weights a random model's attention is chaotic and one changed context token moves the
    perplexity of a 64-token window by several percent.
    """
    from eval_data import TINY_MAX_POSITIONS
    from tiny_models import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_model(folder, max_positions=TINY_MAX_POSITIONS, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def fixture_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(data dir, {name: expected text}) shaped like the shared data folder."""
    from eval_data import write_fixture_data_dir

    root = tmp_path_factory.mktemp("eval_data")
    return root, write_fixture_data_dir(root)


@pytest.fixture(scope="session")
def fixture_data_dir(fixture_data: tuple[Path, dict[str, str]]) -> Path:
    return fixture_data[0]


# ----------------------------------------------------------------------------- sweeps and paired CIs


@pytest.fixture(scope="session")
def sweep_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama, a calibration corpus, a WikiText-2/PTB data folder and a stats cache folder."""
    from lmeval_helpers import write_text_corpus, write_wiki_ptb_data_dir
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("sweep_inputs")
    try:
        model = build_tiny_model(root / "model")
    except FileNotFoundError as exc:  # no offline SmolLM2 tokenizer
        pytest.skip(str(exc))
    return {
        "model": model,
        "corpus": write_text_corpus(root / "corpus"),
        "data": write_wiki_ptb_data_dir(root / "data"),
        "cache": root / "stats",
    }


@pytest.fixture(scope="session")
def paired_sweep(sweep_inputs, tmp_path_factory) -> dict[str, Path]:
    """A full (uncapped) sweep of the tiny model: original, svd/asvd-i/nsvd-i at 0.5 on WikiText-2 + PTB,
    plus a plain ``--model hf`` results file of the same base model made outside the sweep."""
    import json

    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from nsvd_lm.experiments.sweep import _task_manager, run_sweep

    root = tmp_path_factory.mktemp("paired_sweep")
    previous = os.environ.get("NSVD_LM_DATA_DIR")
    os.environ["NSVD_LM_DATA_DIR"] = str(sweep_inputs["data"])
    try:
        tasks = ["nsvd_wikitext2", "nsvd_ptb"]
        run_sweep(
            str(sweep_inputs["model"]),
            ["svd", "asvd-i", "nsvd-i"],
            [0.5],
            tasks,
            root / "sweep",
            include_original=True,
            device="cpu",
            calibration={
                "calib_dataset": str(sweep_inputs["corpus"]),
                "calib_nsamples": 4,
                "calib_seqlen": 32,
                "cache_dir": str(sweep_inputs["cache"]),
            },
            model_args={"max_length": 64, "dtype": "float32"},
        )
        model_args = {"pretrained": str(sweep_inputs["model"]), "max_length": 64, "dtype": "float32", "device": "cpu"}
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=tasks,
            task_manager=_task_manager(tasks, None, dict(model_args)),
            batch_size=4,
        )
    finally:
        if previous is None:
            os.environ.pop("NSVD_LM_DATA_DIR", None)
        else:
            os.environ["NSVD_LM_DATA_DIR"] = previous
    hf = root / "elsewhere" / "results_hf.json"
    hf.parent.mkdir()
    hf.write_text(json.dumps(results, default=handle_non_serializable))
    return {"sweep": root / "sweep", "hf": hf}


@pytest.fixture(scope="session")
def trained_tiny_lm(sweep_inputs):
    """(model, tokenizer, text): a 2-block Llama with a 400-token fixture BPE vocabulary, trained for 60
    AdamW steps on the fixture WikiText-2 text (~10 s), so that compressing it has something to break
    (a random model's perplexity is ~ the vocabulary size whatever is done to it)."""
    import torch
    from tiny_models import build_fixture_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_fixture_tokenizer("bpe")
    text = (sweep_inputs["data"] / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
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
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = ids.numel() // 64
    windows = ids[: n * 64].view(n, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        batch = windows[torch.randint(0, n, (8,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, text
