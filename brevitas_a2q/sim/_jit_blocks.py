"""numba kernels of :mod:`brevitas_a2q.sim.saturating` (imported only through
:mod:`brevitas_a2q.sim.kernels`, which falls back when numba is missing): the saturating integer
chain one block of steps at a time, for every row and output.

For a block of steps ``[k0, k1)``, ``sums[r, 0, o]`` is its exact sum ``S`` and
``sums[r, 1, o]`` its sum of absolute products ``A`` (from a matrix product). Every partial sum
of the block, started from ``a``, lies in ``[a - (A - S) / 2, a + (A + S) / 2]`` (the sums of
the negative and of the positive products). Where that interval is inside the range the block
has no event and ends at ``a + S``; only the other (row, output) pairs run it step by step. Every
value is an integer below 2^53, so each float64 operation is exact and the result equals the
step-by-step chain bit for bit, event counts included.

The fine-grained gradients (Blumenfeld et al., ICLR 2024, Sec. 4) are taken as the exact
gradient minus the cut products' share: ``cut`` subtracts ``g[r, o] * w[o, k]`` from
``gx[r, k]`` and ``g[r, o] * x[r, k]`` from ``gw[o, k]``, each task of rows into its own ``gw``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from brevitas_a2q.sim._jit import wide_vectors

opts = {"cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}


@njit(inline="always", **opts)
def block_pass(a, s_b, a_b, lo, hi, ok):
    """Vectorized over outputs: add the block sum where the block provably has no event;
    ``ok`` marks those. Returns how many outputs must run the block step by step."""
    wide_vectors()
    n_fail = 0
    for o in range(a.shape[0]):
        s = np.float64(s_b[o])
        t = np.float64(a_b[o])
        good = (a[o] + 0.5 * (t + s) <= hi) & (a[o] - 0.5 * (t - s) >= lo)
        ok[o] = good
        a[o] = a[o] + s if good else a[o]
        n_fail += not good
    return n_fail


@njit(inline="always", **opts)
def cut(gx_r, gw_o, g, xg_r, wg_o, k0, k1):
    """Take products ``k0 <= k < k1`` of one output (gradient ``g``) out of the gradients."""
    wide_vectors()
    for k in range(k0, k1):
        gx_r[k] -= g * wg_o[k]
        gw_o[k] -= g * xg_r[k]


@njit(inline="always", **opts)
def steps(v, xr, wo, k0, k1, lo, hi, cut_events, gx_r, gw_o, g, xg_r, wg_o):
    """The chain ``v = clamp(v + x_k w_k)`` over ``k0 <= k < k1``: ``(v, events, last event's
    k or -1)``; with ``cut_events``, each product whose addition saturated is cut."""
    wide_vectors()
    n = 0
    last = -1
    # in int64: the values are integers below 2^53 (exact either way), and integer
    # arithmetic needs no conversions
    acc = np.int64(v)
    lo_i, hi_i = np.int64(lo), np.int64(hi)
    for k in range(k0, k1):
        s = acc + np.int64(xr[k]) * np.int64(wo[k])
        acc = min(max(s, lo_i), hi_i)
        if acc != s:
            n += 1
            last = k
            if cut_events:
                cut(gx_r, gw_o, g, xg_r, wg_o, k, k + 1)
    return np.float64(acc), n, last


@njit(inline="always", **opts)
def mark_combinations(comb, last_comb, c, n):
    """``last_comb`` takes chunk ``c`` where its combination saturated (``comb``; ``n`` such
    outputs, none to mark where 0)."""
    if n:
        for o in range(comb.shape[0]):
            if comb[o]:
                last_comb[o] = c


@njit(inline="always", **opts)
def combine_row(total, a, c, lo, hi, over_any, comb, last_comb):
    """Add chunk ``c``'s results ``a`` to ``total`` (one row; c = 0: copy); ``comb``: that
    addition saturated, and then ``last_comb`` is set to ``c``. Returns the events."""
    wide_vectors()
    if c == 0:
        total[:] = a
        comb[:] = False
        return 0
    n = 0
    for o in range(total.shape[0]):
        s = total[o] + a[o]
        over = (s > hi) | (s < lo)
        total[o] = min(max(s, lo), hi)
        comb[o] = over
        over_any[o] |= over
        n += over
    mark_combinations(comb, last_comb, c, n)
    return n


@njit(inline="always", **opts)
def chunk_pass(total, a, s_b, a_b, c, lo, hi, ok, over_any, comb, last_comb):
    """A chunk that is one block, from 0, in one pass (one row): where :func:`block_pass`'s
    test passes, its sum is added to ``total`` as :func:`combine_row` adds it; the others get
    ``ok`` False and ``a`` 0, for :func:`failed_steps` and :func:`combine_failed`. Returns
    ``(failed outputs, combination events)``."""
    wide_vectors()
    n_fail = 0
    n = 0
    for o in range(total.shape[0]):
        s = np.float64(s_b[o])
        t = np.float64(a_b[o])
        good = (0.5 * (t + s) <= hi) & (0.5 * (s - t) >= lo)
        ok[o] = good
        n_fail += not good
        a[o] = 0.0
        summed = s if c == 0 else total[o] + s
        over = good & ((summed > hi) | (summed < lo))
        total[o] = min(max(summed, lo), hi) if good else total[o]
        comb[o] = over
        over_any[o] |= over
        n += over
    mark_combinations(comb, last_comb, c, n)
    return n_fail, n


@njit(inline="always", **opts)
def combine_failed(total, a, ok, c, lo, hi, over_any, comb, last_comb):
    """:func:`combine_row` for the outputs that failed :func:`chunk_pass`'s test, once their
    chunk has run step by step. Returns the events."""
    wide_vectors()
    n = 0
    for o in range(total.shape[0]):
        if ok[o]:
            continue
        if c == 0:
            total[o] = a[o]
            continue
        s = total[o] + a[o]
        total[o] = min(max(s, lo), hi)
        if (s > hi) | (s < lo):
            comb[o] = True
            over_any[o] = True
            last_comb[o] = c
            n += 1
    return n


@njit(inline="always", **opts)
def failed_steps(x, w, r, k0, k1, lo, hi, ar, ok, over_any, last_k, counts, idx, v, steps_nz,
                 cut_events, g, xg, wg, gx, gw):
    """The block step by step for the outputs of row ``r`` that failed the range test, all of
    them at each step: their chains are independent, so their additions interleave instead of
    each waiting on the one before. Only the steps with a nonzero input run (listed first,
    without branches): a zero product leaves a value in range unchanged. With ``cut_events``,
    each product whose addition saturated is cut. In int64: the values are integers below
    2^53 (exact either way), and integer arithmetic needs no conversions."""
    wide_vectors()
    n = 0
    for o in range(ar.shape[0]):
        if not ok[o]:
            idx[n] = o
            v[n] = np.int64(ar[o])
            n += 1
    xr = x[r]
    m = 0
    for k in range(k0, k1):
        steps_nz[m] = k
        m += xr[k] != 0
    lo_i, hi_i = np.int64(lo), np.int64(hi)
    for i in range(m):
        k = steps_nz[i]
        xk = np.int64(xr[k])
        for j in range(n):
            o = idx[j]
            s = v[j] + xk * np.int64(w[o, k])
            clamped = min(max(s, lo_i), hi_i)
            v[j] = clamped
            if clamped != s:
                counts[r] += 1
                over_any[r, o] = True
                last_k[r, o] = k
                if cut_events:
                    cut(gx[r], gw[o], g[r, o], xg[r], wg[o], k, k + 1)
    for j in range(n):
        ar[idx[j]] = np.float64(v[j])


@njit(inline="always", **opts)
def _advance(x, w, sums, k0, k1, first, c, lo, hi, a, total, over_any, comb, last_comb, last_k,
            counts, cut_events, g, xg, wg, gx, gw_parts):
    """Run block ``[k0, k1)`` for every row and output: ``a`` (R, O) the chains' values (set
    to 0 first where ``first``, a chunk's start), ``over_any`` (R, O) set where an addition
    saturated, ``last_k`` (R, O) the step of the last saturation so far, ``counts`` (R,) the
    rows' events. ``c >= 0``: the block ends chunk ``c``, added to ``total`` (R, O) as
    :func:`combine_row`. ``cut_events``: cut each saturated product (``immediate`` without
    chunks)."""
    rows, outs = a.shape
    n_tasks = gw_parts.shape[0]
    per_task = (rows + n_tasks - 1) // n_tasks
    for task in prange(n_tasks):
        gw = gw_parts[task]
        ok = np.empty(outs, dtype=np.bool_)
        idx = np.empty(outs, dtype=np.int64)
        v = np.empty(outs, dtype=np.int64)
        steps_nz = np.empty(k1 - k0, dtype=np.int64)
        for r in range(task * per_task, min(rows, (task + 1) * per_task)):
            ar = a[r]
            if first and c >= 0:  # a whole chunk: combined in the same pass where it can be
                n_fail, n_comb = chunk_pass(total[r], ar, sums[r, 0], sums[r, 1], c, lo, hi,
                                            ok, over_any[r], comb[r], last_comb[r])
                counts[r] += n_comb
                if n_fail > 0:
                    failed_steps(x, w, r, k0, k1, lo, hi, ar, ok, over_any, last_k, counts, idx,
                                 v, steps_nz, cut_events, g, xg, wg, gx, gw)
                    counts[r] += combine_failed(total[r], ar, ok, c, lo, hi, over_any[r],
                                                comb[r], last_comb[r])
                continue
            if first:
                ar[:] = 0.0
            if block_pass(ar, sums[r, 0], sums[r, 1], lo, hi, ok) > 0:
                failed_steps(x, w, r, k0, k1, lo, hi, ar, ok, over_any, last_k, counts, idx, v,
                             steps_nz, cut_events, g, xg, wg, gx, gw)
            if c >= 0:
                counts[r] += combine_row(total[r], ar, c, lo, hi, over_any[r], comb[r],
                                         last_comb[r])


@njit(inline="always", **opts)
def _chunk_cuts(x, w, k0, k1, lo, hi, whole, last_k, recursive, g, xg, wg, gx, gw_parts):
    """The cuts of chunk ``[k0, k1)`` once its combination is known: every product where
    ``whole`` (R, O); else, where the chunk saturated (``last_k >= k0``), ``recursive`` every
    product up to the last saturation, ``immediate`` each saturated one (replayed, so one block
    per chunk). Without chunks, ``recursive`` is this over ``[0, K)`` with no ``whole``."""
    rows, outs = whole.shape
    n_tasks = gw_parts.shape[0]
    per_task = (rows + n_tasks - 1) // n_tasks
    for task in prange(n_tasks):
        gw = gw_parts[task]
        for r in range(task * per_task, min(rows, (task + 1) * per_task)):
            for o in range(outs):
                if whole[r, o]:
                    cut(gx[r], gw[o], g[r, o], xg[r], wg[o], k0, k1)
                elif last_k[r, o] >= k0:
                    if recursive:
                        cut(gx[r], gw[o], g[r, o], xg[r], wg[o], k0, last_k[r, o] + 1)
                    else:
                        steps(0.0, x[r], w[o], k0, k1, lo, hi, True, gx[r], gw[o], g[r, o],
                              xg[r], wg[o])


@njit(inline="always", **opts)
def _stepwise(x, w, chunk, lo, hi, a, total, over_any, comb, last_comb, last_k, counts):
    """Every row's chains step by step, chunk by chunk, all outputs at each step
    (:func:`failed_steps` with every output failing), each chunk then added to ``total`` as
    :func:`combine_row`; the arrays as :func:`advance`'s. For layers with too few (row, output)
    pairs, or too short chunks, for blocks."""
    rows, outs = a.shape
    k_len = x.shape[1]
    n_chunks = (k_len + chunk - 1) // chunk
    for r in prange(rows):
        ok = np.zeros(outs, dtype=np.bool_)
        idx = np.empty(outs, dtype=np.int64)
        v = np.empty(outs, dtype=np.int64)
        steps_nz = np.empty(chunk, dtype=np.int64)
        no_grad = np.zeros((1, 1))
        ar = a[r]
        for c in range(n_chunks):
            ar[:] = 0.0
            failed_steps(x, w, r, c * chunk, min((c + 1) * chunk, k_len), lo, hi, ar, ok,
                         over_any, last_k, counts, idx, v, steps_nz, False, no_grad, no_grad,
                         no_grad, no_grad, no_grad)
            if n_chunks > 1:
                counts[r] += combine_row(total[r], ar, c, lo, hi, over_any[r], comb[r],
                                         last_comb[r])


# Each kernel twice: over threads (numba's workqueue pool, started at every call), and in the
# calling thread where one thread is asked for (the block method calls its kernels once per
# block, and the pool's starts cost more than the work). Distinct functions, so that numba's
# cache keeps both.


@njit(parallel=True, **opts)
def advance(x, w, sums, k0, k1, first, c, lo, hi, a, total, over_any, comb, last_comb, last_k,
            counts, cut_events, g, xg, wg, gx, gw_parts):
    _advance(x, w, sums, k0, k1, first, c, lo, hi, a, total, over_any, comb, last_comb, last_k,
             counts, cut_events, g, xg, wg, gx, gw_parts)


@njit(**opts)
def advance_serial(x, w, sums, k0, k1, first, c, lo, hi, a, total, over_any, comb, last_comb,
                   last_k, counts, cut_events, g, xg, wg, gx, gw_parts):
    _advance(x, w, sums, k0, k1, first, c, lo, hi, a, total, over_any, comb, last_comb, last_k,
             counts, cut_events, g, xg, wg, gx, gw_parts)


@njit(parallel=True, **opts)
def chunk_cuts(x, w, k0, k1, lo, hi, whole, last_k, recursive, g, xg, wg, gx, gw_parts):
    _chunk_cuts(x, w, k0, k1, lo, hi, whole, last_k, recursive, g, xg, wg, gx, gw_parts)


@njit(**opts)
def chunk_cuts_serial(x, w, k0, k1, lo, hi, whole, last_k, recursive, g, xg, wg, gx, gw_parts):
    _chunk_cuts(x, w, k0, k1, lo, hi, whole, last_k, recursive, g, xg, wg, gx, gw_parts)


@njit(parallel=True, **opts)
def stepwise(x, w, chunk, lo, hi, a, total, over_any, comb, last_comb, last_k, counts):
    _stepwise(x, w, chunk, lo, hi, a, total, over_any, comb, last_comb, last_k, counts)


@njit(**opts)
def stepwise_serial(x, w, chunk, lo, hi, a, total, over_any, comb, last_comb, last_k, counts):
    _stepwise(x, w, chunk, lo, hi, a, total, over_any, comb, last_comb, last_k, counts)
