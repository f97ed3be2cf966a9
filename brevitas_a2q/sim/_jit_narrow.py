"""numba kernels of the accumulation chain for layers with few outputs (a classifier's ten),
imported only through :mod:`brevitas_a2q.sim.kernels`. :mod:`._jit` vectorizes each row's
chain over its outputs, skipping the rows whose input is zero at a step: with ten outputs a
step is one vector, and its fixed cost (the zero test, the sums of its event counts) is most of
the work. Here a tile of rows and every output advance together as one vector of lanes
(output ``o``, row ``t`` at lane ``o * TILE + t``), every step: a zero product leaves the sum
as it is, with no event, as in the step-by-step chain (:mod:`brevitas_a2q.sim.chain`), which
adds every product; rows past the last are lanes of zeros, whose results are dropped."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from brevitas_a2q.sim._jit import TILE, add_events, chain_opts, opts


@njit(inline="always", **opts)
def step_factors(x, w_t, rows, t0, nt, k, row_x, lane_x, lane_w):
    """Step ``k``'s factors in every lane: ``lane_x`` the lane's row's input, ``lane_w`` its
    output's weight; past ``k_len`` (zero padding of the last chunk), zeros."""
    k_len, outs = w_t.shape
    for t in range(TILE):
        row_x[t] = np.float64(x[rows[t0 + t], k]) if t < nt and k < k_len else 0.0
    for o in range(outs):
        w_ko = np.float64(w_t[k, o]) if k < k_len else 0.0
        lane_x[o * TILE:(o + 1) * TILE] = row_x
        lane_w[o * TILE:(o + 1) * TILE] = w_ko


@njit(inline="always", **opts)
def add_lanes(total, addend, factor, over_any, mode, lo, hi, man_bits, min_bits, magic, maxv,
              check):
    """``total[l] = A(total[l] + addend[l] * factor[l])`` in every lane (``factor`` None: plus
    ``addend[l]``, a chunk's combination); returns the additions' (overflow, swamping,
    underflow) events."""
    n_over = 0
    n_swamp = 0
    n_under = 0
    for lane in range(total.size):
        a = total[lane]
        s = a + addend[lane] * factor[lane] if factor is not None else a + addend[lane]
        q, over, swamp, under = add_events(a, s, mode, lo, hi, man_bits, min_bits, magic, maxv,
                                           check)
        n_over += over
        n_swamp += swamp
        n_under += under
        if mode == 0 or check:
            over_any[lane] |= over
        total[lane] = q
    return n_over, n_swamp, n_under


@njit(inline="always", **opts)
def _narrow_body(x, w_t, rows, chunk, mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    """``(y (n, O), counts (n_tiles, 4))``: the chain of every (row, output) of ``rows``, and
    each tile's overflow events, outputs with an overflow, swamping and underflow events."""
    k_len, outs = w_t.shape
    n = rows.shape[0]
    n_tiles = (n + TILE - 1) // TILE
    n_chunks = (k_len + chunk - 1) // chunk
    lanes = outs * TILE
    y = np.empty((n, outs))
    counts = np.zeros((n_tiles, 4), dtype=np.int64)
    for tile in prange(n_tiles):
        t0 = tile * TILE
        nt = min(TILE, n - t0)
        acc = np.empty(lanes)
        total = np.zeros(lanes)
        lane_x = np.empty(lanes)
        lane_w = np.empty(lanes)
        row_x = np.empty(TILE)
        over_any = np.zeros(lanes, dtype=np.bool_)
        events = np.zeros(3, dtype=np.int64)  # overflow, swamping, underflow
        for c in range(n_chunks):
            acc[:] = 0.0
            for j in range(chunk):
                k = c * chunk + j
                if k >= k_len and mode != 2:
                    break  # zero padding: no change, no event (round toward zero runs it)
                step_factors(x, w_t, rows, t0, nt, k, row_x, lane_x, lane_w)
                n_over, n_swamp, n_under = add_lanes(acc, lane_x, lane_w, over_any, mode, lo,
                                                     hi, man_bits, min_bits, magic, maxv, check)
                events[0] += n_over
                events[1] += n_swamp
                events[2] += n_under
            if c == 0:
                total[:] = acc
                continue
            n_over, n_swamp, n_under = add_lanes(total, acc, None, over_any, mode, lo, hi,
                                                 man_bits, min_bits, magic, maxv, check)
            events[0] += n_over
            events[1] += n_swamp
            events[2] += n_under
        n_any = 0
        for t in range(nt):
            for o in range(outs):
                y[t0 + t, o] = total[o * TILE + t]
                n_any += over_any[o * TILE + t]
        counts[tile, 0] = events[0]
        counts[tile, 1] = n_any
        counts[tile, 2] = events[1]
        counts[tile, 3] = events[2]
    return y, counts


@njit(parallel=True, **chain_opts)
def narrow_int(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _narrow_body(x, w_t, rows, chunk, 0, lo, hi, man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **chain_opts)
def narrow_nearest(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _narrow_body(x, w_t, rows, chunk, 1, lo, hi, man_bits, min_bits, magic, maxv, check)


@njit(parallel=True, **chain_opts)
def narrow_toward_zero(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _narrow_body(x, w_t, rows, chunk, 2, lo, hi, man_bits, min_bits, magic, maxv, check)


NARROW = (narrow_int, narrow_nearest, narrow_toward_zero)
