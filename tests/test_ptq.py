"""Accumulator-aware PTQ (brevitas_a2q.ptq): the guarantee is exact, checked on the integer
weights with the exact accumulator range (an oracle independent of the rounding's own budget
arithmetic), for several seeds, P and both variants, including targets where plain rounding
of the same float weights overflows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brevitas_a2q.analysis.audit import capture_layers
from brevitas_a2q.ptq.convert import layerwise_a2q, quantized_twin
from brevitas_a2q.ptq.pipeline import quantize_weights
from brevitas_a2q.ptq.rounding import ChannelBudget, constrained_greedy_round, l1_threshold
from brevitas_a2q.quant.bounds import exact_accumulator_range, input_range
from brevitas_a2q.train.ep_init import project_onto_l1_ball
from brevitas_a2q.train.models import build_float_cnn, copy_float_weights


def _exact_bits(rows: torch.Tensor, bits: int, signed: bool) -> int:
    return exact_accumulator_range(rows.to(torch.int64).numpy(),
                                   *input_range(bits, signed)).signed_bits


def _float_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_float_cnn(1, 8)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _rtn_overflows(float_model: nn.Module, quant_model: nn.Module, example, name: str,
                   target: int, weight_bits: int) -> bool:
    """Whether round-to-nearest of the float weights at the max-based per-channel scale (what a
    plain quantizer does) would exceed ``target`` in layer ``name``."""
    cap = next(c for c in capture_layers(quant_model, example) if c.name == name)
    w = float_model.get_submodule(name).weight.detach().reshape(cap.out_channels, -1)
    scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (weight_bits - 1) - 1)
    rtn = torch.round(w / scale)
    return _exact_bits(rtn, cap.input_bits, cap.input_signed) > target


@pytest.mark.parametrize("variant", ["a2q", "a2q+"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("acc_bits", [16, 12, 10])
def test_every_layer_fits_its_target_exactly(variant, seed, acc_bits):
    float_model = _float_cnn(seed)
    torch.manual_seed(100 + seed)
    calibration = torch.rand(96, 1, 8, 8)
    layer_acc_bits = {"conv1": 16} if acc_bits < 12 else None  # 8-bit signed input to conv1
    model, _ = quantized_twin("cnn", {"in_channels": 1, "image_size": 8}, variant, 4, 4, acc_bits,
                              layer_acc_bits)
    copy_float_weights(float_model, model)
    result = quantize_weights(model, float_model, calibration, batch_size=48)
    targets = {"conv1": acc_bits, "conv2": acc_bits, "fc": acc_bits, **(layer_acc_bits or {})}
    captures = capture_layers(model, calibration[:8])
    assert [c.name for c in captures] == ["conv1", "conv2", "fc"]
    for cap in captures:
        assert cap.target_bits == targets[cap.name]
        assert _exact_bits(cap.rows, cap.input_bits, cap.input_signed) <= targets[cap.name]
        assert cap.rows.abs().sum() > 0  # not a pass by zeroing the layer
    assert result.all_hold is True and result.report.checked == 3
    # the tight targets are binding: plain rounding of the same weights overflows them
    if acc_bits <= 12:
        assert _rtn_overflows(float_model, model, calibration[:8], "conv2", acc_bits, 4)


def test_quantized_model_tracks_the_float_model():
    """Not only within budget: on its calibration data the quantized model's logits stay close
    to the float model's (relative error well below that of all-zero weights)."""
    float_model = _float_cnn(0)
    torch.manual_seed(7)
    calibration = torch.rand(128, 1, 8, 8)
    model, _ = quantized_twin("cnn", {"in_channels": 1, "image_size": 8}, "a2q+", 4, 4, 16)
    copy_float_weights(float_model, model)
    quantize_weights(model, float_model, calibration)
    with torch.no_grad():
        ref, out = float_model(calibration), model(calibration)
    assert float(((out - ref) ** 2).mean() / ref.var()) < 0.25


class _Net(nn.Module):
    """A model that is not one of the reference builders (not an nn.Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)).flatten(1))


@pytest.mark.parametrize("acc_bits", [14, 12])
def test_any_module_through_brevitas_layer_swapping(acc_bits):
    torch.manual_seed(0)
    float_model = _Net().eval()
    import copy

    model = layerwise_a2q(copy.deepcopy(float_model), "a2q+", weight_bits=4, act_bits=4,
                          acc_bits=acc_bits, first_input_bits=6)
    assert type(model.body).__name__ == "QuantConv2d" and type(model.head).__name__ == "QuantLinear"
    calibration = torch.rand(64, 1, 8, 8)
    result = quantize_weights(model, float_model, calibration)
    for cap in capture_layers(model, calibration[:4]):
        assert _exact_bits(cap.rows, cap.input_bits, cap.input_signed) <= acc_bits
    assert result.all_hold is True


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rounding_respects_budget_for_any_hessian(zero_centered):
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(16, 40, generator=gen, dtype=torch.float64) * 3
    x = torch.randn(200, 40, generator=gen, dtype=torch.float64)
    hessian = x.T @ x / 200
    budget = ChannelBudget(floor_t=21, zero_centered=zero_centered, max_int=7)
    result = constrained_greedy_round(target, hessian, budget)
    assert bool(budget.fits(result.q).all())
    if zero_centered:  # what the A2Q+ quantizer can reproduce
        assert int(result.q.sum(1).abs().max()) <= (40 - 1) // 2
    q = result.q
    l1 = q.abs().sum(1)
    assert int(q.abs().max()) <= 7 and int(l1.max()) > 0
    if not zero_centered:
        assert int(l1.max()) <= 21
    else:
        assert int(q.clamp(min=0).sum(1).max()) <= 10 and int((-q).clamp(min=0).sum(1).max()) <= 10


def test_unconstrained_rounding_is_at_least_as_good_as_round_to_nearest():
    """With a budget that never binds and uncorrelated inputs (H = I), the max-scale candidate is
    round-to-nearest; the kept result can only be better in the objective."""
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(8, 30, generator=gen, dtype=torch.float64)
    hessian = torch.eye(30, dtype=torch.float64)
    result = constrained_greedy_round(target, hessian, ChannelBudget(10**9, False, 7))
    scale = target.abs().amax(1, keepdim=True) / 7
    rtn_error = ((target - scale * torch.round(target / scale)) ** 2).sum(1)
    ours = ((target - result.scale.to(torch.float64).unsqueeze(1) * result.q) ** 2).sum(1)
    assert bool((ours <= rtn_error * (1 + 1e-3) + 1e-9).all())


def test_l1_threshold_matches_the_euclidean_projection():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(6, 25, generator=gen, dtype=torch.float64) * 4
    radius = torch.tensor([0.0, 1.0, 5.0, 20.0, 49.0, 1000.0], dtype=torch.float64)
    theta = l1_threshold(a, radius)
    projected = project_onto_l1_ball(a, radius)
    assert torch.allclose((a - theta.unsqueeze(1)).clamp(min=0), projected, atol=1e-9)


def test_a_target_that_admits_no_weight_is_refused():
    from brevitas_a2q.errors import A2QInputError

    float_model = _float_cnn(0)
    model, _ = quantized_twin("cnn", {"in_channels": 1, "image_size": 8}, "a2q", 4, 4, 8)
    copy_float_weights(float_model, model)
    with pytest.raises(A2QInputError, match="conv1"):
        quantize_weights(model, float_model, torch.rand(16, 1, 8, 8))


def test_layers_whose_data_types_fit_the_target_keep_their_dc_component():
    """A2Q+ zero-centring only lets the quantizer reproduce integers of mean below 1/2; where a
    layer's target reaches its data-type bound nothing can overflow, so it gets A2Q and keeps a
    filter's DC component (an all-positive blur filter stays all positive)."""
    float_model = _float_cnn(0)
    with torch.no_grad():
        float_model.conv1.weight.abs_()
    model, kwargs = quantized_twin("cnn", {"in_channels": 1, "image_size": 8}, "a2q+", 4, 4, 12,
                                   {"conv1": 32, "fc": 32}, float_model)
    assert kwargs["layer_quant"] == {"conv1": "a2q", "fc": "a2q"}  # conv2 stays A2Q+ at P = 12
    copy_float_weights(float_model, model)
    calibration = torch.rand(64, 1, 8, 8)
    result = quantize_weights(model, float_model, calibration)
    assert result.all_hold is True
    conv1 = next(c for c in capture_layers(model, calibration[:4]) if c.name == "conv1")
    assert conv1.variant == "a2q" and bool((conv1.rows >= 0).all())
    assert int(conv1.rows.sum(1).max()) > (9 - 1) // 2  # A2Q+ could not represent this channel
