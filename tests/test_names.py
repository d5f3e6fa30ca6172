"""Names in results and reports: models by name or hub id, paths relative to the data/home folder."""

from __future__ import annotations

from pathlib import Path

from nsvd_lm.names import localize, model_name, portable, portable_path, portable_text, project_root


def test_model_name_keeps_hub_ids_and_shortens_local_paths(tmp_path):
    assert model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_name("gpt2") == "gpt2"
    assert model_name("/root/.cache/nsvd_lm/models/SmolLM2-135M-Instruct/") == "SmolLM2-135M-Instruct"
    assert model_name("~/models/tiny") == "tiny"
    assert model_name("./ckpt") == "ckpt"
    folder = tmp_path / "org" / "local-model"
    folder.mkdir(parents=True)
    assert model_name(folder) == "local-model"


def test_portable_paths(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(data))
    assert portable_path(data / "wikitext2" / "wiki.valid.raw") == "$NSVD_LM_DATA_DIR/wikitext2/wiki.valid.raw"
    assert portable_path(Path.home() / ".cache" / "nsvd_lm" / "stats") == "~/.cache/nsvd_lm/stats"
    assert portable_path("relative/file.txt") == "relative/file.txt"
    assert portable_path("/elsewhere/run-7/cache") == "/elsewhere/run-7/cache"  # nothing finds it again anyway
    assert portable_path(project_root() / "tasks" / "nsvd_c4.yaml") == "tasks/nsvd_c4.yaml"
    assert portable_text(f"checkpoint {data}/c4/x.jsonl, hf://allenai/c4 at 3 tok/s") == (
        "checkpoint $NSVD_LM_DATA_DIR/c4/x.jsonl, hf://allenai/c4 at 3 tok/s"
    )


def test_portable_results_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(tmp_path))
    home_model = str(Path.home() / ".cache" / "nsvd_lm" / "models" / "SmolLM2-135M-Instruct")
    results = {
        "config": {
            "model": "nsvd",
            "model_args": {"pretrained": home_model, "ratio": 0.4, "cache_dir": "~/stats"},
            "compression": {"base_model": home_model, "ratio": 0.4, "seed": 3},
            "model_args_text": f"pretrained={home_model},ratio=0.4",
        },
        "configs": {"nsvd_ptb": {"metadata": {"pretrained": "HuggingFaceTB/SmolLM2-135M-Instruct"}}},
        "sources": [str(tmp_path / "ptb" / "ptb.test.txt")],
    }
    out = portable(results)
    assert out["config"]["model"] == "nsvd"
    assert out["config"]["model_args"] == {
        "pretrained": "~/.cache/nsvd_lm/models/SmolLM2-135M-Instruct",
        "ratio": 0.4,
        "cache_dir": "~/stats",
    }
    assert out["config"]["model_args_text"] == "pretrained=~/.cache/nsvd_lm/models/SmolLM2-135M-Instruct,ratio=0.4"
    assert out["config"]["compression"]["base_model"] == "~/.cache/nsvd_lm/models/SmolLM2-135M-Instruct"
    assert out["configs"]["nsvd_ptb"]["metadata"]["pretrained"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert out["sources"] == ["$NSVD_LM_DATA_DIR/ptb/ptb.test.txt"]
    back = localize(out)
    assert back["config"]["model_args"]["pretrained"] == home_model
    assert back["sources"] == results["sources"]
    assert model_name(out["config"]["model_args"]["pretrained"]) == "SmolLM2-135M-Instruct"
