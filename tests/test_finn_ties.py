"""Round half to even through FINN (finn_flow.steps.ties) and the pre-flight refusals
(finn_flow.steps.preflight).

Oracles: qonnx's own execution of a QONNX ``Quant`` node (``int_quant``: float32 division, clip,
``np.round``), and exact rational arithmetic (``fractions.Fraction``) rounded half to even, over
whole input ranges: every tie of the input grid and the float32 neighbours of every threshold for
float inputs (with monotonicity this covers every float32 input), every integer of the input
datatype or accumulator range for integer inputs. The first part needs qonnx only; the FINN part
(``finn`` marker) runs FINN's own conversion and streamlining, and a whole build of a model whose
input quantizer puts digits pixels (k/16) on ties.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from fractions import Fraction

import numpy as np
import pytest
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.custom_op.general.multithreshold import multithreshold
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.util.basic import qonnx_make_model

from brevitas_a2q.errors import A2QInputError
from finn_flow import finn_available
from finn_flow.steps.pipeline import insert_a2q_steps
from finn_flow.steps.preflight import check_activation_quantizers
from finn_flow.steps.ties import (
    FIRST_LEVEL_ATTR,
    RoundHalfEvenFloatThresholds,
    RoundHalfEvenIntegerThresholds,
    quant_levels,
    round_half_even_thresholds,
    step_a2q_round_half_even,
    step_a2q_round_half_even_streamlined,
)

GENERAL = "qonnx.custom_op.general"
F32 = np.float32


def _levels_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    low = -(2 ** (bits - 1)) + narrow if signed else 0
    high = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1 - narrow
    return low, high


def finn_thresholds(scale: np.ndarray, low: int, high: int) -> np.ndarray:
    """FINN's thresholds for a Quant activation: the half-way points (L + 1/2) * scale (FINN+
    computes them in float64, upstream in float32; both give these float32 values here)."""
    levels = np.arange(low, high, dtype=np.float64) + 0.5
    return (levels[None, :] * np.asarray(scale, np.float64).reshape(-1, 1)).astype(F32)


def converted_model(thresholds: np.ndarray, first: int, scale: np.ndarray | float, out_dtype: str,
                    channels: int, in_dtype: str = "FLOAT32") -> ModelWrapper:
    """What FINN's ConvertQuantActToMultiThreshold builds: MultiThreshold -> Add(L0) -> Mul(s)."""
    nodes = [helper.make_node("MultiThreshold", ["x", "T"], ["mt"], domain=GENERAL,
                              out_dtype=out_dtype, data_layout="NC"),
             helper.make_node("Add", ["mt", "bias"], ["added"]),
             helper.make_node("Mul", ["added", "scale"], ["y"])]
    graph = helper.make_graph(nodes, "converted",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("T", thresholds.astype(F32))
    model.set_initializer("bias", np.asarray(first, dtype=F32))
    scale = np.asarray(scale, dtype=F32)
    model.set_initializer("scale", scale.reshape(1, -1) if scale.size > 1 else scale.reshape(()))
    model.set_tensor_datatype("x", DataType[in_dtype])
    return model.transform(InferShapes())


def quant_model(scale: float, bits: int, signed: bool, narrow: bool, channels: int,
                before: str | None = None, rounding: str = "ROUND") -> ModelWrapper:
    """A QONNX graph x -> [before] -> Quant."""
    nodes, src = [], "x"
    if before is not None:
        nodes.append(helper.make_node(before, ["x"], ["pre"], name=f"{before}_0"))
        src = "pre"
    nodes.append(helper.make_node("Quant", [src, "s", "z", "b"], ["y"], domain=GENERAL,
                                  name="Quant_0", signed=int(signed), narrow=int(narrow),
                                  rounding_mode=rounding))
    graph = helper.make_graph(nodes, "quant",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("s", np.asarray(scale, dtype=F32))
    model.set_initializer("z", np.asarray(0.0, dtype=F32))
    model.set_initializer("b", np.asarray(float(bits), dtype=F32))
    return model


def _run(model: ModelWrapper, x: np.ndarray) -> np.ndarray:
    return execute_onnx(model, {"x": x.reshape(1, -1).astype(F32)})["y"].ravel()


def tie_values(scale: float, low: int, high: int) -> np.ndarray:
    """Every float32 x with x / scale == L + 1/2 exactly (qonnx's float32 division) for a level L
    of the grid, each with its 4 float32 neighbours on either side."""
    s = F32(scale)
    mids = ((np.arange(low - 1, high + 1) + 0.5) * np.float64(s)).astype(F32)
    near = [mids]
    for direction in (np.inf, -np.inf):
        x = mids
        for _ in range(4):
            x = np.nextafter(x, F32(direction))
            near.append(x)
    return np.unique(np.concatenate(near))


SCALES = [0.125, 0.1, 1 / 3, 0.20828556, 2.0 ** -9, 3.0]
GRIDS = [(4, True, False), (4, True, True), (4, False, False), (3, False, True), (8, True, False),
         (8, False, False)]


# --- float thresholds: every tie of the grid, every threshold's neighbours -------------------

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bits,signed,narrow", GRIDS)
def test_float_thresholds_are_qonnx_quant_at_every_tie(scale, bits, signed, narrow):
    """Thresholds are the exact boundaries of QONNX's Quant: x >= T[t] flips exactly where
    round_half_even(float32(x / s)) reaches the next level (checked at T and its float32
    predecessor; both sides are monotone in x, so this holds for every float32 x), and every
    tie of the grid, with its neighbours, gets QONNX's level."""
    low, high = _levels_range(bits, signed, narrow)
    T = round_half_even_thresholds(np.array([scale]), low, high - low)
    target = np.arange(low + 1, high + 1)
    assert np.all(quant_levels(T, scale, low, high) >= target)
    assert np.all(quant_levels(np.nextafter(T, F32(-np.inf)), scale, low, high) < target)
    x = tie_values(scale, low, high)
    expected = quant_levels(x, scale, low, high)
    got = low + multithreshold(x.reshape(1, -1), T).ravel()
    assert np.array_equal(got, expected)
    ratio = x.astype(np.float64) / np.float64(F32(scale))
    exact_ties = ratio[ratio - np.floor(ratio) == 0.5]
    odd = np.floor(exact_ties) % 2 == 1
    if scale in (0.125, 2.0 ** -9, 3.0):  # power-of-two / integer scales: ties are exact
        assert len(exact_ties) >= high - low and odd.any() and (~odd).any()


def test_finn_thresholds_round_ties_up_and_fixed_ones_to_even():
    """The digits case: a 4-bit signed input quantizer with scale 1/8 on pixels k/16: FINN's
    thresholds give a different level on every odd k with an even level below; ours never."""
    low, high = -8, 7
    pixels = (np.arange(17) / 16).astype(F32)
    expected = quant_levels(pixels, 0.125, low, high)
    finn = low + multithreshold(pixels.reshape(1, -1), finn_thresholds([0.125], low, high)).ravel()
    ours = low + multithreshold(pixels.reshape(1, -1),
                                round_half_even_thresholds(np.array([0.125]), low, 15)).ravel()
    ties = np.modf(pixels / 0.125)[0] == 0.5
    assert ties.sum() == 8
    assert np.array_equal(ours, expected)
    assert np.flatnonzero(finn != expected).tolist() == [1, 5, 9, 13]  # k = 1, 5, 9, 13


@pytest.mark.parametrize("bits,signed,narrow", GRIDS[:4])
def test_float_transformation_on_finn_converted_graph_equals_qonnx_quant(bits, signed, narrow):
    """The Transformation on the graph FINN builds for a Quant node (per-channel scales, one per
    column): the graph's output equals the QONNX Quant graph's on every tie of every channel's
    grid; before it, FINN's thresholds differ on ties."""
    low, high = _levels_range(bits, signed, narrow)
    scales = np.array([0.125, 0.1, 0.25, 1 / 3], dtype=F32)
    model = converted_model(finn_thresholds(scales, low, high), low, scales,
                            f"{'INT' if signed else 'UINT'}{bits}", channels=len(scales))
    x = np.stack(np.broadcast_arrays(*[tie_values(s, low, high)[:40] for s in scales]), axis=1)
    expected = np.stack([quant_levels(x[:, c], scales[c], low, high) * scales[c]
                         for c in range(len(scales))], axis=1)
    before = np.stack([execute_onnx(model, {"x": row[None]})["y"].ravel() for row in x])
    transform = RoundHalfEvenFloatThresholds()
    fixed = model.transform(transform)
    after = np.stack([execute_onnx(fixed, {"x": row[None]})["y"].ravel() for row in x])
    assert np.array_equal(after, expected.astype(F32))
    assert not np.array_equal(before, expected.astype(F32))
    (fix,) = transform.fixes
    assert fix.first_level == low and fix.changed > 0 and fix.quant_output == "y"
    mt = fixed.graph.node[0]
    assert helper.get_attribute_value(next(a for a in mt.attribute
                                           if a.name == FIRST_LEVEL_ATTR)) == low
    for c, s in enumerate(scales):  # and against qonnx executing a real Quant node
        q = quant_model(float(s), bits, signed, narrow, channels=len(x))
        assert np.array_equal(_run(q, x[:, c]), after[:, c])


def test_selu_like_thresholds_are_refused_naming_the_quant_output():
    model = converted_model(np.array([[-1.0, -0.2, 0.1, 0.9]], F32), 0, 0.5, "UINT3", 1)
    with pytest.raises(A2QInputError, match=r"Quant node writing 'y'.*half-way points"):
        model.transform(RoundHalfEvenFloatThresholds())


# --- integer thresholds after streamlining: exhaustive over the input range ------------------

def _absorbed(thresholds: np.ndarray, mul: float, add: float) -> np.ndarray:
    """FINN's streamlining of x_int -> Mul(a) -> Add(b) -> MultiThreshold: AbsorbAddIntoMultiThreshold
    (T - b) then AbsorbMulIntoMultiThreshold (T / a), in float32 as FINN does."""
    return ((thresholds.astype(F32) - F32(add)) / F32(mul)).astype(F32)


def _rhe(value: Fraction) -> int:
    """Round half to even of an exact rational."""
    floor = value.numerator // value.denominator
    rest = value - floor
    return floor + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2 == 1))


def exact_levels(acc: np.ndarray, mul: float, add: float, scale: float, low: int, high: int,
                 relu: bool) -> np.ndarray:
    """The QONNX arithmetic Quant([Relu](acc * a + b)) in exact rationals of the float32 params."""
    a, b, s = (Fraction(float(F32(v))) for v in (mul, add, scale))
    out = []
    for v in acc.tolist():
        pre = v * a + b
        pre = max(pre, Fraction(0)) if relu else pre
        out.append(min(max(_rhe(pre / s), low), high))
    return np.array(out)


INTEGER_CASES = [  # (input dtype, mul a, add b, scale s, bits, signed, relu)
    ("INT8", 0.25, 0.0, 0.5, 4, False, True),
    ("INT8", 2.0 ** -4, 0.375, 0.125, 4, True, False),
    ("INT8", 0.5, 48.0, 1.0, 4, True, False),  # |b| >> thresholds: a float nudge is lost
    ("INT16", 2.0 ** -8, -3.0, 2.0 ** -5, 8, False, True),
    ("UINT8", 0.75, -6.0, 1.5, 3, True, False),
    ("INT12", 0.01831, 0.2, 0.20828556, 4, False, True),  # learned float scales: no exact ties
]


@pytest.mark.parametrize("idt,mul,add,scale,bits,signed,relu", INTEGER_CASES)
def test_integer_thresholds_exhaustive_over_the_input_range(idt, mul, add, scale, bits, signed,
                                                            relu):
    """First step on the converted thresholds, FINN's absorption of the Mul/Add in front in
    float32, second step, FINN's ceil: for every integer of the input datatype the thresholded
    level equals round-half-even of the exact arithmetic. FINN alone (no steps) does not, on
    every case that has ties, nor the first step alone where a bias is absorbed."""
    low, high = _levels_range(bits, signed, False)
    dt = DataType[idt]
    acc = np.arange(dt.min(), dt.max() + 1)
    expected = exact_levels(acc, mul, add, scale, low, high, relu)
    converted = converted_model(finn_thresholds([scale], low, high), low, scale,
                                f"{'INT' if signed else 'UINT'}{bits}", channels=1)
    ours = converted.transform(RoundHalfEvenFloatThresholds())
    results = {}
    for name, model in (("finn", converted), ("float step only", ours), ("ours", ours)):
        streamlined = ModelWrapper(copy.deepcopy(model.model))
        T = _absorbed(streamlined.get_initializer("T"), mul, add)
        streamlined.set_initializer("T", T)
        streamlined.set_tensor_datatype("x", dt)
        if name == "ours":
            streamlined = streamlined.transform(RoundHalfEvenIntegerThresholds())
        T = np.ceil(streamlined.get_initializer("T"))  # FINN's RoundAndClipThresholds
        results[name] = low + multithreshold(acc.reshape(1, -1).astype(F32), T).ravel()
    ties = sum(1 for v in acc.tolist() if (((v * Fraction(float(F32(mul))) + Fraction(
        float(F32(add)))) / Fraction(float(F32(scale)))) % 1) == Fraction(1, 2))
    assert np.array_equal(results["ours"], expected), np.flatnonzero(results["ours"] != expected)
    if ties:
        assert not np.array_equal(results["finn"], expected)
        if add != 0:  # float32 (T - b) / a moved nudged thresholds back: the second step is needed
            assert not np.array_equal(results["float step only"], expected)
    else:
        assert idt == "INT12"  # the learned-scale case has no input on a tie
    assert (ties > 0) == (idt != "INT12")


def test_integer_step_refuses_a_float_input_threshold_changed_by_streamlining():
    model = converted_model(finn_thresholds([0.125], -8, 7), -8, 0.125, "INT4", 1)
    model = model.transform(RoundHalfEvenFloatThresholds())
    model.set_initializer("T", _absorbed(model.get_initializer("T"), 1 / 255, 0.0))
    model.graph.node[0].name = "MultiThreshold_0"
    with pytest.raises(A2QInputError, match=r"'MultiThreshold_0' faces a float input.*outside"):
        model.transform(RoundHalfEvenIntegerThresholds())


def test_integer_step_leaves_unmarked_nodes_and_says_so():
    model = converted_model(finn_thresholds([1.0], 0, 15), 0, 1.0, "UINT4", 1, in_dtype="INT8")
    before = model.get_initializer("T").copy()
    transform = RoundHalfEvenIntegerThresholds()
    model = model.transform(transform)
    assert transform.unmarked == ["mt"] and np.array_equal(model.get_initializer("T"), before)


def test_steps_write_what_they_changed(tmp_path):
    class Cfg:
        output_dir = str(tmp_path)

    model = converted_model(finn_thresholds([0.125], -8, 7), -8, 0.125, "INT4", 1)
    model = step_a2q_round_half_even(model, Cfg())
    model = step_a2q_round_half_even_streamlined(model, Cfg())
    data = json.loads((tmp_path / "ties.json").read_text())
    assert [n["stage"] for n in data["nodes"]] == ["float", "integer"]
    assert data["nodes"][0]["changed"] == 8 and data["nodes"][0]["quant_output"] == "y"


def test_tie_steps_are_inserted_around_conversion_and_streamlining():
    steps = insert_a2q_steps(["step_qonnx_to_finn", "step_tidy_up", "step_streamline",
                              "step_convert_to_hw", "step_create_dataflow_partition",
                              "step_specialize_layers", "step_minimize_bit_width"])
    names = [s if isinstance(s, str) else s.__name__ for s in steps]
    assert names.index("step_a2q_round_half_even") == names.index("step_qonnx_to_finn") + 1
    assert names.index("step_a2q_round_half_even_streamlined") == \
        names.index("step_convert_to_hw") - 1
    assert names.index("step_a2q_round_half_even_streamlined") > names.index("step_streamline")
    again = insert_a2q_steps(steps)
    assert [s for s in again if s is step_a2q_round_half_even] == [step_a2q_round_half_even]
    none = insert_a2q_steps(["step_qonnx_to_finn", "step_specialize_layers",
                             "step_minimize_bit_width"], ties=None, ties_streamlined=None)
    assert all(getattr(s, "__name__", s).find("round_half_even") < 0 for s in none)


# --- pre-flight refusals ---------------------------------------------------------------------

def test_unsigned_identity_input_quantizer_refused_only_when_narrow_naming_node_and_fix():
    """On both FINNs alike: a non-narrow unsigned identity quantizer is built (a Relu in front,
    finn_flow.steps.upstream_rewrites), a narrow one is refused naming the node and the fix."""
    check_activation_quantizers(quant_model(0.0625, 4, signed=False, narrow=False, channels=4,
                                            before="Flatten"), "m.onnx")
    model = quant_model(0.0625, 4, signed=False, narrow=True, channels=4, before="Flatten")
    with pytest.raises(A2QInputError) as err:
        check_activation_quantizers(model, "m.onnx")
    text = str(err.value)
    for part in ("m.onnx", "Quant node 'Quant_0'", "input quantizer", "narrow unsigned identity",
                 "Int8ActPerTensorFloat", "narrow_range=False", "signed Quant nodes for identity"):
        assert part in text, text


def test_unsigned_quantizer_after_relu_passes_and_signed_after_relu_is_refused():
    check_activation_quantizers(quant_model(0.1, 4, False, False, 4, before="Relu"))
    with pytest.raises(A2QInputError, match=r"'Quant_0', after the Relu node 'Relu_0'.*signed"):
        check_activation_quantizers(quant_model(0.1, 4, True, False, 4, before="Relu"))
    check_activation_quantizers(quant_model(0.1, 4, True, True, 4))  # signed identity: fine


@pytest.mark.parametrize("mode", ["FLOOR", "CEIL", "UP"])
def test_non_round_activation_quantizer_refused(mode):
    with pytest.raises(A2QInputError, match=f"rounding_mode {mode}"):
        check_activation_quantizers(quant_model(0.1, 4, True, False, 4, rounding=mode))


def test_wide_activation_quantizer_refused_where_finn_rounds_it_half_up(monkeypatch):
    import finn_flow.steps.preflight as preflight

    model = quant_model(0.1, 12, True, False, 4)
    monkeypatch.setattr(preflight, "high_bit_quant_rounds_half_up", lambda: True)
    with pytest.raises(A2QInputError, match=r"'Quant_0'.*12 bits.*Requant.*rounds half up"):
        check_activation_quantizers(model)
    monkeypatch.setattr(preflight, "high_bit_quant_rounds_half_up", lambda: False)
    check_activation_quantizers(model)  # upstream FINN leaves it unconverted


def test_non_zero_zero_point_refused():
    model = quant_model(0.1, 4, True, False, 4)
    model.set_initializer("z", np.asarray(1.0, dtype=F32))
    with pytest.raises(A2QInputError, match="zero point"):
        check_activation_quantizers(model)


# --- with FINN --------------------------------------------------------------------------------

FINN_OK, FINN_REASON = finn_available()
needs_finn = [pytest.mark.finn,
              pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")]


def _integer_qonnx(idt: str, mul: float, add: float, scale: float, bits: int, signed: bool,
                   relu: bool) -> ModelWrapper:
    """x (integers of idt) -> Mul(a) -> Add(b) -> [Relu] -> Quant(s), one channel per value."""
    dt = DataType[idt]
    n = dt.max() - dt.min() + 1
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Add", ["m", "c"], ["p"])]
    src = "p"
    if relu:
        nodes.append(helper.make_node("Relu", ["p"], ["r"]))
        src = "r"
    nodes.append(helper.make_node("Quant", [src, "s", "z", "b"], ["y"], domain=GENERAL,
                                  signed=int(signed), narrow=0, rounding_mode="ROUND"))
    graph = helper.make_graph(nodes, "int", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])])
    model = ModelWrapper(qonnx_make_model(graph))
    for name, value in (("a", mul), ("c", add), ("s", scale), ("z", 0.0), ("b", float(bits))):
        model.set_initializer(name, np.asarray(value, dtype=F32))
    model.set_tensor_datatype("x", dt)
    return model.transform(InferShapes())


@pytest.mark.parametrize("case", INTEGER_CASES[:5])
@pytest.mark.finn
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_finn_conversion_and_streamlining_exhaustive_over_the_input_range(case):
    """FINN's own ConvertQONNXtoFINN and Streamline with our two steps around them: on every
    integer of the input datatype, the thresholded level equals QONNX's execution of the model
    (exact here: power-of-two arithmetic) and FINN's thresholds, after FINN's
    RoundAndClipThresholds, too; FINN without our steps differs on ties."""
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.transformation.infer_datatypes import InferDataTypes

    from finn_flow.finn_compat import import_builder, infer_thresholding_layer

    import_builder()  # FINN's import-time stand-ins (onnx.mapping) before its transformations
    idt, mul, add, scale, bits, signed, relu = case
    low, _ = _levels_range(bits, signed, False)
    qonnx = _integer_qonnx(idt, mul, add, scale, bits, signed, relu)
    dt = DataType[idt]
    x = np.arange(dt.min(), dt.max() + 1, dtype=F32)
    expected = _run(qonnx, x) / F32(scale)
    assert np.array_equal(expected, exact_levels(x.astype(int), mul, add, scale, low, 2 ** bits,
                                                 relu).clip(max=expected.max()))
    outputs = {}
    for name in ("finn", "ours"):
        model = qonnx.transform(InferShapes()).transform(ConvertQONNXtoFINN())
        if name == "ours":
            model = step_a2q_round_half_even(model, None)
        model = model.transform(Streamline()).transform(InferDataTypes())
        (mt,) = model.get_nodes_by_op_type("MultiThreshold")
        inp = model.graph.input[0].name
        assert model.get_tensor_datatype(mt.input[0]).is_integer() and mt.input[0] == inp
        if name == "ours":
            model = step_a2q_round_half_even_streamlined(model, None)
        out = execute_onnx(model, {inp: x.reshape(1, -1)})[model.graph.output[0].name].ravel()
        hw = model.transform(infer_thresholding_layer()()).transform(RoundAndClipThresholds())
        (node,) = [n for n in hw.graph.node if n.op_type.startswith("Thresholding")]
        T = hw.get_initializer(node.input[1])
        assert np.array_equal(T, np.round(T))  # integer thresholds facing integer inputs
        act_val = getCustomOp(node).get_nodeattr("ActVal")  # the level of count 0
        levels = execute_onnx(hw, {inp: x.reshape(1, -1)}, return_full_exec_context=True)[
            node.output[0]].ravel() - act_val
        assert np.array_equal(levels, multithreshold(x.reshape(1, -1), T).ravel())
        outputs[name] = (levels, out)
    first = int(round(float(outputs["ours"][1][0] / scale))) - int(outputs["ours"][0][0])
    assert np.array_equal(outputs["ours"][0] + first, expected)
    assert np.array_equal(outputs["ours"][1], _run(qonnx, x))  # the whole FINN graph = QONNX
    assert not np.array_equal(outputs["finn"][0] + first, expected)
    assert not np.array_equal(outputs["finn"][1], _run(qonnx, x))


# --- a whole build: a model whose input quantizer puts digits pixels on ties -----------------

def _tie_model(signed_input: bool = True, steps: int = 40):
    """Digits MLP (A2Q, P=12) with a 4-bit input quantizer whose learned scale is set to 1/8: odd
    multiples of 1/16 (half the digits pixel values) are ties. Trained briefly with the scale
    learnable, then the scale is set back to exactly 1/8."""
    import torch
    from brevitas.nn import QuantIdentity
    from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat

    from brevitas_a2q.train.data import load_digits
    from brevitas_a2q.train.ep_init import euclidean_projection_init
    from brevitas_a2q.train.models import build_mlp

    torch.manual_seed(0)
    model = build_mlp("a2q", acc_bits=12, hidden=(32,))
    if signed_input:
        model.input_quant = QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=4,
                                          return_quant_tensor=True)
    else:  # unsigned identity quantizer (levels 0..15), scale set to 1/8 below as well
        model.input_quant = QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4,
                                          return_quant_tensor=True)
    scaling = model.input_quant.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
    scaling.init_scale()  # a learned parameter from the start (no statistics phase)
    train, test = load_digits()
    euclidean_projection_init(model, train.tensors[0][:1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():  # scale = value / 2^(bits-1) signed, value / (2^bits - 1) unsigned
        scaling.value.fill_(1.0 if signed_input else 15 / 8)
    scale = float(model.input_quant(test.tensors[0][:1].flatten(1)).scale.detach())
    assert scale == 0.125, scale
    return model, test.tensors[0]


@pytest.fixture(scope="module")
def tie_export(tmp_path_factory):
    if not FINN_OK:
        pytest.skip(f"FINN not importable: {FINN_REASON}")
    import torch

    from brevitas_a2q.export.qonnx import export_qonnx

    torch.set_num_threads(1)
    model, test_x = _tie_model()
    path = tmp_path_factory.mktemp("ties") / "mlp_ties.onnx"
    export_qonnx(model, test_x[:1], path)
    inputs = test_x[:10].numpy()
    return path, inputs


def _integer_levels(levels: np.ndarray) -> np.ndarray:
    """``value / scale`` of a quantized tensor as exact integers: the float32 division can land a
    few ulps off the integer (2.9999998 for 3), which is not a difference of level."""
    rounded = np.round(levels)
    assert np.abs(levels - rounded).max(initial=0) < 1e-3, "levels off the integer grid"
    return rounded


def _levels_qonnx(path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QONNX: input-quantizer levels, hidden-activation levels and outputs, per input."""
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(ModelWrapper(str(path)))
    quants = [n for n in model.graph.node if n.op_type == "Quant"
              and model.get_initializer(n.input[0]) is None]
    name, out = model.graph.input[0].name, model.graph.output[0].name
    shape = model.get_tensor_shape(name)
    rows = []
    for x in inputs:
        ctx = execute_onnx(model, {name: x.reshape(shape).astype(F32)},
                           return_full_exec_context=True)
        rows.append([_integer_levels(ctx[q.output[0]] / model.get_initializer(q.input[1]))
                     for q in quants] + [ctx[out]])
    return tuple(np.stack([r[i] for r in rows]).reshape(len(inputs), -1) for i in range(3))


def _levels_finn(out_dir, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FINN's dataflow graph (parent + child, FINN's Python execution): the same three."""
    from finn_flow.finn_compat import execute_parent

    parent = out_dir / "intermediate_models" / "dataflow_parent.onnx"
    child = out_dir / "intermediate_models" / "step_create_dataflow_partition.onnx"
    pm, cm = ModelWrapper(str(parent)), ModelWrapper(str(child))
    shape = pm.get_tensor_shape(pm.graph.input[0].name)
    partition = next(n for n in pm.graph.node if n.op_type == "StreamingDataflowPartition")
    thresholding = next(n for n in cm.graph.node if n.op_type.startswith("Thresholding"))
    first_mvau = next(n for n in cm.graph.node if n.op_type.startswith("MVAU"))
    rows = []
    for x in inputs:
        ctx = execute_parent(str(parent), str(child), x.reshape(shape), return_full_ctx=True)
        inner = execute_onnx(cm, {cm.graph.input[0].name: ctx[partition.input[0]]},
                             return_full_exec_context=True)
        rows.append([inner[thresholding.output[0]], inner[first_mvau.output[0]],
                     ctx[pm.graph.output[0].name]])
    return tuple(np.stack([r[i] for r in rows]).reshape(len(inputs), -1) for i in range(3))


def _without_tie_steps(monkeypatch):
    """finn_flow.build with FINN's own rounding (our two tie steps left out)."""
    module = sys.modules["finn_flow.build"]
    monkeypatch.setattr(module, "insert_a2q_steps",
                        functools.partial(_insert_without_ties, module.insert_a2q_steps))


def _insert_without_ties(insert, steps, **kwargs):
    kwargs.update(ties=None, ties_streamlined=None)
    return insert(steps, **kwargs)


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_build_equals_qonnx_on_tie_inputs_and_differs_without_the_tie_steps(tie_export, tmp_path,
                                                                            monkeypatch):
    """finn_flow.build: FINN's execution of the dataflow graph gives QONNX's input-quantizer levels
    and hidden levels exactly and QONNX's outputs up to FINN's float tail, on 10 digits images
    (134 of 640 pixels on ties); with FINN's own rounding it does not."""
    from finn_flow import build

    path, inputs = tie_export
    ties = int((np.modf(inputs / 0.125)[0] == 0.5).sum())
    assert ties > 100
    q_in, q_hidden, q_out = _levels_qonnx(path, inputs)
    build(path, tmp_path / "ours")
    report = json.loads((tmp_path / "ours" / "ties.json").read_text())
    assert report["nodes"][0]["first_level"] == -8 and report["nodes"][0]["changed"] == 8
    f_in, f_hidden, f_out = _levels_finn(tmp_path / "ours", inputs)
    assert np.array_equal(f_in, q_in)  # Thresholding writes the level (ActVal -8 added)
    assert np.array_equal(f_hidden, q_hidden)
    scale = np.abs(q_out).max()
    assert np.abs(f_out - q_out).max() <= 1e-5 * scale
    assert np.array_equal(f_out.argmax(1), q_out.argmax(1))

    _without_tie_steps(monkeypatch)
    build(path, tmp_path / "finn")
    assert not (tmp_path / "finn" / "ties.json").exists()
    g_in, g_hidden, g_out = _levels_finn(tmp_path / "finn", inputs)
    assert int((g_in != q_in).sum()) > 0
    assert np.abs(g_out - q_out).max() > 1e-3 * scale


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
@pytest.mark.parametrize("executor", ["hls-arith", "cppsim"])
def test_verified_build_bit_exact_and_equal_to_qonnx_on_tie_inputs(tie_export, tmp_path,
                                                                   executor):
    """finn_flow.build's own verification on the tie inputs ("real"), random and extreme inputs:
    bit-exact against FINN's graph and equal to the QONNX model (rel. 1e-5, FINN's float tail).
    cppsim needs g++ and finn-hlslib (upstream FINN dev + fetched finn-hlslib)."""
    from finn_flow import build, cppsim_available

    if executor == "cppsim":
        ok, reason = cppsim_available()
        if not ok:
            pytest.skip(f"C++ simulation unavailable: {reason}")
    path, inputs = tie_export
    result = build(path, tmp_path / "out", verify=[executor], verify_inputs=inputs,
                   random_count=5)
    real = next(v for v in result.verification if v.kind == "real")
    assert real.matched == real.inputs == len(inputs), result.verification_summary()
    assert real.final_max_rel_diff <= 1e-5 and real.final_argmax_agree == len(inputs)
    assert result.verified, result.verification_summary()


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_unsigned_identity_input_quantizer_built_exactly_on_both_finns(tmp_path):
    """Upstream FINN dev rejects an unsigned QuantIdentity deep inside its conversion (FINN+
    converts it); build() puts the exact Relu in front on both FINNs, and the build then equals
    QONNX on tie inputs."""
    import torch
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from qonnx.util.cleanup import cleanup_model

    from brevitas_a2q.export.qonnx import export_qonnx
    from finn_flow import build
    from finn_flow.finn_compat import import_builder, unsigned_identity_quant_supported

    torch.set_num_threads(1)
    model, test_x = _tie_model(signed_input=False, steps=20)
    path = tmp_path / "unsigned_input.onnx"
    export_qonnx(model, test_x[:1], path)
    import_builder()
    if not unsigned_identity_quant_supported():  # what the rewrite is for
        with pytest.raises(ValueError, match="only supports signed Quant nodes for identity"):
            cleanup_model(ModelWrapper(str(path))).transform(ConvertQONNXtoFINN())
    inputs = test_x[:10].numpy()
    q_in, q_hidden, q_out = _levels_qonnx(path, inputs)
    build(path, tmp_path / "out")
    f_in, f_hidden, f_out = _levels_finn(tmp_path / "out", inputs)
    assert np.array_equal(f_in, q_in) and np.array_equal(f_hidden, q_hidden)
    assert np.abs(f_out - q_out).max() <= 1e-5 * np.abs(q_out).max()


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_built_thresholds_exhaustive_over_each_channels_exact_accumulator_range(tie_export,
                                                                               tmp_path):
    """The trained model's hidden layer after the whole build: for every channel of the first
    MVAU and every accumulator value of its exact range (the INT4 input range and the integer
    weights), the MVAU's thresholds give the level of the QONNX model's arithmetic, Quant(Relu(
    BatchNorm(acc * s_in * s_w))), evaluated in float64 and rounded half to even."""
    from qonnx.custom_op.general.intquant import int_quant
    from qonnx.util.cleanup import cleanup_model

    from finn_flow import build

    path, _ = tie_export
    build(path, tmp_path / "out")
    q = cleanup_model(ModelWrapper(str(path)))
    acts = [n for n in q.graph.node if n.op_type == "Quant" and q.get_initializer(n.input[0]) is None]
    s_in, s_out = (np.float64(q.get_initializer(n.input[1])) for n in acts[:2])
    matmul = q.get_nodes_by_op_type("MatMul")[0]
    wq = q.find_producer(matmul.input[1])
    s_w = np.asarray(q.get_initializer(wq.input[1]), np.float64).ravel()
    w_int = int_quant(*(q.get_initializer(wq.input[i]) for i in range(4)), 1, 1, "ROUND") / \
        q.get_initializer(wq.input[1])
    bn = q.get_nodes_by_op_type("BatchNormalization")[0]
    gamma, beta, mean, var = (np.asarray(q.get_initializer(bn.input[i]), np.float64)
                              for i in range(1, 5))
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    final = ModelWrapper(str(tmp_path / "out/intermediate_models/step_a2q_accumulators.onnx"))
    mvau = next(n for n in final.graph.node if n.op_type.startswith("MVAU"))
    weights, thresholds = (final.get_initializer(mvau.input[i]) for i in (1, 2))
    assert np.array_equal(weights, np.round(w_int))  # FINN's integer weights are the model's
    assert np.all(gamma > 0)
    values = mismatched = 0
    for c in range(weights.shape[1]):
        col = weights[:, c]
        lo, hi = int(np.minimum(-8 * col, 7 * col).sum()), int(np.maximum(-8 * col, 7 * col).sum())
        acc = np.arange(lo, hi + 1, dtype=np.float64)
        pre = (acc * s_in * s_w[c] - mean[c]) * gamma[c] / np.sqrt(var[c] + eps) + beta[c]
        expected = np.clip(np.round(np.maximum(pre, 0) / s_out), 0, 15)
        got = (acc[:, None] >= thresholds[c][None, :]).sum(axis=1)
        values += len(acc)
        mismatched += int((got != expected).sum())
    assert values > 50_000 and mismatched == 0
