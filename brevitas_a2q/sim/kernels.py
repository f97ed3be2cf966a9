"""JIT-compiled (numba, CPU) accumulation chain: the same float64 operations, in the same order,
as :func:`brevitas_a2q.sim.chain._run_chain`, one row at a time, vectorized over outputs and
parallel over rows (layers with few outputs: a tile of rows and all outputs at once); and the
fine-grained ``immediate`` / ``recursive`` gradients (Blumenfeld, Hubara, Soudry, ICLR 2024,
Sec. 4) without per-step masks: from the events the forward pass logged (floating point,
:func:`forward_events`), from each output's last event, or by re-running each row's chain in
the backward pass.

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
from torch import Tensor

from brevitas_a2q.sim.config import AccumulatorConfig

_KERNELS: dict | None = None
_FAILED: str | None = None


def available() -> bool:
    """True when the numba kernels compiled (first call compiles them; later calls are free).
    Warns once when they cannot be used."""
    return _kernels() is not None


def _forced_torch() -> bool:
    """``BREVITAS_A2Q_SIM_KERNELS=torch`` selects the torch chain everywhere (no warning)."""
    import os

    return os.environ.get("BREVITAS_A2Q_SIM_KERNELS", "").lower() == "torch"


def _kernels() -> dict | None:
    global _KERNELS, _FAILED
    if _KERNELS is not None or _FAILED is not None:
        return _KERNELS
    if _forced_torch():
        _FAILED = "BREVITAS_A2Q_SIM_KERNELS=torch"
        return None
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


NARROW_OUTPUTS = 12  # layers with fewer outputs take :mod:`._jit_narrow`'s kernels, faster
# for them (measured when they came in: from 12 outputs on, the row-wise kernel is as fast)


def forward(x: np.ndarray, w_t: np.ndarray, rows: np.ndarray, chunk: int, cfg: AccumulatorConfig,
            check: bool = True, last: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The chain for ``rows`` of ``x`` (R, K) against ``w_t`` (K, O), C-contiguous, each
    float64 or float32 (each product exact in float64). Returns ``y`` (len(rows), O) and
    event counts (m, 4), per row or per tile of rows, whose sums over the first axis are the
    overflow events, outputs with an overflow, swamping events and underflow events.
    ``check`` False: no addition can overflow (:func:`brevitas_a2q.sim.fast.may_overflow`), so
    none is compared with the largest value. ``last`` (len(rows), O) int32, one chunk only:
    filled with each output's last event's step (-1: none), for :func:`recursive_from_last`.
    Fewer than :data:`NARROW_OUTPUTS` outputs without ``last``: every (row, output) of a tile
    of rows in one vector of lanes (:mod:`brevitas_a2q.sim._jit_narrow`)."""
    mode, *params = format_params(cfg)
    if last is None and w_t.shape[1] < NARROW_OUTPUTS:
        return _kernels()["narrow"][mode](x, w_t, rows, chunk, *params, check)
    if last is None:
        return _kernels()["forward"][mode](x, w_t, rows, chunk, *params, check,
                                           np.empty((0, 0), dtype=np.int32))
    return _kernels()["forward_last"][mode](x, w_t, rows, chunk, *params, check, last)


def grouped_forward(x: np.ndarray, w_t: np.ndarray, chunk: int, cfg: AccumulatorConfig,
                    check: bool = True, keep: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The chain of ``x[r, :, o] * w_t[:, o]`` for every row ``r`` and output ``o``: each
    output with an input row of its own (a depthwise convolution's), ``x`` (R, K, O) and
    ``w_t`` (K, O) C-contiguous, their products exact in float64. Returns ``y`` (R, O) and
    per-row counts (R, 4), and ``check``, as :func:`forward`. ``keep`` (R, K, O) bool: filled
    with whether each product passes ``cfg.gradient``'s fine-grained gradient
    (:func:`brevitas_a2q.sim._jit_grouped._row`)."""
    from brevitas_a2q.sim._jit_grouped import IMMEDIATE, RECURSIVE

    mode, *params = format_params(cfg)
    record = keep is not None
    grad_mode = (RECURSIVE if cfg.gradient == "recursive" else IMMEDIATE) if record else 0
    keep = keep if record else np.empty((0, 0, 0), dtype=np.bool_)
    return _kernels()["grouped"][record][mode](x, w_t, chunk, keep, grad_mode, *params, check)


def forward_events(x: np.ndarray, w_t: np.ndarray, rows: np.ndarray, chunk: int,
                   cfg: AccumulatorConfig, check: bool, n_threads: int
                   ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]] | None:
    """:func:`forward` (floating point) that also keeps its event log ``(entries,
    tile_ends)`` (:func:`brevitas_a2q.sim._jit_events._forward_events_body`), from which
    :func:`backward_from_events` takes the fine-grained gradients without re-running the
    chain; blocks of rows on ``n_threads`` threads. None where an entry would not fit int32."""
    from brevitas_a2q.sim._jit import TILE

    k, outs = w_t.shape
    bits = [max(1, (n - 1).bit_length()) for n in (TILE, k + -(-k // chunk), outs)]
    if sum(bits) > 31:  # (_jit.bit_width)
        return None
    mode, *params = format_params(cfg)
    kernel = _kernels()["forward_events"][mode]
    per = -(-len(rows) // (TILE * n_threads)) * TILE  # whole tiles per thread
    parts = [rows[i:i + per] for i in range(0, len(rows), per)] or [rows]
    if len(parts) == 1:
        done = [kernel(x, w_t, parts[0], chunk, *params, check)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(parts)) as pool:  # the kernel releases the GIL
            done = list(pool.map(lambda part: kernel(x, w_t, part, chunk, *params, check), parts))
    ends = [np.zeros(1, dtype=np.int64)]
    for *_, part_ends in done:
        ends.append(part_ends[1:] + ends[-1][-1])
    return (np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done]),
            (np.concatenate([d[2] for d in done]), np.concatenate(ends)))


def backward_from_events(xg: np.ndarray, wg: np.ndarray, g: np.ndarray, rows: np.ndarray,
                         log: tuple[np.ndarray, np.ndarray], chunk: int, recursive: bool,
                         n_blocks: int, gw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fine-grained gradients of the chain of ``rows`` from the event log
    :func:`forward_events` kept: ``(gx, use_exact)`` as :func:`backward`, the weight's
    corrections added into ``gw`` (O, K), C-contiguous in ``xg``'s type
    (:func:`brevitas_a2q.sim._jit_events.backward_from_events`)."""
    return _kernels()["backward_from_events"](xg, wg, g, rows, *log, chunk, recursive,
                                              n_blocks, gw)


def recursive_from_last(xg: np.ndarray, wg: np.ndarray, g: np.ndarray, last: np.ndarray,
                        n_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``recursive`` gradients of one-chunk chains from the last events :func:`forward`
    recorded: ``(gx, gw, use_exact)`` as :func:`backward`, every row."""
    return _kernels()["recursive_from_last"](xg, wg, g, last, n_blocks)


def backward(x: np.ndarray, w_t: np.ndarray, xg: np.ndarray, wg: np.ndarray, g: np.ndarray,
             rows: np.ndarray, chunk: int, cfg: AccumulatorConfig, recursive: bool,
             n_blocks: int, check: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-grained gradients for ``rows`` (module docstring of :mod:`brevitas_a2q.sim`) of
    the chain of addends ``x`` (R, K), ``w_t`` (K, O) with real-valued factors ``xg`` (R, K),
    ``wg`` (O, K) and ``g`` (len(rows), O) = dL/dY: ``(gx (len(rows), K), gw (O, K),
    use_exact (len(rows), O))``, the mode's gradient being the exact gradient of the outputs
    where ``use_exact`` plus ``gx``, ``gw`` (:func:`brevitas_a2q.sim._jit._backward_body`).
    ``n_blocks`` row blocks run in parallel, each with its own ``gw`` accumulator."""
    mode, *params = format_params(cfg)
    return _kernels()["backward"][mode][int(recursive)](x, w_t, xg, wg, g, rows, chunk,
                                                        n_blocks, *params, check)


def _saturating(name: str):
    """A kernel of :mod:`._jit_blocks`: its serial twin where numba runs one thread."""
    import numba

    return getattr(_kernels()["saturating"],
                   name + "_serial" if numba.get_num_threads() == 1 else name)


def saturating_advance(*args) -> None:
    """:func:`brevitas_a2q.sim._jit_blocks.advance` (saturating chain, one block)."""
    _saturating("advance")(*args)


def saturating_stepwise(*args) -> None:
    """:func:`brevitas_a2q.sim._jit_blocks.stepwise` (saturating chain, every step)."""
    _saturating("stepwise")(*args)


def saturating_chunk_cuts(*args) -> None:
    """:func:`brevitas_a2q.sim._jit_blocks.chunk_cuts` (a chunk's fine-grained cuts)."""
    _saturating("chunk_cuts")(*args)


def _compile() -> dict:
    import os

    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's own thread pool: its OpenMP layer's idle threads spin and slowed torch's
        # (also OpenMP) matrix products by 20x here after a kernel had run
        numba.config.THREADING_LAYER = "workqueue"
    from brevitas_a2q.sim import _jit, _jit_blocks, _jit_events, _jit_grouped, _jit_narrow

    return {"forward": _jit.FORWARD, "narrow": _jit_narrow.NARROW, "grouped": _jit_grouped.GROUPED,
            "backward": _jit.BACKWARD, "saturating": _jit_blocks,
            "forward_last": _jit.FORWARD_LAST, "recursive_from_last": _jit.recursive_from_last,
            "forward_events": _jit_events.FORWARD_EVENTS,
            "backward_from_events": _jit_events.backward_from_events}


# ------------------------------------------------------------------------------------------------
# CUDA (numba.cuda, :mod:`._cuda`): one GPU thread per output; torch tensors shared in place

_CUDA_FAILED: str | None = None


def _cuda_call(x: Tensor, launch) -> bool:
    """Run ``launch(module, stream)`` on ``x``'s device and torch's current stream; False
    (after a one-time warning) where numba.cuda is missing or the kernel fails to compile."""
    global _CUDA_FAILED
    if _CUDA_FAILED is not None:
        return False
    if _forced_torch():
        _CUDA_FAILED = "BREVITAS_A2Q_SIM_KERNELS=torch"
        return False
    try:
        import torch
        from numba import cuda

        from brevitas_a2q.sim import _cuda

        # Synchronized on both sides since the H200 run whose K = 32768 classifier failed (an
        # illegal address, then a failed cuBLAS call) and whose single steps passed with every
        # launch blocking. Its cause was found later without a GPU: the "immediate" kernel
        # cleared chunk-event bits past its local array when one chunk was longer than 2,048
        # products (found by numba's CUDA simulator, tests/test_sim_kernels.py). The
        # synchronization stays until a GPU run shows the asynchronous launch correct.
        torch.cuda.synchronize(x.device)
        with cuda.gpus[x.device.index or 0]:
            stream = cuda.external_stream(torch.cuda.current_stream(x.device).cuda_stream)
            launch(_cuda, cuda.as_cuda_array, stream)
            cuda.synchronize()
        return True
    except Exception as err:  # noqa: BLE001 -- ImportError, no driver, or a compile failure
        _CUDA_FAILED = f"{type(err).__name__}: {err}"
        warnings.warn(f"brevitas_a2q.sim: numba.cuda kernels unavailable ({_CUDA_FAILED}); "
                      "simulated accumulators on the GPU use the slower torch chain",
                      RuntimeWarning, stacklevel=3)
        return False


def cuda_forward(x: Tensor, w: Tensor, chunk: int, cfg: AccumulatorConfig
                 ) -> tuple[Tensor, Tensor] | None:
    """The chain on the GPU: ``(y (R, O) float64, counts (4,) int64: overflow events, outputs
    with an overflow, swamping, underflow)``, or None (use the torch chain)."""
    import torch

    from brevitas_a2q.sim import _cuda

    if _CUDA_FAILED is not None or not _cuda_supports(x.shape[1], chunk):
        return None
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    cnt = torch.empty(x.shape[0], w.shape[0], 4, dtype=torch.int32, device=x.device)
    xc, wt = x.detach().contiguous(), w.detach().t().contiguous()
    dummy = torch.zeros(1, 1, dtype=torch.float64, device=x.device)

    def launch(mod, arr, stream):
        mod._launch(0, cfg, arr(xc), arr(wt), chunk, arr(y), arr(cnt), arr(dummy), arr(dummy),
                    arr(dummy), arr(dummy), arr(dummy), stream)

    if not _cuda_call(x, launch):
        return None
    del _cuda
    return y, cnt.sum((0, 1), dtype=torch.int64)


def cuda_subtract_cut(ax: Tensor, aw: Tensor, chunk: int, cfg: AccumulatorConfig,
                      g: Tensor, xg: Tensor, wg: Tensor, gx: Tensor, gw: Tensor) -> bool:
    """``gx``, ``gw`` (float64, in place) minus the gradient of every product the config's
    fine-grained mode cuts; False where the kernels cannot run (nothing changed)."""
    import torch

    if _CUDA_FAILED is not None or not _cuda_supports(ax.shape[1], chunk):
        return False
    neg_g = (-g.detach()).contiguous()
    dummy = torch.zeros(1, 1, dtype=torch.float64, device=ax.device)
    dummy_i = torch.zeros(1, 1, 1, dtype=torch.int32, device=ax.device)
    xc, wt = ax.detach().contiguous(), aw.detach().t().contiguous()
    xgc, wgc = xg.detach().contiguous(), wg.detach().contiguous()

    def launch(mod, arr, stream):
        mod._launch(2 if cfg.gradient == "recursive" else 1, cfg, arr(xc), arr(wt), chunk,
                    arr(dummy), arr(dummy_i), arr(neg_g), arr(xgc), arr(wgc), arr(gx), arr(gw),
                    stream)

    return _cuda_call(ax, launch)


def _cuda_supports(k: int, chunk: int) -> bool:
    from brevitas_a2q.sim._cuda import MAX_CHUNK_WORDS, MAX_CHUNKS

    n_chunks = -(-k // chunk)
    return n_chunks <= MAX_CHUNKS and (n_chunks == 1 or chunk <= 32 * MAX_CHUNK_WORDS)
