"""The nsvd_* lm-eval tasks: loading, windows, metrics, and agreement with nsvd_lm.experiments.ppl."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_data import EIGHT, TASKS_DIR, TINY_MAX_POSITIONS, shared_data_or_skip  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

MAX_LENGTH = 64
METRICS = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def task_manager(**metadata):
    from lm_eval.tasks import TaskManager

    # Only our folder: scanning lm-eval's thousands of built-in YAMLs is slow and not needed.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def load_task(name: str, **metadata):
    return task_manager(**metadata).load([f"nsvd_{name}"])["tasks"][f"nsvd_{name}"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def evaluate(tiny_model_dir, tasks, limit=None, max_length=MAX_LENGTH, **metadata):
    import lm_eval

    model_args = {"pretrained": str(tiny_model_dir), "max_length": max_length, "dtype": "float32", "device": "cpu"}
    # What the lm_eval CLI does: model_args merged into the task metadata.
    manager = task_manager(**(model_args | metadata))
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        batch_size=4,
        bootstrap_iters=0,
    )


def test_tasks_and_group_are_indexed():
    manager = task_manager()
    assert {f"nsvd_{n}" for n in EIGHT} <= set(manager.all_subtasks)
    assert "nsvd_ppl" in manager.all_groups


@pytest.mark.parametrize("name", EIGHT)
def test_task_windows_from_fixture_data(name, fixture_data, tiny_model_dir, tokenizer):
    root, expected = fixture_data
    task = load_task(name, pretrained=str(tiny_model_dir), max_length=MAX_LENGTH, data_dir=str(root))
    docs = list(task.eval_docs)
    ids = tokenizer(expected[name])["input_ids"]  # the stream, tokenized independently
    n_full = min(len(ids) // MAX_LENGTH, 256 if name == "c4" else 10**9)
    assert len(docs) == n_full > 0
    assert all(d["n_windows_full"] == n_full and not d["capped"] for d in docs)
    assert docs[0]["substitute"] == (name == "alpaca_eval_ja")
    for k, doc in enumerate(docs):
        window = ids[k * MAX_LENGTH + 1 : (k + 1) * MAX_LENGTH]  # the tokens SVD-LLM scores
        assert doc["window_tokens"] <= MAX_LENGTH - 1
        if doc["window_tokens"] == MAX_LENGTH - 1:
            assert tokenizer.decode(window) == doc["text"]
        if doc["roundtrip_exact"]:
            assert tokenizer.encode(doc["text"]) == ids[k * MAX_LENGTH + 1 : k * MAX_LENGTH + 1 + len(window)] or (
                doc["window_tokens"] < MAX_LENGTH - 1  # boundary pieces of a split character dropped
            )
    assert sum(d["roundtrip_exact"] for d in docs) >= 0.8 * len(docs)


def test_group_runs_all_eight_with_limit(tiny_model_dir, fixture_data_dir):
    results = evaluate(tiny_model_dir, ["nsvd_ppl"], limit=2, data_dir=str(fixture_data_dir))
    for name in EIGHT:
        row = results["results"][f"nsvd_{name}"]
        for metric in METRICS:
            assert math.isfinite(row[f"{metric},none"]) and row[f"{metric},none"] > 0, (name, metric)
        assert row["n_windows,none"] == 2 < row["n_windows_full,none"]  # quick mode is visible
        assert results["n-samples"][f"nsvd_{name}"]["effective"] == 2
    assert results["config"]["limit"] == 2
    assert results["configs"]["nsvd_c4"]["metadata"]["data_dir"] == str(fixture_data_dir)


def independent_rolling_ppl(model, tokenizer, texts: list[str]) -> float:
    """What HFLM.loglikelihood_rolling computes for one-window docs, in a few lines."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(text)])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        total += logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum().item()
        count += ids.shape[1] - 1
    return math.exp(-total / count)


def test_token_perplexity_agrees_with_reference_path(tiny_model_dir, fixture_data_dir, model, tokenizer):
    from nsvd_lm.experiments.evaldata import load_eval_text
    from nsvd_lm.experiments.ppl import perplexity

    # Longer windows than elsewhere: the one differing context token weighs less.
    n, length = 6, 128
    results = evaluate(
        tiny_model_dir, ["nsvd_wikitext2"], max_windows=n, data_dir=str(fixture_data_dir), max_length=length
    )
    row = results["results"]["nsvd_wikitext2"]
    assert row["n_windows,none"] == n
    harness = row["token_perplexity,none"]

    # 1. lm-eval's number is what its documents say it is.
    docs = list(
        load_task(
            "wikitext2",
            pretrained=str(tiny_model_dir),
            max_length=length,
            data_dir=str(fixture_data_dir),
            max_windows=n,
        ).eval_docs
    )
    assert harness == pytest.approx(independent_rolling_ppl(model, tokenizer, [d["text"] for d in docs]), rel=1e-4)

    # 2. The exact reference path on the same text, and an independent computation of it.
    text = load_eval_text("wikitext2", data_dir=fixture_data_dir).text
    reference = perplexity(model, tokenizer, text, seqlen=length, max_windows=n, progress=False)
    ids = tokenizer(text)["input_ids"]
    total = 0.0
    for k in range(n):
        window = torch.tensor([ids[k * length : (k + 1) * length]])
        with torch.no_grad():
            logits = model(window).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    assert reference.ppl == pytest.approx(math.exp(total / (n * (length - 1))), rel=1e-5)

    # 3. Same scored tokens, only the first context token differs (prefix token vs. stream token).
    assert harness == pytest.approx(reference.ppl, rel=0.01)


# ------------------------------------------------------------------------------- bad input


def test_misspelt_metadata_key(tiny_model_dir, fixture_data_dir):
    with pytest.raises(ValueError, match="'max_window'.*did you mean 'max_windows'"):
        load_task(
            "ptb", pretrained=str(tiny_model_dir), max_length=MAX_LENGTH, data_dir=str(fixture_data_dir), max_window=3
        )


def test_max_length_larger_than_model(tiny_model_dir, fixture_data_dir):
    with pytest.raises(ValueError, match=f"max_length=2048 is larger than the model allows \\({TINY_MAX_POSITIONS}"):
        load_task("ptb", pretrained=str(tiny_model_dir), data_dir=str(fixture_data_dir))


def test_no_tokenizer_uses_the_default_model_and_bad_numbers(tiny_model_dir, fixture_data_dir):
    from nsvd_lm.smollm2 import smollm2_path

    # No pretrained=/tokenizer=: the default model's tokenizer, as `--model nsvd` without pretrained= uses.
    docs = list(load_task("ptb", data_dir=str(fixture_data_dir), max_length=MAX_LENGTH).eval_docs)
    assert docs and {d["tokenizer"] for d in docs} == {str(smollm2_path())}
    with pytest.raises(ValueError, match="max_windows=0 must be a positive integer"):
        load_task(
            "ptb", pretrained=str(tiny_model_dir), max_length=MAX_LENGTH, data_dir=str(fixture_data_dir), max_windows=0
        )


def test_missing_data_folder(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder 'wikitext2'"):
        load_task("wikitext2", pretrained=str(tiny_model_dir), max_length=MAX_LENGTH, data_dir=str(tmp_path))


# ------------------------------------------------------------------------------- shared data


@pytest.mark.parametrize("name", EIGHT)
def test_task_loads_from_shared_data(name, tiny_model_dir):
    root = shared_data_or_skip()
    task = load_task(
        name, pretrained=str(tiny_model_dir), max_length=TINY_MAX_POSITIONS, data_dir=str(root), max_windows=2
    )
    docs = list(task.eval_docs)
    assert len(docs) == 2 and docs[0]["n_windows_full"] > 2 and docs[0]["capped"]
    assert docs[0]["origin"] == "local" and docs[0]["text"].strip()


@pytest.mark.slow
def test_smollm2_agreement_at_2048(request):
    """Real model, paper's window length: lm-eval vs nsvd_lm.experiments.ppl (run with `-m slow`)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real-model check; run with -m slow")
    import lm_eval

    from nsvd_lm.experiments.ppl import dataset_perplexity
    from nsvd_lm.smollm2 import smollm2_path

    root = shared_data_or_skip()
    path = str(smollm2_path())
    model_args = {"pretrained": path, "dtype": "float32", "device": "cpu"}
    manager = task_manager(**model_args, data_dir=str(root), max_windows=2)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=["nsvd_wikitext2"],
        task_manager=manager,
        batch_size=1,
        bootstrap_iters=0,
    )
    harness = results["results"]["nsvd_wikitext2"]["token_perplexity,none"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference, _ = dataset_perplexity(
        model,
        AutoTokenizer.from_pretrained(path),
        "wikitext2",
        data_dir=root,
        max_windows=2,
        batch_size=1,
        progress=False,
    )
    assert harness == pytest.approx(reference.ppl, rel=0.01)


def test_api_client_windows_fit_what_the_client_scores():
    """lm-eval's API clients keep one token of max_length: with no max_length their windows are one shorter."""
    import inspect

    from lm_eval.models.api_models import TemplateAPI
    from nsvd_lm.tasks.utils import DEFAULT_MAX_LENGTH, _default_window_length

    client_default = inspect.signature(TemplateAPI.__init__).parameters["max_length"].default
    assert _default_window_length({"pretrained": "x"}) == DEFAULT_MAX_LENGTH
    assert _default_window_length({"model": "m", "base_url": "http://127.0.0.1:1/v1/completions"}) == client_default - 1
