"""Saturating integer accumulators by blocks (CPU): the exact sums of blocks of consecutive
products by matrix products, the step-by-step chain only for the (row, output) pairs whose
partial sums may leave the range in that block (:mod:`._jit_blocks`). Same values, event counts
and fine-grained gradients as the chain of :mod:`.chain` (Blumenfeld et al., ICLR 2024,
Sec. 3-4), at the cost of about two matrix products where the accumulator rarely saturates.
In the forward pass, layers with too few (row, output) pairs for blocks, or too short chunks,
run every step, all outputs of a row at once; the fine-grained gradients take blocks at any
number of pairs (too short chunks take the kernels' backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from brevitas_a2q.sim.chain import _ChainResult, _int_range
from brevitas_a2q.sim.config import AccumulatorConfig

BLOCK = 64  # steps per block without chunks: longer blocks fail the range test more often,
MIN_CHUNK = 8  # shorter ones cost more products; chunks are blocks, from 8 steps up
MIN_PAIRS = 4096  # rows x outputs below which the per-block calls cost more than the chain


def max_abs(t: Tensor) -> float:
    """``max |t|`` in one pass without a copy."""
    lo, hi = t.aminmax()
    return max(-float(lo), float(hi))


def exact_dtype(x: Tensor, w: Tensor, block: int) -> torch.dtype | None:
    """The cheapest type whose matrix products sum ``block`` integer products of ``x`` and
    ``w`` exactly: int8 operands with int32 sums (``torch._int_mm``) where every value is in
    [-127, 127], else float32 or float64 where every partial sum is below 2^24, resp. 2^53;
    None where none is."""
    x_max, w_max = max_abs(x), max_abs(w)
    if x_max <= 127 and w_max <= 127:
        return torch.int8
    bound = block * x_max * w_max
    if bound < 2**24:
        return torch.float32
    return torch.float64 if bound < 2**53 else None


@dataclass
class _Blocks:
    """The operands in the type of their block sums, and the blocks, chunk by chunk."""

    x: Tensor  # (R, K)
    w: Tensor  # (O, K)
    w_t: Tensor  # (K, 2O): the weights for S, then |w| for A
    x_abs: Tensor | None  # |x| where x has negative values
    chunks: list[list[tuple[int, int]]]  # per chunk, its blocks' columns [k0, k1)
    lo: float
    hi: float

    def sums(self, k0: int, k1: int, out: Tensor) -> np.ndarray:
        """The block's ``S`` and ``A`` for every row and output, as (R, 2, O)."""
        outs = self.w.shape[0]
        mm = torch._int_mm if self.x.dtype == torch.int8 else torch.mm
        if self.x_abs is None:  # |x| = x: both in one product
            mm(self.x[:, k0:k1], self.w_t[k0:k1], out=out)
        else:
            out[:, :outs] = mm(self.x[:, k0:k1], self.w_t[k0:k1, :outs])
            out[:, outs:] = mm(self.x_abs[:, k0:k1], self.w_t[k0:k1, outs:])
        return out.view(out.shape[0], 2, outs).numpy()


def _applies(x: Tensor, w: Tensor, cfg: AccumulatorConfig, integers: bool) -> bool:
    """Whether this module computes ``x @ w.T`` under ``cfg``: saturating integers on a CPU
    with the kernels, integer-valued operands (known where ``integers``) whose partial sums are
    exact in int64 and float64 (below 2^53)."""
    from brevitas_a2q.sim import kernels

    if cfg.kind != "int" or cfg.is_wrap or x.device.type != "cpu" or not x.shape[1] \
            or not kernels.available():
        return False
    if not integers and not (_integer_valued(x) and _integer_valued(w)):
        return False
    return -_int_range(cfg.bits)[0] + max_abs(x) * max_abs(w) < 2**53


def _blocks(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int, integers: bool,
            min_pairs: int = MIN_PAIRS) -> _Blocks | None:
    """The block plan of ``x @ w.T`` under ``cfg``, or None where the method does not apply:
    not :func:`_applies`, chunks under :data:`MIN_CHUNK`, fewer than ``min_pairs`` (row,
    output) pairs, or operands too large to sum a block exactly."""
    if not _applies(x, w, cfg, integers):
        return None
    return _plan(x, w, cfg, chunk, min_pairs)


def sums_dtype(x: Tensor, w: Tensor, chunk: int, k: int) -> torch.dtype | None:
    """The type in which the block method sums blocks of ``x``'s and ``w``'s integers (any
    shapes holding the operands' values) over chains of ``k`` steps in chunks of ``chunk``
    (:func:`exact_dtype`); None where the method does not take them: chunks under
    :data:`MIN_CHUNK`, or operands too large to sum a block exactly."""
    if chunk < MIN_CHUNK:
        return None
    return exact_dtype(x, w, chunk if chunk < k else BLOCK)


def _plan(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int,
          min_pairs: int = MIN_PAIRS) -> _Blocks | None:
    """:func:`_blocks` where :func:`_applies` holds."""
    rows, k = x.shape
    dtype = sums_dtype(x, w, chunk, k) if rows * w.shape[0] >= min_pairs else None
    if dtype is None:
        return None
    chunked = chunk < k
    block = chunk if chunked else BLOCK
    x, w = x.detach().to(dtype).contiguous(), w.detach().to(dtype).contiguous()
    signed = float(x.amin()) < 0
    chunks = [[(c0, min(c0 + chunk, k))] if chunked else
              [(k0, min(k0 + block, k)) for k0 in range(0, k, block)]
              for c0 in range(0, k, chunk)]
    lo, hi = _int_range(cfg.bits)
    return _Blocks(x, w, torch.cat([w, w.abs()]).t().contiguous(), x.abs() if signed else None,
                   chunks, lo, hi)


def _integer_valued(t: Tensor) -> bool:
    return bool(torch.equal(t, torch.round(t)))


class _State:
    """The chains' running values and event records, (R, O) each."""

    def __init__(self, rows: int, outs: int, sums_dtype: torch.dtype, chunked: bool):
        self.a = np.zeros((rows, outs))
        self.total = np.zeros((rows, outs)) if chunked else self.a  # one chain: its value
        self.over_any = np.zeros((rows, outs), dtype=np.bool_)
        self.comb = np.zeros((rows, outs), dtype=np.bool_)
        self.last_k = np.full((rows, outs), -1, dtype=np.int32)
        self.last_comb = np.full((rows, outs), -1, dtype=np.int32)
        self.counts = np.zeros(rows, dtype=np.int64)
        self.buffer = torch.empty(rows, 2 * outs, dtype=_SUMS_TYPE.get(sums_dtype, sums_dtype))


_SUMS_TYPE = {torch.int8: torch.int32}


def _no_grads(tasks: int) -> tuple:
    """Placeholders for the gradient arguments of a pass without cuts (never read)."""
    return tuple(np.zeros((1, 1)) for _ in range(4)) + (np.zeros((tasks, 1, 1)),)


def _run(plan: _Blocks, state: _State, grads: tuple, cut_events: bool = False,
         chunk_done=None) -> None:
    """Every chunk's blocks, then its combination; ``chunk_done(c, k0, k1)`` after each
    chunk's combination. ``grads``: ``(g, xg, wg, gx, gw_parts)``, whose first dimension sets
    the parallel tasks."""
    from brevitas_a2q.sim import kernels

    x, w = plan.x.numpy(), plan.w.numpy()
    chunked = len(plan.chunks) > 1
    for c, blocks in enumerate(plan.chunks):
        for i, (k0, k1) in enumerate(blocks):
            sums = plan.sums(k0, k1, state.buffer)
            ends_chunk = c if chunked and i == len(blocks) - 1 else -1
            kernels.saturating_advance(x, w, sums, k0, k1, i == 0, ends_chunk, plan.lo,
                                       plan.hi, state.a, state.total, state.over_any,
                                       state.comb, state.last_comb, state.last_k, state.counts,
                                       cut_events, *grads)
        if chunk_done is not None:
            chunk_done(c, blocks[0][0], blocks[-1][1])


def chain(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int,
          integers: bool = False) -> _ChainResult | None:
    """:func:`brevitas_a2q.sim.chain._run_chain` of integer saturation for ``x`` (R, K) and
    ``w`` (O, K), bit for bit with its event counts: by blocks (:func:`_blocks`), else step by
    step with every output at once (layers with few outputs, short chunks); None where
    neither applies (:func:`_applies`)."""
    from brevitas_a2q.sim import kernels
    from brevitas_a2q.sim.fast import kernel_threads

    if not _applies(x, w, cfg, integers):
        return None
    plan = _plan(x, w, cfg, chunk)
    chunked = chunk < x.shape[1]
    state = _State(x.shape[0], w.shape[0], plan.x.dtype if plan else x.dtype, chunked)
    if plan is not None:
        _run(plan, state, _no_grads(min(kernel_threads(), x.shape[0])))
    else:
        kernel_threads()
        lo, hi = _int_range(cfg.bits)
        dtype = x.dtype if w.dtype == x.dtype else torch.float64  # (integers below 2^53)
        kernels.saturating_stepwise(x.detach().to(dtype).contiguous().numpy(),
                                    w.detach().to(dtype).contiguous().numpy(), chunk, lo, hi,
                                    state.a, state.total, state.over_any, state.comb,
                                    state.last_comb, state.last_k, state.counts)
    return _ChainResult(y=torch.from_numpy(state.total), overflow_events=int(state.counts.sum()),
                        overflow_outputs=int(state.over_any.sum()),
                        last_combine_event=torch.from_numpy(state.last_comb) if chunked else None)


def subtract_cut(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int, g: Tensor,
                 xg: Tensor, wg: Tensor, gx: Tensor, gw: Tensor,
                 last_comb: Tensor | None = None) -> bool:
    """Subtract from ``gx`` (R, K) and ``gw`` (O, K), in place, the gradient of every product
    that ``cfg.gradient`` (``immediate`` / ``recursive``) cuts: ``g`` (R, O) is dL/dY and ``xg``,
    ``wg`` the real-valued factors (integers ``x``, ``w``). ``last_comb`` (R, O): each output's
    last combination event, as :func:`chain` of the same operands found it (``recursive`` with
    chunks: without it, a first pass over the chain finds it). False where the block method
    does not apply (nothing changed). Blocks at any number of (row, output) pairs: the
    alternative for few pairs, :func:`brevitas_a2q.sim.kernels.backward`, re-runs the chain on
    float64 copies of the operands, several times the memory of their integers."""
    from brevitas_a2q.sim import kernels
    from brevitas_a2q.sim.fast import kernel_threads

    plan = _blocks(x, w, cfg, chunk, integers=True, min_pairs=1)
    if plan is None:
        return False
    rows, outs = x.shape[0], w.shape[0]
    tasks = min(kernel_threads(), rows)
    # one task subtracts from gw itself; several, each from its own part, added up after
    own = tasks == 1 and gw.is_contiguous()
    gw_parts = gw.numpy()[None] if own else np.zeros((tasks, outs, x.shape[1]))
    grads = (g.detach().contiguous().numpy(), xg.detach().contiguous().numpy(),
             wg.detach().contiguous().numpy(), gx.numpy(), gw_parts)
    recursive = cfg.gradient == "recursive"
    chunked = len(plan.chunks) > 1
    state = _State(rows, outs, plan.x.dtype, chunked)
    x_n, w_n = plan.x.numpy(), plan.w.numpy()

    def cuts(c: int, k0: int, k1: int) -> None:
        whole = last_comb >= c if recursive else state.comb
        kernels.saturating_chunk_cuts(x_n, w_n, k0, k1, plan.lo, plan.hi, whole, state.last_k,
                                      recursive, *grads)

    if not chunked:  # one chain per output: immediate cuts as it goes, recursive a prefix
        _run(plan, state, grads, cut_events=not recursive)
        if recursive:  # every product up to each output's last saturation
            kernels.saturating_chunk_cuts(x_n, w_n, 0, x.shape[1], plan.lo, plan.hi,
                                          np.zeros((rows, outs), dtype=np.bool_), state.last_k,
                                          True, *grads)
    elif not recursive:  # each chunk's cuts once its combination is known
        _run(plan, state, grads, chunk_done=cuts)
    else:  # the last combination events first, then each chunk's cuts
        if last_comb is None:
            _run(plan, state, grads)
            last_comb = state.last_comb
            state = _State(rows, outs, plan.x.dtype, chunked)
        else:
            last_comb = last_comb.numpy()
        _run(plan, state, grads, chunk_done=cuts)
    if not own:
        gw += torch.from_numpy(gw_parts.sum(0)).to(gw.dtype)
    return True
