"""Property tests: whatever the weights, bit widths, layer type and training history, every
*output* channel's exact worst-case accumulation fits the target P signed bits (checked with Python
integers, output channels gathered here independently of the package's views)."""

import numpy as np
import pytest
import torch
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.nn import QuantConv2d, QuantConvTranspose1d, QuantConvTranspose2d, QuantLinear
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from brevitas_a2q import A2QPlusWeightQuant, A2QWeightQuant
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant import bounds

QUANTS = {"a2q": A2QWeightQuant, "a2q+": A2QPlusWeightQuant}


def per_tensor(quant):
    return type(f"{quant.__name__}PerTensor", (quant,),
                {"scaling_per_output_type": ScalingPerOutputType.TENSOR})


def layer_for(variant, k, out, m, p, n, signed, seed, weight_scale, quants=QUANTS):
    """A QuantLinear with ``quants[variant]`` weights and random weights of varied shapes: scaled,
    heavy-tailed (every third seed), or all of one magnitude (every fifth seed: rounding ties)."""
    torch.manual_seed(seed)
    layer = QuantLinear(k, out, bias=False, weight_quant=quants[variant], weight_bit_width=m,
                        weight_accumulator_bit_width=p, input_bit_width=n,
                        input_quant=Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat)
    with torch.no_grad():
        layer.weight.mul_(weight_scale)
        if seed % 3 == 0:  # heavy-tailed weights
            layer.weight.pow_(3)
        if seed % 5 == 0:  # many equal magnitudes: rounding ties everywhere
            layer.weight.copy_(layer.weight.sign() * weight_scale)
    return layer


def output_channel_rows(layer, q: np.ndarray) -> np.ndarray:
    """``(out, K)`` integer weights by output channel, gathered index by index: a transposed
    conv's output channel ``g * out/groups + j`` uses ``q[g*in/groups:(g+1)*in/groups, j]``."""
    if not getattr(layer, "transposed", False):
        return q.reshape(q.shape[0], -1)
    groups, cin, per_group = layer.groups, q.shape[0], q.shape[1]
    rows = []
    for o in range(groups * per_group):
        g, j = divmod(o, per_group)
        rows.append(np.concatenate([q[i, j].ravel()
                                    for i in range(g * cin // groups, (g + 1) * cin // groups)]))
    return np.stack(rows)


def assert_fits(layer, x, p, n, signed):
    q = layer.quant_weight(layer.input_quant(x)).int().to(torch.int64).numpy()
    rows = output_channel_rows(layer, q)
    rng = bounds.exact_accumulator_range(rows, *bounds.input_range(n, signed))
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


CONVS = {  # (class, kwargs, input shape, per-tensor post-scale needed)
    "convT1d": (QuantConvTranspose1d, dict(in_channels=7, out_channels=3, kernel_size=4,
                                           stride=2), (7, 5), False),
    "convT2d": (QuantConvTranspose2d, dict(in_channels=3, out_channels=8, kernel_size=3), (3, 4, 4),
                False),
    "convT2d-grouped": (QuantConvTranspose2d, dict(in_channels=6, out_channels=4, kernel_size=2,
                                                   groups=2), (6, 3, 3), True),
    "conv2d-grouped": (QuantConv2d, dict(in_channels=6, out_channels=4, kernel_size=3, groups=2),
                       (6, 5, 5), False),
}


def conv_for(kind, variant, m, p, n, signed, seed, scale, tensor=False):
    cls, kwargs, shape, needs_tensor = CONVS[kind]
    quant = QUANTS[variant]
    if tensor or needs_tensor:
        quant = per_tensor(quant)
    torch.manual_seed(seed)
    layer = cls(**kwargs, bias=False, weight_quant=quant, weight_bit_width=m,
                weight_accumulator_bit_width=p, input_bit_width=n,
                input_quant=Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat)
    with torch.no_grad():
        layer.weight.mul_(scale * torch.exp(2 * torch.randn(layer.weight.shape[0],
                                                            *[1] * (layer.weight.dim() - 1))))
    return layer, shape


@given(kind=st.sampled_from(sorted(CONVS)), variant=st.sampled_from(sorted(QUANTS)),
       tensor=st.booleans(), m=st.integers(2, 8), p=st.integers(8, 32), n=st.integers(1, 8),
       signed=st.booleans(), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-2, 1e2),
       steps=st.integers(0, 2))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_exact_worst_case_per_output_channel_of_convs(kind, variant, tensor, m, p, n, signed,
                                                      seed, scale, steps):
    assume(bounds.l1_norm_bound(p, n, signed, variant == "a2q+") >= 1)
    layer, shape = conv_for(kind, variant, m, p, n, signed, seed, scale, tensor)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    assert_fits(layer, x, p, n, signed)


def test_grouped_transposed_conv_needs_a_per_tensor_post_scale():
    with pytest.raises(A2QInputError, match="grouped transposed.*ScalingPerOutputType.TENSOR"):
        QuantConvTranspose2d(4, 4, 3, groups=2, weight_quant=A2QWeightQuant,
                             input_quant=Uint8ActPerTensorFloat)


def _halved_then_guarded(layer, x, p, n, signed):
    quant_input = layer.input_quant(x)
    tensor_quant = layer.weight_quant.tensor_quant
    w = layer.weight
    bit_width = tensor_quant.msb_clamp_bit_width_impl()
    half = tensor_quant.pre_scaling_impl(w, quant_input.bit_width, signed) / 2
    zp = tensor_quant.pre_zero_point_impl(w, half, bit_width)
    q_unguarded = tensor_quant.decoupled_int_quant.to_int(half, zp, bit_width, w)
    fixed = tensor_quant._guard(w, half, bit_width, n, signed)
    zp = tensor_quant.pre_zero_point_impl(w, fixed, bit_width)
    q = tensor_quant.decoupled_int_quant.to_int(fixed, zp, bit_width, w)
    full = tensor_quant.pre_scaling_impl(w, quant_input.bit_width, signed)
    zp = tensor_quant.pre_zero_point_impl(w, full, bit_width)
    q_full = tensor_quant.decoupled_int_quant.to_int(full, zp, bit_width, w)
    return q_unguarded, q, q_full, fixed


def _zc_l1(rows: np.ndarray, zero_centered: bool) -> np.ndarray:
    if zero_centered:
        return np.asarray(bounds.zero_centered_l1_norm(rows))
    return np.abs(rows).sum(1)


@pytest.mark.parametrize("kind", ["linear", "convT2d", "convT2d-grouped", "convT1d"])
@pytest.mark.parametrize("variant", sorted(QUANTS))
def test_guard_restores_the_bound_when_the_pre_scale_is_too_small(variant, kind):
    # Feed the guarded quantizer a pre-scale half as large as A2Q computes: the integers would be
    # twice too large. The guard must bring every *output* channel back within the bound.
    p, n, signed = 16, 8, True
    if kind == "linear":
        layer, shape = layer_for(variant, 64, 4, 8, p, n, signed, seed=7, weight_scale=1.0), (64,)
    else:
        layer, shape = conv_for(kind, variant, 8, p, n, signed, seed=7, scale=1.0)
    x = torch.randn(2, *shape)
    q_unguarded, q, q_full, fixed = _halved_then_guarded(layer, x, p, n, signed)
    limit = bounds.l1_norm_bound(p, n, signed, variant == "a2q+")
    rows = [output_channel_rows(layer, t.detach().to(torch.int64).numpy())
            for t in (q_unguarded, q, q_full)]
    zc = variant == "a2q+"
    assert (_zc_l1(rows[0], zc) > limit).any()
    assert (_zc_l1(rows[1], zc) <= limit).all()
    # and it only gives up what it must: about the norms the correct pre-scale gives
    assert (_zc_l1(rows[1], zc) >= 0.9 * _zc_l1(rows[2], zc)).all()
    assert fixed.requires_grad


@pytest.mark.parametrize("variant", sorted(QUANTS))
def test_non_finite_weights_are_reported_not_checked_as_fitting(variant):
    layer = layer_for(variant, 16, 2, 4, 16, 4, False, seed=1, weight_scale=1.0)
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        layer(torch.randn(2, 16))
