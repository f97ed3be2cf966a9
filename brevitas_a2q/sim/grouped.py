"""Convolutions with many groups of few outputs each (depthwise convolutions: one output per
group, as in MobileNet) under a simulated accumulator: one CPU kernel call for every group
(:func:`brevitas_a2q.sim.kernels.grouped_forward`) instead of one chain per group, whose
per-call cost dominated (a 256-channel depthwise 3x3 convolution made 256 calls of a few
thousand products each). The same chain, bit for bit, and the same event counts; the
fine-grained gradients (Blumenfeld, Hubara, Soudry, ICLR 2024, Sec. 4) from the products the
kernel marks as passing theirs (:class:`GroupedFineGrained`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from brevitas_a2q.sim.chain import _ChainResult
from brevitas_a2q.sim.config import AccumulatorConfig
from brevitas_a2q.sim.unfold import ConvWindows, fold_channels_last, im2col_channels_last

MAX_OUTPUTS_PER_GROUP = 4  # above, each group's own chain fills the kernels' vectors


def applies(x: Tensor, w: Tensor, groups: int, cfg: AccumulatorConfig) -> bool:
    """Whether :func:`grouped_chain` runs this convolution: more than one group, at most
    :data:`MAX_OUTPUTS_PER_GROUP` outputs each, on the CPU with the kernels compiled; a
    floating-point accumulator takes float32 operands (their products are exact in the
    kernel's float64)."""
    from brevitas_a2q.sim.gradients import _cpu_kernels

    if groups < 2 or w.shape[0] // groups > MAX_OUTPUTS_PER_GROUP or not w.numel() \
            or not _cpu_kernels(x):
        return False
    return cfg.kind == "int" or (x.dtype == torch.float32 and w.dtype == torch.float32)


def per_group_operands(x4: Tensor, windows: ConvWindows, groups: int) -> Tensor:
    """A convolution's unfolded input (B, C, H, W) as each group's operands (R, K, groups),
    ``K = C / groups * kh * kw`` in ``unfold``'s order (channel, kernel row, kernel column):
    the channels-last windows as they are for a depthwise convolution, else one copy."""
    cols = im2col_channels_last(x4, *windows)  # (R, kh * kw, C)
    per_group = x4.shape[1] // groups
    if per_group == 1:
        return cols
    rows, offsets = cols.shape[:2]
    return cols.reshape(rows, offsets, groups, per_group).permute(0, 3, 1, 2) \
        .reshape(rows, per_group * offsets, groups)


def _channels_last(x_kg: Tensor, channels: int) -> Tensor:
    """The inverse of :func:`per_group_operands`' regrouping: (R, K, groups) as
    (R, kh * kw, C)."""
    rows, k, groups = x_kg.shape
    per_group = channels // groups
    if per_group == 1:
        return x_kg
    return x_kg.reshape(rows, per_group, k // per_group, groups).permute(0, 2, 3, 1) \
        .reshape(rows, k // per_group, channels)


def grouped_chain(x_kg: Tensor, w_rows: Tensor, cfg: AccumulatorConfig,
                  record: bool = False) -> tuple[_ChainResult, Tensor | None]:
    """The chain of every output of a grouped convolution's matrix form: each group's input
    rows ``x_kg`` (R, K, groups) (:func:`per_group_operands`) and the weights ``w_rows``
    (O, K), group ``g``'s outputs at ``g * O / groups`` on. Returns ``y`` (R, O) float64 with
    the event counts, and with ``record`` which products pass ``cfg.gradient``'s fine-grained
    gradient, ``keep`` (R, K, O) as bits (``np.packbits`` along O: an eighth of the unfolded
    input's elements, or less)."""
    from brevitas_a2q.sim import kernels
    from brevitas_a2q.sim.fast import kernel_threads, may_overflow

    (rows, k, _), outs = x_kg.shape, w_rows.shape[0]
    keep = np.empty((rows, k, outs), dtype=np.bool_) if record else None
    chunk = min(cfg.chunk_size or k, k)
    # may_overflow reads K from dimension 1 and bounds each (row, group)'s sum over it
    check = may_overflow(x_kg, w_rows, cfg, chunk)
    kernel_threads()
    y, counts = kernels.grouped_forward(_per_output(x_kg, outs).numpy(),
                                        w_rows.detach().t().contiguous().numpy(), chunk, cfg,
                                        check, keep)
    total = counts.sum(0)
    chain = _ChainResult(y=torch.from_numpy(y), overflow_events=int(total[0]),
                         overflow_outputs=int(total[1]), swamping_events=int(total[2]),
                         underflow_events=int(total[3]))
    return chain, None if keep is None else torch.from_numpy(np.packbits(keep, axis=2))


def _per_output(x_kg: Tensor, outs: int) -> Tensor:
    """Each output's operands (R, K, O), C-contiguous: group ``g``'s repeated for each of its
    outputs."""
    groups = x_kg.shape[2]
    x = x_kg.detach() if outs == groups else x_kg.detach().repeat_interleave(outs // groups, 2)
    return x.contiguous()


def fine_grained_grads(keep: Tensor, g: Tensor, x_kg: Tensor,
                       w_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of the real-valued factors ``x_kg`` (R, K, groups) and ``w_rows``
    (O, K) through the products that ``keep`` (R, K, O) passes: ``dL/dx[r, k, g] = sum over
    g's outputs o of dL/dy[r, o] keep[r, k, o] w[o, k]``, ``dL/dw[o, k] = sum_r dL/dy[r, o]
    keep[r, k, o] x[r, k, g(o)]``, in ``x_kg``'s type."""
    (rows, k, groups), outs = x_kg.shape, w_rows.shape[0]
    g_kept = g.to(x_kg.dtype)[:, None, :] * keep  # (R, K, O)
    gx = (g_kept * w_rows.to(x_kg.dtype).t()).reshape(rows, k, groups, outs // groups).sum(3)
    gw = torch.einsum("rko,rko->ok", g_kept, _per_output(x_kg, outs))
    return gx, gw.to(w_rows.dtype)


class GroupedFineGrained(torch.autograd.Function):
    """Forward: the simulated convolution ``y`` (given, ``(B, O, *size)``). Backward:
    :func:`fine_grained_grads` w.r.t. the input ``x`` (as the layer takes it, 1-d or 2-d)
    and the weight ``w``, from the products ``keep_bits`` (:func:`grouped_chain`) marks, a
    block of samples at a time (:func:`~brevitas_a2q.sim.conv_gradients.samples_per_block`):
    it keeps the input as it is, not unfolded."""

    @staticmethod
    def forward(ctx, x, w, y, keep_bits, windows, groups):
        """Keeps what the backward pass needs; returns ``y``."""
        ctx.windows, ctx.groups = windows, groups
        ctx.save_for_backward(x, w, keep_bits)
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        """The gradients of ``x`` and ``w`` for dL/dY ``g``, block by block."""
        from brevitas_a2q.sim.conv_gradients import samples_per_block

        x, w, keep_bits = ctx.saved_tensors
        one_d = x.dim() == 3
        x4 = x.unsqueeze(-2) if one_d else x
        outs, per_sample = w.shape[0], ctx.windows.size[0] * ctx.windows.size[1]
        g_rows = (g.unsqueeze(-2) if one_d else g).permute(0, 2, 3, 1).reshape(-1, outs)
        w_rows = w.detach().reshape(outs, -1)
        gx, gw = torch.empty_like(x4), torch.zeros_like(w_rows)
        samples = samples_per_block(x4.shape[0], ctx.windows, w_rows.shape[1] * outs, 1)
        for b0 in range(0, x4.shape[0], samples):
            b1 = min(b0 + samples, x4.shape[0])
            rows = slice(b0 * per_sample, b1 * per_sample)
            keep = np.unpackbits(keep_bits[rows].numpy(), axis=2, count=outs).view(np.bool_)
            x_kg = per_group_operands(x4[b0:b1].detach(), ctx.windows, ctx.groups)
            gx_kg, gw_block = fine_grained_grads(torch.from_numpy(keep), g_rows[rows], x_kg,
                                                 w_rows)
            gw += gw_block
            if ctx.needs_input_grad[0]:
                gx[b0:b1] = fold_channels_last(_channels_last(gx_kg, x4.shape[1]),
                                               gx[b0:b1].shape, *ctx.windows)
        gx = (gx.squeeze(-2) if one_d else gx) if ctx.needs_input_grad[0] else None
        return gx, gw.reshape(w.shape), None, None, None, None
