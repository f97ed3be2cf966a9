"""Brevitas's ONNX-QCDQ exporter (``brevitas.export.export_onnx_qcdq``) with our quantizers.

Oracles, as in Brevitas's own ORT tests (``tests/brevitas_ort``): onnxruntime's output of the
exported file against the Brevitas model's output. The file computes the layer in float32 on
dequantized integers (``q * s``, the same float products as Brevitas's) in another summation order,
so: with a float output, equal within float32 summation error (relative 1e-5 of the largest
output); with an 8-bit output quantizer, within one output quantization step (a value on a
rounding boundary may round the other way; Brevitas's own tests allow two). The integers
stored in the file against the layer's own integer weights (exactly) and the closed-form L1 bound
of :func:`brevitas_a2q.quant.bounds.l1_norm_bound`; and the same model with Brevitas's built-in
A2Q/A2Q+ exported the same way (at P <= 24 both compute the same integers, so the two files give
identical outputs). ``dynamo=False``: Brevitas 0.13's dynamo QCDQ export refuses every
input-aware A2Q quantizer, its built-ins included.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from brevitas.export import export_onnx_qcdq
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.nn import QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear
from brevitas.quant import (
    Int8AccumulatorAwareWeightQuant,
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Int8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from onnx import numpy_helper

from brevitas_a2q.quant.bounds import l1_norm_bound
from brevitas_a2q.quant.channels import OutputChannelView
from brevitas_a2q.quant.quantizers import A2QPlusWeightQuant, A2QWeightQuant

torch.set_num_threads(1)

OURS = {"a2q": A2QWeightQuant, "a2q+": A2QPlusWeightQuant}
BUILTIN = {"a2q": Int8AccumulatorAwareWeightQuant,
           "a2q+": Int8AccumulatorAwareZeroCenterWeightQuant}

# (layer class, constructor kwargs, input shape with batch)
LAYERS = {
    "linear": (QuantLinear, dict(in_features=24, out_features=6), (4, 24)),
    "conv1d": (QuantConv1d, dict(in_channels=4, out_channels=5, kernel_size=3), (2, 4, 9)),
    "conv2d": (QuantConv2d, dict(in_channels=4, out_channels=6, kernel_size=3), (2, 4, 7, 7)),
    "depthwise": (QuantConv2d, dict(in_channels=6, out_channels=6, kernel_size=3, groups=6),
                  (2, 6, 6, 6)),
    "convT2d": (QuantConvTranspose2d, dict(in_channels=5, out_channels=4, kernel_size=3,
                                           stride=2), (2, 5, 4, 4)),
}
M, P, N = 5, 14, 8  # weight bits, target accumulator bits, input bits


def make_layer(layer: str, weight_quant, signed: bool, seed: int = 0, quant_output: bool = True,
               **quant_kwargs):
    """The layer with its own input quantizer (``N``-bit, signed or not) and, if
    ``quant_output``, an 8-bit output quantizer returning a quant tensor (whose scale is the
    comparison's step)."""
    cls, kwargs, _ = LAYERS[layer]
    torch.manual_seed(seed)
    output = dict(output_quant=Int8ActPerTensorFloat, return_quant_tensor=True) \
        if quant_output else {}
    module = cls(**kwargs, bias=True, weight_quant=weight_quant, weight_bit_width=M,
                 weight_accumulator_bit_width=P, input_bit_width=N,
                 input_quant=Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat,
                 **output, **quant_kwargs)
    with torch.no_grad():  # spread the channels' norms so that some are clamped to T, some not
        w = module.weight
        shape = [1] * w.dim()
        dim = 1 if getattr(module, "transposed", False) else 0
        shape[dim] = w.shape[dim]
        w.mul_(torch.exp(torch.randn(*shape)))
    return module.eval()


def sample(layer: str, signed: bool, seed: int = 1) -> torch.Tensor:
    x = torch.randn(*LAYERS[layer][2], generator=torch.Generator().manual_seed(seed)) * 2
    return x if signed else x.abs()


def export_and_run(module, x: torch.Tensor, path) -> tuple[np.ndarray, onnx.ModelProto]:
    export_onnx_qcdq(module, x, export_path=str(path), dynamo=False)
    options = ort.SessionOptions()
    options.use_deterministic_compute = True
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # a returned quant tensor exports as (value, scale, zero point, bit width): take the value
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return out, onnx.load(str(path))


def file_weight_integers(model: onnx.ModelProto) -> np.ndarray:
    """The integer initializer dequantized into the layer's weight (the only integer tensor of
    weight rank in the file)."""
    ints = [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT32)]
    weights = [a for a in ints if a.ndim >= 2]
    assert len(weights) == 1, f"expected one integer weight tensor, found {len(weights)}"
    return weights[0]


def assert_as_brevitas(out: np.ndarray, expected) -> None:
    """ORT's output against Brevitas's: one output step for a quant tensor, float32 summation
    error for a float output."""
    out = torch.from_numpy(out)
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(out, expected, rtol=1e-5,
                                   atol=1e-5 * float(expected.abs().max()))
        return
    steps = (out - expected.value).abs() / expected.scale
    assert float(steps.max()) <= 1 + 1e-3, "ORT output more than one output step off Brevitas"


@pytest.mark.parametrize("quant_output", [True, False], ids=["int8-output", "float-output"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed-input", "unsigned-input"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(OURS))
def test_onnx_qcdq_export_runs_in_onnxruntime_as_brevitas_computes(variant, layer, signed,
                                                                  quant_output, tmp_path):
    """Defect: ``export_onnx_qcdq`` failed with "'NoneType' object is not callable" (no handler
    for our proxy in Brevitas's ONNX-QCDQ manager)."""
    module = make_layer(layer, OURS[variant], signed, quant_output=quant_output)
    x = sample(layer, signed)
    with torch.no_grad():
        expected = module(x)
        q = module.quant_weight(module.input_quant(x)).int()
    out, model = export_and_run(module, x, tmp_path / "ours.onnx")
    assert_as_brevitas(out, expected)

    stored = torch.from_numpy(file_weight_integers(model).astype(np.int64))
    assert torch.equal(stored, q.to(torch.int64)), "stored integers are not the layer's"
    rows = OutputChannelView(int(getattr(module, "groups", 1)),
                             bool(getattr(module, "transposed", False)))(stored)
    norms = rows.abs().sum(1) + (rows.sum(1).abs() if variant == "a2q+" else 0)
    bound = l1_norm_bound(P, N, signed, zero_centered=variant == "a2q+")  # exact Fraction
    assert all(n <= bound for n in norms.tolist()), "an exported channel exceeds its L1 bound"


@pytest.mark.parametrize("layer", ["linear", "conv2d", "depthwise"])
@pytest.mark.parametrize("variant", sorted(OURS))
def test_onnx_qcdq_export_equals_brevitas_builtin_a2q_exported_the_same_way(variant, layer,
                                                                          tmp_path):
    """At P <= 24 our quantizers and Brevitas's compute the same integers and scales: the two
    exported files hold the same integer weights and give the same outputs in onnxruntime."""
    x = sample(layer, True)
    ours_out, ours_model = export_and_run(make_layer(layer, OURS[variant], True), x,
                                          tmp_path / "ours.onnx")
    theirs_out, theirs_model = export_and_run(make_layer(layer, BUILTIN[variant], True), x,
                                              tmp_path / "builtin.onnx")
    np.testing.assert_array_equal(file_weight_integers(ours_model),
                                  file_weight_integers(theirs_model))
    np.testing.assert_array_equal(ours_out, theirs_out)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("variant", sorted(OURS))
def test_onnx_qcdq_export_with_a_per_tensor_post_scale(variant, layer, tmp_path):
    """Brevitas's per-tensor keyword (``weight_scaling_per_output_channel=False``): one
    post-scale in the file; ORT as Brevitas, and as Brevitas's built-in A2Q with a per-tensor
    post-scale (``scaling_per_output_type = TENSOR``) exported the same way."""
    builtin = type("PerTensor", (BUILTIN[variant],),
                   {"scaling_per_output_type": ScalingPerOutputType.TENSOR})
    x = sample(layer, True)
    mine = make_layer(layer, OURS[variant], True, quant_output=False,
                      weight_scaling_per_output_channel=False)
    with torch.no_grad():
        expected = mine(x)
        assert mine.quant_weight(mine.input_quant(x)).scale.numel() == 1
    ours_out, ours_model = export_and_run(mine, x, tmp_path / "ours.onnx")
    assert_as_brevitas(ours_out, expected)
    theirs_out, theirs_model = export_and_run(
        make_layer(layer, builtin, True, quant_output=False), x, tmp_path / "builtin.onnx")
    np.testing.assert_array_equal(file_weight_integers(ours_model),
                                  file_weight_integers(theirs_model))
    np.testing.assert_array_equal(ours_out, theirs_out)
