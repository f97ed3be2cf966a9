"""The Python API under misuse: Brevitas-compatible exception types, messages that name the module
and the fix in both spellings (Python keyword, CLI flag), settings refused where Brevitas's own
A2Q cannot work either, and Brevitas's per-tensor keyword working as it does for its other
quantizers (oracle: Brevitas's built-in A2Q with the same per-tensor post-scale)."""

from __future__ import annotations

import pytest
import torch
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantIdentity, QuantLinear
from brevitas.quant import (
    Int8AccumulatorAwareWeightQuant,
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Int8ActPerTensorFloat,
)
from brevitas.quant.experimental.float import Fp8e4m3ActPerTensorFloat
from torch import nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant.bounds import l1_norm_bound
from brevitas_a2q.quant.channels import OutputChannelView
from brevitas_a2q.quant.quantizers import A2QPlusWeightQuant, A2QWeightQuant
from brevitas_a2q.train import set_accumulator_bit_width

torch.set_num_threads(1)

OURS = [A2QWeightQuant, A2QPlusWeightQuant]
PAIRS = {"a2q": (A2QWeightQuant, Int8AccumulatorAwareWeightQuant),
         "a2q+": (A2QPlusWeightQuant, Int8AccumulatorAwareZeroCenterWeightQuant)}


class Features(nn.Module):
    """``features.2`` is an A2Q conv whose input is not quantized (``features.1`` is a ReLU)."""

    def __init__(self, weight_quant) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                                      QuantConv2d(4, 4, 3, weight_quant=weight_quant))

    def forward(self, x):
        return self.features(x)


# --- AssertionError where Brevitas raises one --------------------------------------------------

@pytest.mark.parametrize("ours,builtin", PAIRS.values(), ids=PAIRS.keys())
def test_no_cached_input_raises_what_brevitas_raises(ours, builtin):
    """Brevitas's proxy test: ``scale()``/``zero_point()`` of an input-aware proxy with no cached
    quantized input raise ``AssertionError``. Defect: ours raised only ``A2QInputError``."""
    theirs = QuantLinear(10, 5, weight_quant=builtin).weight_quant
    mine = QuantLinear(10, 5, weight_quant=ours).weight_quant
    for call in ("scale", "zero_point"):
        with pytest.raises(AssertionError):
            getattr(theirs, call)()
        with pytest.raises(AssertionError) as err:
            getattr(mine, call)()
        assert isinstance(err.value, A2QInputError)
        assert "input_quant=" in str(err.value)
    for call in ("pre_scale", "pre_zero_point"):
        with pytest.raises(NotImplementedError):
            getattr(mine, call)()


@pytest.mark.parametrize("quant", OURS)
def test_unquantized_input_on_a_plain_forward_is_an_assertion_error_naming_the_module(quant):
    """Defect: the message said "a layer (QuantConv2d, ...)" on a plain forward pass."""
    with pytest.raises(AssertionError) as err:
        Features(quant)(torch.randn(1, 3, 9, 9))
    assert isinstance(err.value, A2QInputError)
    message = str(err.value)
    assert "layer 'features.2' (QuantConv2d" in message
    assert "input_quant=" in message and "return_quant_tensor=True" in message


@pytest.mark.parametrize("ours,builtin", PAIRS.values(), ids=PAIRS.keys())
def test_minifloat_input_is_refused_as_brevitas_refuses_it(ours, builtin):
    """Brevitas asserts "Input must be quantized" for a minifloat (FloatQuantTensor) input; ours
    raises an AssertionError too, saying it is a minifloat, not an unquantized input."""
    def model(quant):
        return nn.Sequential(QuantIdentity(Fp8e4m3ActPerTensorFloat, return_quant_tensor=True),
                             QuantLinear(8, 3, weight_quant=quant))
    with pytest.raises(AssertionError, match="Input must be quantized"):
        model(builtin)(torch.randn(2, 8))
    with pytest.raises(AssertionError) as err:
        model(ours)(torch.randn(2, 8))
    assert isinstance(err.value, A2QInputError)
    assert "layer '1' (QuantLinear" in str(err.value)
    assert "FloatQuantTensor" in str(err.value) and "integer" in str(err.value)


# --- weight and accumulator bit widths ---------------------------------------------------------

@pytest.mark.parametrize("ours,builtin", PAIRS.values(), ids=PAIRS.keys())
def test_one_bit_weights_are_refused_at_construction(ours, builtin):
    """Brevitas's built-in A2Q cannot compute 1-bit weights (a narrow signed 1-bit integer holds
    only 0: its post-scale is inf and its weights NaN). Defect: ours accepted
    ``weight_bit_width=1`` and the audit crashed later ("QuantTensor not valid"); now it is
    refused when the layer is built, naming the option and the fix."""
    theirs = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, weight_quant=builtin,
                         weight_bit_width=1)
    assert not bool(torch.isfinite(theirs(torch.randn(1, 3, 5, 5))).any())
    with pytest.raises(A2QInputError, match=r"weight_bit_width .*got 1.*weight_bit_width >= 2"):
        QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat, weight_quant=ours,
                    weight_bit_width=1)


@pytest.mark.parametrize("quant", OURS)
@pytest.mark.parametrize("bits", [1, 65])
def test_accumulator_width_outside_2_to_64_is_refused_at_construction(quant, bits):
    """Defect: the Python API took 1-bit accumulators (the CLI takes 2..64)."""
    with pytest.raises(A2QInputError, match=rf"weight_accumulator_bit_width .*2 and 64 bits, got {bits}"):
        QuantLinear(8, 3, weight_quant=quant, input_quant=Int8ActPerTensorFloat,
                    weight_accumulator_bit_width=bits)


def test_set_accumulator_bit_width_refuses_one_bit():
    model = nn.Sequential(QuantLinear(8, 3, weight_quant=A2QWeightQuant,
                                      input_quant=Int8ActPerTensorFloat))
    with pytest.raises(A2QInputError, match=r"layer '0'.*2 and 64"):
        set_accumulator_bit_width(model, 1)


class TwoConvs(nn.Module):
    def __init__(self, p: int) -> None:
        super().__init__()
        self.conv1 = QuantConv2d(3, 4, 3, input_quant=Int8ActPerTensorFloat,
                                 weight_quant=A2QWeightQuant, weight_accumulator_bit_width=p)

    def forward(self, x):
        return self.conv1(x)


def test_target_too_small_names_the_module_and_the_fix_in_python_and_cli_spelling():
    """Defect: "a layer (QuantConv2d, ...)" and only the Python keyword. 8-bit signed inputs need
    P >= 9 for one non-zero unit weight (A2Q Eq. 15: T = (2^(P-1) - 1) 2^(1-N) >= 1)."""
    assert l1_norm_bound(8, 8, True, False) < 1 <= l1_norm_bound(9, 8, True, False)
    with pytest.raises(A2QInputError) as err:
        TwoConvs(8)(torch.randn(1, 3, 5, 5))
    message = str(err.value)
    assert "layer 'conv1' (QuantConv2d" in message
    assert "weight_accumulator_bit_width=9" in message
    assert "--acc-bits 9" in message and "--layer-acc-bits conv1=9" in message


# --- per-tensor post-scale, the Brevitas way ---------------------------------------------------

def _layer(weight_quant, **kwargs):
    torch.manual_seed(0)
    layer = QuantConv2d(4, 6, 3, input_quant=Int8ActPerTensorFloat, weight_quant=weight_quant,
                        weight_bit_width=4, weight_accumulator_bit_width=12, **kwargs)
    with torch.no_grad():  # channels of very different norms: some clamped to T, some not
        layer.weight.mul_(torch.exp(torch.randn(6, 1, 1, 1)))
    return layer.eval()


def _per_tensor_type(quant):
    return type(f"{quant.__name__}PerTensor", (quant,),
                {"scaling_per_output_type": ScalingPerOutputType.TENSOR})


@pytest.mark.parametrize("spelling", ["layer keyword", "quantizer let"])
@pytest.mark.parametrize("variant", sorted(PAIRS))
def test_per_tensor_flag_gives_brevitas_per_tensor_a2q(variant, spelling):
    """Defect: ``weight_scaling_per_output_channel=False`` (on the layer, or
    ``scaling_per_output_channel=False`` on the quantizer) crashed with "shape '[]' is invalid
    for input of size 6". Oracle: Brevitas's built-in A2Q with a per-tensor post-scale
    (``scaling_per_output_type = TENSOR``, the spelling Brevitas's own tests use): same integers,
    same outputs; one post-scale; every output channel within its L1 bound."""
    ours, builtin = PAIRS[variant]
    if spelling == "layer keyword":
        mine = _layer(ours, weight_scaling_per_output_channel=False)
    else:
        mine = _layer(ours.let(scaling_per_output_channel=False))
    theirs = _layer(_per_tensor_type(builtin))
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        y_mine, y_theirs = mine(x), theirs(x)
        w_mine = mine.quant_weight(mine.input_quant(x))
        w_theirs = theirs.quant_weight(theirs.input_quant(x))
    assert w_mine.scale.numel() == 1
    assert torch.equal(w_mine.int(), w_theirs.int())
    assert torch.equal(y_mine, y_theirs)
    q = w_mine.int().to(torch.int64).reshape(6, -1)
    norms = q.abs().sum(1) + (q.sum(1).abs() if variant == "a2q+" else 0)
    bound = l1_norm_bound(12, 8, True, zero_centered=variant == "a2q+")
    assert all(n <= bound for n in norms.tolist())


@pytest.mark.parametrize("variant", sorted(PAIRS))
def test_per_tensor_flag_is_the_advertised_fix_for_grouped_transposed_convs(variant):
    """A grouped transposed conv needs a per-tensor post-scale; the error says so, and the layer
    keyword it names works (every output channel within its exact L1 bound)."""
    kwargs = dict(in_channels=4, out_channels=6, kernel_size=3, groups=2,
                  input_quant=Int8ActPerTensorFloat, weight_quant=PAIRS[variant][0],
                  weight_accumulator_bit_width=12)
    with pytest.raises(A2QInputError, match="weight_scaling_per_output_channel=False"):
        QuantConvTranspose2d(**kwargs)
    layer = QuantConvTranspose2d(**kwargs, weight_scaling_per_output_channel=False).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        layer(x)
        q = layer.quant_weight(layer.input_quant(x)).int().to(torch.int64)
    rows = OutputChannelView(groups=2, transposed=True)(q)
    norms = rows.abs().sum(1) + (rows.sum(1).abs() if variant == "a2q+" else 0)
    assert all(n <= l1_norm_bound(12, 8, True, variant == "a2q+") for n in norms.tolist())
