"""The compiled (numba) accumulation chain against the step-by-step torch chain
(:func:`brevitas_a2q.sim.chain._run_chain`, the oracle): bit-identical values and every event
count on random and adversarial inputs (rounding ties, subnormals, overflow at the largest value,
saturation at the range's ends, zeros and negative zeros, ragged chunks), and the fine-grained
gradients equal to the chain's masked sums. Also: the package imports and simulates without
numba, and says so once."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brevitas_a2q.sim import kernels
from brevitas_a2q.sim.chain import _run_chain
from brevitas_a2q.sim.config import parse_accumulator
from brevitas_a2q.sim.gradients import _recursive_grads, simulate_matmul

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="needs numba (the kernels did not compile here)")

COUNTS = ("overflow_events", "overflow_outputs", "swamping_events", "underflow_events")
INT_SPECS = ["int8-sat", "int9-sat-c1", "int10-sat-c4", "int12-sat-c7", "int6-sat-c64"]
FLOAT_SPECS = ["fp8-e3m4", "fp12-e4m7", "fp12-e4m7-c16", "fp10-e3m6-rz", "fp9-e3m5-c5-rz",
               "fp6-e2m3-c3", "fp12-e4m7-b3"]


def _int_operands(gen, rows, outs, k, bits):
    """Integers whose partial sums wander across the range's ends: large same-sign runs, exact
    hits of +-2^(P-1) and 2^(P-1) - 1, zeros."""
    hi = 2 ** (bits - 1)
    x = torch.randint(-hi // 4, hi // 4 + 1, (rows, k), generator=gen).double()
    x[torch.rand(rows, k, generator=gen) < 0.3] = 0.0
    w = torch.randint(-7, 8, (outs, k), generator=gen).double()
    x[0] = 1.0
    w[0] = 1.0
    x[0, 0] = hi - 1  # the chain reaches exactly 2^(P-1) - 1, then 2^(P-1)
    if rows > 1:
        x[1] = -1.0
        x[1, 0] = -(hi - 2)  # exactly -2^(P-1), then one below
    return x, w


def _float_operands(gen, rows, outs, k, cfg):
    """float32-representable values around the format's edges: ties between neighbours
    (1 + 2^-(M+1)), the subnormal spacing and below, the largest value and beyond, signed
    zeros."""
    fmt = cfg.float_format
    m, emin, emax = fmt.man_bits, fmt.min_exponent, fmt.max_exponent
    exps = torch.randint(emin - m - 2, emax + 1, (rows, k), generator=gen).double()
    mant = torch.tensor([1.0, 1.5, 1 + 2.0**-m, 1 + 2.0 ** -(m + 1), 1.75])
    pick = torch.randint(0, len(mant), (rows, k), generator=gen)
    sign = torch.randint(0, 2, (rows, k), generator=gen).double() * 2 - 1
    x = sign * mant[pick].double() * torch.exp2(exps)
    x[torch.rand(rows, k, generator=gen) < 0.2] = 0.0
    x[torch.rand(rows, k, generator=gen) < 0.05] = -0.0
    w = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -0.25, 3.0]).double()[
        torch.randint(0, 8, (outs, k), generator=gen)]
    x = x.float().double()  # every product is then exact in float64
    return x, w


def _operands(spec, seed, rows=9, outs=6, k=41):
    cfg = parse_accumulator(spec)
    gen = torch.Generator().manual_seed(seed)
    if cfg.kind == "int":
        return cfg, *_int_operands(gen, rows, outs, k, cfg.bits)
    return cfg, *_float_operands(gen, rows, outs, k, cfg)


def _same(a, b):
    assert torch.equal(a.y.view(torch.int64), b.y.view(torch.int64)), "values differ (bits)"
    for count in COUNTS:
        assert getattr(a, count) == getattr(b, count), count


@pytest.mark.parametrize("spec", INT_SPECS + FLOAT_SPECS)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("outs", [6, 13], ids=["narrow", "row-wise"])  # kernels.NARROW_OUTPUTS
def test_kernel_forward_is_the_chain_bit_for_bit(spec, seed, outs):
    cfg, x, w = _operands(spec, seed, outs=outs)
    kernel, oracle = _run_chain(x, w, cfg), _run_chain(x, w, cfg, fast=False)
    _same(kernel, oracle)
    if seed == 0:  # the adversarial operands do exercise the events
        assert oracle.overflow_events + oracle.swamping_events + oracle.underflow_events > 0


@pytest.mark.parametrize("spec", ["int8-sat", "int8-sat-c3", "fp8-e3m4", "fp8-e3m4-c5-rz"])
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_kernel_forward_edge_shapes(spec, k):
    # K below, at and above the chunk; one row; a single output; either side of NARROW_OUTPUTS
    for rows, outs in [(1, 1), (3, 2), (2, 11), (3, 12)]:
        cfg, x, w = _operands(spec, k, rows=rows, outs=outs, k=k)
        _same(_run_chain(x, w, cfg), _run_chain(x, w, cfg, fast=False))


@pytest.mark.parametrize("spec", FLOAT_SPECS + ["int8-sat", "int10-sat-c4"])
@pytest.mark.parametrize("rows,outs", [(13, 1), (8, 4), (17, 11)])
def test_narrow_kernel_is_the_chain_bit_for_bit(spec, rows, outs):
    # kernels.forward itself (the integer layers' block method would otherwise take these), on
    # tiles of rows with some lanes past the last row
    assert outs < kernels.NARROW_OUTPUTS
    cfg, x, w = _operands(spec, rows + outs, rows=rows, outs=outs, k=37)
    chunk = min(cfg.chunk_size or 37, 37)
    y, counts = kernels.forward(x.numpy(), w.t().contiguous().numpy(), np.arange(rows), chunk,
                                cfg)
    oracle = _run_chain(x, w, cfg, fast=False)
    assert torch.equal(torch.from_numpy(y).view(torch.int64), oracle.y.view(torch.int64))
    assert counts.sum(0).tolist() == [getattr(oracle, c) for c in COUNTS]


@pytest.mark.parametrize("spec,bounded", [(s, False) for s in INT_SPECS + FLOAT_SPECS]
                         + [(s, True) for s in FLOAT_SPECS])  # (integers: always compared)
@pytest.mark.parametrize("outs_per_group,k", [(1, 9), (3, 9), (1, 25), (2, 1)])
def test_grouped_kernel_is_each_groups_chain_bit_for_bit(spec, bounded, outs_per_group, k):
    """:func:`kernels.grouped_forward` (every output with an input row of its own, as in a
    depthwise convolution) against the chain of each group on its own; ``no-overflow``: the
    floating-point inputs scaled by a power of two until no addition can overflow, where the
    kernel leaves out the comparisons with the largest value."""
    from brevitas_a2q.sim.fast import may_overflow

    groups, rows = 5, 11
    parts = [_operands(spec, 10 * k + g, rows=rows, outs=outs_per_group, k=k)
             for g in range(groups)]
    cfg = parts[0][0]
    if bounded:  # 2^-e: exact, the ties and subnormal spacings of the operands scale along
        largest = max(float(p[1].abs().sum(1).max() * p[2].abs().max()) for p in parts)
        e = max(0, math.ceil(math.log2(32 * largest / cfg.float_format.max_value)))
        parts = [(c, x * 2.0**-e, w) for c, x, w in parts]
    x = torch.stack([p[1] for p in parts], dim=2)  # (R, K, G)
    w = torch.cat([p[2] for p in parts])  # (G * m, K)
    chunk = min(cfg.chunk_size or k, k)
    check = may_overflow(x.transpose(1, 2).reshape(-1, k), w, cfg, chunk)
    assert check != bounded
    x_out = x.repeat_interleave(outs_per_group, dim=2).contiguous().numpy()
    y, counts = kernels.grouped_forward(x_out, w.t().contiguous().numpy(), chunk, cfg, check)
    oracles = [_run_chain(p[1], p[2], cfg, fast=False) for p in parts]
    expected = torch.cat([o.y for o in oracles], dim=1)
    assert torch.equal(torch.from_numpy(y).view(torch.int64), expected.view(torch.int64))
    for i, count in enumerate(COUNTS):
        assert int(counts[:, i].sum()) == sum(getattr(o, count) for o in oracles), count
    if k > 1:  # the adversarial operands do exercise the events
        assert counts[:, [0, 2, 3]].sum() > 0


@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int8-sat", "int9-sat-c2", "fp8-e3m4", "fp6-e2m3-c3",
                                  "fp9-e3m5-c4-rz", "fp12-e4m7-c16"])
@pytest.mark.parametrize("outs_per_group", [1, 3])
def test_grouped_kernel_gradients_equal_each_groups_chain_masks(spec, mode, outs_per_group):
    """The products :func:`kernels.grouped_forward` marks as kept give each group's
    fine-grained gradients as the chain's masks do (:func:`_oracle_grads`)."""
    from brevitas_a2q.sim import grouped

    groups, rows, k = 4, 13, 9
    parts = [_operands(spec, 7 + g, rows=rows, outs=outs_per_group, k=k) for g in range(groups)]
    cfg = parse_accumulator(spec, gradient=mode)
    x_kg = torch.stack([p[1] for p in parts], dim=2)  # (R, K, groups)
    w = torch.cat([p[2] for p in parts])
    g = torch.randn(rows, w.shape[0], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    chain, keep_bits = grouped.grouped_chain(x_kg, w, cfg, record=True)
    keep = np.unpackbits(keep_bits.numpy(), axis=2, count=w.shape[0]).view(np.bool_)
    gx, gw = grouped.fine_grained_grads(torch.from_numpy(keep), g, x_kg, w)
    cut = False
    for i, (_, x, wg) in enumerate(parts):
        outs = slice(i * outs_per_group, (i + 1) * outs_per_group)
        ox, ow = _oracle_grads(x, wg, x, wg, g[:, outs], cfg)
        torch.testing.assert_close(gx[:, :, i], ox, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw[outs], ow, rtol=1e-12, atol=1e-12)
        cut |= not torch.allclose(ox, g[:, outs] @ wg)
    assert cut, "the case must cut some gradient"


def test_kernel_forward_random_gaussian_float32():
    # the layers' floating-point case: float32 activations and weights, nothing engineered
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 300, generator=gen).relu().float().double()
    w = (torch.randn(20, 300, generator=gen) * 0.1).float().double()
    for spec in ["fp12-e4m7", "fp12-e4m7-c16", "fp10-e5m4-c8", "fp16-e5m10-rz"]:
        cfg = parse_accumulator(spec)
        _same(_run_chain(x, w, cfg), _run_chain(x, w, cfg, fast=False))


def _oracle_grads(ax, aw, xv, wv, g, cfg):
    k = ax.shape[1]
    chunk = min(cfg.chunk_size or k, k)
    if cfg.gradient == "recursive":
        rec = _run_chain(ax, aw, cfg, record="recursive")
        return _recursive_grads(xv, wv, g, chunk, rec.last_step_event, rec.last_combine_event)
    rec = _run_chain(ax, aw, cfg, record="immediate")
    res = _run_chain(ax, aw, cfg, grad=g, grad_factors=(xv, wv), keep_chunk=~rec.combine_event)
    return res.grad_x, res.grad_w


@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int8-sat", "int10-sat-c4", "int9-sat-c1", "fp8-e3m4",
                                  "fp12-e4m7-c16", "fp9-e3m5-c5-rz", "fp6-e2m3-c3"])
@pytest.mark.parametrize("seed", range(3))
def test_kernel_gradients_equal_the_chain_masks(spec, mode, seed):
    cfg, x, w = _operands(spec, seed)
    cfg = parse_accumulator(spec, gradient=mode)
    # real-valued factors: integers times power-of-two scales for int, the values for float
    xs, ws = (0.5, torch.full((w.shape[0],), 0.25, dtype=torch.float64)) if cfg.kind == "int" \
        else (1.0, torch.ones(w.shape[0], dtype=torch.float64))
    xv = (x * xs).requires_grad_(True)
    wv = (w * ws[:, None]).requires_grad_(True)
    g = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    y, _ = simulate_matmul(xv, wv, xs, ws, cfg)
    y.backward(g)
    gx, gw = _oracle_grads(x, w, xv.detach(), wv.detach(), g, cfg)
    full_x, full_w = g @ wv.detach(), g.t() @ xv.detach()
    assert not torch.allclose(gx, full_x), "the case must cut some gradient"
    torch.testing.assert_close(xv.grad, gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wv.grad, gw, rtol=1e-12, atol=1e-12)
    del full_w


def test_kernels_ask_llvm_for_512_bit_vectors():
    """``wide_vectors`` puts the attribute on the function that calls it, and the chain's
    helpers call it (a numba or llvmlite that dropped it would leave the kernels at 256 bits,
    correct but slower)."""
    pytest.importorskip("numba", reason="numba is not installed")
    import inspect

    from numba import njit

    from brevitas_a2q.sim import _jit, _jit_blocks

    @njit(cache=False)
    def double_all(a):
        _jit.wide_vectors()
        for i in range(a.size):
            a[i] *= 2.0

    double_all(np.ones(4))
    ir = double_all.inspect_llvm(double_all.signatures[0])
    assert '"prefer-vector-width"="512"' in ir
    for helper in (_jit.rnd, _jit.add_range, _jit_blocks.block_pass, _jit_blocks.failed_steps):
        assert "wide_vectors()" in inspect.getsource(helper.py_func), helper.py_func.__name__


def test_cached_kernels_are_stamped_with_every_kernel_source(tmp_path):
    """numba's cache checks only the file that defines a kernel; ours inline helpers from
    ``_jit.py``. Every cached kernel must carry the stamp of all ``_jit*.py`` files, so that an
    edit to any of them (here, of a copy's ``_jit.py`` alone) recompiles it."""
    pytest.importorskip("numba", reason="numba is not installed")
    from numba.core.registry import CPUDispatcher

    from brevitas_a2q.sim import _jit, _jit_blocks, _jit_cache, _jit_events

    kernels_seen = 0
    for module in (_jit, _jit_blocks, _jit_events):
        for name, fn in vars(module).items():
            if isinstance(fn, CPUDispatcher) and fn._cache.__class__.__name__ != "NullCache":
                locator = fn._cache._impl.locator
                assert locator.get_source_stamp() == _jit_cache.sources_digest(), name
                kernels_seen += 1
    assert kernels_seen >= 10

    here = Path(_jit.__file__).parent
    for source in here.glob(_jit_cache.SOURCE_GLOB):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    before = _jit_cache.sources_digest(tmp_path)
    assert before == _jit_cache.sources_digest(here)
    (tmp_path / "_jit.py").write_text((here / "_jit.py").read_text() + "\n# edited\n")
    assert _jit_cache.sources_digest(tmp_path) != before


def test_package_works_without_numba_and_says_so_once():
    code = (
        "import sys, warnings; sys.modules['numba'] = None\n"
        "import torch\n"
        "from brevitas_a2q.sim.chain import _run_chain\n"
        "from brevitas_a2q.sim.config import parse_accumulator\n"
        "x = torch.randint(-20, 20, (4, 30)).double(); w = torch.randint(-7, 8, (3, 30)).double()\n"
        "cfg = parse_accumulator('int8-sat')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    a = _run_chain(x, w, cfg); b = _run_chain(x, w, cfg)\n"
        "c = _run_chain(x, w, cfg, fast=False)\n"
        "assert torch.equal(a.y, c.y) and a.overflow_events == c.overflow_events\n"
        "msgs = [str(m.message) for m in seen if 'numba' in str(m.message)]\n"
        "print(len(msgs)); print(msgs[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "1"
    assert "torch chain" in out[1]


_SIMULATED_CUDA = '''
import numpy as np, torch
from test_sim_kernels import _operands, _oracle_grads
from brevitas_a2q.sim import _cuda
from brevitas_a2q.sim.chain import _run_chain
from brevitas_a2q.sim.config import parse_accumulator
# K = 2100: one chunk longer than the 64 words of chunk-event bits (2,048 products), which the
# "immediate" kernel once cleared past their end (an illegal address on the H200)
cases = [(spec, 13) for spec in ["int8-sat", "int10-sat-c4", "fp8-e3m4", "fp12-e4m7-c16",
                                 "fp9-e3m5-c5-rz", "fp6-e2m3-c3"]]
for spec, k in cases + [("fp12-e4m7", 2100)]:
    cfg, x, w = _operands(spec, 0, rows=3 if k < 100 else 1, outs=3, k=k)
    chunk = min(cfg.chunk_size or k, k)
    wt = w.t().contiguous().numpy()
    y, cnt = _cuda.forward(x.numpy(), wt, chunk, cfg)
    oracle = _run_chain(x, w, cfg, fast=False)
    assert torch.equal(torch.from_numpy(np.asarray(y)).view(torch.int64),
                       oracle.y.view(torch.int64)), spec
    counts = np.asarray(cnt).sum((0, 1)).tolist()
    assert counts == [oracle.overflow_events, oracle.overflow_outputs, oracle.swamping_events,
                      oracle.underflow_events], spec
    for mode in ["immediate", "recursive"]:
        cfg = parse_accumulator(spec, gradient=mode)
        g = torch.randn(x.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        gx, gw = (g @ w).numpy().copy(), (g.t() @ x).numpy().copy()
        _cuda.subtract_cut(x.numpy(), wt, chunk, cfg, mode == "recursive", (-g).numpy(),
                           x.numpy(), w.numpy(), gx, gw)
        ox, ow = _oracle_grads(x, w, x, w, g, cfg)
        assert np.allclose(gx, ox.numpy(), rtol=1e-12, atol=1e-12), (spec, mode)
        assert np.allclose(gw, ow.numpy(), rtol=1e-12, atol=1e-12), (spec, mode)
print("checked")
'''


def test_cuda_kernels_under_numbas_simulator_equal_the_chain():
    # the GPU kernels' logic (one thread per output, cut gradients subtracted) run by numba's
    # CUDA simulator on the CPU: values, counts and gradients as the chain's; on a GPU,
    # tests/test_sim_cuda.py runs them compiled
    import os
    from pathlib import Path

    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent)] + sys.path))
    out = subprocess.run([sys.executable, "-c", _SIMULATED_CUDA], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "checked"


# Integer saturation by blocks (brevitas_a2q.sim.saturating): sizes with several blocks per
# chain and enough (row, output) pairs that the method applies; each sum type it can take

def _block_operands(seed, signed, scale, rows=130, outs=40, k=300):
    """Operands whose partial sums cross the P-bit range's ends, some outputs often, others
    never: ``scale`` 1 gives int8 operands, 16 float32 sums, 2^20 float64 sums."""
    gen = torch.Generator().manual_seed(seed)
    low = -3 if signed else 0
    x = torch.randint(low, 16, (rows, k), generator=gen).double() * scale
    x[torch.rand(rows, k, generator=gen) < 0.4] = 0.0
    w = torch.randint(-7, 8, (outs, k), generator=gen).double()
    w[: outs // 4] = w[: outs // 4].abs()  # same-sign rows: long saturated runs
    return x, w


@pytest.fixture(params=[1, 2], ids=["serial", "threads"])
def kernel_threads(request):
    """Run the block kernels in the calling thread (their serial twins, as with one torch
    thread) or over two threads (their parallel versions), as ``torch.get_num_threads`` asks."""
    import numba

    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip(f"numba has {numba.config.NUMBA_NUM_THREADS} thread(s) on this machine; "
                    f"the parallel kernels need {request.param}")
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("spec,scale", [("int10-sat", 1), ("int12-sat-c100", 1),
                                        ("int9-sat-c8", 1), ("int16-sat-c16", 16),
                                        ("int32-sat-c40", 2.0**20), ("int12-sat-c300", 1)])
@pytest.mark.parametrize("signed", [False, True])
def test_saturating_blocks_are_the_chain_bit_for_bit(spec, scale, signed, kernel_threads):
    from brevitas_a2q.sim import saturating

    cfg = parse_accumulator(spec)
    x, w = _block_operands(0, signed, scale)
    chunk = min(cfg.chunk_size or x.shape[1], x.shape[1])
    blocks = saturating.chain(x, w, cfg, chunk)
    assert blocks is not None, "the block method must apply to these operands"
    oracle = _run_chain(x, w, cfg, fast=False)
    _same(blocks, oracle)
    assert oracle.overflow_events > 0


@pytest.mark.parametrize("spec,rows,outs,k", [("int9-sat-c4", 130, 40, 40),  # chunks < 8
                                               ("int10-sat", 8, 8, 300),  # 64 pairs
                                               ("int9-sat-c50", 3, 10, 300)])
def test_saturating_layers_without_blocks_run_step_by_step(spec, rows, outs, k, kernel_threads):
    # too short chunks or too few (row, output) pairs for blocks: every step, all outputs at
    # once (saturating._jit_blocks.stepwise), bit for bit with the chain
    from brevitas_a2q.sim import saturating

    cfg = parse_accumulator(spec)
    x, w = _block_operands(0, False, 1, rows, outs, k)
    chunk = min(cfg.chunk_size or k, k)
    assert saturating._blocks(x, w, cfg, chunk, integers=False) is None
    oracle = _run_chain(x, w, cfg, fast=False)
    assert oracle.overflow_events > 0
    _same(saturating.chain(x, w, cfg, chunk), oracle)
    assert saturating.chain(x * 0.5, w, cfg, chunk) is None  # not integers: the chain


@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int10-sat", "int10-sat-c16", "int12-sat-c100", "int9-sat-c8"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(), (8, 8, 300)], ids=["many-pairs", "64-pairs"])
def test_saturating_block_gradients_equal_the_chain_masks(spec, mode, signed, shape,
                                                          kernel_threads):
    # by blocks, also where the forward pass has too few (row, output) pairs for them
    from brevitas_a2q.sim import saturating

    cfg = parse_accumulator(spec, gradient=mode)
    x, w = _block_operands(1, signed, 1, *shape)
    xs, ws = 0.5, torch.full((w.shape[0],), 0.25, dtype=torch.float64)
    xv, wv = (x * xs).requires_grad_(True), (w * ws[:, None]).requires_grad_(True)
    g = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    assert saturating.chain(x, w, cfg, min(cfg.chunk_size or 300, 300)) is not None
    y, _ = simulate_matmul(xv, wv, xs, ws, cfg)
    y.backward(g)
    gx, gw = _oracle_grads(x, w, xv.detach(), wv.detach(), g, cfg)
    assert not torch.allclose(gx, g @ wv.detach()), "the case must cut some gradient"
    torch.testing.assert_close(xv.grad, gx, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(wv.grad, gw, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("spec", ["fp12-e4m7", "fp10-e4m5-c16", "fp9-e3m5-c5-rz"])
def test_recursive_float_gradients_with_late_and_early_events(spec):
    # recursive keeps the products after each output's last event: the kernel subtracts the
    # cut prefix where it is the shorter, adds the kept suffix where that is; both occur here
    cfg = parse_accumulator(spec, gradient="recursive")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 200, generator=gen).float().double()
    w = (torch.randn(10, 200, generator=gen) * 0.3).float().double()
    x[:12, 150:] *= 1e-4  # tiny late addends: swamped, so the last event comes late
    xv, wv = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    g = torch.randn(24, 10, generator=gen, dtype=torch.float64)
    y, _ = simulate_matmul(xv, wv, 1.0, torch.ones(10, dtype=torch.float64), cfg)
    y.backward(g)
    gx, gw = _oracle_grads(x, w, x, w, g, cfg)
    torch.testing.assert_close(xv.grad, gx, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(wv.grad, gw, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("spec", ["fp8-e4m3", "fp12-e4m7", "fp10-e3m6-c8", "fp9-e3m5-c5-rz",
                                  "fp6-e2m3-c3"])
@pytest.mark.parametrize("seed", range(4))
def test_no_overflow_proof_holds_where_the_kernel_skips_the_check(spec, seed):
    # may_overflow False lets the kernels skip every comparison with the largest value: the
    # operands are scaled so that the proof's bound (2 L, 4 L with chunks, L toward zero) is
    # just inside the range, with same-sign runs that round up at every step where they can
    from brevitas_a2q.sim.fast import may_overflow

    cfg = parse_accumulator(spec)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 90, generator=gen).float().double()
    x[:, : 30 + 10 * seed] = x[:, :1]  # equal addends: each rounds up by up to half an ulp
    w = torch.ones(5, 90, dtype=torch.float64)
    w[1:] = (torch.rand(4, 90, generator=gen) * 2 - 1).float().double()
    chunk = min(cfg.chunk_size or 90, 90)
    factor = 1 if cfg.float_format.rounding != "nearest" else (4 if chunk < 90 else 2)
    l1 = float(x.abs().sum(1).max())
    x = (x * (cfg.float_format.max_value / (factor * l1) * 0.999)).float().double()
    assert not may_overflow(x, w, cfg, chunk)
    oracle = _run_chain(x, w, cfg, fast=False)
    assert oracle.overflow_events == 0
    _same(_run_chain(x, w, cfg), oracle)
    x *= 4  # beyond the bound: the check is kept
    assert may_overflow(x, w, cfg, chunk)
    _same(_run_chain(x, w, cfg), _run_chain(x, w, cfg, fast=False))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["fp12-e4m7", "fp12-e4m7-c16", "fp8-e3m4", "fp9-e3m5-c5-rz",
                                  "fp6-e2m3-c3", "fp10-e3m6-c8"])
def test_event_log_gradients_equal_the_chain_masks(spec, mode, threads):
    # floating point on CPU: the forward pass logs its events and the backward pass cuts from
    # the log (no second chain); several tiles of rows, split over threads, and a log that
    # outgrows its first allocation
    cfg = parse_accumulator(spec, gradient=mode)
    _, x, w = _operands(spec, 11, rows=53, outs=13, k=77)
    xv, wv = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    g = torch.randn(53, 13, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, chain = simulate_matmul(xv, wv, 1.0, torch.ones(13, dtype=torch.float64), cfg)
        y.backward(g)
    finally:
        torch.set_num_threads(before)
    one_chunk = cfg.chunk_size is None
    if mode == "recursive" and one_chunk:  # each output's last event is all it needs
        assert chain.event_log is None and chain.last_step_event is not None
    else:
        assert chain.event_log is not None and len(chain.event_log[1]) > 4096
    oracle = _run_chain(x, w, cfg, fast=False)
    assert torch.equal(y.detach().view(torch.int64), oracle.y.view(torch.int64))
    for count in COUNTS:
        assert getattr(chain, count) == getattr(oracle, count), count
    gx, gw = _oracle_grads(x, w, x, w, g, cfg)
    assert not torch.allclose(gx, g @ w), "the case must cut some gradient"
    torch.testing.assert_close(xv.grad, gx, rtol=1e-12, atol=1e-11)
    torch.testing.assert_close(wv.grad, gw, rtol=1e-12, atol=1e-11)


def test_event_log_declines_layers_whose_entries_would_not_fit_int32():
    import numpy as np

    cfg = parse_accumulator("fp12-e4m7")
    w_t = np.broadcast_to(np.zeros(1), (2**14, 2**15))  # K and O of 15 and 16 bits: no memory
    x = np.zeros((8, 2**14), dtype=np.float32)
    assert kernels.forward_events(x, w_t, np.arange(8), 2**14, cfg, False, 1) is None
