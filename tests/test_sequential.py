"""Sequential (propagation-aware) compression (issue 21): block l's statistics come from the outputs of
blocks < l already compressed; every method with statistics and every allocation; its own cache entry;
save/load/export; bad input refused before any heavy work."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from onnx_models import _calibration_file, tiny_model, tokenizer

from nsvd_lm.calibration import CalibrationConfig, calibration_token_windows, load_cached_statistics
from nsvd_lm.config import CompressionConfig
from nsvd_lm.modules import LowRankLinear, find_decoder_blocks
from nsvd_lm.targets import select_targets


def _calibration(cache_dir) -> CalibrationConfig:
    return CalibrationConfig(
        calib_dataset=_calibration_file(), calib_nsamples=4, calib_seqlen=64, cache_dir=str(cache_dir)
    )


def _compress(model, cache_dir, **kwargs):
    from nsvd_lm.compress import compress_model

    kwargs.setdefault("ratio", 0.4)
    return compress_model(model, tokenizer(), calibration=_calibration(cache_dir), progress=False, **kwargs)


def _entries(cache_dir) -> dict[str, dict]:
    """meta.json of every statistics entry in ``cache_dir``, by folder name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(cache_dir.glob("*/meta.json"))}


def _sequential_entry(cache_dir):
    (folder,) = [name for name, meta in _entries(cache_dir).items() if "sequential" in meta]
    return cache_dir / folder


def _inputs_by_hand(model, targets_of_block, windows) -> dict[str, torch.Tensor]:
    """Every token's input row (float64) of each given layer, from plain forwards of ``model`` over ``windows``."""
    rows: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(_module, args):
            rows.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

        return hook

    handles = [module.register_forward_pre_hook(keep(name)) for name, module in targets_of_block]
    with torch.no_grad():
        for window in windows:
            model(window[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_block_statistics_are_those_of_the_compressed_prefix(tmp_path, arch):
    """Block l's cached G̃ equals X̃ᵀX̃ at block l's dense layers with blocks < l replaced by their compressed
    versions, and C = XᵀX̃ against the dense model's inputs X, both by hand with plain forwards; block
    0's G̃ equals the dense model's G."""
    cache = tmp_path / "stats"
    compressed = tiny_model(arch)
    report = _compress(compressed, cache, method="asvd-i", sequential=True)
    assert report.record.sequential is True and report.record.stats_cache_hit is False
    assert len(_entries(cache)) == 1  # uniform ranks need no dense statistics at all
    windows = calibration_token_windows(tokenizer(), _calibration(cache))[0]
    stats = load_cached_statistics(_sequential_entry(cache), select_targets(tiny_model(arch)))

    _, compressed_blocks = find_decoder_blocks(compressed)
    for block in range(len(compressed_blocks)):
        hybrid = tiny_model(arch)  # dense, then blocks < l swapped for the compressed ones
        _, blocks = find_decoder_blocks(hybrid)
        for earlier in range(block):
            blocks[earlier] = copy.deepcopy(compressed_blocks[earlier])
        layers = [(t.name, t.module) for t in select_targets(hybrid) if t.block_index == block]
        compressed_inputs = _inputs_by_hand(hybrid, layers, windows)
        dense = tiny_model(arch)
        dense_inputs = _inputs_by_hand(dense, [(t.name, t.module) for t in select_targets(dense)], windows)
        for name, _ in layers:
            if stats.module_to_key[name] != name:
                continue  # shares an earlier layer's input (q/k/v, gate/up): one G
            x_tilde, x = compressed_inputs[name], dense_inputs[name]
            torch.testing.assert_close(stats.gram(name), x_tilde.T @ x_tilde, rtol=2e-5, atol=1e-4)
            torch.testing.assert_close(stats.cross(name), x.T @ x_tilde, rtol=2e-5, atol=1e-4)
            if block == 0:
                torch.testing.assert_close(stats.cross(name), stats.gram(name), rtol=2e-5, atol=1e-4)
    assert isinstance(compressed_blocks[0].self_attn.q_proj, LowRankLinear)

    # Against the dense statistics: block 0 alike (nothing before it is compressed), block 1 not.
    dense = _compress(tiny_model(arch), tmp_path / "dense", method="asvd-i")
    dense_stats = load_cached_statistics(
        next((tmp_path / "dense").glob("*/meta.json")).parent, select_targets(tiny_model(arch))
    )
    assert dense.record.sequential is False
    name0, name1 = (f"model.layers.{i}.mlp.down_proj" for i in (0, 1))
    assert torch.equal(stats.gram(name0), dense_stats.gram(name0))
    difference = (stats.gram(name1) - dense_stats.gram(name1)).norm() / dense_stats.gram(name1).norm()
    assert difference > 1e-3


def test_propagation_target_is_the_least_squares_map_to_the_dense_outputs():
    from nsvd_lm.decompose import propagation_target, truncated_svd

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    x = torch.randn(8, 200, generator=generator, dtype=torch.float64)  # dense inputs (n × tokens)
    x_tilde = x + 0.3 * torch.randn(8, 200, generator=generator, dtype=torch.float64)  # after compression upstream
    gram, cross = x_tilde @ x_tilde.T, x @ x_tilde.T
    # Unperturbed inputs: W itself, with or without the ridge.
    torch.testing.assert_close(propagation_target(weight, x @ x.T, x @ x.T), weight)
    target = propagation_target(weight, gram, cross, ridge=0.0)
    torch.testing.assert_close(target, torch.linalg.lstsq(x_tilde.T, (weight @ x).T).solution.T)
    # ‖W X − Ŵ X̃‖² = ‖W X − W* X̃‖² + ‖(W* − Ŵ) X̃‖² for any Ŵ: fitting W* on X̃ fits the dense outputs.
    up, down = truncated_svd(weight, 3)
    for approx in (torch.zeros_like(weight), up @ down):
        total = (weight @ x - approx @ x_tilde).pow(2).sum()
        parts = (weight @ x - target @ x_tilde).pow(2).sum() + ((target - approx) @ x_tilde).pow(2).sum()
        torch.testing.assert_close(total, parts)
    # The ridge pulls toward W where X̃ has no energy (here: a channel X̃ never uses).
    x_tilde[3] = 0.0
    ridged = propagation_target(weight, x_tilde @ x_tilde.T, x @ x_tilde.T)
    torch.testing.assert_close(ridged[:, 3], weight[:, 3])


def _factors(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("method", ["asvd-0", "nsvd-i", "nid-ii"])
def test_sequential_differs_after_block_0_and_reruns_from_its_own_cache_entry(tmp_path, method):
    cache = tmp_path / "stats"
    plain_model = tiny_model("llama")
    plain = _compress(plain_model, cache, method=method)
    first_model = tiny_model("llama")
    first = _compress(first_model, cache, method=method, sequential=True)
    # The sequential run did not read the dense entry: it computed its own.
    assert first.record.stats_cache_hit is False and len(_entries(cache)) == 2
    for m in first.modules:  # nested methods keep their k1 + k2 split
        assert m.first_rank + m.residual_rank == m.rank == plain.record.ranks[m.name]
    plain_factors, sequential_factors = _factors(plain_model), _factors(first_model)
    for name, weight in sequential_factors.items():
        if ".layers.0." in name:
            assert torch.equal(weight, plain_factors[name])
        else:
            assert not torch.allclose(weight, plain_factors[name], rtol=1e-4, atol=1e-6)

    # Again: from the sequential entry, the very same factors; and a dense run still reads the dense entry.
    again_model = tiny_model("llama")
    again = _compress(again_model, cache, method=method, sequential=True)
    assert again.record.stats_cache_hit is True and len(_entries(cache)) == 2
    assert all(torch.equal(w, sequential_factors[n]) for n, w in _factors(again_model).items())
    dense_again = _compress(tiny_model("llama"), cache, method=method)
    assert dense_again.record.stats_cache_hit is True and dense_again.record.sequential is False
    # Another ratio (other ranks) is another sequential entry.
    _compress(tiny_model("llama"), cache, method=method, sequential=True, ratio=0.3)
    assert len(_entries(cache)) == 3


def test_sequential_with_a_measured_allocation_keeps_its_dense_ranks_and_saves_loads_exports(tmp_path):
    from nsvd_lm.checkpoint import load_compressed, save_compressed

    cache = tmp_path / "stats"
    allocated = _compress(tiny_model("qwen2"), cache, method="nsvd-i", rank_allocation="fisher")
    model = tiny_model("qwen2")
    report = _compress(model, cache, method="nsvd-i", rank_allocation="fisher", sequential=True)
    record = report.record
    # Ranks decided on the dense model (curves read back from the cache), then fitted sequentially.
    assert record.allocation["curves_cache_hit"] is True
    assert record.ranks == allocated.record.ranks != record.allocation["uniform_ranks"]
    assert record.sequential and record.seconds["sequential"] > 0
    (sequential_meta,) = [m for m in _entries(cache).values() if "sequential" in m]
    assert sequential_meta["sequential"]["ranks"] == record.ranks
    assert sequential_meta["sequential"]["rank_allocation"] == "fisher"

    save_compressed(model, tmp_path / "ckpt", tokenizer())
    loaded = load_compressed(tmp_path / "ckpt")
    assert loaded.nsvd_compression["sequential"] is True
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    pytest.importorskip("onnxruntime")
    from nsvd_lm.export.onnx_export import export_onnx

    exported = export_onnx(loaded.eval(), tmp_path / "onnx", tokenizer=tokenizer())
    assert exported.low_rank_matmul_pairs == len(record.ranks)
    assert exported.parity_max_abs_diff is not None and exported.parity_max_abs_diff <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sequential_factors_fit_the_dense_outputs_better_on_the_compressed_inputs(tmp_path, arch):
    """Each layer after block 0: ‖W X − Ŵ X̃‖ (the dense outputs against what the compressed model computes
    from its own inputs X̃) is lower with the sequential factors than with the dense-fitted ones (asvd-i:
    the sequential fit is the optimum of this objective, up to the ridge). On a 2-block random model the
    end-to-end effect is within noise, so the claim tested is the layer objective."""
    cache = tmp_path / "stats"
    dense_model, sequential_model = tiny_model(arch), tiny_model(arch)
    _compress(dense_model, cache, method="asvd-i")
    _compress(sequential_model, cache, method="asvd-i", sequential=True)
    targets = select_targets(tiny_model(arch))
    entries = _entries(cache)
    stats = load_cached_statistics(_sequential_entry(cache), targets)
    (dense_folder,) = [name for name, meta in entries.items() if "sequential" not in meta]
    dense_stats = load_cached_statistics(cache / dense_folder, targets)
    dense_factors, sequential_factors = _factors(dense_model), _factors(sequential_model)
    checked = 0
    for target in targets:
        if target.block_index == 0:
            continue
        w = target.dense_weight().detach().double()
        g_dense, g_tilde, cross = dense_stats.gram(target.name), stats.gram(target.name), stats.cross(target.name)

        def error(approx):  # ‖W X − Ŵ X̃‖² from the statistics
            approx = approx.double()
            return float(
                ((w @ g_dense) * w).sum() - 2 * ((w @ cross) * approx).sum() + ((approx @ g_tilde) * approx).sum()
            )

        assert error(sequential_factors[target.name]) < error(dense_factors[target.name])
        checked += 1
    assert checked == len(targets) // 2


# ----------------------------------------------------------------------------- one name everywhere, bad input


def test_one_switch_everywhere():
    from nsvd_lm.commands.compress import register
    from nsvd_lm.config import configs_from_arguments, parse_configs

    assert CompressionConfig().sequential is False
    assert parse_configs(sequential="true")[0].sequential is True  # lm-eval model_args strings
    assert parse_configs(sequential="False")[0].sequential is False
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["compress", "--sequential", "--out", "x"])
    assert configs_from_arguments(args)[0].sequential is True
    args = parser.parse_args(["compress", "--out", "x"])
    assert configs_from_arguments(args)[0].sequential is False


def test_bad_sequential_input_is_refused_naming_the_allowed_values():
    with pytest.raises(
        ValueError, match=r"sequential=True .*method=svd.*allowed methods with sequential: asvd-0, asvd-i"
    ):
        CompressionConfig(method="svd", sequential=True)
    with pytest.raises(ValueError, match=r"sequential='maybe' is not a switch; allowed values: true, false"):
        CompressionConfig(sequential="maybe")
    with pytest.raises(ValueError, match="rank_allocation='best'; allowed values: uniform, sensitivity, fisher"):
        CompressionConfig(rank_allocation="best", sequential=True)
    assert CompressionConfig(method="svd", rank_allocation="fisher").sequential is False  # allocation alone: fine


def test_lm_eval_refuses_bad_sequential_input_before_loading_anything(tmp_path):
    from nsvd_lm.lmeval.adapter import NSVDLM

    missing = str(tmp_path / "no-such-model")  # loading it would fail differently
    with pytest.raises(ValueError, match="sequential=True .*method=svd"):
        NSVDLM(pretrained=missing, ratio=0.4, method="svd", sequential=True)
    with pytest.raises(ValueError, match="rank_allocation='best'; allowed values"):
        NSVDLM(pretrained=missing, ratio=0.4, rank_allocation="best", sequential="true")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "svd", "--sequential"], "sequential=True collects calibration statistics"),
        (["--rank-allocation", "best", "--sequential"], "invalid choice: 'best'"),
    ],
)
def test_cli_refuses_bad_sequential_input_before_loading_the_model(tmp_path, flags, message):
    missing = str(tmp_path / "no-such-model")
    run = subprocess.run(
        [sys.executable, "-m", "nsvd_lm", "compress", "--model", missing, "--out", str(tmp_path / "out"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and message in run.stderr
    assert "no-such-model" not in run.stderr  # refused before the model was looked at
    assert not (tmp_path / "out").exists()


def test_sequential_through_lm_eval_model_args_and_the_cli(tiny_model_dir, calib_file, tmp_path):
    """``sequential=true`` in an lm-eval arg string and ``--sequential`` on the CLI: the same sequential entry."""
    from nsvd_lm.lmeval.adapter import NSVDLM

    cache = tmp_path / "stats"
    common = f"calib_dataset={calib_file},calib_nsamples=4,calib_seqlen=32,cache_dir={cache}"
    lm = NSVDLM.create_from_arg_string(
        f"pretrained={tiny_model_dir},method=asvd-i,ratio=0.4,sequential=true,dtype=float32,{common}",
        {"device": "cpu", "batch_size": 1},
    )
    block = lm.compression_info
    assert block["sequential"] is True and block["stats_cache_hit"] is False and block["seconds"]["sequential"] > 0
    run = subprocess.run(
        [sys.executable, "-m", "nsvd_lm", "compress", "--model", str(tiny_model_dir), "--method", "asvd-i"]
        + ["--ratio", "0.4", "--sequential", "--calib-dataset", str(calib_file), "--calib-nsamples", "4"]
        + ["--calib-seqlen", "32", "--cache-dir", str(cache), "--dtype", "float32", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["nsvd_compression"]
    assert saved["sequential"] is True and saved["stats_cache_hit"] is True  # the lm-eval run's sequential entry
    assert len(_entries(cache)) == 1
