"""The ResNet-20 of the low bit-width accumulator benchmark (``brevitas_a2q.train.resnet``): built
from Brevitas's ``QuantBasicBlock``, every convolution goes through the accumulator simulation and
the audit like the small networks do."""

from __future__ import annotations

import torch

from brevitas_a2q import accumulator_report
from brevitas_a2q.sim.layers import simulate_accumulators
from brevitas_a2q.train.resnet import build_resnet20


def _calibrated(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()(torch.randn(8, 1, 28, 28))
    return model.eval()


def test_resnet20_has_the_size_of_resnet20():
    model = build_resnet20()
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")
                  and p.dim() > 1)
    assert 265_000 < weights < 275_000  # He et al.: 0.27M
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 9 * 2 + 2  # stem, 9 basic blocks, 2 downsampling shortcuts


def test_a_wide_simulated_accumulator_reproduces_the_model_on_every_hidden_layer():
    """int32-sat never saturates on these layers, so the simulation must equal the model; every
    block convolution and shortcut is simulated, none skipped."""
    model = _calibrated(build_resnet20())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
        with simulate_accumulators(model, "int32-sat", {"conv1": None, "fc": None}) as stats:
            got = model(x)
    assert set(stats.skipped) == {"conv1", "fc"}
    assert len(stats.layers) == 20
    assert all(s.overflow_events == 0 for s in stats.layers.values())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a2q_plus_resnet20_meets_its_target_on_every_hidden_layer():
    model = _calibrated(build_resnet20("a2q+", acc_bits=14))
    report = {r.layer: r for r in accumulator_report(model, torch.randn(2, 1, 28, 28))}
    hidden = [n for n in report if n not in ("conv1", "fc")]
    assert len(hidden) == 20
    assert all(report[n].target_holds for n in hidden), [n for n in hidden
                                                         if not report[n].target_holds]
