"""A2Q and A2Q+ weight quantizers: Brevitas injectors for ``weight_quant=``.

Usage, as with any Brevitas weight quantizer::

    QuantConv2d(16, 32, 3, input_quant=Int8ActPerTensorFloat,
                weight_quant=A2QPlusWeightQuant, weight_bit_width=4,
                weight_accumulator_bit_width=12)

``weight_bit_width`` is ``M`` and ``weight_accumulator_bit_width`` the target ``P``. The input bit
width ``N`` and its sign are read at run time from the layer's quantized input, so the layer needs
``input_quant=`` (whose output then gives ``N``, whatever the layer receives) or a preceding layer
with ``return_quant_tensor=True``. Layers: Linear, Conv1d/2d/3d
(grouped, depthwise), ConvTranspose1d/2d/3d (channels are always *output* channels), the
projections of QuantMultiheadAttention; post-scales per channel or per tensor (Brevitas's
spellings: the layer's ``weight_scaling_per_output_channel=False``, or a quantizer with
``scaling_per_output_type = ScalingPerOutputType.TENSOR``); the A2Q norm and bound stay per output
channel either way.

The quantizers compose Brevitas's weight-normalization quantizer
(``WeightNormPerChannelFloatDecoupled``: learned per-channel ``s`` and ``g`` in the log2 domain,
init ``s = max|w| / (2^(M-1) - 1)``, ``g = ||w||_1``) with this package's A2Q pre-scaling
(:mod:`brevitas_a2q.quant.pre_scaling`): exact bound, round-to-zero, post-rounding guard.

Rounding: Brevitas's round-to-zero by default. ``rounding = "budgeted"`` (per layer:
``weight_rounding="budgeted"``; or the ready-made :class:`A2QBudgetedWeightQuant`,
:class:`A2QPlusBudgetedWeightQuant`) rounds to nearest and then, per output channel, takes back
the cheapest rounded-up units until the exact integer budget holds
(:func:`brevitas_a2q.quant.pre_scaling.budgeted_take_back`): the integer vector closest to the scaled
weights under the budget, so channels whose every weight is below 1 no longer all round to zero.
"""

from __future__ import annotations

import inspect

from brevitas.core.bit_width import BitWidthStatefulConst
from brevitas.core.function_wrapper import RoundSte, RoundToZeroSte
from brevitas.core.function_wrapper.shape import StatsInputViewShapeImpl
from brevitas.core.scaling import SCALING_STATS_REDUCE_DIM
from brevitas.inject import ExtendedInjector, this, value
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.proxy.parameter_quant import DecoupledWeightQuantWithInputProxyFromInjector
from brevitas.quant.base import (
    PerChannelL1Norm,
    PerChannelPreNorm,
    WeightNormPerChannelFloatDecoupled,
)
from brevitas.quant_tensor import IntQuantTensor
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError, A2QInputNotQuantizedError, AccumulatorTargetTooSmallError
from brevitas_a2q.quant.bounds import check_bits
from brevitas_a2q.quant.channels import OutputChannelView, OutputChannelZeroCenter
from brevitas_a2q.quant.guard import AccumulatorGuardedIntQuant
from brevitas_a2q.quant.pre_scaling import AccumulatorAwarePreScaling, AccumulatorAwareZeroCenterPreScaling
from brevitas_a2q.quant.rounding import check_rounding

__all__ = [
    "A2QBudgetedWeightQuant",
    "A2QPlusBudgetedWeightQuant",
    "A2QPlusWeightQuant",
    "A2QWeightQuant",
    "A2QWeightQuantProxy",
    "is_a2q_proxy",
]

DEFAULT_ACCUMULATOR_BIT_WIDTH = 32
_ONE_BIT_WEIGHTS = ("; A2Q needs signed weights of weight_bit_width >= 2 (a narrow signed 1-bit "
                    "integer can only be 0; Brevitas's built-in A2Q gives NaN weights there)")


class A2QWeightQuantProxy(DecoupledWeightQuantWithInputProxyFromInjector):
    """Weight proxy that reads ``N`` and the input sign from the layer's quantized input, and says
    clearly what to do when there is none."""

    def __init__(self, quant_layer, quant_injector) -> None:
        _check_grouped_transposed(quant_layer, quant_injector)
        super().__init__(quant_layer, quant_injector)
        self._a2q_layer_type = type(quant_layer).__name__
        self._a2q_layer_name: str | None = None  # set by model-level helpers

    @property
    def accumulator_bit_width(self) -> int:
        """The layer's target ``P`` (``weight_accumulator_bit_width``)."""
        return self.tensor_quant.pre_scaling_impl.accumulator_bits

    @property
    def zero_centered(self) -> bool:
        """True for A2Q+."""
        return self.tensor_quant.pre_scaling_impl.zero_centered

    def forward(self, x, quant_input=None):
        if self.is_quant_enabled:
            self._check_quant_input(quant_input)
        try:
            return super().forward(x, quant_input)
        except AccumulatorTargetTooSmallError as err:
            raise AccumulatorTargetTooSmallError(
                f"{_describe(self)}: {err} {_target_fix(self, err.needed_bits)}",
                err.needed_bits) from err
        except ValueError as err:
            if isinstance(err, A2QInputError):
                raise
            raise A2QInputError(f"{_describe(self)}: {err}") from err

    def _check_quant_input(self, quant_input) -> None:
        """Where Brevitas asserts (no cached quantized input, or an input quantized otherwise
        than to integers), raise :class:`A2QInputNotQuantizedError`, also an ``AssertionError``,
        saying which layer and what to do."""
        if quant_input is None or isinstance(quant_input, Tensor):
            if self._cached_act is not None:
                return
            problem = "its input is not quantized"
        elif isinstance(quant_input, IntQuantTensor):
            return
        else:
            problem = (f"its input is a {type(quant_input).__name__}, not integer-quantized "
                       "(A2Q's bound needs integer inputs)")
        raise A2QInputNotQuantizedError(
            f"{_describe(self)} uses an accumulator-aware weight quantizer, which needs the "
            f"integer input bit width and sign, but {problem}. Give the layer "
            "input_quant=... (e.g. brevitas.quant.Int8ActPerTensorFloat) or make the layer "
            "before it return an integer quant tensor (return_quant_tensor=True).")


def _check_grouped_transposed(layer, injector) -> None:
    """A per-output-channel post-scale has no broadcastable shape on a grouped transposed conv
    weight ``(in, out/groups, k...)`` (Brevitas's built-in A2Q fails there with a shape error):
    say so, and what works, before Brevitas builds it."""
    groups = int(getattr(layer, "groups", 1))
    if not getattr(layer, "transposed", False) or groups == 1:
        return
    if getattr(injector, "scaling_per_output", None) != ScalingPerOutputType.TENSOR:
        raise A2QInputError(
            f"{type(layer).__name__} with groups={groups}: a per-output-channel weight scale "
            "cannot be laid out on a grouped transposed-convolution weight (in, out/groups, "
            "k...) (Brevitas's built-in A2Q fails here too). Use a per-tensor post-scale: "
            "weight_scaling_per_output_channel=False on the layer, or a quantizer with "
            "scaling_per_output_type = ScalingPerOutputType.TENSOR (the A2Q norm stays per "
            "output channel)")


def _describe(proxy: A2QWeightQuantProxy) -> str:
    """``layer 'features.3' (QuantConv2d, weight 32x16x3x3)``: the name a model-level helper
    recorded (:func:`brevitas_a2q.analysis.audit.iter_accumulating_layers`), else the one found
    in the model being run (:func:`_name_in_running_model`), else "a layer"."""
    shape = "x".join(str(d) for d in proxy.tracked_parameter_list[0].shape)
    name = proxy._a2q_layer_name or _name_in_running_model(proxy.tracked_module_list[0])
    where = f"layer {name!r} " if name else "a layer "
    return f"{where}({proxy._a2q_layer_type}, weight {shape})"


def _name_in_running_model(layer: nn.Module) -> str | None:
    """The layer's qualified name (``features.2``) in the outermost ``nn.Module`` whose method is
    on the call stack, or None (the layer called on its own). Only for error messages: PyTorch
    modules do not know their own names."""
    name = None
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and owner is not layer:
                found = next((n for n, m in owner.named_modules() if m is layer and n), None)
                name = found or name
            frame = frame.f_back
    finally:
        del frame
    return name


def _target_fix(proxy: A2QWeightQuantProxy, bits: int) -> str:
    """How to give a layer the target ``P = bits``, in Python and on ``a2q train``'s command
    line (``--acc-bits`` for every layer, ``--layer-acc-bits NAME=P`` for one)."""
    name = proxy._a2q_layer_name or _name_in_running_model(proxy.tracked_module_list[0])
    return (f"Fix: a target P >= {bits} (Python: weight_accumulator_bit_width={bits}; "
            f"a2q train: --acc-bits {bits} or --layer-acc-bits {name or 'NAME'}={bits}), or "
            "narrower inputs.")


def is_a2q_proxy(proxy) -> bool:
    """True if ``proxy`` (a layer's ``weight_quant``) is one of this package's quantizers."""
    return isinstance(proxy, A2QWeightQuantProxy)


class A2QPerChannelPreNorm(PerChannelPreNorm):
    """Wires :class:`AccumulatorAwarePreScaling` into the weight-norm quantizer, over *output*
    channels (:class:`~brevitas_a2q.quant.pre_scaling.OutputChannelView`), whatever the post-scale
    granularity."""

    pre_scaling_impl = AccumulatorAwarePreScaling
    scaling_stats_input_view_shape_impl = (this << 1).output_channel_view_impl
    accumulator_bit_width_impl = (this << 1).accumulator_bit_width_impl
    restrict_pre_scaling_impl = (this << 1).restrict_pre_scaling_impl


class A2QPlusPerChannelPreNorm(A2QPerChannelPreNorm):
    """A2Q+: zero-centring ``v - mean(v)`` per output channel, wired (as in Brevitas's own A2Q+)
    inside the per-channel pre-norm, so it stays per channel when the post-scale is per tensor."""

    pre_scaling_impl = AccumulatorAwareZeroCenterPreScaling
    pre_zero_point_impl = OutputChannelZeroCenter
    pre_zero_point_shape = this.pre_scaling_shape
    pre_zero_point_stats_input_view_shape_impl = this.scaling_stats_input_view_shape_impl
    stats_reduce_dim = SCALING_STATS_REDUCE_DIM


def _layer(module):
    return module[0] if isinstance(module, tuple) else module


class A2QWeightQuant(WeightNormPerChannelFloatDecoupled):
    """A2Q weight quantizer (Colbert, Pappalardo, Petri-Koenig, ICCV 2023, arXiv:2308.13504).

    Per output channel ``q = clip(round_to_zero(min(g / s, T) * v / ||v||_1))`` with
    ``T = (2^(P-1) - 1) * 2^(1_s - N)``, so ``q . x`` never overflows a ``P``-bit signed accumulator
    for any ``N``-bit input ``x``. Defaults: ``M = 8`` (``weight_bit_width``), ``P = 32``
    (``weight_accumulator_bit_width``), ``rounding = "zero"`` (``weight_rounding``; "budgeted":
    round to nearest within the exact budget, see :mod:`brevitas_a2q.quant.quantizers`).
    """

    bit_width = 8
    accumulator_bit_width = DEFAULT_ACCUMULATOR_BIT_WIDTH
    proxy_class = A2QWeightQuantProxy
    tensor_quant = AccumulatorGuardedIntQuant
    per_channel_pre_norm = A2QPerChannelPreNorm
    normalize_stats_impl = PerChannelL1Norm.normalize_stats_impl  # ||v||_1, as derived in the paper
    rounding = "zero"  # "budgeted": round to nearest, then take back units to fit the budget

    @value
    def float_to_int_impl(rounding):
        """Round-to-zero (never increases a magnitude), or round-to-nearest for budgeted
        rounding, whose budget is enforced by the tensor quantizer."""
        return RoundToZeroSte if check_rounding(rounding) == "zero" else RoundSte

    @value
    def accumulator_bit_width_impl(accumulator_bit_width, bit_width):
        check_bits("weight_bit_width", bit_width, high=32, why=_ONE_BIT_WEIGHTS)
        return BitWidthStatefulConst(check_bits("weight_accumulator_bit_width",
                                                accumulator_bit_width))

    # Brevitas's weight-norm quantizer reads the post-scale granularity from
    # scaling_per_output_type only, while the scale's shape follows scaling_per_output, which
    # honours the layer's weight_scaling_per_output_channel=False: read both from the latter.
    @value
    def scaling_stats_input_view_shape_impl(scaling_per_output):
        """Post-scale statistics over the tensor or over output channels."""
        if scaling_per_output == ScalingPerOutputType.TENSOR:
            return StatsInputViewShapeImpl.OVER_TENSOR
        return StatsInputViewShapeImpl.OVER_OUTPUT_CHANNELS

    @value
    def stats_reduce_dim(scaling_per_output):
        """Reduce the post-scale statistics over the whole tensor, or per output channel."""
        return None if scaling_per_output == ScalingPerOutputType.TENSOR \
            else SCALING_STATS_REDUCE_DIM

    @value
    def pre_scaling_impl():
        return this.per_channel_pre_norm.pre_scaling_impl

    @value
    def output_channel_view_impl(module):
        """Output channels of the layer's weight; transposed convs have them on dim 1."""
        layer = _layer(module)
        return OutputChannelView(int(getattr(layer, "groups", 1)),
                                 bool(getattr(layer, "transposed", False)))


class _ZeroCentered(ExtendedInjector):
    """A2Q+ zero-centring: ``v - mean(v)`` per output channel, before rounding, computed inside
    the per-channel pre-norm (:class:`A2QPlusPerChannelPreNorm`)."""

    per_channel_pre_norm = A2QPlusPerChannelPreNorm

    @value
    def pre_zero_point_impl():
        return this.per_channel_pre_norm.pre_zero_point_impl


class A2QPlusWeightQuant(_ZeroCentered, A2QWeightQuant):
    """A2Q+ weight quantizer (Colbert et al., ICML 2024, arXiv:2401.10432).

    Zero-centred channels with the bound ``T = (2^P - 2) / (2^N - 1)``, whatever the input sign.
    """


class A2QBudgetedWeightQuant(A2QWeightQuant):
    """A2Q with budgeted rounding: per output channel the integer vector closest (L2) to the
    scaled weights ``y = min(g / s, T) * v / ||v||_1`` with ``||q||_1 <= T``: round to nearest,
    then take back the rounded-up units of smallest ``|y| - |q|`` (the cheapest) until it fits."""

    rounding = "budgeted"


class A2QPlusBudgetedWeightQuant(A2QPlusWeightQuant):
    """A2Q+ with budgeted rounding: each sign's sum ``sum q+``, ``sum |q-|`` within ``T / 2``
    (what the exact guard checks; sufficient for signed and unsigned ``N``-bit inputs when the
    integers are only nearly zero-centred), closest to the zero-centred scaled weights under it."""

    rounding = "budgeted"


# registers our proxy's export handlers with Brevitas's export managers
import brevitas_a2q.export.handlers  # noqa: E402, F401
