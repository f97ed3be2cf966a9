"""Streamlining for residual networks (forks and joins) and transposed convolutions, from FINN's
own transformations; and checks that name what FINN cannot build.

FINN's default ``step_streamline`` (``Streamline()``) moves scales and biases along a chain of
layers only. In a residual block the activation quantizer's output forks (the convolution branch and
the skip connection) and the two paths join again at an ``Add``; the quantizer's scale ``Mul`` is left
in front of the fork, so the branch's ``Im2Col``/``MatMul`` sees a float input and never becomes an
MVAU/VVAU, and the ``Add`` adds two float tensors (FINN+ then stops at
``step_create_dataflow_partition`` with "Unsupported/unmapped layer(s)", upstream FINN with "cycle-free
graph violated: partition depends on itself"). FINN's default steps also never lower a
``ConvTranspose``.

:class:`StreamlineResidual` repeats, until the graph no longer changes, the FINN passes that
finn-examples' ResNet-50 build uses for this (``MoveLinearPastFork``, moving identical scale ``Mul``
nodes past the join ``Add`` — ``MoveMulPastJoinAdd``, which FINN+ and upstream FINN dev both have —,
``MoveScalarLinearPastInvariants``, ``Streamline()``) plus the transpose passes that put the two
inputs of each ``Add`` in the same (NHWC) layout. When both inputs of an ``Add`` come from one
activation quantizer (one scale), the ``Add`` then adds two integer tensors (FINN's ``AddStreams``,
``ElementwiseAdd`` in FINN+), its single scale is absorbed into the next quantizer's thresholds, and
the fork becomes ``DuplicateStreams``. A ``ConvTranspose`` gets its input scale moved past it
(``MoveScalarMulPastConvTranspose``) and is then lowered by FINN's ``InferPixelPaddingDeconv`` to
``FMPadding_Pixel`` + ``Im2Col`` + ``MatMul`` (an MVAU, whose accumulator finn_flow sets like any
other). :func:`step_a2q_streamline_residual` is the FINN build step after
FINN's ``step_streamline``, :func:`step_a2q_move_scales_past_forks` the one before it (on the graph
with its convolutions not yet lowered, where the scale in front of a fork can still be moved past
the branch's ``Conv``); both change nothing in a graph with no fork, join or ``ConvTranspose``.

Refusals, each naming what FINN cannot build and the fix: :func:`check_residual_adds` (before any
FINN step) for an ``Add`` of two tensors that do not come from activation quantizers with one scale,
naming the Brevitas layers; :func:`step_a2q_check_hw_layers` (before FINN's dataflow partition) for
nodes left between hardware layers without a FINN layer.
"""

from __future__ import annotations

import numpy as np
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from brevitas_a2q.analysis.records import read_records
from brevitas_a2q.errors import A2QInputError

__all__ = ["StreamlineResidual", "check_residual_adds", "has_branches", "needs_streamlining",
           "step_a2q_check_hw_layers", "step_a2q_move_scales_past_forks", "step_a2q_streamline_residual",
           "unconverted_nodes"]

# op types whose output passes through unchanged up to a reshuffle of values (QONNX graph)
_PASS_THROUGH = ("Relu", "MaxPool", "Transpose", "Reshape", "Flatten", "Identity")
_ACCUMULATING = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def has_branches(model: ModelWrapper) -> bool:
    """Whether any node's output feeds more than one node, or any node joins several dynamic
    inputs (a residual add)."""
    return any(model.is_fork_node(n) or model.is_join_node(n) for n in model.graph.node)


def needs_streamlining(model: ModelWrapper) -> bool:
    """Whether :class:`StreamlineResidual` has work: forks/joins or transposed convolutions."""
    return has_branches(model) or bool(model.get_nodes_by_op_type("ConvTranspose"))


def _unlowered_passes() -> list[Transformation]:
    """One round before FINN's ``step_streamline`` (convolutions not yet lowered, no layout
    transposes): the scales in front of forks moved into the branches and past the join adds, where
    FINN's ``Streamline()`` moves them past the convolutions (``MoveScalarMulPastConv``) into the
    next thresholds. After lowering, a scale in front of an ``Im2Col`` could only be moved by a pass
    FINN+ has and upstream FINN dev lacks (``MoveScalesPastIm2Col``)."""
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.reorder import (
        MoveAddPastJoinAdd,
        MoveLinearPastFork,
        MoveMulPastJoinAdd,
        MoveScalarMulPastConvTranspose,
    )

    return [MoveLinearPastFork(), MoveMulPastJoinAdd(), MoveAddPastJoinAdd(),
            MoveScalarMulPastConvTranspose(), Streamline()]


def _lowered_passes() -> list[Transformation]:
    """One round after FINN's ``step_streamline``: FINN's fork/join movers, FINN's lowering of
    transposed convolutions, then FINN's own streamlining and layout cleanup."""
    from finn.transformation.fpgadataflow.infer_pixel_padding_deconv import (
        InferPixelPaddingDeconv,
    )
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.absorb import (
        AbsorbConsecutiveTransposes,
        AbsorbTransposeIntoMultiThreshold,
    )
    from finn.transformation.streamline.reorder import (
        MakeMaxPoolNHWC,
        MoveAddPastJoinAdd,
        MoveLinearPastFork,
        MoveMulPastJoinAdd,
        MoveScalarLinearPastInvariants,
        MoveScalarMulPastConvTranspose,
        MoveTransposePastFork,
        MoveTransposePastJoinAdd,
    )

    return [
        MoveLinearPastFork(),  # a quantizer's scale/bias in front of a fork: one copy per branch
        MoveTransposePastFork(),
        MoveScalarLinearPastInvariants(),  # scale Mul past Transpose/Reshape/Flatten
        AbsorbConsecutiveTransposes(),
        MoveTransposePastJoinAdd(),  # both Add inputs in the same layout
        MoveMulPastJoinAdd(),  # x*s + y*s -> (x + y)*s: the Add becomes integer
        MoveAddPastJoinAdd(),
        MoveScalarMulPastConvTranspose(),  # the input scale past a transposed convolution
        _IntegerInputDeconv(InferPixelPaddingDeconv()),  # -> FMPadding_Pixel + Im2Col + MatMul
        Streamline(),  # the moved scales into the next MultiThreshold / past MatMul and Im2Col
        MakeMaxPoolNHWC(),
        AbsorbTransposeIntoMultiThreshold(),
        AbsorbConsecutiveTransposes(),
    ]


def _tidy(model: ModelWrapper) -> ModelWrapper:
    from qonnx.transformation.general import GiveReadableTensorNames, GiveUniqueNodeNames
    from qonnx.transformation.infer_data_layouts import InferDataLayouts
    from qonnx.transformation.infer_datatypes import InferDataTypes

    for transformation in (GiveUniqueNodeNames(), GiveReadableTensorNames(), InferDataTypes(),
                           InferDataLayouts()):
        model = model.transform(transformation)
    return model


class _IntegerInputDeconv(Transformation):
    """FINN's ``InferPixelPaddingDeconv``, applied only once every ``ConvTranspose`` reads an
    integer input (the pixel-padding layer takes its type from it): before that, its input scale
    has to be moved past it first."""

    def __init__(self, lowering: Transformation) -> None:
        super().__init__()
        self.lowering = lowering

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        deconvs = model.get_nodes_by_op_type("ConvTranspose")
        if not deconvs or not all(model.get_tensor_datatype(n.input[0]).is_integer()
                                  for n in deconvs):
            return model, False
        return model.transform(self.lowering), False


class StreamlineResidual(Transformation):
    """Streamline a graph with forks and joins (residual blocks) or transposed convolutions with
    FINN's transformations, repeated until the graph no longer changes (at most ``max_rounds``
    rounds; see the module docstring): ``lowered=False`` the passes for a graph before FINN's
    ``step_streamline`` (convolutions not lowered yet), ``lowered=True`` those for after it. Any
    other graph is returned unchanged."""

    def __init__(self, lowered: bool = True, max_rounds: int = 8) -> None:
        super().__init__()
        self.lowered = lowered
        self.max_rounds = max_rounds
        self.rounds = 0

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.transformation.general import RemoveUnusedTensors, SortGraph

        self.rounds = 0
        if not needs_streamlining(model):
            return model, False
        previous = model.graph.SerializeToString()
        for _ in range(self.max_rounds):
            self.rounds += 1
            for transformation in (_lowered_passes() if self.lowered else _unlowered_passes()):
                model = _tidy(model.transform(transformation))
            model = model.transform(RemoveUnusedTensors()).transform(SortGraph())
            current = model.graph.SerializeToString()
            if current == previous:
                break
            previous = current
        return model, False


def step_a2q_move_scales_past_forks(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step, before FINN's ``step_streamline``: :class:`StreamlineResidual` on the
    graph whose convolutions are not lowered yet, moving the scales in front of forks into the
    branches and past the join adds. Leaves a graph with no fork, join or ``ConvTranspose`` as it
    is."""
    return model.transform(StreamlineResidual(lowered=False))


def step_a2q_streamline_residual(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step, after FINN's ``step_streamline``: :class:`StreamlineResidual` on the
    lowered graph, so that residual blocks whose adds share one activation quantizer convert to
    MVAU/VVAU, ``AddStreams`` and ``DuplicateStreams``, and transposed convolutions to FINN's
    pixel-padding deconvolution (``FMPadding_Pixel`` + sliding window + MVAU). Leaves a graph
    with no fork, join or ``ConvTranspose`` as it is."""
    return model.transform(StreamlineResidual(lowered=True))


# --- refusal before FINN ---------------------------------------------------------------------

def _quant_source(model: ModelWrapper, tensor: str):
    """The activation ``Quant`` node ``tensor`` comes from (through pass-through ops), or None."""
    node = model.find_producer(tensor)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = model.find_producer(node.input[0])
    return node if node is not None and node.op_type == "Quant" else None


def _layer_before(model: ModelWrapper, node, layers: dict[str, str]) -> str | None:
    """The Brevitas layer of the nearest accumulating node upstream of ``node`` (first inputs)."""
    while node is not None:
        if node.op_type in _ACCUMULATING:
            return layers.get(node.name, node.name)
        dynamic = [i for i in node.input if i and model.get_initializer(i) is None]
        node = model.find_producer(dynamic[0]) if dynamic else None
    return None


def _quant_params(model: ModelWrapper, quant) -> tuple:
    values = tuple(np.asarray(model.get_initializer(i)).tolist() if model.get_initializer(i)
                   is not None else None for i in quant.input[1:4])
    attrs = tuple(sorted((a.name, helper.get_attribute_value(a)) for a in quant.attribute))
    return values, attrs


def check_residual_adds(model: ModelWrapper) -> None:
    """Refuse (:class:`~brevitas_a2q.errors.A2QInputError`) an ``Add`` of two computed tensors in a
    QONNX model that FINN cannot build: both inputs must come from activation quantizers with the
    same scale, zero point, bit width and sign (in Brevitas: one shared ``QuantReLU`` /
    ``QuantIdentity`` module applied to both), so that the add is an integer ``AddStreams``."""
    try:
        layers = {r.node: r.layer for r in read_records(model)}
    except ValueError:
        layers = {}
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        dynamic = [i for i in node.input if model.get_initializer(i) is None]
        if len(dynamic) < 2:
            continue
        sources = [_quant_source(model, t) for t in dynamic]
        after = [_layer_before(model, model.find_producer(t), layers) or "the model input"
                 for t in dynamic]
        where = f"the residual Add {node.name!r} (its inputs come from {after[0]!r} and {after[1]!r})"
        fix = ("Quantize both add inputs with one activation quantizer: apply the same Brevitas "
               "QuantReLU/QuantIdentity module (return_quant_tensor=True) to the skip path and "
               "to the branch output, so that FINN adds two integer tensors of one scale")
        if any(s is None for s in sources):
            missing = after[sources.index(None)]
            raise A2QInputError(f"FINN cannot build {where}: the input from {missing!r} is not "
                                f"quantized by an activation quantizer. {fix}")
        if len({_quant_params(model, s) for s in sources}) > 1:
            raise A2QInputError(f"FINN cannot build {where}: its inputs are quantized with "
                                f"different scales or types (Quant nodes {sources[0].name!r} and "
                                f"{sources[1].name!r}). {fix}")


# --- refusal before FINN's dataflow partition -------------------------------------------------

_HINTS = {
    "Mul": "a float scale FINN's streamlining could not absorb (a residual add whose inputs do "
           "not share one activation quantizer, or a layer without a quantized input)",
    "Add": "a float bias or an add of float tensors (residual adds need both inputs from one "
           "shared activation quantizer)",
    "MatMul": "a matrix product whose input or weights are not integer (quantize the layer's "
              "input with an activation quantizer and its weights with a weight quantizer)",
    "Im2Col": "the input of a convolution that did not become an MVAU/VVAU (its input or weights "
              "are not integer)",
    "ConvTranspose": "a transposed convolution: FINN builds it only through its pixel-padding "
                     "lowering (InferPixelPaddingDeconv: group=1, integer input, integer weights), "
                     "which step_a2q_streamline_residual applies after step_streamline",
}


def _reachable(model: ModelWrapper, start, forward: bool) -> set[str]:
    """Names of the nodes reachable from ``start`` downstream (``forward``) or upstream."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if forward:
            nxt = [c for t in node.output for c in model.find_consumers(t) or []]
        else:
            nxt = [p for t in node.input if (p := model.find_producer(t)) is not None]
        for n in nxt:
            if n.name not in seen:
                seen.add(n.name)
                todo.append(n)
    return seen


def unconverted_nodes(model: ModelWrapper) -> list:
    """Nodes that are not FINN hardware layers but lie between hardware layers (a hardware layer
    upstream and one downstream), so FINN's dataflow partition cannot be cut around them."""
    hw = {n.name for n in model.graph.node if n.domain.startswith("finn.custom_op.fpgadataflow")}
    return [n for n in model.graph.node if n.name not in hw
            and _reachable(model, n, forward=False) & hw and _reachable(model, n, forward=True) & hw]


def step_a2q_check_hw_layers(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step (before ``step_create_dataflow_partition``): refuse, naming the nodes and
    what to change, a graph in which some node between FINN hardware layers has no FINN layer
    (FINN would stop with "partition depends on itself" or "Unsupported/unmapped layer(s)")."""
    stuck = unconverted_nodes(model)
    if not stuck:
        return model
    lines = []
    for node in stuck:
        hint = _HINTS.get(node.op_type, f"FINN has no hardware layer for {node.op_type}")
        lines.append(f"{node.op_type} node {node.name!r} ({hint})")
    raise A2QInputError(
        f"FINN cannot build this model: {len(stuck)} node(s) between hardware layers did not "
        "become FINN hardware layers after streamlining and conversion: " + "; ".join(lines)
        + ". The graph at this point is saved as intermediate_models/step_convert_to_hw.onnx")
