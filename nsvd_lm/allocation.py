"""Rank allocation: how one parameter budget is spread over the target matrices (issue 12).

The paper gives every matrix the same ratio, ``k = rank_for_ratio(m, n, ratio)`` (``uniform``,
the default). Every other allocation keeps exactly that budget, ``B = Σ_i k_i^uniform (m_i + n_i)``
parameters in the factor pairs of the same target layers, and moves rank to where a criterion
says it buys the most. A criterion measures, for each matrix alone, a curve ``c_i(k)``: what the
method's own rank-``k`` factors of that matrix (the nested split included) cost. The ranks then
minimise ``Σ_i c_i(k_i)`` under the budget (``allocate``). The criteria (``ALLOCATIONS``):

* ``sensitivity`` (measured, ASVD style): the mean KL divergence of the model's next-token
  distribution from the dense model's, on the probe windows, with that one matrix factored
  (the rest dense). KL rather than the change in loss: it is never negative, so small
  perturbations are not lost in the noise of a few hundred tokens. One forward per probe, from
  the matrix's block on (the blocks before it replay their recorded dense outputs).
* ``fisher`` (output-gradient weighted, FWSVD style): ``Σ_j F_j ((W − Ŵ_k) G (W − Ŵ_k)ᵀ)_jj``,
  the activation error of each output channel ``j`` weighted by ``F_j``, the summed squared
  gradient of the loss with respect to that output on the probe windows (a diagonal empirical
  Fisher: a second-order estimate of the loss increase). One forward and backward in all.
* ``block_error``: the relative error ``‖Y_k − Y‖² / ‖Y‖²`` of the decoder block's output on the
  probe windows (the block replayed on its recorded dense input with that one matrix factored).
  Relative because the next block normalises its input (RMSNorm/LayerNorm). One block forward
  per probe.

Bounds and probes of a matrix (m × n; the decision, also in the README): the **ceiling** is the
largest rank that still saves parameters, ``c = max{k : k (m + n) < m n}``; curves are measured
at ``round(f · c)`` for ``f`` in ``PROBE_FRACTIONS`` (0.2 … 1.0) and interpolated linearly in
between; the **floor** is the lowest probe (0.2 c), so no rank is chosen outside the measured
range. The probes do not depend on the ratio (the uniform ranks of ratios 0.1–0.5 lie between
0.5 c and 0.9 c), so one measurement serves every ratio: the curves are cached per statistics
entry, probe windows, method and knobs, like the statistics, and a sweep pays for them once.
The probe windows are the first ``PROBE_WINDOWS`` calibration windows cut to ``PROBE_TOKENS``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nsvd_lm.decompose import COMPUTE_DTYPE, LayerFactorizer
from nsvd_lm.modules import Target, capture_block_inputs, capture_block_kwargs, find_decoder_blocks, input_device

logger = logging.getLogger(__name__)

PROBE_FRACTIONS: tuple[float, ...] = (0.2, 0.35, 0.5, 0.65, 0.8, 1.0)
PROBE_WINDOWS = 2
PROBE_TOKENS = 256
CURVES_FORMAT = "nsvd-lm-allocation-curves-v1"


# ---------------------------------------------------------------------------------------------
# Bounds and the budget
# ---------------------------------------------------------------------------------------------


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """``k = floor((1 - ratio) * m * n / (m + n))``: the rank that removes ``ratio`` of the parameters."""
    m, n = out_features, in_features
    # The tiny epsilon keeps exact products (e.g. 0.5 * 64 * 64 / 128 = 16) from flooring to 15.
    return int(math.floor((1.0 - ratio) * m * n / (m + n) + 1e-9))


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """A rank-``rank`` pair (``rank·(m + n)`` numbers) is smaller than the dense ``m·n`` matrix."""
    return 1 <= rank and rank * (out_features + in_features) < out_features * in_features


def ceiling_rank(out_features: int, in_features: int) -> int:
    """The largest rank ``k`` with ``k (m + n) < m n``: the last that saves parameters."""
    m, n = out_features, in_features
    return (m * n - 1) // (m + n)


def probe_ranks(out_features: int, in_features: int) -> list[int]:
    """Where a matrix's curve is measured: ``round(f · ceiling)`` for ``f`` in ``PROBE_FRACTIONS``."""
    ceiling = ceiling_rank(out_features, in_features)
    return sorted({max(1, round(f * ceiling)) for f in PROBE_FRACTIONS})


def rank_bounds(out_features: int, in_features: int) -> tuple[int, int]:
    """``(floor, ceiling)`` of an allocated rank: the lowest probe, and the last rank that saves parameters."""
    return probe_ranks(out_features, in_features)[0], ceiling_rank(out_features, in_features)


@dataclass
class RankPlan:
    """Per-matrix ranks under one budget (matrices absent from ``ranks`` stay dense)."""

    allocation: str
    ranks: dict[str, int]
    uniform_ranks: dict[str, int]
    budget: int  # Σ k_uniform (m + n): the parameters of the uniform rule's factor pairs
    spent: int  # Σ k (m + n) of ``ranks``
    measured: "MeasuredCurves | None" = None  # the criterion's curves (None: uniform)
    # Newly measured curves and where they are cached: the caller writes them once the plan is used
    # (``compress_model``, after the module swap), with ``files.write_json_atomic``.
    curves_to_store: "tuple[Path, dict] | None" = None

    def describe(self) -> dict | None:
        """What the record keeps of a measured allocation (None for uniform)."""
        if self.measured is None:
            return None
        return {
            "budget": self.budget,
            "spent": self.spent,
            "uniform_ranks": self.uniform_ranks,
            "curve_seconds": round(self.measured.seconds, 3),
            "curves_cache_hit": self.measured.cache_hit,
        }


def uniform_plan(shapes: dict[str, tuple[int, int]], ratio: float) -> RankPlan:
    """The paper's ranks; a matrix whose rank would not save parameters is left out (kept dense)."""
    ranks = {}
    for name, (m, n) in shapes.items():
        k = rank_for_ratio(m, n, ratio)
        if saves_parameters(m, n, k):
            ranks[name] = k
    budget = sum(k * sum(shapes[name]) for name, k in ranks.items())
    return RankPlan("uniform", dict(ranks), dict(ranks), budget, budget)


def _interpolate(curve: dict[int, float], rank: int) -> float:
    points = sorted(curve)
    if rank <= points[0]:
        return curve[points[0]]
    for low, high in zip(points, points[1:]):
        if rank <= high:
            return curve[low] + (curve[high] - curve[low]) * (rank - low) / (high - low)
    return curve[points[-1]]


def allocate(
    sizes: dict[str, int], bounds: dict[str, tuple[int, int]], curves: dict[str, dict[int, float]], budget: int
) -> dict[str, int]:
    """Ranks minimising ``Σ c_i(k_i)`` with ``Σ k_i sizes_i <= budget`` and ``floor_i <= k_i <= ceiling_i``.

    ``sizes[i] = m_i + n_i`` (parameters per unit of rank). Each curve is made non-increasing in
    the rank (a larger rank never costs more than a smaller one: the running minimum from the
    floor up, which also absorbs measurement noise), then for a multiplier λ every matrix takes
    ``argmin_k c_i(k) + λ k sizes_i``; λ is bisected to the budget and what is left is handed out
    greedily, one rank at a time, to the matrix whose cost drops most per parameter. The spend
    ends within one matrix's ``m + n`` below the budget.
    """
    grids: dict[str, tuple[list[int], list[float]]] = {}
    for name, (floor, ceiling) in bounds.items():
        ranks = list(range(floor, ceiling + 1))
        costs, best = [], math.inf
        for k in ranks:
            best = min(best, _interpolate(curves[name], k))
            costs.append(best)
        grids[name] = (ranks, costs)
    minimum = sum(bounds[name][0] * sizes[name] for name in bounds)
    if minimum > budget:
        raise ValueError(f"the rank floors alone need {minimum} parameters, above the budget {budget}")

    def choose(lam: float) -> dict[str, int]:
        choice = {}
        for name, (ranks, costs) in grids.items():
            total = [c + lam * k * sizes[name] for k, c in zip(ranks, costs)]
            choice[name] = ranks[min(range(len(total)), key=total.__getitem__)]
        return choice

    def spent(choice: dict[str, int]) -> int:
        return sum(k * sizes[name] for name, k in choice.items())

    low, high = 0.0, 1.0
    while spent(choose(high)) > budget and high < 1e30:
        high *= 4.0
    for _ in range(100):
        mid = (low + high) / 2
        if spent(choose(mid)) > budget:
            low = mid
        else:
            high = mid
    choice = choose(high)
    if spent(choice) > budget:  # ties at the floors: every matrix at its floor fits (checked above)
        choice = {name: bounds[name][0] for name in bounds}
    while True:  # greedy fill of what the multiplier left: most cost saved per parameter first
        left = budget - spent(choice)
        best_name, best_gain = None, -math.inf
        for name, k in choice.items():
            ranks, costs = grids[name]
            i = k - ranks[0]
            if i + 1 >= len(ranks) or sizes[name] > left:
                continue
            gain = (costs[i] - costs[i + 1]) / sizes[name]
            if gain > best_gain:
                best_name, best_gain = name, gain
        if best_name is None:
            break
        choice[best_name] += 1
    return choice


# ---------------------------------------------------------------------------------------------
# The criteria: curves c_i(k) at the probe ranks
# ---------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """What a criterion measures with: the dense model, its targets, token windows, the method.

    ``factorizer`` gives the method's own rank-``k`` factors of a target (the nested split
    included); ``stats`` its calibration statistics (``G`` for ``fisher``).
    """

    model: nn.Module
    targets: list[Target]
    windows: torch.Tensor
    factorizer: LayerFactorizer
    stats: Any
    progress: bool = True

    def approximation(self, target: Target, rank: int) -> torch.Tensor:
        """The method's rank-``rank`` ``Ŵ`` of ``target`` (out × in)."""
        return self.factorizer(target.name, target.dense_weight(), rank).dense()


class _Swapped:
    """The target's weight replaced by ``approx`` (out × in) inside the ``with``, restored after."""

    def __init__(self, target: Target, approx: torch.Tensor) -> None:
        self.weight = target.module.weight
        # nn.Linear stores (out × in); GPT-2's Conv1D (in × out).
        self.approx = approx if self.weight.shape == approx.shape else approx.T
        self.original: torch.Tensor | None = None

    def __enter__(self) -> None:
        self.original = self.weight.data.clone()
        self.weight.data.copy_(self.approx.to(dtype=self.weight.dtype, device=self.weight.device))

    def __exit__(self, *exc) -> None:
        self.weight.data.copy_(self.original)


class _ReplayedBlocks:
    """Decoder blocks ``0 … start−1`` return their recorded dense outputs inside the ``with``.

    A matrix of block ``start`` changes nothing before it, so those blocks' outputs are the dense
    ones, bit for bit: replaying them skips their compute (on average half the model's blocks per
    probe) without changing a single logit. The instance's ``forward`` is shadowed rather than the
    module swapped, so attributes the model reads off its blocks (``attention_type``...) remain.
    """

    def __init__(self, blocks: nn.ModuleList, outputs: list[Any], start: int) -> None:
        self.blocks, self.outputs, self.start = blocks, outputs, start

    def __enter__(self) -> None:
        for index in range(self.start):
            recorded = self.outputs[index]
            self.blocks[index].forward = lambda *args, _recorded=recorded, **kwargs: _recorded

    def __exit__(self, *exc) -> None:
        for index in range(self.start):
            del self.blocks[index].forward


def _record_block_outputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """The dense model's logits on ``ids`` and every decoder block's output, as the block returned it."""
    outputs: list[Any] = [None] * len(blocks)

    def make_hook(index: int):
        def hook(_module, _args, output):
            outputs[index] = output

        return hook

    handles = [block.register_forward_hook(make_hook(i)) for i, block in enumerate(blocks)]
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


@torch.no_grad()
def sensitivity_curves(probe: Probe) -> dict[str, dict[int, float]]:
    """Mean token KL(dense ‖ one matrix factored) of the next-token distributions, per probe rank."""
    model, ids = probe.model, probe.windows.to(input_device(probe.model))
    _, blocks = find_decoder_blocks(model)
    logits, block_outputs = _record_block_outputs(model, blocks, ids)
    reference = torch.log_softmax(logits.float(), dim=-1)
    curves: dict[str, dict[int, float]] = {}
    for target in tqdm(probe.targets, desc="rank allocation: sensitivity", disable=not probe.progress):
        curves[target.name] = {}
        for k in probe_ranks(*target.shape):
            with (
                _Swapped(target, probe.approximation(target, k)),
                _ReplayedBlocks(blocks, block_outputs, target.block_index),
            ):
                logits = model(input_ids=ids, use_cache=False).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            kl = torch.nn.functional.kl_div(log_probs, reference, log_target=True, reduction="none").sum(-1)
            curves[target.name][k] = float(kl.mean())
    return curves


def output_fisher(model: nn.Module, targets: list[Target], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``F_j = Σ_t (∂L/∂y_tj)²`` for every output channel ``j`` of every target (float64, on CPU).

    No parameter gradient is formed: each target's output is made to require grad in a forward
    hook (the first one becomes the graph's leaf), so memory is the activations only.
    """
    fisher: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            squared = grad.detach().to(COMPUTE_DTYPE).pow(2).reshape(-1, grad.shape[-1]).sum(0).cpu()
            fisher[name] = fisher[name] + squared if name in fisher else squared

        def hook(_module, _args, output):
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            output.register_hook(accumulate)
            return output

        return hook

    for target in targets:
        handles.append(target.module.register_forward_hook(make_hook(target.name)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with torch.enable_grad():
            ids = windows.to(input_device(model))
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter in trainable:
            parameter.requires_grad_(True)
    return fisher


def fisher_curves(probe: Probe) -> dict[str, dict[int, float]]:
    """``Σ_j F_j ((W − Ŵ_k) G (W − Ŵ_k)ᵀ)_jj``: the activation error weighted by the output Fisher."""
    fisher = output_fisher(probe.model, probe.targets, probe.windows)
    curves: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for target in tqdm(probe.targets, desc="rank allocation: fisher", disable=not probe.progress):
            weight = target.dense_weight().detach().to(COMPUTE_DTYPE)
            gram = probe.stats.gram(target.name).to(device=weight.device, dtype=COMPUTE_DTYPE)
            weights = fisher[target.name].to(weight.device)
            curves[target.name] = {}
            for k in probe_ranks(*target.shape):
                error = weight - probe.approximation(target, k).to(device=weight.device, dtype=COMPUTE_DTYPE)
                per_output = ((error @ gram) * error).sum(1)
                curves[target.name][k] = float((weights * per_output).sum())
    return curves


@torch.no_grad()
def block_error_curves(probe: Probe) -> dict[str, dict[int, float]]:
    """``‖Y_k − Y‖² / ‖Y‖²`` of the target's decoder block on the probe windows, per probe rank."""
    model, windows = probe.model, probe.windows
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list[Target]] = {}
    for target in probe.targets:
        by_block.setdefault(target.block_index, []).append(target)
    hidden = capture_block_inputs(model, blocks, windows, len(windows), progress=False)[0]
    block_kwargs = capture_block_kwargs(model, blocks, windows)

    def run(index: int, states: torch.Tensor) -> torch.Tensor:
        args, kwargs = block_kwargs[index]
        out = blocks[index](states, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    curves: dict[str, dict[int, float]] = {}
    for index in tqdm(range(len(blocks)), desc="rank allocation: block error", disable=not probe.progress):
        dense = run(index, hidden)
        norm = float(dense.double().pow(2).sum())
        for target in by_block.get(index, []):
            curves[target.name] = {}
            for k in probe_ranks(*target.shape):
                with _Swapped(target, probe.approximation(target, k)):
                    approx = run(index, hidden)
                curves[target.name][k] = float((approx.double() - dense.double()).pow(2).sum()) / max(norm, 1e-30)
        hidden = dense
    return curves


@dataclass(frozen=True)
class Allocation:
    """One ``rank_allocation`` value: what it does (the config field's help reads this) and its curves."""

    name: str
    summary: str
    curves: Callable[[Probe], dict[str, dict[int, float]]] | None = None

    @property
    def measured(self) -> bool:
        return self.curves is not None


ALLOCATIONS: dict[str, Allocation] = {
    a.name: a
    for a in (
        Allocation("uniform", "every matrix at k = floor((1 - ratio) m n / (m + n)) (the paper)"),
        Allocation(
            "sensitivity",
            "one budget spread by each matrix's measured effect on the output (KL from the dense model)",
            sensitivity_curves,
        ),
        Allocation(
            "fisher", "one budget spread by the activation error weighted by the output-gradient Fisher", fisher_curves
        ),
        Allocation(
            "block_error", "one budget spread by the relative error of each decoder block's output", block_error_curves
        ),
    )
}


@dataclass
class MeasuredCurves:
    """A criterion's curves and what they cost (``seconds``: when measured, not when read from the cache)."""

    allocation: str
    curves: dict[str, dict[int, float]]
    seconds: float
    cache_hit: bool
    cache_file: Path | None = field(default=None, repr=False)


def curves_cache_key(allocation: str, identity: list) -> str:
    """Cache key of one criterion's curves: ``identity`` (what else changes them) and the probe settings."""
    blob = json.dumps([CURVES_FORMAT, allocation, list(PROBE_FRACTIONS), *identity], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def measure_curves(allocation: str, probe: Probe, cache_file: Path | None = None) -> MeasuredCurves:
    """``ALLOCATIONS[allocation].curves(probe)``, or read from ``cache_file`` (``curves_record`` is its content)."""
    spec = ALLOCATIONS[allocation]
    if spec.curves is None:
        raise ValueError(f"rank_allocation={allocation} measures nothing")
    names = {t.name for t in probe.targets}
    if cache_file is not None and cache_file.exists():
        data = json.loads(cache_file.read_text())
        if data.get("format") == CURVES_FORMAT and set(data["curves"]) >= names:
            curves = {name: {int(r): float(v) for r, v in c.items()} for name, c in data["curves"].items()}
            return MeasuredCurves(allocation, curves, float(data["seconds"]), True, cache_file)
    was_training = probe.model.training
    probe.model.eval()
    started = time.perf_counter()
    try:
        curves = spec.curves(probe)
    finally:
        probe.model.train(was_training)
    seconds = time.perf_counter() - started
    logger.info("rank allocation %s: curves of %d matrices in %.1fs", allocation, len(curves), seconds)
    return MeasuredCurves(allocation, curves, seconds, False, cache_file)


def plan_ranks(
    shapes: dict[str, tuple[int, int]],
    ratio: float,
    allocation: str = "uniform",
    probe: Probe | None = None,
    cache_dir: Path | None = None,
    identity: list | None = None,
) -> RankPlan:
    """The ranks at ``ratio``: uniform (the paper's rule), or the same budget spread by ``allocation``'s curves.

    ``shapes`` maps each target's name to ``(m, n)``. A measured allocation needs ``probe``; its
    curves are cached in ``cache_dir`` under ``identity`` (the statistics entry, probe windows,
    method and knobs: whatever changes the curves) and reused for every ratio.
    """
    uniform = uniform_plan(shapes, ratio)
    spec = ALLOCATIONS[allocation]
    if not spec.measured:
        return uniform
    if probe is None:
        raise ValueError(f"rank_allocation={allocation} measures its curves: it needs a probe")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"allocation-{curves_cache_key(allocation, identity or [])}.json"
    measured = measure_curves(allocation, probe, cache_file)
    sizes = {name: sum(shapes[name]) for name in uniform.ranks}
    bounds = {name: rank_bounds(*shapes[name]) for name in uniform.ranks}
    ranks = allocate(sizes, bounds, {name: measured.curves[name] for name in sizes}, uniform.budget)
    spent = sum(k * sizes[name] for name, k in ranks.items())
    plan = RankPlan(allocation, ranks, uniform.ranks, uniform.budget, spent, measured)
    if cache_file is not None and not measured.cache_hit:
        plan.curves_to_store = (cache_file, curves_record(measured))
    return plan


def curves_record(measured: MeasuredCurves) -> dict:
    """What the curves cache file holds (``measure_curves`` reads it back)."""
    stored = {name: {str(r): v for r, v in curve.items()} for name, curve in measured.curves.items()}
    return {"format": CURVES_FORMAT, "allocation": measured.allocation, "seconds": measured.seconds, "curves": stored}
