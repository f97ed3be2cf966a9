"""Fine-grained gradients (Blumenfeld, Hubara, Soudry, ICLR 2024, Sec. 4) of a whole convolution
through a saturating integer accumulator, at little more memory than the plain layer's.

The matrix form (:func:`brevitas_a2q.sim.gradients.simulate_matmul`) keeps the unfolded input's
values, (B * L, C * kh * kw), from the forward pass to the backward pass: nine times the input
for a 3x3 convolution, which made a fine-grained training step take 2-3 times the memory of a
plain one. :class:`SaturatingConvFineGrained` keeps only the input as it is and its integers;
its backward pass unfolds them again a block of samples at a time and takes, per block, the
exact gradient less the cut products' (:func:`brevitas_a2q.sim.saturating.subtract_cut`).
Each (row, output) pair's chain is independent of the others, so the cuts are the same as over
all rows at once; only the float32 sums of the weight gradient run in another order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from brevitas_a2q.sim import saturating
from brevitas_a2q.sim.config import AccumulatorConfig
from brevitas_a2q.sim.unfold import ConvWindows, fold_rows, im2col

ROW_BLOCK_VALUES = 2**19  # unfolded input values per block of the backward pass (2 MiB float32)


def samples_per_block(codes4: Tensor, w_codes: Tensor, cfg: AccumulatorConfig,
                      windows: ConvWindows, groups: int) -> int:
    """How many samples each block of the backward pass unfolds (about
    :data:`ROW_BLOCK_VALUES` values); 0 where the block method cannot take the gradient:
    chunks under :data:`~brevitas_a2q.sim.saturating.MIN_CHUNK`, or not
    :func:`~brevitas_a2q.sim.saturating._applies` to, or too large to sum exactly, the input's
    integers ``codes4`` and the weights' ``w_codes`` (O, K) (every unfolded row's values are
    among them)."""
    k = w_codes.shape[1]
    chunk = min(cfg.chunk_size or k, k)
    block = chunk if chunk < k else saturating.BLOCK
    if chunk < saturating.MIN_CHUNK or not codes4.shape[0] \
            or not saturating._applies(codes4, w_codes, cfg, integers=True) \
            or saturating.exact_dtype(codes4, w_codes, block) is None:
        return 0
    values = windows.size[0] * windows.size[1] * k * groups
    return min(codes4.shape[0], max(1, ROW_BLOCK_VALUES // max(1, values)))


class SaturatingConvFineGrained(torch.autograd.Function):
    """Forward: the simulated convolution (given, (B, O, *size)). Backward: the config's
    fine-grained STE w.r.t. the input ``x`` (as the layer takes it, 1-d or 2-d) and the weight
    ``w``, from ``x``, its integers ``codes`` and the weights' ``w_codes`` (O, K), a block of
    ``samples`` samples at a time. ``last_combs``: per group, each output's last combination
    event as the forward chain found it (``recursive`` with chunks), else None."""

    @staticmethod
    def forward(ctx, x, w, y_sim, codes, w_codes, cfg, windows, groups, last_combs, samples):
        ctx.cfg, ctx.windows, ctx.groups = cfg, windows, groups
        ctx.last_combs, ctx.samples = last_combs, samples
        ctx.save_for_backward(x, w, codes, w_codes)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        x, w, codes, w_codes = ctx.saved_tensors
        one_d = x.dim() == 3
        x4, codes4 = (x.unsqueeze(-2), codes.unsqueeze(-2)) if one_d else (x, codes)
        g_rows = (g.unsqueeze(-2) if one_d else g).permute(0, 2, 3, 1)  # (B, H', W', O)
        gx = torch.empty_like(x4)
        gw = torch.zeros_like(w).reshape(w.shape[0], -1)
        positions = ctx.windows.size[0] * ctx.windows.size[1]
        for b0 in range(0, x4.shape[0], ctx.samples):
            b1 = min(b0 + ctx.samples, x4.shape[0])
            rows = slice(b0 * positions, b1 * positions)
            gx_rows = _block_gradients(x4[b0:b1].detach(), codes4[b0:b1], w, w_codes,
                                       g_rows[b0:b1].reshape(-1, w.shape[0]), ctx, rows, gw)
            gx[b0:b1] = fold_rows(gx_rows, gx[b0:b1].shape, *ctx.windows)
        gx = gx.squeeze(-2) if one_d else gx
        return gx, gw.reshape(w.shape), *[None] * 8


def _block_gradients(x4: Tensor, codes4: Tensor, w: Tensor, w_codes: Tensor, g: Tensor, ctx,
                     rows: slice, gw: Tensor) -> Tensor:
    """One block of samples: the unfolded input's gradient (rows, K * groups), and the weight's
    added into ``gw`` (O, K)."""
    values, ints = im2col(x4, *ctx.windows), im2col(codes4, *ctx.windows)
    outs = w.shape[0] // ctx.groups
    k = w_codes.shape[1]
    chunk = min(ctx.cfg.chunk_size or k, k)
    if ctx.groups == 1:
        return _group_gradients(values, ints, w.reshape(outs, -1), w_codes, g.contiguous(), ctx,
                                chunk, _last_comb(ctx, 0, rows), gw)
    gx = torch.empty_like(values)
    for group in range(ctx.groups):
        cols, sl = slice(group * k, (group + 1) * k), slice(group * outs, (group + 1) * outs)
        gx[:, cols] = _group_gradients(values[:, cols].contiguous(), ints[:, cols].contiguous(),
                                       w[sl].reshape(outs, -1), w_codes[sl],
                                       g[:, sl].contiguous(), ctx, chunk,
                                       _last_comb(ctx, group, rows), gw[sl])
    return gx


def _last_comb(ctx, group: int, rows: slice) -> Tensor | None:
    last = ctx.last_combs[group] if ctx.last_combs is not None else None
    return None if last is None else last[rows]


def _group_gradients(values: Tensor, ints: Tensor, w: Tensor, w_codes: Tensor, g: Tensor, ctx,
                     chunk: int, last_comb: Tensor | None, gw: Tensor) -> Tensor:
    """One group of one block: the input's gradient (rows, K), and the weight's added into
    ``gw`` (O, K): the exact gradient less the cut products'
    (:func:`~brevitas_a2q.sim.saturating.subtract_cut`)."""
    gx = g @ w
    gw.addmm_(g.t(), values)
    if not saturating.subtract_cut(ints, w_codes, ctx.cfg, chunk, g, values, w, gx, gw,
                                   last_comb):  # (samples_per_block checked that it applies)
        raise RuntimeError("brevitas_a2q.sim: the block method declined a convolution block "
                           "that samples_per_block accepted")
    return gx
