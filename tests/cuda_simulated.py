"""Runs the numba.cuda kernels of :mod:`brevitas_a2q.sim._cuda` under numba's CUDA simulator (no
GPU: each GPU thread a Python thread, local arrays bounds-checked numpy arrays), for
tests/test_sim_cuda_simulator.py. The simulator must be chosen before numba.cuda is imported, so
this runs in a process of its own:

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_simulated.py CASES.npz RESULTS.npz

Each case ``i`` of CASES gives ``spec_i``, ``gradient_i``, ``chunk_i`` and the operands ``x_i``
(R, K), ``w_i`` (O, K), ``g_i`` (R, O) (float64); RESULTS gets the kernels' ``y_i``, ``counts_i``
(summed over outputs: overflow events, outputs with an overflow, swamping, underflow) and the
fine-grained gradients ``gx_i``, ``gw_i`` as the GPU path makes them (the exact gradient, then
the cut products' subtracted by the kernel), or ``error_i`` where a kernel raised.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def run_case(data, i: int) -> dict:
    from numba import cuda

    from brevitas_a2q.sim import _cuda
    from brevitas_a2q.sim.config import parse_accumulator

    cfg = parse_accumulator(str(data[f"spec_{i}"]), gradient=str(data[f"gradient_{i}"]))
    chunk = int(data[f"chunk_{i}"])
    x, w, g = data[f"x_{i}"], data[f"w_{i}"], data[f"g_{i}"]
    dx, dwt = cuda.to_device(x), cuda.to_device(np.ascontiguousarray(w.T))
    y, counts = _cuda.forward(dx, dwt, chunk, cfg)
    gx, gw = cuda.to_device(g @ w), cuda.to_device(g.T @ x)
    _cuda.subtract_cut(dx, dwt, chunk, cfg, cfg.gradient == "recursive", cuda.to_device(-g),
                       dx, cuda.to_device(w), gx, gw)
    return {f"y_{i}": y.copy_to_host(), f"counts_{i}": counts.copy_to_host().sum((0, 1)),
            f"gx_{i}": gx.copy_to_host(), f"gw_{i}": gw.copy_to_host()}


def main(cases: str, results: str) -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        print("cuda_simulated.py: set NUMBA_ENABLE_CUDASIM=1 (numba's CUDA simulator)",
              file=sys.stderr)
        return 2
    data = np.load(cases)
    out = {}
    for i in range(int(data["n"])):
        try:
            out.update(run_case(data, i))
        except Exception as err:  # noqa: BLE001 -- reported to the test, per case
            out[f"error_{i}"] = np.array(f"{type(err).__name__}: {err}")
    np.savez(results, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
