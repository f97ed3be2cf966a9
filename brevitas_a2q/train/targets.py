"""Per-layer accumulator targets of a model's A2Q layers: find them, set them, and track each
layer's quantized input so that its bound can be computed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from brevitas.core.scaling.pre_scaling import (
    AccumulatorAwareParameterPreScaling,
    AccumulatorAwareZeroCenterParameterPreScaling,
)
from torch import nn

from brevitas_a2q.analysis.audit import iter_accumulating_layers
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant.bounds import check_bits
from brevitas_a2q.quant.channels import OutputChannelView
from brevitas_a2q.quant.quantizers import is_a2q_proxy


def _pre_scaling(layer: nn.Module):
    return layer.weight_quant.tensor_quant.pre_scaling_impl


def _a2q_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer for name, layer in iter_accumulating_layers(model)
            if is_a2q_proxy(layer.weight_quant)}


def _accumulator_aware_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with an A2Q/A2Q+ pre-scaling: this package's quantizers and Brevitas's built-in."""
    return {name: layer for name, layer in iter_accumulating_layers(model)
            if isinstance(getattr(getattr(layer.weight_quant, "tensor_quant", None),
                                  "pre_scaling_impl", None),
                          AccumulatorAwareParameterPreScaling)}


def _is_zero_centered(pre: nn.Module) -> bool:
    return isinstance(pre, AccumulatorAwareZeroCenterParameterPreScaling)


def _target_bits(pre: nn.Module) -> int:
    """The layer's target ``P`` (ours and Brevitas's keep it in ``accumulator_bit_width``)."""
    return int(pre.accumulator_bit_width().item())


def _channel_view(layer: nn.Module) -> OutputChannelView:
    """Output channels of the layer's weight (this package's view for ours, the same layout
    computed from the layer for Brevitas's built-in)."""
    view = getattr(_pre_scaling(layer), "output_channel_view", None)
    if isinstance(view, OutputChannelView):
        return view
    return OutputChannelView(int(getattr(layer, "groups", 1)),
                             bool(getattr(layer, "transposed", False)))


def _record_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a built-in pre-scaling ``forward(weights, input_bit_width, signed)``:
    keeps ``(N, signed)`` and ``P`` as this package's pre-scaling does."""
    module.last_input = (int(float(args[1])), bool(args[2]))
    module.last_accumulator_bits = _target_bits(module)


def track_accumulator_inputs(model: nn.Module) -> int:
    """Make Brevitas's built-in A2Q/A2Q+ layers remember their latest input bit width and sign
    (ours always do), which :func:`a2q_penalty` needs. Idempotent; returns how many layers were
    hooked. Call before the forward pass whose penalty is wanted."""
    hooked = 0
    for layer in _accumulator_aware_layers(model).values():
        pre = _pre_scaling(layer)
        if is_a2q_proxy(layer.weight_quant) or getattr(pre, "_a2q_tracks_input", False):
            continue
        pre.register_forward_pre_hook(_record_input)
        pre._a2q_tracks_input = True
        pre.last_input = None
        hooked += 1
    return hooked


def accumulator_targets(model: nn.Module) -> dict[str, int]:
    """``{layer name: target P}`` of every layer with an A2Q/A2Q+ weight quantizer of this package."""
    return {name: layer.weight_quant.accumulator_bit_width
            for name, layer in _a2q_layers(model).items()}


def set_accumulator_bit_width(
    model: nn.Module, bit_width: int | None = None, overrides: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Set the target accumulator width ``P`` of every A2Q/A2Q+ layer, with per-layer overrides.

    ``bit_width`` applies to all layers (None: keep each layer's own); ``overrides`` maps a layer
    name or an ``fnmatch`` pattern (``"features.*"``) to its ``P`` and wins over ``bit_width``
    (the first matching pattern, in the given order). Every pattern must match some A2Q layer.
    Works on a trained model: the next forward pass uses the new bound. Returns the targets set.
    """
    layers = _a2q_layers(model)
    if not layers:
        raise A2QInputError("the model has no layer with brevitas_a2q.A2QWeightQuant or "
                            "A2QPlusWeightQuant")
    overrides = dict(overrides or {})
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise A2QInputError(f"accumulator override {pattern!r} matches no A2Q layer; A2Q "
                                f"layers are: {', '.join(layers)}")
    targets = {}
    for name, layer in layers.items():
        bits = next((b for p, b in overrides.items() if fnmatch.fnmatchcase(name, p)), bit_width)
        if bits is not None:
            bits = check_bits(f"accumulator bit width of layer {name!r}", bits)
            impl = layer.weight_quant.tensor_quant.pre_scaling_impl.accumulator_bit_width
            impl.bit_width.fill_(bits)
        targets[name] = layer.weight_quant.accumulator_bit_width
    return targets
