"""Small reference networks (CNN, MLP) built with any of the supported weight quantizers.

Used by the demo, the CLI, tests and benchmarks. The input quantizer is 8-bit signed; hidden
activations are unsigned ``act_bits``-bit ReLUs returning quant tensors, so every accumulating layer
sees a quantized input (A2Q reads ``N`` and the sign from it).
"""

from __future__ import annotations

from collections import OrderedDict

from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import (
    Int8AccumulatorAwareWeightQuant,
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Uint8ActPerTensorFloat,
)
from torch import nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quantizers import A2QPlusWeightQuant, A2QWeightQuant

__all__ = ["WEIGHT_QUANTIZERS", "build_cnn", "build_mlp", "weight_quant_kwargs"]

# name -> (injector, takes an accumulator target)
WEIGHT_QUANTIZERS = {
    "a2q": (A2QWeightQuant, True),
    "a2q+": (A2QPlusWeightQuant, True),
    "brevitas-a2q": (Int8AccumulatorAwareWeightQuant, True),
    "brevitas-a2q+": (Int8AccumulatorAwareZeroCenterWeightQuant, True),
    "none": (Int8WeightPerChannelFloat, False),
}


def weight_quant_kwargs(quant: str, weight_bits: int, acc_bits: int | None) -> dict:
    """Keyword arguments of a Brevitas layer for the named weight quantizer."""
    if quant not in WEIGHT_QUANTIZERS:
        raise A2QInputError(f"unknown weight quantizer {quant!r}; choose one of "
                            f"{', '.join(WEIGHT_QUANTIZERS)}")
    injector, takes_target = WEIGHT_QUANTIZERS[quant]
    kwargs = {"weight_quant": injector, "weight_bit_width": weight_bits}
    if takes_target and acc_bits is not None:
        kwargs["weight_accumulator_bit_width"] = acc_bits
    return kwargs


def _act(act_bits: int) -> QuantReLU:
    return QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=act_bits, return_quant_tensor=True)


def build_cnn(
    quant: str = "a2q+",
    weight_bits: int = 4,
    act_bits: int = 4,
    acc_bits: int | None = 16,
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    channels: tuple[int, int] = (16, 32),
) -> nn.Sequential:
    """QuantIdentity(8-bit signed) -> [QuantConv2d 3x3 -> BN -> QuantReLU -> MaxPool 2] x 2 ->
    QuantLinear. Layer names: ``conv1``, ``conv2``, ``fc``."""
    w = weight_quant_kwargs(quant, weight_bits, acc_bits)
    c1, c2 = channels
    side = image_size // 4
    return nn.Sequential(
        _named([
            ("input_quant", QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)),
            ("conv1", QuantConv2d(in_channels, c1, 3, padding=1, bias=False, **w)),
            ("bn1", nn.BatchNorm2d(c1)),
            ("act1", _act(act_bits)),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", QuantConv2d(c1, c2, 3, padding=1, bias=False, **w)),
            ("bn2", nn.BatchNorm2d(c2)),
            ("act2", _act(act_bits)),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc", QuantLinear(c2 * side * side, num_classes, bias=True, **w)),
        ])
    )


def build_mlp(
    quant: str = "a2q+",
    weight_bits: int = 4,
    act_bits: int = 4,
    acc_bits: int | None = 16,
    in_features: int = 64,
    hidden: tuple[int, ...] = (64,),
    num_classes: int = 10,
) -> nn.Sequential:
    """Flatten -> QuantIdentity(8-bit signed) -> [QuantLinear -> BN -> QuantReLU] x len(hidden) ->
    QuantLinear. Layer names: ``fc0``, ``fc1``, ... ."""
    w = weight_quant_kwargs(quant, weight_bits, acc_bits)
    layers = [("flatten", nn.Flatten()),
              ("input_quant", QuantIdentity(act_quant=Int8ActPerTensorFloat,
                                            return_quant_tensor=True))]
    width = in_features
    for i, h in enumerate(hidden):
        layers += [(f"fc{i}", QuantLinear(width, h, bias=False, **w)),
                   (f"bn{i}", nn.BatchNorm1d(h)),
                   (f"act{i}", _act(act_bits))]
        width = h
    layers.append((f"fc{len(hidden)}", QuantLinear(width, num_classes, bias=True, **w)))
    return nn.Sequential(_named(layers))


def _named(layers: list[tuple[str, nn.Module]]) -> OrderedDict:
    return OrderedDict(layers)
