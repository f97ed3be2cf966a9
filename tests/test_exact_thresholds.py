"""Exact integer thresholds (finn_flow.steps.exact_thresholds) against an independent oracle: the
same model chain evaluated in 100-digit decimal arithmetic (Python's ``decimal``, square root
included) for every accumulator value of the layer's exact range, and the quantizer's round half to
even applied to that value. Exact ties are constructed (power-of-two scales) so that the parity rule
is exercised, and batch norm makes the values irrational elsewhere."""

from __future__ import annotations

import decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from brevitas.nn import QuantConv2d, QuantIdentity, QuantReLU
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from hypothesis import given, settings
from hypothesis import strategies as st
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model
from torch import nn

from brevitas_a2q import A2QPlusWeightQuant, export_qonnx
from finn_flow.steps.exact_thresholds import (
    ActivationChain,
    ExactValue,
    _float_sign,
    _reaches,
    _reaches_exactly,
    record_activation_chains,
)
from finn_flow.steps.threshold_matching import exact_integer_thresholds

D = decimal.Context(prec=100)


def _dec(x: Fraction | str) -> decimal.Decimal:
    x = Fraction(x)
    return D.divide(decimal.Decimal(x.numerator), decimal.Decimal(x.denominator))


def _decimal_value(chain: ActivationChain, c: int, acc: int, relu: bool = True) -> decimal.Decimal:
    def at(values):
        return _dec(values[0] if len(values) == 1 else values[c])

    x = D.multiply(at(chain.scale), decimal.Decimal(acc))
    for op in chain.ops:
        if op["op"] == "affine":
            x = D.add(D.multiply(x, at(op["mul"])), at(op["add"]))
        elif op["op"] == "bn":
            x = D.add(D.divide(D.multiply(D.subtract(x, at(op["mean"])), at(op["gamma"])),
                               D.sqrt(at(op["var"]))), at(op["beta"]))
        elif relu:
            x = max(x, decimal.Decimal(0))
    return D.divide(x, at(chain.quant_scale))


def oracle_level(chain: ActivationChain, c: int, acc: int) -> int:
    """The chain's quantizer level for ``acc``, in 100-digit decimals (independent of
    :class:`ExactValue`): round half to even of clip(x / s)."""
    y = _decimal_value(chain, c, acc)
    y = min(max(y, decimal.Decimal(chain.low)), decimal.Decimal(chain.high))
    return int(y.quantize(decimal.Decimal(1), rounding=decimal.ROUND_HALF_EVEN, context=D))


def oracle_thresholds(chain: ActivationChain, c: int, lo: int, hi: int) -> dict[int, int]:
    """Level -> smallest acc in [lo, hi] whose level reaches it (exhaustive, monotone checked)."""
    levels = [oracle_level(chain, c, a) for a in range(lo, hi + 1)]
    assert all(b >= a for a, b in zip(levels, levels[1:], strict=False)), "the chain is not monotone"
    return {target: lo + next(i for i, v in enumerate(levels) if v >= target)
            for target in range(levels[0] + 1, levels[-1] + 1)}


class Block(nn.Module):
    """input quantizer -> conv (bias) -> [BN] -> ReLU quantizer, 1x6x6 in."""

    def __init__(self, bn: bool, pow2: bool, out_bits: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        act = {"scaling_impl_type": "const", "scaling_init": 0.25} if pow2 else {}
        self.inp = QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True,
                                 bit_width=4, **act)
        self.conv = QuantConv2d(1, 3, 3, bias=True, weight_quant=A2QPlusWeightQuant,
                                weight_bit_width=4, weight_accumulator_bit_width=12)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.act = QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=out_bits, **act)

    def forward(self, x):
        return self.act(self.bn(self.conv(self.inp(x))))


def _chain(tmp_path, bn: bool, pow2: bool, out_bits: int = 4):
    model = Block(bn, pow2, out_bits)
    if bn:
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 1.5)
            model.bn.bias.uniform_(-0.3, 0.3)
    model.eval()
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        model(x)
    export_qonnx(model, x[:1], tmp_path / "m.onnx")
    wrapped = cleanup_model(ModelWrapper(str(tmp_path / "m.onnx")))
    chains = record_activation_chains(wrapped)
    assert len(chains) == 1
    conv = next(n for n in wrapped.graph.node if n.op_type == "Conv")
    quant = wrapped.find_producer(conv.input[1])
    q = np.rint(wrapped.get_initializer(quant.input[0]).astype(np.float64)
                / wrapped.get_initializer(quant.input[1]))
    return next(iter(chains.values())), q.reshape(q.shape[0], -1)


@pytest.mark.parametrize("bn, pow2", [(True, False), (False, True), (True, True)])
def test_exact_thresholds_equal_the_decimal_oracle_over_the_whole_range(tmp_path, bn, pow2):
    chain, q = _chain(tmp_path, bn, pow2)
    per_channel = [oracle_thresholds(chain, c, -4096, 4096) for c in range(q.shape[0])]
    levels = sorted(set.intersection(*(set(t) for t in per_channel)))
    first = levels[0] - 1
    assert levels == list(range(first + 1, first + 1 + len(levels))) and len(levels) >= 8
    oracle = np.array([[t[level] for level in levels] for t in per_channel], dtype=np.float64)
    # FINN's float32 thresholds: the real accumulator value at each rounding boundary, in float32
    finn = np.empty_like(oracle)
    for c in range(q.shape[0]):
        y0, y1 = _decimal_value(chain, c, 0, relu=False), _decimal_value(chain, c, 1, relu=False)
        for i, level in enumerate(levels):
            finn[c, i] = float(D.divide(decimal.Decimal(level) - decimal.Decimal("0.5") - y0,
                                        y1 - y0))
    exact, reason = exact_integer_thresholds(chain, finn.astype(np.float32), first)
    assert reason is None
    np.testing.assert_array_equal(exact, oracle)

def test_ties_round_half_to_even():
    """y = acc * (1/8) / (1/4) = acc / 2: every odd accumulator is an exact tie, so level L is
    reached at 2L - 1 when L is even and at 2L when L is odd (round half to even); the decimal
    oracle agrees, and FINN's float thresholds (exactly the ties, 2L - 1.0) would round every tie up."""
    chain = ActivationChain(layer_node="n", fingerprint="", scale=["1/8"],
                            ops=[{"op": "relu"}], quant_scale=["1/4"], low=0, high=15)
    finn = (2.0 * np.arange(1, 16) - 1.0).reshape(1, -1).astype(np.float32)
    exact, reason = exact_integer_thresholds(chain, finn, 0)
    assert reason is None
    expected = [2 * level - 1 if level % 2 == 0 else 2 * level for level in range(1, 16)]
    np.testing.assert_array_equal(exact[0], expected)
    np.testing.assert_array_equal(exact[0], [oracle_thresholds(chain, 0, -4, 40)[level]
                                             for level in range(1, 16)])


@given(r0=st.fractions(max_denominator=10**6), r1=st.fractions(max_denominator=10**6),
       v=st.fractions(min_value=Fraction(1, 10**4), max_value=10**4, max_denominator=10**6),
       c=st.fractions(max_denominator=10**6))
@settings(max_examples=300, deadline=None)
def test_exact_value_comparison_matches_decimal(r0, r1, v, c):
    value = ExactValue(r0, r1, v)
    oracle = D.subtract(D.add(_dec(r0), D.divide(_dec(r1), D.sqrt(_dec(v)))), _dec(c))
    expected = (oracle > 0) - (oracle < 0)
    if r1 == 0 or abs(oracle) > decimal.Decimal("1e-60"):  # decimal cannot decide exact zeros
        assert value.compare(c) == expected


def test_unprovable_thresholds_are_left_with_a_reason(tmp_path):
    chain, q = _chain(tmp_path, bn=True, pow2=False)
    finn = np.full((q.shape[0], 15), 10**6, dtype=np.float32)  # nowhere near the chain's
    kept, reason = exact_integer_thresholds(chain, finn, 0)
    assert reason is not None and kept is finn


def _oracle_threshold(chain: ActivationChain, c: int, level: int, lo: int, hi: int) -> int:
    """The smallest acc in (lo, hi] whose decimal-oracle level reaches ``level`` (bisection; the
    chain is monotone)."""
    assert oracle_level(chain, c, lo) < level <= oracle_level(chain, c, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if oracle_level(chain, c, mid) >= level else (mid, hi)
    return hi


def test_batch_norm_dropped_by_finns_streamlining_is_restored_exactly():
    """A batch norm at its initial statistics multiplies by 1 / sqrt(1 + 1e-5) = 0.999995, which
    qonnx's RemoveIdentityOps (run by FINN's Streamline() after every pass, atol 1e-5) deletes:
    FINN's thresholds are then the chain's without the batch norm, 5e-6 relative too low. Where that
    moves a threshold across an integer, the exact thresholds (decimal oracle) differ from FINN's
    rounded ones; they are still proven to face this chain and replace FINN's."""
    eps = Fraction(float(np.float32(1e-5)))
    chain = ActivationChain(layer_node="n", fingerprint="", scale=["1/997"],
                            ops=[{"op": "bn", "gamma": ["1"], "beta": ["0"], "mean": ["0"],
                                  "var": [str(1 + eps)]}, {"op": "relu"}],
                            quant_scale=["1/3"], low=0, high=255)
    levels = np.arange(1, 256)
    # FINN's: the batch norm gone, (L - 1/2) * s_q / s_acc in float32
    finn = ((levels - 0.5) * 997 / 3).astype(np.float32).reshape(1, -1)
    oracle = np.array([[_oracle_threshold(chain, 0, int(level), -1, 2**17) for level in levels]])
    moved = (np.ceil(finn) != oracle) & (np.abs(finn - np.round(finn)) > 1e-3)
    assert moved.sum() >= 10, "the dropped batch norm must move thresholds across integers"
    exact, reason = exact_integer_thresholds(chain, finn, 0)
    assert reason is None
    np.testing.assert_array_equal(exact, oracle)
    far = finn[:, :10] * np.float32(1.0003)  # 3e-4 relative: another computation, not rounding
    kept, reason = exact_integer_thresholds(chain, far, 0)
    assert kept is far and "beyond float32 streamlining error" in reason


def test_thresholds_beyond_the_accumulator_range_are_clamped_to_it():
    """A channel whose weight scale is tiny (A2Q can shrink a whole channel to zero) has float
    thresholds around 1e10, far beyond float32's exact integers and beyond anything its accumulator
    reaches; given the reachable range, its levels are the range's (never reached: maximum + 1),
    while the normal channel keeps its exact thresholds (decimal oracle)."""
    chain = ActivationChain(layer_node="n", fingerprint="", scale=["1/8", str(Fraction(1, 2**40))],
                            ops=[{"op": "relu"}], quant_scale=["1/4"], low=0, high=15)
    levels = np.arange(1, 16)
    finn = np.stack([(levels - 0.5) * 2.0, (levels - 0.5) * 2.0**38]).astype(np.float32)
    kept, reason = exact_integer_thresholds(chain, finn, 0)
    assert kept is finn and reason is not None  # without the range: not provable
    exact, reason = exact_integer_thresholds(chain, finn, 0, acc_range=([-40, -40], [40, 40]))
    assert reason is None
    np.testing.assert_array_equal(exact[0], [oracle_thresholds(chain, 0, -40, 40)[level]
                                             for level in levels])
    np.testing.assert_array_equal(exact[1], np.full(15, 41))  # level 1 needs acc >= 2^37


_fractions = st.fractions(min_value=-4, max_value=4, max_denominator=10**5)


@given(scale=st.fractions(min_value=Fraction(1, 10**4), max_value=1, max_denominator=10**5),
       mul=_fractions, add=_fractions, gamma=_fractions, beta=_fractions, mean=_fractions,
       var=st.fractions(min_value=Fraction(1, 100), max_value=100, max_denominator=10**5),
       relu=st.booleans(), acc=st.integers(-2**20, 2**20), level=st.integers(-16, 16))
@settings(max_examples=200, deadline=None)
def test_float_decisions_of_levels_are_the_exact_ones(scale, mul, add, gamma, beta, mean, var, relu,
                                                      acc, level):
    """Where float64 decides whether an accumulator reaches a level, it decides as rational
    arithmetic does; the rest is left to the exact comparison."""
    ops = [{"op": "affine", "mul": [str(mul)], "add": [str(add)]},
           {"op": "bn", "gamma": [str(gamma)], "beta": [str(beta)], "mean": [str(mean)],
            "var": [str(var)]}] + ([{"op": "relu"}] if relu else [])
    chain = ActivationChain(layer_node="n", fingerprint="", scale=[str(scale)], ops=ops,
                            quant_scale=["1/16"], low=-16, high=16)
    exact = _reaches_exactly(chain, 0, acc, level)
    sign = _float_sign(chain, 0, acc, level)
    assert sign == 0 or (sign > 0) == exact
    assert _reaches(chain, 0, acc, level) == exact


def test_ties_are_left_to_the_exact_comparison():
    """acc / 2 against level - 1/2: odd accumulators are exact ties, which float64 must not
    decide; every other accumulator it decides."""
    chain = ActivationChain(layer_node="n", fingerprint="", scale=["1/8"],
                            ops=[{"op": "relu"}], quant_scale=["1/4"], low=0, high=15)
    for acc in range(1, 31):
        for level in range(1, 16):
            tie = acc == 2 * level - 1
            assert (_float_sign(chain, 0, acc, level) == 0) == tie, (acc, level)
