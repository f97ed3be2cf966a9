"""The math of A2Q and A2Q+ as small ``torch.nn.Module`` s plugged into Brevitas's decoupled
(weight-normalization) integer quantizer.

Brevitas's ``DecoupledRescalingIntQuantWithInput`` computes integer weights as
``q = clip(round_to_zero(w / pre_scale + pre_zero_point))``. A2Q (Colbert et al., ICCV 2023, Sec. 4)
parametrizes each output channel as ``w = g * v / ||v||_1`` and picks
``pre_scale = ||v||_1 / min(g / s, T)``, so that ``||q||_1 <= min(g / s, T)`` with ``T`` the L1 bound
of :func:`brevitas_a2q.bounds.l1_norm_bound`; A2Q+ (Colbert et al., ICML 2024, Sec. 3) first
zero-centres each channel of ``v``, which doubles the bound.

What differs from Brevitas's built-in pre-scaling:

* ``T`` is computed exactly (integers and fractions) and rounded *down* to the float dtype of the
  weights. Brevitas computes it in float32, which rounds ``2^(P-1) - 1`` up from ``P = 26``
  (``2^(P-1)`` is admitted: off by one) and rounds the A2Q+ quotient to nearest.
* :class:`AccumulatorGuardedIntQuant` checks every channel's integer weights in exact integer
  arithmetic after rounding. Float error in ``||v||_1`` and in the division can leave ``sum |q|`` a
  hair above ``T`` when ``T`` is large; the guard shrinks such a channel's pre-scale until it fits.
  It changes nothing where the float computation already holds (always, in practice, for P <= 24).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from brevitas.core.quant.int import DecoupledRescalingIntQuantWithInput
from brevitas.core.scaling.pre_scaling import ParameterPreScalingWeightNorm
from brevitas.core.zero_point import PreZeroCenterZeroPoint
from torch import Tensor, nn

from brevitas_a2q.bounds import l1_norm_bound, min_accumulator_bits

__all__ = [
    "AccumulatorAwarePreScaling",
    "AccumulatorGuardedIntQuant",
    "L1NormBound",
]

# A channel the guard finds over its bound has its pre-scale multiplied by
# (found / allowed) * (1 + _GUARD_MARGIN), at most _GUARD_STEPS times.
_GUARD_MARGIN = 2.0**-20
_GUARD_STEPS = 64


def _round_down(value: Fraction, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is <= ``value`` (exact comparison with a Fraction)."""
    x = torch.tensor(float(value), dtype=dtype)
    while Fraction(x.item()) > value:
        x = torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype))
    return x.item()


class L1NormBound(nn.Module):
    """Per-channel L1 bound ``T`` of a ``P``-bit accumulator (A2Q Eq. 15, A2Q+ Eq. 18)."""

    def __init__(self, zero_centered: bool) -> None:
        super().__init__()
        self.zero_centered = zero_centered

    def exact(self, acc_bits: int, input_bit_width: int, input_is_signed: bool) -> Fraction:
        """``T`` as an exact fraction; raises if it admits no non-zero integer weight."""
        bound = l1_norm_bound(acc_bits, input_bit_width, input_is_signed, self.zero_centered)
        if bound < 1:
            needed = min_accumulator_bits(1, input_bit_width, input_is_signed, self.zero_centered)
            sign = "signed" if input_is_signed else "unsigned"
            raise ValueError(
                f"weight_accumulator_bit_width={acc_bits} is too small for {input_bit_width}-bit "
                f"{sign} inputs: the L1 bound is {float(bound):.3g} < 1, so every weight would "
                f"round to zero. Use weight_accumulator_bit_width >= {needed} or narrower inputs.")
        return bound

    def forward(self, acc_bits: int, input_bit_width: int, input_is_signed: bool,
                dtype: torch.dtype) -> float:
        """``T`` rounded down to ``dtype``, for the clamp ``min(g / s, T)``."""
        return _round_down(self.exact(acc_bits, input_bit_width, input_is_signed), dtype)

    def effective_l1_norms(self, int_weights: Tensor) -> Tensor:
        """Per output channel (rows), the L1 norm the bound applies to, exactly, in float64.

        A2Q: ``||q||_1``. A2Q+: ``2 * max(sum q+, sum |q-|)``, the worst case of a rounded, only
        nearly zero-centred channel (see :func:`brevitas_a2q.bounds.zero_centered_l1_norm`).
        Integers below 2^53 are exact in float64.
        """
        q = int_weights.detach().reshape(int_weights.shape[0], -1).to(torch.float64)
        if self.zero_centered:
            return 2 * torch.maximum(q.clamp(min=0).sum(1), (-q).clamp(min=0).sum(1))
        return q.abs().sum(1)

    def channels_within(self, int_weights: Tensor, acc_bits: int, input_bit_width: int,
                        input_is_signed: bool) -> Tensor:
        """Per output channel, whether ``effective_l1_norms <= T``, decided exactly."""
        bound = self.exact(acc_bits, input_bit_width, input_is_signed)
        norms = self.effective_l1_norms(int_weights)
        return norms * bound.denominator <= float(bound.numerator)

    def extra_repr(self) -> str:
        return f"zero_centered={self.zero_centered}"


class AccumulatorAwarePreScaling(ParameterPreScalingWeightNorm):
    """Pre-clipping scale ``||v||_1 / min(g / s, T)`` of A2Q (and of A2Q+ with ``pre_zero_point_impl``).

    Reuses Brevitas's weight-norm parameter ``g`` (``self.value``, log2 domain, initialized to
    ``||w||_1``) and Brevitas's state-dict keys, so checkpoints of Brevitas's built-in A2Q load here.
    ``accumulator_bit_width`` is Brevitas's ``BitWidthStatefulConst``: the target ``P`` lives in the
    checkpoint and can be changed on a trained model
    (:func:`brevitas_a2q.training.set_accumulator_bit_width`).
    """

    def __init__(
        self,
        scaling_impl: nn.Module,
        normalize_stats_impl: nn.Module,
        accumulator_bit_width_impl: nn.Module,
        scaling_stats_input_view_shape_impl: nn.Module,
        tracked_parameter_list: list[nn.Parameter],
        pre_scaling_shape: tuple[int, ...] | None = None,
        restrict_pre_scaling_impl: nn.Module | None = None,
        pre_scaling_min_val: float | None = None,
        pre_zero_point_impl: nn.Module | None = None,
    ) -> None:
        super().__init__(
            scaling_impl,
            normalize_stats_impl,
            scaling_stats_input_view_shape_impl,
            tracked_parameter_list,
            pre_scaling_shape,
            restrict_pre_scaling_impl,
            pre_scaling_min_val,
        )
        zero_centered = isinstance(pre_zero_point_impl, PreZeroCenterZeroPoint)
        self.pre_zero_point = pre_zero_point_impl if zero_centered else None
        self.accumulator_bit_width = accumulator_bit_width_impl
        self.bound = L1NormBound(zero_centered)
        self.last_input: tuple[int, bool] | None = None  # (N, signed) of the latest forward

    @property
    def zero_centered(self) -> bool:
        return self.bound.zero_centered

    @property
    def accumulator_bits(self) -> int:
        """The target ``P`` as an int."""
        return int(self.accumulator_bit_width().item())

    def norm_bound(self, weights: Tensor, input_bit_width: int, input_is_signed: bool) -> Tensor:
        """``min(g / s, T)`` per channel: the largest ``||q||_1`` the layer may take."""
        weights = self.stats_input_view_shape_impl(weights)
        s = self.scaling_impl(weights)
        g = self.restrict_clamp_scaling(self.value)
        limit = self.bound(self.accumulator_bits, input_bit_width, input_is_signed, weights.dtype)
        return torch.clamp_max(g / s, limit)

    def forward(self, weights: Tensor, input_bit_width: Tensor, input_is_signed: bool) -> Tensor:
        bits = _whole_bits(input_bit_width)
        self.last_input = (bits, bool(input_is_signed))  # read by the A2Q penalty
        if self.pre_zero_point is not None:
            # A2Q+ normalizes the zero-centred weights v - mean(v)
            weights = weights + self.pre_zero_point.get_zero_center(weights)
        d_w = self.stats(self.stats_input_view_shape_impl(weights))
        # an all-zero (A2Q+: constant) channel has ||v||_1 = 0: normalize it by 1, not 0, so its
        # integers stay 0 and its gradients finite (Brevitas's built-in A2Q gives NaN here)
        d_w = torch.where(d_w > 0, d_w, torch.ones_like(d_w))
        value = d_w / self.norm_bound(weights, bits, input_is_signed)
        return self.restrict_clamp_scaling.clamp_ste(value)


def _whole_bits(input_bit_width: Tensor | int | float) -> int:
    bits = float(input_bit_width)
    if bits != int(bits) or bits < 1:
        raise ValueError(f"A2Q needs a whole, positive input bit width; the layer's input has "
                         f"bit_width={bits}")
    return int(bits)


class AccumulatorGuardedIntQuant(DecoupledRescalingIntQuantWithInput):
    """Brevitas's decoupled integer quantizer with input, plus an exact post-rounding check.

    After the usual ``pre_scale`` is computed, the integer weights are formed without gradient and
    every channel is checked with :meth:`L1NormBound.channels_within`. Channels over the bound (float
    rounding only) get a larger pre-scale; the output is then computed exactly as Brevitas does.
    """

    def forward(self, x: Tensor, input_bit_width: Tensor, input_is_signed: bool):
        bit_width = self.msb_clamp_bit_width_impl()
        int_threshold = self.int_scaling_impl(bit_width)
        pre_scale = self.pre_scaling_impl(x, input_bit_width, input_is_signed) / int_threshold
        pre_scale = self._guard(x, pre_scale, bit_width, _whole_bits(input_bit_width),
                                input_is_signed)
        pre_zero_point = self.pre_zero_point_impl(x, pre_scale, bit_width)
        scale = self.scaling_impl(x, int_threshold)
        zero_point = self.zero_point_impl(x, scale, bit_width)
        y = self.decoupled_int_quant(pre_scale, pre_zero_point, scale, zero_point, bit_width, x)
        return y, scale, zero_point, bit_width, pre_scale, pre_zero_point

    def _guard(self, x: Tensor, pre_scale: Tensor, bit_width: Tensor, input_bits: int,
               input_is_signed: bool) -> Tensor:
        bound = self.pre_scaling_impl.bound
        acc_bits = self.pre_scaling_impl.accumulator_bits
        factor = torch.ones_like(pre_scale)
        with torch.no_grad():
            for _ in range(_GUARD_STEPS):
                scaled = pre_scale * factor
                pre_zero_point = self.pre_zero_point_impl(x, scaled, bit_width)
                q = self.decoupled_int_quant.to_int(scaled, pre_zero_point, bit_width, x)
                if not bool(torch.isfinite(q).all()):
                    raise ValueError("its quantized weights are not finite (NaN or inf in the "
                                     "weights or learned scales: training diverged?)")
                ok = bound.channels_within(q, acc_bits, input_bits, input_is_signed)
                if bool(ok.all()):
                    break
                # float rounding only: shrink the failing channels by what they are over, plus a margin
                allowed = bound.exact(acc_bits, input_bits, input_is_signed)
                over = bound.effective_l1_norms(q) / float(allowed)
                ratio = torch.where(ok, 1.0, over.clamp(min=1.0) * (1 + _GUARD_MARGIN))
                factor = factor * ratio.to(factor.dtype).reshape(factor.shape)
            else:
                raise RuntimeError("the A2Q guard did not converge; please report the weights")
        return pre_scale * factor
