"""compress_model / save_compressed / load_compressed on tiny models of every supported architecture."""

import copy
import json

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from nsvd_lm import calibration
from nsvd_lm.allocation import rank_for_ratio
from nsvd_lm.checkpoint import is_compressed_checkpoint, load_compressed, save_compressed
from nsvd_lm.compress import compress_model
from nsvd_lm.config import parse_configs
from nsvd_lm.decompose import METHODS
from nsvd_lm.modules import LowRankLinear, is_linear

CALIB = dict(calib_nsamples=4, calib_seqlen=32, calib_batch_size=2)


def _config(calib_path, cache_dir, **kw):
    """Flat compress_model keywords: compression and calibration settings."""
    return dict(calib_dataset=str(calib_path), cache_dir=str(cache_dir), **{**CALIB, **kw})


def _calibration(calib_path, cache_dir):
    return parse_configs(**_config(calib_path, cache_dir))[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_compresses_and_reloads(arch, tokenizer, calib_file, tmp_path, calibration_forwards):
    base = tiny_model(arch, len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = base(ids).logits
    runs_before = calibration_forwards.count
    for method in METHODS:
        model = copy.deepcopy(base)
        report = compress_model(
            model, tokenizer, **_config(calib_file, tmp_path / "stats", method=method, ratio=0.3), progress=False
        )
        factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        assert factored and all(m.method == method for m in factored)
        # Nothing dense is left inside the decoder blocks; embeddings / lm_head untouched.
        assert report.params_after < report.params_before
        for mod in report.modules:
            assert mod.rank == rank_for_ratio(mod.out_features, mod.in_features, 0.3)
            assert mod.params_after == mod.rank * (mod.out_features + mod.in_features) + (
                mod.params_before - mod.out_features * mod.in_features
            )
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, dense_logits)  # it really changed the model
    # One calibration forward served all nine methods.
    assert calibration_forwards.count - runs_before == 1

    # Save -> load gives bit-identical logits (last method: nid-ii).
    out = save_compressed(model, tmp_path / "ckpt", tokenizer)
    assert is_compressed_checkpoint(out)
    reloaded = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    assert {n for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == {
        n for n, m in model.named_modules() if isinstance(m, LowRankLinear)
    }


def test_checkpoint_layout_and_plain_transformers_load_is_loud(tokenizer, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_model("llama", len(tokenizer))
    compress_model(
        model,
        tokenizer,
        **_config(calib_file, tmp_path / "stats", method="nsvd-i", ratio=0.4, k1_frac=0.9),
        progress=False,
    )
    out = save_compressed(model, tmp_path / "ckpt", tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_type"] == "llama" and config["model_type"] == "nsvd_lm"
    section = config["nsvd_compression"]
    assert section["method"] == "nsvd-i" and section["ratio"] == 0.4 and section["k1_frac"] == 0.9
    assert section["ranks"]["model.layers.0.mlp.down_proj"] == rank_for_ratio(64, 112, 0.4)
    assert section["calibration"]["nsamples"] == CALIB["calib_nsamples"]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp")]
    # Plain transformers refuses it and says how to load it (the folder carries HF custom code).
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]
    # An occupied output folder is refused unless overwrite=True.
    with pytest.raises(FileExistsError):
        save_compressed(model, out, tokenizer)
    save_compressed(model, out, tokenizer, overwrite=True)


@pytest.mark.parametrize("flush_every", [16, 1])  # one flush at the end / one per batch
def test_shared_inputs_share_one_gram(tokenizer, calib_file, tmp_path, monkeypatch, flush_every):
    from nsvd_lm.compress import get_statistics

    monkeypatch.setattr(calibration, "FLUSH_EVERY", flush_every)

    model = tiny_model("llama", len(tokenizer))
    stats = get_statistics(model, tokenizer, _calibration(calib_file, tmp_path / "stats"), progress=False)
    keys = stats.module_to_key
    prefix = "model.layers.1."
    assert keys[prefix + "self_attn.k_proj"] == keys[prefix + "self_attn.q_proj"] == keys[prefix + "self_attn.v_proj"]
    assert keys[prefix + "mlp.up_proj"] == keys[prefix + "mlp.gate_proj"]
    assert keys[prefix + "self_attn.o_proj"] == prefix + "self_attn.o_proj"
    assert keys[prefix + "mlp.down_proj"] == prefix + "mlp.down_proj"
    # The streamed G equals X Xᵀ of the inputs captured directly by a hook on the full model.
    captured = []
    handle = model.get_submodule(prefix + "mlp.down_proj").register_forward_pre_hook(
        lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    from nsvd_lm.calib_data import load_calibration_text
    from nsvd_lm.windows import calibration_windows

    windows = calibration_windows(tokenizer, load_calibration_text(str(calib_file)).text, 4, 32, 3)
    with torch.no_grad():
        model(windows, use_cache=False)
    handle.remove()
    x = torch.cat(captured).double()
    expected = x.T @ x
    got = stats.gram(prefix + "mlp.down_proj")
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert stats.token_count == 4 * 32
    assert torch.allclose(stats.mean_abs(prefix + "mlp.down_proj"), x.abs().mean(0), rtol=1e-5)
    assert torch.equal(got, got.T)  # symmetric (the CPU path accumulates one triangle)


def test_include_exclude(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    report = compress_model(model, method="svd", ratio=0.5, exclude="*.mlp.*", progress=False)
    names = {m.name for m in report.modules}
    assert names and all(".self_attn." in n for n in names)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    model = tiny_model("llama", len(tokenizer))
    report = compress_model(model, method="svd", ratio=0.5, include="down_proj", progress=False)
    assert {m.name for m in report.modules} == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    with pytest.raises(ValueError, match="outside the decoder blocks"):
        compress_model(tiny_model("llama", len(tokenizer)), method="svd", ratio=0.5, include="lm_head")
    with pytest.raises(ValueError, match="no compressible linear layers"):
        compress_model(tiny_model("llama", len(tokenizer)), method="svd", ratio=0.5, exclude="*")


def test_bad_input_fails_before_heavy_work(tokenizer, calib_file, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="calib_seqlen=4096 exceeds"):
        compress_model(model, tokenizer, **_config(calib_file, tmp_path / "s", method="asvd-i", calib_seqlen=4096))
    with pytest.raises(ValueError, match="needs calibration"):
        compress_model(model, None, **_config(calib_file, tmp_path / "s", method="nsvd-i"))
    with pytest.raises(FileNotFoundError, match="calib_dataset"):
        compress_model(model, tokenizer, **_config(tmp_path / "nope.txt", tmp_path / "s", method="nsvd-i"))
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compress_model(model, tokenizer, method="svd", ratio=0.3)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_corrupt_cache_is_a_clear_error(tokenizer, calib_file, tmp_path):
    from nsvd_lm.compress import get_statistics

    cfg = _config(calib_file, tmp_path / "stats", method="asvd-i")
    stats = get_statistics(
        tiny_model("llama", len(tokenizer)), tokenizer, _calibration(calib_file, tmp_path / "stats"), progress=False
    )
    (stats.path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt calibration cache"):
        compress_model(tiny_model("llama", len(tokenizer)), tokenizer, **cfg, progress=False)
    stats.path.joinpath("meta.json").write_text(
        json.dumps(
            {**stats.meta, "module_to_key": stats.module_to_key, "key_to_file": stats.key_to_file, "token_count": 1}
        )
    )
    next(stats.path.glob("block_*.safetensors")).unlink()
    with pytest.raises(ValueError, match="does not match"):
        compress_model(tiny_model("llama", len(tokenizer)), tokenizer, **cfg, progress=False)


def test_gpt2_conv1d_is_factored_in_the_right_orientation(tokenizer):
    model = tiny_model("gpt2", len(tokenizer))
    conv = model.transformer.h[0].attn.c_attn
    assert is_linear(conv) and conv.weight.shape == (64, 192)  # Conv1D stores (in, out)
    x = torch.randn(3, 64)
    with torch.no_grad():
        dense = conv(x)
    compress_model(model, method="svd", ratio=0.1, progress=False)
    low = model.transformer.h[0].attn.c_attn
    assert isinstance(low, LowRankLinear) and (low.in_features, low.out_features) == (64, 192)
    with torch.no_grad():
        rel = (low(x) - dense).norm() / dense.norm()
    assert rel < 0.6  # a 90%-of-parameters low-rank copy of the same map, not garbage


def test_already_compressed_model_is_refused(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    compress_model(model, method="svd", ratio=0.3, progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        compress_model(model, method="svd", ratio=0.3, progress=False)


def test_svd_cache_reuses_first_step_across_ratios_and_k1(tokenizer, calib_file, tmp_path):
    base = tiny_model("llama", len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (1, 10), generator=torch.Generator().manual_seed(2))
    cache: dict = {}
    grid = [("asvd-i", 0.3, 0.95), ("nsvd-i", 0.3, 0.9), ("nid-i", 0.5, 0.8), ("nsvd-ii", 0.3, 0.9)]
    for method, ratio, k1 in grid:
        cfg = _config(calib_file, tmp_path / "stats", method=method, ratio=ratio, k1_frac=k1)
        cached_model, fresh_model = copy.deepcopy(base), copy.deepcopy(base)
        compress_model(cached_model, tokenizer, **cfg, progress=False, svd_cache=cache)
        compress_model(fresh_model, tokenizer, **cfg, progress=False)
        with torch.no_grad():
            assert torch.allclose(cached_model(ids).logits, fresh_model(ids).logits, atol=1e-5)
    n_targets = 14
    # One whitened SVD per matrix for the asvd-i family (shared by asvd-i, nsvd-i, nid-i) + asvd-ii.
    assert len(cache) == 2 * n_targets
