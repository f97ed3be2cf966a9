"""The exact guard: every output channel's integer weights checked in integer arithmetic after
rounding, with the channel's pre-scale shrunk where float error left it over its L1 bound.
"""

from __future__ import annotations

import torch
from brevitas.core.quant.int import DecoupledRescalingIntQuantWithInput
from torch import Tensor, nn

from brevitas_a2q.quant.channels import OutputChannelView
from brevitas_a2q.quant.rounding import budgeted_take_back, check_rounding

# A channel the guard finds over its bound has its pre-scale multiplied by
# (found / allowed) * (1 + _GUARD_MARGIN * 2^step), at most _GUARD_STEPS times.
_GUARD_MARGIN = 2.0**-20
_GUARD_STEPS = 64


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
