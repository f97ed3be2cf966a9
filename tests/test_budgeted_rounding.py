"""Budgeted rounding (``rounding="budgeted"``): round to nearest, then per output channel take back
the cheapest rounded-up units until the exact integer budget holds.

Oracles, independent of the package's take-back code:
* the exact worst-case accumulation of every output channel, with Python integers;
* a brute-force search over every integer vector of a small channel (K <= 4, M <= 4) for the
  minimum of the objective ``||q - y||_2^2`` under the budget, ``y`` the scaled weights;
* a digits CNN at P = 10 from the default init: no all-zero channel where round-to-zero has some.

Budget: A2Q ``||q||_1 <= floor(T)``; A2Q+ ``sum q+ <= floor(T) // 2`` and ``sum |q-| <= floor(T) // 2``
(each sign within T/2: A2Q+'s bound assumes ``sum q = 0``, which rounded integers only nearly meet).
"""

import functools
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from brevitas.core.function_wrapper import RoundSte, RoundToZeroSte
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_properties import layer_for  # tests/ is on sys.path

from brevitas_a2q import (
    A2QBudgetedWeightQuant,
    A2QPlusBudgetedWeightQuant,
    A2QPlusWeightQuant,
    A2QWeightQuant,
)
from brevitas_a2q.quant import bounds
from brevitas_a2q.quant.rounding import budgeted_take_back

BUDGETED = {"a2q": A2QBudgetedWeightQuant, "a2q+": A2QPlusBudgetedWeightQuant}
ZERO = {"a2q": A2QWeightQuant, "a2q+": A2QPlusWeightQuant}


def integer_budget(p: int, n: int, signed: bool, zero_centered: bool) -> int:
    t = bounds.l1_norm_bound(p, n, signed, zero_centered)
    return t.numerator // t.denominator


def fits(rows: np.ndarray, budget: int, zero_centered: bool) -> np.ndarray:
    """Per row, whether the integers fit the budget (Python integers)."""
    out = []
    for row in rows.tolist():
        pos = sum(v for v in row if v > 0)
        neg = -sum(v for v in row if v < 0)
        out.append(max(pos, neg) <= budget // 2 if zero_centered else pos + neg <= budget)
    return np.array(out)


def worst_case_fits(rows: np.ndarray, p: int, n: int, signed: bool) -> bool:
    """Every output channel's exact extreme accumulations fit P signed bits."""
    lo_x, hi_x = (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if signed else (0, 2**n - 1)
    for row in rows.tolist():
        pos = sum(v for v in row if v > 0)
        neg = sum(v for v in row if v < 0)
        hi, lo = pos * hi_x + neg * lo_x, pos * lo_x + neg * hi_x
        if not (-(2 ** (p - 1)) <= lo and hi <= 2 ** (p - 1) - 1):
            return False
    return True


def linear(variant, k, out, m, p, n, signed, seed, weight_scale, quants=BUDGETED):
    """The property test's layer (tests/test_properties.py) with budgeted-rounding quantizers."""
    return layer_for(variant, k, out, m, p, n, signed, seed, weight_scale, quants=quants)


def train_steps(layer, x, steps, lr):
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (layer(x) * torch.randn(layer(x).shape)).sum().backward()
        optimizer.step()


def int_rows(layer, x) -> np.ndarray:
    q = layer.quant_weight(layer.input_quant(x)).int().to(torch.int64).numpy()
    return q.reshape(q.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# the guarantee


@pytest.mark.slow
@given(variant=st.sampled_from(sorted(BUDGETED)), k=st.integers(1, 3000), out=st.integers(1, 4),
       m=st.integers(2, 8), p=st.integers(8, 32), n=st.integers(1, 16), signed=st.booleans(),
       seed=st.integers(0, 2**31 - 1), weight_scale=st.floats(1e-3, 1e3),
       steps=st.integers(0, 3), lr=st.floats(1e-3, 0.3))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_budgeted_exact_worst_case_fits_target(variant, k, out, m, p, n, signed, seed,
                                               weight_scale, steps, lr):
    assume(bounds.l1_norm_bound(p, n, signed, variant == "a2q+") >= 1)
    layer = linear(variant, k, out, m, p, n, signed, seed, weight_scale)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(seed))
    train_steps(layer, x, steps, lr)
    assert worst_case_fits(int_rows(layer, x), p, n, signed)


CONVS = {
    "conv2d-grouped": (QuantConv2d, dict(in_channels=6, out_channels=4, kernel_size=3, groups=2),
                       (6, 5, 5)),
    "convT2d": (QuantConvTranspose2d, dict(in_channels=3, out_channels=8, kernel_size=3),
                (3, 4, 4)),
}


@given(kind=st.sampled_from(sorted(CONVS)), variant=st.sampled_from(sorted(BUDGETED)),
       m=st.integers(2, 8), p=st.integers(8, 20), n=st.integers(1, 8), signed=st.booleans(),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e2))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_budgeted_output_channels_of_convs_fit(kind, variant, m, p, n, signed, seed, scale):
    # transposed convs: the take-back works on output channels (dim 1 of the weight)
    assume(bounds.l1_norm_bound(p, n, signed, variant == "a2q+") >= 1)
    cls, kwargs, shape = CONVS[kind]
    torch.manual_seed(seed)
    layer = cls(**kwargs, bias=False, weight_quant=BUDGETED[variant], weight_bit_width=m,
                weight_accumulator_bit_width=p, input_bit_width=n,
                input_quant=Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat)
    with torch.no_grad():
        layer.weight.mul_(scale)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    q = layer.quant_weight(layer.input_quant(x)).int().to(torch.int64).numpy()
    if kind.startswith("convT"):
        rows = q.transpose(1, 0, 2, 3).reshape(q.shape[1], -1)
    else:
        rows = q.reshape(q.shape[0], -1)
    budget = integer_budget(p, n, signed, variant == "a2q+")
    assert fits(rows, budget, variant == "a2q+").all()
    assert worst_case_fits(rows, p, n, signed)


# ---------------------------------------------------------------------------------------------
# optimality against brute force


@functools.cache
def integer_grid(k: int, lo: int, hi: int) -> np.ndarray:
    """Every integer vector of [lo, hi]^k, as rows."""
    return np.array(list(itertools.product(range(lo, hi + 1), repeat=k)), dtype=np.int64)


def brute_force_min(y: np.ndarray, lo: int, hi: int, budget: int, zero_centered: bool) -> float:
    """min ||q - y||_2^2 over integer q in [lo, hi]^K within the budget (exhaustive)."""
    grid = integer_grid(len(y), lo, hi)
    pos = np.where(grid > 0, grid, 0).sum(1)
    neg = np.where(grid < 0, -grid, 0).sum(1)
    ok = (np.maximum(pos, neg) <= budget // 2) if zero_centered else (pos + neg <= budget)
    cost = ((grid[ok] - y[None, :]) ** 2).sum(1)
    return float(cost.min())


def objective(q: np.ndarray, y: np.ndarray) -> float:
    return float(((q - y) ** 2).sum())


def scaled_weights(layer, x) -> torch.Tensor:
    """``y = w / pre_scale + pre_zero_point``, clipped to the integer range: what the layer rounds,
    from Brevitas's own pre-scaling and zero point (before any rounding)."""
    tq = layer.weight_quant.tensor_quant
    qi = layer.input_quant(x)
    bit_width = tq.msb_clamp_bit_width_impl()
    pre_scale = tq.pre_scaling_impl(layer.weight, qi.bit_width, qi.signed)
    pre_scale = pre_scale / tq.int_scaling_impl(bit_width)
    y = layer.weight / pre_scale + tq.pre_zero_point_impl(layer.weight, pre_scale, bit_width)
    lo = tq.decoupled_int_quant.min_int(bit_width)
    hi = tq.decoupled_int_quant.max_int(bit_width)
    return y.clamp(lo, hi).detach(), int(lo), int(hi)


# (variant, P, N, signed) whose integer budget binds for small K: drawn directly rather than
# filtered with assume(), which Hypothesis's filter health check rejects (most draws do not bind)
BINDING_BUDGETS = [(v, p, n, s) for v in sorted(BUDGETED) for p in range(8, 15) for n in range(1, 9)
                   for s in (False, True) if 1 <= integer_budget(p, n, s, v == "a2q+") <= 24]


@given(case=st.sampled_from(BINDING_BUDGETS), k=st.integers(1, 4), out=st.integers(1, 3),
       m=st.integers(2, 4), seed=st.integers(0, 2**31 - 1), weight_scale=st.floats(1e-2, 1e2),
       steps=st.integers(0, 2))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_budgeted_rounding_is_the_brute_force_optimum(case, k, out, m, seed, weight_scale, steps):
    variant, p, n, signed = case
    zc = variant == "a2q+"
    budget = integer_budget(p, n, signed, zc)
    layer = linear(variant, k, out, m, p, n, signed, seed, weight_scale)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(seed))
    train_steps(layer, x, steps, 0.05)
    y, lo, hi = scaled_weights(layer, x)
    y = y.double().numpy().reshape(out, -1)
    trunc = np.trunc(y).astype(np.int64)
    # the optimum is reached without the guard whenever round-to-zero fits (always, up to float
    # error; the guard's own tests cover the rest)
    assume(fits(trunc, budget, zc).all())
    q = int_rows(layer, x)
    assert fits(q, budget, zc).all()
    for row_q, row_y in zip(q, y, strict=True):
        assert ((row_q >= lo) & (row_q <= hi)).all()
        best = brute_force_min(row_y, lo, hi, budget, zc)
        assert objective(row_q, row_y) == pytest.approx(best, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("variant, p", [("a2q", 7), ("a2q", 8), ("a2q+", 6), ("a2q+", 7)])
def test_budgeted_optimum_where_the_budget_binds(variant, p):
    # 4 weights of similar magnitude, 4-bit unsigned input: every |y| is about T/4, so round to
    # nearest exceeds the budget and the take-back must choose; brute force agrees every time
    zc = variant == "a2q+"
    budget = integer_budget(p, 4, False, zc)
    bound = 0
    for seed in range(10):
        layer = linear(variant, 4, 3, 4, p, 4, False, seed, 1.0)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            layer.weight.copy_(torch.randn(3, 4, generator=g).sign()
                               * (1 + 0.5 * torch.rand(3, 4, generator=g)))
        x = torch.rand(2, 4)
        y, lo, hi = scaled_weights(layer, x)
        y = y.double().numpy()
        assert fits(np.trunc(y).astype(np.int64), budget, zc).all()
        bound += int((~fits(np.round(y).astype(np.int64), budget, zc)).sum())
        q = int_rows(layer, x)
        assert fits(q, budget, zc).all()
        for row_q, row_y in zip(q, y, strict=True):
            best = brute_force_min(row_y, lo, hi, budget, zc)
            assert objective(row_q, row_y) == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert bound >= 3  # the budget did bind (here in at least 4 of the 30 channels per case)


@given(k=st.integers(1, 4), lo=st.sampled_from([-3, -4, -7]), budget=st.integers(0, 12),
       zero_centered=st.booleans(), seed=st.integers(0, 2**31 - 1),
       spread=st.floats(0.1, 8.0))
@settings(max_examples=300, deadline=None)
def test_take_back_against_brute_force_on_any_rows(k, lo, budget, zero_centered, seed, spread):
    # arbitrary scaled weights, clipped to [lo, hi] as the quantizer does, ties included
    hi = -lo if lo != -4 else 3
    rng = np.random.default_rng(seed)
    y = rng.normal(0, spread, size=(3, k))
    y[0] = np.round(y[0] * 2) / 2  # halves: rounding ties
    y = np.clip(y, lo, hi).astype(np.float32)
    q = torch.round(torch.from_numpy(y))
    take = budgeted_take_back(q, torch.from_numpy(y), budget, zero_centered)
    result = (q if take is None else q - take).to(torch.int64).numpy()
    trunc = np.trunc(y).astype(np.int64)
    yd = y.astype(np.float64)
    for i in range(3):
        if fits(trunc[i:i + 1], budget, zero_centered)[0]:
            assert fits(result[i:i + 1], budget, zero_centered)[0]
            best = brute_force_min(yd[i], lo, hi, budget, zero_centered)
            assert objective(result[i], yd[i]) == pytest.approx(best, rel=1e-9, abs=1e-9)
        else:  # round-to-zero does not fit: in each sign group (A2Q: the whole row) that does
            # not fit, every rounded-up unit is taken back (the quantizer's guard then enlarges
            # the pre-scale); nothing goes below round-to-zero
            assert (np.abs(trunc[i]) <= np.abs(result[i])).all()
            assert (np.abs(result[i]) <= np.abs(q[i].to(torch.int64).numpy())).all()
            groups = [yd[i] > 0, yd[i] < 0] if zero_centered else [yd[i] == yd[i]]
            for members in groups:
                part = np.where(members, trunc[i], 0)[None]
                if not fits(part, budget, zero_centered)[0]:
                    assert (result[i][members] == trunc[i][members]).all()


def test_take_back_is_exact_for_fractions():
    # A2Q: T = 3, y = (0.6, 0.7, 0.8, 0.9, 0.55): nearest gives 5 units, the cheapest two to take
    # back are 0.55 (cost 2*(0.55-1)+1 = 0.1) and 0.6 (0.2)
    y = torch.tensor([[0.6, 0.7, 0.8, 0.9, 0.55]])
    q = torch.round(y)
    out = q - budgeted_take_back(q, y, 3, zero_centered=False)
    assert out.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    # A2Q+: budget 4 -> each sign at most 2
    y = torch.tensor([[0.6, 0.7, 0.8, -0.9, -0.55, -0.65]])
    q = torch.round(y)
    out = q - budgeted_take_back(q, y, 4, zero_centered=True)
    assert out.tolist() == [[0.0, 1.0, 1.0, -1.0, 0.0, -1.0]]
    # costs as exact fractions: what was taken back is the cheapest
    costs = {v: 2 * (Fraction(v) - 1) + 1 for v in (0.55, 0.6, 0.7)}
    assert costs[0.55] < costs[0.6] < costs[0.7]
    assert budgeted_take_back(q, y, 6, zero_centered=True) is None  # already fits


# ---------------------------------------------------------------------------------------------
# what it is for: no dead channels at narrow accumulators


@pytest.mark.parametrize("variant", ["a2q", "a2q+"])
def test_digits_cnn_at_p10_has_no_dead_conv1_channel_with_budgeted_rounding(variant):
    from brevitas_a2q.analysis.audit import accumulator_report
    from brevitas_a2q.train.data import load_dataset
    from brevitas_a2q.train.models import build_cnn

    train, _ = load_dataset("digits", None, seed=0)
    x = torch.stack([train[i][0] for i in range(64)])
    dead = {}
    for rounding in ("zero", "budgeted"):
        torch.manual_seed(0)
        report = accumulator_report(build_cnn(variant, acc_bits=10, rounding=rounding), x)
        assert report.all_hold
        dead[rounding] = {r.layer: r.zero_channels for r in report}
    assert dead["zero"]["conv1"] > 0
    assert dead["budgeted"]["conv1"] == 0
    if variant == "a2q+":  # A2Q+ (budget T/2 per sign, zero-centred weights): no layer is dead
        assert dead["zero"]["conv2"] > 0
        assert all(v == 0 for v in dead["budgeted"].values())


# ---------------------------------------------------------------------------------------------
# wiring: defaults, per-layer option, gradient, guard


def test_default_rounding_is_round_to_zero_and_budgeted_is_opt_in():
    kwargs = dict(weight_bit_width=4, weight_accumulator_bit_width=12,
                  input_quant=Uint8ActPerTensorFloat)
    default = QuantLinear(8, 2, weight_quant=A2QWeightQuant, **kwargs).weight_quant.tensor_quant
    assert default.rounding == "zero"
    assert isinstance(default.decoupled_int_quant.float_to_int_impl, RoundToZeroSte)
    for layer in (QuantLinear(8, 2, weight_quant=A2QPlusWeightQuant, weight_rounding="budgeted",
                              **kwargs),
                  QuantLinear(8, 2, weight_quant=A2QPlusBudgetedWeightQuant, **kwargs)):
        tq = layer.weight_quant.tensor_quant
        assert tq.rounding == "budgeted"
        assert isinstance(tq.decoupled_int_quant.float_to_int_impl, RoundSte)
    with pytest.raises(ValueError, match="weight rounding must be one of"):
        QuantLinear(8, 2, weight_quant=A2QWeightQuant, weight_rounding="nearest", **kwargs)


@pytest.mark.parametrize("variant", ["a2q", "a2q+"])
def test_budgeted_gradient_is_the_straight_through_one(variant):
    # 8-bit weights, nothing clips: the gradient w.r.t. the float weights equals round-to-zero's
    # (straight-through rounding; the take-back is a constant)
    grads = []
    x = torch.rand(8, 64, generator=torch.Generator().manual_seed(1))
    for quants in (ZERO, BUDGETED):
        layer = linear(variant, 64, 4, 8, 12, 4, False, seed=1, weight_scale=1.0, quants=quants)
        layer(x).sum().backward()
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("variant", ["a2q", "a2q+"])
def test_guard_restores_the_budget_with_budgeted_rounding(variant):
    # a pre-scale half as large as A2Q computes makes even round-to-zero exceed the bound: the
    # take-back alone cannot fix it, the exact guard must
    p, n, signed = 16, 8, True
    layer = linear(variant, 64, 4, 8, p, n, signed, seed=7, weight_scale=1.0)
    x = torch.randn(2, 64)
    qi = layer.input_quant(x)
    tq = layer.weight_quant.tensor_quant
    w = layer.weight
    bit_width = tq.msb_clamp_bit_width_impl()
    half = tq.pre_scaling_impl(w, qi.bit_width, signed) / tq.int_scaling_impl(bit_width) / 2
    q_half = tq._to_int(w, half, tq.pre_zero_point_impl(w, half, bit_width), bit_width)
    budget = integer_budget(p, n, signed, variant == "a2q+")
    assert not fits(q_half.detach().to(torch.int64).numpy(), budget, variant == "a2q+").all()
    fixed = tq._guard(w, half, bit_width, n, signed)
    q = tq._to_int(w, fixed, tq.pre_zero_point_impl(w, fixed, bit_width), bit_width)
    assert fits(q.detach().to(torch.int64).numpy(), budget, variant == "a2q+").all()
