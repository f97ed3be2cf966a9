"""Accumulator analysis of hand-built qonnx graphs, checked against independent oracles:
qonnx's calculate_matvec_accumulator_range, brute force over extreme inputs, execute_onnx."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import calculate_matvec_accumulator_range, qonnx_make_model

from brevitas_a2q.analysis.qonnx_analysis import (
    AnnotateAccumulatorDatatypes,
    accumulator_analysis,
    analyze_accumulators,
    node_input_datatype,
    node_integer_weights,
)
from brevitas_a2q.analysis.records import AccumulatorRecord, weight_fingerprint, write_records
from brevitas_a2q.errors import A2QInputError

QONNX = "qonnx.custom_op.general"


def _quant(name, inp, out, bits, signed, scale):
    return helper.make_node("Quant", [inp, f"{name}_s", f"{name}_z", f"{name}_b"], [out],
                            domain=QONNX, name=name, signed=int(signed), narrow=0,
                            rounding_mode="ROUND"), {f"{name}_s": np.asarray(scale, np.float32),
                                                     f"{name}_z": np.float32(0),
                                                     f"{name}_b": np.float32(bits)}


def _matmul_model(w_float, w_scale, in_bits=4, in_signed=False, w_bits=4):
    """x -> Quant(N bits) -> MatMul(Quant(W)) -> y; W is (K, out)."""
    k, out = w_float.shape
    qin, pin = _quant("qin", "x", "xq", in_bits, in_signed, 0.5)
    qw, pw = _quant("qw", "w", "wq", w_bits, True, w_scale)
    mm = helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm")
    graph = helper.make_graph(
        [qin, qw, mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("w", w_float.astype(np.float32))
    for name, value in {**pin, **pw}.items():
        model.set_initializer(name, value)
    return model.transform(InferShapes())


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(6, 3))
    scale = np.full((1, 3), 0.25, np.float32)
    # float weights that are not exactly integer multiples of the scale: the Quant node rounds
    return _matmul_model(q * 0.25 + rng.uniform(-0.1, 0.1, q.shape), scale), q


def test_weights_are_what_the_quant_node_computes(model):
    wrapper, q = model
    weights = node_integer_weights(wrapper, wrapper.graph.node[2])
    np.testing.assert_array_equal(weights.int_weights, q.T)
    assert weights.weight_bits == 4 and weights.tensor == "w"
    inp = node_input_datatype(wrapper, "xq")
    assert (inp.bits, inp.signed, inp.minimum, inp.maximum) == (4, False, 0, 15)


def test_exact_range_matches_qonnx_and_brute_force(model):
    wrapper, q = model
    (result,) = analyze_accumulators(wrapper)
    lo, hi = calculate_matvec_accumulator_range(q.astype(np.float64), DataType["UINT4"])
    assert (result.exact_min, result.exact_max) == (int(lo.min()), int(hi.max()))
    sums = [np.asarray(x) @ q for x in itertools.product((0, 15), repeat=q.shape[0])]
    assert (result.exact_min, result.exact_max) == (int(np.min(sums)), int(np.max(sums)))
    # executing the graph on the maximizing input gives that accumulator times the scales
    col = int(np.argmax(np.max(sums, axis=0)))
    x = np.where(q[:, col] > 0, 15, 0).astype(np.float32)[None] * 0.5
    y = execute_onnx(wrapper, {"x": x})["y"]
    assert round(float(y[0, col]) / (0.5 * 0.25)) == result.exact_max


def test_records_are_matched_and_violations_reported(model):
    wrapper, q = model
    (plain,) = analyze_accumulators(wrapper)
    common = dict(node="old", op_type="MatMul", weight="w", output="y", input_bits=4,
                  input_signed=False, weight_bits=4, out_channels=3, dot_length=6,
                  fingerprint=weight_fingerprint(q.T))
    # A2Q promises the L1 bound, which can need more bits than the exact range
    assert plain.bits_a2q_bound >= plain.bits_exact_range
    for target, holds in ((plain.bits_a2q_bound, True), (plain.bits_exact_range - 1, False)):
        write_records(wrapper, [AccumulatorRecord(layer="fc", variant="a2q", target_bits=target,
                                                  **common)])
        (result,) = analyze_accumulators(wrapper)
        assert (result.layer, result.target_bits, result.bound_holds) == ("fc", target, holds)
        assert analyze_accumulators(wrapper).all_hold is holds
    # a record whose weights are no longer in the file is reported, not silently dropped
    write_records(wrapper, [AccumulatorRecord(layer="gone", variant="a2q", target_bits=30,
                                              **{**common, "fingerprint": "0" * 40})])
    report = analyze_accumulators(wrapper)
    assert [r.layer for r in report.unmatched_records] == ["gone"] and not report.all_hold


def test_analysis_and_transformation_contracts(model):
    wrapper, _ = model
    result = wrapper.analysis(accumulator_analysis)
    assert set(result) == {"mm"} and result["mm"]["proven_datatype"].startswith("SCALEDINT<")
    annotated = wrapper.transform(AnnotateAccumulatorDatatypes())
    bits = result["mm"]["bits_exact_range"]
    assert annotated.get_tensor_datatype("y") == DataType[f"SCALEDINT<{bits}>"]


def test_integer_annotated_graph_is_annotated_with_int():
    """A streamlined-style graph: integer-annotated input and weight, no Quant nodes."""
    q = np.array([[3, -2], [-4, 1], [7, 0]], dtype=np.float32)  # (K, out)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    wrapper = ModelWrapper(qonnx_make_model(graph))
    wrapper.set_initializer("w", q)
    wrapper.set_tensor_datatype("w", DataType["INT4"])
    wrapper.set_tensor_datatype("x", DataType["INT3"])
    (result,) = analyze_accumulators(wrapper)
    # channel 0: 3x - 4y + 7z over x in [-4, 3]: max 3*3 + 16 + 21 = 46, min -12 - 12 - 28 = -52
    assert (result.exact_min, result.exact_max, result.bits_exact_range) == (-52, 46, 7)
    annotated = wrapper.transform(AnnotateAccumulatorDatatypes())
    assert annotated.get_tensor_datatype("y") == DataType["INT7"]


def test_untraceable_input_is_a_clear_error(model):
    wrapper, _ = model
    wrapper.graph.node[0].op_type = "Sigmoid"  # input no longer comes from a Quant node
    del wrapper.graph.node[0].input[1:]
    with pytest.raises(A2QInputError, match="Sigmoid"):
        analyze_accumulators(wrapper)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_rows_are_output_channels_and_bound_every_output(group):
    """ConvTranspose weights (C_in, C_out/group, k): output channel g*C_out/group + j uses
    W[g*C_in/group:(g+1)*C_in/group, j]. The range per output channel must bound every output
    element qonnx computes, also for inputs at the extremes."""
    rng = np.random.default_rng(group)
    cin, per_group, k = 4, 3, 3
    q = rng.integers(-8, 8, size=(cin, per_group, k))
    qin, pin = _quant("qin", "x", "xq", 3, False, 1.0)
    qw, pw = _quant("qw", "w", "wq", 4, True, 1.0)
    conv = helper.make_node("ConvTranspose", ["xq", "wq"], ["y"], name="ct", group=group,
                            kernel_shape=[k], strides=[2])
    out_channels = per_group * group
    graph = helper.make_graph(
        [qin, qw, conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 11])])
    wrapper = ModelWrapper(qonnx_make_model(graph))
    wrapper.set_initializer("w", q.astype(np.float32))
    for name, value in {**pin, **pw}.items():
        wrapper.set_initializer(name, value)
    wrapper = wrapper.transform(InferShapes())
    rows = node_integer_weights(wrapper, conv).int_weights
    for o in range(out_channels):
        g, j = divmod(o, per_group)
        expected = np.concatenate([q[i, j] for i in range(g * cin // group,
                                                          (g + 1) * cin // group)])
        np.testing.assert_array_equal(rows[o], expected)
    (result,) = analyze_accumulators(wrapper)
    assert (result.op_type, result.dot_length, result.out_channels) == (
        "ConvTranspose", cin // group * k, out_channels)
    for trial in range(20):
        x = rng.choice([0.0, 7.0], size=(1, cin, 5)).astype(np.float32)
        if trial < out_channels:  # drive one channel to its maximum
            g, j = divmod(trial, per_group)
            sign = np.sign(q[:, j].sum(axis=1))
            x[0, :, :] = np.where(sign[:, None] > 0, 7.0, 0.0)
        y = execute_onnx(wrapper, {"x": x})["y"]
        assert result.exact_min <= y.min() and y.max() <= result.exact_max


def test_nothing_checked_is_never_a_pass(model):
    """A float ONNX (no quantized weight) and a quantized one without records: ``all_hold`` is
    None (not True), ``checked`` is 0 and the summary says nothing was checked; with a record it
    counts what was checked."""
    k, out = 4, 2
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph(
        [mm], "float", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out])],
        [helper.make_tensor("w", TensorProto.FLOAT, [k, out], np.ones(k * out).tolist())])
    float_report = analyze_accumulators(ModelWrapper(qonnx_make_model(graph)))
    assert len(float_report) == 0 and float_report.all_hold is None
    assert float_report.checked == 0 and float_report.summary.startswith("nothing checked")
    assert float_report.to_dict()["all_hold"] is None

    wrapper, q = model
    unrecorded = analyze_accumulators(wrapper)
    assert unrecorded.all_hold is None and unrecorded.to_dict()["all_hold"] is None
    assert (unrecorded.checked, unrecorded.unchecked) == (0, ["mm"])
    assert "none of the 1 accumulators has a target" in unrecorded.summary
    plain = unrecorded[0]
    write_records(wrapper, [AccumulatorRecord(
        layer="fc", node="mm", op_type="MatMul", weight="w", output="y", variant="a2q",
        target_bits=plain.bits_a2q_bound, input_bits=4, input_signed=False, weight_bits=4,
        out_channels=3, dot_length=6, fingerprint=weight_fingerprint(q.T))])
    checked = analyze_accumulators(wrapper)
    assert checked.all_hold is True and checked.to_dict()["checked"] == 1
    assert checked.to_dict()["unchecked"] == []
