"""numba kernel of :func:`brevitas_a2q.sim.kernels.grouped_forward`: the chain of a convolution
with many groups of few outputs each (a depthwise convolution: one), where every output has
an input row of its own. Vectorized over outputs, as the other kernels, but on
``x[r, k, o] * w_t[k, o]`` instead of ``x[r, k] * w_t[k, o]``; every step runs (no step is
skipped on a zero input, which is exact: :mod:`.kernels`), in the chain's order. With
``record``, it also marks the products that the fine-grained gradients keep (Blumenfeld,
Hubara, Soudry, ICLR 2024, Sec. 4)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from brevitas_a2q.sim._jit import add_events, chain_opts, opts

ROWS_PER_TASK = 16
IMMEDIATE, RECURSIVE = 1, 2


@njit(inline="always", **opts)
def _clear(keep, r, o, k0, k1):
    for k in range(k0, k1):
        keep[r, k, o] = False


@njit(inline="always", **opts)
def _row(x, w_t, r, chunk, scratch, y, counts, keep, record, grad_mode, mode, lo, hi, man_bits,
         min_bits, magic, maxv, check):
    """The chains of row ``r``'s outputs into ``y[r]`` and ``counts[r]``; ``check`` False: no
    addition can overflow (:func:`brevitas_a2q.sim.fast.may_overflow`). ``record`` (a
    constant) True: ``keep[r, k, o]`` whether product ``k`` of output ``o`` passes its
    gradient: ``immediate``, its addition and its chunk's combination had no event;
    ``recursive``, no event came after it, in its chunk or among the combinations."""
    k_len, outs = w_t.shape
    n_chunks = (k_len + chunk - 1) // chunk
    acc, total, over_any, last_ev, last_comb = scratch
    n_over = 0
    n_swamp = 0
    n_under = 0
    for o in range(outs):
        over_any[o] = False
        last_comb[o] = -1
    for c in range(n_chunks):
        k0 = c * chunk
        k1 = min(k0 + chunk, k_len)
        for o in range(outs):
            acc[o] = 0.0
            last_ev[o] = -1
        for k in range(k0, k0 + chunk):
            if k >= k_len and mode != 2:
                break  # zero padding: no change, no event (kernels module docstring)
            for o in range(outs):
                a = acc[o]
                s = a + np.float64(x[r, k, o]) * np.float64(w_t[k, o]) if k < k_len else a + 0.0
                q, over, swamp, under = add_events(a, s, mode, lo, hi, man_bits, min_bits, magic,
                                                   maxv, check)
                n_over += over
                n_swamp += swamp
                n_under += under
                if mode == 0 or check:  # (else no addition can overflow)
                    over_any[o] |= over
                acc[o] = q
                if record and k < k_len:
                    event = over | swamp | under
                    keep[r, k, o] = not event
                    if event:
                        last_ev[o] = k
        for o in range(outs):
            if record and grad_mode == RECURSIVE:
                _clear(keep, r, o, k0, last_ev[o] + 1)  # up to the chunk's last event
            if c == 0:
                total[o] = acc[o]
                continue
            a = total[o]
            q, over, swamp, under = add_events(a, a + acc[o], mode, lo, hi, man_bits, min_bits,
                                               magic, maxv, check)
            n_over += over
            n_swamp += swamp
            n_under += under
            if mode == 0 or check:
                over_any[o] |= over
            total[o] = q
            if record and (over | swamp | under):
                last_comb[o] = c
                if grad_mode == IMMEDIATE:
                    _clear(keep, r, o, k0, k1)
    n_any = 0
    for o in range(outs):
        y[r, o] = total[o]
        n_any += over_any[o]
        if record and grad_mode == RECURSIVE:  # every chunk up to the last combination event
            _clear(keep, r, o, 0, min((last_comb[o] + 1) * chunk, k_len))
    counts[r, 0] = n_over
    counts[r, 1] = n_any
    counts[r, 2] = n_swamp
    counts[r, 3] = n_under


@njit(inline="always", **opts)
def _grouped_body(x, w_t, chunk, keep, record, grad_mode, mode, lo, hi, man_bits, min_bits,
                  magic, maxv, check):
    """``y[r, o]``: the chain of ``x[r, :, o] * w_t[:, o]`` (x (R, K, O), w_t (K, O), each of
    any real or integer type whose products are exact in float64), over chunks of ``chunk``;
    ``mode`` and ``record`` constants, ``mode`` as :func:`brevitas_a2q.sim._jit.rnd`, the
    rest as :func:`_row`. Returns ``(y, counts)``, counts (R, 4) as
    :func:`brevitas_a2q.sim.kernels.forward`'s."""
    n = x.shape[0]
    outs = w_t.shape[1]
    y = np.empty((n, outs))
    counts = np.zeros((n, 4), dtype=np.int64)
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        scratch = (np.empty(outs), np.empty(outs), np.empty(outs, dtype=np.bool_),
                   np.empty(outs, dtype=np.int64), np.empty(outs, dtype=np.int64))
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            _row(x, w_t, r, chunk, scratch, y, counts, keep, record, grad_mode, mode, lo, hi,
                 man_bits, min_bits, magic, maxv, check)
    return y, counts


@njit(parallel=True, **chain_opts)
def grouped_int(x, w_t, chunk, keep, grad_mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _grouped_body(x, w_t, chunk, keep, False, grad_mode, 0, lo, hi, man_bits, min_bits,
                         magic, maxv, check)


@njit(parallel=True, **chain_opts)
def grouped_nearest(x, w_t, chunk, keep, grad_mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _grouped_body(x, w_t, chunk, keep, False, grad_mode, 1, lo, hi, man_bits, min_bits,
                         magic, maxv, check)


@njit(parallel=True, **chain_opts)
def grouped_toward_zero(x, w_t, chunk, keep, grad_mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _grouped_body(x, w_t, chunk, keep, False, grad_mode, 2, lo, hi, man_bits, min_bits,
                         magic, maxv, check)


@njit(parallel=True, **chain_opts)
def grouped_int_record(x, w_t, chunk, keep, grad_mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _grouped_body(x, w_t, chunk, keep, True, grad_mode, 0, lo, hi, man_bits, min_bits,
                         magic, maxv, check)


@njit(parallel=True, **chain_opts)
def grouped_nearest_record(x, w_t, chunk, keep, grad_mode, lo, hi, man_bits, min_bits, magic, maxv, check):
    return _grouped_body(x, w_t, chunk, keep, True, grad_mode, 1, lo, hi, man_bits, min_bits,
                         magic, maxv, check)


@njit(parallel=True, **chain_opts)
def grouped_toward_zero_record(x, w_t, chunk, keep, grad_mode, lo, hi, man_bits, min_bits, magic,
                               maxv, check):
    return _grouped_body(x, w_t, chunk, keep, True, grad_mode, 2, lo, hi, man_bits, min_bits,
                         magic, maxv, check)


GROUPED = ((grouped_int, grouped_nearest, grouped_toward_zero),
           (grouped_int_record, grouped_nearest_record, grouped_toward_zero_record))
