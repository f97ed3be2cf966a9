"""Exact rewrites that make a QONNX graph build the same on upstream FINN dev and on FINN+.

Upstream FINN dev (:data:`finn_flow.finn_compat.FINN_COMMIT`) converts an activation ``Quant`` into
a ``MultiThreshold`` with a handler chosen by the node in front of it
(``finn/transformation/qonnx/qonnx_activation_handlers.py``): after a ``Relu`` the
``QuantReluHandler`` (unsigned, non-narrow quantizers), anywhere else the ``QuantIdentityHandler``,
which upstream accepts only for *signed* quantizers ("FINN only supports signed Quant nodes for
identity activations"). FINN+ 1.6.1 also converts unsigned identity quantizers. So an unsigned
input quantizer (``QuantIdentity(act_quant=Uint8ActPerTensorFloat)``) or an unsigned quantizer
after a ``Trunc``, a pooling or a reshape builds under FINN+ and is refused by upstream FINN.

:class:`InsertReluBeforeUnsignedQuant` puts a ``Relu`` in front of every such quantizer. It is exact
for every input, not only for non-negative ones: a ``Quant`` with zero point 0, ``signed=0`` and a
positive scale ``s`` computes ``s * clip(round(x / s), 0, 2^b - 1)`` (``narrow`` lowers only the
top of the range), and for ``x < 0`` every rounding mode gives ``round(x / s) <= 0``, clipped to 0 —
what the quantizer gives for ``Relu(x) = 0``. Both FINNs then convert ``Relu -> Quant`` with the same
``QuantReluHandler`` into the same thresholds, so the two builds see one graph and set the same
widths. :func:`step_a2q_relu_before_unsigned_quant` is the FINN build step (before
``step_qonnx_to_finn``), applied under both FINNs.

Upstream FINN's streamlining (``step_streamline``) also moves a float scale into a constant without
updating the constant's qonnx datatype label: the classifier bias of an ``Int32Bias`` layer, an
integer annotated INT32 after ``step_qonnx_to_finn``, becomes ``bias / scale`` in float32 and keeps
the INT32 label. FINN then converts that ``Add`` into an ``ElementwiseAdd`` inside the accelerator and
rounds the float values to the label when executing the graph ("can't be represented with the set
datatype annotation (INT32), they will be rounded", or ``sanitize_quant_values: Rounding error is
too high``). FINN+ relabels them FLOAT32 in the same step. :class:`RelabelNonIntegerConstants` does
what FINN+ does on both FINNs (every constant whose values its integer label cannot hold is labelled
FLOAT32; no value changes), so the float tail is built and verified the same way.

Upstream FINN's ``QuantReluHandler``/``QuantIdentityHandler`` leave a ``MultiThreshold``'s
``data_layout`` attribute empty (FINN+'s set it), so qonnx's ``InferDataLayouts`` gives its output
no layout; upstream's ``InferThresholdingLayer`` then moves an NCHW input to NHWC but, seeing no
NCHW output, adds no transpose back, and the following ``Transpose`` permutes the data a second time
(Brevitas's ResNet: the first conv reads a scrambled image, outputs off by 20 %).
:class:`SetMultiThresholdLayouts` sets the attribute from the input's layout where that leaves the
node's execution unchanged (the layout qonnx assumes for an empty attribute, or one threshold row).
:func:`step_a2q_relabel_for_hw` applies both (after the streamlining, before
``step_convert_to_hw``).

Only quantizers FINN turns into thresholds are rewritten (activation ``Quant`` of at most
:data:`~finn_flow.steps.preflight.MAX_MULTITHRESHOLD_BITS` bits, zero point 0, positive scale,
not narrow: FINN's ``QuantReluHandler`` takes no narrow quantizer, and
:func:`~finn_flow.steps.preflight.check_activation_quantizers` refuses those by name on both FINNs).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.util.basic import get_by_name

__all__ = ["InsertReluBeforeUnsignedQuant", "RelabelNonIntegerConstants", "relu_would_be_exact",
           "SetMultiThresholdLayouts", "step_a2q_relabel_for_hw", "step_a2q_relu_before_unsigned_quant"]

MAX_BITS = 8  # finn_flow.steps.preflight.MAX_MULTITHRESHOLD_BITS (not imported: preflight imports us)


def _int_attr(node, name: str, default: int) -> int:
    attr = get_by_name(node.attribute, name)
    return default if attr is None else int(attr.i)


def is_activation_quant(model: ModelWrapper, node) -> bool:
    """A ``Quant`` node on a computed tensor (input and output not constant): FINN converts it
    to thresholds, where a weight quantizer is folded into its constant."""
    return node.op_type == "Quant" and model.get_initializer(node.input[0]) is None \
        and model.get_initializer(node.output[0]) is None


def relu_would_be_exact(model: ModelWrapper, node) -> bool:
    """Whether a ``Relu`` in front of the activation ``Quant`` ``node`` leaves its output unchanged
    for every input and lets FINN's ``QuantReluHandler`` convert it: unsigned, not narrow, zero
    point 0 and positive scale, both constant, and a constant bit width of at most
    :data:`MAX_BITS` (wider ones FINN leaves as they are)."""
    if not is_activation_quant(model, node) or _int_attr(node, "signed", 1) or \
            _int_attr(node, "narrow", 0):
        return False
    scale, zero_point, bits = (model.get_initializer(i) for i in node.input[1:4])
    if scale is None or zero_point is None or bits is None:
        return False
    return bool(np.all(np.asarray(scale) > 0) and np.all(np.asarray(zero_point) == 0)
                and float(np.max(bits)) <= MAX_BITS)


class InsertReluBeforeUnsignedQuant(Transformation):
    """Put a ``Relu`` in front of every unsigned activation ``Quant`` that does not already read a
    ``Relu`` and for which :func:`relu_would_be_exact` holds (exact: see the module docstring).
    ``inserted`` lists the ``Quant`` nodes that got one."""

    def __init__(self) -> None:
        super().__init__()
        self.inserted: list[str] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        self.inserted = []
        for node in list(model.graph.node):
            producer = model.find_producer(node.input[0])
            if (producer is not None and producer.op_type == "Relu") or \
                    not relu_would_be_exact(model, node):
                continue
            source = node.input[0]
            relu_out = model.make_new_valueinfo_name()
            shape = model.get_tensor_shape(source)
            model.graph.value_info.append(
                helper.make_tensor_value_info(relu_out, TensorProto.FLOAT, shape))
            dtype = model.get_tensor_datatype(source)
            model.set_tensor_datatype(relu_out, dtype if not dtype.signed() else DataType["FLOAT32"])
            relu = helper.make_node("Relu", [source], [relu_out], name=f"{node.name}_relu_in")
            model.graph.node.insert(list(model.graph.node).index(node), relu)
            node.input[0] = relu_out
            self.inserted.append(node.name)
        return model, False


def step_a2q_relu_before_unsigned_quant(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step, before ``step_qonnx_to_finn``: :class:`InsertReluBeforeUnsignedQuant`, so
    that upstream FINN dev converts unsigned identity quantizers (it refuses them otherwise) and
    FINN+ converts the same graph the same way."""
    return model.transform(InsertReluBeforeUnsignedQuant())


def _holds(label: DataType, values: np.ndarray) -> bool:
    """Whether the integer datatype ``label`` holds every value (integers within its range)."""
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values))
                and np.all(values >= label.min()) and np.all(values <= label.max()))


class RelabelNonIntegerConstants(Transformation):
    """Label FLOAT32 every initializer whose qonnx datatype label is an integer type that does not
    hold all its values (a float32 quotient left labelled INT32 by upstream FINN's streamlining),
    then infer the datatypes downstream again. Changes labels only, never values. ``relabelled``
    lists ``(tensor, old label)``."""

    def __init__(self) -> None:
        super().__init__()
        self.relabelled: list[tuple[str, str]] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.transformation.infer_datatypes import InferDataTypes

        self.relabelled = []
        for init in model.graph.initializer:
            label = model.get_tensor_datatype(init.name)
            if not label.is_integer():
                continue
            values = np.asarray(model.get_initializer(init.name), dtype=np.float64)
            if not _holds(label, values):
                model.set_tensor_datatype(init.name, DataType["FLOAT32"])
                self.relabelled.append((init.name, label.name))
        if self.relabelled:
            model = model.transform(InferDataTypes())
        return model, False


_RANK_LAYOUT = {2: "NC", 3: "NWC", 4: "NCHW"}  # qonnx MultiThreshold's guess for an empty data_layout


class SetMultiThresholdLayouts(Transformation):
    """Give every ``MultiThreshold`` with an empty ``data_layout`` attribute its input's layout
    annotation where its execution stays the same (the annotation is the layout qonnx assumes for
    an empty attribute, or the thresholds are one row for all channels), then infer the layouts
    again, so the output is annotated as FINN's ``InferThresholdingLayer`` needs. ``set`` lists
    ``(node, layout)``."""

    def __init__(self) -> None:
        super().__init__()
        self.set: list[tuple[str, str]] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.transformation.infer_data_layouts import InferDataLayouts

        self.set = []
        for node in model.get_nodes_by_op_type("MultiThreshold"):
            attr = get_by_name(node.attribute, "data_layout")
            if attr is not None and attr.s:
                continue
            layout = model.get_tensor_layout(node.input[0])
            thresholds = model.get_initializer(node.input[1])
            if not layout or thresholds is None:
                continue
            layout = "".join(layout)
            shape = model.get_tensor_shape(node.input[0])
            if layout != _RANK_LAYOUT.get(len(shape)) and np.shape(thresholds)[0] != 1:
                continue  # qonnx reads the channels elsewhere: setting it would change the node
            if attr is None:
                node.attribute.append(helper.make_attribute("data_layout", layout))
            else:
                attr.s = layout.encode()
            self.set.append((node.name, layout))
        if self.set:
            model = model.transform(InferDataLayouts())
        return model, False


def step_a2q_relabel_for_hw(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step, after the streamlining and before ``step_convert_to_hw``: the labels FINN's
    conversion to hardware layers reads, as FINN+ leaves them, on both FINNs:
    :class:`RelabelNonIntegerConstants` (a float bias or scale tail labelled float; upstream FINN dev
    leaves it INT32 and rounds it) and :class:`SetMultiThresholdLayouts` (threshold layouts, without
    which upstream FINN dev transposes the data twice)."""
    return model.transform(RelabelNonIntegerConstants()).transform(SetMultiThresholdLayouts())
