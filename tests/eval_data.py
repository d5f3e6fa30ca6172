"""Fixtures for the evaluation-data, perplexity and lm-eval task tests.

* ``write_fixture_data_dir(root)``: a small data dir shaped exactly like the shared data folder
  (same folder and file names, same formats: CRLF TSV for MCTest, SQuAD JSON for CMRC, ...),
  written from in-memory records; it returns the text each set must form, computed from those
  records (not by parsing the files back).
* the pytest fixtures built from them (``tiny_model_dir``, ``fixture_data``, ``fixture_data_dir``)
  live in conftest.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tasks"
# CI layout: the shared data sits beside the repository (../shared/data).
SHARED_DATA = REPO.parent / "shared" / "data"

EIGHT = ("wikitext2", "ptb", "c4", "snips", "alpaca_eval", "mctest", "cmrc", "alpaca_eval_ja")
TINY_MAX_POSITIONS = 256

_WORDS = (
    "the river carries sediment from distant mountains toward a quiet delta where farmers plant rice "
    "and children watch herons while old boats drift past stone bridges under a pale morning sky "
    "engineers measure water levels every season and record them in thick notebooks"
).split()
_HANZI = "基于游戏开发与发行中国大陆运营这是时隔年再次授予的代理权我们在城市里看到了很多新的建筑和公园"
_KANA = "時間管理能力を向上させるにはどうしたらいいですか目標を明確にすることで有効に使えるようになります"


def _sentence(rng: random.Random, n_min: int = 6, n_max: int = 14) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(n_min, n_max)))


def _cjk(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n)) + "。"


def write_fixture_data_dir(root: Path, seed: int = 0, c4_docs: int = 1200) -> dict[str, str]:
    """Write all eight sets under ``root``; return {name: expected perplexity text}."""
    rng = random.Random(seed)
    expected: dict[str, str] = {}

    # wikitext2: raw lines incl. " \n" blank lines and headings; test + valid.
    for filename, n_articles in (("wiki.test.raw", 6), ("wiki.valid.raw", 3)):
        lines = [" \n"]
        for a in range(n_articles):
            lines += [f" = Article {a} = \n", " \n"]
            lines += [f" {_sentence(rng, 20, 40)} . \n" for _ in range(4)] + [" \n"]
        _write(root / "wikitext2" / filename, "".join(lines))
        if filename == "wiki.test.raw":
            expected["wikitext2"] = "\n\n".join(line if line.strip() else "" for line in lines)

    # ptb: one lower-cased sentence per line, each starting with a space.
    for filename in ("ptb.test.txt", "ptb.valid.txt"):
        sentences = [_sentence(rng) + " <unk> N" for _ in range(60)]
        _write(root / "ptb" / filename, "".join(f" {s} \n" for s in sentences))
        if filename == "ptb.test.txt":
            expected["ptb"] = "\n\n".join(sentences)

    # c4: JSON lines {"text": ...}; more than 1100 docs so the protocol's doc cap matters.
    for filename in ("c4_validation_head.jsonl", "c4_train_head.jsonl"):
        docs = [_sentence(rng, 10, 20).capitalize() + ".\nSecond line." for _ in range(c4_docs)]
        _write(root / "c4" / filename, "".join(json.dumps({"text": d}) + "\n" for d in docs))
        if filename == "c4_validation_head.jsonl":
            expected["c4"] = " ".join(docs[:1100])

    # snips: Goo et al. test (seq.in, trailing spaces) + Sonos validate JSON per intent.
    utterances = [_sentence(rng, 4, 10) for _ in range(80)]
    _write(root / "snips" / "slotgated_test" / "seq.in", "".join(u + "  \n" for u in utterances))
    _write(root / "snips" / "slotgated_test" / "label", "".join("PlayMusic\n" for _ in utterances))
    expected["snips"] = "\n\n".join(utterances)
    from nsvd_lm.experiments.evaldata import SNIPS_INTENTS

    for intent in SNIPS_INTENTS:
        items = [{"data": [{"text": "Play "}, {"text": "jazz", "entity": "genre"}, {"text": " now"}]}]
        _write(root / "snips" / f"validate_{intent}.json", json.dumps({intent: items}, indent=2))

    # alpaca_eval: JSON list of {dataset, instruction, output, generator}.
    records = [
        {
            "dataset": "vicuna",
            "instruction": _sentence(rng) + "?",
            "output": _sentence(rng, 20, 50) + ".",
            "generator": "text_davinci_003",
        }
        for _ in range(40)
    ]
    _write(root / "alpaca_eval" / "model_outputs.json", json.dumps(records, indent=2))
    expected["alpaca_eval"] = "\n\n".join(f"{r['instruction']}\n\n{r['output']}" for r in records)

    # mctest: CRLF, 23 tab-separated fields, stories with escaped paragraph breaks.
    stories = []
    for filename, n in (("mc160.test.tsv", 4), ("mc500.test.tsv", 5)):
        lines = []
        for i in range(n):
            story = f"{_sentence(rng, 30, 60)}.\\newline{_sentence(rng, 30, 60)}.\\tabEnd."
            stories.append(story.replace("\\newline", "\n").replace("\\tab", "\t"))
            questions = ["one: Who?", "a", "b", "c", "d"] * 4
            lines.append("\t".join([f"{filename[:5]}.test.{i}", "Author: 1;Work Time(s): 1", story, *questions]))
        _write(root / "mctest" / filename, "".join(line + "\r\n" for line in lines))
    expected["mctest"] = "\n\n".join(stories)

    # cmrc2018: SQuAD-style JSON, Chinese contexts.
    for filename, n in (("cmrc2018_trial.json", 12), ("cmrc2018_dev.json", 4)):
        contexts = [_cjk(rng, _HANZI, 120) for _ in range(n)]
        data = {
            "version": "v1.0",
            "data": [
                {
                    "paragraphs": [
                        {
                            "id": f"T_{i}",
                            "context": c,
                            "qas": [
                                {"question": "什么？", "id": f"Q_{i}", "answers": [{"text": c[:2], "answer_start": 0}]}
                            ],
                        }
                    ],
                    "id": f"A_{i}",
                    "title": "标题",
                }
                for i, c in enumerate(contexts)
            ],
        }
        _write(root / "cmrc2018" / filename, json.dumps(data, ensure_ascii=False, indent=2))
        if filename == "cmrc2018_trial.json":
            expected["cmrc"] = "\n\n".join(contexts)

    # ja_vicuna_qa: questions and answers joined by question_id (answers listed in another order).
    questions = [(qid, _cjk(rng, _KANA, 30)) for qid in range(1, 21)]
    answers = {qid: _cjk(rng, _KANA, 150) for qid, _ in questions}
    bench = root / "ja_vicuna_qa" / "jp_bench"
    _write(
        bench / "question.jsonl",
        "".join(
            json.dumps({"question_id": qid, "category": "generic", "turns": [q]}, ensure_ascii=False) + "\n"
            for qid, q in questions
        ),
    )
    _write(
        bench / "model_answer" / "openai--text-davinci-003" / "results.jsonl",
        "".join(
            json.dumps(
                {
                    "question_id": qid,
                    "answer_id": f"a{qid}",
                    "model_id": "openai--text-davinci-003",
                    "choices": [{"index": 0, "turns": ["\n\n" + answers[qid] + "\n"]}],
                },
                ensure_ascii=False,
            )
            + "\n"
            for qid, _ in reversed(questions)
        ),
    )
    expected["alpaca_eval_ja"] = "\n\n".join(f"{q}\n\n{answers[qid]}" for qid, q in questions)
    return expected


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:  # keep CRLF where written
        handle.write(text)


def shared_data_or_skip() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not present at {SHARED_DATA}")
    return SHARED_DATA
