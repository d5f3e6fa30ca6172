"""nsvd_lm.experiments.evaldata: the eight perplexity texts from a fixture data dir, the shared data, a faked Hub."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_data import EIGHT, shared_data_or_skip

from nsvd_lm.experiments import evaldata  # noqa: E402
from nsvd_lm.experiments.evaldata import DATA_DIR_ENV, DATASET_NAMES, load_eval_text  # noqa: E402


def test_registry_has_the_papers_eight_sets():
    assert DATASET_NAMES == EIGHT


@pytest.mark.parametrize("name", EIGHT)
def test_text_formed_from_fixture_files(name, fixture_data):
    root, expected = fixture_data
    eval_text = load_eval_text(name, data_dir=root)
    assert eval_text.text == expected[name]
    assert eval_text.origin == "local"
    assert eval_text.name == name
    assert eval_text.separator.join(eval_text.documents) == eval_text.text
    assert str(root) in eval_text.source


def test_protocol_details(fixture_data_dir):
    c4 = load_eval_text("c4", data_dir=fixture_data_dir)
    assert len(c4.documents) == 1100 and c4.separator == " " and c4.max_windows == 256
    assert load_eval_text("wikitext2", data_dir=fixture_data_dir).max_windows is None
    ja = load_eval_text("alpaca_eval_ja", data_dir=fixture_data_dir)
    assert ja.substitute and "substitute" in ja.label.lower() and "SUBSTITUTE" in ja.notes
    assert not load_eval_text("alpaca_eval", data_dir=fixture_data_dir).substitute
    mctest = load_eval_text("mctest", data_dir=fixture_data_dir)
    assert "\\newline" not in mctest.text and "\r" not in mctest.text and "\n" in mctest.documents[0]


def test_default_split_and_other_splits(fixture_data_dir):
    assert load_eval_text("wikitext2", data_dir=fixture_data_dir).split == "test"
    assert load_eval_text("c4", data_dir=fixture_data_dir).split == "validation"
    valid = load_eval_text("wikitext2", data_dir=fixture_data_dir, split="validation")
    assert valid.split == "validation" and valid.text != load_eval_text("wikitext2", data_dir=fixture_data_dir).text
    sonos = load_eval_text("snips", data_dir=fixture_data_dir, split="validation")
    assert sonos.documents[0] == "Play jazz now" and len(sonos.documents) == 7
    dev = load_eval_text("cmrc", data_dir=fixture_data_dir, split="validation")
    assert len(dev.documents) == 4


def test_env_var_and_explicit_dir(fixture_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(fixture_data_dir))
    assert load_eval_text("ptb").origin == "local"
    # An explicit data_dir wins over the environment.
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    assert load_eval_text("ptb", data_dir=fixture_data_dir).origin == "local"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_eval_text("ptb")


# ------------------------------------------------------------------------------- errors


def test_unknown_name_lists_the_allowed():
    with pytest.raises(ValueError, match="unknown dataset 'wiki2'.*wikitext2, ptb, c4"):
        load_eval_text("wiki2")


def test_unknown_split(fixture_data_dir):
    with pytest.raises(ValueError, match="no split 'dev'; allowed: test, validation"):
        load_eval_text("ptb", data_dir=fixture_data_dir, split="dev")


def test_missing_folder_and_file_are_named(fixture_data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data dir not found"):
        load_eval_text("ptb", data_dir=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no folder 'cmrc2018'"):
        load_eval_text("cmrc", data_dir=tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(fixture_data_dir / "mctest", partial / "mctest")
    (partial / "mctest" / "mc500.test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"mctest[/\\]mc500\.test\.tsv"):
        load_eval_text("mctest", data_dir=partial)
    with pytest.raises(FileNotFoundError, match="wiki.train.raw"):
        load_eval_text("wikitext2", data_dir=fixture_data_dir, split="train")


def test_empty_text_is_an_error(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" \n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="'ptb'.*has no text"):
        load_eval_text("ptb", data_dir=tmp_path)


def test_local_only_split_without_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match="only as local files"):
        load_eval_text("snips", split="validation")


# ------------------------------------------------------------------------------- hub (faked)


def test_hub_formation_with_a_fake_hub(monkeypatch):
    """No network here: fake datasets.load_dataset and check ids, fields and formation."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        where = " ".join(map(str, args)) + " " + str(kwargs.get("data_files", ""))
        if "cmrc2018" in where:
            return datasets.Dataset.from_dict({"context": ["甲", "甲", "乙"], "question": ["q1", "q2", "q3"]})
        if "mctest" in where:
            return datasets.Dataset.from_dict({"story": ["A\\newlineB", "A\\newlineB", "C"]})
        if "alpaca_eval_ja" in where:
            return datasets.Dataset.from_dict({"instruction": ["質問"], "output": ["答え"]})
        if "snips" in where:
            return datasets.Dataset.from_dict({"input": ["play jazz ", "book a table"], "intent": ["x", "y"]})
        raise AssertionError(f"unexpected hub call {args} {kwargs}")

    monkeypatch.setattr(evaldata, "_load_hub", fake_load)
    cmrc = load_eval_text("cmrc")
    assert cmrc.text == "甲\n\n乙" and cmrc.origin == "hub" and cmrc.source == "hf:hfl/cmrc2018"
    mctest = load_eval_text("mctest")
    assert mctest.documents == ("A\nB", "C", "A\nB", "C")  # mc160 then mc500, passages once each
    assert any("refs%2Fconvert%2Fparquet/mc160/test" in str(kw.get("data_files")) for _, kw in calls)
    ja = load_eval_text("alpaca_eval_ja")
    assert ja.text == "質問\n\n答え" and not ja.substitute and "junsashihara/alpaca_eval_ja" in ja.label
    assert load_eval_text("snips").text == "play jazz\n\nbook a table"


def test_hub_script_repo_falls_back_to_parquet_conversion(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append(kwargs.get("revision"))
        if kwargs.get("revision") != "refs/convert/parquet":
            raise RuntimeError("Dataset scripts are no longer supported, but found cmrc2018.py")
        return datasets.Dataset.from_dict({"context": ["甲", "乙"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_eval_text("cmrc").text == "甲\n\n乙"
    assert calls == [None, "refs/convert/parquet"]


# ------------------------------------------------------------------------------- shared data

# Record counts stated in each folder's SOURCE.md.
SHARED_COUNTS = {
    "wikitext2": 4358,
    "ptb": 3761,
    "c4": 1025,
    "snips": 700,
    "alpaca_eval": 805,
    "mctest": 60 + 150,
    "cmrc": 256,
    "alpaca_eval_ja": 80,
}


@pytest.mark.parametrize("name", EIGHT)
def test_shared_data(name):
    root = shared_data_or_skip()
    eval_text = load_eval_text(name, data_dir=root)
    assert len(eval_text.documents) == SHARED_COUNTS[name]
    assert eval_text.text.strip() and eval_text.origin == "local"
    if name == "wikitext2":
        assert eval_text.text.startswith("\n\n = Robert Boulter = \n")
    if name == "c4":
        assert eval_text.text.startswith("The woman who died after falling from a bridge over the A21")
        assert "1025" in eval_text.notes  # partial shard head, said so
    if name == "mctest":
        assert "\\newline" not in eval_text.text
    if name == "alpaca_eval_ja":
        assert eval_text.substitute
