"""The same models build the same on upstream FINN dev and on FINN+ (issue 21).

Graph-level tests (fast, qonnx only where marked): the rewrites of
:mod:`finn_flow.steps.upstream_rewrites` are exact (qonnx execution equal bit for bit before and after,
on random inputs of both signs) and leave what upstream FINN dev needs (every unsigned activation
quantizer behind a ``Relu``; no constant labelled with an integer type that cannot hold it), and the
pre-flight refusals are the same on both FINNs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU, TruncAvgPool2d
from brevitas.quant import Int32Bias, Uint8ActPerTensorFloat
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.basic import qonnx_make_model, sanitize_quant_values
from qonnx.util.cleanup import cleanup_model
from torch import nn

from brevitas_a2q import A2QPlusWeightQuant, export_qonnx
from brevitas_a2q.errors import A2QInputError
from finn_flow import finn_available
from finn_flow.steps import insert_a2q_steps
from finn_flow.steps.preflight import check_activation_quantizers
from finn_flow.steps.upstream_rewrites import (
    InsertReluBeforeUnsignedQuant,
    RelabelNonIntegerConstants,
    SetMultiThresholdLayouts,
    relu_would_be_exact,
)

FINN_OK, FINN_REASON = finn_available()
F32 = np.float32


class TruncNet(nn.Module):
    """unsigned input quantizer -> conv (A2Q+, P = 14) -> ReLU4 -> TruncAvgPool2d (FLOOR, as
    Brevitas's MobileNetV1 and ResNet examples) -> unsigned identity quantizer -> classifier with
    an Int32Bias: both unsigned quantizers are identity quantizers for FINN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = QuantIdentity(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)
        self.conv = QuantConv2d(3, 8, 3, bias=False, weight_quant=A2QPlusWeightQuant,
                                weight_bit_width=4, weight_accumulator_bit_width=14)
        self.act = QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.pool = TruncAvgPool2d(kernel_size=4, bit_width=8, float_to_int_impl_type="FLOOR")
        self.post = QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4,
                                  return_quant_tensor=True)
        self.fc = QuantLinear(8, 10, bias=True, bias_quant=Int32Bias, weight_bit_width=8)

    def forward(self, x):
        x = self.post(self.pool(self.act(self.conv(self.inp(x)))))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def trunc_model(tmp_path_factory) -> ModelWrapper:
    torch.set_num_threads(1)
    net = TruncNet()
    net.train()
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            net(torch.rand(8, 3, 6, 6))
    net.eval()
    path = tmp_path_factory.mktemp("trunc") / "trunc.onnx"
    export_qonnx(net, torch.rand(1, 3, 6, 6), path)
    return cleanup_model(ModelWrapper(str(path)))


def _outputs(model: ModelWrapper, inputs: np.ndarray) -> np.ndarray:
    name, out = model.graph.input[0].name, model.graph.output[0].name
    return np.stack([execute_onnx(model, {name: x[None]})[out][0] for x in inputs])


def _unsigned_activation_quants(model: ModelWrapper) -> list:
    return [n for n in model.graph.node if n.op_type == "Quant"
            and model.get_initializer(n.input[0]) is None
            and helper.get_attribute_value(next(a for a in n.attribute if a.name == "signed")) == 0]


def test_relu_before_unsigned_identity_quantizers_is_exact_on_inputs_of_both_signs(trunc_model):
    """The input quantizer and the one after the Trunc get a Relu (upstream FINN converts an
    unsigned quantizer only after a Relu); the outputs are bit-identical on inputs in [-2, 2)."""
    before = ModelWrapper(trunc_model.model.__deepcopy__())
    assert [q for q in _unsigned_activation_quants(before)
            if (p := before.find_producer(q.input[0])) is None or p.op_type != "Relu"]
    rewrite = InsertReluBeforeUnsignedQuant()
    after = trunc_model.transform(rewrite)
    assert len(rewrite.inserted) == 2, rewrite.inserted
    quants = _unsigned_activation_quants(after)
    assert len(quants) == 3
    for quant in quants:  # what upstream FINN's QuantReluHandler needs in front of each
        assert after.find_producer(quant.input[0]).op_type == "Relu", quant.name
    inputs = np.random.default_rng(0).uniform(-2, 2, size=(48, 3, 6, 6)).astype(F32)
    assert np.array_equal(_outputs(before, inputs), _outputs(after, inputs))
    again = InsertReluBeforeUnsignedQuant()  # idempotent
    after.transform(again)
    assert again.inserted == []


def _quant_graph(signed: bool, narrow: bool, scale: float = 0.1, bits: int = 4,
                 zero_point: float = 0.0) -> ModelWrapper:
    node = helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], domain="qonnx.custom_op.general",
                            name="Quant_0", signed=int(signed), narrow=int(narrow),
                            rounding_mode="ROUND")
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    model = ModelWrapper(qonnx_make_model(graph))
    for name, value in (("s", scale), ("z", zero_point), ("b", float(bits))):
        model.set_initializer(name, np.asarray(value, dtype=F32))
    return model


@pytest.mark.parametrize("scale", [0.1, 1 / 3, 2.0 ** -7, 3.0])
def test_relu_rewrite_exact_for_every_rounding_mode_at_negative_ties(scale):
    """Exact on every input, not only non-negative ones: negative values, values half a step
    below 0 (ties) and their float32 neighbours, for each rounding mode qonnx has."""
    x = np.concatenate([-np.arange(0, 20) * scale / 2, np.linspace(-3, 3, 41) * scale]).astype(F32)
    x = np.concatenate([x, np.nextafter(x, F32(np.inf)), np.nextafter(x, -F32(np.inf))])[:64]
    for mode in ("ROUND", "FLOOR", "CEIL", "HALF_UP", "HALF_DOWN", "UP", "DOWN"):
        model = _quant_graph(signed=False, narrow=False, scale=scale)
        for attr in model.graph.node[0].attribute:
            if attr.name == "rounding_mode":
                attr.s = mode.encode()
        before = execute_onnx(model, {"x": x[None]})["y"]
        after = model.transform(InsertReluBeforeUnsignedQuant())
        assert after.graph.node[0].op_type == "Relu", mode
        assert np.array_equal(before, execute_onnx(after, {"x": x[None]})["y"]), mode


def test_relu_rewrite_leaves_quantizers_it_cannot_make_exact_for_finn():
    assert relu_would_be_exact(_quant_graph(False, False), _quant_graph(False, False).graph.node[0])
    for model in (_quant_graph(True, False), _quant_graph(False, True), _quant_graph(False, False, bits=9),
                  _quant_graph(False, False, zero_point=1.0), _quant_graph(False, False, scale=-0.1)):
        assert not relu_would_be_exact(model, model.graph.node[0])
        rewrite = InsertReluBeforeUnsignedQuant()
        model.transform(rewrite)
        assert rewrite.inserted == []


def test_preflight_is_the_same_on_both_finns_for_unsigned_identity_quantizers():
    """A non-narrow unsigned identity quantizer builds on both FINNs (the Relu rewrite), a narrow
    one is refused on both, with one message naming the node and the fix; the build's step list
    has the rewrite."""
    check_activation_quantizers(_quant_graph(signed=False, narrow=False), "m.onnx")
    with pytest.raises(A2QInputError) as err:
        check_activation_quantizers(_quant_graph(signed=False, narrow=True), "m.onnx")
    for part in ("m.onnx", "Quant node 'Quant_0'", "input quantizer", "narrow unsigned identity",
                 "narrow_range=False", "Int8ActPerTensorFloat"):
        assert part in str(err.value), str(err.value)
    names = [getattr(s, "__name__", s) for s in insert_a2q_steps(
        ["step_qonnx_to_finn", "step_streamline", "step_convert_to_hw", "step_specialize_layers",
         "step_minimize_bit_width"])]
    assert names.index("step_a2q_relu_before_unsigned_quant") < names.index("step_qonnx_to_finn")
    assert names.index("step_streamline") < names.index("step_a2q_relabel_for_hw") \
        < names.index("step_a2q_round_half_even_streamlined") < names.index("step_convert_to_hw")


def _bias_tail(bias: np.ndarray, label: str) -> ModelWrapper:
    """x (INT8) -> Mul by a float scale -> Add a constant bias labelled ``label``."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"], name="Mul_0"),
             helper.make_node("Add", ["m", "b"], ["y"], name="Add_0")]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT,
                                                                        [1, 4])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("s", np.asarray([0.25], dtype=F32))
    model.set_initializer("b", bias.astype(F32))
    model.set_tensor_datatype("x", DataType["INT8"])
    model.set_tensor_datatype("b", DataType[label])
    return model


def test_float_bias_left_labelled_int32_is_relabelled_and_its_values_kept():
    """What upstream FINN's streamlining leaves (a float32 bias labelled INT32) is labelled
    FLOAT32, values unchanged, and FINN's execution (qonnx's ``sanitize_quant_values``) no longer
    rounds or rejects it; integer constants keep
    their labels."""
    bias = np.asarray([0.12772232, 0.22046776, -0.24872455, 3.0])
    model = _bias_tail(bias, "INT32")
    x = np.asarray([[1, -2, 3, 4]], dtype=F32)
    with pytest.raises(Exception, match="Rounding error is too high"), \
            pytest.warns(UserWarning, match="can't be represented"):  # what FINN's execution does
        sanitize_quant_values(model, ["b"], {"b": bias.astype(F32)})
    rewrite = RelabelNonIntegerConstants()
    fixed = model.transform(rewrite)
    assert rewrite.relabelled == [("b", "INT32")]
    assert fixed.get_tensor_datatype("b") == DataType["FLOAT32"]
    assert np.array_equal(fixed.get_initializer("b"), bias.astype(F32))
    kept = sanitize_quant_values(fixed, ["b"], {"b": bias.astype(F32)})["b"]
    assert np.array_equal(kept, bias.astype(F32))
    exact = execute_onnx(fixed, {"x": x})["y"]
    assert np.array_equal(exact, x * F32(0.25) + bias.astype(F32))
    integer = _bias_tail(np.asarray([1.0, -2.0, 3.0, 4.0]), "INT32")
    kept = RelabelNonIntegerConstants()
    integer.transform(kept)
    assert kept.relabelled == [] and integer.get_tensor_datatype("b") == DataType["INT32"]


# --- the parity suite: the networks of the shipped-networks work on whichever FINN runs -------
#
# Each model is built with hls-arith verification (and cppsim where it runs: upstream FINN dev
# with finn-hlslib) on a few random inputs plus the extreme inputs; per model the suite records the
# widths set and FINN's own per layer, the verdict per executor, any refusal (its message) and the
# build / verification times. Run by hand under upstream FINN dev with A2Q_PARITY_RECORD set, it
# writes that summary (benchmarks/results/finn_parity_upstream.json, committed); under FINN+ (CI)
# each model is compared with the committed upstream summary: same widths, same verdicts (for the
# executors both ran), same refusals.

RECORD_ENV = "A2Q_PARITY_RECORD"
UPSTREAM_SUMMARY = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / \
    "finn_parity_upstream.json"
RANDOM_INPUTS = 4


def _calibrated(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Activation scales and BatchNorm statistics from a few random batches (training mode)."""
    model.train()
    with torch.no_grad():
        for seed in range(4):
            torch.manual_seed(seed)
            model(torch.rand(8, *shape))
    return model.eval()


def _unsigned_input_quant() -> QuantIdentity:
    return QuantIdentity(act_quant=Uint8ActPerTensorFloat, return_quant_tensor=True)


def mobilenet_v1() -> tuple[nn.Module, tuple[int, ...]]:
    """Brevitas's MobileNetV1 (``imagenet_classification.models.mobilenetv1.MobileNet``) at width
    8/16, 18x18 RGB in, A2Q+ (P = 14) on the depthwise/pointwise blocks, 8-bit first conv and
    classifier (Int32Bias), ``TruncAvgPool2d`` with FLOOR; an unsigned input quantizer in front. The
    stem's activation is swapped for a per-tensor one (the example scales it per channel, which the
    depthwise conv after it cannot take as one accumulator scale)."""
    from brevitas_examples.imagenet_classification.models.common import CommonUintActQuant
    from brevitas_examples.imagenet_classification.models.mobilenetv1 import MobileNet

    torch.manual_seed(0)
    net = MobileNet(channels=[[8], [16, 16]], first_stage_stride=False, act_bit_width=4,
                    weight_bit_width=4, round_average_pool=False,
                    weight_quant=A2QPlusWeightQuant.let(accumulator_bit_width=14),
                    avg_pool_kernel_size=8, num_classes=10)
    net.features.init_block.activation = QuantReLU(act_quant=CommonUintActQuant, bit_width=4,
                                                   return_quant_tensor=True)
    shape = (3, 18, 18)
    return _calibrated(nn.Sequential(_unsigned_input_quant(), net), shape), shape


def resnet18_one_block() -> tuple[nn.Module, tuple[int, ...]]:
    """Brevitas's ResNet (``bnn_pynq.models.resnet.QuantResNet``, the A2Q example's base) with one
    block per stage, A2Q+ (P = 16), 4-bit activations, 32x32 RGB in, an unsigned input quantizer
    in front, the classifier's Int32Bias after the last MVAU."""
    from brevitas_examples.bnn_pynq.models.resnet import QuantBasicBlock, QuantResNet

    torch.manual_seed(0)
    net = QuantResNet(QuantBasicBlock, [1, 1, 1, 1], num_classes=10, act_bit_width=4,
                      weight_bit_width=4,
                      weight_quant=A2QPlusWeightQuant.let(accumulator_bit_width=16))
    shape = (3, 32, 32)
    return _calibrated(nn.Sequential(_unsigned_input_quant(), net), shape), shape


def espcn_subpixel() -> tuple[nn.Module, tuple[int, ...]]:
    """Brevitas's QuantESPCN as shipped, A2Q+ (tests/test_finn_subpixel.py)."""
    from test_finn_subpixel import shipped_espcn  # tests/ is on sys.path

    return shipped_espcn("a2q+"), (1, 16, 16)


def bnn_pynq(name: str):
    """Brevitas's BNN-PYNQ FC/CNV as shipped (tests/test_finn_bnn_pynq.py)."""
    def make() -> tuple[nn.Module, tuple[int, ...]]:
        from brevitas_examples.bnn_pynq.models import model_with_cfg

        torch.manual_seed(0)
        model, _ = model_with_cfg(name, pretrained=False)
        return model.eval(), (1, 28, 28) if name.startswith("tfc") else (3, 32, 32)
    return make


def own(name: str):
    """One of our networks of tests/finn_models.py, trained briefly."""
    def make() -> tuple[nn.Module, tuple[int, ...]]:
        from finn_models import MODELS, trained

        factory, _, regression = MODELS[name]
        torch.manual_seed(0)
        return trained(factory(), steps=20, regression=regression), (1, 8, 8)
    return make


def narrow_unsigned_input() -> tuple[nn.Module, tuple[int, ...]]:
    """A narrow unsigned input quantizer in front of an A2Q+ linear layer: refused before FINN
    runs, with one message on both FINNs (no exact rewrite lets upstream FINN convert it)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantIdentity(act_quant=Uint8ActPerTensorFloat, narrow_range=True, return_quant_tensor=True),
        QuantLinear(64, 10, bias=False, weight_quant=A2QPlusWeightQuant, weight_bit_width=4,
                    weight_accumulator_bit_width=16))
    return _calibrated(model, (64,)), (64,)


REFUSED = {"narrow_unsigned_input"}  # refused before FINN runs, on both FINNs

PARITY_MODELS = {
    "mobilenet_v1": mobilenet_v1,
    "resnet18_one_block": resnet18_one_block,
    "espcn_subpixel": espcn_subpixel,
    "tfc_2w2a": bnn_pynq("tfc_2w2a"),
    "cnv_2w2a": bnn_pynq("cnv_2w2a"),
    "own_resnet": own("resnet"),
    "own_dwsep_residual": own("dwsep_residual"),
    "narrow_unsigned_input": narrow_unsigned_input,
}


def _export(name: str, path: Path) -> None:
    model, shape = PARITY_MODELS[name]()
    torch.manual_seed(1)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        model(x)
    export_qonnx(model, x[:1], path)


def _verdicts(result) -> dict[str, dict]:
    """Per executor: checks run (input sets and per-layer extremes) and how many failed."""
    out: dict[str, dict] = {}
    for check in [*result.verification, *result.layer_extremes]:
        row = out.setdefault(check.executor, {"checks": 0, "failed": 0})
        row["checks"] += 1
        row["failed"] += int(not check.ok)
    return out


def _widths(result) -> dict[str, dict]:
    return {w.layer or w.finn_node: {"bits": w.bits, "finn_bits": DataType[w.finn_datatype].bitwidth(),
                                     "target": w.target_bits} for w in result.layers}


def build_and_record(name: str, tmp_path: Path) -> dict:
    """One model through :func:`finn_flow.build`: what the parity summary records for it."""
    from brevitas_a2q.errors import A2QInputError as Refusal
    from finn_flow import build
    from finn_flow.environment import cppsim_available
    from finn_flow.finn_compat import step_times

    torch.set_num_threads(1)
    path = tmp_path / f"{name}.onnx"
    _export(name, path)
    executors = ["hls-arith"] + (["cppsim"] if cppsim_available() else [])
    start = time.perf_counter()
    try:
        result = build(path, tmp_path / "out", verify=executors, random_count=RANDOM_INPUTS)
    except Refusal as err:
        return {"status": "refused", "refusal": str(err).replace(str(tmp_path), "<tmp>"),
                "executors": executors}
    wall = time.perf_counter() - start
    verify_s = sum(t for step, t in step_times(tmp_path / "out").items()
                   if step.startswith("step_a2q_verify"))
    return {"status": "built", "refusal": None, "executors": executors,
            "widths": _widths(result), "verdicts": _verdicts(result), "verified": result.verified,
            "build_s": round(wall - verify_s, 1), "verify_s": round(verify_s, 1),
            "summary": result.verification_summary().splitlines()}


def _write_record(name: str, entry: dict) -> None:
    """Merge one model's entry into the summary at ``$A2Q_PARITY_RECORD`` (written as each model
    finishes, through a temporary file, so an interrupted run keeps what it measured)."""
    from finn_flow.finn_compat import detect_finn

    target = os.environ.get(RECORD_ENV)
    if not target:
        return
    path = Path(target)
    old = json.loads(path.read_text()) if path.exists() else {}
    data = {"finn": detect_finn().describe().split(" at ")[0],
            "command": f"{RECORD_ENV}={target} python -m pytest -m finn tests/test_finn_parity.py",
            "random_inputs": RANDOM_INPUTS,
            "models": {**old.get("models", {}), name: entry}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _upstream(name: str) -> dict | None:
    if not UPSTREAM_SUMMARY.exists():
        return None
    return json.loads(UPSTREAM_SUMMARY.read_text()).get("models", {}).get(name)


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
@pytest.mark.parametrize("name", list(PARITY_MODELS))
def test_network_builds_verified_and_as_on_upstream_finn(name, tmp_path):
    """Builds and verifies bit-exactly on this FINN; under FINN+ also the same widths (set and
    FINN's), the same verdicts for the executors both ran and the same refusals as the committed
    upstream FINN dev summary."""
    from finn_flow.finn_compat import DEV, detect_finn

    entry = build_and_record(name, tmp_path)
    _write_record(name, entry)
    if name in REFUSED:
        assert entry["status"] == "refused" and "narrow unsigned identity" in entry["refusal"]
    else:
        assert entry["status"] == "built", entry["refusal"]
        assert entry["verified"] is True, "\n".join(entry["summary"])
    if detect_finn().flavour == DEV:
        return  # this run is the reference (recorded with A2Q_PARITY_RECORD)
    upstream = _upstream(name)
    if upstream is None:
        pytest.skip(f"no upstream FINN dev result for {name} in {UPSTREAM_SUMMARY.name}")
    assert entry["refusal"] == upstream["refusal"]
    if name in REFUSED:
        return
    assert entry["widths"] == upstream["widths"]
    assert entry["verified"] == upstream["verified"]
    for executor in set(entry["verdicts"]) & set(upstream["verdicts"]):
        assert entry["verdicts"][executor] == upstream["verdicts"][executor], executor


def _threshold_then_transpose(per_channel: bool) -> ModelWrapper:
    """x (INT8, NCHW 1x3x4x4) -> MultiThreshold without ``data_layout`` (as upstream FINN's
    Quant handlers leave it) -> Transpose to NHWC."""
    from qonnx.transformation.infer_data_layouts import InferDataLayouts

    nodes = [helper.make_node("MultiThreshold", ["x", "t"], ["m"], domain="qonnx.custom_op.general",
                              name="MultiThreshold_0", out_dtype="UINT2"),
             helper.make_node("Transpose", ["m"], ["y"], name="Transpose_0", perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "mt", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 3])],
                              value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT,
                                                                        [1, 3, 4, 4])])
    model = ModelWrapper(qonnx_make_model(graph))
    rows = np.asarray([[-20, 0, 30], [-5, 5, 60], [-40, -10, 10]] if per_channel else [[-10, 0, 10]])
    model.set_initializer("t", rows.astype(F32))
    model.set_tensor_datatype("x", DataType["INT8"])
    model.set_tensor_datatype("m", DataType["UINT2"])
    return model.transform(InferDataLayouts())


@pytest.mark.parametrize("per_channel", [True, False])
def test_threshold_layouts_set_as_finn_plus_does_without_changing_the_node(per_channel):
    model = _threshold_then_transpose(per_channel)
    assert model.get_tensor_layout("x") == ["N", "C", "H", "W"] and not model.get_tensor_layout("m")
    x = np.random.default_rng(0).integers(-128, 128, size=(1, 3, 4, 4)).astype(F32)
    before = execute_onnx(model, {"x": x})["y"]
    rewrite = SetMultiThresholdLayouts()
    after = model.transform(rewrite)
    assert rewrite.set == [("MultiThreshold_0", "NCHW")]
    assert after.get_tensor_layout("m") == ["N", "C", "H", "W"]
    assert np.array_equal(before, execute_onnx(after, {"x": x})["y"])


@pytest.mark.finn
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_finn_thresholding_layer_of_an_nchw_threshold_computes_what_it_did():
    """FINN's own MultiThreshold -> Thresholding conversion on the relabelled graph computes what
    the MultiThreshold did (upstream FINN dev, without the label, transposes the data twice)."""
    from finn_flow.finn_compat import import_builder, infer_thresholding_layer

    import_builder()
    model = _threshold_then_transpose(per_channel=True)
    x = np.random.default_rng(1).integers(-128, 128, size=(1, 3, 4, 4)).astype(F32)
    expected = execute_onnx(model, {"x": x})["y"]
    hw = model.transform(SetMultiThresholdLayouts()).transform(infer_thresholding_layer()())
    assert any(n.op_type == "Thresholding" for n in hw.graph.node)
    assert np.array_equal(execute_onnx(hw, {"x": x})["y"], expected)
