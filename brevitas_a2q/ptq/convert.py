"""From a float model to a Brevitas model with this package's A2Q/A2Q+ quantizers, and back from
chosen integers to the quantizer's parameters.

* The reference CNN/MLP (:mod:`brevitas_a2q.train.models`) are rebuilt as quantized twins with
  the same layer names (:func:`quantized_twin`), so the result is an ordinary
  ``brevitas_a2q.train.checkpoint/1`` model.
* Any other ``nn.Module``: Brevitas's own layer swapping (``brevitas.graph.quantize.
  layerwise_quantize``) replaces each Conv/Linear with its Quant layer carrying an input
  quantizer and our weight quantizer (:func:`layerwise_a2q`).
* :func:`load_integer_weights` writes integers chosen by the rounding into a layer so that the
  quantizer itself reproduces them (checked exactly by the caller).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.train.ep_init import _set_scales
from brevitas_a2q.train.targets import _channel_view, _is_zero_centered, _pre_scaling

__all__ = ["VARIANTS", "layer_variants", "layerwise_a2q", "load_integer_weights", "quantized_twin"]

# the weight quantizers a PTQ model may carry: ours, with budgeted (round-to-nearest) rounding,
# which reproduces any integer vector within the budget exactly (see load_integer_weights)
VARIANTS = ("a2q", "a2q+")


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise A2QInputError(f"unknown A2Q variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def _dot_lengths(float_model: nn.Module) -> dict[str, int]:
    """``{name: K}`` of the float model's Conv/Linear layers, in module order."""
    return {name: int(m.weight[0].numel()) for name, m in float_model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))}


def layer_variants(dot_lengths: Mapping[str, int], inputs: Mapping[str, tuple[int, bool]],
                   variant: str, weight_bits: int, targets: Mapping[str, int]) -> dict[str, str]:
    """Per layer, the quantizer: ``variant``, except that an A2Q+ layer whose target ``P`` is at
    least its data-type bound (A2Q Eq. 12: no ``M``-bit weights of length ``K`` can overflow
    ``P`` for its ``N``-bit input) gets A2Q. There no budget binds, and A2Q+'s zero-centring would
    only restrict the integers (the quantizer reproduces integers of mean below 1/2 only: a
    first layer of ``K = 9`` would lose its filters' DC component)."""
    from brevitas_a2q.quant.bounds import datatype_accumulator_bits

    chosen = {}
    for name, k in dot_lengths.items():
        bits, signed = inputs[name]
        free = datatype_accumulator_bits(k, bits, weight_bits, signed) <= targets[name]
        chosen[name] = "a2q" if variant == "a2q+" and free else variant
    return chosen


def quantized_twin(arch: str, float_kwargs: dict, variant: str, weight_bits: int, act_bits: int,
                   acc_bits: int, layer_acc_bits: Mapping[str, int] | None = None,
                   float_model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The quantized CNN/MLP (:func:`~brevitas_a2q.train.models.build_cnn` /
    :func:`~brevitas_a2q.train.models.build_mlp`) with ``variant``'s quantizer, budgeted
    rounding and the given targets; returns the model and the kwargs it was built from (what a
    checkpoint records). With ``float_model`` (its float twin), A2Q+ layers whose target is at
    least their data-type bound get A2Q (:func:`layer_variants`)."""
    from brevitas_a2q.train.checkpoint import build_model

    kwargs = {k: v for k, v in float_kwargs.items() if k not in ("quant", "acc_bits",
                                                                  "layer_acc_bits", "rounding",
                                                                  "weight_bits", "act_bits")}
    kwargs.update(quant=_check_variant(variant), weight_bits=weight_bits, act_bits=act_bits,
                  acc_bits=acc_bits, rounding="budgeted")
    if layer_acc_bits:
        kwargs["layer_acc_bits"] = dict(layer_acc_bits)
    if float_model is not None:
        lengths = _dot_lengths(float_model)
        names = list(lengths)
        inputs = {n: (8, True) if i == 0 else (act_bits, False) for i, n in enumerate(names)}
        targets = {n: (layer_acc_bits or {}).get(n, acc_bits) for n in names}
        chosen = layer_variants(lengths, inputs, variant, weight_bits, targets)
        other = {n: v for n, v in chosen.items() if v != variant}
        if other:
            kwargs["layer_quant"] = other
    if "hidden" in kwargs:
        kwargs["hidden"] = list(kwargs["hidden"])
    built = dict(kwargs)
    if "hidden" in built:
        built["hidden"] = tuple(built["hidden"])
    return build_model(arch, built), kwargs


def layerwise_a2q(model: nn.Module, variant: str, weight_bits: int, act_bits: int,
                  acc_bits: int, first_input_bits: int = 8,
                  layer_acc_bits: Mapping[str, int] | None = None) -> nn.Module:
    """Swap every ``nn.Conv1d/2d``/``nn.Linear`` of ``model`` for its Brevitas Quant layer with
    Brevitas's ``layerwise_quantize``: each gets a signed per-tensor input quantizer (8-bit for the
    first layer, ``act_bits`` for the others), ``variant``'s budgeted weight quantizer at
    ``weight_bits`` (A2Q+ layers whose target reaches the data-type bound get A2Q,
    :func:`layer_variants`) and target ``acc_bits`` (``layer_acc_bits``: per layer), float bias.
    Returns the model (changed in place)."""
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant import Int8ActPerTensorFloat

    from brevitas_a2q.quant.quantizers import A2QBudgetedWeightQuant, A2QPlusBudgetedWeightQuant

    _check_variant(variant)
    lengths = _dot_lengths(model)
    names = list(lengths)
    if not names:
        raise A2QInputError("the model has no nn.Conv1d/nn.Conv2d/nn.Linear layer to quantize")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            raise A2QInputError(f"layer {name!r}: grouped convolutions (groups={module.groups}) "
                                "are not supported by brevitas_a2q.ptq yet")

    unknown = sorted(set(layer_acc_bits or {}) - set(names))
    if unknown:
        raise A2QInputError(f"per-layer targets name unknown layer(s) {unknown}; the model's "
                            f"Conv/Linear layers are {', '.join(names)}")
    inputs = {n: (first_input_bits if i == 0 else act_bits, True) for i, n in enumerate(names)}
    targets = {n: (layer_acc_bits or {}).get(n, acc_bits) for n in names}
    chosen = layer_variants(lengths, inputs, variant, weight_bits, targets)
    quant_class = {nn.Conv1d: qnn.QuantConv1d, nn.Conv2d: qnn.QuantConv2d,
                   nn.Linear: qnn.QuantLinear}
    for name in names:  # one swap per layer: each has its own input width, quantizer and P
        layer_type = type(model.get_submodule(name))
        weight_quant = A2QPlusBudgetedWeightQuant if chosen[name] == "a2q+" \
            else A2QBudgetedWeightQuant
        kwargs = {"input_quant": Int8ActPerTensorFloat, "input_bit_width": inputs[name][0],
                  "weight_quant": weight_quant, "weight_bit_width": weight_bits,
                  "weight_accumulator_bit_width": targets[name], "bias_quant": None,
                  "return_quant_tensor": False}
        layerwise_quantize(model, compute_layer_map={layer_type: (quant_class[layer_type], kwargs)},
                           name_blacklist=[n for n in names if n != name])
    return model


@torch.no_grad()
def load_integer_weights(layer: nn.Module, q_rows: Tensor, scale: Tensor) -> None:
    """Set ``layer``'s weight and quantizer parameters so that its budgeted A2Q/A2Q+ quantizer
    reproduces the integers ``q_rows`` (``(out, K)``, one output channel per row) with post-scale
    ``scale`` ``(out,)``.

    With ``w_c = s_c q_c``, ``s`` both learned scales and ``g_c = s_c ||q_c - m_c||_1`` (``m_c`` the
    channel mean for A2Q+, 0 for A2Q), the quantizer computes ``y_c = (w_c - mean) / pre_scale =
    q_c - m_c`` with ``||q_c - m_c||_1 <= floor(T)`` (no clamp to ``T``), and round-to-nearest gives
    back ``q_c`` when ``|m_c| < 1/2`` (what the rounding ensures for A2Q+); the budgeted take-back
    finds nothing to take since ``q_c`` fits. The caller checks the result exactly.
    """
    view = _channel_view(layer)
    weight = layer.weight
    q = q_rows.to(weight.dtype)
    s = scale.to(weight.dtype).clamp(min=1e-12)
    layer.weight.copy_(view.unview(q * s.unsqueeze(1), weight))
    _set_scales(layer, s)
    pre = _pre_scaling(layer)
    centred = q - q.mean(dim=1, keepdim=True) if _is_zero_centered(pre) else q
    g = (s * centred.abs().sum(dim=1)).clamp(min=1e-10)
    restrict = pre.restrict_clamp_scaling.restrict_value_impl
    pre.value.copy_(restrict.restrict_init_tensor(g).reshape(pre.value.shape))
