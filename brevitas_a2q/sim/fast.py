"""Fast forward-only path of the accumulation chain: the same float64 operations as
:func:`brevitas_a2q.sim.chain._run_chain`, without per-element event masks, with provably idle
work left out. Bit-identical results and event counts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from brevitas_a2q.sim import kernels
from brevitas_a2q.sim.chain import _ChainResult, _int_range, _run_chain
from brevitas_a2q.sim.config import AccumulatorConfig
from brevitas_a2q.sim.float_format import FloatFormat

_FAST_BLOCK_ELEMENTS = 1 << 16  # elements per step; larger blocks gain little, smaller lose
_EXP_MASK = 0x7FF << 52


def _fast_rounder(fmt: FloatFormat):
    """``round(s, out, scratch)``: ``out = FloatFormat.quantize(s)`` for in-range ``s``, with the
    same float64 operations, in place and without allocations. ``scratch`` is left holding
    ``2^max(e, emin)`` (nearest) or ``2^(max(e, emin) - M)`` (toward zero), ``e`` the exponent
    of ``s``, as int64 bit patterns."""
    if fmt.rounding == "nearest":
        min_bits = (fmt.min_exponent + 1023) << 52
        magic = 1.5 * 2.0 ** (52 - fmt.man_bits)

        def round_nearest(s: Tensor, out: Tensor, scratch: Tensor) -> None:
            # scratch = 2^max(exponent(s), emin); out = (s + c) - c with c = magic * scratch
            torch.bitwise_and(s.view(torch.int64), _EXP_MASK, out=scratch).clamp_(min=min_bits)
            power = scratch.view(torch.float64)
            torch.add(s, power, alpha=magic, out=out).sub_(power, alpha=magic)

        return round_nearest
    min_bits = (fmt.min_exponent - fmt.man_bits + 1023) << 52
    shift = fmt.man_bits << 52

    def round_toward_zero(s: Tensor, out: Tensor, scratch: Tensor) -> None:
        torch.bitwise_and(s.view(torch.int64), _EXP_MASK, out=scratch).sub_(shift)
        quantum = scratch.clamp_(min=min_bits).view(torch.float64)
        torch.div(s, quantum, out=out).trunc_().mul_(quantum)

    return round_toward_zero


def _l1_bound(x: Tensor, w: Tensor) -> Tensor:
    """Per row, ``L = sum_k |x_k| max_o |w_ok|`` >= every ``sum_k |x_k w_ok|``."""
    return x.abs() @ w.abs().amax(0)


def _int_safe_rows(x: Tensor, w: Tensor, cfg: AccumulatorConfig) -> Tensor:
    """Rows whose every partial sum stays in the integer range (:func:`_l1_bound`), so that
    their chain has no event and equals the exact product; all rows for floating point: none
    is provably event-free (every addition rounds)."""
    if cfg.kind == "float":
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return _l1_bound(x, w) <= _int_range(cfg.bits)[1]


def may_overflow(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int) -> bool:
    """Whether an addition of the floating-point chain might overflow (True for integers).
    Round to nearest: ``|A(a + p) - (a + p)| <= |p|`` (``a`` itself is a representable
    candidate), so ``|A(a + p)| <= |a| + 2 |p|``: every partial sum of a chain stays within
    ``2 L`` and, with chunks, every combination within ``4 L``, ``L = max_r sum_k |x_rk|
    max |w|``; toward zero, within ``L``. No overflow is possible below the largest value."""
    if cfg.kind != "float":
        return True
    if not x.numel() or not w.numel():
        return False
    k = x.shape[1]
    factor = 1 if cfg.float_format.rounding != "nearest" else (4 if chunk < k else 2)
    limit = cfg.float_format.max_value / factor / (1 + (k + 8) * 2.0**-22)  # float32 sums
    w_max = float(w.abs().amax())
    lo, hi = x.aminmax()
    if k * max(-float(lo), float(hi)) * w_max <= limit:  # L <= K max|x| max|w|: one pass
        return False
    # each row's sum of |x| without an |x| copy of the rows (float32 sums in any order are
    # within the limit's (K + 8) 2^-22 of the exact ones)
    return not float(torch.linalg.vector_norm(x, 1, dim=1).amax()) * w_max <= limit  # (NaN)


def kernel_threads() -> int:
    """Run the numba kernels on as many threads as torch uses (the benchmarks compare both
    at the same count)."""
    import numba

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _transposed(w: Tensor) -> np.ndarray:
    """``w.T`` as the kernels' C-contiguous ``w_t``, in one copy: float32 as it is (the
    kernels multiply in float64, where the product of two float32 values is exact), any other
    type in float64."""
    dtype = torch.float32 if w.dtype == torch.float32 else torch.float64
    return torch.empty(w.shape[::-1], dtype=dtype).copy_(w.detach().t()).numpy()


def _run_kernel(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int,
                record_last: bool = False, record_events: bool = False,
                w_t: np.ndarray | None = None) -> _ChainResult:
    """:func:`_run_chain` through the numba kernel (:mod:`.kernels`): the exact product for the
    rows :func:`_int_safe_rows` proves event-free, the compiled chain for the others; integer
    saturation by blocks (:mod:`.saturating`) where that applies. Floating point:
    ``record_last`` (one chunk) also keeps each output's last event's step, as
    ``last_step_event`` (R, O, 1); ``record_events`` the event log, as ``event_log`` (the
    chain's rows, entries, tile ends: :func:`brevitas_a2q.sim.kernels.forward_events`).
    ``w_t``: :func:`_transposed` of ``w``, where the caller has it."""
    from brevitas_a2q.sim import saturating

    res = None if record_last or record_events else saturating.chain(x, w, cfg, chunk)
    if res is not None:
        return res
    safe = _int_safe_rows(x, w, cfg)
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    if bool(safe.any()):
        y[safe] = (x[safe] @ w.t()).add_(0.0)
    rows = (~safe).nonzero().squeeze(1)
    res = _ChainResult(y=y)
    if len(rows):
        kernel_threads()
        xn = x.detach().contiguous().numpy()
        wn = _transposed(w) if w_t is None else w_t
        last = np.full((len(rows), w.shape[0]), -1, dtype=np.int32) if record_last else None
        check = may_overflow(x, w, cfg, chunk)
        logged = record_events and kernels.forward_events(xn, wn, rows.numpy(), chunk, cfg,
                                                          check, kernel_threads())
        if logged:
            part, counts, log = logged
            res.event_log = (rows, *log)
        else:
            part, counts = kernels.forward(xn, wn, rows.numpy(), chunk, cfg, check, last)
        y[rows] = torch.from_numpy(part)
        if record_last:
            res.last_step_event = torch.full((x.shape[0], w.shape[0], 1), -1, dtype=torch.int32)
            res.last_step_event[rows] = torch.from_numpy(last)[..., None]
        total = counts.sum(0)
        res.overflow_events, res.overflow_outputs = int(total[0]), int(total[1])
        res.swamping_events, res.underflow_events = int(total[2]), int(total[3])
    return res


def _run_fast(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int) -> _ChainResult | None:
    """:func:`_run_chain` without ``record``/``grad``, bit for bit, or None where that needs
    per-step masks. Integer saturation: rows with ``L <= 2^(P-1) - 1`` (:func:`_l1_bound`)
    cannot saturate, so their exact sum is one matmul; the others go through the chain.
    Floating point: :func:`_run_fast_float`."""
    rows, outs = x.shape[0], w.shape[0]
    if rows == 0 or outs == 0 or x.shape[1] == 0:
        return None
    if x.device.type == "cpu" and kernels.available():
        return _run_kernel(x, w, cfg, chunk)
    if x.device.type == "cuda":
        out = kernels.cuda_forward(x, w, chunk, cfg)
        if out is not None:
            n = out[1].tolist()
            return _ChainResult(y=out[0], overflow_events=n[0], overflow_outputs=n[1],
                                swamping_events=n[2], underflow_events=n[3])
    if cfg.kind == "float":
        return _run_fast_float(x, w, cfg, chunk)
    safe = _int_safe_rows(x, w, cfg)
    if not bool(safe.any()):
        return None
    # exact (integers below 2^53); + 0.0 turns a -0 into the chain's +0
    if bool(safe.all()):
        return _ChainResult(y=(x @ w.t()).add_(0.0))
    res = _run_chain(x[~safe], w, cfg, fast=False)
    y = torch.empty(rows, outs, dtype=torch.float64, device=x.device)
    y[safe], y[~safe] = (x[safe] @ w.t()).add_(0.0), res.y
    res.y = y
    return res


def _lanes(x: Tensor, chunk: int, nonzeros: tuple[Tensor, Tensor] | None
           ) -> tuple[Tensor, Tensor, Tensor | None, list[int]]:
    """Each (row, chunk) pair of ``x`` (R, nC * C) is a lane: a chain of up to ``C`` additions
    from zero. Returns the lanes' operands in accumulation order as ``(<= C, L)`` values and their
    columns of ``x`` (int32), where each lane went in that order (None: unsorted), and the steps
    of each sorted lane (``L = R * nC`` lanes, lane ``r * nC + c``, sorted by decreasing number
    of steps). Given ``nonzeros`` (the flat indices of ``x``'s nonzero entries, ascending, and
    their values), zero operands are left out (the rest moved up,
    zero-padded): adding an exact zero changes nothing (round to nearest never yields -0, so
    ``a + (+-0) == a`` bit for bit) and has no event, so this is exact."""
    width, dev = x.shape[1], x.device
    lanes = x.reshape(-1, chunk)
    n_lanes = lanes.shape[0]
    if nonzeros is None:
        cols = (torch.arange(chunk, dtype=torch.int32, device=dev)[:, None]
                + (torch.arange(n_lanes, dtype=torch.int32, device=dev) * chunk % width)[None])
        return lanes.t().contiguous(), cols, None, [chunk] * n_lanes
    flat, values = nonzeros  # flat = lane * C + k
    lane = flat // chunk
    steps = torch.bincount(lane, minlength=n_lanes)
    order = torch.argsort(steps, descending=True)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n_lanes, device=dev)
    pos = torch.arange(len(flat), device=dev) - (steps.cumsum(0) - steps)[lane]  # step within the lane
    dest = pos * n_lanes + slot[lane]
    longest = int(steps.max()) if n_lanes else 0
    vals = torch.zeros(longest, n_lanes, dtype=x.dtype, device=dev)
    vals.view(-1)[dest] = values
    cols = torch.zeros(longest, n_lanes, dtype=torch.int32, device=dev)
    cols.view(-1)[dest] = (flat % width).to(torch.int32)
    return vals, cols, slot, steps[order].tolist()


def _run_fast_float(x: Tensor, w: Tensor, cfg: AccumulatorConfig,
                    chunk: int) -> _ChainResult | None:
    """Floating-point chain, forward only. The chunks' chains run as independent lanes
    (:func:`_lanes`; zero products skipped under round to nearest), then the chunk results are
    added in chunk order, with the rounding of :class:`FloatFormat` as integer bit operations.
    No saturation is applied: when ``L`` (:func:`_l1_bound`), grown by the worst rounding,
    may exceed the largest value, every addition's exponent is checked to be below the top
    binade (``|s| < 2^emax``, so nothing overflowed), and None is returned if one is not.
    Events are counted with reductions: swamping ``(A(s) == a) & (s != a)`` as
    ``#(s != a) - #(A(s) != a)``, underflow ``(A(s) == 0) & (s != 0)`` as
    ``#(s != 0) - #(A(s) != 0)`` (``s == a`` implies ``A(s) == a``: ``a`` is representable)."""
    rows, k = x.shape
    outs = w.shape[0]
    fmt = cfg.float_format
    dev = x.device
    n_chunks = math.ceil(k / chunk)
    pad = n_chunks * chunk - k
    if pad:
        x, w = F.pad(x, (0, pad)), F.pad(w, (0, pad))
    # |A(a + p)| <= (|a| + |p|)(1 + 2^-52)(1 + 2^-M) + u, u the subnormal spacing
    u = 2.0 ** (fmt.min_exponent - fmt.man_bits)
    growth = ((1 + 2.0**-52) * (1 + 2.0**-fmt.man_bits)) ** (chunk + n_chunks) * (1 + 1e-6)
    xa, wa = x.abs(), w.abs()
    l1 = float((xa @ wa.amax(0)).max())  # as _l1_bound
    bound = (l1 * (1 + 1e-6) + (k + pad + n_chunks) * u) * growth
    check = bound > fmt.max_value
    top = (fmt.max_exponent + 1023) << 52  # the exponent field of 2^emax, in scratch's terms:
    if fmt.rounding != "nearest":
        top -= fmt.man_bits << 52
    exps: list[Tensor] = []  # with check: the largest exponent field of each addition
    # fl64(a + p) == a iff p == 0 when no non-zero product is below half an ulp of any
    # |a| < 2^(emax + 1) (which the bound guarantees or the check verifies)
    del xa
    nonzero = x != 0
    flat = nonzero.view(-1).nonzero().squeeze(1)
    nonzeros = (flat, x.reshape(-1)[flat])
    x_min = float(nonzeros[1].abs().amin()) if len(flat) else math.inf
    w_min = float(wa.masked_fill_(wa == 0, math.inf).amin())
    analytic = x_min * w_min > 2.0 ** (fmt.max_exponent + 1 - 52)
    nearest = fmt.rounding == "nearest"
    counts: dict[str, list[Tensor]] = {"s!=a": [], "r!=a": [], "s!=0": [], "r!=0": []}
    if analytic:  # #(p != 0) over all products
        # float64: exact for these counts, and CUDA has no integer matrix product
        counts["s!=a"].append((nonzero.sum(0).double() @ (w != 0).sum(0).double()).long())
    rnd = _fast_rounder(fmt)
    # round to nearest never makes a -0 here (a starts at +0; x - x = +0), so the int64 bit
    # patterns are zero exactly where the values are: a cheaper count
    bits = (lambda t: t.view(torch.int64)) if nearest else (lambda t: t)

    def add(acc: Tensor, s: Tensor, r: Tensor, diff: Tensor, sc: Tensor, exact: bool) -> None:
        rnd(s, r, sc)
        if check:
            exps.append(torch.amax(sc))
        if not exact:
            counts["s!=a"].append(torch.count_nonzero(bits(torch.sub(s, acc, out=diff))))
        counts["r!=a"].append(torch.count_nonzero(bits(torch.sub(r, acc, out=diff))))
        counts["s!=0"].append(torch.count_nonzero(bits(s)))
        counts["r!=0"].append(torch.count_nonzero(bits(r)))

    def overflowed() -> bool:
        return bool(exps) and int(torch.stack(exps).max()) >= top

    vals, cols, slot, steps = _lanes(x, chunk, nonzeros if nearest else None)
    del nonzero, nonzeros, flat
    w_cols = w.t().contiguous()  # (nC * C, O)
    n_lanes = rows * n_chunks
    sorted_parts = torch.empty(n_lanes, outs, dtype=torch.float64, device=dev)
    step = max(1, _FAST_BLOCK_ELEMENTS // outs)
    size = min(step, n_lanes) * outs
    bufs = [torch.empty(size, dtype=torch.float64, device=dev) for _ in range(5)]
    scratch = torch.empty(size, dtype=torch.int64, device=dev)
    for start in range(0, n_lanes, step):
        stop = min(n_lanes, start + step)
        acc, s, out, diff, wg = (b[:(stop - start) * outs].view(-1, outs) for b in bufs)
        sc = scratch[:(stop - start) * outs].view(-1, outs)
        acc.zero_()
        for j in range(steps[start]):  # lanes sorted by decreasing number of steps
            torch.index_select(w_cols, 0, cols[j, start:stop], out=wg)
            torch.addcmul(acc, vals[j, start:stop, None], wg, out=s)
            add(acc, s, out, diff, sc, analytic)
            acc, out = out, acc
        sorted_parts[start:stop] = acc
        if overflowed():
            return None
    if n_chunks == 1:
        y = sorted_parts if slot is None else sorted_parts.index_select(0, slot)
    else:  # add the chunk results in order; chunk c of row r is sorted lane slot[r * nC + c]
        lane_of = torch.arange(rows * n_chunks, device=dev) if slot is None else slot
        lane_of = lane_of.view(rows, n_chunks).t().contiguous()
        y = torch.empty(rows, outs, dtype=torch.float64, device=dev)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            total, part, s, out, diff = (b[:(stop - start) * outs].view(-1, outs) for b in bufs)
            sc = scratch[:(stop - start) * outs].view(-1, outs)
            torch.index_select(sorted_parts, 0, lane_of[0, start:stop], out=total)
            for c in range(1, n_chunks):
                torch.index_select(sorted_parts, 0, lane_of[c, start:stop], out=part)
                torch.add(total, part, out=s)
                add(total, s, out, diff, sc, False)
                total, out = out, total
            y[start:stop] = total
    if overflowed():
        return None
    n = {key: int(torch.stack(v).sum()) if v else 0 for key, v in counts.items()}
    return _ChainResult(y=y, swamping_events=n["s!=a"] - n["r!=a"],
                        underflow_events=n["s!=0"] - n["r!=0"])
