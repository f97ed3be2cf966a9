"""numba kernels of the event log (:func:`brevitas_a2q.sim.kernels.forward_events`): the
floating-point chain that logs every event as it runs, and the fine-grained gradients taken
from the log in the backward pass (Blumenfeld, Hubara, Soudry, ICLR 2024, Sec. 4) instead of
from a second run of the chain. An entry is one int32: ``(t << kb | k) << ob | o`` for row ``t``
of a tile, step ``k`` (``K + c``: the addition of chunk ``c``'s result) and output ``o``."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from brevitas_a2q.sim._jit import (
    TILE,
    add_range,
    bit_width,
    chain_opts,
    forward_tile,
    opts,
)


@njit(inline="always", **opts)
def _forward_events_body(x, w_t, rows, chunk, mode, lo, hi, man_bits, min_bits, magic, maxv,
                         check):
    """The chain on one thread (callers run blocks of rows on threads of their own), with its
    event log: ``(y, counts, entries, tile_ends)``; the events of tile ``i`` (rows ``TILE * i``
    on) are ``entries[tile_ends[i]:tile_ends[i + 1]]``, each ``(t << kb | k) << ob | o``
    (:func:`chunk_steps`): row ``TILE * i + t``, output ``o``, the addition of product
    ``k < K`` or, at ``k = K + c``, of chunk ``c``'s result, in the order they occurred."""
    n = rows.shape[0]
    outs = w_t.shape[1]
    y = np.empty((n, outs))
    counts = np.zeros((n, 4), dtype=np.int64)
    n_tiles = (n + TILE - 1) // TILE
    tile_ends = np.zeros(n_tiles + 1, dtype=np.int64)
    width = (outs + 7) // 8
    flags_flat = np.zeros(TILE * width * 8, dtype=np.uint8)
    flags = flags_flat.reshape((TILE, width * 8))
    words = flags_flat.view(np.uint64).reshape((TILE, width))
    entries = np.empty(max(4096, n * outs // 4), dtype=np.int32)
    count = np.zeros(1, dtype=np.int64)
    no_last = np.zeros((1, 1), dtype=np.int32)
    for tile in range(n_tiles):
        t0, nt, log = tile * TILE, min(TILE, n - tile * TILE), (flags, words, entries, count)
        if check:  # a constant in each copy of the loop (LLVM does not take it out here)
            entries = forward_tile(x, w_t, rows, t0, nt, chunk, y, counts, no_last, log, 4, mode,
                                   lo, hi, man_bits, min_bits, magic, maxv, True)
        else:
            entries = forward_tile(x, w_t, rows, t0, nt, chunk, y, counts, no_last, log, 4, mode,
                                   lo, hi, man_bits, min_bits, magic, maxv, False)
        tile_ends[tile + 1] = count[0]
    return y, counts, entries[:count[0]], tile_ends


@njit(parallel=True, **opts)
def backward_from_events(xg, wg, g, rows, entries, tile_ends, chunk, recursive, n_blocks, gw):
    """The fine-grained gradients of :func:`_backward_body` from the event log that
    :func:`_forward_events_body` kept, without re-running the chain, as the cut products to
    take from the exact gradient: ``gx`` (returned) and the weight's, added into ``gw`` (O, K)
    in the factors' type (no (O, K) array of its own where it runs on one block), and
    ``use_exact`` (n, O): False for the outputs whose gradient is these products alone.

    One pass over each tile's events, last to first. A chunk's combination event is logged
    after the chunk's own events, so it is met before them, and the chunks of each output are
    met in decreasing order. ``immediate``: each event's product, and the whole chunk of a
    combination event, whose chunk's own events are then passed over. ``recursive``: the
    first combination event met is the last: every chunk up to it is cut whole, and every
    event met after it passed over (or, where those chunks hold more than half of the
    products, the output takes the later chunks' products instead of the exact gradient, less
    the cuts already made in them); in a later chunk, the first event met is the chunk's last,
    and the chunk's products up to it are cut."""
    n, outs = g.shape
    k_len = xg.shape[1]
    n_chunks = (k_len + chunk - 1) // chunk
    k_bits = bit_width(k_len + n_chunks)
    o_bits = bit_width(outs)
    k_mask = (1 << k_bits) - 1
    o_mask = (1 << o_bits) - 1
    gx = np.zeros((n, k_len), dtype=xg.dtype)
    use_exact = np.ones((n, outs), dtype=np.bool_)
    more_parts = np.zeros((n_blocks - 1, outs, k_len), dtype=gw.dtype)  # blocks 1 on
    n_tiles = tile_ends.size - 1
    per_block = (n_tiles + n_blocks - 1) // n_blocks
    for b in prange(n_blocks):
        gw_b = gw if b == 0 else more_parts[b - 1]
        # per row of the tile and output: the chunk of the combination event met (immediate:
        # the latest; recursive: the last one), and the chunk whose last event was met
        comb_chunk = np.empty((TILE, outs), dtype=np.int32)
        done_chunk = np.empty((TILE, outs), dtype=np.int32)
        for tile in range(b * per_block, min(n_tiles, (b + 1) * per_block)):
            t0 = tile * TILE
            comb_chunk[:] = -1
            done_chunk[:] = -1
            for e in range(tile_ends[tile + 1] - 1, tile_ends[tile] - 1, -1):
                entry = entries[e]
                o, k, t = entry & o_mask, (entry >> o_bits) & k_mask, entry >> (o_bits + k_bits)
                i = t0 + t
                r = rows[i]
                if k >= k_len:  # a combination event: its chunk, or (recursive) all up to it
                    c = k - k_len
                    split = min(c * chunk + chunk, k_len)  # the chunk's end
                    if not recursive:
                        comb_chunk[t, o] = c
                        add_range(gx[i], gw_b[o], -g[i, o], xg[r], wg[o], c * chunk, split)
                    elif comb_chunk[t, o] < 0:  # the cut chunks, or else the kept ones
                        comb_chunk[t, o] = c
                        if 2 * split <= k_len:
                            add_range(gx[i], gw_b[o], -g[i, o], xg[r], wg[o], 0, split)
                        else:  # (the later chunks' cuts stand: kept = those chunks less them)
                            use_exact[i, o] = False
                            add_range(gx[i], gw_b[o], g[i, o], xg[r], wg[o], split, k_len)
                    continue
                c = k // chunk
                if not recursive:  # the product, unless its chunk's combination was cut
                    if comb_chunk[t, o] != c:
                        gx[i, k] -= g[i, o] * wg[o, k]
                        gw_b[o, k] -= g[i, o] * xg[r, k]
                elif comb_chunk[t, o] < 0 and done_chunk[t, o] != c:  # the chunk's last
                    done_chunk[t, o] = c
                    add_range(gx[i], gw_b[o], -g[i, o], xg[r], wg[o], c * chunk, k + 1)
    for b in range(n_blocks - 1):
        gw += more_parts[b]
    return gx, use_exact


@njit(**chain_opts)
def forward_nearest_events(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _forward_events_body(x, w_t, rows, chunk, 1, lo, hi, man_bits, min_bits, magic, maxv,
                                check)


@njit(**chain_opts)
def forward_toward_zero_events(x, w_t, rows, chunk, lo, hi, man_bits, min_bits, magic, maxv,
                               check):
    return _forward_events_body(x, w_t, rows, chunk, 2, lo, hi, man_bits, min_bits, magic, maxv,
                                check)


FORWARD_EVENTS = (None, forward_nearest_events, forward_toward_zero_events)  # floating point

