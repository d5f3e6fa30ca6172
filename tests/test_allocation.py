"""Rank allocation (issue 12): bounds, the budget solver, each criterion's measurement, and the
end-to-end option (same budget as uniform, cached curves, saved/loaded checkpoint, ONNX export
with varying ranks)."""

from __future__ import annotations

import pytest
import torch
from onnx_models import _calibration_file, tiny_model, tokenizer

from nsvd_lm.allocation import (
    ALLOCATIONS,
    Probe,
    _interpolate,
    allocate,
    block_error_curves,
    ceiling_rank,
    output_fisher,
    plan_ranks,
    probe_ranks,
    rank_bounds,
    rank_for_ratio,
    sensitivity_curves,
)
from nsvd_lm.decompose import LayerFactorizer
from nsvd_lm.modules import LowRankLinear, capture_block_inputs, capture_block_kwargs, find_decoder_blocks
from nsvd_lm.targets import select_targets

MEASURED = [name for name, spec in ALLOCATIONS.items() if spec.measured]


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (192, 576), (64, 128)])
def test_bounds_hold_every_uniform_rank_and_the_ceiling_saves_parameters(shape):
    m, n = shape
    ceiling = ceiling_rank(m, n)
    assert ceiling * (m + n) < m * n <= (ceiling + 1) * (m + n)
    floor, top = rank_bounds(m, n)
    assert top == ceiling and 1 <= floor < ceiling
    probes = probe_ranks(m, n)
    assert probes[0] == floor and probes[-1] == ceiling and probes == sorted(set(probes))
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):  # one measurement serves every ratio of the paper's grid
        assert floor <= rank_for_ratio(m, n, ratio) <= ceiling


def test_allocate_spends_the_budget_where_the_cost_drops_most():
    sizes = {"steep": 100, "flat": 100, "wide": 200}
    bounds = {"steep": (10, 90), "flat": (10, 90), "wide": (10, 60)}
    curves = {
        "steep": {10: 5.0, 50: 1.0, 90: 0.0},  # truncating it hurts: rank helps a lot
        "flat": {10: 0.2, 50: 0.1, 90: 0.0},  # barely matters
        "wide": {10: 2.0, 60: 0.0},
    }
    budget = 50 * 100 + 50 * 100 + 30 * 200  # uniform: 50, 50, 30
    ranks = allocate(sizes, bounds, curves, budget)
    spent = sum(ranks[k] * sizes[k] for k in sizes)
    assert budget - max(sizes.values()) < spent <= budget
    assert all(bounds[k][0] <= ranks[k] <= bounds[k][1] for k in sizes)
    assert ranks["steep"] > 50 > ranks["flat"]  # rank moved from the flat matrix to the steep one

    def cost(r):
        return sum(_interpolate(curves[k], r[k]) for k in sizes)

    assert cost(ranks) < cost({"steep": 50, "flat": 50, "wide": 30})
    with pytest.raises(ValueError, match="floors alone need"):
        allocate(sizes, bounds, curves, budget=100)


def test_uniform_plan_is_the_paper_rule():
    targets = select_targets(tiny_model("llama"))
    plan = plan_ranks({t.name: t.shape for t in targets}, 0.3)
    for t in targets:
        assert plan.ranks[t.name] == rank_for_ratio(*t.shape, 0.3)
    assert plan.spent == plan.budget and plan.measured is None


def _probe(model, cache_dir, method="asvd-i"):
    from nsvd_lm.calibration import CalibrationConfig, calibrate

    targets = select_targets(model)
    calibration = CalibrationConfig(
        calib_dataset=_calibration_file(), calib_nsamples=4, calib_seqlen=64, cache_dir=str(cache_dir)
    )
    stats = calibrate(model, tokenizer(), calibration, targets, progress=False)
    windows = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    return Probe(model, targets, windows, LayerFactorizer(method, stats), stats, progress=False)


def test_fisher_hooks_give_the_output_gradients_of_every_layer():
    """The leaf trick (no parameter gradients) must give the same ∂L/∂y as a plain backward."""
    model = tiny_model("llama")
    targets = select_targets(model)
    windows = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    fisher = output_fisher(model, targets, windows)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was formed

    outputs = {}

    def keep(name):
        def hook(_module, _args, output):
            outputs[name] = output

        return hook

    handles = [t.module.register_forward_hook(keep(t.name)) for t in targets]
    model.zero_grad()
    loss = model(input_ids=windows, labels=windows, use_cache=False).loss
    for out in outputs.values():
        out.retain_grad()
    loss.backward()
    for h in handles:
        h.remove()
    for t in targets:
        expected = outputs[t.name].grad.double().pow(2).reshape(-1, outputs[t.name].shape[-1]).sum(0)
        torch.testing.assert_close(fisher[t.name], expected, rtol=1e-5, atol=1e-12)
    assert all(float(f.sum()) > 0 for f in fisher.values())  # the gradient reached block 0's q/k/v too


def test_block_replay_reproduces_the_dense_hidden_states():
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    windows = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
        hidden = capture_block_inputs(model, blocks, windows, len(windows), progress=False)[0]
        block_kwargs = capture_block_kwargs(model, blocks, windows)
        torch.testing.assert_close(hidden, reference[0])
        args, kwargs = block_kwargs[0]
        out = blocks[0](hidden, *args, **kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, reference[1])  # the last entry has the final norm applied


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_sensitivity_replays_the_blocks_before_the_matrix_without_changing_a_logit(arch, tmp_path):
    """Skipping the blocks before a probed matrix (their recorded outputs stand in) is exact."""
    from nsvd_lm.allocation import _Swapped

    model = tiny_model(arch)
    probe = _probe(model, tmp_path)
    curves = sensitivity_curves(probe)
    ids = probe.windows
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        for target in probe.targets:
            for k, value in curves[target.name].items():
                with _Swapped(target, probe.approximation(target, k)):  # the full forward, no replay
                    log_probs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
                kl = torch.nn.functional.kl_div(log_probs, reference, log_target=True, reduction="none")
                assert value == pytest.approx(float(kl.sum(-1).mean()), rel=1e-6, abs=1e-12)
    assert any(t.block_index > 0 for t in probe.targets)  # some probes did replay a block
    _, blocks = find_decoder_blocks(model)
    assert all("forward" not in vars(block) for block in blocks)  # every block runs for real again


@pytest.mark.parametrize("criterion", [sensitivity_curves, block_error_curves])
def test_measured_curves_leave_the_model_as_it_was_and_fall_with_the_rank(criterion, tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = _probe(model, tmp_path)
    curves = criterion(probe)
    assert set(curves) == {t.name for t in probe.targets}
    for name, curve in curves.items():
        assert list(curve) == probe_ranks(*next(t for t in probe.targets if t.name == name).shape)
        values = list(curve.values())
        assert min(values) >= 0
        assert values[0] > values[-1]  # more rank, less damage (first vs last probe)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _compress(model, **kwargs):
    from nsvd_lm.compress import compress_model

    kwargs.setdefault("ratio", 0.4)
    return compress_model(
        model,
        tokenizer(),
        calib_dataset=_calibration_file(),
        calib_nsamples=4,
        calib_seqlen=64,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize("criterion", MEASURED)
def test_allocation_keeps_the_uniform_budget_and_caches_its_curves(tmp_path, criterion):
    cache = str(tmp_path / "stats")
    uniform = _compress(tiny_model("llama"), method="nsvd-i", cache_dir=cache)
    shapes = {t.name: t.shape for t in select_targets(tiny_model("llama"))}
    report = _compress(tiny_model("llama"), method="nsvd-i", cache_dir=cache, rank_allocation=criterion)
    record = report.record
    info = record.allocation
    assert record.rank_allocation == criterion and info["curves_cache_hit"] is False
    assert list(tmp_path.glob("stats/allocation-*.json"))
    # Same budget as uniform: the factor pairs' parameters, and the model's removed fraction within 0.1 %.
    assert info["budget"] - max(sum(s) for s in shapes.values()) < info["spent"] <= info["budget"]
    assert info["uniform_ranks"] == uniform.record.ranks
    removed = 1 - record.params_after / record.params_before
    removed_uniform = 1 - uniform.record.params_after / uniform.record.params_before
    assert abs(removed - removed_uniform) <= 0.001
    for name, rank in record.ranks.items():
        floor, ceiling = rank_bounds(*shapes[name])
        assert floor <= rank <= ceiling
    assert record.ranks != uniform.record.ranks  # the budget really moved
    for m in report.modules:  # nested methods split each allocated rank into k1 + k2 as before
        assert m.first_rank + m.residual_rank == m.rank == record.ranks[m.name]
    assert record.seconds["allocation"] > 0

    # Another ratio of the same method reads the curves back instead of measuring them again.
    again = _compress(tiny_model("llama"), method="nsvd-i", cache_dir=cache, rank_allocation=criterion, ratio=0.3)
    assert again.record.allocation["curves_cache_hit"] is True
    assert again.record.allocation["curve_seconds"] == info["curve_seconds"]


@pytest.mark.parametrize("method", ["svd", "asvd-0"])
def test_methods_without_a_gram_take_an_allocation_too(tmp_path, method):
    report = _compress(tiny_model("llama"), method=method, cache_dir=str(tmp_path), rank_allocation="fisher")
    info = report.record.allocation
    assert info["spent"] <= info["budget"] and report.record.ranks != info["uniform_ranks"]


def test_an_allocated_checkpoint_saves_loads_and_exports(tmp_path):
    from nsvd_lm.checkpoint import load_compressed, save_compressed

    model = tiny_model("qwen2")
    report = _compress(model, method="asvd-i", cache_dir=str(tmp_path / "stats"), rank_allocation="block_error")
    assert len(set(report.record.ranks.values())) > 2  # not one rank per shape
    save_compressed(model, tmp_path / "ckpt", tokenizer())
    loaded = load_compressed(tmp_path / "ckpt")
    ranks = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == report.record.ranks
    assert loaded.nsvd_compression["rank_allocation"] == "block_error"
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    pytest.importorskip("onnxruntime")
    from nsvd_lm.export.onnx_export import export_onnx

    exported = export_onnx(loaded.eval(), tmp_path / "onnx", tokenizer=tokenizer())
    assert exported.low_rank_matmul_pairs == exported.low_rank_modules == len(report.record.ranks)
    assert exported.parity_max_abs_diff is not None and exported.parity_max_abs_diff <= 1e-4


def test_an_unknown_allocation_is_refused_naming_the_choices():
    from nsvd_lm.config import CompressionConfig

    with pytest.raises(ValueError, match="rank_allocation='best'.*uniform, sensitivity, fisher, block_error"):
        CompressionConfig(rank_allocation="best")
