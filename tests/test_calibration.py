"""The calibration statistics themselves: the accumulated Gram matrix against XᵀX on random data."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from nsvd_lm import calibration  # noqa: E402
from nsvd_lm.targets import Target  # noqa: E402


class _Shared(nn.Module):
    """Two layers fed the very same tensor (like q/k/v) and one fed another tensor."""

    def __init__(self, n: int = 24):
        super().__init__()
        self.q = nn.Linear(n, 8)
        self.k = nn.Linear(n, 8)
        self.o = nn.Linear(8, n)

    def forward(self, x):
        return self.o(self.q(x) + self.k(x))


def _accumulate(module: _Shared, batches: list[torch.Tensor]) -> calibration._BlockAccumulator:
    targets = [Target("q", 0, module.q), Target("k", 0, module.k), Target("o", 0, module.o)]
    with calibration._BlockAccumulator(targets, want_gram=True, want_abs=True) as acc:
        for batch in batches:
            module(batch)
            acc.end_batch()
    return acc


@pytest.mark.parametrize(
    "n_batches", [1, calibration.FLUSH_EVERY - 1, calibration.FLUSH_EVERY, 2 * calibration.FLUSH_EVERY + 3]
)
def test_gram_equals_xtx_across_float32_to_float64_flushes(n_batches):
    """Each batch's product is summed in float32 and folded into float64 every FLUSH_EVERY batches."""
    torch.manual_seed(0)
    module = _Shared()
    # Values with a large common offset: float32 sums of many batches would drift visibly.
    batches = [torch.randn(3, 5, 24) + 10.0 for _ in range(n_batches)]
    acc = _accumulate(module, batches)

    x = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    expected = x.T @ x  # an independent float64 XᵀX over every row of every batch
    assert acc.module_to_key == {"q": "q", "k": "q", "o": "o"}  # k shares q's input: one G
    assert set(acc.gram) == {"q", "o"}
    gram = acc.gram["q"].double()
    assert torch.allclose(gram, gram.T)  # the triangle was made symmetric
    assert torch.allclose(gram, expected, rtol=1e-6, atol=1e-3)
    assert torch.allclose(acc.abs_sum["q"], x.abs().sum(0), rtol=1e-6)
    # One flush: kept as float32 (stored so anyway); past one flush the total is float64 (no drift).
    assert acc.gram["q"].dtype == (torch.float64 if n_batches > calibration.FLUSH_EVERY else torch.float32)

    with torch.no_grad():
        hidden = torch.cat([module.q(b).reshape(-1, 8) + module.k(b).reshape(-1, 8) for b in batches]).double()
    assert torch.allclose(acc.gram["o"].double(), hidden.T @ hidden, rtol=1e-5, atol=1e-2)


def test_float64_flush_beats_a_float32_running_sum():
    """Why the flush exists: the same data summed in float32 all the way drifts more than our total."""
    torch.manual_seed(1)
    module = _Shared()
    batches = [torch.randn(4, 8, 24) + 30.0 for _ in range(8 * calibration.FLUSH_EVERY)]
    acc = _accumulate(module, batches)
    x = torch.cat([b.reshape(-1, 24) for b in batches])
    exact = x.double().T @ x.double()
    naive = torch.zeros(24, 24)
    for b in batches:
        rows = b.reshape(-1, 24)
        naive += rows.T @ rows
    ours = (acc.gram["q"].double() - exact).abs().max()
    float32_only = (naive.double() - exact).abs().max()
    assert ours < float32_only
