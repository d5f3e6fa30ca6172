"""lm-eval's own API client against our server: ``lm_eval --model local-completions`` on
``nsvd-lm serve`` (a real server process) scores what ``lm_eval --model nsvd`` scores on the
same compressed checkpoint.

The chain is the user's: a tiny Llama compressed with nsvd-i, ``save_compressed``, ``nsvd-lm
export`` (fp32), ``nsvd-lm serve --port 0``, then the real ``lm_eval`` CLI twice — ``--model nsvd
--model_args pretrained=<checkpoint>`` and ``--model local-completions --model_args
base_url=.../v1/completions,tokenizer=<checkpoint>`` — on ``nsvd_wikitext2`` (fixture text) and a
multiple-choice loglikelihood task written from the fixture lines. Token perplexity and every
per-request log-likelihood agree within 1e-3 relative; the multiple-choice accuracies are equal.
The client sends token ids (its default); a second client run with ``tokenized_requests=False``
(text prompts the server tokenizes, the issue's command) is checked on ``nsvd_wikitext2``.

local-completions keeps one token of ``max_length`` for generation, so it is given one more than
the window length, and the window length itself goes to the task through ``--metadata``
(which lm-eval merges over ``model_args``) — the recipe docs/onnx.md shows.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("aiohttp")  # lm-eval[api]
pytest.importorskip("tenacity")

from lmeval_helpers import FIXTURE_LINES, offline_env, run_cli, write_wiki_ptb_data_dir  # noqa: E402

WINDOW = 64  # nsvd_wikitext2 window (tokens); the tiny model's context is 256
MODEL_NAME = "tiny-nsvd"
MC_TASK = "nsvdtest_mc"
REL = 1e-3


def write_mc_task(folder: Path) -> Path:
    """A multiple-choice loglikelihood task: each fixture line's first half, its own second half
    among three others'."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    n = len(FIXTURE_LINES)
    for i, line in enumerate(FIXTURE_LINES):
        words = line.split()
        cut = len(words) // 2
        wrong = [" ".join(FIXTURE_LINES[(i + k) % n].split()[cut:]) for k in (1, 2, 3)]
        label = i % 4
        endings = wrong[:label] + [" ".join(words[cut:])] + wrong[label:]
        rows.append({"context": " ".join(words[:cut]), "endings": endings, "label": label})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{MC_TASK}.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {MC_TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{context}}}}"
            doc_to_choice: "{{{{endings}}}}"
            doc_to_target: label
            metric_list:
              - metric: acc
              - metric: acc_norm
            metadata:
              version: 1.0
            """
        ),
        encoding="utf-8",
    )
    return folder


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from onnx_models import compressed_tiny_model, tokenizer

    from nsvd_lm.checkpoint import save_compressed

    root = tmp_path_factory.mktemp("lm_eval_api")
    checkpoint = root / "checkpoint"
    save_compressed(compressed_tiny_model("llama", "nsvd-i"), checkpoint, tokenizer=tokenizer())
    onnx_dir = root / "onnx"
    out = run_cli(["nsvd-lm", "export", "--model", str(checkpoint), "--out", str(onnx_dir), "--dtype", "float32"])
    assert out.returncode == 0, out.stderr[-3000:]
    return {
        "root": root,
        "checkpoint": checkpoint,
        "onnx": onnx_dir,
        "data": write_wiki_ptb_data_dir(root / "data"),
        "tasks": write_mc_task(root / "tasks"),
    }


class ServerProcess:
    """``nsvd-lm serve --port 0`` in a subprocess; the port is read from its banner."""

    def __init__(self, onnx_dir: Path, env: dict[str, str]) -> None:
        exe = Path(sys.executable).parent / "nsvd-lm"
        cmd = [str(exe), "serve", "--onnx", str(onnx_dir), "--port", "0", "--threads", "1"]
        cmd += ["--model-name", MODEL_NAME]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.banner = ""
        for line in self.proc.stdout:  # blocks until the banner (or the process ends)
            self.banner += line
            found = re.search(r"on http://([\d.]+):(\d+)", line)
            if found:
                self.url = f"http://{found.group(1)}:{found.group(2)}/v1/completions"
                return
        raise AssertionError(f"nsvd-lm serve did not start:\n{self.banner[-3000:]}")

    def close(self) -> str:
        self.proc.terminate()
        try:
            rest, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        return self.banner + (rest or "")


def _results(folder: Path, tasks: tuple[str, ...]) -> tuple[dict, dict[str, list[dict]]]:
    """(results JSON, {task: samples}) of one ``lm_eval --output_path folder --log_samples`` run."""
    results = sorted(folder.rglob("results_*.json"))
    assert results, f"no results JSON under {folder}"
    samples = {}
    for task in tasks:
        files = sorted(folder.rglob(f"samples_{task}_*.jsonl"))
        assert files, f"no samples of {task} under {folder}"
        samples[task] = [json.loads(line) for line in files[-1].read_text().splitlines()]
    return json.loads(results[-1].read_text()), samples


@pytest.fixture(scope="module")
def runs(chain):
    env = offline_env(NSVD_LM_DATA_DIR=str(chain["data"]))
    server = ServerProcess(chain["onnx"], env)
    common = ["--include_path", str(chain["tasks"]), "--log_samples"]
    both = ["--tasks", f"nsvd_wikitext2,{MC_TASK}"]
    nsvd = [
        "lm_eval",
        "--model",
        "nsvd",
        "--model_args",
        f"pretrained={chain['checkpoint']},max_length={WINDOW},dtype=float32",
        "--device",
        "cpu",
        "--output_path",
        str(chain["root"] / "out_nsvd"),
        *common,
        *both,
    ]

    def api(name: str, extra: str, tasks: list[str]) -> list[str]:
        model_args = f"model={MODEL_NAME},base_url={server.url},tokenizer={chain['checkpoint']},max_length={WINDOW + 1}"
        return [
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            model_args + extra,
            "--metadata",
            json.dumps({"max_length": WINDOW}),
            "--output_path",
            str(chain["root"] / name),
            *common,
            *tasks,
        ]

    commands = {
        "nsvd": nsvd,
        "api": api("out_api", "", both),  # token ids (lm-eval's default, tokenized_requests=True)
        # text prompts, as in the command: the server re-tokenizes lm-eval's decoded text
        "api_text": api("out_api_text", ",tokenized_requests=False", ["--tasks", "nsvd_wikitext2"]),
    }
    try:
        bindir = Path(sys.executable).parent
        procs = {
            name: subprocess.Popen(
                [str(bindir / cmd[0]), *cmd[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for name, cmd in commands.items()
        }
        logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    finally:
        server_log = server.close()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"lm_eval ({name}) failed:\n{logs[name][-4000:]}\nserver:\n{server_log[-2000:]}"
    return {
        "nsvd": _results(chain["root"] / "out_nsvd", ("nsvd_wikitext2", MC_TASK)),
        "api": _results(chain["root"] / "out_api", ("nsvd_wikitext2", MC_TASK)),
        "api_text": _results(chain["root"] / "out_api_text", ("nsvd_wikitext2",)),
        "logs": logs,
    }


def _metric(results: dict, task: str, name: str) -> float:
    return float(results["results"][task][f"{name},none"])


@pytest.mark.parametrize("client", ["api", "api_text"])
def test_token_perplexity_equals_nsvd(runs, client):
    nsvd, api = runs["nsvd"][0], runs[client][0]
    assert _metric(api, "nsvd_wikitext2", "n_windows") == _metric(nsvd, "nsvd_wikitext2", "n_windows") > 1
    for name in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        a, b = _metric(api, "nsvd_wikitext2", name), _metric(nsvd, "nsvd_wikitext2", name)
        assert math.isclose(a, b, rel_tol=REL), (name, a, b)


def _loglikelihoods(samples: list[dict]) -> dict[tuple[int, int], float]:
    out = {}
    for s in samples:
        for k, resp in enumerate(s["filtered_resps"]):
            out[(s["doc_id"], k)] = float(resp[0])
    return out


@pytest.mark.parametrize("client, task", [("api", "nsvd_wikitext2"), ("api", MC_TASK), ("api_text", "nsvd_wikitext2")])
def test_every_loglikelihood_equals_nsvd(runs, client, task):
    nsvd, api = _loglikelihoods(runs["nsvd"][1][task]), _loglikelihoods(runs[client][1][task])
    assert nsvd.keys() == api.keys() and len(nsvd) > 1
    worst = max(abs(api[k] - nsvd[k]) / abs(nsvd[k]) for k in nsvd)
    assert worst < REL, f"largest relative difference {worst:.2e}"


def test_multiple_choice_accuracy_equals_nsvd(runs):
    for name in ("acc", "acc_norm"):
        assert _metric(runs["api"][0], MC_TASK, name) == _metric(runs["nsvd"][0], MC_TASK, name)
