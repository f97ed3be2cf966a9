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
    mode, *params = format_params(cfg)
    return _kernels()["forward"][mode](x, w_t, rows, chunk, *params)


def backward(x: np.ndarray, w_t: np.ndarray, xg: np.ndarray, wg_t: np.ndarray, g: np.ndarray,
             rows: np.ndarray, chunk: int, cfg: AccumulatorConfig, recursive: bool,
             n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine-grained gradients for ``rows``: ``gx`` (len(rows), K) and ``gw_t`` (K, O) of
    ``sum_{r,o,k} g[r,o] keep[r,o,k] xg[r,k] wg[o,k]``, where ``keep`` is the ``immediate`` or
    ``recursive`` mask of the chain of addends ``x``, ``w_t`` (module docstring of
    :mod:`brevitas_a2q.sim`). ``g`` is (len(rows), O); ``n_blocks`` row blocks run in
    parallel, each with its own ``gw_t`` accumulator."""
    mode, *params = format_params(cfg)
    return _kernels()["backward"][mode][int(recursive)](x, w_t, xg, wg_t, g, rows, chunk,
                                                        n_blocks, *params)


def _compile() -> dict:
    import os

    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool: its OpenMP layer's idle threads spin and slowed torch's
        # (also OpenMP) matrix products by 20x here after a kernel had run
        numba.config.THREADING_LAYER = "workqueue"
    from brevitas_a2q.sim import _jit

    return {"forward": _jit.FORWARD, "backward": _jit.BACKWARD}
