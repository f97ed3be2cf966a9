"""Our A2Q/A2Q+ quantizers against Brevitas's built-in ones (a correct-by-construction oracle for
P <= 24): same integer weights, same outputs, same gradients."""

from fractions import Fraction

import pytest
import torch
from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear
from brevitas.quant import (
    Int8AccumulatorAwareWeightQuant,
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Int8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from brevitas_a2q import A2QPlusWeightQuant, A2QWeightQuant, l1_norm_bound

PAIRS = {"a2q": (A2QWeightQuant, Int8AccumulatorAwareWeightQuant),
         "a2q+": (A2QPlusWeightQuant, Int8AccumulatorAwareZeroCenterWeightQuant)}

# (layer class, constructor kwargs, input shape without batch)
LAYERS = {
    "linear": (QuantLinear, dict(in_features=48, out_features=6), (48,)),
    "conv1d": (QuantConv1d, dict(in_channels=6, out_channels=5, kernel_size=3), (6, 11)),
    "conv2d": (QuantConv2d, dict(in_channels=4, out_channels=6, kernel_size=3), (4, 7, 7)),
    "grouped": (QuantConv2d, dict(in_channels=8, out_channels=6, kernel_size=3, groups=2),
                (8, 6, 6)),
    "depthwise": (QuantConv2d, dict(in_channels=6, out_channels=6, kernel_size=3, groups=6),
                  (6, 6, 6)),
}


def make(layer: str, weight_quant, seed: int, m: int, p: int, n: int, signed: bool):
    cls, kwargs, shape = LAYERS[layer]
    torch.manual_seed(seed)
    module = cls(**kwargs, bias=True, weight_quant=weight_quant, weight_bit_width=m,
                 weight_accumulator_bit_width=p,
                 input_quant=Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat,
                 input_bit_width=n)
    with torch.no_grad():  # spread the weights so that some layers are clamped and some not
        module.weight.mul_(torch.exp(torch.randn(module.weight.shape[0], *[1] * (module.weight.dim() - 1))))
    return module, shape


def brevitas_bound_is_ours(variant: str, p: int, n: int, signed: bool) -> bool:
    """Brevitas computes T in float32 (A2Q+ rounds the quotient to nearest); ours rounds down."""
    exact = l1_norm_bound(p, n, signed, zero_centered=variant == "a2q+")
    return Fraction(torch.tensor(float(exact), dtype=torch.float32).item()) <= exact


def run(module, shape, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, *shape, generator=gen) * 2
    y = module(x)
    q = module.quant_weight(module.input_quant(x)).int()
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return y.detach(), q, grads


@given(variant=st.sampled_from(sorted(PAIRS)), layer=st.sampled_from(sorted(LAYERS)),
       seed=st.integers(0, 10_000), m=st.integers(2, 8), p=st.integers(8, 24),
       n=st.integers(2, 8), signed=st.booleans())
@settings(max_examples=250, deadline=None)
def test_same_integer_weights_outputs_and_gradients_as_brevitas(variant, layer, seed, m, p, n,
                                                               signed):
    assume(l1_norm_bound(p, n, signed, variant == "a2q+") >= 1)  # else ours refuses (tested below)
    ours, shape = make(layer, PAIRS[variant][0], seed, m, p, n, signed)
    theirs, _ = make(layer, PAIRS[variant][1], seed, m, p, n, signed)
    y_ours, q_ours, g_ours = run(ours, shape, seed)
    y_theirs, q_theirs, g_theirs = run(theirs, shape, seed)
    if brevitas_bound_is_ours(variant, p, n, signed):
        assert torch.equal(q_ours, q_theirs)
        assert torch.equal(y_ours, y_theirs)
        assert g_ours.keys() == g_theirs.keys()
        for name in g_ours:
            torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=0, atol=0, msg=name)
    else:
        # Brevitas's bound is a float32 ulp above the exact one: ours can only be smaller
        assert torch.all(q_ours.abs() <= q_theirs.abs())
        assert (q_ours != q_theirs).float().mean() < 0.05


@pytest.mark.parametrize("variant", sorted(PAIRS))
def test_checkpoints_of_brevitas_a2q_load_into_ours(variant):
    theirs, shape = make("conv2d", PAIRS[variant][1], 3, 4, 14, 4, False)
    ours, _ = make("conv2d", PAIRS[variant][0], 99, 4, 14, 4, False)
    x = torch.rand(2, *shape)
    theirs(x)
    ours(x)  # initializes the lazily built input-quant state on both
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.quant_weight(ours.input_quant(x)).int(),
                       theirs.quant_weight(theirs.input_quant(x)).int())
