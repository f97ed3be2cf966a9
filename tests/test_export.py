"""Exact QONNX export: the file computes what Brevitas computes, and its integer weights satisfy
the recorded accumulator bounds (oracles: qonnx execute_onnx, Brevitas's own quantized weights,
the closed-form bounds of brevitas_a2q.quant.bounds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brevitas.export import export_qonnx as brevitas_export_qonnx
from brevitas.export import export_torch_qcdq
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.nn import (
    QuantConv2d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantIdentity,
    QuantLinear,
    QuantMultiheadAttention,
    QuantReLU,
    TruncAvgPool2d,
)
from brevitas.quant import (
    Int8AccumulatorAwareWeightQuant,
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Int8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from brevitas.quant_tensor import QuantTensor
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
from qonnx.transformation.lower_convs_to_matmul import LowerConvsToMatMul
from qonnx.util.cleanup import cleanup_model
from torch import nn

from brevitas_a2q import export_qonnx
from brevitas_a2q.analysis.audit import accumulator_report, capture_layers
from brevitas_a2q.analysis.qonnx_analysis import accumulating_nodes, analyze_accumulators
from brevitas_a2q.analysis.records import read_records, weight_fingerprint
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant import bounds
from brevitas_a2q.quant.quantizers import A2QPlusWeightQuant, A2QWeightQuant
from brevitas_a2q.train.models import build_cnn, build_mlp

torch.set_num_threads(1)


def _value(t):
    return t.value if isinstance(t, QuantTensor) else t


def _act(bits: int = 4) -> QuantReLU:
    return QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=bits, return_quant_tensor=True)


class ResidualNet(nn.Module):
    """Conv, depthwise conv, residual add, max and average pooling, mixed variants and targets
    (ours A2Q/A2Q+ and Brevitas's built-in A2Q), quantized output."""

    def __init__(self) -> None:
        super().__init__()
        a2q = {"weight_quant": A2QWeightQuant, "weight_bit_width": 4}
        self.input_quant = QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv1 = QuantConv2d(3, 8, 3, padding=1, bias=False, weight_accumulator_bit_width=15,
                                 **a2q)
        self.act1 = _act()
        self.dw = QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False,
                              weight_quant=A2QPlusWeightQuant, weight_bit_width=4,
                              weight_accumulator_bit_width=10)
        self.act2 = _act()
        self.requant = QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=5,
                                     return_quant_tensor=True)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = QuantConv2d(8, 16, 3, padding=1, bias=False,
                                 weight_accumulator_bit_width=12, **a2q)
        self.act3 = _act()
        self.avg = TruncAvgPool2d(kernel_size=4, float_to_int_impl_type="floor",
                                  return_quant_tensor=True)
        self.fc = QuantLinear(16, 10, bias=True, weight_quant=Int8AccumulatorAwareWeightQuant,
                              weight_bit_width=4, weight_accumulator_bit_width=16)
        self.out_quant = QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)

    def forward(self, x):
        x = self.act1(self.conv1(self.input_quant(x)))
        y = self.act2(self.dw(x))
        x = self.pool(self.requant(_value(y) + _value(x)))
        x = self.avg(self.act3(self.conv3(x)))
        x = self.fc(torch.flatten(x, 1) if not isinstance(x, QuantTensor) else x.flatten(1))
        return self.out_quant(x)


class PerTensorA2QPlus(A2QPlusWeightQuant):
    scaling_per_output_type = ScalingPerOutputType.TENSOR


def transposed_net() -> nn.Module:
    """Super-resolution style: every layer quantizes its own (float) input with input_quant=,
    the first one the float network input; transposed convs, grouped (per-tensor post-scale)."""
    return nn.Sequential(
        QuantConv2d(3, 8, 3, padding=1, weight_quant=A2QWeightQuant, weight_bit_width=4,
                    weight_accumulator_bit_width=16, input_quant=Int8ActPerTensorFloat),
        nn.ReLU(),
        QuantConvTranspose2d(8, 6, 3, stride=2, weight_quant=A2QPlusWeightQuant,
                             weight_bit_width=4, weight_accumulator_bit_width=12,
                             input_quant=Uint8ActPerTensorFloat, input_bit_width=4),
        QuantConvTranspose2d(6, 4, 2, groups=2, weight_quant=PerTensorA2QPlus, weight_bit_width=4,
                             weight_accumulator_bit_width=12, input_quant=Int8ActPerTensorFloat,
                             input_bit_width=6),
        nn.AvgPool2d(3), nn.Flatten(),
        QuantLinear(4 * 4 * 4, 5, weight_quant=Int8AccumulatorAwareZeroCenterWeightQuant,
                    weight_bit_width=4, weight_accumulator_bit_width=14,
                    input_quant=Uint8ActPerTensorFloat, input_bit_width=4))


class RequantizingNet(nn.Module):
    """An already-quantized tensor (average-pooled: wider than 4 bits) into layers that quantize
    it again to 4 bits with their own input_quant=: N is the layer quantizer's."""

    def __init__(self, weight_quant) -> None:
        super().__init__()
        self.inp = QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv = QuantConv2d(2, 4, 3, padding=1, weight_quant=weight_quant, weight_bit_width=4,
                                weight_accumulator_bit_width=16, return_quant_tensor=True)
        self.act = _act()
        self.pool = TruncAvgPool2d(kernel_size=2, float_to_int_impl_type="floor",
                                   return_quant_tensor=True)
        self.convt = QuantConvTranspose1d(4, 3, 2, weight_quant=weight_quant, weight_bit_width=4,
                                          weight_accumulator_bit_width=12,
                                          input_quant=Uint8ActPerTensorFloat, input_bit_width=3)
        self.fc = QuantLinear(4 * 4 * 4, 6, weight_quant=weight_quant, weight_bit_width=4,
                              weight_accumulator_bit_width=12,
                              input_quant=Uint8ActPerTensorFloat, input_bit_width=4)

    def forward(self, x):
        x = self.pool(self.act(self.conv(self.inp(x))))
        return self.fc(x.flatten(1)) + self.convt(x.flatten(2)).flatten(1)[:, :6]


class AttentionNet(nn.Module):
    """QuantMultiheadAttention with our A2Q+ in-projection and A2Q out-projection."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = QuantMultiheadAttention(
            16, 2, in_proj_weight_quant=A2QPlusWeightQuant, in_proj_weight_bit_width=4,
            in_proj_weight_accumulator_bit_width=13, out_proj_weight_quant=A2QWeightQuant,
            out_proj_weight_bit_width=4, out_proj_weight_accumulator_bit_width=15,
            in_proj_bias_quant=None, out_proj_bias_quant=None)

    def forward(self, x):
        return self.mha(x, x, x)[0]


def _run(wrapper: ModelWrapper, x: torch.Tensor) -> np.ndarray:
    inp = wrapper.graph.input[0].name
    return execute_onnx(wrapper, {inp: x.numpy()})[wrapper.graph.output[0].name]


def _model_cases():
    torch.manual_seed(0)
    yield "cnn-a2q", build_cnn("a2q", acc_bits=14), torch.rand(4, 1, 8, 8)
    yield "cnn-a2q+", build_cnn("a2q+", acc_bits=13), torch.rand(4, 1, 8, 8)
    yield "mlp-brevitas-a2q", build_mlp("brevitas-a2q", acc_bits=14), torch.rand(4, 1, 8, 8)
    yield "cnn-brevitas-a2q+", build_cnn("brevitas-a2q+", acc_bits=14), torch.rand(4, 1, 8, 8)
    yield "cnn-plain-qat", build_cnn("none", acc_bits=None), torch.rand(4, 1, 8, 8)
    yield "residual-mixed", ResidualNet(), torch.rand(4, 3, 8, 8) * 2 - 1
    yield "transposed-own-input-quant", transposed_net(), torch.randn(4, 3, 6, 6)
    yield "attention", AttentionNet(), torch.randn(5, 1, 16)
    yield "requantized-ours", RequantizingNet(A2QPlusWeightQuant), torch.randn(4, 2, 8, 8)
    yield "requantized-brevitas", RequantizingNet(Int8AccumulatorAwareZeroCenterWeightQuant), \
        torch.randn(4, 2, 8, 8)


CASES = {name: (model, x) for name, model, x in _model_cases()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for name, (model, x) in CASES.items():
        model.eval()
        path = tmp_path_factory.mktemp("export") / f"{name}.onnx"
        export_qonnx(model, x, path)
        out[name] = ModelWrapper(str(path))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_reproduces_brevitas(name, exported):
    model, x = CASES[name]
    with torch.no_grad():
        expected = model(x)
    got = _run(exported[name], x)
    if isinstance(expected, QuantTensor):  # quantized output: the integers must be identical
        scale = expected.scale.numpy()
        np.testing.assert_array_equal(np.rint(got / scale), np.rint(expected.value.numpy() / scale))
    else:
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_file_weights_are_brevitas_integers_and_satisfy_the_recorded_bounds(name, exported):
    model, x = CASES[name]
    wrapper = exported[name]
    records = read_records(wrapper)
    captures = {c.name: c for c in capture_layers(model, x)}
    assert sorted(r.layer for r in records) == sorted(captures)
    nodes = {n.name: w for n, w in accumulating_nodes(wrapper)}
    for rec in records:
        cap = captures[rec.layer]
        q = nodes[rec.node].int_weights  # read back from the file by executing its Quant node
        np.testing.assert_array_equal(q, cap.rows.numpy())
        assert (rec.variant, rec.target_bits) == (cap.variant, cap.target_bits)
        assert (rec.input_bits, rec.input_signed) == (cap.input_bits, cap.input_signed)
        if rec.target_bits is None:
            continue
        bound = bounds.l1_norm_bound(rec.target_bits, rec.input_bits, rec.input_signed,
                                     rec.zero_centered)
        norms = (bounds.zero_centered_l1_norm(q) if rec.zero_centered
                 else np.abs(q).sum(axis=1).tolist())
        assert max(norms) <= bound, rec.layer
        lo, hi = bounds.input_range(rec.input_bits, rec.input_signed)
        assert bounds.exact_accumulator_range(q, lo, hi).signed_bits <= rec.target_bits


def test_mixed_targets_are_recorded_per_layer(exported):
    records = {r.layer: r for r in read_records(exported["residual-mixed"])}
    assert {k: (r.variant, r.target_bits, r.input_bits, r.input_signed)
            for k, r in records.items()} == {
        "conv1": ("a2q", 15, 8, True), "dw": ("a2q+", 10, 4, False),
        "conv3": ("a2q", 12, 5, False), "fc": ("a2q", 16, 8, False)}  # 4 bits + sum of 16
    assert records["dw"].dot_length == 9
    report = analyze_accumulators(exported["residual-mixed"])
    assert report.all_hold and all(r.layer for r in report)
    # the analysis reads N and the sign from the graph alone (Quant, MaxPool, Trunc nodes)
    assert all((r.input_bits, r.input_signed) == (records[r.layer].input_bits,
                                                  records[r.layer].input_signed) for r in report)


@pytest.mark.parametrize("transform", [ConvertToChannelsLastAndClean, LowerConvsToMatMul])
def test_records_survive_qonnx_transformations(transform, exported):
    wrapper = cleanup_model(exported["residual-mixed"]).transform(transform())
    wrapper = cleanup_model(wrapper)
    records = read_records(wrapper)
    prints = {weight_fingerprint(w.int_weights): n.name for n, w in accumulating_nodes(wrapper)}
    assert len(records) == 4
    assert all(r.fingerprint in prints for r in records)
    report = analyze_accumulators(wrapper)
    assert not report.unmatched_records and {r.layer for r in report} == {
        "conv1", "dw", "conv3", "fc"}
    assert report.all_hold


def test_brevitas_own_export_violates_the_bound_ours_does_not(tmp_path):
    """The bug we fix: Brevitas 0.13 exports an A2Q layer's raw float weights, whose rounded
    integers break the layer's accumulator bound."""
    torch.manual_seed(0)
    model = build_mlp("brevitas-a2q", acc_bits=12).eval()
    x = torch.rand(4, 1, 8, 8)
    theirs = cleanup_model(ModelWrapper(brevitas_export_qonnx(model, x, None, dynamo=False)))
    widths = [r.bits_exact_range for r in analyze_accumulators(theirs)]
    assert max(widths) > 12, "Brevitas's export now respects the bound: drop the workaround?"
    ours = export_qonnx(model, x, tmp_path / "ours.onnx")
    assert max(r.bits_exact_range for r in analyze_accumulators(ours)) <= 12


def test_refuses_to_overwrite_and_leaves_no_partial_file(tmp_path):
    model, x = build_mlp("a2q", acc_bits=14).eval(), torch.rand(2, 1, 8, 8)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep")
    with pytest.raises(A2QInputError, match="already exists"):
        export_qonnx(model, x, path)
    assert path.read_bytes() == b"keep"
    export_qonnx(model, x, path, overwrite=True)
    assert read_records(ModelWrapper(str(path)))
    bad = tmp_path / "bad.onnx"
    with pytest.raises(A2QInputError, match="not quantized"):
        export_qonnx(build_mlp("a2q", acc_bits=14)[2:], torch.rand(2, 64), bad)  # no input quant
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("name", ["requantized-ours", "requantized-brevitas"])
def test_a_layer_own_input_quant_gives_n(name, exported):
    """Defect: with a quantized incoming tensor, N was taken from it (6 bits after average
    pooling) instead of from the layer's own 4-bit (3-bit) input quantizer."""
    records = {r.layer: r for r in read_records(exported[name])}
    assert (records["fc"].input_bits, records["fc"].input_signed) == (4, False)
    assert (records["convt"].input_bits, records["convt"].dot_length) == (3, 8)
    assert records["conv"].input_bits == 8
    model, x = CASES[name]
    report = accumulator_report(model, x)
    assert {r.layer: r.input_bits for r in report} == {"conv": 8, "convt": 3, "fc": 4}


def test_transposed_records_count_per_output_channel(exported):
    records = {r.layer: r for r in read_records(exported["transposed-own-input-quant"])}
    assert {k: (r.op_type, r.out_channels, r.dot_length, r.input_bits)
            for k, r in records.items()} == {
        "0": ("Conv", 8, 27, 8), "2": ("ConvTranspose", 6, 72, 4),
        "3": ("ConvTranspose", 4, 12, 6), "6": ("Gemm", 5, 64, 4)}
    assert analyze_accumulators(exported["transposed-own-input-quant"]).all_hold


FRESH = {"cnn-a2q+": lambda: build_cnn("a2q+", acc_bits=13),
         "requantized-ours": lambda: RequantizingNet(A2QPlusWeightQuant)}


@pytest.mark.parametrize("name", sorted(FRESH))
def test_brevitas_own_exporters_work_with_our_quantizers(name, tmp_path):
    """Defect: Brevitas's export_qonnx / export_torch_qcdq failed on our proxy ('NoneType' object
    is not callable). Registered, they export the exact quantized weights. (Fresh models: Brevitas
    caches a module's export handler, so a model exported before would hide the defect.)"""
    torch.manual_seed(0)
    model = FRESH[name]().eval()
    x = CASES[name][1][:1]
    with torch.no_grad():
        expected = _value(model(x))
    wrapper = ModelWrapper(brevitas_export_qonnx(model, x, None, dynamo=False))
    got = _run(cleanup_model(wrapper), x)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    if name == "requantized-ours":
        return  # Brevitas's QCDQ export supports no floor-rounding TruncAvgPool
    model = FRESH[name]().eval()
    with torch.no_grad():
        expected = _value(model(x))
    traced = export_torch_qcdq(model, x, str(tmp_path / "model.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(_value(traced(x)).numpy(), expected.numpy(), rtol=0,
                                   atol=1e-5)


def test_brevitas_export_then_ours_then_brevitas_again(tmp_path):
    """Brevitas caches each module's export handler: exporters must not reuse each other's."""
    torch.manual_seed(0)
    model, x = build_cnn("a2q", acc_bits=13).eval(), torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    for export in (lambda: ModelWrapper(brevitas_export_qonnx(model, x, None, dynamo=False)),
                   lambda: export_qonnx(model, x, tmp_path / "ours.onnx", overwrite=True),
                   lambda: ModelWrapper(brevitas_export_qonnx(model, x, None, dynamo=False))):
        np.testing.assert_allclose(_run(cleanup_model(export()), x), expected, rtol=0, atol=1e-5)


def test_brevitas_exporters_work_after_importing_only_the_quantizers():
    """What a user writes: import our quantizer, export with Brevitas (no brevitas_a2q.export.qonnx)."""
    import subprocess
    import sys

    code = ("import torch; from brevitas.export import export_qonnx; "
            "from brevitas_a2q.quant.quantizers import A2QWeightQuant; "
            "from brevitas.nn import QuantLinear; from brevitas.quant import Int8ActPerTensorFloat; "
            "m = QuantLinear(8, 2, weight_quant=A2QWeightQuant, weight_accumulator_bit_width=16, "
            "input_quant=Int8ActPerTensorFloat).eval(); "
            "export_qonnx(m, torch.randn(1, 8), None, dynamo=False); print('exported')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "exported" in out.stdout, out.stderr[-2000:]
