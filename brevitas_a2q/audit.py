"""Accumulator audit of any Brevitas model: what each quantized Linear/Conv layer needs.

For every layer it reports, from the layer's actual integer weights ``q`` and the quantized input
it sees on an example forward pass: ``K``, ``M``, ``N``, the input sign, the target ``P`` (A2Q/A2Q+
layers), the largest per-channel ``||q||_1``, and the accumulator width needed by

* the L1 bound: the tighter of A2Q (``||q||_1``, Colbert et al. 2023, Eq. 15) and A2Q+
  (``2 * max(sum q+, sum |q-|)``, Colbert et al. 2024, Eq. 18); both are valid for any weights;
* the exact range: each weight meeting its worst input extreme (qonnx's
  ``calculate_matvec_accumulator_range``), the true requirement;
* data types alone (A2Q Eq. 12): what a tool that only knows ``K``, ``N``, ``M`` must assume.

The target holds when the exact range fits ``P`` signed bits. Bias is added after accumulation
and is not part of these widths.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from brevitas.core.scaling.pre_scaling import (
    AccumulatorAwareParameterPreScaling,
    AccumulatorAwareZeroCenterParameterPreScaling,
)
from brevitas.nn import QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from brevitas.quant_tensor import IntQuantTensor
from torch import Tensor, nn

from brevitas_a2q import bounds
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quantizers import is_a2q_proxy
from brevitas_a2q.table import cell, text_table

__all__ = [
    "ACCUMULATING_LAYERS",
    "AccumulatorReport",
    "LayerAccumulator",
    "LayerCapture",
    "accumulator_report",
    "capture_layer",
    "capture_layers",
    "iter_accumulating_layers",
    "layer_variant",
]

ACCUMULATING_LAYERS = (QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d)


def iter_accumulating_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every quantized Linear/Conv layer; tags this package's weight proxies
    with the layer name so their errors can name it."""
    for name, module in model.named_modules():
        if isinstance(module, ACCUMULATING_LAYERS):
            if is_a2q_proxy(module.weight_quant):
                module.weight_quant._a2q_layer_name = name
            yield name, module


def layer_variant(layer: nn.Module) -> tuple[str, int | None]:
    """``(variant, target P)`` of a layer: "a2q+", "a2q" or "none" (plain QAT, no target).

    Recognizes this package's quantizers and Brevitas's built-in ``Int8AccumulatorAware*``.
    """
    proxy = layer.weight_quant
    if is_a2q_proxy(proxy):
        return ("a2q+" if proxy.zero_centered else "a2q"), proxy.accumulator_bit_width
    pre_scaling = getattr(getattr(proxy, "tensor_quant", None), "pre_scaling_impl", None)
    if isinstance(pre_scaling, AccumulatorAwareParameterPreScaling):
        target = int(pre_scaling.accumulator_bit_width().item())
        zero_centered = isinstance(pre_scaling, AccumulatorAwareZeroCenterParameterPreScaling)
        return ("a2q+" if zero_centered else "a2q"), target
    return "none", None


@dataclass
class LayerCapture:
    """One accumulating layer as seen on an example forward pass."""

    name: str
    module: nn.Module
    quant_input: IntQuantTensor | None
    int_weight: Tensor  # integers, the layer's weight shape
    weight_scale: Tensor
    weight_bits: int  # M
    input_bits: int | None  # N, None when the input is not quantized
    input_signed: bool | None
    variant: str
    target_bits: int | None  # P
    dot_length: int  # K
    out_channels: int


def _first_input_hooks(layers: list[tuple[str, nn.Module]], seen: dict[str, object]) -> list:
    def hook_for(name: str):
        def hook(module, args):
            seen.setdefault(name, args[0] if args else None)

        return hook

    return [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers]


@torch.no_grad()
def capture_layers(model: nn.Module, example_input: Tensor) -> list[LayerCapture]:
    """Run ``model`` once in eval mode on ``example_input`` and capture every accumulating layer:
    its quantized input and its integer weights (as the layer computes them for that input)."""
    layers = list(iter_accumulating_layers(model))
    if not layers:
        raise A2QInputError("the model has no quantized Linear/Conv layer (brevitas.nn.QuantLinear, "
                            "QuantConv1d/2d/3d) to audit")
    seen: dict[str, object] = {}
    handles = _first_input_hooks(layers, seen)
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [capture_layer(name, layer, seen.get(name)) for name, layer in layers if name in seen]


def capture_layer(name: str, layer: nn.Module, inp: object) -> LayerCapture:
    """Capture ``layer`` given the input ``inp`` it received (an ``IntQuantTensor`` or not)."""
    quant_input = inp if isinstance(inp, IntQuantTensor) else None
    if layer.weight_quant.requires_quant_input:
        weight = layer.quant_weight(quant_input)
    else:
        weight = layer.quant_weight()
    if not isinstance(weight, IntQuantTensor):
        raise A2QInputError(f"layer {name!r}: its weights are not integer-quantized "
                            f"({type(layer.weight_quant).__name__}); cannot audit its accumulator")
    variant, target = layer_variant(layer)
    return LayerCapture(
        name=name,
        module=layer,
        quant_input=quant_input,
        int_weight=weight.int().detach(),
        weight_scale=weight.scale.detach(),
        weight_bits=int(weight.bit_width.item()),
        input_bits=None if quant_input is None else int(quant_input.bit_width.item()),
        input_signed=None if quant_input is None else bool(quant_input.signed),
        variant=variant,
        target_bits=target,
        dot_length=int(layer.weight[0].numel()),
        out_channels=int(layer.weight.shape[0]),
    )


@dataclass
class LayerAccumulator:
    """Audit of one layer. Widths are signed accumulator bits; None where the input is unknown."""

    layer: str
    layer_type: str
    variant: str
    dot_length: int  # K
    weight_bits: int  # M
    input_bits: int | None  # N
    input_signed: bool | None
    target_bits: int | None  # P
    l1_norm_max: int  # largest per-channel ||q||_1
    bits_l1_bound: int | None
    bits_exact_range: int | None
    bits_datatype: int | None
    target_holds: bool | None  # None: no target, or input not quantized

    @classmethod
    def from_capture(cls, cap: LayerCapture) -> LayerAccumulator:
        q = cap.int_weight.to(torch.int64).reshape(cap.out_channels, -1).numpy()
        l1_max = int(abs(q).sum(axis=1).max())
        bits_l1 = bits_exact = bits_dt = holds = None
        if cap.input_bits is not None:
            n, signed = cap.input_bits, cap.input_signed
            zc_l1 = max(bounds.zero_centered_l1_norm(q))
            bits_l1 = min(bounds.min_accumulator_bits(l1_max, n, signed),
                          bounds.min_accumulator_bits(zc_l1, n, signed, zero_centered=True))
            rng = bounds.exact_accumulator_range(q, *bounds.input_range(n, signed))
            bits_exact = rng.signed_bits
            bits_dt = bounds.datatype_accumulator_bits(cap.dot_length, n, cap.weight_bits, signed)
            if cap.target_bits is not None:
                holds = bits_exact <= cap.target_bits
        return cls(
            layer=cap.name,
            layer_type=type(cap.module).__name__,
            variant=cap.variant,
            dot_length=cap.dot_length,
            weight_bits=cap.weight_bits,
            input_bits=cap.input_bits,
            input_signed=cap.input_signed,
            target_bits=cap.target_bits,
            l1_norm_max=l1_max,
            bits_l1_bound=bits_l1,
            bits_exact_range=bits_exact,
            bits_datatype=bits_dt,
            target_holds=holds,
        )


_COLUMNS = (
    ("layer", "layer"), ("layer_type", "type"), ("variant", "quant"), ("dot_length", "K"),
    ("weight_bits", "M"), ("input_bits", "N"), ("input_signed", "signed"), ("target_bits", "P"),
    ("l1_norm_max", "max|q|_1"), ("bits_l1_bound", "P(L1)"), ("bits_exact_range", "P(exact)"),
    ("bits_datatype", "P(dtype)"), ("target_holds", "holds"),
)


class AccumulatorReport(list):
    """A list of :class:`LayerAccumulator` that prints as a table and serializes to JSON."""

    @property
    def all_hold(self) -> bool:
        """True unless some layer's exact range exceeds its target."""
        return all(r.target_holds is not False for r in self)

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dicts(), **kwargs)

    def table(self) -> str:
        rows = [[cell(getattr(r, key), verdict=key == "target_holds") for key, _ in _COLUMNS]
                for r in self]
        return text_table([title for _, title in _COLUMNS], rows)

    def __str__(self) -> str:
        return self.table()


def accumulator_report(model: nn.Module, example_input: Tensor) -> AccumulatorReport:
    """Audit every quantized Linear/Conv layer of ``model`` (ours, Brevitas's built-in A2Q, or
    plain QAT) on ``example_input``. See the module docstring for what each width means."""
    return AccumulatorReport(LayerAccumulator.from_capture(c)
                             for c in capture_layers(model, example_input))
