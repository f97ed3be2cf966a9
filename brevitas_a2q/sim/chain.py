"""The reference accumulation chain in matrix form, ``Y[r, o] = sum_k X[r, k] * W[o, k]``, one
accumulator addition at a time with per-step event masks (Blumenfeld et al., ICLR 2024, Sec. 3),
and two's-complement wraparound. The oracle that the fast paths must equal bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from brevitas_a2q.sim.config import AccumulatorConfig

_BLOCK_ELEMENTS = 1 << 17  # elements per vectorized step; keeps the working set in cache


def _int_range(bits: int) -> tuple[float, float]:
    return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)


def _add(cfg: AccumulatorConfig, acc: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor | None,
                                                                   Tensor | None]:
    """One accumulator addition: ``s`` is the exact ``acc + addend``; returns ``(A(s), overflow,
    swamping, underflow)``. Swamping: ``s != acc`` yet the result equals ``acc`` without
    overflow (the addend was lost entirely; includes a tiny addend to a zero accumulator).
    Underflow: ``s != 0`` rounds to 0. The two can coincide."""
    if cfg.kind == "int":
        lo, hi = _int_range(cfg.bits)
        over = (s < lo) | (s > hi)
        return s.clamp_(lo, hi), over, None, None
    r, over = cfg.float_format.quantize(s)
    swamp = (r == acc) & (s != acc) & ~over
    under = (r == 0) & (s != 0)
    return r, over, swamp, under


@dataclass
class _ChainResult:
    y: Tensor  # (R, O) float64
    overflow_events: int = 0
    overflow_outputs: int = 0
    swamping_events: int = 0
    underflow_events: int = 0
    combine_event: Tensor | None = None  # (R, O, nC) bool, for "immediate"
    last_step_event: Tensor | None = None  # (R, O, nC) int, for "recursive"
    last_combine_event: Tensor | None = None  # (R, O) int, for "recursive"
    event_log: tuple | None = None  # (rows, entries, tile_ends): kernels.forward_events
    overflowed: Tensor | None = None  # (R, O) bool, wraparound only
    grad_x: Tensor | None = None
    grad_w: Tensor | None = None


def _chunked(x: Tensor, w: Tensor, chunk: int) -> tuple[Tensor, Tensor, int]:
    """Zero-pad K to a multiple of ``chunk``; return X as (R, C, nC) and W as (O, C, nC), so that
    step ``j`` of every chunk is the contiguous slice ``[:, j]``."""
    k = x.shape[1]
    n_chunks = max(1, math.ceil(k / chunk))
    pad = n_chunks * chunk - k
    if pad:
        x = F.pad(x, (0, pad))
        w = F.pad(w, (0, pad))
    x3 = x.reshape(x.shape[0], n_chunks, chunk).transpose(1, 2).contiguous()
    w3 = w.reshape(w.shape[0], n_chunks, chunk).transpose(1, 2).contiguous()
    return x3, w3, n_chunks


def _row_blocks(rows: int, per_row: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(per_row, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _run_chain(x: Tensor, w: Tensor, cfg: AccumulatorConfig, record: str | None = None,
               grad: Tensor | None = None, grad_factors: tuple[Tensor, Tensor] | None = None,
               keep_chunk: Tensor | None = None, fast: bool = True) -> _ChainResult:
    """Sequential accumulation of ``x @ w.T`` (float64 addend factors), vectorized over rows,
    outputs and chunks, looping over the positions inside a chunk, then over chunks.

    ``record``: ``"immediate"`` stores the chunk-combination events, ``"recursive"`` the index of
    the last event. With ``grad`` (dL/dY, (R, O)) the pass also computes the "immediate"
    fine-grained gradient w.r.t. the real-valued factors ``grad_factors = (x_val, w_val)``
    (``keep_chunk``: (R, O, nC) chunks whose addition to the total had no event), returned as
    ``res.grad_x`` (R, K), ``res.grad_w`` (O, K). Without either, ``fast`` takes
    :func:`_run_fast` where it applies (same results and counts).
    """
    rows, k = x.shape
    outs = w.shape[0]
    chunk = min(cfg.chunk_size or k, k) if k else 1
    if fast and record is None and grad is None:
        from brevitas_a2q.sim.fast import _run_fast  # the fast path falls back on this chain

        res = _run_fast(x, w, cfg, chunk)
        if res is not None:
            return res
    dev = x.device
    x3, w3, n_chunks = _chunked(x, w, chunk)
    res = _ChainResult(y=torch.empty(rows, outs, dtype=torch.float64, device=dev))
    if record == "immediate":
        res.combine_event = torch.zeros(rows, outs, n_chunks, dtype=torch.bool, device=dev)
    if record == "recursive":
        res.last_step_event = torch.full((rows, outs, n_chunks), -1, dtype=torch.int16,
                                          device=dev)
        res.last_combine_event = torch.full((rows, outs), -1, dtype=torch.int16, device=dev)
    if grad is not None:
        xg3, wg3, _ = _chunked(grad_factors[0], grad_factors[1], chunk)
        gx3 = torch.zeros(rows, chunk, n_chunks, dtype=torch.float64, device=dev)
        gw3 = torch.zeros(outs, chunk, n_chunks, dtype=torch.float64, device=dev)
    n_over = n_swamp = n_under = n_over_out = 0
    need_event = record is not None or grad is not None
    for rb in _row_blocks(rows, outs * n_chunks):
        xb = x3[rb]
        acc = torch.zeros(xb.shape[0], outs, n_chunks, dtype=torch.float64, device=dev)
        # per-element event counters, summed once per block (cheaper than a reduction per step)
        c_over = torch.zeros(acc.shape, dtype=torch.int32, device=dev)
        c_swamp = torch.zeros_like(c_over) if cfg.kind == "float" else None
        c_under = torch.zeros_like(c_over) if cfg.kind == "float" else None
        if grad is not None:
            g = grad[rb].unsqueeze(-1) * keep_chunk[rb]  # (rb, O, nC)
        for j in range(chunk):
            acc, over, swamp, under = _add(
                cfg, acc, torch.addcmul(acc, xb[:, None, j, :], w3[None, :, j, :]))
            c_over += over
            if swamp is not None:
                c_swamp += swamp
                c_under += under
            if not need_event:
                continue
            event = over if swamp is None else over | swamp | under
            if res.last_step_event is not None:
                res.last_step_event[rb].masked_fill_(event, j)
            if grad is not None:
                gm = g.masked_fill(event, 0.0)
                gx3[rb, j, :] += torch.einsum("roc,oc->rc", gm, wg3[:, j, :])
                gw3[:, j, :] += torch.einsum("roc,rc->oc", gm, xg3[rb, j, :])
        any_over = c_over.any(-1)
        n_over += int(c_over.sum())
        if c_swamp is not None:
            n_swamp += int(c_swamp.sum())
            n_under += int(c_under.sum())
        total = acc[..., 0].clone()
        for c in range(1, n_chunks):
            total, over, swamp, under = _add(cfg, total, total + acc[..., c])
            event = over
            if swamp is not None:
                event = over | swamp | under
                n_swamp += int(swamp.sum())
                n_under += int(under.sum())
            n_over += int(over.sum())
            any_over |= over
            if res.combine_event is not None:
                res.combine_event[rb, :, c] = event
            if res.last_combine_event is not None:
                res.last_combine_event[rb].masked_fill_(event, c)
        res.y[rb] = total
        n_over_out += int(any_over.sum())
    res.overflow_events, res.overflow_outputs = n_over, n_over_out
    res.swamping_events, res.underflow_events = n_swamp, n_under
    if grad is not None:
        res.grad_x = gx3.transpose(1, 2).reshape(rows, -1)[:, :k]
        res.grad_w = gw3.transpose(1, 2).reshape(outs, -1)[:, :k]
    return res



def _wrap_chain(ax: Tensor, aw: Tensor, bits: int) -> _ChainResult:
    """Exact integer dot products (float64: exact below 2^53), wrapped to ``bits``."""
    exact = ax @ aw.t()
    wrapped, over = _wrap(exact, bits)
    res = _ChainResult(y=wrapped, overflow_events=int(over.sum()),
                       overflow_outputs=int(over.sum()))
    res.overflowed = over
    return res


def _wrap(exact: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Two's-complement wraparound of integer-valued ``exact`` to ``bits``:
    ``(wrapped, overflowed)``."""
    half = 2.0 ** (bits - 1)
    wrapped = torch.remainder(exact + half, 2.0 * half) - half
    return wrapped, wrapped != exact
