"""Shared fixtures for the lm-eval plugin tests: a tiny random Llama and a tiny rolling-PPL task.

Everything is built in code and saved to temp folders (no downloads). The tokenizer is
SmolLM2's (offline copy, see ``nsvd_lm.smollm2``), so the vocabulary is real and the model's
embedding matches ``len(tokenizer)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from eval_data import SHARED_DATA

# A few paragraphs of plain text (one document per line) for the fixture task and calibration.
FIXTURE_LINES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
    "Low-rank factorisation replaces a dense weight matrix by the product of two thin matrices.",
    "Calibration data tells the compressor which directions of the input space matter most.",
    "A language model assigns a probability to every token given the tokens that precede it.",
    "Perplexity is the exponential of the mean negative log-likelihood per predicted token.",
    "Rivers carry sediment from the mountains to the sea, building deltas over many centuries.",
]


def offline_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    if SHARED_DATA.is_dir():
        env.setdefault("NSVD_LM_DATA_DIR", str(SHARED_DATA))
    env.update(extra)
    return env


def write_text_corpus(folder: Path, repeats: int = 20) -> Path:
    """A text file long enough for a few calibration windows of 32 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.txt"
    path.write_text("\n".join(FIXTURE_LINES * repeats) + "\n", encoding="utf-8")
    return path


def write_wiki_ptb_data_dir(folder: Path, repeats: int = 8) -> Path:
    """A ``NSVD_LM_DATA_DIR`` with just WikiText-2 and PTB test files of ``FIXTURE_LINES`` (all eight sets:
    ``eval_data.write_fixture_data_dir``)."""
    (folder / "wikitext2").mkdir(parents=True, exist_ok=True)
    (folder / "ptb").mkdir(parents=True, exist_ok=True)
    wiki = []
    for i in range(repeats):
        wiki += [" = Section %d = \n" % i, " \n", *(f" {line} \n" for line in FIXTURE_LINES), " \n"]
    (folder / "wikitext2" / "wiki.test.raw").write_text("".join(wiki), encoding="utf-8")
    ptb = [line.lower().replace(".", "").replace(",", "") for line in FIXTURE_LINES] * repeats
    (folder / "ptb" / "ptb.test.txt").write_text("".join(f" {line} \n" for line in ptb), encoding="utf-8")
    return folder


def write_tiny_task(folder: Path, corpus: Path, name: str = "nsvdtest_rolling") -> Path:
    """A loglikelihood_rolling task over ``corpus`` (one doc per line) via the packaged "text" builder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            task: {name}
            dataset_path: text
            dataset_kwargs:
              data_files:
                test: {corpus}
            test_split: test
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{{{text}}}}"
            should_decontaminate: false
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
            metadata:
              version: 1.0
            """
        ),
        encoding="utf-8",
    )
    return path


def run_cli(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run a console command (``lm_eval``, ``nsvd-lm``) of this venv in a subprocess."""
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run(
        [str(exe), *args[1:]], env=env or offline_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
