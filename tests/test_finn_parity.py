"""The same models build the same on upstream FINN dev and on FINN+ (issue 21).

Graph-level tests (fast, qonnx only where marked): the rewrites of
:mod:`finn_flow.steps.upstream_rewrites` are exact (qonnx execution equal bit for bit before and after,
on random inputs of both signs) and leave what upstream FINN dev needs (every unsigned activation
quantizer behind a ``Relu``; no constant labelled with an integer type that cannot hold it), and the
pre-flight refusals are the same on both FINNs.
"""

from __future__ import annotations

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
    assert names.index("step_streamline") < names.index("step_a2q_relabel_float_constants") \
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
