"""Tiny compressed causal LMs for the ONNX export / runtime / server tests (built in code, offline).

Each architecture is a two-layer model with grouped-query attention sized to SmolLM2's tokenizer.
Models are compressed by the core ``compress_model`` (nsvd-i / nid-i on a short calibration text)
when it is available, else by a truncated SVD of each decoder linear into ``LowRankLinear``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import tiny_models
import torch
from tiny_models import smollm2_tokenizer
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a shared CPU spinning OpenMP workers make
# a 32-token generate 20x slower; one thread keeps the references fast and the timings stable.
torch.set_num_threads(1)

ARCHITECTURES = ("llama", "qwen2", "mistral")

CALIBRATION_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the world. "
) * 8


tokenizer = smollm2_tokenizer  # the one SmolLM2 tokenizer of the tests (tiny_models)


def _onnx_overrides(arch: str) -> dict:
    """The ONNX tests' sizes and token ids over ``tiny_models.tiny_config``'s defaults."""
    tok = tokenizer()
    common = dict(
        intermediate_size=128,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    if arch == "llama":
        return dict(common, tie_word_embeddings=True)
    if arch == "qwen2":  # q/k/v carry biases: the bias must ride on the ``up`` factor
        return dict(common, tie_word_embeddings=False)
    if arch == "mistral":  # a window shorter than the tests' sequences: the mask must apply it
        return dict(common, tie_word_embeddings=False, sliding_window=8)
    raise ValueError(f"arch must be one of {ARCHITECTURES}; got {arch!r}")


def tiny_model(arch: str, seed: int = 0):
    # Random init gives near-uniform logits; a larger scale makes greedy argmax well separated,
    # so token-for-token comparisons are about the graph, not float ties.
    return tiny_models.tiny_model(arch, len(tokenizer()), seed, weight_scale=2.5, **_onnx_overrides(arch))


def svd_compress_(model: nn.Module, ratio: float = 0.4) -> int:
    """Replace every linear inside the decoder blocks by a truncated-SVD ``LowRankLinear``."""
    from nsvd_lm.modules import LowRankLinear

    replaced = 0
    for block in model.model.layers:
        for name, child in list(block.named_modules()):
            if not isinstance(child, nn.Linear):
                continue
            out_f, in_f = child.weight.shape
            rank = int((1 - ratio) * out_f * in_f / (out_f + in_f))
            u, s, vh = torch.linalg.svd(child.weight.detach().double(), full_matrices=False)
            low = LowRankLinear.from_factors(
                (u[:, :rank] * s[:rank]).float(), vh[:rank].float(), child.bias, method="svd"
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, low)
            replaced += 1
    return replaced


def core_compress_available() -> bool:
    try:
        from nsvd_lm.compress import compress_model  # noqa: F401
    except ImportError:
        return False
    return True


def compressed_tiny_model(arch: str, method: str = "nsvd-i", ratio: float = 0.4):
    """A tiny model of ``arch`` compressed at ``ratio`` by ``method`` (SVD fallback without the core)."""
    model = tiny_model(arch)
    if core_compress_available():
        from nsvd_lm.compress import compress_model

        compress_model(
            model,
            tokenizer(),
            method=method,
            ratio=ratio,
            calib_dataset=_calibration_file(),
            calib_nsamples=4,
            calib_seqlen=32,
            cache_dir=str(_scratch_dir() / "stats"),
            progress=False,
        )
    else:
        svd_compress_(model, ratio)
    return model.eval()


@functools.lru_cache(maxsize=1)
def _scratch_dir() -> Path:
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="nsvd-onnx-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _calibration_file() -> str:
    path = _scratch_dir() / "calibration.txt"
    if not path.exists():
        path.write_text(CALIBRATION_TEXT)
    return str(path)


def export_tiny(model, out_dir: Path, **kwargs):
    """Export ``model`` with the shared tokenizer; returns the ExportReport."""
    from nsvd_lm.export.onnx_export import export_onnx

    return export_onnx(model, out_dir, tokenizer=tokenizer(), **kwargs)


@dataclass
class ExportedTiny:
    """A tiny compressed model, its export folder and the export report (built once per process)."""

    arch: str
    method: str
    model: nn.Module
    onnx_dir: Path
    report: object


# (arch, method, how): llama goes through the whole user path (save_compressed -> `nsvd-lm export`
# on the checkpoint folder); the others are exported from the in-memory model.
EXPORT_CASES = (("llama", "nid-i", "cli"), ("qwen2", "nsvd-i", "api"), ("mistral", "nsvd-i", "api"))


@functools.lru_cache(maxsize=None)
def exported_tiny(arch: str, method: str = "nsvd-i", how: str = "api") -> ExportedTiny:
    import json

    model = compressed_tiny_model(arch, method)
    out = _scratch_dir() / f"onnx-{arch}-{method}-{how}"
    if how == "cli" and core_compress_available():
        from nsvd_lm.checkpoint import load_compressed, save_compressed
        from nsvd_lm.cli import main

        checkpoint = _scratch_dir() / f"ckpt-{arch}-{method}"
        save_compressed(model, checkpoint, tokenizer=tokenizer())
        model = load_compressed(checkpoint)  # what the exporter sees
        assert main(["export", "--model", str(checkpoint), "--out", str(out)]) == 0
        report = json.loads((out / "nsvd_export.json").read_text())["report"]
    else:
        report = export_tiny(model, out).to_dict()
    return ExportedTiny(arch, method, model, out, report)


@functools.lru_cache(maxsize=None)
def onnx_lm(arch: str, method: str = "nsvd-i", how: str = "api"):
    from nsvd_lm.serve.runtime import OnnxCausalLM

    # One ORT thread: spinning ORT workers would starve the PyTorch reference in the same process
    # on a small shared machine.
    return OnnxCausalLM(
        exported_tiny(arch, method, how).onnx_dir, provider="cpu", tokenizer=tokenizer(), intra_op_threads=1
    )
