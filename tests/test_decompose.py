"""The decomposition math on random matrices (no transformers involved)."""

import math

import pytest
import torch

from nsvd_lm.allocation import rank_for_ratio
from nsvd_lm.config import CompressionConfig, parse_configs
from nsvd_lm.decompose import (
    METHODS,
    WhitenedSVD,
    activation_loss,
    all_finite,
    cholesky_whitening,
    interpolative_decomposition,
    low_rank_factors,
    nested_factors,
    whitened_activation_loss,
    whitening_factor,
)
from nsvd_lm.modules import LowRankLinear

M, N, T = 48, 40, 400


def _problem(seed=0, rank_x=None):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, N, generator=g, dtype=torch.float64)
    if rank_x is None:
        # Anisotropic activations, like an LLM's: a few channels carry most of the energy.
        x = torch.randn(N, T, generator=g, dtype=torch.float64) * torch.logspace(0, 2, N, dtype=torch.float64)[:, None]
    else:
        x = torch.randn(N, rank_x, generator=g, dtype=torch.float64) @ torch.randn(
            rank_x, T, generator=g, dtype=torch.float64
        )
    return weight, x, x @ x.T


def test_asvd_i_activation_loss_equals_truncated_singular_values():
    weight, x, gram = _problem()
    k = 12
    f = low_rank_factors(weight, k, "asvd-i", gram=gram)
    loss = torch.linalg.norm((weight - f.dense()) @ x)
    sigma = torch.linalg.svdvals(weight @ torch.linalg.cholesky(gram))
    assert loss.item() == pytest.approx(math.sqrt(float(sigma[k:].pow(2).sum())), rel=1e-8)
    assert activation_loss(weight, f.dense(), gram) == pytest.approx(loss.item(), rel=1e-8)


# rank_x=25 < N: a singular G (Cholesky needs its shift, the eigen kinds drop the null space).
@pytest.mark.parametrize("rank_x", [None, 25])
@pytest.mark.parametrize("method", ["asvd-i", "asvd-ii", "nsvd-i", "nsvd-ii", "nid-i", "nid-ii"])
def test_loss_read_off_the_whitened_svd_equals_the_direct_loss(method, rank_x):
    weight, _, gram = _problem(5, rank_x)
    k = 14
    svd = WhitenedSVD(weight, whitening_factor(method, gram))
    assert (svd.whitening.shift > 0) == (rank_x is not None and method.endswith("-i"))
    f = nested_factors(weight, svd, k, method, k1_frac=0.7)
    loss, reference = whitened_activation_loss(svd, f)
    assert loss == pytest.approx(activation_loss(weight, f.dense(), gram), rel=1e-7)
    assert reference == pytest.approx(activation_loss(weight, torch.zeros_like(weight), gram), rel=1e-7)


def test_loss_shortcut_takes_a_large_cholesky_shift_back_out():
    from nsvd_lm.decompose import Whitening

    weight, _, gram = _problem(7)
    shift = 0.3 * float(gram.diagonal().mean())  # far larger than any real shift: the term must be right
    eye = torch.eye(N, dtype=gram.dtype)
    whitening = Whitening(
        "cholesky", torch.linalg.cholesky(gram + shift * eye), shift=shift, lower_cholesky=True, gram_exact=True
    )
    svd = WhitenedSVD(weight, whitening)
    for method in ("asvd-i", "nsvd-i", "nid-i"):
        f = nested_factors(weight, svd, 12, method, k1_frac=0.6)
        loss, reference = whitened_activation_loss(svd, f)
        assert loss == pytest.approx(activation_loss(weight, f.dense(), gram), rel=1e-7)
        assert reference == pytest.approx(activation_loss(weight, torch.zeros_like(weight), gram), rel=1e-7)


def test_loss_shortcut_declines_where_s_st_is_not_g():
    weight, x, gram = _problem(6)
    cases = [
        whitening_factor("asvd-0", mean_abs=x.abs().mean(1)),
        whitening_factor("asvd-iii", gram, asvd3_beta=0.3),
        whitening_factor("svd"),
    ]
    for whitening in cases:
        svd = WhitenedSVD(weight, whitening)
        assert whitened_activation_loss(svd, nested_factors(weight, svd, 8, "asvd-i")) is None
    lowrank = WhitenedSVD(weight, cholesky_whitening(gram), driver="lowrank", max_rank=8)
    assert whitened_activation_loss(lowrank, nested_factors(weight, lowrank, 8, "asvd-i")) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value(bad):
    t = torch.randn(30, 20)
    assert all_finite(t) and all_finite(torch.empty(0))
    t[17, 3] = bad
    assert not all_finite(t)
    assert not all_finite(t.to(torch.float16))


def test_asvd_i_is_optimal_among_methods_in_activation_loss():
    weight, x, gram = _problem(1)
    k = 10
    losses = {
        m: activation_loss(weight, low_rank_factors(weight, k, m, gram=gram, mean_abs=x.abs().mean(1)).dense(), gram)
        for m in ("svd", "asvd-0", "asvd-i", "nsvd-i", "nid-i")
    }
    assert losses["asvd-i"] <= min(losses.values()) + 1e-9
    assert losses["svd"] > losses["asvd-0"] > losses["asvd-i"]


def test_asvd_i_and_asvd_ii_agree_for_full_rank_x():
    weight, _, gram = _problem(2)
    a = low_rank_factors(weight, 9, "asvd-i", gram=gram).dense()
    b = low_rank_factors(weight, 9, "asvd-ii", gram=gram).dense()
    assert torch.linalg.norm(a - b) / torch.linalg.norm(a) < 1e-6


def test_asvd_ii_finite_for_rank_deficient_x_while_asvd_i_needs_shift():
    weight, x, gram = _problem(3, rank_x=20)
    whitening = cholesky_whitening(gram)
    assert whitening.shift > 0
    f1 = low_rank_factors(weight, 8, "asvd-i", gram=gram)
    f2 = low_rank_factors(weight, 8, "asvd-ii", gram=gram)
    assert torch.isfinite(f1.dense()).all() and torch.isfinite(f2.dense()).all()
    assert f1.gram_shift > 0 and f2.gram_shift == 0
    # ASVD-II is exact on the 20-dim range of X: its activation loss is the optimal rank-8 one.
    best = torch.linalg.svdvals(weight @ x)[8:].pow(2).sum().sqrt()
    assert torch.linalg.norm((weight - f2.dense()) @ x).item() == pytest.approx(best.item(), rel=1e-6)


@pytest.mark.parametrize("family", ["i", "ii"])
def test_nested_limits(family):
    weight, _, gram = _problem(4)
    k = 11
    nested_full = low_rank_factors(weight, k, f"nsvd-{family}", gram=gram, k1_frac=1.0).dense()
    asvd = low_rank_factors(weight, k, f"asvd-{family}", gram=gram).dense()
    assert torch.allclose(nested_full, asvd, atol=1e-10)
    nested_zero = low_rank_factors(weight, k, f"nsvd-{family}", gram=gram, k1_frac=0.0).dense()
    svd = low_rank_factors(weight, k, "svd").dense()
    assert torch.allclose(nested_zero, svd, atol=1e-10)


def test_nsvd_splits_rank_and_improves_plain_weight_error_over_asvd():
    weight, _, gram = _problem(5)
    k = 12
    f = low_rank_factors(weight, k, "nsvd-i", gram=gram, k1_frac=0.75)
    assert (f.first_rank, f.residual_rank, f.rank) == (9, 3, 12)
    asvd = low_rank_factors(weight, k, "asvd-i", gram=gram)
    # The residual step spends its rank on W itself: plain Frobenius error drops.
    assert torch.linalg.norm(weight - f.dense()) < torch.linalg.norm(weight - asvd.dense())


def test_nid_residual_factor_is_made_of_real_residual_columns():
    weight, _, gram = _problem(6)
    k = 10
    f = low_rank_factors(weight, k, "nid-i", gram=gram, k1_frac=0.7)
    k1 = f.first_rank
    up1, down1 = f.up[:, :k1], f.down[:k1]
    residual = weight - up1 @ down1
    skeleton = f.up[:, k1:]
    for j in range(skeleton.shape[1]):
        distances = (residual - skeleton[:, j : j + 1]).abs().amax(0)
        assert float(distances.min()) < 1e-12, "skeleton column is not a column of the residual"


def test_interpolative_decomposition_exact_on_low_rank_matrix():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 25, generator=g, dtype=torch.float64)
    cols, interp = interpolative_decomposition(a, 5)
    assert torch.allclose(cols @ interp, a, atol=1e-9)


@pytest.mark.parametrize("m,n,ratio", [(576, 576, 0.4), (1536, 576, 0.2), (4096, 11008, 0.5), (64, 64, 0.5)])
def test_rank_formula_and_parameter_count(m, n, ratio):
    k = rank_for_ratio(m, n, ratio)
    assert k == math.floor((1 - ratio) * m * n / (m + n) + 1e-9)
    params = k * (m + n)
    assert params <= (1 - ratio) * m * n + 1e-6
    assert (k + 1) * (m + n) > (1 - ratio) * m * n  # the largest such rank


@pytest.mark.parametrize("method", METHODS)
def test_factored_module_reproduces_dense_reconstruction(method):
    weight, x, gram = _problem(8)
    f = low_rank_factors(weight, 10, method, gram=gram, mean_abs=x.abs().mean(1))
    bias = torch.randn(M, dtype=torch.float64)
    module = LowRankLinear.from_factors(f.up, f.down, bias, method=method, dtype=torch.float64)
    inputs = torch.randn(7, N, dtype=torch.float64)
    expected = inputs @ f.dense().T + bias
    assert torch.allclose(module(inputs), expected, atol=1e-10)
    assert module.rank == 10 and sum(p.numel() for p in module.parameters()) == 10 * (M + N) + M


def test_whitened_svd_is_reused_across_ranks():
    weight, _, gram = _problem(9)
    svd = WhitenedSVD(weight, cholesky_whitening(gram))
    for k in (3, 8, 15):
        up, down = svd.factors(k)
        direct = low_rank_factors(weight, k, "asvd-i", gram=gram).dense()
        assert torch.allclose(up @ down, direct, atol=1e-9)


def test_lowrank_driver_close_to_exact():
    weight, _, gram = _problem(10)
    exact = low_rank_factors(weight, 8, "asvd-i", gram=gram)
    approx = low_rank_factors(weight, 8, "asvd-i", gram=gram, svd_driver="lowrank")
    e1 = activation_loss(weight, exact.dense(), gram)
    e2 = activation_loss(weight, approx.dense(), gram)
    assert e1 <= e2 <= e1 * 1.05


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"method": "foo"}, "method='foo'"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 0}, "ratio"),
        ({"k1_frac": 1.5}, "k1_frac"),
        ({"calib_nsamples": 0}, "calib_nsamples"),
        ({"svd_driver": "magic"}, "svd_driver"),
    ],
)
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        parse_configs(**kwargs)


def test_config_aliases_and_unknown_keys():
    assert CompressionConfig(method="SVD-LLM").method == "asvd-i"
    with pytest.raises(ValueError, match="unknown compression argument"):
        CompressionConfig.from_kwargs(methd="svd")
    cfg = CompressionConfig.from_kwargs(method="nid-ii", ratio="0.3", exclude="*.mlp.*|*.o_proj")
    assert cfg.ratio == 0.3 and cfg.exclude == ("*.mlp.*", "*.o_proj")
