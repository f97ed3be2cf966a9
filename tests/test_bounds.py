"""Exact bound arithmetic against closed forms, brute force, Brevitas and qonnx."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from brevitas.function import get_upper_bound_on_l1_norm
from hypothesis import given, settings
from hypothesis import strategies as st
from qonnx.core.datatype import DataType
from qonnx.util.basic import calculate_matvec_accumulator_range

from brevitas_a2q.quant import bounds


@pytest.mark.parametrize("signed", [True, False])
def test_l1_bound_matches_brevitas_where_float32_is_exact(signed):
    for acc_bits in range(2, 25):
        for input_bits in range(1, 9):
            ours = bounds.l1_norm_bound(acc_bits, input_bits, signed)
            theirs = get_upper_bound_on_l1_norm(
                torch.tensor(float(acc_bits)), torch.tensor(float(input_bits)), signed)
            assert Fraction(theirs.item()) == ours


def test_brevitas_float32_bound_is_off_by_one_from_p26_and_ours_is_not():
    # 2^(P-1) - 1 is not a float32 from P = 26: Brevitas admits ||q||_1 = 2^(P-1) for N = 1 signed
    theirs = get_upper_bound_on_l1_norm(torch.tensor(26.0), torch.tensor(1.0), True)
    assert theirs.item() == 2**25
    assert bounds.l1_norm_bound(26, 1, True) == 2**25 - 1
    assert bounds.l1_norm_bound(64, 1, True) == 2**63 - 1


@given(acc_bits=st.integers(2, 63), input_bits=st.integers(1, 16), signed=st.booleans(),
       zero_centered=st.booleans())
@settings(max_examples=300, deadline=None)
def test_min_bits_is_the_smallest_width_whose_bound_admits_the_norm(
        acc_bits, input_bits, signed, zero_centered):
    bound = bounds.l1_norm_bound(acc_bits, input_bits, signed, zero_centered)
    for l1 in {math.floor(bound), math.floor(bound) + 1, max(math.floor(bound) - 1, 0)}:
        p = bounds.min_accumulator_bits(l1, input_bits, signed, zero_centered)
        assert bounds.l1_norm_bound(p, input_bits, signed, zero_centered) >= l1
        if p > 1:
            assert bounds.l1_norm_bound(p - 1, input_bits, signed, zero_centered) < l1


@given(l1=st.integers(1, 2**40), input_bits=st.integers(1, 16), signed=st.booleans())
@settings(max_examples=300, deadline=None)
def test_min_bits_matches_the_papers_closed_forms(l1, input_bits, signed):
    # A2Q Eq. 15 and A2Q+ Eq. 18 in floating point; exact values avoid rounding at ceil boundaries
    beta = math.log2(l1) + input_bits - int(signed)
    a2q = math.ceil(beta + math.log2(1 + 2**-beta) + 1)
    a2q_plus = math.ceil(math.log2(l1 * (2**input_bits - 1) + 2))
    exact = bounds.min_accumulator_bits(l1, input_bits, signed)
    exact_plus = bounds.min_accumulator_bits(l1, input_bits, signed, zero_centered=True)
    assert abs(exact - a2q) <= 1 and abs(exact_plus - a2q_plus) <= 1  # float ceil may tip over
    x = l1 * 2 ** (input_bits - int(signed)) + 1
    assert 2 ** (exact - 1) >= x > 2 ** (exact - 2)


@pytest.mark.parametrize("k,n,m,signed", [(1, 1, 2, False), (9, 8, 4, True), (784, 4, 4, False),
                                          (4608, 8, 8, True), (3, 2, 3, True)])
def test_datatype_bits_closed_form(k, n, m, signed):
    alpha = math.log2(k) + n + m - 1 - int(signed)
    expected = math.ceil(alpha + math.log2(1 + 2**-alpha) + 1)
    assert bounds.datatype_accumulator_bits(k, n, m, signed) == expected


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("input_bits", [1, 2, 3])
def test_exact_range_is_the_brute_force_extreme(signed, input_bits):
    rng = np.random.default_rng(input_bits)
    q = rng.integers(-7, 8, size=(6, 4))
    lo, hi = bounds.input_range(input_bits, signed)
    inputs = np.array(list(itertools.product(range(lo, hi + 1), repeat=4)))
    acc = q @ inputs.T
    result = bounds.exact_accumulator_range(q, lo, hi)
    assert result.minimum == acc.min(axis=1).tolist()
    assert result.maximum == acc.max(axis=1).tolist()
    brute_bits = bounds.signed_bits_for_range(int(acc.min()), int(acc.max()))
    assert result.signed_bits == brute_bits


@given(seed=st.integers(0, 2**32 - 1), input_bits=st.integers(1, 8), signed=st.booleans(),
       weight_bits=st.integers(2, 8))
@settings(max_examples=100, deadline=None)
def test_exact_range_matches_qonnx(seed, input_bits, signed, weight_bits):
    rng = np.random.default_rng(seed)
    m = 2 ** (weight_bits - 1) - 1
    q = rng.integers(-m, m + 1, size=(5, 37))
    dt = DataType[f"{'INT' if signed else 'UINT'}{input_bits}"] if input_bits > 1 or signed \
        else DataType["BINARY"]
    qonnx_min, qonnx_max = calculate_matvec_accumulator_range(q.T.astype(np.float64), dt)
    ours = bounds.exact_accumulator_range(q, *bounds.input_range(input_bits, signed))
    assert ours.overall == (int(qonnx_min), int(qonnx_max))


def test_widths_for_ranges():
    assert bounds.signed_bits_for_range(-128, 127) == 8
    assert bounds.signed_bits_for_range(-129, 0) == 9
    assert bounds.signed_bits_for_range(0, 128) == 9
    assert bounds.unsigned_bits_for_range(0, 255) == 8
    assert bounds.unsigned_bits_for_range(-1, 255) is None


def test_l1_norm_bound_never_overflows_exhaustively():
    # every integer vector with ||q||_1 <= T, against every input: |q.x| fits P signed bits
    for acc_bits, input_bits, signed in [(5, 2, True), (5, 2, False), (6, 3, False)]:
        t = math.floor(bounds.l1_norm_bound(acc_bits, input_bits, signed))
        lo, hi = bounds.input_range(input_bits, signed)
        for q in itertools.product(range(-t, t + 1), repeat=2):
            if sum(map(abs, q)) > t:
                continue
            r = bounds.exact_accumulator_range([q], lo, hi)
            assert r.signed_bits <= acc_bits


@pytest.mark.parametrize("bad", [0, -3, 65, 2.5, True])
def test_bad_bit_widths_are_named(bad):
    with pytest.raises(ValueError, match="accumulator bit width P"):
        bounds.l1_norm_bound(bad, 4, True)


def test_non_integer_weights_are_refused():
    with pytest.raises(ValueError, match="not integers"):
        bounds.exact_accumulator_range([[0.5, 1.0]], -1, 1)
