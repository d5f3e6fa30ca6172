"""``NSVDLMForCausalLM``: what ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
runs for a folder written by ``nsvd_lm.save_compressed``.

A checkpoint stores the base architecture's own state-dict names (``model.layers.0.mlp.up_proj.down.weight``
...), so the model that loads it must be the base architecture with the factored layers swapped in.
``NSVDLMForCausalLM.from_pretrained`` therefore builds ``factored_class(LlamaForCausalLM)`` (a
subclass whose ``__init__`` calls ``factor_layers`` with the config's ranks) and hands the folder to
*its* ``from_pretrained``: dtype, device_map, attention implementation, tied embeddings and the
missing/unexpected-key checks are transformers' own. The model you get is an instance of that
subclass (``isinstance(model, LlamaForCausalLM)`` holds), with ``model.nsvd_compression`` set like
``nsvd_lm.load_compressed`` sets it; its ``save_pretrained`` writes a folder of this same kind.

Part of the custom code copied into every checkpoint folder (see ``nsvd_lm/remote_code/__init__.py``):
imports only torch and transformers, never nsvd_lm.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from .configuration_nsvd_lm import CODE_FILES, NSVDLMConfig, compressed_config_dict
from .low_rank_linear import factor_layers

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _save_factored(self: PreTrainedModel, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``save_pretrained``, then config.json rewritten to the checkpoint layout and the code copied along
    (a plain base-model config would let ``from_pretrained`` fill the factored layers with random weights)."""
    base_class = type(self).__mro__[1]
    base_class.save_pretrained(self, save_directory, **kwargs)
    path = os.path.join(save_directory, "config.json")
    with open(path, encoding="utf-8") as fh:
        base = json.load(fh)
    base.pop("nsvd_compression", None)
    base["architectures"] = [base_class.__name__]
    config = compressed_config_dict(base, self.nsvd_compression)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(save_directory, name))


@functools.cache
def factored_class(base_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``base_class`` whose ``__init__`` replaces the layers of ``config.nsvd_compression["ranks"]``
    by ``LowRankLinear`` (built on transformers' init device and dtype, filled by ``from_pretrained``)."""

    def __init__(self, config: PreTrainedConfig, *args: Any, **kwargs: Any) -> None:
        base_class.__init__(self, config, *args, **kwargs)
        compression = config.nsvd_compression
        factor_layers(self, compression["ranks"], method=compression["method"])
        self.nsvd_compression = compression

    return type(
        f"NSVDLM{base_class.__name__}",
        (base_class,),
        {"__init__": __init__, "__module__": __name__, "save_pretrained": _save_factored},
    )


class NSVDLMForCausalLM(PreTrainedModel):
    """The ``auto_map`` entry of a compressed checkpoint; ``from_pretrained`` / ``_from_config`` return
    the factored base architecture (see the module docstring), never an instance of this class."""

    config_class = NSVDLMConfig

    def __init__(self, config: NSVDLMConfig, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "NSVDLMForCausalLM is built by AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) "
            "or .from_config(config, trust_remote_code=True), which return the factored base architecture"
        )

    @staticmethod
    def factored_class_and_config(config: NSVDLMConfig) -> tuple[type[PreTrainedModel], PreTrainedConfig]:
        """The factored causal-LM class of the base architecture, and the base config to build it from."""
        base_config = config.base_config()
        base_class = AutoModelForCausalLM._model_mapping[type(base_config)]
        return factored_class(base_class), base_config

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, config: Any = None, **kwargs: Any
    ) -> PreTrainedModel:
        # (Not isinstance: transformers may import this file's config class under another module name.)
        if config is None or isinstance(config, (str, os.PathLike)):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = NSVDLMConfig.from_pretrained(config or pretrained_model_name_or_path, **hub)
        model_class, base_config = cls.factored_class_and_config(config)
        return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base_config, **kwargs)

    @classmethod
    def _from_config(cls, config: NSVDLMConfig, **kwargs: Any) -> PreTrainedModel:
        model_class, base_config = cls.factored_class_and_config(config)
        return model_class._from_config(base_config, **kwargs)
