"""Training helpers and the accumulator audit."""

import json

import numpy as np
import pytest
import torch
from brevitas.core.scaling.pre_scaling import AccumulatorAwareParameterPreScaling
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.nn import (
    QuantConvTranspose2d,
    QuantIdentity,
    QuantLinear,
    QuantMultiheadAttention,
    QuantReLU,
)
from brevitas.quant import (
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Int8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from brevitas_a2q import A2QPlusWeightQuant, A2QWeightQuant, export_qonnx
from brevitas_a2q.analysis.audit import accumulator_report, learned_norms
from brevitas_a2q.analysis.qonnx_analysis import analyze_accumulators
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant import bounds
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.ep_init import euclidean_projection_init, project_onto_l1_ball
from brevitas_a2q.train.loop import accuracy, train_epochs
from brevitas_a2q.train.models import build_cnn
from brevitas_a2q.train.penalty import a2q_penalty
from brevitas_a2q.train.targets import accumulator_targets, set_accumulator_bit_width


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def reference_projection(v: np.ndarray, radius: float) -> np.ndarray:
    """Projection onto the L1 ball by bisection on the soft threshold (independent of Duchi's sort)."""
    if np.abs(v).sum() <= radius:
        return v
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.clip(np.abs(v) - mid, 0, None).sum() > radius:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.clip(np.abs(v) - hi, 0, None)


@given(seed=st.integers(0, 10_000), k=st.integers(1, 50), radius=st.floats(1e-3, 50))
@settings(max_examples=200, deadline=None)
def test_projection_matches_a_bisection_reference(seed, k, radius):
    v = np.random.default_rng(seed).standard_normal((3, k))
    ours = project_onto_l1_ball(torch.tensor(v), torch.full((3,), radius, dtype=torch.float64)).numpy()
    for row, expected in zip(ours, v, strict=True):
        np.testing.assert_allclose(row, reference_projection(expected, radius), atol=1e-9)


def test_targets_with_overrides_by_name_and_pattern():
    model = build_cnn("a2q", acc_bits=16)
    targets = set_accumulator_bit_width(model, 12, {"conv1": 20, "f*": 14})
    assert targets == {"conv1": 20, "conv2": 12, "fc": 14} == accumulator_targets(model)
    with pytest.raises(A2QInputError, match="'dense' matches no A2Q layer.*conv1, conv2, fc"):
        set_accumulator_bit_width(model, 12, {"dense": 12})
    with pytest.raises(ValueError, match="layer 'fc'"):
        set_accumulator_bit_width(model, 12, {"fc": 0})


def test_a_new_target_takes_effect_on_a_trained_model(digits):
    train, test = digits
    model = build_cnn("a2q+", acc_bits=16)
    train_epochs(model, train, 1, progress=False)
    set_accumulator_bit_width(model, 11, {"conv1": 16})
    report = accumulator_report(model, test.tensors[0][:64])
    assert [r.target_bits for r in report] == [16, 11, 11]
    assert all(r.bits_exact_range <= r.target_bits for r in report)


def test_ep_init_satisfies_the_bound_and_zeroes_the_penalty(digits):
    train, test = digits
    torch.manual_seed(0)
    plain = build_cnn("none")
    train_epochs(plain, train, 2, progress=False)
    model = build_cnn("a2q+", acc_bits=11)
    model.load_state_dict({k: v for k, v in plain.state_dict().items() if "weight_quant" not in k},
                          strict=False)
    x = test.tensors[0][:64]
    projected = euclidean_projection_init(model, x)
    assert projected["fc"] > 0  # the pretrained weights were outside the ball
    model.train()
    model(x)
    assert a2q_penalty(model).item() < 1e-3
    with torch.no_grad():  # push g above s*T: the penalty sees it
        model.conv2.weight_quant.tensor_quant.pre_scaling_impl.value.add_(3.0)
    assert a2q_penalty(model).item() > 1.0


def test_ep_init_beats_default_init_at_a_narrow_accumulator(digits):
    train, test = digits
    torch.manual_seed(0)
    plain = build_cnn("none")
    train_epochs(plain, train, 3, progress=False)
    state = {k: v for k, v in plain.state_dict().items() if "weight_quant" not in k}
    results = {}
    for ep in (False, True):
        torch.manual_seed(1)
        model = build_cnn("a2q+", acc_bits=11)
        model.load_state_dict(state, strict=False)
        if ep:
            euclidean_projection_init(model, test.tensors[0][:256])
        train_epochs(model, train, 1, lr=3e-3, progress=False)
        results[ep] = accuracy(model, test)
    assert results[True] > results[False] + 0.05  # measured: 0.80 vs 0.63


@pytest.mark.parametrize("quant", ["a2q", "a2q+", "brevitas-a2q", "brevitas-a2q+", "none"])
def test_report_of_any_brevitas_model(quant, digits):
    _, test = digits
    model = build_cnn(quant, acc_bits=12)
    report = accumulator_report(model, test.tensors[0][:32])
    assert [r.layer for r in report] == ["conv1", "conv2", "fc"]
    for r in report:
        assert r.dot_length == {"conv1": 9, "conv2": 144, "fc": 128}[r.layer]
        assert (r.input_bits, r.input_signed) == ((8, True) if r.layer == "conv1" else (4, False))
        assert r.bits_exact_range <= r.bits_l1_bound <= r.bits_datatype
        if quant == "none":
            assert r.target_bits is None and r.target_holds is None
        else:
            assert r.target_bits == 12 and r.target_holds
    assert json.loads(report.to_json())["layers"][0]["layer"] == "conv1"
    assert "P(exact)" in report.table()


def test_report_exact_width_matches_a_direct_computation(digits):
    _, test = digits
    model = build_cnn("none")
    report = accumulator_report(model, test.tensors[0][:32])
    q = model.fc.quant_weight().int().numpy()
    expected = bounds.exact_accumulator_range(q, 0, 15).signed_bits
    assert report[2].bits_exact_range == expected
    assert report[2].l1_norm_max == int(np.abs(q).sum(axis=1).max())


def brevitas_style_penalty(model: nn.Module, input_bit_width: float, signed: bool) -> torch.Tensor:
    """A penalty written for Brevitas's built-in A2Q, the way Brevitas's examples find A2Q layers:
    by the pre-scaling module's type, ``relu(g - s * T)`` with ``T`` from ``calc_max_l1_norm``."""
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, AccumulatorAwareParameterPreScaling):
            g = module.restrict_clamp_scaling(module.value)
            s = module.scaling_impl(module.value)  # a learned ParameterScaling: input unused
            t = module.calc_max_l1_norm(torch.tensor(input_bit_width), signed)
            total = total + torch.relu(g - s * t).sum()
    return total


@pytest.mark.parametrize("quant", [A2QWeightQuant, A2QPlusWeightQuant])
def test_code_written_for_brevitas_a2q_finds_our_layers(quant):
    """Defect: with our quantizers a penalty found no AccumulatorAwareParameterPreScaling and
    silently became 0."""
    torch.manual_seed(0)
    layer = QuantLinear(32, 4, bias=False, weight_quant=quant, weight_bit_width=4,
                        weight_accumulator_bit_width=12, input_quant=Uint8ActPerTensorFloat,
                        input_bit_width=4)
    layer(torch.rand(2, 32))
    with torch.no_grad():  # push g above s*T
        layer.weight_quant.tensor_quant.pre_scaling_impl.value.add_(3.0)
    penalty = brevitas_style_penalty(layer, 4, False)
    assert penalty.item() > 1.0
    layer.train()
    layer(torch.rand(2, 32))
    torch.testing.assert_close(penalty, a2q_penalty(layer))


def test_multihead_attention_audit_and_training():
    torch.manual_seed(0)
    mha = QuantMultiheadAttention(16, 2, in_proj_weight_quant=A2QPlusWeightQuant,
                                  in_proj_weight_bit_width=4,
                                  in_proj_weight_accumulator_bit_width=13,
                                  out_proj_weight_quant=A2QWeightQuant, out_proj_weight_bit_width=4,
                                  out_proj_weight_accumulator_bit_width=15,
                                  in_proj_bias_quant=None, out_proj_bias_quant=None)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]

    model = Wrapper()
    x = torch.randn(5, 2, 16)
    optimizer = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    report = accumulator_report(model, x)
    assert {r.layer: (r.variant, r.target_bits, r.input_bits, r.dot_length) for r in report} == {
        "mha.in_proj": ("a2q+", 13, 8, 16), "mha.out_proj": ("a2q", 15, 8, 16)}
    assert report.all_hold


PER_TENSOR_A2Q_PLUS = type("PerTensorA2QPlus", (A2QPlusWeightQuant,),
                           {"scaling_per_output_type": ScalingPerOutputType.TENSOR})


@pytest.mark.parametrize("quant", [A2QPlusWeightQuant, PER_TENSOR_A2Q_PLUS])
def test_ep_init_on_transposed_convs_and_own_input_quant(quant):
    """EP-init projects each *output* channel with the N of the layer's own input quantizer."""
    torch.manual_seed(0)
    layer = QuantConvTranspose2d(6, 4, 3, stride=2, groups=2 if quant is PER_TENSOR_A2Q_PLUS else 1,
                                 weight_quant=quant, weight_bit_width=4,
                                 weight_accumulator_bit_width=10,
                                 input_quant=Uint8ActPerTensorFloat, input_bit_width=3)
    model = nn.Sequential(QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
                          layer)
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        layer.weight.mul_(20)
    euclidean_projection_init(model, x)
    report = accumulator_report(model, x)
    assert (report[0].input_bits, report[0].dot_length) == (3, 3 * 9 * (1 if quant is
                                                                        PER_TENSOR_A2Q_PLUS
                                                                        else 2))
    assert report.all_hold and report[0].zero_channels == 0
    model.train()
    model(x)
    assert a2q_penalty(model).item() < 1e-3


def test_all_zero_layers_get_a_warning_in_audit_and_analysis(tmp_path):
    """A target whose L1 budget is below what round-to-zero can use leaves the layer all zero: the
    audit and the QONNX report say so, why, and what helps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
        QuantLinear(64, 4, bias=False, weight_quant=A2QWeightQuant, weight_bit_width=4,
                    weight_accumulator_bit_width=9),  # T = 255/128 ~ 2 over 64 weights
        QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        QuantLinear(4, 3, bias=False, weight_quant=A2QPlusWeightQuant, weight_bit_width=4,
                    weight_accumulator_bit_width=16)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 64).sign() * (1 + 0.01 * torch.rand(4, 64)))
    x = torch.randn(2, 64)
    report = accumulator_report(model, x)
    assert len(report.warnings) == 1
    warning = report.warnings[0]
    assert "'1'" in warning and "all its integer weights are zero" in warning
    assert "T = 1.992" in warning and "euclidean_projection_init" in warning and "wider P" in warning
    assert warning in report.table() and json.loads(report.to_json())["warnings"] == [warning]
    analysis = analyze_accumulators(export_qonnx(model, x, tmp_path / "m.onnx"))
    assert len(analysis.warnings) == 1 and "euclidean_projection_init" in analysis.warnings[0]
    assert analysis.warnings[0] in analysis.table()
    assert analysis.to_dict()["warnings"] == analysis.warnings


def _one_layer(rounding: str = "zero", acc_bits: int = 32) -> nn.Module:
    """8-bit signed input -> A2Q+ conv with K = 3 * 5 * 5 = 75 (ESPCN's first layer)."""
    from brevitas.nn import QuantConv2d

    return nn.Sequential(
        QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
        QuantConv2d(3, 4, 5, bias=False, weight_quant=A2QPlusWeightQuant, weight_bit_width=8,
                    weight_accumulator_bit_width=acc_bits, weight_rounding=rounding)).eval()


def _set_learned_norm(layer: nn.Module, channel: int, target: float) -> None:
    """Set one output channel's learned norm ``g/s`` to ``target`` (bisection on its raw
    parameter: g is stored through Brevitas's value restriction, e.g. in log2)."""
    pre = layer.weight_quant.tensor_quant.pre_scaling_impl
    lo, hi = -60.0, float(pre.value[channel].max())
    with torch.no_grad():
        for _ in range(100):
            pre.value[channel] = (lo + hi) / 2
            lo, hi = ((lo + hi) / 2, hi) if learned_norms(layer)[channel] < target else \
                (lo, (lo + hi) / 2)
    assert abs(float(learned_norms(layer)[channel]) - target) < 1e-3 * target


@pytest.mark.parametrize("rounding", ["zero", "budgeted"])
def test_zero_channel_warning_says_the_learned_norm_binds_where_it_does(tmp_path, rounding):
    """ESPCN conv1 at P = 32 (issue 19): T = 1.68e7 is far above K = 75, so T cannot zero a
    channel; a channel whose learned norm g/s is below 1 is all zero. The warning blames g/s,
    does not advise a wider P, and advises budgeted rounding only where it is off. The QONNX
    report (which has no g) says the same from T >= K."""
    torch.manual_seed(0)
    model = _one_layer(rounding)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    _set_learned_norm(model[1], 0, 0.1)
    report = accumulator_report(model, x)
    (warning,) = report.warnings
    assert "1 of its 4 output channels have all-zero integer weights" in warning
    assert "What binds is the learned norm g/s (smallest 0.1)" in warning
    assert "T >= K = 75" in warning and "not a wider P" in warning
    assert ("budgeted rounding" in warning) is (rounding == "zero")
    assert "below what round-to-zero can use" not in warning
    analysis = analyze_accumulators(export_qonnx(model, x, tmp_path / "m.onnx"))
    (qonnx_warning,) = analysis.warnings
    assert "What binds is the learned norm g/s, not the L1 budget T = 1.684e+07" in qonnx_warning
    assert "T >= K = 75" in qonnx_warning and "if not already on" in qonnx_warning


def test_zero_channel_warning_uses_the_trained_target_not_a_checked_one(tmp_path):
    """``a2q report --target 40`` on a layer trained at P = 9: the warning's T is that of P = 9
    (what the weights were trained for), not of the P being checked."""
    from brevitas_a2q.cli.report import report_model

    torch.manual_seed(0)
    model = nn.Sequential(
        QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
        QuantLinear(64, 4, bias=False, weight_quant=A2QWeightQuant, weight_bit_width=4,
                    weight_accumulator_bit_width=9)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(4, 64).sign() * (1 + 0.01 * torch.rand(4, 64)))
    x = torch.randn(2, 64)
    wrapper = export_qonnx(model, x, tmp_path / "m.onnx")
    (recorded,) = report_model(wrapper).warnings
    (checked_at_40,) = report_model(wrapper, ["40"]).warnings
    assert checked_at_40 == recorded
    assert "T = 1.992 (P = 9, 8-bit signed input, a2q) is below K = 64 and may bind" in recorded


def test_nothing_checked_is_never_a_pass_in_the_audit(digits):
    """Plain QAT has no target: ``all_hold`` is None, not True, and the report says what was
    checked (nothing) and what was not (every layer)."""
    x = digits[0].tensors[0][:8]
    plain = accumulator_report(build_cnn("none", acc_bits=None).eval(), x)
    assert plain.all_hold is None and plain.to_dict()["all_hold"] is None
    assert plain.to_dict()["checked"] == 0
    assert plain.to_dict()["unchecked"] == ["conv1", "conv2", "fc"]
    assert plain.summary.startswith("nothing checked")
    model = build_cnn("a2q+", acc_bits=16)
    model.train()
    model(x)
    targeted = accumulator_report(model.eval(), x)
    assert targeted.all_hold is True and targeted.checked == 3 and targeted.unchecked == []


def test_builtin_a2q_plus_with_own_input_quant_after_a_quantized_tensor():
    """N comes from the layer's own input quantizer, for Brevitas's built-in A2Q+ too."""
    model = nn.Sequential(QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
                          QuantLinear(8, 3, weight_quant=Int8AccumulatorAwareZeroCenterWeightQuant,
                                      weight_bit_width=4, weight_accumulator_bit_width=12,
                                      input_quant=Uint8ActPerTensorFloat, input_bit_width=3))
    report = accumulator_report(model, torch.randn(2, 8))
    assert (report[0].input_bits, report[0].input_signed) == (3, False)
