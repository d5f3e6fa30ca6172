"""A compressed checkpoint opens with plain transformers (the custom code ``save_compressed`` puts in it).

* ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` in a process where nsvd_lm
  cannot even be imported gives the logits of ``load_compressed`` (Llama with tied embeddings,
  Qwen2 with biases, GPT-2's Conv1D); its ``save_pretrained`` writes a folder of the same kind.
* With nsvd-lm installed (its ``.pth`` hook imports ``nsvd_lm.lmeval.hook`` at interpreter start)
  loading imports no further nsvd_lm module.
* Without ``trust_remote_code`` it fails loudly, saying how to load it; folders written before
  ``auto_map`` existed still load with ``load_compressed`` and still fail loudly in plain transformers.
* ``transformers serve --trust-remote-code`` serves it (``openai`` client), and
  ``lm_eval --model hf ...,trust_remote_code=True`` scores it like ``--model nsvd``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lmeval_helpers import offline_env, write_text_corpus, write_wiki_ptb_data_dir
from tiny_models import tiny_model

from nsvd_lm.checkpoint import load_compressed, save_compressed
from nsvd_lm.compress import compress_model
from nsvd_lm.remote_code.configuration_nsvd_lm import CODE_FILES

ARCHS = ("llama", "qwen2", "gpt2")
BIN = Path(sys.executable).parent
# The nsvd_lm modules the installed .pth hook imports at every interpreter start (nsvd_lm/lmeval/hook.py).
HOOK_MODULES = {"nsvd_lm", "nsvd_lm.lmeval", "nsvd_lm.lmeval.hook"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict:
    """One nsvd-i 0.4 checkpoint per architecture, and reference logits of ``load_compressed``."""
    root = tmp_path_factory.mktemp("remote_code")
    corpus = write_text_corpus(root / "corpus")
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    folders = {}
    for arch in ARCHS:
        model = tiny_model(arch, len(tokenizer))
        compress_model(
            model,
            tokenizer,
            method="nsvd-i",
            ratio=0.4,
            calib_dataset=str(corpus),
            calib_nsamples=4,
            calib_seqlen=32,
            cache_dir=str(root / "stats"),
            progress=False,
        )
        folders[arch] = save_compressed(model, root / arch, tokenizer)
        with torch.no_grad():
            torch.save({"ids": ids, "logits": load_compressed(folders[arch])(ids).logits}, root / f"{arch}.pt")
    return {"root": root, "folders": folders, "ids": ids}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A private modules cache: transformers copies the custom code there.
    return offline_env(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), **extra)


LOAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from transformers import AutoModelForCausalLM

    isolated, root, out = sys.argv[1] == "isolated", sys.argv[2], sys.argv[3]
    if isolated:
        assert importlib.util.find_spec("nsvd_lm") is None, "nsvd_lm is importable"
    before = sorted(m for m in sys.modules if m.split(".")[0] == "nsvd_lm")
    report = {"nsvd_lm_modules_at_start": before}
    for arch in sys.argv[4:]:
        model = AutoModelForCausalLM.from_pretrained(f"{root}/{arch}", trust_remote_code=True)
        ref = torch.load(f"{root}/{arch}.pt")
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        entry = {
            "max_abs_diff": (logits - ref["logits"]).abs().max().item(),
            "classes": [c.__name__ for c in type(model).__mro__[:2]],
            "method": model.nsvd_compression["method"],
            "low_rank": sum(type(m).__name__ == "LowRankLinear" for m in model.modules()),
        }
        if isolated:  # save_pretrained of the loaded model writes a checkpoint of the same kind
            model.save_pretrained(f"{out}/resaved_{arch}")
            again = AutoModelForCausalLM.from_pretrained(f"{out}/resaved_{arch}", trust_remote_code=True)
            with torch.no_grad():
                entry["resaved_max_abs_diff"] = (again(ref["ids"]).logits - ref["logits"]).abs().max().item()
        report[arch] = entry
    report["nsvd_lm_modules_at_end"] = sorted(m for m in sys.modules if m.split(".")[0] == "nsvd_lm")
    json.dump(report, open(f"{out}/report.json", "w"))
    """
)


def _run_loader(mode: str, checkpoints: dict, tmp_path: Path) -> dict:
    out = tmp_path / mode
    out.mkdir()
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    if mode == "isolated":
        # -S: no site processing, so neither the editable-install finder nor the lm-eval hook's .pth
        # run; site-packages is put on sys.path by hand, so torch and transformers import but nsvd_lm
        # does not exist. cwd is a scratch folder (not the repository).
        purelib = sysconfig.get_paths()["purelib"]
        command = [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.append({purelib!r}); exec(open({str(script)!r}).read())",
        ]
    else:
        command = [sys.executable, str(script)]
    command += [mode, str(checkpoints["root"]), str(out), *ARCHS]
    proc = subprocess.run(command, cwd=out, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_plain_transformers_loads_the_checkpoint_without_nsvd_lm(checkpoints, tmp_path):
    report = _run_loader("isolated", checkpoints, tmp_path)
    assert report["nsvd_lm_modules_at_start"] == report["nsvd_lm_modules_at_end"] == []
    for arch in ARCHS:
        entry = report[arch]
        assert entry["max_abs_diff"] <= 1e-5, (arch, entry)
        assert entry["resaved_max_abs_diff"] <= 1e-5, (arch, entry)
        assert entry["method"] == "nsvd-i" and entry["low_rank"] > 0
        assert entry["classes"][0].startswith("NSVDLM") and entry["classes"][0].endswith(entry["classes"][1])
        resaved = json.loads((tmp_path / "isolated" / f"resaved_{arch}" / "config.json").read_text())
        assert resaved["model_type"] == "nsvd_lm" and resaved["base_model_type"] == arch
        assert resaved["auto_map"] and resaved["architectures"] is None
        assert resaved["base_architectures"] == entry["classes"][1:]
        assert all((tmp_path / "isolated" / f"resaved_{arch}" / name).is_file() for name in CODE_FILES)
        # And nsvd-lm reads the re-saved folder too.
        with torch.no_grad():
            reloaded = load_compressed(tmp_path / "isolated" / f"resaved_{arch}")(checkpoints["ids"]).logits
        ref = torch.load(checkpoints["root"] / f"{arch}.pt")["logits"]
        assert (reloaded - ref).abs().max().item() <= 1e-5


def test_installed_nsvd_lm_is_not_used_by_the_load(checkpoints, tmp_path):
    """With the package installed: only the light lm-eval hook is imported (at interpreter start)."""
    report = _run_loader("installed", checkpoints, tmp_path)
    assert set(report["nsvd_lm_modules_at_start"]) <= HOOK_MODULES
    assert report["nsvd_lm_modules_at_end"] == report["nsvd_lm_modules_at_start"]
    assert all(report[arch]["max_abs_diff"] <= 1e-5 for arch in ARCHS)


def test_custom_code_files_are_the_package_sources(checkpoints):
    """One source: the folder's code is byte-identical to nsvd_lm/remote_code/, which nsvd_lm runs."""
    import nsvd_lm.modules
    from nsvd_lm.remote_code import CODE_DIR, low_rank_linear

    folder = checkpoints["folders"]["llama"]
    for name in CODE_FILES:
        assert (folder / name).read_bytes() == (CODE_DIR / name).read_bytes()
        assert "nsvd_lm" not in [
            line.split()[1].split(".")[0]
            for line in (CODE_DIR / name).read_text().splitlines()
            if line.startswith(("import ", "from "))
        ]
    assert nsvd_lm.modules.LowRankLinear is low_rank_linear.LowRankLinear
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_nsvd_lm.NSVDLMConfig",
        "AutoModelForCausalLM": "modeling_nsvd_lm.NSVDLMForCausalLM",
    }
    # serve would load architectures[0] directly: null here, the base model's kept aside for nsvd-lm.
    assert config["architectures"] is None and config["base_architectures"] == ["LlamaForCausalLM"]
    from nsvd_lm.checkpoint import base_model_config

    assert base_model_config(folder).architectures == ["LlamaForCausalLM"]


def test_without_trust_remote_code_it_fails_loudly(checkpoints):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"(?s)contains custom code.*pass the argument `trust_remote_code=True`"):
        AutoModelForCausalLM.from_pretrained(checkpoints["folders"]["llama"])


def _old_style_copy(folder: Path, dest: Path) -> Path:
    """``folder`` as save_compressed wrote it before auto_map: no code files, the base architectures."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    del config["auto_map"]
    config["architectures"] = [config.pop("base_architectures")[0]]
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in CODE_FILES:
        (dest / name).unlink()
    return dest


def test_old_folders_keep_loading(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    old = _old_style_copy(checkpoints["folders"]["llama"], tmp_path / "old")
    with torch.no_grad():
        logits = load_compressed(old)(checkpoints["ids"]).logits
    assert torch.equal(logits, torch.load(checkpoints["root"] / "llama.pt")["logits"])
    with pytest.raises(ValueError, match="nsvd_lm"):
        AutoModelForCausalLM.from_pretrained(old)
    with pytest.raises(ValueError, match="nsvd_lm"):
        AutoModelForCausalLM.from_pretrained(old, trust_remote_code=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers_serve_serves_the_checkpoint(checkpoints, tmp_path, tokenizer):
    from openai import OpenAI

    folder = checkpoints["folders"]["llama"]
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [
            str(BIN / "transformers"),
            "serve",
            "--trust-remote-code",
            "--device",
            "cpu",
            "--port",
            str(port),
            str(folder),
        ],
        env=_env(tmp_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + 240
        while True:
            try:
                models = [m.id for m in client.models.list().data]
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "serve.log").read_text()[-4000:]) from None
                time.sleep(1)
        assert str(folder) in models
        prompt = "The tower is 324 metres tall"
        completion = client.completions.create(model=str(folder), prompt=prompt, max_tokens=12, temperature=0)
        # Greedy continuation of the same factored model, loaded by nsvd-lm.
        model = load_compressed(folder)
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
        assert completion.choices[0].text == tokenizer.decode(greedy, skip_special_tokens=True)
        assert completion.usage.completion_tokens == len(greedy)
        chat = client.chat.completions.create(
            model=str(folder), messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
        )
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_lm_eval_hf_scores_the_checkpoint_like_nsvd(checkpoints, tmp_path):
    folder = checkpoints["folders"]["llama"]
    data = write_wiki_ptb_data_dir(tmp_path / "data")
    env = _env(tmp_path, NSVD_LM_DATA_DIR=str(data))
    args = {"nsvd": f"pretrained={folder}", "hf": f"pretrained={folder},trust_remote_code=True"}
    procs = {
        name: subprocess.Popen(
            [
                str(BIN / "lm_eval"),
                "--model",
                name,
                "--model_args",
                f"{model_args},max_length=64,dtype=float32",
                "--tasks",
                "nsvd_wikitext2",
                "--device",
                "cpu",
                "--output_path",
                str(tmp_path / f"out_{name}"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, model_args in args.items()
    }
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    results = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"lm_eval --model {name} failed:\n{logs[name][-4000:]}"
        (path,) = sorted((tmp_path / f"out_{name}").rglob("results_*.json"))
        results[name] = json.loads(path.read_text())["results"]["nsvd_wikitext2"]
    assert results["hf"]["n_windows,none"] == results["nsvd"]["n_windows,none"] >= 2
    hf, nsvd = results["hf"]["token_perplexity,none"], results["nsvd"]["token_perplexity,none"]
    print(f"token_perplexity hf {hf!r} nsvd {nsvd!r} rel diff {abs(hf - nsvd) / nsvd:.3e}")
    assert hf == pytest.approx(nsvd, rel=1e-6)
