"""Small reference networks (CNN, MLP) built with any of the supported weight quantizers.

Used by the demo, the CLI, tests and benchmarks. The input quantizer is 8-bit signed; hidden
activations are unsigned ``act_bits``-bit ReLUs returning quant tensors, so every accumulating layer
sees a quantized input (A2Q reads ``N`` and the sign from it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

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
from brevitas_a2q.quant.quantizers import A2QPlusWeightQuant, A2QWeightQuant

__all__ = ["WEIGHT_QUANTIZERS", "build_cnn", "build_float_cnn", "build_float_mlp", "build_mlp",
           "copy_float_weights", "weight_quant_kwargs"]

# name -> (injector, takes an accumulator target)
WEIGHT_QUANTIZERS = {
    "a2q": (A2QWeightQuant, True),
    "a2q+": (A2QPlusWeightQuant, True),
    "brevitas-a2q": (Int8AccumulatorAwareWeightQuant, True),
    "brevitas-a2q+": (Int8AccumulatorAwareZeroCenterWeightQuant, True),
    "none": (Int8WeightPerChannelFloat, False),
}


# quantizers that offer budgeted rounding (``weight_rounding="budgeted"``)
BUDGETED_ROUNDING = ("a2q", "a2q+")


def weight_quant_kwargs(quant: str, weight_bits: int, acc_bits: int | None,
                        rounding: str = "zero") -> dict:
    """Keyword arguments of a Brevitas layer for the named weight quantizer. ``rounding``
    "budgeted" (this package's A2Q/A2Q+ only) adds ``weight_rounding="budgeted"``."""
    if quant not in WEIGHT_QUANTIZERS:
        raise A2QInputError(f"unknown weight quantizer {quant!r}; choose one of "
                            f"{', '.join(WEIGHT_QUANTIZERS)}")
    if rounding not in ("zero", "budgeted"):
        raise A2QInputError(f"unknown rounding {rounding!r}; choose zero or budgeted")
    if rounding == "budgeted" and quant not in BUDGETED_ROUNDING:
        raise A2QInputError(f"budgeted rounding is an option of this package's quantizers "
                            f"({', '.join(BUDGETED_ROUNDING)}), not of {quant!r}")
    injector, takes_target = WEIGHT_QUANTIZERS[quant]
    kwargs = {"weight_quant": injector, "weight_bit_width": weight_bits}
    if takes_target and acc_bits is not None:
        kwargs["weight_accumulator_bit_width"] = acc_bits
    if rounding == "budgeted":
        kwargs["weight_rounding"] = "budgeted"
    return kwargs


def _check_layer_names(layer_acc_bits: Mapping[str, int] | None, names: tuple[str, ...]) -> None:
    unknown = sorted(set(layer_acc_bits or {}) - set(names))
    if unknown:
        raise A2QInputError(f"per-layer accumulator bits name unknown layer(s) {unknown}; the "
                            f"model's layers are {', '.join(names)}")


def _layer_kwargs(quant: str, weight_bits: int, acc_bits: int | None,
                  layer_acc_bits: Mapping[str, int] | None, name: str,
                  rounding: str = "zero", layer_quant: Mapping[str, str] | None = None) -> dict:
    return weight_quant_kwargs((layer_quant or {}).get(name, quant), weight_bits,
                               (layer_acc_bits or {}).get(name, acc_bits), rounding)


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
    layer_acc_bits: Mapping[str, int] | None = None,
    rounding: str = "zero",
    layer_quant: Mapping[str, str] | None = None,
) -> nn.Sequential:
    """QuantIdentity(8-bit signed) -> [QuantConv2d 3x3 -> BN -> QuantReLU -> MaxPool 2] x 2 ->
    QuantLinear. Layer names: ``conv1``, ``conv2``, ``fc``. ``layer_acc_bits`` gives some layers
    their own target P (e.g. ``{"conv1": 32, "fc": 32}``), for every accumulator-aware quantizer,
    Brevitas's built-in ones included. ``rounding="budgeted"``: budgeted rounding (ours only).
    ``layer_quant`` gives some layers another weight quantizer (e.g. ``{"conv1": "a2q"}`` in an
    A2Q+ model)."""
    _check_layer_names(layer_acc_bits, ("conv1", "conv2", "fc"))
    _check_layer_names(layer_quant, ("conv1", "conv2", "fc"))
    w1, w2, w3 = (_layer_kwargs(quant, weight_bits, acc_bits, layer_acc_bits, n, rounding,
                                layer_quant) for n in ("conv1", "conv2", "fc"))
    c1, c2 = channels
    side = image_size // 4
    return nn.Sequential(
        _named([
            ("input_quant", QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)),
            ("conv1", QuantConv2d(in_channels, c1, 3, padding=1, bias=False, **w1)),
            ("bn1", nn.BatchNorm2d(c1)),
            ("act1", _act(act_bits)),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", QuantConv2d(c1, c2, 3, padding=1, bias=False, **w2)),
            ("bn2", nn.BatchNorm2d(c2)),
            ("act2", _act(act_bits)),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc", QuantLinear(c2 * side * side, num_classes, bias=True, **w3)),
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
    layer_acc_bits: Mapping[str, int] | None = None,
    rounding: str = "zero",
    layer_quant: Mapping[str, str] | None = None,
) -> nn.Sequential:
    """Flatten -> QuantIdentity(8-bit signed) -> [QuantLinear -> BN -> QuantReLU] x len(hidden) ->
    QuantLinear. Layer names: ``fc0``, ``fc1``, ... ; ``layer_acc_bits``, ``rounding`` and
    ``layer_quant`` as in :func:`build_cnn`."""
    names = tuple(f"fc{i}" for i in range(len(hidden) + 1))
    _check_layer_names(layer_acc_bits, names)
    _check_layer_names(layer_quant, names)

    def w(i: int) -> dict:
        return _layer_kwargs(quant, weight_bits, acc_bits, layer_acc_bits, names[i], rounding,
                             layer_quant)

    layers = [("flatten", nn.Flatten()),
              ("input_quant", QuantIdentity(act_quant=Int8ActPerTensorFloat,
                                            return_quant_tensor=True))]
    width = in_features
    for i, h in enumerate(hidden):
        layers += [(f"fc{i}", QuantLinear(width, h, bias=False, **w(i))),
                   (f"bn{i}", nn.BatchNorm1d(h)),
                   (f"act{i}", _act(act_bits))]
        width = h
    layers.append((f"fc{len(hidden)}",
                   QuantLinear(width, num_classes, bias=True, **w(len(hidden)))))
    return nn.Sequential(_named(layers))


def build_float_cnn(
    in_channels: int = 1,
    image_size: int = 8,
    num_classes: int = 10,
    channels: tuple[int, int] = (16, 32),
) -> nn.Sequential:
    """The floating-point twin of :func:`build_cnn` (same layer names and weight shapes, plain
    ``nn`` layers, ReLU): the pretraining phase of Euclidean-projection init."""
    c1, c2 = channels
    side = image_size // 4
    return nn.Sequential(_named([
        ("conv1", nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)),
        ("bn1", nn.BatchNorm2d(c1)), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(c1, c2, 3, padding=1, bias=False)),
        ("bn2", nn.BatchNorm2d(c2)), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(c2 * side * side, num_classes, bias=True)),
    ]))


def build_float_mlp(in_features: int = 64, hidden: tuple[int, ...] = (64,),
                    num_classes: int = 10) -> nn.Sequential:
    """The floating-point twin of :func:`build_mlp` (same layer names and weight shapes)."""
    layers, width = [("flatten", nn.Flatten())], in_features
    for i, h in enumerate(hidden):
        layers += [(f"fc{i}", nn.Linear(width, h, bias=False)), (f"bn{i}", nn.BatchNorm1d(h)),
                   (f"act{i}", nn.ReLU())]
        width = h
    layers.append((f"fc{len(hidden)}", nn.Linear(width, num_classes, bias=True)))
    return nn.Sequential(_named(layers))


def copy_float_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Copy the weights, biases and BatchNorm statistics of ``source`` (e.g. a float twin from
    :func:`build_float_cnn`, or a plain-QAT model) into the same-named entries of ``target``.
    Quantizer parameters are left alone. Returns the copied state-dict keys; a clear error when
    a layer's weight shape differs or nothing matches."""
    src = source.state_dict()
    dst = target.state_dict()
    picked = {}
    for key, value in src.items():
        leaf = key.rsplit(".", 1)[-1]
        if key not in dst or leaf not in ("weight", "bias", "running_mean", "running_var",
                                          "num_batches_tracked"):
            continue
        if dst[key].shape != value.shape:
            raise A2QInputError(f"cannot copy {key}: shape {tuple(value.shape)} in the source, "
                                f"{tuple(dst[key].shape)} in the target model")
        picked[key] = value.detach().clone()
    if not picked:
        raise A2QInputError("the source and target models share no weight names")
    target.load_state_dict(picked, strict=False)
    return list(picked)


def _named(layers: list[tuple[str, nn.Module]]) -> OrderedDict:
    return OrderedDict(layers)
