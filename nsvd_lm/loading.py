"""Load a model for compression or evaluation: a Hugging Face folder/hub id or a compressed checkpoint."""

from __future__ import annotations

import os
from typing import Any

import torch

from nsvd_lm.checkpoint import is_compressed_checkpoint, load_compressed, resolve_dtype


def parse_dtype(dtype: Any) -> torch.dtype | str:
    """``"auto"`` stays ``"auto"``; names map to torch dtypes; anything else is a ValueError."""
    if dtype in (None, "auto"):
        return "auto"
    return resolve_dtype(dtype, {})


def load_model_and_tokenizer(
    path_or_id: str | os.PathLike,
    dtype: Any = "auto",
    device: str | torch.device | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """``(model, tokenizer)`` from a compressed checkpoint folder or any causal LM folder / hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path_or_id = str(path_or_id)
    torch_dtype = parse_dtype(dtype)
    if is_compressed_checkpoint(path_or_id):
        model = load_compressed(
            path_or_id, dtype=None if torch_dtype == "auto" else torch_dtype, device=device, device_map=device_map
        )
    else:
        if os.path.sep in path_or_id and not os.path.exists(path_or_id):
            raise FileNotFoundError(f"model {path_or_id!r}: no such folder")
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if revision:
            kwargs["revision"] = revision
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
        if device is not None and device_map is None:
            model.to(device)
        model.eval()
    kwargs = {"revision": revision} if revision else {}
    if is_compressed_checkpoint(path_or_id):
        # The folder's config.json says model_type "nsvd_lm", which AutoConfig does not know; without
        # the base config AutoTokenizer falls back to a bare config and logs a misleading warning.
        kwargs["config"] = model.config
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **kwargs)
    return model, tokenizer
