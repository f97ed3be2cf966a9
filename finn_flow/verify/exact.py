"""The model evaluated exactly: the reference an accelerator must equal bit for bit.

QONNX executes a model in float32. Near a quantizer's rounding boundary its value can land on
either side: Brevitas's ESPCN layout with plain weights computes 105.5 at an output pixel whose exact
value is 105.49998 (``shared/cases/espcn_plain_deconv_tie.onnx``), so QONNX rounds it to 106 where
the model, and an accelerator with exact thresholds, give 105.

:class:`ExactModel` executes the QONNX graph node by node (qonnx's own execution) and replaces the
output of every activation quantizer that an accumulating layer or a residual join feeds through
a supported chain (:mod:`finn_flow.steps.exact_thresholds`) by its exact levels: the layer's integer
accumulator is computed in float64 from the integer levels of its input and its integer weights
(exact below 2^53), a join's as the sum of its two inputs' levels, and mapped to levels by integer
thresholds derived in exact arithmetic. Quantizers without
such a chain keep QONNX's float32 result and are listed, except input quantizers fed by the graph
input through elementwise ops only, whose float32 evaluation (IEEE, identical in Brevitas, QONNX and
FINN's thresholds) is their exact definition. Where QONNX's float32 level differs from the exact one
on the same inputs, the difference is *float32 reference rounding* only if the exact value lies
within QONNX's float32 error bound of the rounding boundary between the two levels; anything else
is unexplained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_node
from qonnx.util.basic import get_by_name
from qonnx.util.cleanup import cleanup_model

from brevitas_a2q.quant.bounds import exact_accumulator_range
from finn_flow.steps.exact_thresholds import (
    ActivationChain,
    LevelTable,
    _float,
    _gemm_trans_b,
    _value,
    _weight_rows,
    input_levels,
    level_table,
    record_activation_chains,
)
from finn_flow.steps.input_thresholds import record_input_chains
from finn_flow.steps.subpixel import SubPixelToTransposedConv

__all__ = ["ExactEvaluation", "ExactModel"]

U32 = 2.0**-24  # float32 unit roundoff
BATCH = 32  # inputs evaluated together


@dataclass
class ExactEvaluation:
    """Exact outputs of a batch, and what QONNX's float32 execution got wrong on it."""

    outputs: np.ndarray  # (inputs, *output shape)
    float32_rounding: dict[str, int] = field(default_factory=dict)  # quantizer -> elements
    unexplained: dict[str, int] = field(default_factory=dict)  # quantizer -> elements
    exact_quantizers: list[str] = field(default_factory=list)
    float32_quantizers: dict[str, str] = field(default_factory=dict)  # name -> why not exact

    def to_dict(self) -> dict:
        return {"float32_rounding": self.float32_rounding, "unexplained": self.unexplained,
                "exact_quantizers": self.exact_quantizers,
                "float32_quantizers": self.float32_quantizers}


@dataclass
class _Layer:
    """One exactly evaluated quantizer: its chain, accumulating node (or join ``Add``) and level
    table."""

    quant: object
    chain: ActivationChain
    node: object
    weights: torch.Tensor | None  # integer weights in the node's own layout, float64; None: a join
    input_scale: float
    table: LevelTable
    dot_length: int  # terms summed into one accumulator


def _ints(node, name: str, default: list[int]) -> list[int]:
    attr = get_by_name(node.attribute, name)
    return list(attr.ints) if attr is not None and attr.ints else default


def _accumulate(node, levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The node's integer accumulator for integer ``levels`` (float64, exact below 2^53)."""
    if node.op_type in ("MatMul", "Gemm"):
        return levels @ weights
    dims = levels.dim() - 2
    pads = _ints(node, "pads", [0] * 2 * dims)
    if pads[:dims] != pads[dims:]:
        raise ValueError("asymmetric padding")
    kwargs = {"stride": _ints(node, "strides", [1] * dims), "padding": pads[:dims],
              "dilation": _ints(node, "dilations", [1] * dims)}
    group = get_by_name(node.attribute, "group")
    kwargs["groups"] = group.i if group is not None else 1
    if node.op_type == "ConvTranspose":
        fn = {1: torch.nn.functional.conv_transpose1d, 2: torch.nn.functional.conv_transpose2d,
              3: torch.nn.functional.conv_transpose3d}[dims]
        kwargs["output_padding"] = _ints(node, "output_padding", [0] * dims)
    else:
        fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
              3: torch.nn.functional.conv3d}[dims]
    return fn(levels, weights, **kwargs)


class ExactModel:
    """A QONNX model ready to be evaluated exactly (see the module docstring)."""

    def __init__(self, model: ModelWrapper) -> None:
        model = cleanup_model(copy.deepcopy(model))
        self.model = model.transform(SubPixelToTransposedConv())  # exact; DepthToSpace is no chain op
        self.layers: dict[str, _Layer] = {}
        self.float32_quantizers: dict[str, str] = {}
        chains = record_activation_chains(self.model)
        self.input_quantizers = sorted(self.model.find_producer(name).name
                                       for name in record_input_chains(self.model))
        for quant in self.model.graph.node:
            if quant.op_type != "Quant" or self.model.get_initializer(quant.input[0]) is not None \
                    or quant.name in self.input_quantizers:
                continue
            chain = chains.get(quant.output[0])
            if chain is None:
                self.float32_quantizers[quant.name] = "no accumulating layer feeds it through a " \
                    "chain of supported ops (other ops in between)"
                continue
            layer = self._layer(quant, chain)
            if isinstance(layer, str):
                self.float32_quantizers[quant.name] = layer
            else:
                self.layers[quant.output[0]] = layer

    def _layer(self, quant, chain: ActivationChain) -> _Layer | str:
        model = self.model
        node = next(n for n in model.graph.node if n.name == chain.layer_node)
        if chain.join_inputs is not None:  # (a + b) * s: the levels' sum is the accumulator
            (low_a, high_a), (low_b, high_b) = chain.input_ranges
            table = level_table(chain, chain.channels, low_a + low_b, high_a + high_b)
            if table is None:
                return "its level is not non-decreasing in the sum (a negative scale)"
            return _Layer(quant, chain, node, None, float(Fraction(chain.scale[0])), table, 2)
        rows, _ = _weight_rows(model, node)
        weight_quant = model.find_producer(node.input[1])
        values = model.get_initializer(weight_quant.input[0]).astype(np.float64)
        weights = np.rint(values / model.get_initializer(weight_quant.input[1]))
        if node.op_type == "MatMul":
            weights = weights.reshape(weights.shape[0], -1)
        elif node.op_type == "Gemm" and _gemm_trans_b(node):
            weights = weights.T
        scale, low, high = input_levels(model, node.input[0])
        lo, hi = exact_accumulator_range(rows, low, high).overall
        table = level_table(chain, rows.shape[0], lo, hi)
        if table is None:
            return "its level is not non-decreasing in the accumulator (a negative scale)"
        return _Layer(quant, chain, node, torch.from_numpy(weights), scale, table, rows.shape[1])

    def evaluate(self, inputs: np.ndarray) -> ExactEvaluation:
        """Exact outputs for each input of ``inputs`` (shaped like the model's input, with an extra
        leading axis), and the float32 differences of QONNX found on the way. The inputs run as
        one batch where the graph allows it (no batch-1 constants in reshapes), else one by one."""
        result = ExactEvaluation(np.empty(0), exact_quantizers=sorted(
            [layer.quant.name for layer in self.layers.values()] + self.input_quantizers),
            float32_quantizers=dict(self.float32_quantizers))
        inputs = np.asarray(inputs, dtype=np.float32)
        result.outputs = np.concatenate([self._evaluate_batch(inputs[i:i + BATCH], result)
                                         for i in range(0, len(inputs), BATCH)])
        return result

    def _evaluate_batch(self, inputs: np.ndarray, result: ExactEvaluation) -> np.ndarray:
        found = ExactEvaluation(np.empty(0))
        try:
            batched = self._batched(len(inputs))
            outputs = self._run(batched, inputs.reshape(
                len(inputs), *batched.get_tensor_shape(batched.graph.input[0].name)[1:]), found)
        except Exception:  # a graph the batch does not go through: one input at a time
            found = ExactEvaluation(np.empty(0))
            shape = self.model.get_tensor_shape(self.model.graph.input[0].name)
            outputs = np.concatenate([self._run(self.model, x.reshape(shape), found)
                                      for x in inputs])
        for counts, more in ((result.float32_rounding, found.float32_rounding),
                             (result.unexplained, found.unexplained)):
            for name, n in more.items():
                counts[name] = counts.get(name, 0) + n
        return outputs

    def _batched(self, count: int) -> ModelWrapper:
        """The model with batch size ``count`` (shapes inferred again; a ``Reshape`` to a constant
        shape led by the model's batch size 1, as ``x.view(x.size(0), -1)`` exports, reshapes to
        ``count`` instead)."""
        from qonnx.transformation.infer_shapes import InferShapes

        model = copy.deepcopy(self.model)
        while len(model.graph.value_info):
            model.graph.value_info.pop()
        for tensor in (model.graph.input[0].name, model.graph.output[0].name):
            model.set_tensor_shape(tensor, [count, *model.get_tensor_shape(tensor)[1:]])
        for node in model.graph.node:
            shape = model.get_initializer(node.input[1]) if node.op_type == "Reshape" else None
            if shape is not None and shape.size and shape[0] == 1:
                name = f"{node.input[1]}_batch{count}"
                model.set_initializer(name, np.concatenate([[count], shape[1:]]).astype(shape.dtype))
                node.input[1] = name
        return model.transform(InferShapes())

    def _run(self, model: ModelWrapper, x: np.ndarray, result: ExactEvaluation) -> np.ndarray:
        context = model.make_empty_exec_context()
        context[model.graph.input[0].name] = x
        opset = model.model.opset_import[0].version
        for node in model.graph.node:
            execute_node(node, context, model.graph, opset)
            layer = self.layers.get(node.output[0]) if node.op_type == "Quant" else None
            if layer is not None:
                context[node.output[0]] = self._exact_output(layer, context, result)
        return context[model.graph.output[0].name]

    def _exact_output(self, layer: _Layer, context: dict, result: ExactEvaluation) -> np.ndarray:
        quant = layer.quant
        scale = np.asarray(context[quant.input[1]], dtype=np.float32)
        acc, levels = self._accumulator(layer, context)
        exact = layer.table.levels(acc.astype(np.int64))
        qonnx = np.rint(context[quant.output[0]].astype(np.float64) / scale.astype(np.float64))
        differ = np.argwhere(qonnx != exact)
        if differ.size:
            magnitude = self._magnitude(layer, levels)
            explained = int(sum(self._within_float32_error(layer, acc, magnitude,
                                                           tuple(i), qonnx, exact) for i in differ))
            name = quant.name
            result.float32_rounding[name] = result.float32_rounding.get(name, 0) + explained
            unexplained = len(differ) - explained
            if unexplained:
                result.unexplained[name] = result.unexplained.get(name, 0) + unexplained
        return (exact.astype(np.float32) * scale).astype(np.float32)

    @staticmethod
    def _accumulator(layer: _Layer, context: dict) -> tuple[np.ndarray, list[np.ndarray]]:
        """The layer's integer accumulator (float64) and its input levels."""
        levels = []
        for tensor in layer.node.input[:1] if layer.weights is not None else layer.node.input:
            value = context[tensor].astype(np.float64) / layer.input_scale
            levels.append(np.rint(value))
            if np.abs(value - levels[-1]).max(initial=0) > 1e-3:
                raise ValueError(f"the input {tensor!r} of {layer.node.name!r} is not on its "
                                 "quantizer's grid")
        if layer.weights is None:
            return levels[0] + levels[1], levels
        return _accumulate(layer.node, torch.from_numpy(levels[0]), layer.weights).numpy(), levels

    @staticmethod
    def _magnitude(layer: _Layer, levels: list[np.ndarray]) -> np.ndarray:
        """The sum of the accumulator's terms' magnitudes (for QONNX's float32 error bound)."""
        if layer.weights is None:
            return np.abs(levels[0]) + np.abs(levels[1])
        return _accumulate(layer.node, torch.from_numpy(np.abs(levels[0])),
                           layer.weights.abs()).numpy()

    def _within_float32_error(self, layer: _Layer, acc: np.ndarray, magnitude: np.ndarray,
                              index: tuple, qonnx: np.ndarray, exact: np.ndarray) -> bool:
        """Whether the exact quantizer input at ``index`` lies within QONNX's float32 error bound
        of the rounding boundary between QONNX's level and the exact one (adjacent levels only).
        The bound: (K + 16) float32 roundings of every term's magnitude, doubled, through the
        chain's slope, plus the chain's offset and value magnitudes."""
        if abs(qonnx[index] - exact[index]) != 1:
            return False
        c = index[1] if acc.ndim > 1 else 0
        chain = layer.chain
        s = float(Fraction(chain.quant_scale[0 if len(chain.quant_scale) == 1 else c]))
        y = _float(_value(chain, c, int(acc[index]))) / s
        slope, offset = _magnitudes(chain, c)
        bound = 2 * (layer.dot_length + 16) * U32 * (
            slope * float(magnitude[index]) + offset + abs(y) * s) / s
        boundary = (qonnx[index] + exact[index]) / 2
        return abs(y - boundary) <= bound


def _magnitudes(chain: ActivationChain, c: int) -> tuple[float, float]:
    """Upper bounds of the chain's slope (per unit of ``sum |level q|``) and of its offsets'
    magnitudes, through every op."""
    def at(values):
        return abs(float(Fraction(values[0 if len(values) == 1 else c])))

    slope, offset = at(chain.scale), 0.0
    for op in chain.ops:
        if op["op"] == "affine":
            slope, offset = slope * at(op["mul"]), offset * at(op["mul"]) + at(op["add"])
        elif op["op"] == "bn":
            f = at(op["gamma"]) / at(op["var"]) ** 0.5
            slope, offset = slope * f, (offset + at(op["mean"])) * f + at(op["beta"])
    return slope, offset

