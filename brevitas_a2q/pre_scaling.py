"""The math of A2Q and A2Q+ as small ``torch.nn.Module`` s plugged into Brevitas's decoupled
(weight-normalization) integer quantizer.

Brevitas's ``DecoupledRescalingIntQuantWithInput`` computes integer weights as
``q = clip(round_to_zero(w / pre_scale + pre_zero_point))``. A2Q (Colbert et al., ICCV 2023, Sec. 4)
parametrizes each output channel as ``w = g * v / ||v||_1`` and picks
``pre_scale = ||v||_1 / min(g / s, T)``, so that ``||q||_1 <= min(g / s, T)`` with ``T`` the L1 bound
of :func:`brevitas_a2q.bounds.l1_norm_bound`; A2Q+ (Colbert et al., ICML 2024, Sec. 3) first
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
from brevitas.core.quant.int import DecoupledRescalingIntQuantWithInput
from brevitas.core.scaling.pre_scaling import (
    AccumulatorAwareParameterPreScaling,
    AccumulatorAwareZeroCenterParameterPreScaling,
    ParameterPreScalingWeightNorm,
)
from brevitas.core.zero_point import PreZeroCenterZeroPoint
from torch import Tensor, nn

from brevitas_a2q.bounds import l1_norm_bound, min_accumulator_bits

__all__ = [
    "AccumulatorAwarePreScaling",
    "AccumulatorAwareZeroCenterPreScaling",
    "AccumulatorGuardedIntQuant",
    "L1NormBound",
    "OutputChannelView",
    "OutputChannelZeroCenter",
    "ROUNDINGS",
    "budgeted_take_back",
    "check_rounding",
]

# the integer rounding of the A2Q quantizers: Brevitas's round-to-zero, or budgeted rounding
ROUNDINGS = ("zero", "budgeted")
# budgets above this are never binding (|q| < 2^31 per weight): keeps the sums in int64
_BUDGET_CAP = 2**62

# A channel the guard finds over its bound has its pre-scale multiplied by
# (found / allowed) * (1 + _GUARD_MARGIN * 2^step), at most _GUARD_STEPS times.
_GUARD_MARGIN = 2.0**-20
_GUARD_STEPS = 64


def _round_down(value: Fraction, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is <= ``value`` (exact comparison with a Fraction)."""
    x = torch.tensor(float(value), dtype=dtype)
    while Fraction(x.item()) > value:
        x = torch.nextafter(x, torch.tensor(-math.inf, dtype=dtype))
    return x.item()


class OutputChannelView(nn.Module):
    """Per *output channel* view of a weight tensor: ``forward(w)`` gives rows ``(out, K)``.

    * Linear / Conv (``transposed=False``): weight ``(out, in/groups, k...)``, row ``o`` is
      ``w[o]`` (Brevitas's ``OverOutputChannelView``).
    * Transposed conv: weight ``(in, out/groups, k...)``; output channel ``o = g * (out/groups) + j``
      is computed from ``w[g*in/groups:(g+1)*in/groups, j, ...]``, so ``K = in/groups * prod(k)``.
      For ``groups = 1`` this is Brevitas's permuted view (``permute_dims`` swapping dims 0 and 1).

    For a transposed conv, each output element sums over at most ``K`` of these products (fewer
    with stride), so the channel's L1 norm over all of them is a safe bound.
    """

    def __init__(self, groups: int = 1, transposed: bool = False) -> None:
        super().__init__()
        self.groups = int(groups)
        self.transposed = bool(transposed)

    def _grouped(self, w: Tensor) -> Tensor:
        """``(groups, in/groups, out/groups, prod k)`` view of a transposed-conv weight."""
        return w.reshape(self.groups, w.shape[0] // self.groups, w.shape[1], -1)

    def out_channels(self, w: Tensor) -> int:
        return w.shape[1] * self.groups if self.transposed else w.shape[0]

    def forward(self, w: Tensor) -> Tensor:
        if not self.transposed:
            return w.reshape(w.shape[0], -1)
        if self.groups == 1:
            return w.transpose(0, 1).contiguous().reshape(w.shape[1], -1)
        return self._grouped(w).transpose(1, 2).reshape(self.out_channels(w), -1)

    def unview(self, rows: Tensor, w: Tensor) -> Tensor:
        """The inverse of :meth:`forward`: rows ``(out, K)`` back in ``w``'s shape."""
        if not self.transposed:
            return rows.reshape(w.shape)
        g, i, j = self.groups, w.shape[0] // self.groups, w.shape[1]
        return rows.reshape(g, j, i, -1).transpose(1, 2).reshape(w.shape)

    def l1_norms(self, q: Tensor) -> Tensor:
        """``sum |q|`` per output channel, without copying ``q``: shape ``(out,)``."""
        if not self.transposed:
            return torch.linalg.vector_norm(q.reshape(q.shape[0], -1), ord=1, dim=1)
        return torch.linalg.vector_norm(self._grouped(q), ord=1, dim=(1, 3)).reshape(-1)

    def sums(self, q: Tensor) -> Tensor:
        """``sum q`` per output channel: shape ``(out,)``."""
        if not self.transposed:
            return q.reshape(q.shape[0], -1).sum(1)
        return self._grouped(q).sum(dim=(1, 3)).reshape(-1)

    def expand(self, per_channel: Tensor, w: Tensor) -> Tensor:
        """A per-output-channel tensor (``out`` elements) in a shape that broadcasts against
        ``w``: ``(out, 1, ...)``, ``(1, out, 1, ...)`` (transposed) or, for a grouped transposed
        conv, ``(in, out/groups, 1, ...)`` (each input slice repeats its group's values)."""
        ones = [1] * (w.dim() - 2)
        if not self.transposed:
            return per_channel.reshape(w.shape[0], *[1] * (w.dim() - 1))
        if self.groups == 1:
            return per_channel.reshape(1, w.shape[1], *ones)
        g, i, j = self.groups, w.shape[0] // self.groups, w.shape[1]
        return per_channel.reshape(g, 1, j).expand(g, i, j).reshape(g * i, j, *ones)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, transposed={self.transposed}"


class OutputChannelZeroCenter(PreZeroCenterZeroPoint):
    """A2Q+ zero-centring ``v - mean(v)`` per output channel (Colbert et al. 2024, Sec. 3):
    Brevitas's ``PreZeroCenterZeroPoint`` over :class:`OutputChannelView` rows."""

    def get_zero_center(self, x: Tensor) -> Tensor:
        view = self.stats_input_view_shape_impl
        u = torch.mean(view(x), dim=self.stats_reduce_dim, keepdim=True)
        if isinstance(view, OutputChannelView):
            return -view.expand(u, x)
        return -u.view(self.stats_output_shape)


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
            raise ValueError(
                f"weight_accumulator_bit_width={acc_bits} is too small for {input_bit_width}-bit "
                f"{sign} inputs: the L1 bound is {float(bound):.3g} < 1, so every weight would "
                f"round to zero. Use weight_accumulator_bit_width >= {needed} or narrower inputs.")
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
        :func:`brevitas_a2q.bounds.zero_centered_l1_norm`). ``view`` maps the weight to output
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
    changed on a trained model (:func:`brevitas_a2q.training.set_accumulator_bit_width`).
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


def check_rounding(rounding: str) -> str:
    """``rounding`` if it is one of :data:`ROUNDINGS`, else a ``ValueError`` naming the choices."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"weight rounding must be one of {', '.join(map(repr, ROUNDINGS))}, "
                         f"got {rounding!r}")
    return rounding


@torch.no_grad()
def budgeted_take_back(q: Tensor, y: Tensor, budget: int, zero_centered: bool) -> Tensor | None:
    """Per row, the units to subtract from the round-to-nearest integers ``q`` so that they fit the
    integer budget: a tensor of ``q``'s shape in ``{-1, 0, 1}`` (``q - result`` fits), or None
    when every row already fits.

    ``q`` (``(out, K)`` rows, whole numbers, already clipped to the weight range) is the nearest
    integer vector to the scaled weights ``y`` (same shape). The budget is

    * A2Q: ``||q||_1 <= budget`` with ``budget = floor(T)``;
    * A2Q+: ``sum q+ <= budget // 2`` and ``sum |q-| <= budget // 2``, i.e.
      ``2 * max(sum q+, sum |q-|) <= floor(T)`` (:meth:`L1NormBound.effective_l1_norms`). A2Q+'s
      ``||q||_1 <= (2^P - 2) / (2^N - 1)`` (A2Q+ Eq. 18) assumes ``sum q = 0``: then
      ``q . x <= (2^N - 1) * sum q+`` for unsigned ``x`` and the signed case reduces to it. Rounded
      integers are not exactly zero-centred, so each sign's sum must be within ``T/2``; an
      unbalanced ``||q||_1 <= T`` would let ``q . x`` overflow.

    Objective: among integer vectors in the weight range within the budget, minimize
    ``||q - y||_2``. Taking a unit back from a weight rounded to ``k`` costs
    ``(|y| - k + 1)^2 - (|y| - k)^2 = 2 (|y| - k) + 1``: in ``[0, 1)`` for a magnitude that was
    rounded *up* (``k > |y|``), at least 1 for any other unit. The cost is separable and convex,
    so taking back the cheapest units first is optimal; when round-to-zero fits the budget (the A2Q
    construction guarantees it, up to float error) only rounded-up units are taken back, at most
    all of them (which gives round-to-zero). If even that does not fit (float error), every
    rounded-up unit is taken back and the caller's exact guard finishes the job.

    Vectorized: one stable sort of the take-back costs per row, cumulative counts per sign group,
    exact int64 sums. Runs on ``q``'s device.
    """
    budget = min(int(budget), _BUDGET_CAP)
    qi = q.to(torch.int64)
    if zero_centered:
        half = budget // 2
        excess_pos = (qi.clamp(min=0).sum(1) - half).clamp(min=0)
        excess_neg = ((-qi).clamp(min=0).sum(1) - half).clamp(min=0)
        if not bool(((excess_pos > 0) | (excess_neg > 0)).any()):
            return None
    else:
        excess_pos = excess_neg = (qi.abs().sum(1) - budget).clamp(min=0)
        if not bool((excess_pos > 0).any()):
            return None
    mag_q, mag_y = q.abs(), y.abs()
    up = mag_q > mag_y  # rounded up: one unit of the budget that can be taken back
    cost = torch.where(up, mag_y - mag_q, torch.full_like(mag_y, math.inf))  # in [-0.5, 0)
    order = torch.sort(cost, dim=1, stable=True).indices
    positive = q > 0
    if zero_centered:
        groups = ((up & positive, excess_pos), (up & ~positive, excess_neg))
    else:
        groups = ((up, excess_pos),)
    take = torch.zeros_like(up)
    for members, excess in groups:
        in_order = members.gather(1, order)
        rank = torch.cumsum(in_order.to(torch.int64), dim=1)  # 1-based rank in the group
        take |= in_order & (rank <= excess.unsqueeze(1))
    take = torch.zeros_like(up).scatter_(1, order, take)
    return torch.where(take, torch.sign(q), torch.zeros_like(q))


def _whole_bits(input_bit_width: Tensor | int | float) -> int:
    bits = float(input_bit_width)
    if bits != int(bits) or bits < 1:
        raise ValueError(f"A2Q needs a whole, positive input bit width; the layer's input has "
                         f"bit_width={bits}")
    return int(bits)


class AccumulatorGuardedIntQuant(DecoupledRescalingIntQuantWithInput):
    """Brevitas's decoupled integer quantizer with input, plus an exact post-rounding check.

    The integer weights ``q = clip(round_to_zero(w / pre_scale + pre_zero_point))`` are computed
    once, as Brevitas does; every output channel of ``q`` is checked exactly against ``T``
    (:meth:`L1NormBound.fits`, sums of the same integers, no second rounding). Only if float
    rounding left a channel over the bound is its pre-scale enlarged and ``q`` recomputed
    (:meth:`_guard`). The output ``(q - zero_point) * scale`` is Brevitas's.

    ``rounding="budgeted"`` (the injector's ``float_to_int_impl`` is then round-to-nearest): the
    integers are ``q - budgeted_take_back(q, ...)`` (:func:`budgeted_take_back`, budget
    ``floor(T)``), with the straight-through gradient of the rounding (the take-back is a
    constant); the exact check and the guard apply unchanged.
    """

    def __init__(self, decoupled_int_quant: nn.Module, pre_scaling_impl: nn.Module,
                 scaling_impl: nn.Module, int_scaling_impl: nn.Module,
                 pre_zero_point_impl: nn.Module, zero_point_impl: nn.Module,
                 bit_width_impl: nn.Module, rounding: str = "zero") -> None:
        super().__init__(decoupled_int_quant, pre_scaling_impl, scaling_impl, int_scaling_impl,
                         pre_zero_point_impl, zero_point_impl, bit_width_impl)
        self.rounding = check_rounding(rounding)

    def _to_int(self, x: Tensor, pre_scale: Tensor, pre_zero_point: Tensor,
                bit_width: Tensor) -> Tensor:
        """Brevitas's ``to_int`` (round-to-zero), or round-to-nearest minus the budgeted
        take-back."""
        int_quant = self.decoupled_int_quant
        q = int_quant.to_int(pre_scale, pre_zero_point, bit_width, x)
        if self.rounding != "budgeted":
            return q
        pre = self.pre_scaling_impl
        bits, signed = pre.last_input
        view = self._view()
        with torch.no_grad():  # the same float operations as to_int, before its rounding
            y = int_quant.input_view_impl(x) / pre_scale + pre_zero_point
            budget = pre.bound.floor(pre.last_accumulator_bits, bits, signed)
            take = budgeted_take_back(view(q.detach()), view(y.expand_as(q)), budget,
                                      pre.zero_centered)
        if take is None:
            return q
        return q - view.unview(take, q)

    def forward(self, x: Tensor, input_bit_width: Tensor, input_is_signed: bool):
        bit_width = self.msb_clamp_bit_width_impl()
        int_threshold = self.int_scaling_impl(bit_width)
        pre_scale = self.pre_scaling_impl(x, input_bit_width, input_is_signed) / int_threshold
        pre_zero_point = self.pre_zero_point_impl(x, pre_scale, bit_width)
        int_quant = self.decoupled_int_quant
        q = self._to_int(x, pre_scale, pre_zero_point, bit_width)
        pre = self.pre_scaling_impl
        bits, signed = pre.last_input  # N and sign, as the pre-scaling just read them
        if not pre.bound.all_fit(q, pre.last_accumulator_bits, bits, signed, self._view()):
            pre_scale = self._guard(x, pre_scale, bit_width, bits, signed)
            pre_zero_point = self.pre_zero_point_impl(x, pre_scale, bit_width)
            q = self._to_int(x, pre_scale, pre_zero_point, bit_width)
        scale = self.scaling_impl(x, int_threshold)
        zero_point = self.zero_point_impl(x, scale, bit_width)
        if self.observer_only:
            y = x
        else:
            y = int_quant.delay_wrapper(x, (q - zero_point) * scale)
        return y, scale, zero_point, bit_width, pre_scale, pre_zero_point

    def _view(self) -> OutputChannelView:
        view = self.pre_scaling_impl.stats_input_view_shape_impl
        return view if isinstance(view, OutputChannelView) else OutputChannelView()

    def _guard(self, x: Tensor, pre_scale: Tensor, bit_width: Tensor, input_bits: int,
               input_is_signed: bool) -> Tensor:
        """``pre_scale`` with the channels over the bound enlarged until they fit (float rounding
        only: each step divides by what the channel is over, plus a margin of 2^(step - 20))."""
        bound = self.pre_scaling_impl.bound
        acc_bits = self.pre_scaling_impl.accumulator_bits
        view = self._view()
        allowed = float(bound.exact(acc_bits, input_bits, input_is_signed))
        factor = torch.ones(view.out_channels(x), dtype=pre_scale.dtype, device=pre_scale.device)
        with torch.no_grad():
            for step in range(_GUARD_STEPS):
                scaled = pre_scale * view.expand(factor, x)
                pre_zero_point = self.pre_zero_point_impl(x, scaled, bit_width)
                q = self._to_int(x, scaled, pre_zero_point, bit_width)
                ok = bound.fits(q, acc_bits, input_bits, input_is_signed, view)
                if bool(ok.all()):
                    break
                over = bound.effective_l1_norms(q, view).to(factor.dtype) / allowed
                # the margin doubles each step, so a channel stuck on a rounding step gets out
                ratio = torch.where(ok, 1.0, over.clamp(min=1.0) * (1 + _GUARD_MARGIN * 2**step))
                factor = factor * ratio.to(factor.dtype)
            else:
                raise RuntimeError("the A2Q guard did not converge; please report the weights")
        return pre_scale * view.expand(factor, x)
