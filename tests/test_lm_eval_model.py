"""``--model nsvd``: the real lm_eval CLI, the .pth hook, compressed checkpoints, argument errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from eval_data import REPO
from lmeval_helpers import offline_env, write_text_corpus, write_wiki_ptb_data_dir
from tiny_models import build_tiny_model

CALIB = {"calib_nsamples": 4, "calib_seqlen": 32}
COMMON = {"max_length": 64, "dtype": "float32"}


def _model_args(**kwargs) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


def _results_json(folder: Path) -> dict:
    files = sorted(folder.rglob("results_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def _ppl(results: dict, task: str = "nsvd_ptb") -> float:
    return results["results"][task]["token_perplexity,none"]


@pytest.fixture(scope="module")
def env_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    try:
        model = build_tiny_model(root / "model")
    except FileNotFoundError as exc:  # no offline SmolLM2 tokenizer on this machine
        pytest.skip(str(exc))
    return {
        "root": root,
        "model": model,
        "corpus": write_text_corpus(root / "corpus"),
        "data": write_wiki_ptb_data_dir(root / "data"),
        "cache": root / "stats",
    }


@pytest.fixture(scope="module")
def cli_runs(env_paths):
    """``lm_eval --model nsvd`` (tasks found without --include_path) and ``lm_eval --model hf``
    with an explicit ``--include_path`` to the installed tasks folder, run side by side."""
    from nsvd_lm.lmeval.hook import nsvd_tasks_dir

    p = env_paths
    env = offline_env(NSVD_LM_DATA_DIR=str(p["data"]))
    nsvd_args = _model_args(
        pretrained=p["model"],
        method="nsvd-i",
        ratio=0.4,
        calib_dataset=p["corpus"],
        cache_dir=p["cache"],
        **CALIB,
        **COMMON,
    )
    commands = {
        "nsvd": [
            "lm_eval",
            "--model",
            "nsvd",
            "--model_args",
            nsvd_args,
            "--tasks",
            "nsvd_ptb",
            "--device",
            "cpu",
            "--output_path",
            str(p["root"] / "out_nsvd"),
        ],
        "hf": [
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            _model_args(pretrained=p["model"], **COMMON),
            "--tasks",
            "nsvd_ptb",
            "--include_path",
            nsvd_tasks_dir(),
            "--device",
            "cpu",
            "--output_path",
            str(p["root"] / "out_hf"),
        ],
    }
    bindir = Path(sys.executable).parent
    procs = {
        name: subprocess.Popen(
            [str(bindir / cmd[0]), *cmd[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmd in commands.items()
    }
    logs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"lm_eval --model {name} failed:\n{logs[name][-4000:]}"
    return {
        "logs": logs,
        "nsvd": _results_json(p["root"] / "out_nsvd"),
        "hf": _results_json(p["root"] / "out_hf"),
    }


# ----------------------------------------------------------------------------- the .pth hook


def test_pth_hook_is_installed_and_imports_nothing_heavy():
    site = Path(sysconfig.get_paths()["purelib"])
    pth = site / "nsvd_lm_lm_eval.pth"
    if not pth.exists():
        pytest.skip("nsvd-lm is not pip-installed in this interpreter (no .pth)")
    assert "nsvd_lm.lmeval.hook" in pth.read_text()
    code = (
        "import sys, json\n"
        "state = {'hook': [type(f).__name__ for f in sys.meta_path][:1],"
        " 'heavy_at_start': sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)}\n"
        "from lm_eval.api.registry import model_registry\n"
        "state['nsvd'] = model_registry._objs.get('nsvd')\n"
        "state['nsvd_onnx'] = model_registry._objs.get('nsvd-onnx')\n"
        "state['has_hf'] = 'hf' in model_registry and 'vllm' in model_registry\n"
        "state['torch_after_registry'] = 'torch' in sys.modules\n"
        "from lm_eval.api.registry import get_model\n"
        "state['nsvd_class'] = get_model('nsvd').__name__\n"
        "state['hf_class'] = get_model('hf').__name__\n"
        "state['nsvd_onnx_class'] = get_model('nsvd-onnx').__name__\n"
        "print(json.dumps(state))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=offline_env(), capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == {
        "hook": ["LmEvalImportHook"],
        "heavy_at_start": [],
        "nsvd": "nsvd_lm.lmeval.adapter:NSVDLM",  # lazy: registered without importing torch
        "nsvd_onnx": "nsvd_lm.lmeval.onnx_adapter:NSVDOnnxLM",
        "has_hf": True,  # built-ins still there (registered before ours)
        "torch_after_registry": False,
        "nsvd_class": "NSVDLM",
        "hf_class": "HFLM",
        "nsvd_onnx_class": "NSVDOnnxLM",
    }


def test_wheel_puts_pth_at_site_packages_root(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    for folder in ("nsvd_lm", "tasks", "export"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            ".",
            "-w",
            str(tmp_path / "w"),
        ],
        cwd=src,
        env=offline_env(PIP_NO_INDEX="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "w").glob("nsvd_lm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "nsvd_lm_lm_eval.pth" in names  # wheel root = site-packages
        assert "nsvd_lm/lmeval/hook.py" in names and "nsvd_lm/tasks/nsvd_ppl.yaml" in names
        pth = zf.read("nsvd_lm_lm_eval.pth").decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert pth.startswith("import ") and "nsvd_lm.lmeval.hook" in pth and pth.count("\n") == 1
    assert "[lm_eval.models]" in entry_points and "nsvd = nsvd_lm.lmeval.adapter:NSVDLM" in entry_points


def test_task_manager_always_has_our_tasks_and_dedupes_include_path(tmp_path):
    from lm_eval.tasks import TaskManager

    from nsvd_lm.lmeval.hook import install, nsvd_tasks_dir, with_nsvd_tasks

    install()
    ours = nsvd_tasks_dir()
    link = tmp_path / "tasks_link"
    link.symlink_to(ours)
    assert with_nsvd_tasks(None) == [ours]
    assert with_nsvd_tasks(str(link)) == str(link)  # same folder by realpath: not added twice
    assert with_nsvd_tasks(["/elsewhere"]) == [ours, "/elsewhere"]  # user paths still override ours

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    index_logger = logging.getLogger("lm_eval.tasks._index")
    index_logger.addHandler(handler)
    try:
        plain = TaskManager(include_defaults=False)
        explicit = TaskManager(include_defaults=False, include_path=str(link))
    finally:
        index_logger.removeHandler(handler)
    for manager in (plain, explicit):
        assert {"nsvd_ppl", "nsvd_wikitext2", "nsvd_alpaca_eval_ja"} <= set(manager.all_tasks)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]


# ----------------------------------------------------------------------------- the real CLI


def test_lm_eval_cli_nsvd_and_hf_side_by_side(cli_runs, env_paths):
    nsvd, hf = cli_runs["nsvd"], cli_runs["hf"]
    block = nsvd["config"]["compression"]
    assert block["method"] == "nsvd-i" and block["ratio"] == 0.4 and block["k1_frac"] == 0.95
    assert block["params_after"] < block["params_before"] == hf["config"]["model_num_parameters"]
    assert nsvd["config"]["model_num_parameters"] == block["params_after"]
    assert block["calibration"]["nsamples"] == 4 and block["calibration"]["seqlen"] == 32
    assert block["calibration"]["dataset"] == str(env_paths["corpus"])
    assert block["compression_seconds"] > 0 and block["stats_cache_hit"] is False
    assert block["source"] == "compressed on load"
    assert nsvd["config"]["model_args"]["method"] == "nsvd-i"
    assert "compression" not in hf["config"]
    assert _ppl(nsvd) != pytest.approx(_ppl(hf), rel=1e-6)  # the compressed model is a different model
    # The explicit --include_path to the installed tasks folder adds nothing twice.
    assert "overrides existing task" not in cli_runs["logs"]["hf"]
    assert "nsvd_lm.lmeval.adapter" in cli_runs["logs"]["nsvd"]  # our log lines reach the CLI output


def _evaluate_in_process(lm, pretrained: str, data_dir: Path, monkeypatch) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("NSVD_LM_DATA_DIR", str(data_dir))
    manager = TaskManager(include_defaults=False, metadata={"pretrained": pretrained, **COMMON})
    return lm_eval.simple_evaluate(model=lm, tasks=["nsvd_ptb"], task_manager=manager, log_samples=False)


def test_compressed_checkpoint_and_baseline_reproduce_the_cli(
    cli_runs, env_paths, tmp_path, monkeypatch, calibration_forwards
):
    """Same numbers as the CLI: a saved checkpoint of the same compression, and ratio=0 vs hf."""
    from nsvd_lm.checkpoint import save_compressed
    from nsvd_lm.lmeval.adapter import NSVDLM

    p = env_paths
    runs = calibration_forwards.count
    lm = NSVDLM(
        pretrained=str(p["model"]),
        method="nsvd-i",
        ratio=0.4,
        calib_dataset=str(p["corpus"]),
        cache_dir=str(p["cache"]),
        device="cpu",
        **CALIB,
        **COMMON,
    )
    assert calibration_forwards.count == runs and lm.compression_info["stats_cache_hit"] is True  # CLI's cache
    ckpt = save_compressed(lm.model, tmp_path / "ckpt", tokenizer=lm.tokenizer)
    del lm

    from_ckpt = NSVDLM(pretrained=str(ckpt), device="cpu", **COMMON)
    assert from_ckpt.compression_info["source"] == f"checkpoint {ckpt}"
    assert from_ckpt.compression_info["method"] == "nsvd-i" and calibration_forwards.count == runs
    results = _evaluate_in_process(from_ckpt, str(ckpt), p["data"], monkeypatch)
    assert _ppl(results) == pytest.approx(_ppl(cli_runs["nsvd"]), rel=1e-6)
    assert results["config"]["compression"]["ratio"] == 0.4

    baseline = NSVDLM(pretrained=str(p["model"]), ratio=0, device="cpu", **COMMON)
    assert baseline.compression_info["method"] is None and baseline.compression_info["ratio"] == 0.0
    results = _evaluate_in_process(baseline, str(p["model"]), p["data"], monkeypatch)
    assert _ppl(results) == pytest.approx(_ppl(cli_runs["hf"]), rel=1e-6)

    # Checkpoint + disagreeing method/ratio: clear error before loading anything.
    with pytest.raises(ValueError, match=r"method=nsvd-i.*method=svd"):
        NSVDLM(pretrained=str(ckpt), method="svd", device="cpu")
    with pytest.raises(ValueError, match=r"ratio=0.4.*ratio=0.3"):
        NSVDLM(pretrained=str(ckpt), ratio=0.3, device="cpu")
    assert NSVDLM(pretrained=str(ckpt), method="nsvd-i", ratio=0.4, device="cpu").compression_info["ratio"] == 0.4


def test_include_patterns_survive_lm_eval_arg_string(env_paths):
    from nsvd_lm.lmeval.adapter import NSVDLM
    from nsvd_lm.modules import LowRankLinear

    lm = NSVDLM.create_from_arg_string(
        f"pretrained={env_paths['model']},method=svd,ratio=0.5,include=*.q_proj|*.k_proj,dtype=float32",
        {"device": "cpu", "batch_size": 1},
    )
    factored = sorted(name.split(".")[-1] for name, m in lm.model.named_modules() if isinstance(m, LowRankLinear))
    assert factored == ["k_proj", "k_proj", "q_proj", "q_proj"]  # two layers
    assert lm.compression_info["stats_cache_hit"] is None  # svd needs no calibration


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"method": "nsvd-i", "ratio": 0.4, "bogus_arg": 1},
            r"unknown model_args for --model nsvd: bogus_arg\. Known: .*method.*ratio",
        ),
        ({"method": "nsvd-x", "ratio": 0.4}, r"method='nsvd-x' is not known; allowed values: svd, asvd-0"),
        ({"method": "svd", "ratio": 1.5}, r"ratio=1.5 must lie in the open interval \(0, 1\)"),
        ({"ratio": 0.4, "calib_bos": "sometimes"}, r"calib_bos='sometimes'; allowed values: auto, always, never"),
        ({"ratio": "forty"}, r"ratio='forty' is not a number"),
        ({"method": "svd"}, r"method=svd given without ratio"),
        ({"method": "nsvd-i", "ratio": 0.4, "k1_frac": 2}, r"k1_frac=2.0 must lie in \[0, 1\]"),
    ],
)
def test_bad_model_args_fail_before_loading(kwargs, message):
    from nsvd_lm.lmeval.adapter import NSVDLM

    # The model path does not exist: the argument error must come first.
    with pytest.raises(ValueError, match=message):
        NSVDLM(pretrained="/nonexistent/model", device="cpu", **kwargs)


def test_known_model_args_cover_hflm_and_compression_config():
    import inspect

    from lm_eval.models.huggingface import HFLM

    from nsvd_lm.config import CompressionConfig
    from nsvd_lm.lmeval.adapter import NSVDLM, known_model_args

    known = set(known_model_args())
    assert set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"} <= known
    assert set(CompressionConfig.known_keys()) <= known
    # Every CompressionConfig field is an explicit parameter (the nsvd tasks read the signature).
    assert set(CompressionConfig.known_keys()) <= set(inspect.signature(NSVDLM.__init__).parameters)


def test_nsvd_lm_eval_command_forwards_to_lm_eval():
    from nsvd_lm.commands.eval import lm_eval_argv

    assert lm_eval_argv(["--tasks", "nsvd_ppl"]) == ["run", "--model", "nsvd", "--tasks", "nsvd_ppl"]
    assert lm_eval_argv(["--model", "hf", "--tasks", "x"]) == ["run", "--model", "hf", "--tasks", "x"]
    assert lm_eval_argv(["run", "-t", "x"]) == ["run", "--model", "nsvd", "-t", "x"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
    out = subprocess.run(
        [sys.executable, "-m", "nsvd_lm", "eval", "--help"],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--model_args" in out.stdout and "--tasks" in out.stdout


def test_parallelize_goes_through_hflm_device_map(env_paths, monkeypatch):
    """parallelize=True: HFLM's device_map="auto" load, then compression of the dispatched model.

    On this CPU-only machine "auto" can only use CPU memory (max_cpu_memory); on GPUs the same
    code path splits the blocks across devices.
    """
    import torch

    from nsvd_lm.lmeval.adapter import NSVDLM

    common = dict(
        pretrained=str(env_paths["model"]), method="svd", ratio=0.3, device="cpu", dtype="float32", progress=False
    )
    placements = []
    original = NSVDLM._get_accelerate_args

    def recording(self, *args, **kwargs):
        placements.append(original(self, *args, **kwargs))
        return placements[-1]

    monkeypatch.setattr(NSVDLM, "_get_accelerate_args", recording)
    split = NSVDLM(parallelize=True, max_cpu_memory="8GiB", **common)
    assert placements[-1]["device_map"] == "auto" and placements[-1]["max_memory"] == {"cpu": 8 * 2**30}
    assert split.compression_info["params_after"] < split.compression_info["params_before"]
    plain = NSVDLM(**common)
    tokens = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(split.model(tokens).logits, plain.model(tokens).logits)
    # With nowhere to put the weights, accelerate offloads them to disk: compression cannot run.
    with pytest.raises(ValueError, match="offloaded to disk"):
        NSVDLM(parallelize=True, offload_folder=str(env_paths["root"] / "offload"), **common)
