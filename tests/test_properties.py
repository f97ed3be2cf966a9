"""Property tests: whatever the weights, bit widths and training history, every channel's exact
worst-case accumulation fits the target P signed bits (checked with Python integers)."""

import pytest
import torch
from brevitas.nn import QuantLinear
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from brevitas_a2q import A2QPlusWeightQuant, A2QWeightQuant, bounds

QUANTS = {"a2q": A2QWeightQuant, "a2q+": A2QPlusWeightQuant}


def layer_for(variant, k, out, m, p, n, signed, seed, weight_scale):
    torch.manual_seed(seed)
    layer = QuantLinear(k, out, bias=False, weight_quant=QUANTS[variant], weight_bit_width=m,
                        weight_accumulator_bit_width=p, input_bit_width=n,
                        input_quant=Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat)
    with torch.no_grad():
        layer.weight.mul_(weight_scale)
        if seed % 3 == 0:  # heavy-tailed weights
            layer.weight.pow_(3)
        if seed % 5 == 0:  # many equal magnitudes: rounding ties everywhere
            layer.weight.copy_(layer.weight.sign() * weight_scale)
    return layer


def assert_fits(layer, x, p, n, signed):
    q = layer.quant_weight(layer.input_quant(x)).int().to(torch.int64).numpy()
    rng = bounds.exact_accumulator_range(q, *bounds.input_range(n, signed))
    lo, hi = rng.overall
    assert -(2 ** (p - 1)) <= lo and hi <= 2 ** (p - 1) - 1, (lo, hi, p)


@given(variant=st.sampled_from(sorted(QUANTS)), k=st.integers(1, 3000), out=st.integers(1, 4),
       m=st.integers(2, 8), p=st.integers(8, 32), n=st.integers(1, 16), signed=st.booleans(),
       seed=st.integers(0, 2**31 - 1), weight_scale=st.floats(1e-3, 1e3),
       steps=st.integers(0, 3), lr=st.floats(1e-3, 0.3))
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_exact_worst_case_fits_target(variant, k, out, m, p, n, signed, seed, weight_scale,
                                      steps, lr):
    assume(bounds.l1_norm_bound(p, n, signed, variant == "a2q+") >= 1)
    layer = layer_for(variant, k, out, m, p, n, signed, seed, weight_scale)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):  # random training steps, large enough to push g past the bound
        optimizer.zero_grad()
        (layer(x) * torch.randn(4, out)).sum().backward()
        optimizer.step()
    assert_fits(layer, x, p, n, signed)


@pytest.mark.parametrize("variant", sorted(QUANTS))
def test_guard_restores_the_bound_when_the_pre_scale_is_too_small(variant):
    # Feed the guarded quantizer a pre-scale half as large as A2Q computes: the integers would be
    # twice too large. The guard must bring every channel back within the bound.
    p, n, signed = 16, 8, True
    layer = layer_for(variant, 64, 4, 8, p, n, signed, seed=7, weight_scale=1.0)
    x = torch.randn(2, 64)
    quant_input = layer.input_quant(x)
    tensor_quant = layer.weight_quant.tensor_quant
    w = layer.weight
    bit_width = tensor_quant.msb_clamp_bit_width_impl()
    half = tensor_quant.pre_scaling_impl(w, quant_input.bit_width, signed) / 2
    bound = tensor_quant.pre_scaling_impl.bound
    zp = tensor_quant.pre_zero_point_impl(w, half, bit_width)
    q_unguarded = tensor_quant.decoupled_int_quant.to_int(half, zp, bit_width, w)
    assert not bound.channels_within(q_unguarded, p, n, signed).all()
    fixed = tensor_quant._guard(w, half, bit_width, n, signed)
    zp = tensor_quant.pre_zero_point_impl(w, fixed, bit_width)
    q = tensor_quant.decoupled_int_quant.to_int(fixed, zp, bit_width, w)
    assert bound.channels_within(q, p, n, signed).all()
    # and it only gives up what it must: about the norms the correct pre-scale gives
    full = tensor_quant.pre_scaling_impl(w, quant_input.bit_width, signed)
    zp = tensor_quant.pre_zero_point_impl(w, full, bit_width)
    q_full = tensor_quant.decoupled_int_quant.to_int(full, zp, bit_width, w)
    assert (bound.effective_l1_norms(q) >= 0.9 * bound.effective_l1_norms(q_full)).all()
    assert fixed.requires_grad
