"""The math of A2Q and A2Q+ as small ``torch.nn.Module`` s plugged into Brevitas's decoupled
(weight-normalization) integer quantizer.

Brevitas's ``DecoupledRescalingIntQuantWithInput`` computes integer weights as
``q = clip(round_to_zero(w / pre_scale + pre_zero_point))``. A2Q (Colbert et al., ICCV 2023, Sec. 4)
parametrizes each output channel as ``w = g * v / ||v||_1`` and picks
``pre_scale = ||v||_1 / min(g / s, T)``, so that ``||q||_1 <= min(g / s, T)`` with ``T`` the L1 bound
of :func:`brevitas_a2q.quant.bounds.l1_norm_bound`; A2Q+ (Colbert et al., ICML 2024, Sec. 3) first
zero-centres each channel of ``v``, which doubles the bound.

What differs from Brevitas's built-in pre-scaling (of which ours are subclasses:
:class:`AccumulatorAwarePreScaling` *is* a Brevitas ``AccumulatorAwareParameterPreScaling`` and
:class:`AccumulatorAwareZeroCenterPreScaling` a ``AccumulatorAwareZeroCenterParameterPreScaling``,
so code that looks for those finds ours):

* ``T`` is computed exactly (integers and fractions) and rounded *down* to the float dtype of the
  weights. Brevitas computes it in float32, which rounds ``2^(P-1) - 1`` up from ``P = 26``
  (``2^(P-1)`` is admitted: off by one) and rounds the A2Q+ quotient to nearest.
* Channels are *output* channels for every layer (:class:`OutputChannelView`): rows of the weight
  for Linear/Conv, ``(in/groups, k...)`` slices of ``(in, out/groups, k...)`` for transposed
  convolutions, grouped ones included.
* :class:`AccumulatorGuardedIntQuant` checks every channel's integer weights in exact integer
  arithmetic after rounding. Float error in ``||v||_1`` and in the division can leave ``sum |q|`` a
  hair above ``T`` when ``T`` is large; the guard shrinks such a channel's pre-scale until it fits.
  It changes nothing where the float computation already holds (always, in practice, for P <= 24).
* Optional *budgeted rounding* (``rounding="budgeted"``, :func:`budgeted_take_back`): round to
  nearest, then per output channel take back the cheapest round-up units until the exact integer
  budget holds. The default stays Brevitas's round-to-zero.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from brevitas.core.scaling.pre_scaling import (
    AccumulatorAwareParameterPreScaling,
    AccumulatorAwareZeroCenterParameterPreScaling,
    ParameterPreScalingWeightNorm,
)
from brevitas.core.zero_point import PreZeroCenterZeroPoint
from torch import Tensor, nn

from brevitas_a2q.errors import AccumulatorTargetTooSmallError
from brevitas_a2q.quant.bounds import l1_norm_bound, min_accumulator_bits
from brevitas_a2q.quant.channels import OutputChannelView


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
        self._cache: dict[tuple, object] = {}

    def exact(self, acc_bits: int, input_bit_width: int, input_is_signed: bool) -> Fraction:
        """``T`` as an exact fraction; raises if it admits no non-zero integer weight."""
        key = ("exact", acc_bits, input_bit_width, bool(input_is_signed))
        if key not in self._cache:
            self._cache[key] = self._exact(acc_bits, input_bit_width, input_is_signed)
        return self._cache[key]

    def _exact(self, acc_bits: int, input_bit_width: int, input_is_signed: bool) -> Fraction:
        bound = l1_norm_bound(acc_bits, input_bit_width, input_is_signed, self.zero_centered)
        if bound < 1:
            needed = min_accumulator_bits(1, input_bit_width, input_is_signed, self.zero_centered)
            sign = "signed" if input_is_signed else "unsigned"
            raise AccumulatorTargetTooSmallError(
                f"weight_accumulator_bit_width={acc_bits} is too small for {input_bit_width}-bit "
                f"{sign} inputs: the L1 bound is {float(bound):.3g} < 1, so every weight would "
                "round to zero.", needed)
        return bound

    def forward(self, acc_bits: int, input_bit_width: int, input_is_signed: bool,
                dtype: torch.dtype) -> float:
        """``T`` rounded down to ``dtype``, for the clamp ``min(g / s, T)``."""
        key = ("float", acc_bits, input_bit_width, bool(input_is_signed), dtype)
        if key not in self._cache:
            self._cache[key] = _round_down(self.exact(acc_bits, input_bit_width, input_is_signed),
                                           dtype)
        return self._cache[key]

    def floor(self, acc_bits: int, input_bit_width: int, input_is_signed: bool) -> int:
        """``floor(T)``: an integer norm ``n`` satisfies ``n <= T`` iff ``n <= floor(T)``."""
        bound = self.exact(acc_bits, input_bit_width, input_is_signed)
        return bound.numerator // bound.denominator

    def effective_l1_norms(self, int_weights: Tensor,
                           view: OutputChannelView | None = None) -> Tensor:
        """Per output channel, the L1 norm the bound applies to, exactly, as int64.

        A2Q: ``||q||_1``. A2Q+: ``2 * max(sum q+, sum |q-|) = ||q||_1 + |sum q|``, the worst case
        of a rounded, only nearly zero-centred channel (see
        :func:`brevitas_a2q.quant.bounds.zero_centered_l1_norm`). ``view`` maps the weight to output
        channels (default: rows are dim 0).
        """
        view = view or OutputChannelView()
        q = int_weights.detach().to(torch.int64)
        norms = _int_sum(view, q.abs())
        if self.zero_centered:
            return norms + _int_sum(view, q).abs()
        return norms

    def fits(self, int_weights: Tensor, acc_bits: int, input_bit_width: int,
             input_is_signed: bool, view: OutputChannelView | None = None) -> Tensor:
        """Per output channel, whether the effective L1 norm is ``<= T``, decided exactly in
        int64 (:meth:`effective_l1_norms`); raises for non-finite weights."""
        q = int_weights.detach()
        if q.is_floating_point() and not bool(torch.isfinite(q).all()):
            raise ValueError("its quantized weights are not finite (NaN or inf in the "
                             "weights or learned scales: training diverged?)")
        limit = self.floor(acc_bits, input_bit_width, input_is_signed)
        return self.effective_l1_norms(q, view) <= limit

    def all_fit(self, int_weights: Tensor, acc_bits: int, input_bit_width: int,
                input_is_signed: bool, view: OutputChannelView | None = None) -> bool:
        """True if every output channel provably fits; False means "not proven" (then ask
        :meth:`fits` per channel). One reduction pass (two for A2Q+), one host synchronization.

        The per-channel sums are taken in the weights' own float dtype, on their device. That is
        exact for integers while ``||q||_1 < 1/eps`` (``2^23`` in float32): every partial sum is
        the sum of a subset of the same integers, at most ``||q||_1`` in magnitude, hence a
        representable integer, so no addition rounds; ``||q||_1 + |sum q| < 2^24`` is exact
        too, and so is the comparison with ``min(floor(T), 2^24)``. NaN or inf fail the test.
        """
        view = view or OutputChannelView()
        q = int_weights.detach()
        if not q.is_floating_point():
            return bool(self.fits(q, acc_bits, input_bit_width, input_is_signed, view).all())
        exact_below = 1.0 / torch.finfo(q.dtype).eps
        limit = float(min(self.floor(acc_bits, input_bit_width, input_is_signed),
                          2 * exact_below))
        l1 = view.l1_norms(q)
        eff = l1 + view.sums(q).abs() if self.zero_centered else l1
        return bool(((l1 < exact_below) & (eff <= limit)).all())

    def channels_within(self, int_weights: Tensor, acc_bits: int, input_bit_width: int,
                        input_is_signed: bool, view: OutputChannelView | None = None) -> Tensor:
        """Per output channel, whether ``effective_l1_norms <= T``, decided in int64."""
        limit = self.floor(acc_bits, input_bit_width, input_is_signed)
        return self.effective_l1_norms(int_weights, view) <= limit

    def extra_repr(self) -> str:
        return f"zero_centered={self.zero_centered}"


def _int_sum(view: OutputChannelView, q: Tensor) -> Tensor:
    """Exact per-output-channel sum of an int64 tensor."""
    if not view.transposed:
        return q.reshape(q.shape[0], -1).sum(1)
    return view._grouped(q).sum(dim=(1, 3)).reshape(-1)


class AccumulatorAwarePreScaling(AccumulatorAwareParameterPreScaling):
    """Pre-clipping scale ``||v||_1 / min(g / s, T)`` of A2Q (A2Q Eq. 15 bound ``T``).

    A Brevitas ``AccumulatorAwareParameterPreScaling`` (same parameter ``g`` in ``self.value``,
    log2 domain, initialized to ``||w||_1``; same state-dict keys, so checkpoints of Brevitas's
    built-in A2Q load here; ``calc_max_l1_norm`` gives the exact ``T``). ``accumulator_bit_width``
    is Brevitas's ``BitWidthStatefulConst``: the target ``P`` lives in the checkpoint and can be
    changed on a trained model (:func:`brevitas_a2q.train.set_accumulator_bit_width`).
    ``scaling_stats_input_view_shape_impl`` is an :class:`OutputChannelView`.
    """

    zero_centering = False

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
    ) -> None:
        # Brevitas's A2Q/A2Q+ constructors differ in signature: initialize their common base
        ParameterPreScalingWeightNorm.__init__(
            self, scaling_impl, normalize_stats_impl, scaling_stats_input_view_shape_impl,
            tracked_parameter_list, pre_scaling_shape, restrict_pre_scaling_impl,
            pre_scaling_min_val)
        self.accumulator_bit_width = accumulator_bit_width_impl
        self.bound = L1NormBound(self.zero_centering)
        self.last_input: tuple[int, bool] | None = None  # (N, signed) of the latest forward
        self.last_accumulator_bits: int | None = None  # P of the latest forward

    @property
    def zero_centered(self) -> bool:
        return self.bound.zero_centered

    @property
    def accumulator_bits(self) -> int:
        """The target ``P`` as an int."""
        return int(self.accumulator_bit_width().item())

    @property
    def output_channel_view(self) -> OutputChannelView:
        return self.stats_input_view_shape_impl

    def calc_max_l1_norm(self, input_bit_width: Tensor, input_is_signed: bool) -> Tensor:
        """``T`` (exact, rounded down to float32), as Brevitas's method of the same name."""
        t = self.bound(self.accumulator_bits, _whole_bits(input_bit_width), input_is_signed,
                       torch.float32)
        return torch.tensor(t, device=self.value.device)

    def zero_center(self, weights: Tensor) -> Tensor:
        """``v`` itself for A2Q (``v - mean(v)`` per channel for A2Q+)."""
        return weights

    def norm_bound(self, weights: Tensor, input_bit_width: int, input_is_signed: bool,
                   acc_bits: int | None = None, rows: Tensor | None = None) -> Tensor:
        """``min(g / s, T)`` per channel: the largest ``||q||_1`` the layer may take."""
        rows = self.stats_input_view_shape_impl(weights) if rows is None else rows
        s = self.scaling_impl(rows)
        g = self.restrict_clamp_scaling(self.value)
        acc_bits = self.accumulator_bits if acc_bits is None else acc_bits
        limit = self.bound(acc_bits, input_bit_width, input_is_signed, rows.dtype)
        return torch.clamp_max(g / s, limit)

    def forward(self, weights: Tensor, input_bit_width: Tensor, input_is_signed: bool) -> Tensor:
        bits = _whole_bits(input_bit_width)
        acc_bits = self.accumulator_bits
        # read by the guard and by the A2Q penalty
        self.last_input, self.last_accumulator_bits = (bits, bool(input_is_signed)), acc_bits
        weights = self.zero_center(weights)
        rows = self.stats_input_view_shape_impl(weights)
        d_w = self.stats(rows)
        # an all-zero (A2Q+: constant) channel has ||v||_1 = 0: normalize it by 1, not 0, so its
        # integers stay 0 and its gradients finite (Brevitas's built-in A2Q gives NaN here)
        d_w = torch.where(d_w > 0, d_w, torch.ones_like(d_w))
        value = d_w / self.norm_bound(weights, bits, input_is_signed, acc_bits, rows)
        value = self.restrict_clamp_scaling.clamp_ste(value)
        view = self.stats_input_view_shape_impl
        if isinstance(view, OutputChannelView) and view.transposed and view.groups > 1:
            value = view.expand(value, weights)
        return value


class AccumulatorAwareZeroCenterPreScaling(AccumulatorAwarePreScaling,
                                           AccumulatorAwareZeroCenterParameterPreScaling):
    """A2Q+ pre-clipping scale: :class:`AccumulatorAwarePreScaling` over the zero-centred
    ``v - mean(v)`` (``pre_zero_point_impl``, an :class:`OutputChannelZeroCenter`) with the A2Q+
    bound ``T = (2^P - 2) / (2^N - 1)`` (A2Q+ Eq. 18). A Brevitas
    ``AccumulatorAwareZeroCenterParameterPreScaling``."""

    zero_centering = True

    def __init__(
        self,
        scaling_impl: nn.Module,
        pre_zero_point_impl: nn.Module,
        normalize_stats_impl: nn.Module,
        accumulator_bit_width_impl: nn.Module,
        scaling_stats_input_view_shape_impl: nn.Module,
        tracked_parameter_list: list[nn.Parameter],
        pre_scaling_shape: tuple[int, ...] | None = None,
        restrict_pre_scaling_impl: nn.Module | None = None,
        pre_scaling_min_val: float | None = None,
    ) -> None:
        super().__init__(scaling_impl, normalize_stats_impl, accumulator_bit_width_impl,
                         scaling_stats_input_view_shape_impl, tracked_parameter_list,
                         pre_scaling_shape, restrict_pre_scaling_impl, pre_scaling_min_val)
        if not isinstance(pre_zero_point_impl, PreZeroCenterZeroPoint):
            raise TypeError("A2Q+ needs a zero-centring pre_zero_point_impl "
                            f"(PreZeroCenterZeroPoint), got {type(pre_zero_point_impl).__name__}")
        self.pre_zero_point = pre_zero_point_impl

    def zero_center(self, weights: Tensor) -> Tensor:
        return weights + self.pre_zero_point.get_zero_center(weights)

    forward = AccumulatorAwarePreScaling.forward
    calc_max_l1_norm = AccumulatorAwarePreScaling.calc_max_l1_norm



def _whole_bits(input_bit_width: Tensor | int | float) -> int:
    bits = float(input_bit_width)
    if bits != int(bits) or bits < 1:
        raise ValueError(f"A2Q needs a whole, positive input bit width; the layer's input has "
                         f"bit_width={bits}")
    return int(bits)
