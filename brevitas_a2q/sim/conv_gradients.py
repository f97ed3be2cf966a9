"""Fine-grained gradients (Blumenfeld, Hubara, Soudry, ICLR 2024, Sec. 4) of a whole convolution
on the CPU kernels, at little more memory than the plain layer's.

The matrix form (:func:`brevitas_a2q.sim.gradients.simulate_matmul`) keeps the unfolded input's
values, (B * L, C * kh * kw), from the forward pass to the backward pass: nine times the input
for a 3x3 convolution, which made a fine-grained training step take 2-3 times the memory of a
plain one. :class:`ConvFineGrained` keeps the input as it is (and, for an integer accumulator,
its integers) and what the forward chain recorded; its backward pass unfolds them again a block
of samples at a time and takes, per block, the exact gradient less the cut products'
(saturating integers: :func:`brevitas_a2q.sim.saturating.subtract_cut`; floating point,
whose forward chain runs by the same blocks: :func:`brevitas_a2q.sim.gradients.kernel_grads`
from the block's own event log). Each
(row, output) pair's chain is independent of the others, so the cuts are the same as over all
rows at once; only the float32 sums of the weight gradient run in another order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from brevitas_a2q.sim import saturating
from brevitas_a2q.sim.config import AccumulatorConfig
from brevitas_a2q.sim.unfold import ConvWindows, fold_rows, im2col

ROW_BLOCK_VALUES = 2**19  # unfolded input values per block of samples (2 MiB in float32)


class GroupRecord(NamedTuple):
    """What the backward pass needs of one group's forward chain: saturating integers, each
    output's last combination event (``recursive`` with chunks); floating point, the event log
    or each output's last event (:func:`brevitas_a2q.sim.gradients.recorded_float_chain`)."""

    last_comb: Tensor | None = None
    log: tuple | None = None
    last: Tensor | None = None


def integer_blocks_apply(codes: Tensor, w_codes: Tensor, cfg: AccumulatorConfig) -> bool:
    """Whether the block method takes every block's gradient:
    :func:`~brevitas_a2q.sim.saturating._applies` to, and
    :func:`~brevitas_a2q.sim.saturating.sums_dtype` finds a type for, the input's integers
    ``codes`` and the weights' ``w_codes`` (O, K) (every unfolded row's values are among
    them)."""
    k = w_codes.shape[1]
    return saturating._applies(codes, w_codes, cfg, True) and \
        saturating.sums_dtype(codes, w_codes, min(cfg.chunk_size or k, k), k) is not None


def samples_per_block(batch: int, windows: ConvWindows, k: int, groups: int) -> int:
    """How many samples each block unfolds: about :data:`ROW_BLOCK_VALUES` values."""
    positions = windows.size[0] * windows.size[1]
    return min(batch, max(1, ROW_BLOCK_VALUES // max(1, positions * k * groups)))


def float_conv_forward(x: Tensor, w: Tensor, cfg: AccumulatorConfig, windows: ConvWindows,
                       groups: int, samples: int, count) -> tuple[Tensor, list]:
    """A convolution's floating-point chain on the CPU kernels, a block of ``samples``
    samples at a time (:func:`brevitas_a2q.sim.gradients.recorded_float_chain`): its result as
    rows (B * L, O) in ``x``'s dtype, and per group and block the :class:`GroupRecord` of its
    backward pass; ``count(chain, outputs)`` takes each block's event counts."""
    from brevitas_a2q.sim.fast import _transposed
    from brevitas_a2q.sim.gradients import recorded_float_chain

    x4 = x.detach().unsqueeze(-2) if x.dim() == 3 else x.detach()
    outs = w.shape[0] // groups
    k = w[0].numel()
    w_groups = [w[g * outs:(g + 1) * outs].detach().reshape(outs, -1) for g in range(groups)]
    w_t = [_transposed(wg) for wg in w_groups]  # (once, not per block)
    blocks, records = [], [[] for _ in range(groups)]
    for b0 in range(0, x4.shape[0], samples):
        rows = im2col(x4[b0:b0 + samples], *windows)
        parts = []
        for group, wg in enumerate(w_groups):
            chain = recorded_float_chain(rows[:, group * k:(group + 1) * k], wg, cfg, w_t[group])
            parts.append(chain.y.to(x.dtype))
            count(chain, parts[-1].numel())
            records[group].append(GroupRecord(log=chain.event_log, last=chain.last_step_event))
        blocks.append(parts[0] if groups == 1 else torch.cat(parts, dim=1))
    return torch.cat(blocks), records


def integer_records(last_combs: list, batch: int, samples: int, positions: int) -> list:
    """Per group and block of ``samples`` samples, the :class:`GroupRecord` of a saturating
    chain run over all rows at once: its rows of each output's last combination event."""
    rows = samples * positions
    starts = range(0, batch * positions, rows)
    return [[GroupRecord(last_comb=None if last is None else last[r0:r0 + rows]) for r0 in starts]
            for last in last_combs]


class ConvFineGrained(torch.autograd.Function):
    """Forward: the simulated convolution (given, ``(B, O, *size)``). Backward: the config's
    fine-grained STE w.r.t. the input ``x`` (as the layer takes it, 1-d or 2-d) and the weight
    ``w``, a block of ``samples`` samples at a time, from ``x``, per group the forward chain's
    :class:`GroupRecord`, and for an integer accumulator the input's integers ``codes`` and the
    weights' ``w_codes`` (O, K)."""

    @staticmethod
    def forward(ctx, x, w, y_sim, codes, w_codes, cfg, windows, groups, records, samples):
        """Keeps what the backward pass needs; returns ``y_sim``."""
        ctx.cfg, ctx.windows, ctx.groups = cfg, windows, groups
        ctx.records, ctx.samples = records, samples
        ctx.save_for_backward(x, w, codes, w_codes)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        """The gradients of ``x`` and ``w`` for dL/dY ``g``, block by block."""
        x, w, codes, w_codes = ctx.saved_tensors
        one_d = x.dim() == 3
        x4 = x.unsqueeze(-2) if one_d else x
        codes4 = None if codes is None else codes.unsqueeze(-2) if one_d else codes
        g_rows = (g.unsqueeze(-2) if one_d else g).permute(0, 2, 3, 1)  # (B, H', W', O)
        gx = torch.empty_like(x4)
        gw = torch.zeros_like(w).reshape(w.shape[0], -1)
        for block, b0 in enumerate(range(0, x4.shape[0], ctx.samples)):
            b1 = min(b0 + ctx.samples, x4.shape[0])
            values = im2col(x4[b0:b1].detach(), *ctx.windows)
            ints = None if codes4 is None else im2col(codes4[b0:b1], *ctx.windows)
            gx_rows = _block_gradients(values, ints, w, w_codes,
                                       g_rows[b0:b1].reshape(-1, w.shape[0]), ctx,
                                       [records[block] for records in ctx.records], gw)
            gx[b0:b1] = fold_rows(gx_rows, gx[b0:b1].shape, *ctx.windows)
        gx = gx.squeeze(-2) if one_d else gx
        return gx, gw.reshape(w.shape), *[None] * 8


def _block_gradients(values: Tensor, ints: Tensor | None, w: Tensor, w_codes: Tensor | None,
                     g: Tensor, ctx, records: list[GroupRecord], gw: Tensor) -> Tensor:
    """One block of samples, with each group's record of it: its unfolded input's gradient
    (rows, K * groups), and the weight's added into ``gw`` (O, K)."""
    outs = w.shape[0] // ctx.groups
    k = values.shape[1] // ctx.groups
    if ctx.groups == 1:
        return _group_gradients(values, ints, w.reshape(outs, -1), w_codes, g.contiguous(), ctx,
                                records[0], gw)
    gx = torch.empty_like(values)
    for group in range(ctx.groups):
        cols, sl = slice(group * k, (group + 1) * k), slice(group * outs, (group + 1) * outs)
        gx[:, cols] = _group_gradients(
            values[:, cols].contiguous(), None if ints is None else ints[:, cols].contiguous(),
            w[sl].reshape(outs, -1), None if w_codes is None else w_codes[sl],
            g[:, sl].contiguous(), ctx, records[group], gw[sl])
    return gx


def _group_gradients(values: Tensor, ints: Tensor | None, w: Tensor, w_codes: Tensor | None,
                     g: Tensor, ctx, record: GroupRecord, gw: Tensor) -> Tensor:
    """One group of one block: the input's gradient (rows, K), and the weight's added into
    ``gw`` (O, K)."""
    from brevitas_a2q.sim.gradients import kernel_grads

    w = w.detach()
    k = values.shape[1]
    chunk = min(ctx.cfg.chunk_size or k, k)
    if ints is None:  # floating point: from what the block's forward chain kept
        return kernel_grads(values, w, g, values, w, ctx.cfg, chunk, record.log, record.last,
                            gw)[0]
    gx = g @ w
    gw.addmm_(g.t(), values)
    if not saturating.subtract_cut(ints, w_codes, ctx.cfg, chunk, g, values, w, gx, gw,
                                   record.last_comb):  # (integer_blocks_apply said it would)
        raise RuntimeError("brevitas_a2q.sim: the block method declined a convolution block "
                           "that integer_blocks_apply accepted")
    return gx

