"""The exact evaluation of a model (finn_flow.verify.exact) against QONNX's float32 execution.

The tie case of shared/cases: QONNX computes 105.5 at one output pixel and rounds it to 106; the
exact value is 105.49998 (checked here independently in 100-digit decimals from the exported
integers and scales), so the model's output is 105, and the difference is QONNX's float32 rounding.
On a model without such coincidences the exact evaluation equals QONNX everywhere, and a corrupted
exact table is reported as unexplained, never as rounding."""

from __future__ import annotations

import decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from qonnx.core.modelwrapper import ModelWrapper
from test_exact_thresholds import Block, D, _dec  # tests/ is on sys.path

from brevitas_a2q import export_qonnx
from finn_flow import build, finn_available
from finn_flow.verify.exact import ExactModel
from finn_flow.verify.inputs import extreme_inputs, random_inputs, run_qonnx

FINN_OK, FINN_REASON = finn_available()
TIE_CASE = Path(__file__).resolve().parents[2] / "shared" / "cases" / "espcn_plain_deconv_tie.onnx"
needs_tie_case = pytest.mark.skipif(not TIE_CASE.exists(),
                                    reason=f"the shared tie case is not at {TIE_CASE}")


@needs_tie_case
def test_tie_case_exact_output_is_105_and_qonnx_rounds_in_float32():
    model = ModelWrapper(str(TIE_CASE))
    inputs = extreme_inputs(model)
    exact = ExactModel(model)
    result = exact.evaluate(inputs)
    qonnx = run_qonnx(model, inputs)
    outputs = result.outputs.reshape(qonnx.shape)
    differ = np.argwhere(outputs != qonnx)
    assert differ.tolist() == [[2, 0, 0, 9, 15]]
    index = tuple(differ[0])
    final = exact.model.find_producer(exact.model.graph.output[0].name)
    scale = float(exact.model.get_initializer(final.input[1]))
    assert (round(outputs[index] / scale), round(qonnx[index] / scale)) == (105, 106)
    assert result.float32_rounding == {final.name: 1} and result.unexplained == {}
    # independent: the pixel's pre-quantization value in 100-digit decimals, from the accumulator
    layer = exact.layers[final.output[0]]
    deconv = layer.node
    levels = torch.from_numpy(np.rint(_input_levels(exact, inputs[2], deconv)))
    acc = torch.nn.functional.conv_transpose2d(levels, layer.weights, stride=2, padding=2)
    value = D.multiply(_dec(layer.chain.scale[0]), decimal.Decimal(int(acc[0, 0, 9, 15])))
    assert D.divide(value, _dec(layer.chain.quant_scale[0])) < decimal.Decimal("105.5")


def _input_levels(exact: ExactModel, x: np.ndarray, node) -> np.ndarray:
    """Levels reaching ``node`` in QONNX's own run of ``x`` (QONNX and the exact evaluation agree
    upstream of the last quantizer here: only that one differs)."""
    from qonnx.core.onnx_exec import execute_onnx

    model = exact.model
    context = execute_onnx(model, {model.graph.input[0].name: x.astype(np.float32)},
                           return_full_exec_context=True)
    scale = float(model.get_initializer(model.find_producer(node.input[0]).input[1]))
    return context[node.input[0]].astype(np.float64) / scale


def _block_model(tmp_path) -> ModelWrapper:
    model = Block(bn=True, pow2=False, out_bits=4)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        model(x)
    export_qonnx(model, x[:1], tmp_path / "m.onnx")
    return ModelWrapper(str(tmp_path / "m.onnx"))


def test_exact_equals_qonnx_where_float32_is_not_near_a_boundary(tmp_path):
    model = _block_model(tmp_path)
    exact = ExactModel(model)
    assert len(exact.layers) == 1 and exact.float32_quantizers == {}
    assert len(exact.input_quantizers) == 1
    inputs = random_inputs(model, 12, seed=5)
    result = exact.evaluate(inputs)
    qonnx = run_qonnx(model, inputs)
    differ = int((result.outputs.reshape(qonnx.shape) != qonnx).sum())
    assert differ == sum(result.float32_rounding.values()) and result.unexplained == {}


def test_a_wrong_exact_level_is_unexplained_not_rounding(tmp_path):
    model = _block_model(tmp_path)
    exact = ExactModel(model)
    layer = next(iter(exact.layers.values()))
    layer.table.thresholds = [t - 40 for t in layer.table.thresholds]  # far from any boundary
    result = exact.evaluate(random_inputs(model, 4, seed=1))
    assert sum(result.unexplained.values()) > 0


@needs_tie_case
@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_tie_case_builds_and_verifies_against_the_exact_evaluation(tmp_path):
    """The shared case's accelerator equals the exact evaluation on every input; QONNX's one
    float32-rounded pixel is reported as such, not as a mismatch."""
    result = build(TIE_CASE, tmp_path / "out", verify=["hls-arith"], random_count=2)
    assert result.verified is True, result.verification_summary()
    extreme = next(v for v in result.verification if v.kind == "extreme")
    assert extreme.reference == "exact" and extreme.matched == extreme.inputs
    assert (extreme.qonnx_float32_rounding, extreme.qonnx_unexplained) == (1, 0)
