"""On a CUDA GPU: the quantizers (A2Q, A2Q+, budgeted rounding, the exact guard) and the
simulated accumulators keep every tensor on the model's device, and give what the CPU gives:
the accumulation chain bit for bit (values and event counts) against the CPU step-by-step chain,
the fine-grained gradients and a whole training step to float tolerance. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from brevitas_a2q.sim.chain import _run_chain
from brevitas_a2q.sim.config import parse_accumulator
from brevitas_a2q.sim.gradients import simulate_matmul
from brevitas_a2q.sim.layers import simulate_accumulators
from brevitas_a2q.train.models import build_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

COUNTS = ("overflow_events", "overflow_outputs", "swamping_events", "underflow_events")


def _operands(spec: str, seed: int):
    cfg = parse_accumulator(spec)
    gen = torch.Generator().manual_seed(seed)
    if cfg.kind == "int":
        x = torch.randint(-60, 61, (33, 70), generator=gen).double()
        w = torch.randint(-7, 8, (12, 70), generator=gen).double()
    else:
        x = torch.randn(33, 70, generator=gen).relu().float().double()
        w = (torch.randn(12, 70, generator=gen) * 0.3).float().double()
    x[torch.rand(x.shape, generator=gen) < 0.2] = 0.0
    return cfg, x, w


@pytest.mark.parametrize("spec", ["int9-sat", "int10-sat-c8", "fp8-e3m4", "fp12-e4m7-c16",
                                  "fp10-e3m6-rz", "fp6-e2m3-c5"])
@pytest.mark.parametrize("fast", [True, False])
def test_chain_on_cuda_is_the_cpu_chain(spec, fast):
    cfg, x, w = _operands(spec, 0)
    gpu = _run_chain(x.cuda(), w.cuda(), cfg, fast=fast)
    cpu = _run_chain(x, w, cfg, fast=False)
    assert gpu.y.device.type == "cuda"
    assert torch.equal(gpu.y.cpu().view(torch.int64), cpu.y.view(torch.int64))
    for count in COUNTS:
        assert getattr(gpu, count) == getattr(cpu, count), count


@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int9-sat-c8", "fp8-e3m4-c5"])
def test_fine_grained_gradients_on_cuda(spec, mode):
    cfg = parse_accumulator(spec, gradient=mode)
    _, x, w = _operands(spec, 1)
    g = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    grads = []
    for dev in ("cpu", "cuda"):
        xv = x.to(dev).clone().requires_grad_(True)
        wv = w.to(dev).clone().requires_grad_(True)
        y, _ = simulate_matmul(xv, wv, 1.0, torch.ones(w.shape[0], device=dev), cfg)
        y.backward(g.to(dev))
        assert xv.grad.device.type == dev
        grads.append((y.detach().cpu(), xv.grad.cpu(), wv.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[1][2], grads[0][2], rtol=1e-10, atol=1e-10)


def _models(quant: str, rounding: str):
    torch.manual_seed(0)
    cpu = build_cnn(quant, acc_bits=12, image_size=8, rounding=rounding)
    return cpu, copy.deepcopy(cpu).cuda()


@pytest.mark.parametrize("quant,rounding", [("a2q", "zero"), ("a2q+", "zero"),
                                            ("a2q+", "budgeted")])
@pytest.mark.parametrize("spec", [None, "int12-sat", "fp12-e4m7-c16"])
def test_training_step_on_cuda_matches_cpu(quant, rounding, spec):
    # quantizers, budgeted rounding and the guard run on the GPU; with a simulated accumulator
    # the whole step too (immediate gradients where simulated)
    cpu, gpu = _models(quant, rounding)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.train()
        ctx = simulate_accumulators(model, spec, gradient="immediate") if spec else None
        if ctx:
            ctx.__enter__()
        try:
            out = model(x.to(dev))
            F.cross_entropy(out, labels.to(dev)).backward()
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        assert out.device.type == dev
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(g.device.type == dev for g in grads.values())
        results.append((out.detach().cpu(), {n: g.cpu() for n, g in grads.items()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    assert results[0][1].keys() == results[1][1].keys()
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-3, atol=1e-4, msg=name)


def test_a2q_holds_its_target_on_cuda():
    # the guarantee as seen by the simulation: no overflow at P = 12 after a few GPU steps
    cpu, gpu = _models("a2q+", "budgeted")
    del cpu
    opt = torch.optim.Adam(gpu.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        x = torch.rand(32, 1, 8, 8, generator=gen).cuda()
        labels = torch.randint(0, 10, (32,), generator=gen).cuda()
        opt.zero_grad()
        F.cross_entropy(gpu(x), labels).backward()
        opt.step()
    gpu.eval()
    with simulate_accumulators(gpu, "int12-sat", {"conv1": None}) as stats, torch.no_grad():
        gpu(torch.rand(64, 1, 8, 8, generator=gen).cuda() * 4)
    assert stats.layers and stats.total_overflow_events == 0, stats.to_dict()


@pytest.mark.parametrize("spec", ["int8-sat-c4", "fp9-e4m4"])
def test_transposed_convolution_on_cuda_is_the_cpus(spec):
    # an upsampling layer as the direct convolution that computes it: its zero-stuffed input
    # and flipped kernel stay on the GPU; values and events as on the CPU, recursive gradients
    from brevitas.nn import QuantConvTranspose2d, QuantIdentity
    from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    torch.manual_seed(0)
    cpu = torch.nn.Sequential(
        QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        QuantConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, bias=False,
                             weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.rand(2, 6, 7, 7, generator=torch.Generator().manual_seed(1)) * 4
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        with simulate_accumulators(model, spec, gradient="recursive") as stats:
            out = model(x.to(dev))
            out.square().sum().backward()
        assert out.device.type == dev
        (layer_stats,) = stats.layers.values()
        grad = model[1].weight.grad
        results.append((out.detach().cpu(), grad.cpu(),
                        [getattr(layer_stats, c) for c in COUNTS]))
    assert torch.equal(results[1][0], results[0][0])
    assert results[1][2] == results[0][2]
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-4)
