"""Export a (compressed or dense) Hugging Face causal LM to an ONNX decoder with KV cache.

The folder written by :func:`export_onnx`::

    model.onnx            graph: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value
                          [, logits_to_keep] -> logits, present.{i}.key/value (dynamic batch /
                          sequence / past length; logits_to_keep: see logits_to_keep.py)
    model.onnx.data       weights (external data)
    config.json           the base model's config
    generation_config.json, tokenizer files, genai_config.json (ONNX Runtime GenAI / lm-eval manifest)
    nsvd_export.json      what was exported and how (dtype, opset, sizes, low-rank pairs, parity)

Every ``LowRankLinear`` is two ``nn.Linear`` children, so the exporter emits two MatMuls with the
low-rank shapes: the factorization and its smaller weights survive export.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nsvd_lm.files import atomic_dir

from . import io_names
from .logits_to_keep import add_logits_to_keep

logger = logging.getLogger(__name__)

EXPORT_DTYPES = ("float32", "float16")
QUANTIZE_MODES = ("int8",)
MIN_OPSET = 18  # the dynamo exporter's floor
MAX_OPSET = 23  # highest opset whose ops the pinned onnxruntime (1.2x-1.3x) runs
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote. Sizes in bytes; parameters counted once even when tied."""

    out_dir: str
    dtype: str
    opset: int
    quantize: str | None
    model_type: str
    num_layers: int
    parameters: int  # unique parameters of the PyTorch model
    low_rank_modules: int  # LowRankLinear modules in the PyTorch model
    low_rank_matmul_pairs: int  # chained (in, rank) @ (rank, out) MatMul pairs found in the graph
    onnx_weight_bytes: int  # initializer bytes of the final graph
    onnx_weight_elements: int
    files_bytes: int  # everything in the folder
    seconds: float
    parity_max_abs_diff: float | None = None  # logits, ORT vs PyTorch, on a short probe (before quantization)
    quantized_weight_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mib = 1024 * 1024
        lines = [
            f"exported {self.model_type} ({self.num_layers} layers) to {self.out_dir}",
            f"  dtype {self.dtype}, opset {self.opset}, quantize {self.quantize or 'none'}",
            f"  parameters {self.parameters:,}; ONNX weights {self.onnx_weight_bytes / mib:.1f} MiB "
            f"({self.onnx_weight_elements:,} elements); folder {self.files_bytes / mib:.1f} MiB",
            f"  low-rank linears {self.low_rank_modules}, low-rank MatMul pairs in graph {self.low_rank_matmul_pairs}",
        ]
        if self.parity_max_abs_diff is not None:
            lines.append(f"  parity: max |logits ORT - PyTorch| = {self.parity_max_abs_diff:.2e}")
        lines.append(f"  took {self.seconds:.1f} s")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Argument checks: all before any heavy work.
# --------------------------------------------------------------------------------------------


def check_export_args(dtype: str, opset: int | None, quantize: str | None) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype!r}")
    if opset is not None and (
        isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET
    ):
        raise ValueError(
            f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}] (or None for the default); got {opset!r}"
        )
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)} (or None); got {quantize!r}")
    if quantize is not None and dtype != "float32":
        raise ValueError(
            f"quantize={quantize!r} needs dtype='float32' (weight-only int8 on float activations); got {dtype!r}"
        )


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder must not exist or be empty, and its parent must be writable."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"out_dir {out} exists and is not a folder")
        if any(out.iterdir()):
            raise FileExistsError(f"out_dir {out} is not empty; choose a new folder or empty it first")
    parent = out.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {out}: cannot write into {existing} (permission denied)")
    return out


def check_model_source(path_or_id: str | os.PathLike) -> str:
    """A local folder that is an nsvd-lm compressed checkpoint or a Hugging Face model, or a hub id."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model {text!r} is a file; expected a compressed nsvd-lm checkpoint or a Hugging Face model folder"
            )
        if _is_compressed_checkpoint(path) or (path / "config.json").is_file():
            return str(path)
        raise ValueError(
            f"model {text!r} is neither a compressed nsvd-lm checkpoint "
            "nor a Hugging Face model folder (no config.json)"
        )
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return text  # a hub id: the loader resolves (or fails offline with its own message)
    raise FileNotFoundError(f"model {text!r} not found: not a local folder and not a hub id like 'org/name'")


def _is_compressed_checkpoint(path: Path) -> bool:
    from nsvd_lm.checkpoint import is_compressed_checkpoint

    return bool(is_compressed_checkpoint(path))


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export_onnx(
    model_path_or_model,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    opset: int | None = None,
    quantize: str | None = None,
    tokenizer=None,
    verify: bool = True,
) -> ExportReport:
    """Export a causal LM (a folder / hub id, or a loaded model) to ``out_dir``; see the module doc.

    ``model_path_or_model``: compressed nsvd-lm checkpoint, Hugging Face folder or hub id, or an
    ``nn.Module`` (then pass ``tokenizer`` to get tokenizer files in the folder). ``dtype``:
    float32 or float16. ``opset``: ONNX opset (default: the exporter's). ``quantize``: None or
    "int8" (weight-only 8-bit MatMul weights, on top of the low-rank factors). ``verify`` compares
    ORT and PyTorch logits on a short probe and records the max difference in the report.

    The folder is written to a temporary sibling and renamed at the end, so a failure leaves no
    partial ``out_dir``.
    """
    from tqdm.auto import tqdm

    check_export_args(dtype, opset, quantize)
    out = check_out_dir(out_dir)
    source = None
    if isinstance(model_path_or_model, (str, os.PathLike)):
        source = check_model_source(model_path_or_model)

    started = time.perf_counter()
    steps = ["load", "trace + convert", "save", "verify", "quantize", "metadata"]
    with tqdm(total=len(steps), desc="export", unit="step") as bar:

        def step(name: str) -> None:
            bar.set_postfix_str(name)

        step("load")
        model, tokenizer = _prepare_model(model_path_or_model, source, dtype, tokenizer)
        bar.update()

        # A temporary sibling, renamed to out_dir (empty or absent: check_out_dir) once complete.
        with atomic_dir(out) as tmp:
            step("trace + convert")
            program, used_opset = _convert(model, opset)
            bar.update()

            step("save")
            onnx_path = tmp / io_names.ONNX_FILENAME
            program.save(str(onnx_path), external_data=True)
            del program
            _name_present_axes(onnx_path)
            add_logits_to_keep(onnx_path)
            bar.update()

            step("verify")
            parity = _parity_probe(model, onnx_path) if verify else None
            bar.update()

            step("quantize")
            notes: list[str] = []
            dense_bytes = None
            if quantize == "int8":
                from .quantize import quantize_int8_weight_only

                dense_bytes = _weight_stats(onnx_path)[0]
                quantize_int8_weight_only(onnx_path)
                notes.append(
                    "int8: MatMul weights as 8-bit blocks (MatMulNBits, block 32, symmetric, accuracy_level 4)"
                )
            bar.update()

            step("metadata")
            report = _write_metadata(model, tokenizer, tmp, onnx_path, out, dtype, used_opset, quantize, parity, notes)
            if dense_bytes is not None:
                report.quantized_weight_bytes = report.onnx_weight_bytes
                report.notes.append(f"float weights before int8: {dense_bytes:,} bytes")
            report.seconds = time.perf_counter() - started
            report.files_bytes = _folder_bytes(tmp)
            _write_export_info(tmp, report, source, getattr(model, "nsvd_compression", None))
            report.files_bytes = _folder_bytes(tmp)
            _make_readable(tmp)
        bar.update()
    logger.debug("%s", report.summary())
    return report


def _prepare_model(model_path_or_model, source: str | None, dtype: str, tokenizer):
    import torch

    torch_dtype = getattr(torch, dtype)
    if source is None:
        model = model_path_or_model
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ValueError(
                f"model_path_or_model must be a folder, a hub id or a transformers model; got {type(model).__name__}"
            )
        if next(model.parameters()).dtype != torch_dtype:
            model = copy.deepcopy(model).to(torch_dtype)  # never change the caller's model
    else:
        model, loaded_tokenizer = _load_model_and_tokenizer(source, dtype)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    model.eval()
    return model, tokenizer


def _load_model_and_tokenizer(source: str, dtype: str):
    from nsvd_lm.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(source, dtype=dtype, device="cpu")


def _convert(model, opset: int | None):
    import warnings

    import torch
    from torch.export import Dim

    from .attention import traced_attention
    from .decoder_wrapper import FlatKVDecoder

    wrapper = FlatKVDecoder(model).eval()
    n = wrapper.geometry.num_layers
    batch = Dim(io_names.BATCH_AXIS)
    seq = Dim(io_names.SEQUENCE_AXIS)
    past = Dim(io_names.PAST_AXIS)
    total = Dim(io_names.TOTAL_AXIS)
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past}] * (2 * n),
    }
    # Exporter chatter (missing torchvision ops, deprecations) is not actionable by users.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        # The graph's attention reads the KV cache once per layer and step (export/attention.py).
        with traced_attention(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                wrapper.example_inputs(),
                dynamo=True,
                opset_version=opset,
                input_names=io_names.input_names(n),
                output_names=io_names.output_names(n),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
    finally:
        registration_log.setLevel(previous_level)
    used = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), opset or 0)
    return program, int(used)


def _name_present_axes(onnx_path: Path) -> None:
    """The exporter names the present length ``past_sequence_length + sequence_length``; readers
    that bind axes by name (lm-eval) want one word, and it equals the mask's total length.
    Rewrites only the graph file; the external weights are referenced, not touched."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    for out in graph.graph.output:
        if out.name.startswith("present."):
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_param:
                dims[2].dim_param = io_names.TOTAL_AXIS
    onnx.save(graph, str(onnx_path))


def _parity_probe(model, onnx_path: Path) -> float:
    """Max |logits| difference between ORT and PyTorch for batch 2, 5 tokens, empty past."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from .decoder_wrapper import FlatKVDecoder

    wrapper = FlatKVDecoder(model)
    ids, mask, pos, past = wrapper.example_inputs(batch=2, seq_len=5, past_len=0)
    with torch.no_grad():
        expected = wrapper(ids, mask, pos, past)[0].float().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {io_names.INPUT_IDS: ids.numpy(), io_names.ATTENTION_MASK: mask.numpy(), io_names.POSITION_IDS: pos.numpy()}
    for name, tensor in zip(io_names.past_names(wrapper.geometry.num_layers), past):
        feeds[name] = tensor.numpy()
    got = session.run([io_names.LOGITS], feeds)[0].astype(np.float32)
    return float(np.abs(got - expected).max())


def _weight_stats(onnx_path: Path) -> tuple[int, int]:
    from .graph_inspect import initializer_bytes, initializer_count, load_graph

    graph = load_graph(onnx_path)
    return initializer_bytes(graph), initializer_count(graph)


def _write_metadata(
    model, tokenizer, tmp: Path, onnx_path: Path, out: Path, dtype, opset, quantize, parity, notes
) -> ExportReport:
    from nsvd_lm.modules import LowRankLinear

    from .genai_config import write_genai_config
    from .graph_inspect import load_graph, low_rank_pairs

    config = copy.deepcopy(model.config)
    config.dtype = dtype  # what the graph's float tensors are
    config.save_pretrained(tmp)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    else:
        notes.append("no tokenizer given: the folder has no tokenizer files (runtime and lm-eval need them)")
    write_genai_config(tmp, model.config, generation_config)

    graph = load_graph(onnx_path)
    weight_bytes, weight_elements = _weight_stats(onnx_path)
    unique = {id(p): p.numel() for p in model.parameters()}
    return ExportReport(
        out_dir=str(out),
        dtype=dtype,
        opset=opset,
        quantize=quantize,
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        parameters=int(sum(unique.values())),
        low_rank_modules=sum(isinstance(m, LowRankLinear) for m in model.modules()),
        low_rank_matmul_pairs=len(low_rank_pairs(graph)),
        onnx_weight_bytes=weight_bytes,
        onnx_weight_elements=weight_elements,
        files_bytes=0,
        seconds=0.0,
        parity_max_abs_diff=parity,
        notes=notes,
    )


def _write_export_info(tmp: Path, report: ExportReport, source: str | None, compression: dict | None) -> None:
    import onnx
    import torch
    import transformers

    info = {
        "source": source,
        "report": report.to_dict(),
        "compression": compression,  # the checkpoint's nsvd_compression section (None for dense models)
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
    }
    with open(tmp / io_names.EXPORT_INFO_FILENAME, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and onnx writes 0600 data): give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
