"""numba.cuda kernels of the accumulation chain (imported only through
:mod:`brevitas_a2q.sim.kernels`, which falls back to the torch chain when they are unavailable):
one GPU thread per output ``(r, o)`` runs that output's whole chain, in the order and with the
float64 operations of :func:`brevitas_a2q.sim.chain._run_chain` (rounding via ``frexp`` /
``ldexp`` instead of exponent bit masks: the same quantum). The fine-grained gradients are the
exact ones (dense products, outside) minus the products whose gradient is cut, which each
thread subtracts with atomic adds: cheap where events are rare.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, int32, uint32

MAX_CHUNK_WORDS = 64  # chunked "immediate": a chunk's step events as bits (chunks <= 2048)
MAX_CHUNKS = 2048  # "recursive": the last event of each chunk
_THREADS = 128
_KERNELS: dict = {}


def _make(mode: int, record: int):
    """Forward (``record`` 0) or gradient-cut (1 immediate, 2 recursive) kernel for a rounding
    mode (0 integer saturation, 1 round to nearest even, 2 round toward zero)."""

    @cuda.jit(device=True, inline=True)
    def rnd(s, lo, hi, man_bits, emin, magic, maxv):
        if mode == 0:
            if s > hi:
                return hi, True
            if s < lo:
                return lo, True
            return s, False
        ex = emin
        if s != 0.0:
            ex = math.frexp(s)[1] - 1
            if ex < emin:
                ex = emin
        if mode == 1:
            c = math.ldexp(magic, ex)
            r = (s + c) - c
        else:
            q = math.ldexp(1.0, ex - man_bits)
            t = s / q
            r = math.copysign(t - math.fmod(t, 1.0), t) * q
        if r > maxv:
            return maxv, True
        if r < -maxv:
            return -maxv, True
        return r, False

    @cuda.jit(device=True, inline=True)
    def add(a, s, lo, hi, man_bits, emin, magic, maxv):
        q, over = rnd(s, lo, hi, man_bits, emin, magic, maxv)
        swamp = mode != 0 and q == a and s != a and not over
        under = mode != 0 and q == 0.0 and s != 0.0
        return q, over, swamp, under

    @cuda.jit(device=True, inline=True)
    def cut(r, o, k, g, xg, wg, gx, gw):
        """Subtract product ``k``'s gradient of output ``(r, o)``."""
        gro = g[r, o]
        if wg[o, k] != 0.0:
            cuda.atomic.add(gx, (r, k), gro * wg[o, k])
        if xg[r, k] != 0.0:
            cuda.atomic.add(gw, (o, k), gro * xg[r, k])

    @cuda.jit
    def kernel(x, w_t, chunk, lo, hi, man_bits, emin, magic, maxv, y, cnt, g, xg, wg, gx, gw):
        i = cuda.grid(1)
        outs = w_t.shape[1]
        k_len = x.shape[1]
        if i >= x.shape[0] * outs:
            return
        r = i // outs
        o = i % outs
        n_chunks = (k_len + chunk - 1) // chunk
        bits = cuda.local.array(MAX_CHUNK_WORDS, uint32)
        last_step = cuda.local.array(MAX_CHUNKS, int32)
        n_over = 0
        n_swamp = 0
        n_under = 0
        total = 0.0
        last_comb = -1
        for c in range(n_chunks):
            acc = 0.0
            # (one chunk: cut as it goes, no bits, and it may be longer than bits holds)
            if record == 1 and n_chunks > 1:
                for u in range((chunk + 31) // 32):
                    bits[u] = 0
            if record == 2:
                last_step[c] = -1
            for j in range(chunk):
                k = c * chunk + j
                if k < k_len:
                    s = acc + x[r, k] * w_t[k, o]
                elif mode != 2:
                    break
                else:
                    s = acc + 0.0
                acc_new, over, swamp, under = add(acc, s, lo, hi, man_bits, emin, magic, maxv)
                n_over += over
                n_swamp += swamp
                n_under += under
                if over or swamp or under:
                    if record == 1 and k < k_len:
                        if n_chunks == 1:
                            cut(r, o, k, g, xg, wg, gx, gw)
                        else:
                            bits[j // 32] |= uint32(1) << uint32(j % 32)
                    elif record == 2:
                        last_step[c] = j
                acc = acc_new
            comb = False
            if c == 0:
                total = acc
            else:
                total_new, over, swamp, under = add(total, total + acc, lo, hi, man_bits, emin,
                                                    magic, maxv)
                n_over += over
                n_swamp += swamp
                n_under += under
                comb = over or swamp or under
                if comb:
                    last_comb = c
                total = total_new
            if record == 1 and n_chunks > 1:
                for j in range(chunk):
                    k = c * chunk + j
                    if k >= k_len:
                        break
                    if comb or (bits[j // 32] >> uint32(j % 32)) & uint32(1):
                        cut(r, o, k, g, xg, wg, gx, gw)
        if record == 2:
            for c in range(n_chunks):
                limit = chunk - 1 if c <= last_comb else last_step[c]
                for j in range(limit + 1):
                    k = c * chunk + j
                    if k >= k_len:
                        break
                    cut(r, o, k, g, xg, wg, gx, gw)
        if record == 0:
            y[r, o] = total
            cnt[r, o, 0] = n_over
            cnt[r, o, 1] = n_over > 0
            cnt[r, o, 2] = n_swamp
            cnt[r, o, 3] = n_under

    return kernel


def _params(cfg) -> tuple:
    if cfg.kind == "int":
        half = float(2 ** (cfg.bits - 1))
        return 0, (-half, half - 1.0, 0, 0, 0.0, 0.0)
    fmt = cfg.float_format
    mode = 1 if fmt.rounding == "nearest" else 2
    return mode, (0.0, 0.0, fmt.man_bits, fmt.min_exponent, 1.5 * 2.0 ** (52 - fmt.man_bits),
                  fmt.max_value)


def _launch(record, cfg, x, w_t, chunk, y, cnt, g, xg, wg, gx, gw, stream):
    mode, params = _params(cfg)
    key = (mode, record)
    if key not in _KERNELS:
        _KERNELS[key] = _make(mode, record)
    n = x.shape[0] * w_t.shape[1]
    blocks = max(1, -(-n // _THREADS))
    _KERNELS[key][blocks, _THREADS, stream](x, w_t, chunk, *params, y, cnt, g, xg, wg, gx, gw)


def forward(x, w_t, chunk: int, cfg, stream=0):
    """``(y (R, O) float64, counts (R, O, 4) int32)`` device arrays for device arrays ``x``
    (R, K) and ``w_t`` (K, O)."""
    rows, outs = x.shape[0], w_t.shape[1]
    y = cuda.device_array((rows, outs), dtype=np.float64, stream=stream)
    cnt = cuda.device_array((rows, outs, 4), dtype=np.int32, stream=stream)
    dummy = cuda.device_array((1, 1), dtype=np.float64, stream=stream)
    _launch(0, cfg, x, w_t, chunk, y, cnt, dummy, dummy, dummy, dummy, dummy, stream)
    return y, cnt


def subtract_cut(x, w_t, chunk: int, cfg, recursive: bool, g, xg, wg, gx, gw, stream=0):
    """Add to ``gx`` (R, K) and ``gw`` (O, K) the gradient, with output gradient ``g`` (R, O), of
    every product whose gradient the mode cuts (``xg`` (R, K), ``wg`` (O, K): the real-valued
    factors). With ``-g``, this takes the cut products out of the exact gradient."""
    dummy = cuda.device_array((1, 1), dtype=np.float64, stream=stream)
    dummy_i = cuda.device_array((1, 1, 1), dtype=np.int32, stream=stream)
    _launch(2 if recursive else 1, cfg, x, w_t, chunk, dummy, dummy_i, g, xg, wg, gx, gw,
            stream)
