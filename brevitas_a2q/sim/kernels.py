"""JIT-compiled (numba, CPU) accumulation chain: the same float64 operations, in the same order,
as :func:`brevitas_a2q.sim.chain._run_chain`, one row at a time, vectorized over outputs and
parallel over rows; and the fine-grained ``immediate`` / ``recursive`` gradients (Blumenfeld,
Hubara, Soudry, ICLR 2024, Sec. 4), which recompute each row's events in the backward pass
instead of storing per-step masks.

numba (a PyPI wheel with LLVM bundled; no system compiler) is imported lazily. Where it is
missing or fails to compile, :func:`available` is False, a warning says so once, and callers use
the torch chain (same results, slower).

Exactness: every addition is ``s = acc + x_k * w_ok`` in float64 followed by the accumulator's
rounding (clamp for saturating integers, :class:`~brevitas_a2q.sim.float_format.FloatFormat`'s
round-to-nearest-even or toward-zero as integer bit operations on float64). The products are
exact in float64 for the operands the layers give (integers below 2^26, float32 values), so a
fused or unfused multiply-add gives the same ``s`` as the torch chain's ``addcmul``. A step with
``x_k == 0`` is skipped where that is exact (integers, round to nearest: see :mod:`.fast`); under
round toward zero every step runs, zero padding included, as in the chain (``-0`` can turn into
``+0`` there).
"""

from __future__ import annotations

import warnings

import numpy as np

from brevitas_a2q.sim.config import AccumulatorConfig

_KERNELS: dict | None = None
_FAILED: str | None = None
_EXP_MASK = 0x7FF << 52


def available() -> bool:
    """True when the numba kernels compiled (first call compiles them; later calls are free).
    Warns once when they cannot be used."""
    return _kernels() is not None


def _kernels() -> dict | None:
    global _KERNELS, _FAILED
    if _KERNELS is not None or _FAILED is not None:
        return _KERNELS
    try:
        _KERNELS = _compile()
    except Exception as err:  # noqa: BLE001 -- ImportError, or any numba/LLVM failure
        _FAILED = f"{type(err).__name__}: {err}"
        warnings.warn(f"brevitas_a2q.sim: numba kernels unavailable ({_FAILED}); simulated "
                      "accumulators use the slower torch chain", RuntimeWarning, stacklevel=3)
    return _KERNELS


def format_params(cfg: AccumulatorConfig) -> tuple:
    """The accumulator as the kernels' scalar arguments: ``(mode, lo, hi, man_bits, min_bits,
    magic, max_value)``; mode 0 integer saturation, 1 float round to nearest even, 2 float
    round toward zero."""
    if cfg.kind == "int":
        half = float(2 ** (cfg.bits - 1))
        return 0, -half, half - 1.0, 0, 0, 0.0, 0.0
    fmt = cfg.float_format
    if fmt.rounding == "nearest":
        return (1, 0.0, 0.0, fmt.man_bits, (fmt.min_exponent + 1023) << 52,
                1.5 * 2.0 ** (52 - fmt.man_bits), fmt.max_value)
    return (2, 0.0, 0.0, fmt.man_bits, (fmt.min_exponent - fmt.man_bits + 1023) << 52, 0.0,
            fmt.max_value)


def forward(x: np.ndarray, w_t: np.ndarray, rows: np.ndarray, chunk: int, cfg: AccumulatorConfig
            ) -> tuple[np.ndarray, np.ndarray]:
    """The chain for ``rows`` of ``x`` (R, K) against ``w_t`` (K, O), both float64 C-contiguous.
    Returns ``y`` (len(rows), O) and per-row counts (len(rows), 4): overflow events, outputs
    with an overflow, swamping events, underflow events."""
    return _kernels()["forward"](x, w_t, rows, chunk, *format_params(cfg))


def backward(x: np.ndarray, w_t: np.ndarray, xg: np.ndarray, wg_t: np.ndarray, g: np.ndarray,
             rows: np.ndarray, chunk: int, cfg: AccumulatorConfig, recursive: bool,
             n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine-grained gradients for ``rows``: ``gx`` (len(rows), K) and ``gw_t`` (K, O) of
    ``sum_{r,o,k} g[r,o] keep[r,o,k] xg[r,k] wg[o,k]``, where ``keep`` is the ``immediate`` or
    ``recursive`` mask of the chain of addends ``x``, ``w_t`` (module docstring of
    :mod:`brevitas_a2q.sim`). ``g`` is (len(rows), O); ``n_blocks`` row blocks run in
    parallel, each with its own ``gw_t`` accumulator."""
    return _kernels()["backward"](x, w_t, xg, wg_t, g, rows, chunk, recursive, n_blocks,
                                  *format_params(cfg))


def _compile() -> dict:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

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

    opts = {"cache": True, "nogil": True, "error_model": "numpy", "boundscheck": False}

    @njit(inline="always", **opts)
    def rnd(s, mode, lo, hi, man_bits, min_bits, magic, maxv):
        """A(s): (rounded, overflowed)."""
        if mode == 0:
            if s > hi:
                return hi, True
            if s < lo:
                return lo, True
            return s, False
        e = f2i(s) & _EXP_MASK
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
        if r > maxv:
            return maxv, True
        if r < -maxv:
            return -maxv, True
        return r, False

    @njit(inline="always", **opts)
    def chain_row(x, w_t, r, chunk, acc, total, over_any, counts, ev, comb, last_step, last_comb,
                  record, mode, lo, hi, man_bits, min_bits, magic, maxv):
        """Row ``r``'s chain into ``total`` (O,). With ``record`` 1 (immediate) stores step
        events in ``ev`` (K, O) and chunk-combination events in ``comb`` (nC, O); 2
        (recursive) the last event's step per chunk in ``last_step`` (nC, O) and the last
        combination event in ``last_comb`` (O,)."""
        k_len = x.shape[1]
        outs = w_t.shape[1]
        n_chunks = (k_len + chunk - 1) // chunk
        skip_zero = mode != 2
        n_over = 0
        n_swamp = 0
        n_under = 0
        for o in range(outs):
            over_any[o] = False
        for c in range(n_chunks):
            for o in range(outs):
                acc[o] = 0.0
            if record == 2:
                for o in range(outs):
                    last_step[c, o] = -1
            for j in range(chunk):
                k = c * chunk + j
                xk = 0.0
                if k >= k_len and skip_zero:
                    break  # zero padding: no change, no event (module docstring)
                if k < k_len:
                    xk = x[r, k]
                    if record == 1:
                        for o in range(outs):
                            ev[k, o] = False
                    if xk == 0.0 and skip_zero:
                        continue
                for o in range(outs):
                    a = acc[o]
                    s = a + xk * w_t[k, o] if k < k_len else a + 0.0
                    q, over = rnd(s, mode, lo, hi, man_bits, min_bits, magic, maxv)
                    swamp = mode != 0 and q == a and s != a and not over
                    under = mode != 0 and q == 0.0 and s != 0.0
                    n_over += over
                    n_swamp += swamp
                    n_under += under
                    over_any[o] |= over
                    if record == 1 and k < k_len:
                        ev[k, o] = over or swamp or under
                    elif record == 2 and (over or swamp or under):
                        last_step[c, o] = j
                    acc[o] = q
            if c == 0:
                for o in range(outs):
                    total[o] = acc[o]
                if record == 2:
                    for o in range(outs):
                        last_comb[o] = -1
                continue
            for o in range(outs):
                a = total[o]
                s = a + acc[o]
                q, over = rnd(s, mode, lo, hi, man_bits, min_bits, magic, maxv)
                swamp = mode != 0 and q == a and s != a and not over
                under = mode != 0 and q == 0.0 and s != 0.0
                n_over += over
                n_swamp += swamp
                n_under += under
                over_any[o] |= over
                event = over or swamp or under
                if record == 1:
                    comb[c, o] = event
                elif record == 2 and event:
                    last_comb[o] = c
                total[o] = q
        n_any = 0
        for o in range(outs):
            n_any += over_any[o]
        counts[0] += n_over
        counts[1] += n_any
        counts[2] += n_swamp
        counts[3] += n_under

    @njit(parallel=True, **opts)
    def forward_rows(x, w_t, rows, chunk, mode, lo, hi, man_bits, min_bits, magic, maxv):
        outs = w_t.shape[1]
        n = rows.shape[0]
        y = np.empty((n, outs))
        counts = np.zeros((n, 4), dtype=np.int64)
        dummy_b = np.zeros((1, 1), dtype=np.bool_)
        dummy_i = np.zeros((1, 1), dtype=np.int32)
        dummy_1 = np.zeros(1, dtype=np.int32)
        for i in prange(n):
            acc = np.empty(outs)
            over_any = np.empty(outs, dtype=np.bool_)
            chain_row(x, w_t, rows[i], chunk, acc, y[i], over_any, counts[i], dummy_b, dummy_b,
                      dummy_i, dummy_1, 0, mode, lo, hi, man_bits, min_bits, magic, maxv)
        return y, counts

    @njit(parallel=True, **opts)
    def backward_rows(x, w_t, xg, wg_t, g, rows, chunk, recursive, n_blocks, mode, lo, hi,
                      man_bits, min_bits, magic, maxv):
        k_len, outs = w_t.shape
        n_chunks = (k_len + chunk - 1) // chunk
        n = rows.shape[0]
        gx = np.zeros((n, k_len))
        gw_parts = np.zeros((n_blocks, k_len, outs))
        record = 2 if recursive else 1
        per_block = (n + n_blocks - 1) // n_blocks
        for b in prange(n_blocks):
            acc = np.empty(outs)
            total = np.empty(outs)
            over_any = np.empty(outs, dtype=np.bool_)
            counts = np.zeros(4, dtype=np.int64)
            ev = np.zeros((k_len if not recursive else 1, outs), dtype=np.bool_)
            comb = np.zeros((n_chunks if not recursive else 1, outs), dtype=np.bool_)
            last_step = np.zeros((n_chunks if recursive else 1, outs), dtype=np.int32)
            last_comb = np.zeros(outs if recursive else 1, dtype=np.int32)
            keep_g = np.empty(outs)
            gw = gw_parts[b]
            for i in range(b * per_block, min(n, (b + 1) * per_block)):
                r = rows[i]
                chain_row(x, w_t, r, chunk, acc, total, over_any, counts, ev, comb, last_step,
                          last_comb, record, mode, lo, hi, man_bits, min_bits, magic, maxv)
                for c in range(n_chunks):
                    for j in range(chunk):
                        k = c * chunk + j
                        if k >= k_len:
                            break
                        for o in range(outs):
                            if recursive:
                                keep = j > last_step[c, o] and c > last_comb[o]
                            else:
                                keep = not ev[k, o] and not (c > 0 and comb[c, o])
                            keep_g[o] = g[i, o] if keep else 0.0
                        xk = xg[r, k]
                        s = 0.0
                        for o in range(outs):
                            s += keep_g[o] * wg_t[k, o]
                            gw[k, o] += keep_g[o] * xk
                        gx[i, k] = s
        gw_t = gw_parts[0].copy()
        for b in range(1, n_blocks):
            gw_t += gw_parts[b]
        return gx, gw_t

    return {"forward": forward_rows, "backward": backward_rows, "numba": numba}
