"""numba kernels of :mod:`brevitas_a2q.sim.kernels` (imported only through it, which falls back
when numba is missing). One compiled function per rounding mode (0 integer saturation, 1 round
to nearest even, 2 round toward zero) and gradient mode, so that the mode is a constant inside
the vectorized loops."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from brevitas_a2q.sim import _jit_cache

_jit_cache.install()  # before any kernel: cache keys that cover every _jit*.py (_jit_events
# and _jit_blocks import this module first)


@intrinsic
def f2i(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def i2f(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def cttz(typingctx, x):
    """The number of trailing zero bits of a non-zero ``uint64``."""
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.int64(types.uint64), codegen


@intrinsic
def wide_vectors(typingctx):
    """Lets LLVM vectorize the calling function with 512-bit registers where the CPU has them
    (its ``"prefer-vector-width"`` attribute). LLVM's cost model keeps loops at 256 bits on
    AVX-512 CPUs by default; these loops are arithmetic on data in cache, and ran faster at 512
    (``benchmarks/accumulator_speed.py``, before and after). It emits no instruction. Called
    from the helpers that the hot loops inline, so that the attribute lands on the function that
    runs them, a kernel or the outlined body of its parallel loop."""
    def codegen(context, builder, signature, args):
        # a string attribute, which llvmlite's known-name check does not list
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


EXP_MASK = 0x7FF << 52
opts = {"cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}
# the forward chains' a + x * w as one fused multiply-add: the same result, as each product is
# exact in float64 (so are the rounding's power-of-two products)
chain_opts = {**opts, "fastmath": {"contract"}}


@njit(inline="always", **opts)
def rnd(s, mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    """A(s): (rounded, overflowed). Floating point with ``check`` False: overflow is
    impossible (:func:`brevitas_a2q.sim.fast.may_overflow`), no comparison with the largest
    value."""
    wide_vectors()
    if mode == 0:
        if s > hi:
            return hi, True
        if s < lo:
            return lo, True
        return s, False
    e = f2i(s) & EXP_MASK
    if mode == 1:
        if e < min_bits:
            e = min_bits
        c = i2f(e) * magic
        r = (s + c) - c
    else:
        e = e - (man_bits << 52)
        if e < min_bits:
            e = min_bits
        q = i2f(e)
        r = np.trunc(s / q) * q
    if not check:  # the caller proved that no addition reaches the largest value
        return r, False
    over = abs(r) > maxv
    return (np.copysign(maxv, r) if over else r), over


TILE = 8  # rows advanced together: each step's weight row w_t[k] is read once per tile


@njit(inline="always", **opts)
def add_events(a, s, mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    """One accumulator addition: ``(A(s), overflow, swamping, underflow)``."""
    q, over = rnd(s, mode, lo, hi, man_bits, min_bits, magic, maxv, check)
    swamp = (mode != 0) & (q == a) & (s != a) & (not over)
    under = (mode != 0) & (q == 0.0) & (s != 0.0)
    return q, over, swamp, under


@njit(inline="always", **opts)
def add_range(gx_i, gw_o, gro, xg_r, wg_o, k0, k1):
    """Add products ``k0 <= k < k1`` of one output (gradient ``gro``) to the gradients."""
    wide_vectors()
    # on slices, from 0: a loop over range(k0, k1) indexes with a possibly negative k, whose
    # wraparound checks made this loop 5x slower
    gx_s, gw_s, xg_s, wg_s = gx_i[k0:k1], gw_o[k0:k1], xg_r[k0:k1], wg_o[k0:k1]
    for k in range(gx_s.size):
        gx_s[k] += gro * wg_s[k]
        gw_s[k] += gro * xg_s[k]


@njit(inline="always", **opts)
def cut_step(t, i, r, k, ev_t, stamp, grads):
    """Minus product ``k`` of row ``i`` for the outputs with ``ev_t[o] == stamp``
    (vectorized over outputs) from ``gw_t[k, :]`` of ``grads = (g, xg, wg_t, gw_t)``; returns
    the amount to take from ``gx[i, k]``."""
    # distinct names: inlined into the backward kernel's parallel loop, a local reassigned
    # under the name of one of its arrays would stand for a private copy
    grad_y, factor_x, factor_w_t, grad_w_t = grads
    wide_vectors()
    xk = factor_x[r, k]
    g_cut = 0.0
    for o in range(grad_y.shape[1]):
        cut = grad_y[i, o] if ev_t[o] == stamp else 0.0
        g_cut += cut * factor_w_t[k, o]
        grad_w_t[k, o] -= cut * xk
    return g_cut


@njit(inline="always", **opts)
def bit_width(n):
    """Bits that hold ``0 .. n - 1``."""
    bits = 1
    while (1 << bits) < n:
        bits += 1
    return bits


@njit(**opts)  # (not inlined: called once per step, it keeps every chain kernel smaller)
def reserve(entries, count, most):
    """The event log's entries with room for ``most`` more (grown by half where full)."""
    n = count[0]
    if n + most <= entries.size:
        return entries
    grown = np.empty(max(entries.size + entries.size // 2, n + most), dtype=np.int32)
    grown[:n] = entries[:n]
    return grown


@njit(**opts)  # (not inlined, as reserve)
def log_rows(entries, count, words, rows_with_events, k, k_bits, o_bits):
    """Append the events of step ``k`` of the tile's rows ``t`` with bit ``t`` set in
    ``rows_with_events`` to the log ``entries[:count[0]]``: ``(t << k_bits | k) << o_bits | o``
    for every output ``o`` flagged in ``words[t]`` (the outputs' flag bytes, eight to a word).
    Without branches on the flags (they are unpredictable): each word's lowest flag is written
    whether or not it is set, and counted if it is; ``entries`` needs one spare place."""
    n = count[0]
    while rows_with_events:
        t = cttz(np.uint64(rows_with_events))
        rows_with_events &= rows_with_events - 1
        base = ((t << k_bits) | k) << o_bits
        for i in range(words.shape[1]):
            word = words[t, i]
            entries[n] = base + 8 * i + (cttz(word | np.uint64(1 << 63)) >> 3)
            n += word != 0
            word &= word - np.uint64(1)
            while word:  # rare: two events among eight outputs
                entries[n] = base + 8 * i + (cttz(word) >> 3)
                n += 1
                word &= word - np.uint64(1)
    count[0] = n


@njit(inline="always", **opts)
def chunk_steps(x, w_t, w_k, rows, t0, nt, c, chunk, acc, over_any, counts, ev, step_ev, stamp,
                last_step, record, grads, gx, log, mode, lo, hi, man_bits, min_bits, magic, maxv,
                check):
    """The chain of chunk ``c`` for rows ``rows[t0:t0 + nt]`` into ``acc`` (TILE, O), from 0
    (``w_k``: room for one step's weights in float64, (O,)).
    ``record`` 1: ``ev[t, j, o] = stamp`` (TILE, chunk, O) at each step with an event and
    ``step_ev[t, j] = stamp`` (TILE, chunk) at each step with any (no reset needed: ``stamp``
    is new for every tile and chunk); 2: the last event's step into ``last_step[t, c, o]``
    (TILE, nC, O); 3 (``immediate``, one chunk: no combination can cut more): right after each
    step with an event, its cut products out of ``gx`` and ``grads = (g, xg, wg_t, gw_t)``
    (:func:`cut_step`; ``ev[t, 0]`` holds the step's events); 4: each event into the log
    ``(flags, words, entries, count)`` (:func:`log_rows`; the entry of output ``o``, row
    ``t`` of the tile, step ``k`` is ``(t << kb | k) << ob | o``, ``kb`` and ``ob`` the
    :func:`bit_width` of ``K + n_chunks`` and ``O``). Returns the log's entries (grown where
    full)."""
    k_len, outs = w_t.shape
    skip_zero = mode != 2
    flags, words, entries, count = log
    k_bits = bit_width(k_len + (k_len + chunk - 1) // chunk)
    o_bits = bit_width(outs)
    for t in range(nt):
        for o in range(outs):
            acc[t, o] = 0.0
        if record == 2:
            for o in range(outs):
                last_step[t, c, o] = -1
    for j in range(chunk):
        k = c * chunk + j
        if k >= k_len and skip_zero:
            break  # zero padding: no change, no event (kernels module docstring)
        if record == 4:
            entries = reserve(entries, count, nt * outs + 1)
        rows_with_events = 0  # bit t: row t had one at this step
        if k < k_len:  # the step's weights in float64, once for the tile's rows
            for o in range(outs):
                w_k[o] = w_t[k, o]
        for t in range(nt):
            xk = np.float64(x[rows[t0 + t], k]) if k < k_len else 0.0
            if xk == 0.0 and skip_zero:
                continue
            n_over = 0
            n_swamp = 0
            n_under = 0
            for o in range(outs):
                a = acc[t, o]
                s = a + xk * w_k[o] if k < k_len else a + 0.0  # (an exact product)
                q, over, swamp, under = add_events(a, s, mode, lo, hi, man_bits, min_bits,
                                                   magic, maxv, check)
                n_over += over
                n_swamp += swamp
                n_under += under
                if mode == 0 or check:  # (else no addition can overflow)
                    over_any[t, o] |= over
                if record == 4:
                    flags[t, o] = over | swamp | under
                elif record != 0 and (over or swamp or under):
                    if record == 1:
                        ev[t, j, o] = stamp
                    elif record == 3:
                        ev[t, 0, o] = stamp * chunk + j  # new for every step
                    else:
                        last_step[t, c, o] = j
                acc[t, o] = q
            if record == 1 and n_over + n_swamp + n_under > 0:
                step_ev[t, j] = stamp
            if record == 3 and n_over + n_swamp + n_under > 0 and k < k_len:
                gx[t0 + t, k] -= cut_step(t, t0 + t, rows[t0 + t], k, ev[t, 0],
                                          stamp * chunk + j, grads)
            if record == 4 and k < k_len:
                rows_with_events |= (n_over + n_swamp + n_under > 0) << t
            counts[t, 0] += n_over
            counts[t, 2] += n_swamp
            counts[t, 3] += n_under
        if record == 4:  # the step's events, every row of the tile at once
            log_rows(entries, count, words, rows_with_events, k, k_bits, o_bits)
    return entries


@njit(inline="always", **opts)
def combine(acc, total, nt, c, over_any, counts, comb, last_comb, record, log, k_len, n_chunks,
            mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    """Add chunk ``c``'s results ``acc`` to ``total`` (c = 0: copy). ``record`` 1: the events
    into ``comb`` (TILE, O); 2: ``c`` into ``last_comb`` (TILE, O) where one occurred; 4: into
    the log as step ``K + c`` (:func:`chunk_steps`). Returns the log's entries."""
    outs = acc.shape[1]
    flags, words, entries, count = log
    if record == 4 and c > 0:
        entries = reserve(entries, count, nt * outs + 1)
    k_bits = bit_width(k_len + n_chunks)
    o_bits = bit_width(outs)
    rows_with_events = 0
    for t in range(nt):
        if c == 0:
            for o in range(outs):
                total[t, o] = acc[t, o]
                if record == 1:
                    comb[t, o] = False
                elif record == 2:
                    last_comb[t, o] = -1
            continue
        n_over = 0
        n_swamp = 0
        n_under = 0
        for o in range(outs):
            a = total[t, o]
            q, over, swamp, under = add_events(a, a + acc[t, o], mode, lo, hi, man_bits,
                                               min_bits, magic, maxv, check)
            n_over += over
            n_swamp += swamp
            n_under += under
            if mode == 0 or check:
                over_any[t, o] |= over
            event = over or swamp or under
            if record == 1:
                comb[t, o] = event
            elif record == 2 and event:
                last_comb[t, o] = c
            elif record == 4:
                flags[t, o] = event
            total[t, o] = q
        if record == 4:
            rows_with_events |= (n_over + n_swamp + n_under > 0) << t
        counts[t, 0] += n_over
        counts[t, 2] += n_swamp
        counts[t, 3] += n_under
    if record == 4:
        log_rows(entries, count, words, rows_with_events, k_len + c, k_bits, o_bits)
    return entries


@njit(inline="always", **opts)
def count_outputs(over_any, nt, counts):
    for t in range(nt):
        n_any = 0
        for o in range(over_any.shape[1]):
            n_any += over_any[t, o]
            over_any[t, o] = False
        counts[t, 1] += n_any


@njit(inline="always", **opts)
def forward_tile(x, w_t, rows, t0, nt, chunk, y, counts, last, log, record, mode, lo, hi,
                 man_bits, min_bits, magic, maxv, check):
    """The chain of rows ``rows[t0:t0 + nt]`` into ``y`` and ``counts``; ``record`` 2: each
    output's last event's step into ``last``; 4: the events into ``log`` (:func:`chunk_steps`).
    Returns the log's entries."""
    k_len, outs = w_t.shape
    n_chunks = (k_len + chunk - 1) // chunk
    no_b = np.zeros((1, 1), dtype=np.bool_)
    no_i = np.zeros((1, 1, 1), dtype=np.int64)
    no_f = np.zeros((1, 1))
    no_grads = (no_f, no_f, no_f, no_f)  # never read: no cuts in the forward pass
    acc = np.empty((TILE, outs))
    w_k = np.empty(outs)
    total = y[t0:t0 + nt]
    over_any = np.zeros((TILE, outs), dtype=np.bool_)
    last_step = np.empty((TILE, 1, outs), dtype=np.int32)
    tc = counts[t0:t0 + nt]
    flags, words, entries, count = log
    for c in range(n_chunks):
        entries = chunk_steps(x, w_t, w_k, rows, t0, nt, c, chunk, acc, over_any, tc, no_i, no_i[0],
                              0, last_step, record, no_grads, no_f,
                              (flags, words, entries, count), mode, lo, hi, man_bits, min_bits,
                              magic, maxv, check)
        entries = combine(acc, total, nt, c, over_any, tc, no_b, no_i[0], record & 4,  # (4 or 0)
                          (flags, words, entries, count), k_len, n_chunks, mode, lo, hi,
                          man_bits, min_bits, magic, maxv, check)
    if record == 2:
        last[t0:t0 + nt] = last_step[:nt, 0]
    count_outputs(over_any, nt, tc)
    return entries


@njit(inline="always", **opts)
def _forward_body(x, w_t, rows, chunk, mode, lo, hi, man_bits, min_bits, magic, maxv, check,
                  last, record):
    """The chain, parallel over tiles of rows; ``record`` 2 (a constant: a runtime flag here
    costs the loop its vector code), one chunk only: each output's last event's step into
    ``last`` (n, O) int32 (what ``recursive`` needs of the chain, :func:`recursive_from_last`)."""
    n = rows.shape[0]
    y = np.empty((n, w_t.shape[1]))
    counts = np.zeros((n, 4), dtype=np.int64)
    # never written (an array packed in a tuple and written inside a parallel loop is not
    # written back)
    no_log = (np.zeros((1, 8), dtype=np.uint8), np.zeros((1, 1), dtype=np.uint64),
              np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int64))
    for tile in prange((n + TILE - 1) // TILE):
        forward_tile(x, w_t, rows, tile * TILE, min(TILE, n - tile * TILE), chunk, y, counts,
                     last, no_log, record, mode, lo, hi, man_bits, min_bits, magic, maxv, check)
    return y, counts


@njit(inline="always", **opts)
def recursive_cuts(t, i, r, n_chunks, chunk, k_len, g, xg, wg, gx, gw, last_step, last_comb,
                   use_exact):
    """``recursive``, every output of row ``i``: :func:`recursive_output_cuts`."""
    for o in range(g.shape[1]):
        recursive_output_cuts(t, i, r, o, n_chunks, chunk, k_len, g, xg, wg, gx, gw, last_step,
                              last_comb, use_exact)


@njit(inline="always", **opts)
def recursive_output_cuts(t, i, r, o, n_chunks, chunk, k_len, g, xg, wg, gx, gw, last_step,
                          last_comb, use_exact):
    """``recursive``: product ``j`` of chunk ``c`` is cut where ``j <= last_step[c]`` or
    ``c <= last_comb``. The shorter of the two: minus the cut products (with the exact
    gradient, ``use_exact``), or the kept ones alone (without it); adjacent ranges are taken
    as one."""
    gro = g[i, o]
    lc = last_comb[t, o]
    cut_to = min((lc + 1) * chunk, k_len)  # every chunk up to the last combination event
    n_cut = cut_to
    for c in range(lc + 1, n_chunks):
        n_cut += min(last_step[t, c, o] + 1, k_len - c * chunk)
    exact = 2 * n_cut <= k_len
    use_exact[i, o] = exact
    if gro == 0.0:
        return
    sign = -gro if exact else gro
    start, stop = (0 if exact else cut_to), cut_to  # the open range of products to take
    for c in range(lc + 1, n_chunks):
        k0 = c * chunk
        split = min(k0 + last_step[t, c, o] + 1, k_len)  # cut [k0, split), keep the rest
        lo_k, hi_k = (k0, split) if exact else (split, min(k0 + chunk, k_len))
        if lo_k == hi_k:
            continue
        if lo_k != stop:
            add_range(gx[i], gw[o], sign, xg[r], wg[o], start, stop)
            start = lo_k
        stop = hi_k
    add_range(gx[i], gw[o], sign, xg[r], wg[o], start, stop)


@njit(inline="always", **opts)
def immediate_cuts(t, i, r, c, chunk, k_len, g, xg, wg, wg_t, gx, gw, gw_t, ev, step_ev, stamp,
                   comb):
    """``immediate``, chunk ``c`` of one row: minus the products whose addition had an event
    (vectorized over outputs, at the steps that had any), and all of the chunk's products of
    an output whose combination had one."""
    k0 = c * chunk
    k1 = min(k0 + chunk, k_len)
    for j in range(k1 - k0):
        if step_ev[t, j] != stamp:
            continue
        k = k0 + j
        xk = xg[r, k]
        g_cut = 0.0
        for o in range(g.shape[1]):
            cut = g[i, o] if ev[t, j, o] == stamp and not comb[t, o] else 0.0
            g_cut += cut * wg_t[k, o]
            gw_t[k, o] -= cut * xk
        gx[i, k] -= g_cut
    if c == 0:
        return  # the first chunk's result is copied: no combination event
    for o in range(g.shape[1]):
        if comb[t, o]:
            add_range(gx[i], gw[o], -g[i, o], xg[r], wg[o], k0, k1)


@njit(inline="always", **opts)
def _backward_body(x, w_t, xg, wg, g, rows, chunk, recursive, n_blocks, mode, lo, hi,
                   man_bits, min_bits, magic, maxv, check):
    """The fine-grained gradients (module docstring of :mod:`brevitas_a2q.sim`) as corrections
    to the exact gradient: re-run each row's chain recording its events, then ``gx`` (n, K),
    ``gw`` (O, K) and ``use_exact`` (n, O) such that the mode's gradient is the exact gradient
    of the outputs where ``use_exact``, plus ``gx``, ``gw``. Immediate: per chunk, its step
    events and its combination event, then minus its cut products. Recursive: the whole chain
    (last event per chunk, last combination event), then :func:`recursive_cuts`."""
    k_len, outs = w_t.shape
    n_chunks = (k_len + chunk - 1) // chunk
    n = rows.shape[0]
    gx = np.zeros((n, k_len), dtype=xg.dtype)
    use_exact = np.ones((n, outs), dtype=np.bool_)
    # ranges of k (recursive, chunk cuts); in the factors' type, as the gradient is
    gw_parts = np.zeros((n_blocks, outs, k_len), dtype=xg.dtype)
    wg_t = np.ascontiguousarray(wg.T) if not recursive else wg[:1, :1]
    gw_t_parts = np.zeros((n_blocks, k_len, outs) if not recursive else (n_blocks, 1, 1),
                          dtype=xg.dtype)
    n_tiles = (n + TILE - 1) // TILE
    per_block = (n_tiles + n_blocks - 1) // n_blocks
    no_log = (np.zeros((1, 8), dtype=np.uint8), np.zeros((1, 1), dtype=np.uint64),
              np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int64))  # never written
    for b in prange(n_blocks):
        acc = np.empty((TILE, outs))
        w_k = np.empty(outs)
        total = np.empty((TILE, outs))
        over_any = np.zeros((TILE, outs), dtype=np.bool_)
        counts = np.zeros((TILE, 4), dtype=np.int64)
        ev = np.zeros((TILE, chunk if n_chunks > 1 and not recursive else 1, outs),
                      dtype=np.int64)
        step_ev = np.zeros((TILE, 1 if recursive else chunk), dtype=np.int32)
        comb = np.zeros((TILE, outs), dtype=np.bool_)
        last_step = np.zeros((TILE, n_chunks if recursive else 1, outs), dtype=np.int32)
        last_comb = np.zeros((TILE, outs), dtype=np.int32)
        gw = gw_parts[b]
        gw_t = gw_t_parts[b]
        grads = (g, xg, wg_t, gw_t)
        for tile in range(b * per_block, min(n_tiles, (b + 1) * per_block)):
            t0 = tile * TILE
            nt = min(TILE, n - t0)
            for c in range(n_chunks):
                stamp = tile * n_chunks + c + 1
                if recursive:
                    chunk_steps(x, w_t, w_k, rows, t0, nt, c, chunk, acc, over_any, counts, ev,
                                step_ev, stamp, last_step, 2, grads, gx, no_log, mode, lo, hi,
                                man_bits, min_bits, magic, maxv, check)
                elif n_chunks == 1:  # the cuts as the chain goes
                    chunk_steps(x, w_t, w_k, rows, t0, nt, c, chunk, acc, over_any, counts, ev,
                                step_ev, stamp, last_step, 3, grads, gx, no_log, mode, lo, hi,
                                man_bits, min_bits, magic, maxv, check)
                else:
                    chunk_steps(x, w_t, w_k, rows, t0, nt, c, chunk, acc, over_any, counts, ev,
                                step_ev, stamp, last_step, 1, grads, gx, no_log, mode, lo, hi,
                                man_bits, min_bits, magic, maxv, check)
                combine(acc, total, nt, c, over_any, counts, comb, last_comb,
                        2 if recursive else 1, no_log, k_len, n_chunks, mode, lo, hi, man_bits,
                        min_bits, magic, maxv, check)
                if not recursive and n_chunks > 1:
                    for t in range(nt):
                        immediate_cuts(t, t0 + t, rows[t0 + t], c, chunk, k_len, g, xg, wg,
                                       wg_t, gx, gw, gw_t, ev, step_ev, stamp, comb)
            if recursive:
                for t in range(nt):
                    recursive_cuts(t, t0 + t, rows[t0 + t], n_chunks, chunk, k_len, g, xg, wg,
                                   gx, gw, last_step, last_comb, use_exact)
    gw_sum = gw_parts[0].copy()
    for b in range(n_blocks):
        if b:
            gw_sum += gw_parts[b]
        if not recursive:
            gw_sum += gw_t_parts[b].T
    return gx, gw_sum, use_exact


@njit(parallel=True, **chain_opts)
def forward_int(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check, last):
    return _forward_body(x, w_t, rows, chunk, 0, lo, hi, man_bits, min_bits, magic, maxv, check,
                         last, 0)


@njit(parallel=True, **chain_opts)
def forward_nearest(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check, last):
    return _forward_body(x, w_t, rows, chunk, 1, lo, hi, man_bits, min_bits, magic, maxv, check,
                         last, 0)


@njit(parallel=True, **chain_opts)
def forward_toward_zero(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check, last):
    return _forward_body(x, w_t, rows, chunk, 2, lo, hi, man_bits, min_bits, magic, maxv, check,
                         last, 0)


FORWARD = (forward_int, forward_nearest, forward_toward_zero)


@njit(parallel=True, **chain_opts)
def forward_nearest_last(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check,
                         last):
    return _forward_body(x, w_t, rows, chunk, 1, lo, hi, man_bits, min_bits, magic, maxv, check,
                         last, 2)


@njit(parallel=True, **chain_opts)
def forward_toward_zero_last(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv,
                             check, last):
    return _forward_body(x, w_t, rows, chunk, 2, lo, hi, man_bits, min_bits, magic, maxv, check,
                         last, 2)


FORWARD_LAST = (None, forward_nearest_last, forward_toward_zero_last)  # floating point only


@njit(parallel=True, **opts)
def recursive_from_last(xg, wg, g, last, n_blocks):
    """``recursive`` gradients of one-chunk chains from each output's last event's step
    ``last`` (n, O), recorded by the forward pass: :func:`recursive_cuts` without re-running
    the chain. Returns ``(gx, gw, use_exact)`` as :func:`_backward_body`."""
    n, outs = last.shape
    k_len = xg.shape[1]
    gx = np.zeros((n, k_len), dtype=xg.dtype)
    use_exact = np.ones((n, outs), dtype=np.bool_)
    gw_parts = np.zeros((n_blocks, outs, k_len), dtype=xg.dtype)
    no_comb = np.full((n, outs), -1, dtype=np.int32)
    last_step = last.reshape(n, 1, outs)
    per_block = (n + n_blocks - 1) // n_blocks
    for b in prange(n_blocks):
        for i in range(b * per_block, min(n, (b + 1) * per_block)):
            recursive_cuts(i, i, i, 1, k_len, k_len, g, xg, wg, gx, gw_parts[b], last_step,
                           no_comb, use_exact)
    gw = gw_parts[0].copy()
    for b in range(1, n_blocks):
        gw += gw_parts[b]
    return gx, gw, use_exact


@njit(parallel=True, **opts)
def backward_int_immediate(x, w_t, xg, wg, g, rows, chunk, n_blocks, lo, hi, man_bits,
                             min_bits, magic, maxv, check):
    return _backward_body(x, w_t, xg, wg, g, rows, chunk, False, n_blocks, 0, lo, hi,
                          man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **opts)
def backward_int_recursive(x, w_t, xg, wg, g, rows, chunk, n_blocks, lo, hi, man_bits,
                             min_bits, magic, maxv, check):
    return _backward_body(x, w_t, xg, wg, g, rows, chunk, True, n_blocks, 0, lo, hi,
                          man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **opts)
def backward_nearest_immediate(x, w_t, xg, wg, g, rows, chunk, n_blocks, lo, hi, man_bits,
                             min_bits, magic, maxv, check):
    return _backward_body(x, w_t, xg, wg, g, rows, chunk, False, n_blocks, 1, lo, hi,
                          man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **opts)
def backward_nearest_recursive(x, w_t, xg, wg, g, rows, chunk, n_blocks, lo, hi, man_bits,
                             min_bits, magic, maxv, check):
    return _backward_body(x, w_t, xg, wg, g, rows, chunk, True, n_blocks, 1, lo, hi,
                          man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **opts)
def backward_toward_zero_immediate(x, w_t, xg, wg, g, rows, chunk, n_blocks, lo, hi, man_bits,
                             min_bits, magic, maxv, check):
    return _backward_body(x, w_t, xg, wg, g, rows, chunk, False, n_blocks, 2, lo, hi,
                          man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **opts)
def backward_toward_zero_recursive(x, w_t, xg, wg, g, rows, chunk, n_blocks, lo, hi, man_bits,
                             min_bits, magic, maxv, check):
    return _backward_body(x, w_t, xg, wg, g, rows, chunk, True, n_blocks, 2, lo, hi,
                          man_bits, min_bits, magic, maxv, check)


BACKWARD = ((backward_int_immediate, backward_int_recursive),
            (backward_nearest_immediate, backward_nearest_recursive),
            (backward_toward_zero_immediate, backward_toward_zero_recursive))
