"""The paper's eight perplexity texts, formed exactly one way from local files or the Hub.

Pure data code: no tokenizer, no torch, no lm-eval. ``load_eval_text(name)`` returns the one
string a perplexity evaluation tokenizes; ``nsvd_lm.experiments.ppl`` and the lm-eval tasks in
``nsvd_lm.tasks`` both start from it, so the two paths score the same text.

Where the text comes from (first that applies):

1. ``data_dir`` argument,
2. environment variable ``NSVD_LM_DATA_DIR``,
3. the Hugging Face Hub (``datasets.load_dataset``; parquet/json/csv only, no loading scripts).

A local data dir has one folder per set, files named as in the project's shared data folder
(``wikitext2/wiki.test.raw``, ``ptb/ptb.test.txt``, ``c4/c4_validation_head.jsonl``, ...).
docs/tasks.md has the per-set table; ``SPECS[name]`` holds the same facts in code.

Protocol (SVD-LLM, which the paper follows): the evaluation split's documents joined with
"\\n\\n"; split = test, else validation/dev, else the only one there is. C4 (GPTQ/SparseGPT
convention, as the issue asks): the first 1100 validation documents joined by " ", and at most
256 windows are scored (``EvalText.max_windows``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsvd_lm.datadir import DATA_DIR_ENV, resolve_data_dir, wikitext_rows

logger = logging.getLogger(__name__)

# C4, GPTQ/SparseGPT convention: the first 1100 validation documents, at most 256 windows.
C4_MAX_DOCUMENTS = 1100
C4_MAX_WINDOWS = 256


@dataclass(frozen=True)
class EvalText:
    """One perplexity text, with enough provenance to say exactly what was scored."""

    name: str  # registry name, e.g. "wikitext2"
    text: str  # the stream to tokenize once
    source: str  # local file path(s) or "hf:<repo id>..." description
    split: str  # split name as the source calls it ("test", "validation", "eval", ...)
    label: str  # human-readable name; says "substitute" when it is one
    notes: str = ""  # deviations from the paper's data (partial files, substitutes)
    documents: tuple[str, ...] = field(default=(), repr=False)  # records before joining
    separator: str = "\n\n"
    origin: str = "local"  # "local" or "hub"
    substitute: bool = False  # True when this is not the paper's data set
    max_windows: int | None = None  # protocol cap on scored windows (C4: 256), None = all

    @property
    def texts(self) -> tuple[str, ...]:
        """Alias of ``documents`` (the records joined into ``text``)."""
        return self.documents

    def describe(self) -> dict[str, Any]:
        """Provenance without the text itself (for results files and logs)."""
        return {
            "name": self.name,
            "label": self.label,
            "split": self.split,
            "source": self.source,
            "origin": self.origin,
            "substitute": self.substitute,
            "notes": self.notes,
            "n_documents": len(self.documents),
            "n_chars": len(self.text),
            "separator": self.separator,
            "protocol_max_windows": self.max_windows,
        }


# --------------------------------------------------------------------------- local readers
# Each reader takes the set's folder and returns (documents, files read, notes).

LocalReader = Callable[[Path], tuple[list[str], list[Path], str]]
HubReader = Callable[[], tuple[list[str], str, str]]  # (documents, source, hub split name)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing data file: {path}")
    return path


def _read_text(path: Path) -> str:
    # newline="" keeps the bytes' line endings: the recipes below say what to strip.
    with open(_require(path), encoding="utf-8", newline="") as handle:
        return handle.read()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]


def _wikitext_local(filename: str) -> LocalReader:
    def read(folder: Path) -> tuple[list[str], list[Path], str]:
        path = folder / filename
        return wikitext_rows(_read_text(path)), [path], ""

    return read


def _ptb_local(filename: str) -> LocalReader:
    def read(folder: Path) -> tuple[list[str], list[Path], str]:
        path = folder / filename
        # HF ptb_text_only rows: sentence = line.strip().
        return [line.strip() for line in _read_text(path).splitlines()], [path], ""

    return read


def _c4_local(filename: str) -> LocalReader:
    def read(folder: Path) -> tuple[list[str], list[Path], str]:
        path = folder / filename
        records = _read_jsonl(path)
        documents = [record["text"] for record in records[:C4_MAX_DOCUMENTS]]
        notes = ""
        if len(documents) < C4_MAX_DOCUMENTS:
            notes = (
                f"only {len(documents)} of the protocol's first {C4_MAX_DOCUMENTS} documents are in "
                f"{path.name} (head of the shard); not bit-comparable with the paper"
            )
        return documents, [path], notes

    return read


def _snips_goo_test(folder: Path) -> tuple[list[str], list[Path], str]:
    path = folder / "slotgated_test" / "seq.in"
    # One utterance per line (lower-cased, punctuation stripped by Goo et al.); trailing spaces dropped.
    documents = [line.strip() for line in _read_text(path).splitlines()]
    return documents, [path], "Goo et al. (2018) SNIPS test split, 700 utterances"


SNIPS_INTENTS = (
    "AddToPlaylist",
    "BookRestaurant",
    "GetWeather",
    "PlayMusic",
    "RateBook",
    "SearchCreativeWork",
    "SearchScreeningEvent",
)


def _snips_sonos_validate(folder: Path) -> tuple[list[str], list[Path], str]:
    documents: list[str] = []
    paths: list[Path] = []
    for intent in SNIPS_INTENTS:  # alphabetical = file order of the benchmark
        path = folder / f"validate_{intent}.json"
        data = json.loads(_read_text(path))
        paths.append(path)
        for item in data[intent]:
            documents.append("".join(chunk["text"] for chunk in item["data"]))
    return documents, paths, "Sonos 2017 custom-intent validate files (natural casing)"


def _alpaca_document(instruction: str, output: str) -> str:
    return f"{instruction}\n\n{output}"


def _alpaca_eval_local(folder: Path) -> tuple[list[str], list[Path], str]:
    path = folder / "model_outputs.json"
    records = json.loads(_read_text(path))
    documents = [_alpaca_document(r["instruction"], r["output"]) for r in records]
    return documents, [path], "instruction + text-davinci-003 reference output"


def _mctest_story(fields: list[str]) -> str:
    # Authors' paragraph breaks are escaped in the TSV.
    return fields[2].replace("\\newline", "\n").replace("\\tab", "\t")


def _mctest_local(folder: Path) -> tuple[list[str], list[Path], str]:
    documents: list[str] = []
    paths = [folder / "mc160.test.tsv", folder / "mc500.test.tsv"]
    for path in paths:
        for line in _read_text(path).split("\n"):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 3:
                raise ValueError(f"{path}: expected tab-separated MCTest lines (id, properties, story, ...)")
            documents.append(_mctest_story(fields))
    return documents, paths, "MC160 test + MC500 test stories (questions not included)"


def _cmrc_local(filename: str) -> LocalReader:
    def read(folder: Path) -> tuple[list[str], list[Path], str]:
        path = folder / filename
        data = json.loads(_read_text(path))
        documents = [p["context"] for article in data["data"] for p in article["paragraphs"]]
        return documents, [path], ""

    return read


def _ja_vicuna_local(folder: Path) -> tuple[list[str], list[Path], str]:
    questions_path = folder / "jp_bench" / "question.jsonl"
    answers_path = folder / "jp_bench" / "model_answer" / "openai--text-davinci-003" / "results.jsonl"
    questions = _read_jsonl(questions_path)
    answers = {r["question_id"]: r["choices"][0]["turns"][0] for r in _read_jsonl(answers_path)}
    documents = []
    for q in questions:
        if q["question_id"] not in answers:
            raise ValueError(f"{answers_path}: no answer for question_id {q['question_id']}")
        documents.append(_alpaca_document(q["turns"][0], answers[q["question_id"]].strip()))
    notes = (
        "SUBSTITUTE for AlpacaEval-JA: Japanese Vicuna QA (80 questions + text-davinci-003 answers); "
        "not comparable with the paper's AlpacaEval-JA numbers"
    )
    return documents, [questions_path, answers_path], notes


# --------------------------------------------------------------------------- hub readers
# Ids chosen to load without dataset scripts (datasets>=4). Script-only repos are read from
# the parquet files the Hub's converter publishes under the refs/convert/parquet revision.

HF = "https://huggingface.co/datasets"


def _parquet_url(repo: str, path: str) -> str:
    return f"{HF}/{repo}/resolve/refs%2Fconvert%2Fparquet/{path}"


PARQUET_REVISION = "refs/convert/parquet"


def _load_hub(path: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset``; a repo that turns out to need a loading script is retried
    once from the Hub's parquet conversion (``revision="refs/convert/parquet"``)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise ImportError("loading evaluation data from the Hub needs `datasets`") from exc
    try:
        return datasets.load_dataset(path, *args, **kwargs)
    except Exception as exc:
        is_builder = path in ("json", "parquet", "csv", "text")
        if is_builder or "revision" in kwargs or "script" not in str(exc).lower():
            raise
        logger.warning("%s needs a loading script (%s); reading its parquet conversion instead", path, exc)
        return datasets.load_dataset(path, *args, revision=PARQUET_REVISION, **kwargs)


def _column(rows: Any, candidates: Sequence[str], where: str) -> list[str]:
    for name in candidates:
        if name in rows.column_names:
            return list(rows[name])
    raise ValueError(f"{where}: none of the columns {list(candidates)} found; columns are {rows.column_names}")


def _drop_consecutive_repeats(values: list[str]) -> list[str]:
    # QA sets on the Hub repeat the passage once per question; the files hold it once.
    out: list[str] = []
    for value in values:
        if not out or out[-1] != value:
            out.append(value)
    return out


def _wikitext_hub(split: str) -> HubReader:
    def read() -> tuple[list[str], str, str]:
        rows = _load_hub("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
        return list(rows["text"]), "hf:Salesforce/wikitext (wikitext-2-raw-v1)", split

    return read


def _ptb_hub(split: str) -> HubReader:
    def read() -> tuple[list[str], str, str]:
        # ptb_text_only is a script dataset: read the Hub's parquet conversion of it.
        url = _parquet_url("ptb-text-only/ptb_text_only", f"penn_treebank/{split}/0000.parquet")
        rows = _load_hub("parquet", data_files={split: url}, split=split)
        return [s.strip() for s in rows["sentence"]], "hf:ptb-text-only/ptb_text_only@refs/convert/parquet", split

    return read


def _c4_hub(split: str) -> HubReader:
    shard = {
        "validation": "en/c4-validation.00000-of-00008.json.gz",
        "train": "en/c4-train.00000-of-01024.json.gz",
    }[split]

    def read() -> tuple[list[str], str, str]:
        rows = _load_hub("allenai/c4", data_files={split: shard}, split=split)
        rows = rows.select(range(min(C4_MAX_DOCUMENTS, len(rows))))
        return list(rows["text"]), f"hf:allenai/c4 ({shard})", split

    return read


def _snips_hub() -> tuple[list[str], str, str]:
    # Goo et al. split as CSV (input,intent,slots): 13,084 train / 700 test.
    rows = _load_hub("bkonkle/snips-joint-intent", split="test")
    return (
        [s.strip() for s in _column(rows, ("input", "text", "utterance"), "bkonkle/snips-joint-intent")],
        ("hf:bkonkle/snips-joint-intent"),
        "test",
    )


def _alpaca_eval_hub() -> tuple[list[str], str, str]:
    # The repo's loader is a script; alpaca_eval.json is the default config's plain data file.
    url = f"{HF}/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json"
    rows = _load_hub("json", data_files={"eval": url}, split="eval")
    return (
        [_alpaca_document(i, o) for i, o in zip(rows["instruction"], rows["output"], strict=True)],
        ("hf:tatsu-lab/alpaca_eval (alpaca_eval.json)"),
        "eval",
    )


def _mctest_hub() -> tuple[list[str], str, str]:
    documents: list[str] = []
    for subset in ("mc160", "mc500"):
        url = _parquet_url("sagnikrayc/mctest", f"{subset}/test/0000.parquet")
        rows = _load_hub("parquet", data_files={"test": url}, split="test")
        stories = _drop_consecutive_repeats(list(rows["story"]))
        documents += [s.replace("\\newline", "\n").replace("\\tab", "\t") for s in stories]
    return documents, "hf:sagnikrayc/mctest@refs/convert/parquet (mc160+mc500 test)", "test"


def _cmrc_hub(split: str) -> HubReader:
    def read() -> tuple[list[str], str, str]:
        rows = _load_hub("hfl/cmrc2018", split=split)
        return _drop_consecutive_repeats(list(rows["context"])), "hf:hfl/cmrc2018", split

    return read


def _alpaca_eval_ja_hub() -> tuple[list[str], str, str]:
    rows = _load_hub("junsashihara/alpaca_eval_ja", split="train")  # its only split: the 805 eval rows
    where = "junsashihara/alpaca_eval_ja"
    instructions = _column(rows, ("instruction", "instruction_ja", "question"), where)
    outputs = _column(rows, ("output", "output_ja", "answer"), where)
    return [_alpaca_document(i, o) for i, o in zip(instructions, outputs, strict=True)], f"hf:{where}", "train"


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SplitSource:
    """How one split is read locally and from the Hub (either may be None = not available)."""

    local: LocalReader | None
    hub: HubReader | None
    local_files: tuple[str, ...] = ()  # relative to the set's folder, for docs and errors


@dataclass(frozen=True)
class EvalSetSpec:
    name: str
    label: str
    folder: str  # folder inside the data dir
    splits: dict[str, SplitSource]  # preference order: the first is the default split
    separator: str = "\n\n"
    max_windows: int | None = None
    hub_label: str | None = None  # label when read from the Hub, if different
    local_substitute: bool = False  # the local files are a stand-in, not the paper's set

    @property
    def default_split(self) -> str:
        return next(iter(self.splits))


SPECS: dict[str, EvalSetSpec] = {
    spec.name: spec
    for spec in [
        EvalSetSpec(
            "wikitext2",
            "WikiText-2 (raw)",
            "wikitext2",
            {
                "test": SplitSource(_wikitext_local("wiki.test.raw"), _wikitext_hub("test"), ("wiki.test.raw",)),
                "validation": SplitSource(
                    _wikitext_local("wiki.valid.raw"), _wikitext_hub("validation"), ("wiki.valid.raw",)
                ),
                "train": SplitSource(_wikitext_local("wiki.train.raw"), _wikitext_hub("train"), ("wiki.train.raw",)),
            },
        ),
        EvalSetSpec(
            "ptb",
            "Penn Treebank (Mikolov text)",
            "ptb",
            {
                "test": SplitSource(_ptb_local("ptb.test.txt"), _ptb_hub("test"), ("ptb.test.txt",)),
                "validation": SplitSource(_ptb_local("ptb.valid.txt"), _ptb_hub("validation"), ("ptb.valid.txt",)),
            },
        ),
        EvalSetSpec(
            "c4",
            "C4 (en)",
            "c4",
            {
                "validation": SplitSource(
                    _c4_local("c4_validation_head.jsonl"), _c4_hub("validation"), ("c4_validation_head.jsonl",)
                ),
                "train": SplitSource(_c4_local("c4_train_head.jsonl"), _c4_hub("train"), ("c4_train_head.jsonl",)),
            },
            separator=" ",
            max_windows=C4_MAX_WINDOWS,
        ),
        EvalSetSpec(
            "snips",
            "SNIPS (Goo et al. test split)",
            "snips",
            {
                "test": SplitSource(_snips_goo_test, _snips_hub, ("slotgated_test/seq.in",)),
                "validation": SplitSource(
                    _snips_sonos_validate, None, tuple(f"validate_{i}.json" for i in SNIPS_INTENTS)
                ),
            },
        ),
        EvalSetSpec(
            "alpaca_eval",
            "AlpacaEval",
            "alpaca_eval",
            {"eval": SplitSource(_alpaca_eval_local, _alpaca_eval_hub, ("model_outputs.json",))},
        ),
        EvalSetSpec(
            "mctest",
            "MCTest (MC160+MC500 test stories)",
            "mctest",
            {"test": SplitSource(_mctest_local, _mctest_hub, ("mc160.test.tsv", "mc500.test.tsv"))},
        ),
        EvalSetSpec(
            "cmrc",
            "CMRC 2018",
            "cmrc2018",
            {
                "test": SplitSource(_cmrc_local("cmrc2018_trial.json"), _cmrc_hub("test"), ("cmrc2018_trial.json",)),
                "validation": SplitSource(
                    _cmrc_local("cmrc2018_dev.json"), _cmrc_hub("validation"), ("cmrc2018_dev.json",)
                ),
            },
        ),
        EvalSetSpec(
            "alpaca_eval_ja",
            "AlpacaEval-JA substitute: Japanese Vicuna QA (ja_vicuna_qa substitute)",
            "ja_vicuna_qa",
            {
                "eval": SplitSource(
                    _ja_vicuna_local,
                    _alpaca_eval_ja_hub,
                    ("jp_bench/question.jsonl", "jp_bench/model_answer/openai--text-davinci-003/results.jsonl"),
                )
            },
            hub_label="AlpacaEval-JA (junsashihara/alpaca_eval_ja)",
            local_substitute=True,
        ),
    ]
}

DATASET_NAMES: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> EvalSetSpec:
    """The registry entry for ``name``; ValueError listing the allowed names otherwise."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    return SPECS[name]


def load_eval_text(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
) -> EvalText:
    """Form the perplexity text of dataset ``name`` (one of ``DATASET_NAMES``).

    ``split`` defaults to the protocol's choice (test, else validation, else the only split).
    Local files are read from ``data_dir`` (or ``$NSVD_LM_DATA_DIR``); without either, the
    Hub is used. A data dir that lacks the files is an error, never a silent Hub fallback.
    """
    spec = get_spec(name)
    split = spec.default_split if split is None else split
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; allowed: {', '.join(spec.splits)}")
    source = spec.splits[split]
    root = resolve_data_dir(data_dir)

    if root is not None:
        documents, source_desc, split_name, notes, origin = _read_local(spec, split, source, root)
        substitute = spec.local_substitute
        label = spec.label
    else:
        if source.hub is None:
            raise ValueError(
                f"dataset {name!r} split {split!r} exists only as local files "
                f"({', '.join(source.local_files)}); pass data_dir or set {DATA_DIR_ENV}"
            )
        documents, source_desc, split_name = source.hub()
        notes, origin, substitute = "", "hub", False
        label = spec.hub_label or spec.label

    text = spec.separator.join(documents)
    if not text.strip():
        raise ValueError(f"dataset {name!r} ({source_desc}, split {split_name!r}) has no text")
    return EvalText(
        name=name,
        text=text,
        source=source_desc,
        split=split_name,
        label=label,
        notes=notes,
        documents=tuple(documents),
        separator=spec.separator,
        origin=origin,
        substitute=substitute,
        max_windows=spec.max_windows,
    )


def _read_local(spec: EvalSetSpec, split: str, source: SplitSource, root: Path) -> tuple[list[str], str, str, str, str]:
    if not root.is_dir():
        raise FileNotFoundError(f"data dir not found: {root}")
    folder = root / spec.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"data dir {root} has no folder {spec.folder!r} for dataset {spec.name!r}: {folder}")
    if source.local is None:
        raise ValueError(f"dataset {spec.name!r} split {split!r} is only available from the Hub")
    documents, paths, notes = source.local(folder)
    return documents, ", ".join(str(p) for p in paths), split, notes, "local"
