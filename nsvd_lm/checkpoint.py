"""Compressed checkpoints: save a factored model as a folder and load it back without recompressing.

Folder layout (Hugging Face conventions, custom code included):

* ``config.json`` - the base model's config with ``model_type`` set to ``"nsvd_lm"``, the original
  type under ``base_model_type``, a ``nsvd_compression`` section (method, ratio, k1_frac,
  calibration, per-module ranks...) and an ``auto_map`` naming the two code files below
  (layout: ``nsvd_lm/remote_code/configuration_nsvd_lm.py``). The changed ``model_type`` is
  deliberate: plain ``AutoModelForCausalLM.from_pretrained`` would otherwise load the folder
  "successfully" with random dense weights where the factors are; now it fails loudly, asking for
  ``trust_remote_code=True`` (folders written before ``auto_map``: "model type nsvd_lm not
  recognized").
* ``configuration_nsvd_lm.py``, ``modeling_nsvd_lm.py``, ``low_rank_linear.py`` - the custom code
  (copied from ``nsvd_lm/remote_code/``, which nsvd-lm itself runs too), so
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works without nsvd-lm.
* ``model.safetensors`` - the factors (``*.down.weight`` rank × in, ``*.up.weight`` out × rank).
* ``generation_config.json`` and the tokenizer files.

``load_compressed`` (and ``lm_eval --model nsvd``) loads every such folder, with or without ``auto_map``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nsvd_lm.files import atomic_dir
from nsvd_lm.remote_code import copy_code
from nsvd_lm.remote_code.configuration_nsvd_lm import MODEL_TYPE, base_config_from_dict, compressed_config_dict
from nsvd_lm.remote_code.low_rank_linear import factor_layers

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"


def is_compressed_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder written by ``save_compressed``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return False
    return data.get("model_type") == MODEL_TYPE and "nsvd_compression" in data


def read_compression_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``nsvd_compression`` section of a compressed checkpoint's config.json."""
    if not is_compressed_checkpoint(path):
        raise ValueError(
            f"{path} is not an nsvd-lm compressed checkpoint (no config.json with model_type={MODEL_TYPE!r})"
        )
    return json.loads((Path(path) / "config.json").read_text())["nsvd_compression"]


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed ``model`` (and ``tokenizer``) to ``out_dir`` atomically (temp folder + rename)."""
    from safetensors.torch import save_model

    info = getattr(model, "nsvd_compression", None)
    if not info:
        raise ValueError("model has no nsvd_compression settings: compress it with nsvd_lm.compress_model first")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"out_dir {out} exists and is not empty (pass overwrite=True / --overwrite)")
    with atomic_dir(out) as tmp:
        base = model.config.to_dict()
        base["architectures"] = [type(model).__name__]  # as save_pretrained records it
        config = compressed_config_dict(base, info)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        # save_model drops tied duplicates (lm_head = embed_tokens) that save_file would reject.
        save_model(
            model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "nsvd_lm": json.dumps({"method": info["method"]})}
        )
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        copy_code(tmp)
    logger.info("saved compressed model to %s", out)
    return out


def base_model_config(path: str | os.PathLike):
    """The base model's transformers config of a compressed checkpoint (its own ``model_type`` is ours)."""
    return base_config_from_dict(json.loads((Path(path) / "config.json").read_text()))


def resolve_dtype(dtype: Any, config: dict) -> torch.dtype:
    if dtype in (None, "auto"):
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r}; allowed values: auto, float32, float16, bfloat16")
    return value


def load_compressed(
    path: str | os.PathLike,
    dtype: Any = None,
    device: str | torch.device | None = None,
    device_map: Any = None,
) -> nn.Module:
    """Rebuild the factored model saved in ``path`` (no recompression; logits equal the saved model's).

    ``dtype`` defaults to the saved one; ``device`` moves the whole model; ``device_map``
    (e.g. ``"auto"``) dispatches it across devices with accelerate instead.
    """
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path).expanduser()
    info = read_compression_info(path)
    raw = json.loads((path / "config.json").read_text())
    torch_dtype = resolve_dtype(dtype, raw)
    base_config = base_model_config(path)
    # Built on CPU without random init (the dense weights are replaced right after).
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(base_config, dtype=torch_dtype)
    try:
        factor_layers(model, info["ranks"], method=info["method"], dtype=torch_dtype)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} (base model {raw['base_model_type']}): {exc}") from None
    # Tied weights (lm_head = embeddings) share storage and are stored once under one name.
    if getattr(base_config, "tie_word_embeddings", False):
        model.tie_weights()
    state = model.state_dict()
    by_storage: dict[int, set[str]] = {}
    for key, tensor in state.items():
        by_storage.setdefault(tensor.data_ptr(), set()).add(key)
    missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
    untied_missing = [k for k in missing if by_storage[state[k].data_ptr()] <= set(missing)]
    if untied_missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {sorted(untied_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.nsvd_compression = info
    model.config.name_or_path = str(path)
    model.eval()
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        mapping = infer_auto_device_map(model, no_split_module_classes=no_split) if device_map == "auto" else device_map
        model = dispatch_model(model, device_map=mapping)
    elif device is not None:
        model.to(device)
    return model
