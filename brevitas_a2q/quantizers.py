"""A2Q and A2Q+ weight quantizers: Brevitas injectors for ``weight_quant=``.

Usage, as with any Brevitas weight quantizer::

    QuantConv2d(16, 32, 3, input_quant=Int8ActPerTensorFloat,
                weight_quant=A2QPlusWeightQuant, weight_bit_width=4,
                weight_accumulator_bit_width=12)

``weight_bit_width`` is ``M`` and ``weight_accumulator_bit_width`` the target ``P``. The input bit
width ``N`` and its sign are read at run time from the layer's quantized input, so the layer needs
``input_quant=`` or a preceding layer with ``return_quant_tensor=True``.

The quantizers compose Brevitas's weight-normalization quantizer
(``WeightNormPerChannelFloatDecoupled``: learned per-channel ``s`` and ``g`` in the log2 domain,
init ``s = max|w| / (2^(M-1) - 1)``, ``g = ||w||_1``) with this package's A2Q pre-scaling
(:mod:`brevitas_a2q.pre_scaling`): exact bound, round-to-zero, post-rounding guard.
"""

from __future__ import annotations

from brevitas.core.bit_width import BitWidthStatefulConst
from brevitas.core.function_wrapper import RoundToZeroSte
from brevitas.core.zero_point import PreZeroCenterZeroPoint
from brevitas.inject import ExtendedInjector, this, value
from brevitas.proxy.parameter_quant import DecoupledWeightQuantWithInputProxyFromInjector
from brevitas.quant.base import (
    PerChannelL1Norm,
    PerChannelPreNorm,
    WeightNormPerChannelFloatDecoupled,
)
from brevitas.quant_tensor import IntQuantTensor

from brevitas_a2q.bounds import check_bits
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.pre_scaling import AccumulatorAwarePreScaling, AccumulatorGuardedIntQuant

__all__ = ["A2QPlusWeightQuant", "A2QWeightQuant", "A2QWeightQuantProxy", "is_a2q_proxy"]

DEFAULT_ACCUMULATOR_BIT_WIDTH = 32


class A2QWeightQuantProxy(DecoupledWeightQuantWithInputProxyFromInjector):
    """Weight proxy that reads ``N`` and the input sign from the layer's quantized input, and says
    clearly what to do when there is none."""

    def __init__(self, quant_layer, quant_injector) -> None:
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
        layer = _describe(self)
        if self.is_quant_enabled and not isinstance(quant_input, IntQuantTensor) \
                and self._cached_act is None:
            raise A2QInputError(
                f"{layer} uses an accumulator-aware weight quantizer, which needs the integer input "
                "bit width and sign, but its input is not quantized. Give the layer "
                "input_quant=... (e.g. brevitas.quant.Int8ActPerTensorFloat) or make the layer "
                "before it return a quant tensor (return_quant_tensor=True).")
        try:
            return super().forward(x, quant_input)
        except ValueError as err:
            if isinstance(err, A2QInputError):
                raise
            raise A2QInputError(f"{layer}: {err}") from err


def _describe(proxy: A2QWeightQuantProxy) -> str:
    """``layer 'features.3' (QuantConv2d, weight 32x16x3x3)``, the name when a model-level helper
    has recorded it (see :func:`brevitas_a2q.training.name_a2q_layers`)."""
    shape = "x".join(str(d) for d in proxy.tracked_parameter_list[0].shape)
    where = f"layer {proxy._a2q_layer_name!r} " if proxy._a2q_layer_name else "a layer "
    return f"{where}({proxy._a2q_layer_type}, weight {shape})"


def is_a2q_proxy(proxy) -> bool:
    """True if ``proxy`` (a layer's ``weight_quant``) is one of this package's quantizers."""
    return isinstance(proxy, A2QWeightQuantProxy)


class A2QPerChannelPreNorm(PerChannelPreNorm):
    """Wires :class:`AccumulatorAwarePreScaling` into the weight-norm quantizer."""

    pre_scaling_impl = AccumulatorAwarePreScaling
    accumulator_bit_width_impl = (this << 1).accumulator_bit_width_impl
    restrict_pre_scaling_impl = (this << 1).restrict_pre_scaling_impl
    pre_zero_point_impl = (this << 1).pre_zero_point_impl


class A2QWeightQuant(WeightNormPerChannelFloatDecoupled):
    """A2Q weight quantizer (Colbert, Pappalardo, Petri-Koenig, ICCV 2023, arXiv:2308.13504).

    Per output channel ``q = clip(round_to_zero(min(g / s, T) * v / ||v||_1))`` with
    ``T = (2^(P-1) - 1) * 2^(1_s - N)``, so ``q . x`` never overflows a ``P``-bit signed accumulator
    for any ``N``-bit input ``x``. Defaults: ``M = 8`` (``weight_bit_width``), ``P = 32``
    (``weight_accumulator_bit_width``).
    """

    bit_width = 8
    accumulator_bit_width = DEFAULT_ACCUMULATOR_BIT_WIDTH
    proxy_class = A2QWeightQuantProxy
    tensor_quant = AccumulatorGuardedIntQuant
    per_channel_pre_norm = A2QPerChannelPreNorm
    normalize_stats_impl = PerChannelL1Norm.normalize_stats_impl  # ||v||_1, as derived in the paper
    float_to_int_impl = RoundToZeroSte  # rounding towards zero never increases a magnitude

    @value
    def accumulator_bit_width_impl(accumulator_bit_width, bit_width):
        check_bits("weight_bit_width", bit_width, high=32)
        return BitWidthStatefulConst(check_bits("weight_accumulator_bit_width",
                                                accumulator_bit_width))

    @value
    def pre_scaling_impl():
        return this.per_channel_pre_norm.pre_scaling_impl


class _ZeroCentered(ExtendedInjector):
    """A2Q+ zero-centring: ``v - mean(v)`` per output channel, before rounding (Brevitas's
    ``PreZeroCenterZeroPoint``, wired as in Brevitas's own A2Q+)."""

    pre_zero_point_impl = PreZeroCenterZeroPoint
    pre_zero_point_shape = this.pre_scaling_shape
    pre_zero_point_stats_input_view_shape_impl = this.scaling_stats_input_view_shape_impl


class A2QPlusWeightQuant(_ZeroCentered, A2QWeightQuant):
    """A2Q+ weight quantizer (Colbert et al., ICML 2024, arXiv:2401.10432).

    Zero-centred channels with the bound ``T = (2^P - 2) / (2^N - 1)``, whatever the input sign.
    """
