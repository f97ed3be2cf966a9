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

``N`` and the sign are those of the tensor the layer multiplies: the output of its own
``input_quant=`` when it has one (whatever it receives), else its incoming quant tensor. Channels
are *output* channels (a transposed conv's weight ``(in, out/groups, k...)`` is regrouped, ``K =
in/groups * prod(k)``). Layers or channels whose integer weights are all zero are listed in
``AccumulatorReport.warnings``.
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
from brevitas.nn import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
)
from brevitas.quant_tensor import IntQuantTensor
from torch import Tensor, nn

from brevitas_a2q.analysis.table import cell, text_table
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant import bounds
from brevitas_a2q.quant.channels import OutputChannelView
from brevitas_a2q.quant.quantizers import is_a2q_proxy

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
    "output_channel_rows",
    "zero_weight_warning",
]

ACCUMULATING_LAYERS = (QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d,
                       QuantConvTranspose2d, QuantConvTranspose3d)


def output_channel_rows(layer: nn.Module, weights: Tensor) -> Tensor:
    """``weights`` (the layer's weight shape) as ``(out_channels, K)`` rows, one per output
    channel (:class:`brevitas_a2q.quant.pre_scaling.OutputChannelView`)."""
    view = OutputChannelView(int(getattr(layer, "groups", 1)),
                             bool(getattr(layer, "transposed", False)))
    return view(weights)


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
    rows: Tensor | None = None  # integer weights by output channel, (out_channels, K)
    weight_value: Tensor | None = None  # the quantized weight q * s, the layer's weight shape

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = output_channel_rows(self.module, self.int_weight)
        if self.weight_value is None:
            self.weight_value = self.int_weight * self.weight_scale


def capture_hooks(layers: list[tuple[str, nn.Module]], seen: dict[str, tuple]) -> list:
    """Hooks recording, on each layer's first call, what it multiplies: the output of its
    ``input_quant`` (its own quantizer's, or the incoming tensor passed through) and the output of
    its weight quantizer. ``seen[name] = (input, quantized weight)``; remove the handles after."""
    handles = []
    for name, layer in layers:
        record = seen.setdefault(name, [None, None, False])

        def on_input(module, args, out, record=record):
            if not record[2]:
                record[0] = out

        def on_weight(module, args, out, record=record):
            if not record[2] and record[1] is None:
                record[1] = out
                record[2] = True  # the first call is the one Brevitas's exporter does not trace

        handles.append(layer.input_quant.register_forward_hook(on_input))
        handles.append(layer.weight_quant.register_forward_hook(on_weight))
    return handles


@torch.no_grad()
def capture_layers(model: nn.Module, example_input: Tensor) -> list[LayerCapture]:
    """Run ``model`` once in eval mode on ``example_input`` and capture every accumulating layer:
    the quantized input it multiplies and its integer weights, as computed in that forward pass
    (each weight quantizer runs once)."""
    layers = list(iter_accumulating_layers(model))
    if not layers:
        raise A2QInputError("the model has no quantized Linear/Conv layer (brevitas.nn.QuantLinear, "
                            "QuantConv1d/2d/3d, QuantConvTranspose1d/2d/3d) to audit")
    seen: dict[str, list] = {}
    handles = capture_hooks(layers, seen)
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [capture_layer(name, layer, *seen[name][:2]) for name, layer in layers
            if seen[name][2]]


def capture_layer(name: str, layer: nn.Module, inp: object, weight: object = None
                  ) -> LayerCapture:
    """Capture ``layer`` given the (quantized or float) tensor ``inp`` it multiplies, i.e. the
    output of its ``input_quant``, and optionally its already computed quantized ``weight``."""
    quant_input = inp if isinstance(inp, IntQuantTensor) else None
    if weight is None:
        if layer.weight_quant.requires_quant_input:
            weight = layer.quant_weight(quant_input)
        else:
            weight = layer.quant_weight()
    if not isinstance(weight, IntQuantTensor):
        raise A2QInputError(f"layer {name!r}: its weights are not integer-quantized "
                            f"({type(layer.weight_quant).__name__}); cannot audit its accumulator")
    variant, target = layer_variant(layer)
    int_weight = weight.int().detach()
    rows = output_channel_rows(layer, int_weight)
    return LayerCapture(
        name=name,
        module=layer,
        quant_input=quant_input,
        int_weight=int_weight,
        weight_scale=weight.scale.detach(),
        weight_bits=int(weight.bit_width.item()),
        input_bits=None if quant_input is None else int(quant_input.bit_width.item()),
        input_signed=None if quant_input is None else bool(quant_input.signed),
        variant=variant,
        target_bits=target,
        dot_length=int(rows.shape[1]),
        out_channels=int(rows.shape[0]),
        rows=rows,
        weight_value=weight.value.detach(),
    )


def zero_weight_warning(layer: str, zero_channels: int, out_channels: int, variant: str,
                        target_bits: int | None, input_bits: int | None,
                        input_signed: bool | None, *, dot_length: int | None = None,
                        learned_norm: float | None = None, rounding: str | None = None) -> str | None:
    """Why a layer has all-zero integer channels and what helps, or None if it has none.

    With A2Q/A2Q+, ``q = round_to_zero(min(g/s, T) * v / ||v||_1)`` (Colbert et al. 2023,
    Sec. 4): a channel is all zero when no weight's share of its budget ``min(g/s, T)`` reaches 1.
    The largest share of ``K`` weights is at least ``1/K``, so a budget of ``K`` or more always
    leaves a non-zero weight. Which of ``T`` and the learned norm ``g/s`` binds is therefore said
    from ``learned_norm`` (the smallest ``g/s`` of the all-zero channels, where the layer is at
    hand), else from ``T >= K`` (then ``g/s`` binds), else left open. ``target_bits`` must be
    the P the layer was trained for (not one set afterwards to check it). ``rounding``
    ("zero"/"budgeted", None if unknown) keeps budgeted rounding out of the advice when it is
    on.
    """
    if zero_channels == 0:
        return None
    what = ("all its integer weights are zero" if zero_channels == out_channels else
            f"{zero_channels} of its {out_channels} output channels have all-zero integer weights")
    text = f"layer {layer!r}: {what} (the layer outputs a constant there)"
    if variant not in ("a2q", "a2q+") or target_bits is None or input_bits is None:
        return text
    budget = float(bounds.l1_norm_bound(target_bits, input_bits, bool(input_signed),
                                        variant == "a2q+"))
    sign = "signed" if input_signed else "unsigned"
    t_text = (f"the L1 budget T = {budget:.4g} (P = {target_bits}, {input_bits}-bit {sign} "
              f"input, {variant})")
    if learned_norm is not None:
        binds = "g/s" if learned_norm < budget else "T"
    elif dot_length is not None and budget >= dot_length:
        binds = "g/s"
    else:
        binds = None
    budgeted = ("" if rounding == "budgeted" else
                "budgeted rounding (weight_rounding=\"budgeted\", a2q train --rounding "
                "budgeted; this package's quantizers)" + (", if not already on"
                                                         if rounding is None else "") + ", ")
    if binds == "g/s":
        norm = f" (smallest {learned_norm:.3g})" if learned_norm is not None else ""
        why = (f"T >= K = {dot_length}, so the budget alone leaves every channel a non-zero "
               "weight" if dot_length is not None and budget >= dot_length else
               "T is larger")
        return (f"{text}. What binds is the learned norm g/s{norm}, not {t_text}: {why}; "
                "with g/s that small no weight's share of the budget rounds to a non-zero "
                "integer. What helps: Euclidean-projection init "
                "(brevitas_a2q.train.euclidean_projection_init) or more training to grow g, "
                f"{budgeted}not a wider P (T does not bind)")
    nonzero = "rounds to a non-zero integer"
    if binds == "T":
        cause = f"binds: no single weight's share of it {nonzero}"
    elif dot_length is not None:
        cause = (f"is below K = {dot_length} and may bind (or the learned norm g/s, which is not "
                 f"known here): no single weight's share of min(g/s, T) {nonzero}")
    else:
        cause = ("or the learned norm g/s binds (not known here): no single weight's share of "
                 f"min(g/s, T) {nonzero}")
    return (f"{text}. {t_text[0].upper()}{t_text[1:]} {cause}. What helps: Euclidean-projection "
            f"init (brevitas_a2q.train.euclidean_projection_init), {budgeted}a wider P for this "
            "layer, per-layer targets (set_accumulator_bit_width overrides, a2q train "
            "--layer-acc-bits)")


def learned_norms(layer: nn.Module) -> Tensor | None:
    """Per-output-channel ``g/s`` of an A2Q/A2Q+ layer (ours or Brevitas's built-in): the L1
    norm the weight normalization asks for before the clamp to ``T``; None for other layers."""
    pre = getattr(getattr(layer.weight_quant, "tensor_quant", None), "pre_scaling_impl", None)
    if not isinstance(pre, AccumulatorAwareParameterPreScaling):
        return None
    with torch.no_grad():
        g = pre.restrict_clamp_scaling(pre.value)
        s = pre.scaling_impl(pre.stats_input_view_shape_impl(layer.weight))
        return (g / s).detach().reshape(-1).cpu()


def layer_rounding(layer: nn.Module) -> str:
    """"budgeted" or "zero": the integer rounding of a layer's weight quantizer (Brevitas's
    quantizers round to zero)."""
    return getattr(getattr(layer.weight_quant, "tensor_quant", None), "rounding", "zero")


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
    out_channels: int = 0
    zero_channels: int = 0  # output channels whose integer weights are all zero
    zero_channels_norm: float | None = None  # smallest g/s of the all-zero channels (A2Q/A2Q+)
    rounding: str = "zero"  # integer rounding of the weight quantizer: "zero" or "budgeted"

    @classmethod
    def from_capture(cls, cap: LayerCapture) -> LayerAccumulator:
        q = cap.rows.to(torch.int64).cpu().numpy()
        l1 = abs(q).sum(axis=1)
        l1_max = int(l1.max()) if l1.size else 0
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
            out_channels=cap.out_channels,
            zero_channels=int((l1 == 0).sum()),
            zero_channels_norm=_zero_channels_norm(cap.module, l1 == 0),
            rounding=layer_rounding(cap.module),
        )

    @property
    def warning(self) -> str | None:
        return zero_weight_warning(self.layer, self.zero_channels, self.out_channels,
                                   self.variant, self.target_bits, self.input_bits,
                                   self.input_signed, dot_length=self.dot_length,
                                   learned_norm=self.zero_channels_norm, rounding=self.rounding)


def _zero_channels_norm(layer: nn.Module, zero) -> float | None:
    """The smallest ``g/s`` among the channels flagged in ``zero`` (None if none or unknown)."""
    if not zero.any():
        return None
    norms = learned_norms(layer)
    if norms is None or norms.numel() != len(zero):
        return None
    return float(norms[torch.from_numpy(zero)].min())


_COLUMNS = (
    ("layer", "layer"), ("layer_type", "type"), ("variant", "quant"), ("dot_length", "K"),
    ("weight_bits", "M"), ("input_bits", "N"), ("input_signed", "signed"), ("target_bits", "P"),
    ("l1_norm_max", "max|q|_1"), ("bits_l1_bound", "P(L1)"), ("bits_exact_range", "P(exact)"),
    ("bits_datatype", "P(dtype)"), ("target_holds", "holds"),
)


class AccumulatorReport(list):
    """A list of :class:`LayerAccumulator` that prints as a table and serializes to JSON.

    What was checked: a layer is checked when it has a target P and its input is quantized (so
    its exact range is known); :attr:`checked` counts those, :attr:`unchecked` names the rest.
    :attr:`all_hold` is True only when at least one layer was checked and every checked target
    holds, False when one is violated, None when nothing was checked (plain QAT, no target):
    never a pass for nothing.

    ``warnings``: one line per layer with all-zero integer channels (why, and what helps), also
    printed under the table and included in :meth:`to_dict`.
    """

    @property
    def warnings(self) -> list[str]:
        return [r.warning for r in self if r.warning is not None]

    @property
    def checked(self) -> int:
        """How many layers were checked against their target P."""
        return sum(r.target_holds is not None for r in self)

    @property
    def unchecked(self) -> list[str]:
        """The layers not checked: no target P, or an input that is not quantized."""
        return [r.layer for r in self if r.target_holds is None]

    @property
    def violated(self) -> bool:
        """Some layer's exact range exceeds its target."""
        return any(r.target_holds is False for r in self)

    @property
    def all_hold(self) -> bool | None:
        """True: at least one target checked and every one holds; False: one is violated;
        None: nothing was checked."""
        if self.violated:
            return False
        return True if self.checked else None

    @property
    def summary(self) -> str:
        """One line: how many layers were checked, and whether every checked target holds."""
        if self.violated:
            bad = ", ".join(r.layer for r in self if r.target_holds is False)
            return f"{self.checked} of {len(self)} layers checked against a target: VIOLATED: {bad}"
        if not self.checked:
            return (f"nothing checked: none of the {len(self)} layers has a target P with a "
                    "quantized input")
        return (f"{self.checked} of {len(self)} layers checked against a target, every checked "
                "target holds")

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self]

    def to_dict(self) -> dict:
        """``layers``, ``warnings``, ``all_hold`` (True/False/None, see :attr:`all_hold`),
        ``checked`` (count), ``unchecked`` (names) and ``summary``."""
        return {"layers": self.to_dicts(), "warnings": self.warnings, "all_hold": self.all_hold,
                "checked": self.checked, "unchecked": self.unchecked, "summary": self.summary}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        rows = [[cell(getattr(r, key), verdict=key == "target_holds") for key, _ in _COLUMNS]
                for r in self]
        lines = [text_table([title for _, title in _COLUMNS], rows)]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def accumulator_report(model: nn.Module, example_input: Tensor) -> AccumulatorReport:
    """Audit every quantized Linear/Conv layer of ``model`` (ours, Brevitas's built-in A2Q, or
    plain QAT) on ``example_input``. See the module docstring for what each width means."""
    return AccumulatorReport(LayerAccumulator.from_capture(c)
                             for c in capture_layers(model, example_input))
