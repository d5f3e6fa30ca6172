"""ONNX export of compressed tiny models: graph I/O, logits parity with KV cache, factorization kept,
weight bytes, int8, float16 and bad input (offline, CPU)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402
from nsvd_lm.export import io_names  # noqa: E402
from nsvd_lm.export.graph_inspect import initializer_bytes, load_graph, low_rank_pairs  # noqa: E402
from nsvd_lm.export.onnx_export import export_onnx  # noqa: E402
from onnx_models import EXPORT_CASES, exported_tiny, tiny_model, tokenizer  # noqa: E402

from nsvd_lm.modules import LowRankLinear  # noqa: E402

CASE_IDS = [f"{arch}-{method}" for arch, method, _ in EXPORT_CASES]


@pytest.fixture(scope="module", params=EXPORT_CASES, ids=CASE_IDS)
def exported(request):
    return exported_tiny(*request.param)


def _session(onnx_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_dir / io_names.ONNX_FILENAME), providers=["CPUExecutionProvider"])


def _run(session, num_layers, ids, mask, pos, past):
    feeds = {io_names.INPUT_IDS: ids, io_names.ATTENTION_MASK: mask, io_names.POSITION_IDS: pos}
    feeds.update(zip(io_names.past_names(num_layers), past))
    out = session.run(None, feeds)
    return out[0], out[1:]


def test_folder_and_graph_io(exported):
    files = set(os.listdir(exported.onnx_dir))
    for name in (
        "model.onnx",
        "model.onnx.data",
        "config.json",
        "generation_config.json",
        "genai_config.json",
        "tokenizer.json",
    ):
        assert name in files
    assert not any(f.startswith(".tmp") for f in os.listdir(exported.onnx_dir.parent))
    config = json.loads((exported.onnx_dir / "config.json").read_text())
    assert config["model_type"] == exported.arch  # the base config, not the checkpoint's wrapper type

    n = exported.model.config.num_hidden_layers
    graph = load_graph(exported.onnx_dir / io_names.ONNX_FILENAME)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    # logits_to_keep: added after tracing, optional (an initializer holds its default, 0 = all).
    assert list(inputs) == [*io_names.input_names(n), io_names.LOGITS_TO_KEEP]
    assert inputs[io_names.LOGITS_TO_KEEP] == [1]
    assert list(outputs) == io_names.output_names(n)
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    config = exported.model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert inputs["past_key_values.0.key"] == ["batch_size", kv_heads, "past_sequence_length", head_dim]
    assert outputs["present.1.value"] == ["batch_size", kv_heads, "total_sequence_length", head_dim]
    assert outputs["logits"][:2] == ["batch_size", io_names.LOGITS_AXIS]


def test_each_low_rank_linear_is_two_matmuls(exported):
    torch_shapes = sorted(
        (m.in_features, m.rank, m.out_features) for m in exported.model.modules() if isinstance(m, LowRankLinear)
    )
    assert len(torch_shapes) == 7 * exported.model.config.num_hidden_layers  # q k v o gate up down
    graph = load_graph(exported.onnx_dir / io_names.ONNX_FILENAME)
    onnx_shapes = sorted((p.in_features, p.rank, p.out_features) for p in low_rank_pairs(graph))
    assert onnx_shapes == torch_shapes
    assert exported.report["low_rank_matmul_pairs"] == len(torch_shapes)


@pytest.mark.parametrize("past_len", [0, 1, 7])
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_parity_with_kv_cache(exported, past_len, batch):
    """Prefill past_len tokens in ORT, feed its presents back, compare the next 4 positions' logits
    (and the presents) with one PyTorch pass; row 1 of a batch of 3 is left-padded by 2."""
    model, n = exported.model, exported.model.config.num_hidden_layers
    session = _session(exported.onnx_dir)
    new = 4
    total = past_len + new
    gen = torch.Generator().manual_seed(past_len * 10 + batch)
    ids = torch.randint(3, 1000, (batch, total), generator=gen)
    mask = torch.ones(batch, total, dtype=torch.long)
    if batch == 3:
        pad = min(2, total - 1)
        mask[1, :pad] = 0
        ids[1, :pad] = tokenizer().pad_token_id or 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pos[mask == 0] = 1
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    empty = [np.zeros((batch, 2, 0, 16), np.float32)] * (2 * n)
    past = empty
    if past_len:
        _, past = _run(
            session, n, ids[:, :past_len].numpy(), mask[:, :past_len].numpy(), pos[:, :past_len].numpy(), empty
        )
        assert past[0].shape == (batch, 2, past_len, 16)
    logits, presents = _run(session, n, ids[:, past_len:].numpy(), mask.numpy(), pos[:, past_len:].numpy(), past)
    assert presents[0].shape == (batch, 2, total, 16)
    real = mask[:, past_len:].bool().numpy()  # padded query rows are never read
    diff = np.abs(logits - reference[:, past_len:].numpy())[real]
    assert diff.max() <= 1e-4, f"max |ORT - PyTorch| = {diff.max():.2e}"


def test_weight_bytes_follow_the_parameter_count():
    """float32 graph: 4 bytes per stored parameter, so the bytes shrink exactly as the parameters do
    (the exporter may dedupe a few identical norm vectors; dense vs compressed SmolLM2 is in the bench)."""
    compressed = exported_tiny(*EXPORT_CASES[0])
    dense_params = sum(p.numel() for p in tiny_model(compressed.arch).parameters())
    compressed_params = sum(p.numel() for p in compressed.model.parameters())
    assert compressed_params < dense_params
    assert compressed.report["parameters"] == compressed_params
    assert compressed.report["onnx_weight_bytes"] == pytest.approx(4 * compressed_params, rel=2e-3)


def test_int8_quantization_keeps_low_rank_and_shrinks(tmp_path):
    from nsvd_lm.export.quantize import quantize_int8_weight_only

    src = exported_tiny(*EXPORT_CASES[1])
    copy_dir = tmp_path / "int8"
    shutil.copytree(src.onnx_dir, copy_dir)
    quantize_int8_weight_only(copy_dir / io_names.ONNX_FILENAME)
    graph = load_graph(copy_dir / io_names.ONNX_FILENAME)
    ops = [node.op_type for node in graph.graph.node]
    n_low_rank = sum(isinstance(m, LowRankLinear) for m in src.model.modules())
    assert ops.count("MatMulNBits") >= 2 * n_low_rank  # both factors of every low-rank layer
    assert initializer_bytes(graph) < 0.75 * src.report["onnx_weight_bytes"]

    ids = np.array([[5, 6, 7, 8, 9]], dtype=np.int64)
    n = src.model.config.num_hidden_layers
    args = (ids, np.ones_like(ids), np.arange(5)[None], [np.zeros((1, 2, 0, 16), np.float32)] * (2 * n))
    float_logits, _ = _run(_session(src.onnx_dir), n, *args)
    int8_logits, _ = _run(_session(copy_dir), n, *args)
    rel = np.abs(int8_logits - float_logits).max() / np.abs(float_logits).max()
    assert 0 < rel < 0.05


@pytest.mark.slow  # one more export (~15 s idle, a minute on a busy machine)
def test_float16_export_runs_on_cpu(tmp_path):
    model = exported_tiny(*EXPORT_CASES[1]).model
    report = export_onnx(model, tmp_path / "fp16", dtype="float16", tokenizer=tokenizer())
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    graph = load_graph(tmp_path / "fp16" / io_names.ONNX_FILENAME)
    past_type = next(i for i in graph.graph.input if i.name == "past_key_values.0.key").type.tensor_type.elem_type
    assert past_type == 10  # TensorProto.FLOAT16
    assert report.parity_max_abs_diff is not None and report.parity_max_abs_diff < 0.05


# ------------------------------------------------------------------------------------------
# Bad input: clear errors before heavy work, nothing left behind
# ------------------------------------------------------------------------------------------


def test_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of float32, float16"):
        export_onnx(tmp_path, tmp_path / "out", dtype="bfloat16")
    assert not (tmp_path / "out").exists()


def test_rejects_bad_opset_and_quantize(tmp_path):
    with pytest.raises(ValueError, match=r"opset must be an integer in \[18, 23\]"):
        export_onnx(tmp_path, tmp_path / "out", opset=11)
    with pytest.raises(ValueError, match="quantize must be one of int8"):
        export_onnx(tmp_path, tmp_path / "out", quantize="int4")


def test_rejects_folder_that_is_not_a_model(tmp_path):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "README.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a compressed nsvd-lm checkpoint nor a Hugging Face model"):
        export_onnx(not_a_model, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not found"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_non_empty_or_unwritable_out_dir(tmp_path):
    model = exported_tiny(*EXPORT_CASES[1]).model
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx(model, busy)
    assert os.listdir(busy) == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="cannot write"):
        export_onnx(model, a_file / "out")


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from nsvd_lm.cli import main

    assert main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "int4"]) == 2
    assert "dtype must be one of float32, float16" in capsys.readouterr().err


def test_failure_mid_export_leaves_no_partial_folder(tmp_path, monkeypatch):
    from nsvd_lm.export import onnx_export

    def broken_convert(model, opset):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(onnx_export, "_convert", broken_convert)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(exported_tiny(*EXPORT_CASES[1]).model, tmp_path / "out", tokenizer=tokenizer())
    assert os.listdir(tmp_path) == []  # neither out nor its .tmp-out-* sibling


def test_attention_reads_the_kv_cache_without_copies(exported, tmp_path):
    """Every layer's cached keys feed one transposed MatMul (FusedMatMul transB after ORT's fusions)
    and its values one MatMul: no repeat_kv Expand, no transposed or scaled copy of the cache."""
    import onnx

    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(exported.onnx_dir / io_names.ONNX_FILENAME), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(optimized), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for i in range(exported.model.config.num_hidden_layers):
        (key_reader,) = consumers[f"present.{i}.key"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in key_reader.attribute}
        assert (key_reader.op_type, attrs.get("transB"), attrs.get("transA", 0)) == ("FusedMatMul", 1, 0)
        assert [n.op_type for n in consumers[f"present.{i}.value"]] == ["MatMul"]


@pytest.mark.parametrize("q_len", [1, 5])
def test_grouped_query_attention_equals_repeated_heads(q_len):
    """The exporter's attention (query heads stacked per KV group) is transformers' eager attention
    over repeated KV heads, with a padding + causal additive mask and with soft-capping."""
    from nsvd_lm.export.attention import grouped_query_attention
    from transformers.models.llama.modeling_llama import eager_attention_forward

    gen = torch.Generator().manual_seed(q_len)
    batch, heads, kv_heads, past, dim = 2, 6, 2, 4, 8
    query = torch.randn(batch, heads, q_len, dim, generator=gen)
    key, value = (torch.randn(batch, kv_heads, past + q_len, dim, generator=gen) for _ in range(2))
    allowed = torch.ones(batch, 1, q_len, past + q_len, dtype=torch.bool).tril(diagonal=past)
    allowed[1, :, :, :2] = False  # row 1 left-padded
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = heads // kv_heads, False
    got, _ = grouped_query_attention(module, query, key, value, mask, scaling=0.3)
    want, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    capped, _ = grouped_query_attention(module, query, key, value, mask, scaling=0.3, softcap=0.5)
    assert not torch.allclose(capped, got)  # the cap changes the scores ...
    assert capped.shape == got.shape == (batch, q_len, heads, dim)


def test_graph_ceiling_splits_out_the_linears_and_the_lm_head(exported, tmp_path):
    """bench/bench_graph_ceiling.py times an export's weight MatMuls and its LM head on their own:
    the linears graph must hold every projection weight (two factors per low-rank linear) and
    nothing else, and the LM-head graph must compute ``hidden @ lm_head.weight.T``, tied or not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_graph_ceiling", Path(__file__).resolve().parents[1] / "bench" / "bench_graph_ceiling.py"
    )
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)

    sizes = ceiling.build_parts(exported.onnx_dir, tmp_path)
    head = exported.model.get_output_embeddings()
    linears = [m for m in exported.model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert sizes["linear_matmuls"] == len(linears) == 2 * 7 * exported.model.config.num_hidden_layers
    assert sizes["linear_weights"] == sum(m.weight.numel() for m in linears)

    hidden = np.random.default_rng(0).standard_normal((3, head.in_features)).astype(np.float32)
    (logits,) = _session(tmp_path / "lm_head").run(None, {"h": hidden})
    expected = hidden @ head.weight.detach().float().numpy().T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    linear_session = _session(tmp_path / "linears")
    feeds = {i.name: np.ones((2, i.shape[1]), np.float32) for i in linear_session.get_inputs()}
    assert len(linear_session.run(None, feeds)) == len(linears)
