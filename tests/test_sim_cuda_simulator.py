"""The numba.cuda kernels of the simulated accumulators, run without a GPU under numba's CUDA
simulator (tests/cuda_simulated.py, in a process of its own), against the CPU's step-by-step
chain: the forward values bit for bit with the same event counts, and the fine-grained gradients
(the exact gradient less the products each thread cuts) against the torch chain's to float64
rounding. The simulator checks every index of the kernels' local arrays, which a GPU does not:
a single chunk longer than 2,048 products (a classifier's K) once wrote past the chunk-event
bits, an illegal address on the H200. tests/test_sim_cuda.py runs the same kernels on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brevitas_a2q.sim.chain import _run_chain
from brevitas_a2q.sim.config import parse_accumulator
from brevitas_a2q.sim.gradients import _torch_chain_grads

pytest.importorskip("numba", reason="needs numba (its CUDA simulator)")

HELPER = Path(__file__).with_name("cuda_simulated.py")
# (spec, gradient, K): each rounding mode, with and without chunks (toward zero: a last chunk
# padded with zeros, whose steps the kernel still runs), and one chunk of more than 2,048
# products (64 words of chunk-event bits) under "immediate"
CASES = [("int9-sat", "immediate", 70), ("int10-sat-c8", "immediate", 70),
         ("int10-sat-c8", "recursive", 70), ("fp8-e3m4", "immediate", 70),
         ("fp8-e3m4", "recursive", 70), ("fp12-e4m7-c16", "immediate", 70),
         ("fp12-e4m7-c16", "recursive", 70), ("fp10-e3m6-rz", "immediate", 70),
         ("fp8-e3m4-c8-rz", "recursive", 70), ("fp8-e3m4-c8-rz", "immediate", 70),
         ("fp6-e2m3-c5", "recursive", 70), ("fp8-e3m4-c5", "immediate", 70),
         ("fp12-e4m7", "immediate", 2100), ("int12-sat", "immediate", 2100),
         ("fp12-e4m7", "recursive", 2100)]


def _operands(spec: str, k: int, seed: int) -> tuple[np.ndarray, ...]:
    gen = torch.Generator().manual_seed(seed)
    rows, outs = 3, 4
    if parse_accumulator(spec).kind == "int":
        x = torch.randint(-60, 61, (rows, k), generator=gen).double()
        w = torch.randint(-7, 8, (outs, k), generator=gen).double()
    else:
        x = torch.randn(rows, k, generator=gen).relu().float().double()
        w = (torch.randn(outs, k, generator=gen) * 0.3).float().double()
    x[torch.rand(x.shape, generator=gen) < 0.2] = 0.0
    g = torch.randn(rows, outs, generator=gen, dtype=torch.float64)
    return x.numpy(), w.numpy(), g.numpy()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    """Every case through the simulated kernels in one process (numba imports once)."""
    tmp = tmp_path_factory.mktemp("cudasim")
    cases = {"n": np.array(len(CASES))}
    for i, (spec, gradient, k) in enumerate(CASES):
        x, w, g = _operands(spec, k, i)
        chunk = min(parse_accumulator(spec).chunk_size or k, k)
        cases.update({f"spec_{i}": np.array(spec), f"gradient_{i}": np.array(gradient),
                      f"chunk_{i}": np.array(chunk), f"x_{i}": x, f"w_{i}": w, f"g_{i}": g})
    np.savez(tmp / "cases.npz", **cases)
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run([sys.executable, str(HELPER), str(tmp / "cases.npz"),
                          str(tmp / "results.npz")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return {"cases": dict(np.load(tmp / "cases.npz")), "results": dict(np.load(tmp / "results.npz"))}


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{s}-{g}-k{k}" for s, g, k in CASES])
def test_cuda_kernels_equal_the_cpu_chain(simulated, i):
    cases, results = simulated["cases"], simulated["results"]
    error = results.get(f"error_{i}")
    assert error is None, str(error)
    spec, gradient = str(cases[f"spec_{i}"]), str(cases[f"gradient_{i}"])
    cfg = parse_accumulator(spec, gradient=gradient)
    x, w, g = (torch.from_numpy(cases[f"{n}_{i}"]) for n in "xwg")
    chain = _run_chain(x, w, cfg, fast=False)
    y = torch.from_numpy(results[f"y_{i}"])
    assert torch.equal(y.view(torch.int64), chain.y.view(torch.int64))  # bit for bit
    assert results[f"counts_{i}"].tolist() == [chain.overflow_events, chain.overflow_outputs,
                                               chain.swamping_events, chain.underflow_events]
    assert chain.overflow_events + chain.swamping_events + chain.underflow_events > 0, \
        "the case has no event: nothing of the gradient is cut"
    gx, gw = _torch_chain_grads(x, w, x, w, g, cfg, int(cases[f"chunk_{i}"]))
    torch.testing.assert_close(torch.from_numpy(results[f"gx_{i}"]), gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.from_numpy(results[f"gw_{i}"]), gw, rtol=1e-12, atol=1e-12)
