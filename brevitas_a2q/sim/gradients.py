"""Gradients through a simulated accumulator: the identity STE and the fine-grained
``immediate`` / ``recursive`` estimators of Blumenfeld et al. (ICLR 2024, Sec. 4), and
:func:`simulate_matmul`, one matrix product through the simulated accumulator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from brevitas_a2q.sim import saturating
from brevitas_a2q.sim.chain import _ChainResult, _chunked, _row_blocks, _run_chain, _wrap_chain
from brevitas_a2q.sim.config import AccumulatorConfig
from brevitas_a2q.sim.fast import _run_kernel, _transposed


def _recursive_grads(x: Tensor, w: Tensor, g: Tensor, chunk: int, last_step: Tensor,
                     last_combine: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the "recursive" fine-grained STE: product (c, j) of output (r, o) passes
    ``g[r, o]`` iff ``j > last_step[r, o, c]`` and ``c > last_combine[r, o]``."""
    rows, k = x.shape
    outs = w.shape[0]
    x3, w3, n_chunks = _chunked(x, w, chunk)
    gx3 = torch.zeros(rows, chunk, n_chunks, dtype=x.dtype, device=x.device)
    gw3 = torch.zeros(outs, chunk, n_chunks, dtype=x.dtype, device=x.device)
    chunk_ids = torch.arange(n_chunks, device=x.device)
    for rb in _row_blocks(rows, outs * n_chunks):
        keep_chunk = chunk_ids > last_combine[rb].unsqueeze(-1)  # (rb, O, nC)
        gb = g[rb].unsqueeze(-1) * keep_chunk
        lsb = last_step[rb]
        for j in range(chunk):
            gm = gb.masked_fill(lsb >= j, 0.0)
            gx3[rb, j, :] += torch.einsum("roc,oc->rc", gm, w3[:, j, :])
            gw3[:, j, :] += torch.einsum("roc,rc->oc", gm, x3[rb, j, :])
    return (gx3.transpose(1, 2).reshape(rows, -1)[:, :k],
            gw3.transpose(1, 2).reshape(outs, -1)[:, :k])


class _FineGrainedChain(torch.autograd.Function):
    """Forward: the simulated result (given). Backward: the config's fine-grained STE, w.r.t. the
    real-valued factors ``x_val`` (R, K) and ``w_val`` (O, K)."""

    @staticmethod
    def forward(ctx, x_val, w_val, y_sim, addend_x, addend_w, cfg, chain):
        ctx.cfg, ctx.chain = cfg, chain
        ctx.save_for_backward(x_val, w_val, addend_x, addend_w)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        x_val, w_val, addend_x, addend_w = ctx.saved_tensors
        cfg, chain = ctx.cfg, ctx.chain
        xv, wv, g64 = x_val.double(), w_val.double(), g.double()
        k = x_val.shape[1]
        chunk = min(cfg.chunk_size or k, k) if k else 1
        if cfg.gradient == "recursive":
            gx, gw = _recursive_grads(xv, wv, g64, chunk, chain.last_step_event,
                                      chain.last_combine_event)
        else:  # immediate: re-run the additions to find each product's events
            res = _run_chain(addend_x, addend_w, cfg, grad=g64, grad_factors=(xv, wv),
                             keep_chunk=~chain.combine_event)
            gx, gw = res.grad_x, res.grad_w
        return gx.to(x_val.dtype), gw.to(w_val.dtype), None, None, None, None, None


def simulate_matmul(x_val: Tensor, w_val: Tensor, x_scale: Tensor | float,
                    w_scale: Tensor, cfg: AccumulatorConfig, x_int: Tensor | None = None
                    ) -> tuple[Tensor, _ChainResult]:
    """``Y[r, o] = sum_k x[r, k] * w[o, k]`` through the simulated accumulator ``cfg``.

    ``x_val`` (R, K) and ``w_val`` (O, K) are the real (dequantized) values, ``x_scale`` a scalar
    and ``w_scale`` (O,) their scales, so ``x_val / x_scale`` and ``w_val / w_scale`` are
    integers. Returns the real-valued result (R, O) in ``x_val``'s dtype, differentiable per
    ``cfg.gradient``, and the event counts. ``x_int``: those integers, as :func:`integer_codes`
    gives them, where the caller has them (an integer accumulator).
    """
    dev = x_val.device
    x_scale = torch.as_tensor(x_scale, dtype=torch.float64, device=dev).reshape(())
    w_scale = torch.as_tensor(w_scale, dtype=torch.float64, device=dev).reshape(-1)
    grad = torch.is_grad_enabled() and (x_val.requires_grad or w_val.requires_grad)
    if cfg.kind == "int" and x_int is None:
        x_int = integer_codes(x_val, x_scale)
    if cfg.kind == "int" and not grad:
        return simulate_integer_forward(x_int, w_val, x_scale, w_scale, cfg, x_val.dtype)
    if cfg.kind == "int":
        ax, aw = x_int, integer_codes(w_val, w_scale[:, None])
    else:  # the CPU kernels take the float32 weights (their float64 products are exact)
        ax = x_val.detach()
        aw = w_val.detach() if _cpu_kernels(x_val) else w_val.detach().double()
    jit = not cfg.is_wrap and cfg.gradient != "ste" and _use_kernels(x_val)
    k = ax.shape[1]
    # integer saturation by blocks takes the integers in their own type; the CPU kernels take
    # float32 addends (each product is exact in their float64); the rest float64
    chain = saturating.chain(ax, aw, cfg, min(cfg.chunk_size or k, k), integers=True) \
        if k else None
    if chain is None and jit and grad and cfg.kind == "float" and _cpu_kernels(x_val) and k:
        chain = recorded_float_chain(ax, aw, cfg)
    if chain is None:
        if not (cfg.kind == "float" and _cpu_kernels(x_val)):
            ax, aw = ax.double(), aw.double()
        chain = _chain(ax, aw, cfg, jit)
    y = chain.y
    if cfg.kind == "int":
        y = y * (x_scale * w_scale)[None, :]
    y = y.to(x_val.dtype)
    if not grad:
        return y, chain
    if cfg.gradient == "ste":
        return _IdentitySTE.apply(x_val, w_val, y), chain
    if cfg.is_wrap:
        exact = x_val @ w_val.t()
        ste = exact + (y - exact).detach()
        return torch.where(chain.overflowed, y, ste), chain
    if jit:
        return _KernelFineGrained.apply(x_val, w_val, y, ax, aw, cfg, chain.last_step_event,
                                        chain.event_log, chain.last_combine_event), chain
    return _FineGrainedChain.apply(x_val, w_val, y, ax, aw, cfg, chain), chain


def recorded_float_chain(ax: Tensor, aw: Tensor, cfg: AccumulatorConfig,
                         w_t: np.ndarray | None = None) -> _ChainResult:
    """The floating-point chain of ``ax`` (R, K) and ``aw`` (O, K) on the CPU kernels, keeping
    what its fine-grained backward pass (:func:`kernel_grads`) needs: for ``recursive`` over one
    chunk each output's last event, otherwise the events themselves (its log). ``w_t``:
    :func:`~brevitas_a2q.sim.fast._transposed` of ``aw``, where the caller has it."""
    k = ax.shape[1]
    chunk = min(cfg.chunk_size or k, k)
    last = cfg.gradient == "recursive" and chunk == k
    return _run_kernel(ax, aw, cfg, chunk, record_last=last, record_events=not last, w_t=w_t)


def simulate_integer_forward(x_int: Tensor, w_val: Tensor, x_scale: Tensor | float,
                             w_scale: Tensor, cfg: AccumulatorConfig, dtype: torch.dtype,
                             w_rounded: Tensor | None = None) -> tuple[Tensor, _ChainResult]:
    """:func:`simulate_matmul` of an integer accumulator without a gradient, from the input's
    integers ``x_int`` (R, K) as :func:`integer_codes` gives them, instead of its values (a
    convolution finds them before unfolding its input: K times fewer divisions). Returns the
    result (R, O) in ``dtype`` and the event counts. ``w_rounded``: ``round(w_val / w_scale)``,
    where the caller has it."""
    dev = x_int.device
    x_scale = torch.as_tensor(x_scale, dtype=torch.float64, device=dev).reshape(())
    w_scale = torch.as_tensor(w_scale, dtype=torch.float64, device=dev).reshape(-1)
    aw = integer_codes(w_val, w_scale[:, None], w_rounded)
    k = x_int.shape[1]
    chain = saturating.chain(x_int, aw, cfg, min(cfg.chunk_size or k, k), integers=True) \
        if k else None
    if chain is None:
        jit = not cfg.is_wrap and cfg.gradient != "ste" and _use_kernels(x_int)
        chain = _chain(x_int.double(), aw.double(), cfg, jit)
    return (chain.y * (x_scale * w_scale)[None, :]).to(dtype), chain


def _chain(ax: Tensor, aw: Tensor, cfg: AccumulatorConfig, jit: bool) -> _ChainResult:
    """The chain of float64 addend factors, with the events the backward pass needs where
    the kernels do not recompute them."""
    if cfg.is_wrap:
        return _wrap_chain(ax, aw, cfg.bits)
    record = cfg.gradient if cfg.gradient != "ste" and torch.is_grad_enabled() else None
    with torch.no_grad():
        return _run_chain(ax, aw, cfg, record=None if jit else record)


def integer_codes(value: Tensor, scale: Tensor, rounded: Tensor | None = None) -> Tensor:
    """``round(value / scale)``: int8 where every value fits, else in ``value``'s type where
    that is exact (float32: integers below 2^22, so that the quotient's rounding error cannot
    reach 1/2), else in float64. ``rounded``: that quotient in ``value``'s type, where the
    caller has it."""
    q = rounded if rounded is not None else \
        (value.detach() / scale.detach().to(value.dtype)).round_()
    largest = saturating.max_abs(q) if q.numel() else 0.0
    if largest <= 127:  # the block method's own type, and a quarter of the memory
        return q.to(torch.int8)
    if q.dtype == torch.float64 or largest < 2**22:
        return q
    return torch.round(value.detach().double() / scale)


class _IdentitySTE(torch.autograd.Function):
    """Forward: the simulated result (given). Backward: the exact layer's, ``dL/dx = g w``,
    ``dL/dw = g^T x`` (identity straight-through estimator), without the exact forward
    product."""

    @staticmethod
    def forward(ctx, x_val, w_val, y_sim):
        ctx.save_for_backward(x_val, w_val)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        x_val, w_val = ctx.saved_tensors
        gx = g @ w_val if ctx.needs_input_grad[0] else None
        gw = g.t() @ x_val if ctx.needs_input_grad[1] else None
        return gx, gw, None


def _cpu_kernels(x: Tensor) -> bool:
    from brevitas_a2q.sim import kernels

    return x.device.type == "cpu" and kernels.available()


def _use_kernels(x: Tensor) -> bool:
    """Compiled kernels: numba on CPU, numba.cuda on a GPU (which falls back inside)."""
    return x.device.type == "cuda" or _cpu_kernels(x)


def _torch_chain_grads(ax, aw, xv, wv, g64, cfg, chunk) -> tuple[Tensor, Tensor]:
    """The fine-grained gradients from the torch chain (records, then masked sums)."""
    chain = _run_chain(ax, aw, cfg, record=cfg.gradient, fast=False)
    if cfg.gradient == "recursive":
        return _recursive_grads(xv, wv, g64, chunk, chain.last_step_event,
                                chain.last_combine_event)
    res = _run_chain(ax, aw, cfg, grad=g64, grad_factors=(xv, wv),
                     keep_chunk=~chain.combine_event)
    return res.grad_x, res.grad_w


def _cuda_grads(ax, aw, xv, wv, g64, cfg, chunk) -> tuple[Tensor, Tensor]:
    """The exact gradient minus the cut products' (numba.cuda), else the torch chain's."""
    from brevitas_a2q.sim import kernels

    gx, gw = g64 @ wv, g64.t() @ xv
    if kernels.cuda_subtract_cut(ax, aw, chunk, cfg, g64, xv, wv, gx, gw):
        return gx, gw
    return _torch_chain_grads(ax, aw, xv, wv, g64, cfg, chunk)


class _KernelFineGrained(torch.autograd.Function):
    """As :class:`_FineGrainedChain`, with the backward pass in compiled kernels. CPU: the
    exact gradient (two matrix products) less the cut products' (saturating integers by blocks,
    :func:`brevitas_a2q.sim.saturating.subtract_cut`), else :func:`kernel_grads`. GPU:
    :func:`_cuda_grads`."""

    @staticmethod
    def forward(ctx, x_val, w_val, y_sim, addend_x, addend_w, cfg, last=None, log=None,
                last_comb=None):
        ctx.cfg, ctx.last, ctx.log, ctx.last_comb = cfg, last, log, last_comb
        ctx.save_for_backward(x_val, w_val, addend_x, addend_w)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        x_val, w_val, ax, aw = ctx.saved_tensors
        cfg = ctx.cfg
        k = x_val.shape[1]
        chunk = min(cfg.chunk_size or k, k) if k else 1
        if x_val.is_cuda:
            gx, gw = _cuda_grads(ax, aw, x_val.detach().double(), w_val.detach().double(),
                                 g.double(), cfg, chunk)
            return gx.to(x_val.dtype), gw.to(w_val.dtype), *[None] * 7
        xv, wv = x_val.detach(), w_val.detach()
        if cfg.kind == "int":  # the exact gradient, less the cut products' (by blocks)
            gx, gw = g @ wv, g.t() @ xv
            if saturating.subtract_cut(ax, aw, cfg, chunk, g, xv, wv, gx, gw, ctx.last_comb):
                return gx, gw, *[None] * 7
            ax, aw = ax.double(), aw.double()  # (float32 real-valued addends go as they are)
        gx, gw = kernel_grads(xv, wv, g, ax, aw, cfg, chunk, ctx.log, ctx.last)
        return gx.to(x_val.dtype), gw.to(w_val.dtype), *[None] * 7


def kernel_grads(xv: Tensor, wv: Tensor, g: Tensor, ax: Tensor, aw: Tensor,
                 cfg: AccumulatorConfig, chunk: int, log: tuple | None = None,
                 last: Tensor | None = None, gw: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The fine-grained gradients of ``xv`` (R, K) and ``wv`` (O, K) for dL/dY ``g`` (R, O),
    on the CPU kernels: the exact gradient of the outputs that take it plus the kernels'
    corrections, from what the forward pass kept (floating point: its event ``log``,
    :func:`brevitas_a2q.sim.kernels.backward_from_events`, or for ``recursive`` over one chunk
    each output's ``last`` event) or else by re-running the chain of the addends ``ax``,
    ``aw`` for the rows not proven event-free (:func:`brevitas_a2q.sim.kernels.backward`).
    ``gw``: a contiguous (O, K) array in ``xv``'s type to add the weight's gradient into (the
    event log's kernel adds into it, with no (O, K) array of its own), else a new one."""
    from brevitas_a2q.sim import kernels
    from brevitas_a2q.sim.fast import _int_safe_rows, kernel_threads, may_overflow

    rows = log[0] if log else (~_int_safe_rows(ax, aw, cfg)).nonzero().squeeze(1)
    if gw is None:
        gw = torch.zeros_like(wv)
    g_exact, gx_rows, use_exact = g, None, None
    n_blocks = min(kernel_threads(), len(rows))
    recursive = cfg.gradient == "recursive"
    if len(rows) and log:  # the forward pass kept its events
        gx_rows, use_exact = kernels.backward_from_events(
            xv.contiguous().numpy(), wv.contiguous().numpy(), g[rows].contiguous().numpy(),
            rows.numpy(), log[1:], chunk, recursive, n_blocks, gw.numpy())
    elif len(rows):
        if last is not None:  # the forward pass kept each last event
            gx_rows, gw_corr, use_exact = kernels.recursive_from_last(
                xv.contiguous().numpy(), wv.contiguous().numpy(), g.contiguous().numpy(),
                last[..., 0].contiguous().numpy(), n_blocks)
        else:  # the kernel's corrections, and the outputs that take the exact part
            gx_rows, gw_corr, use_exact = kernels.backward(
                ax.contiguous().numpy(), _transposed(aw), xv.contiguous().numpy(),
                wv.contiguous().numpy(), g[rows].contiguous().numpy(), rows.numpy(), chunk,
                cfg, recursive, n_blocks, may_overflow(ax, aw, cfg, chunk))
        gw += torch.from_numpy(gw_corr).to(gw.dtype)
    if gx_rows is not None:
        if use_exact is not None and not use_exact.all():
            g_exact = g.clone()
            g_exact[rows] *= torch.from_numpy(use_exact)
        gx_rows = torch.from_numpy(gx_rows)
    gw.addmm_(g_exact.t(), xv)
    if gx_rows is None:
        gx = g_exact @ wv
    elif len(rows) == len(g) and gx_rows.dtype == xv.dtype:
        gx = gx_rows.addmm_(g_exact, wv)  # (no second (R, K) array)
    else:
        gx = g_exact @ wv
        gx[rows] += gx_rows.to(gx.dtype)
    return gx, gw
