"""config.json of a compressed checkpoint, and ``NSVDLMConfig``, the class its ``auto_map`` names.

The layout: the base model's config with

* ``model_type`` = ``"nsvd_lm"`` and the original type under ``base_model_type`` - so plain
  ``AutoModelForCausalLM.from_pretrained`` can never load the factors' folder "successfully" with
  random dense weights where the factors are;
* ``nsvd_compression``: method, ratio, the rank of every factored layer, ...;
* ``auto_map``: this file and ``modeling_nsvd_lm.py`` (both in the folder), the Hugging Face
  custom-code convention, so ``trust_remote_code=True`` loads the folder anywhere;
* ``architectures`` = null (the base model's kept as ``base_architectures``): ``transformers serve``
  loads ``getattr(transformers, architectures[0])`` when it is set, which for the base class
  (``LlamaForCausalLM``...) would be exactly the silent random-weights load; without it, serve goes
  through ``AutoModelForCausalLM`` like everyone else.

Part of the custom code copied into every checkpoint folder (see ``nsvd_lm/remote_code/__init__.py``):
imports only transformers, never nsvd_lm.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

MODEL_TYPE = "nsvd_lm"
# config.json keys that are ours, not the base model's.
OWN_KEYS: tuple[str, ...] = ("model_type", "base_model_type", "base_architectures", "nsvd_compression", "auto_map")
# The custom-code files every checkpoint folder carries (this one among them).
CODE_FILES: tuple[str, ...] = ("configuration_nsvd_lm.py", "modeling_nsvd_lm.py", "low_rank_linear.py")
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_nsvd_lm.NSVDLMConfig",
    "AutoModelForCausalLM": "modeling_nsvd_lm.NSVDLMForCausalLM",
}


def compressed_config_dict(base: dict[str, Any], compression: dict[str, Any]) -> dict[str, Any]:
    """The config.json content of a checkpoint: ``base`` (the base model's config dict) + ours."""
    config = {k: v for k, v in base.items() if k not in OWN_KEYS}
    config["base_model_type"] = base["model_type"]
    config["model_type"] = MODEL_TYPE
    config["nsvd_compression"] = compression
    config["auto_map"] = dict(AUTO_MAP)
    config["base_architectures"] = base.get("architectures")
    config["architectures"] = None
    return config


def base_config_from_dict(raw: dict[str, Any]) -> PreTrainedConfig:
    """The base model's transformers config (``LlamaConfig``...) of a checkpoint's config.json content.

    Works for folders written before ``auto_map`` existed too (same keys, fewer of them).
    """
    base = {k: v for k, v in raw.items() if k not in OWN_KEYS}
    if "base_architectures" in raw:  # (folders written before auto_map have the base's under architectures)
        base["architectures"] = raw["base_architectures"]
    return AutoConfig.for_model(raw["base_model_type"], **base)


class NSVDLMConfig(PreTrainedConfig):
    """The config of a compressed checkpoint: every base-model field, plus ``base_model_type`` and
    ``nsvd_compression``. ``base_config()`` is the config the factored model is built from."""

    model_type = MODEL_TYPE

    def base_config(self) -> PreTrainedConfig:
        """The base architecture's config, carrying ``nsvd_compression`` (read by the factored model)."""
        config = base_config_from_dict(self.to_dict())
        config.nsvd_compression = self.nsvd_compression
        return config
