"""Accumulator analysis of any QONNX model: what each MatMul/Conv/Gemm accumulator needs.

Works on files we did not export (Brevitas's own export, hand-built qonnx graphs, graphs after
qonnx/FINN transformations). For every *accumulating node* (``MatMul``, ``Conv``, ``ConvTranspose``
or ``Gemm`` whose weight input is quantized) it reads, from the graph alone:

* the integer weights ``q``: the weight ``Quant`` node executed on its initializer
  (``q = Quant(w) / scale``, checked to be integral), or an initializer annotated with an integer
  qonnx datatype; rows are output channels, ``K`` columns (see :func:`node_integer_weights`);
* the integer input range: the tensor's integer qonnx datatype annotation, or the
  ``Quant``/``Trunc`` node that produces it (through layout-only ops such as ``MaxPool``,
  ``Transpose``, ``Im2Col``);

and computes the accumulator width needed by the exact range (each weight meets its worst input
extreme, as qonnx's ``calculate_matvec_accumulator_range``), by the A2Q L1 bound (Colbert et al.,
ICCV 2023, Eq. 15), by the A2Q+ zero-centred bound (Colbert et al., ICML 2024, Eq. 18) and by data
types alone (A2Q Eq. 12). Where the file carries :mod:`brevitas_a2q.analysis.records`, each node is matched
to its record by weight fingerprint and checked against the recorded target ``P``.

qonnx contracts: :func:`accumulator_analysis` is an analysis (``model.analysis(fn) -> dict``),
:class:`AnnotateAccumulatorDatatypes` a ``Transformation`` that annotates each accumulator output
with its proven datatype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.general.quant import quant as qonnx_quant
from qonnx.transformation.base import Transformation
from qonnx.util.basic import get_by_name

from brevitas_a2q.analysis.audit import zero_weight_warning
from brevitas_a2q.analysis.records import AccumulatorRecord, read_records, weight_fingerprint
from brevitas_a2q.analysis.table import cell, text_table
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant import bounds

__all__ = [
    "ACCUMULATING_OPS",
    "AccumulatorAnalysis",
    "AccumulatorReport",
    "AnnotateAccumulatorDatatypes",
    "IntegerInput",
    "NodeWeights",
    "accumulator_analysis",
    "analyze_accumulators",
    "node_input_datatype",
    "node_integer_weights",
]

ACCUMULATING_OPS = ("MatMul", "Conv", "ConvTranspose", "Gemm")
# ops that move or select integer values without changing them (the input range passes through)
_LAYOUT_OPS = ("Identity", "MaxPool", "MaxPoolNHWC", "Transpose", "Reshape", "Flatten", "Im2Col",
               "Squeeze", "Unsqueeze", "Slice", "Pad")
# weight-consuming ops that accumulate but this analysis does not model
_UNSUPPORTED_WEIGHT_CONSUMERS = ("ConvInteger", "MatMulInteger", "QLinearConv",
                                 "QLinearMatMul", "Einsum", "LSTM", "GRU", "RNN")
_INTEGRALITY_TOL = 1e-3


@dataclass
class NodeWeights:
    """Integer weights of one accumulating node, rows = output channels, shape ``(out, K)``."""

    node: str
    tensor: str  # the initializer holding the weights
    int_weights: np.ndarray  # int64, (out_channels, K)
    weight_bits: int  # M
    scale_is_one: bool  # the weights are plain integers (no scale)
    source: str  # "Quant node X" or "datatype INT4 of X"


@dataclass
class IntegerInput:
    """Integer range of an accumulating node's data input."""

    bits: int  # N
    signed: bool
    minimum: int
    maximum: int
    scale_is_one: bool
    source: str


def _initializer(model: ModelWrapper, name: str, what: str, node) -> np.ndarray:
    value = model.get_initializer(name)
    if value is None:
        raise A2QInputError(f"node {node.name!r} ({node.op_type}): its {what} {name!r} is not a "
                            "constant initializer; run qonnx cleanup (FoldConstants) first")
    return np.asarray(value)


def _quant_params(model: ModelWrapper, node) -> tuple[np.ndarray, np.ndarray, int]:
    scale = _initializer(model, node.input[1], "scale", node).astype(np.float64)
    zero_point = _initializer(model, node.input[2], "zero point", node).astype(np.float64)
    bits = _initializer(model, node.input[3], "bit width", node)
    if bits.size != 1 or bits.item() != int(bits.item()) or bits.item() < 1:
        raise A2QInputError(f"Quant node {node.name!r}: bit width must be one positive whole "
                            f"number, got {bits.tolist()}")
    if np.any(scale == 0) or not np.all(np.isfinite(scale)):
        raise A2QInputError(f"Quant node {node.name!r}: scale has zero or non-finite entries")
    return scale, zero_point, int(bits.item())


def _attr(node, name: str, default):
    attr = get_by_name(node.attribute, name)
    if attr is None:
        return default
    return attr.s.decode() if attr.type == attr.STRING else attr.i


def _execute_weight_quant(model: ModelWrapper, node) -> tuple[np.ndarray, int, bool]:
    """Integer weights produced by a weight ``Quant`` node: ``Quant(w) / scale``, checked
    integral (the node rounds, so this is what the exported model really multiplies by).

    For ``M <= 16`` bits the integers are recovered in float32 (exact: ``|q| < 2^16``, and the
    quotient is within an ulp of an integer), else in float64."""
    w = _initializer(model, node.input[0], "weight", node).astype(np.float32)
    scale, zero_point, bits = _quant_params(model, node)
    out = qonnx_quant(w, scale.astype(np.float32), zero_point.astype(np.float32),
                      np.asarray(bits, dtype=np.float32),
                      _attr(node, "signed", 1), _attr(node, "narrow", 0),
                      _attr(node, "rounding_mode", "ROUND"))
    dtype = np.float32 if bits <= 16 else np.float64
    q = np.asarray(out, dtype=dtype) / scale.astype(dtype)
    rounded = np.rint(q)
    worst = float(np.max(np.abs(q - rounded))) if q.size else 0.0
    if not worst <= _INTEGRALITY_TOL:
        raise A2QInputError(f"weight Quant node {node.name!r}: Quant(w) / scale is not integral "
                            f"(off by up to {worst:.3g}); the scale cannot be factored out")
    return rounded.astype(np.int64), bits, bool(np.all(scale == 1))


def _weight_source(model: ModelWrapper, tensor: str, consumer):
    """Follow ``tensor`` back through ``Transpose`` nodes to a weight ``Quant`` node or an
    initializer. Returns ``(int weights in the consumer's layout, M, scale_is_one, initializer,
    source)`` or None if the weight is not quantized."""
    perms: list[list[int]] = []
    producer = model.find_producer(tensor)
    while producer is not None and producer.op_type == "Transpose":
        perm = get_by_name(producer.attribute, "perm")
        perms.append(list(perm.ints) if perm is not None else None)
        tensor = producer.input[0]
        producer = model.find_producer(tensor)
    if producer is None:
        value = model.get_initializer(tensor)
        dtype = model.get_tensor_datatype(tensor)
        if value is None or not dtype.is_integer() or dtype.name == "FLOAT32":
            return None
        value = np.asarray(value, dtype=np.float64)
        if not np.array_equal(value, np.rint(value)):
            raise A2QInputError(f"node {consumer.name!r}: weight {tensor!r} is annotated "
                                f"{dtype.name} but holds non-integer values")
        q, bits, one, init, source = value.astype(np.int64), dtype.bitwidth(), True, tensor, \
            f"datatype {dtype.name} of {tensor}"
    elif producer.op_type == "Quant":
        if model.get_initializer(producer.input[0]) is None:
            return None  # quantizes activations (a dynamic matmul), not weights
        q, bits, one = _execute_weight_quant(model, producer)
        init, source = producer.input[0], f"Quant node {producer.name}"
    elif producer.op_type in ("BipolarQuant", "FloatQuant", "Trunc", "IntQuant"):
        raise A2QInputError(f"node {consumer.name!r}: weights quantized by a {producer.op_type} "
                            f"node ({producer.name!r}) are not supported; use an integer Quant")
    else:
        return None
    for perm in reversed(perms):
        q = np.transpose(q, perm)
    return q, bits, one, init, source


def _canonical_rows(model: ModelWrapper, node, q: np.ndarray, tensor: str) -> np.ndarray:
    """Weights as ``(out_channels, K)`` for a Conv, ConvTranspose, MatMul or Gemm node.

    ConvTranspose weights are ``(C_in, C_out/group, k...)``: output channel ``g * C_out/group + j``
    uses ``q[g*C_in/group:(g+1)*C_in/group, j]``, so ``K = C_in/group * prod(k)``. Each output
    element of a transposed conv sums over at most those products, so the channel's range over all
    of them is a safe (for stride > 1, conservative) bound.
    """
    if node.op_type == "Conv":
        return q.reshape(q.shape[0], -1)
    if node.op_type == "ConvTranspose":
        group = int(_attr(node, "group", 1))
        cin, per_group = q.shape[0], q.shape[1]
        grouped = q.reshape(group, cin // group, per_group, -1)
        return grouped.transpose(0, 2, 1, 3).reshape(group * per_group, -1)
    if node.op_type == "Gemm":
        rows = q if _attr(node, "transB", 0) else q.T
        return rows.reshape(rows.shape[0], -1)
    if q.ndim != 2:
        raise A2QInputError(f"MatMul node {node.name!r}: weight {tensor!r} has shape {q.shape}; "
                            "only 2-D (K, out) weights are supported")
    rows = q.T
    sparsity = model.get_tensor_sparsity(tensor) or {}
    if "dw" in sparsity:  # depthwise conv lowered to a block-sparse (kh*kw*C, C) matrix
        kh, kw = sparsity["dw"]["kernel_shape"]
        channels = rows.shape[0]
        rows = rows.reshape(channels, kh * kw, channels)
        rows = np.stack([rows[c, :, c] for c in range(channels)])
    return rows


def node_integer_weights(model: ModelWrapper, node) -> NodeWeights | None:
    """Integer weights ``(out, K)`` of an accumulating node, or None if its weight input is not a
    quantized constant. Raises :class:`A2QInputError` if quantized in a way we cannot read."""
    if node.op_type not in ACCUMULATING_OPS or len(node.input) < 2:
        return None
    found = _weight_source(model, node.input[1], node)
    if found is None:
        return None
    q, bits, one, init, source = found
    rows = _canonical_rows(model, node, q, init)
    return NodeWeights(node=node.name, tensor=init, int_weights=rows, weight_bits=bits,
                       scale_is_one=one, source=source)


def node_input_datatype(model: ModelWrapper, tensor: str, consumer=None) -> IntegerInput:
    """Integer range of ``tensor``: its integer qonnx datatype annotation, else the Quant/Trunc
    node producing it (through layout-only ops). Raises :class:`A2QInputError` if unknown."""
    who = f"node {consumer.name!r} ({consumer.op_type})" if consumer is not None else "tensor"
    start = tensor
    while True:
        dtype = model.get_tensor_datatype(tensor)
        if dtype.is_integer():
            return IntegerInput(dtype.bitwidth(), dtype.signed(), int(dtype.min()),
                                int(dtype.max()), True, f"datatype {dtype.name} of {tensor}")
        producer = model.find_producer(tensor)
        if producer is None:
            raise A2QInputError(
                f"{who}: cannot tell the integer range of its input {start!r}: it comes from "
                f"{tensor!r}, a graph input without an integer qonnx datatype. Quantize it "
                "(a Quant node) or annotate it (ModelWrapper.set_tensor_datatype)")
        if producer.op_type in ("Quant", "Trunc"):
            return _quantized_range(model, producer)
        if producer.op_type not in _LAYOUT_OPS:
            raise A2QInputError(
                f"{who}: cannot tell the integer range of its input {start!r}: it comes from a "
                f"{producer.op_type} node ({producer.name!r}), which this analysis does not trace "
                f"(supported: Quant, Trunc, integer datatype annotations, and through "
                f"{', '.join(_LAYOUT_OPS)}). Requantize before this layer")
        tensor = producer.input[0]


def _quantized_range(model: ModelWrapper, node) -> IntegerInput:
    if node.op_type == "Quant":
        scale, zero_point, bits = _quant_params(model, node)
    else:  # Trunc: x, scale, zero point, input bit width, [output scale,] output bit width
        out_scale = 1 if len(node.input) == 5 else 4
        scale = _initializer(model, node.input[out_scale], "scale", node)
        zero_point = _initializer(model, node.input[2], "zero point", node)
        bits = int(_initializer(model, node.input[-1], "output bit width", node).item())
    if np.size(scale) != 1:
        raise A2QInputError(f"{node.op_type} node {node.name!r} quantizes an accumulator input "
                            "with a per-channel scale; the integer accumulator needs one scale")
    zp = float(np.asarray(zero_point).reshape(-1)[0])
    if np.size(zero_point) != 1 or zp != int(zp):
        raise A2QInputError(f"{node.op_type} node {node.name!r}: the zero point must be one "
                            f"integer, got {np.asarray(zero_point).tolist()}")
    signed, narrow = bool(_attr(node, "signed", 1)), bool(_attr(node, "narrow", 0))
    lo, hi = bounds.input_range(bits, signed, narrow)
    if not signed and narrow:
        hi -= 1
    return IntegerInput(bits, signed, lo - int(zp), hi - int(zp), float(scale.item()) == 1.0,
                        f"{node.op_type} node {node.name}")


@dataclass
class AccumulatorAnalysis:
    """One accumulating node. Widths are signed accumulator bits (``P``)."""

    node: str
    op_type: str
    weight: str  # weight initializer
    output: str  # accumulator output tensor
    has_bias: bool  # the node adds a bias after accumulating (output = accumulator + bias)
    dot_length: int  # K
    out_channels: int
    weight_bits: int  # M
    input_bits: int  # N
    input_signed: bool
    input_min: int
    input_max: int
    l1_norm_max: int  # largest per-channel ||q||_1
    bits_exact_range: int  # what the weights need for every input in range: the proven width
    exact_min: int
    exact_max: int
    bits_a2q_bound: int  # A2Q L1 bound form
    bits_a2q_plus_bound: int  # A2Q+ zero-centred form
    bits_datatype: int  # from K, N, M alone
    fingerprint: str
    layer: str | None = None  # from the matching record
    variant: str | None = None
    target_bits: int | None = None  # the P checked: the record's, or one set by a2q report --target
    recorded_target_bits: int | None = None  # the P the file records (the one trained for)
    target_holds: bool | None = None  # exact range fits the target (no overflow possible)
    bound_holds: bool | None = None  # the variant's L1 bound admits the weights at the target
    integer_domain: bool = False  # input and weights carry no scale
    sources: dict = field(default_factory=dict)
    zero_channels: int = 0  # output channels whose integer weights are all zero

    @property
    def proven_datatype(self) -> str:
        """qonnx datatype name of the accumulator: ``INT<b>`` in the integer domain, else
        ``SCALEDINT<b>`` (integers times the input and weight scales)."""
        b = self.bits_exact_range
        return f"INT{b}" if self.integer_domain else f"SCALEDINT<{b}>"


def _analyze_node(model: ModelWrapper, node, weights: NodeWeights) -> AccumulatorAnalysis:
    inp = node_input_datatype(model, node.input[0], node)
    q = weights.int_weights
    out_channels, k = q.shape
    l1 = int(np.abs(q).sum(axis=1).max()) if q.size else 0
    zc_l1 = max(bounds.zero_centered_l1_norm(q)) if q.size else 0
    rng = bounds.exact_accumulator_range(q, inp.minimum, inp.maximum)
    lo, hi = rng.overall
    bias = len(node.input) > 2 and bool(node.input[2])
    return AccumulatorAnalysis(
        node=node.name, op_type=node.op_type, weight=weights.tensor, output=node.output[0],
        has_bias=bias, dot_length=k, out_channels=out_channels, weight_bits=weights.weight_bits,
        input_bits=inp.bits, input_signed=inp.signed, input_min=inp.minimum,
        input_max=inp.maximum, l1_norm_max=l1, bits_exact_range=rng.signed_bits,
        exact_min=lo, exact_max=hi,
        bits_a2q_bound=bounds.min_accumulator_bits(l1, inp.bits, inp.signed),
        bits_a2q_plus_bound=bounds.min_accumulator_bits(zc_l1, inp.bits, inp.signed,
                                                        zero_centered=True),
        bits_datatype=bounds.datatype_accumulator_bits(k, inp.bits, weights.weight_bits,
                                                       inp.signed),
        fingerprint=weight_fingerprint(q),
        integer_domain=inp.scale_is_one and weights.scale_is_one,
        sources={"input": inp.source, "weights": weights.source},
        zero_channels=int((np.abs(q).sum(axis=1) == 0).sum()) if q.size else out_channels,
    )


def _apply_record(result: AccumulatorAnalysis, record: AccumulatorRecord) -> None:
    result.layer, result.variant, result.target_bits = record.layer, record.variant, \
        record.target_bits
    result.recorded_target_bits = record.target_bits
    if record.target_bits is None:
        return
    result.target_holds = result.bits_exact_range <= record.target_bits
    if record.variant == "a2q+":
        result.bound_holds = result.bits_a2q_plus_bound <= record.target_bits
    elif record.variant == "a2q":
        result.bound_holds = result.bits_a2q_bound <= record.target_bits


class AccumulatorReport(list):
    """A list of :class:`AccumulatorAnalysis` (graph order) plus the records no node matched.

    What was checked: a node is checked when it has a target P (from its record, or set by
    ``a2q report --target``); :attr:`checked` counts those, :attr:`unchecked` names the rest.
    :attr:`all_hold` is True only when at least one target was checked and every checked one
    holds, False when one is violated or a record matches no node, and None when nothing was
    checked (no accumulating node, or none with a target): never a pass for nothing.

    ``warnings``: one line per node with all-zero integer channels (why, and what helps), printed
    under the table and included in :meth:`to_dict`.
    """

    def __init__(self, results=(), unmatched_records=(), float_inputs=()) -> None:
        super().__init__(results)
        self.unmatched_records: list[AccumulatorRecord] = list(unmatched_records)
        # layers recorded at export with a float input and no target (a float stem): not integer
        self.float_inputs: list[str] = list(float_inputs)

    @property
    def warnings(self) -> list[str]:
        found = []
        for r in self:
            # the P the weights were trained for, not one set afterwards to check them
            text = zero_weight_warning(r.layer or r.node, r.zero_channels, r.out_channels,
                                       r.variant or "none", r.recorded_target_bits, r.input_bits,
                                       r.input_signed, dot_length=r.dot_length)
            if text is not None:
                found.append(text)
        return found

    @property
    def checked(self) -> int:
        """How many nodes were checked against a target P."""
        return sum(r.target_bits is not None for r in self)

    @property
    def unchecked(self) -> list[str]:
        """The nodes (layer name where known) without a target, float-input layers and records
        without a target that match no node: not checked."""
        return [r.layer or r.node for r in self if r.target_bits is None] + self.float_inputs + \
            [r.layer for r in self.unmatched_records if r.target_bits is None]

    @property
    def violated(self) -> bool:
        """A checked target is violated (exact range or the variant's L1 bound exceeds P), or a
        record with a target matches no node's weights (one without a target is only noted)."""
        return any(r.target_bits is not None for r in self.unmatched_records) or any(
            r.target_holds is False or r.bound_holds is False for r in self)

    @property
    def all_hold(self) -> bool | None:
        """True: at least one target checked and every one holds; False: :attr:`violated`;
        None: nothing was checked (see :attr:`summary`)."""
        if self.violated:
            return False
        return True if self.checked else None

    @property
    def summary(self) -> str:
        """One line: how many nodes were checked, and whether every checked target holds."""
        if not self:
            return ("nothing checked: the model has no accumulating node with quantized weights "
                    "(MatMul, Conv, ConvTranspose or Gemm fed by a weight Quant node or an "
                    "integer-annotated initializer)")
        if self.violated:
            return (f"{self.checked} of {len(self)} accumulators checked against a target: "
                    "VIOLATED")
        if not self.checked:
            return (f"nothing checked: none of the {len(self)} accumulators has a target "
                    "(the file records none)")
        return (f"{self.checked} of {len(self)} accumulators checked against a target, every "
                "checked target holds")

    def to_dict(self) -> dict:
        """``layers``, ``unmatched_records``, ``warnings``, ``all_hold`` (True/False/None, see
        :attr:`all_hold`), ``checked`` (count), ``unchecked`` (names) and ``summary``."""
        return {"layers": [asdict(r) | {"proven_datatype": r.proven_datatype} for r in self],
                "unmatched_records": [r.layer for r in self.unmatched_records],
                "float_inputs": self.float_inputs,
                "warnings": self.warnings,
                "all_hold": self.all_hold, "checked": self.checked,
                "unchecked": self.unchecked, "summary": self.summary}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        cols = (("layer", "layer"), ("node", "node"), ("op_type", "op"), ("variant", "quant"),
                ("dot_length", "K"), ("weight_bits", "M"), ("input_bits", "N"),
                ("input_signed", "signed"), ("l1_norm_max", "max|q|_1"),
                ("bits_exact_range", "P(exact)"), ("bits_a2q_bound", "P(A2Q)"),
                ("bits_a2q_plus_bound", "P(A2Q+)"), ("bits_datatype", "P(dtype)"),
                ("target_bits", "target"), ("target_holds", "holds"))

        def holds(r: AccumulatorAnalysis):
            if r.target_holds is None:
                return None
            return r.target_holds and r.bound_holds is not False

        rows = [[cell(holds(r), verdict=True) if k == "target_holds" else cell(getattr(r, k))
                 for k, _ in cols] for r in self]
        lines = [text_table([t for _, t in cols], rows)]
        for rec in self.unmatched_records:
            if rec.target_bits is None:
                lines.append(f"note: record {rec.layer!r} (no target) matches no node's integer "
                             "weights; nothing was to be checked for it")
            else:
                lines.append(f"record {rec.layer!r} (target {rec.target_bits}) matches no node's "
                             "integer weights: the file's weights differ from what was exported")
        for layer in self.float_inputs:
            lines.append(f"note: layer {layer!r} has a float input (recorded at export, no "
                         "target): its accumulator is not integer and was not checked")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def accumulating_nodes(model: ModelWrapper) -> list[tuple[object, NodeWeights]]:
    """``(node, NodeWeights)`` for each node with quantized weights, in graph order; raises for
    quantized weights feeding an accumulating op this analysis does not model."""
    found = []
    for node in model.graph.node:
        if node.op_type in _UNSUPPORTED_WEIGHT_CONSUMERS and len(node.input) > 1:
            producer = model.find_producer(node.input[1])
            if producer is not None and producer.op_type == "Quant":
                raise A2QInputError(f"node {node.name!r}: op {node.op_type} with quantized "
                                    "weights is not supported (supported: MatMul, Conv, ConvTranspose, Gemm)")
        weights = node_integer_weights(model, node)
        if weights is not None:
            found.append((node, weights))
    return found


def analyze_accumulators(model: ModelWrapper, source: str | None = None) -> AccumulatorReport:
    """Analyze every accumulating node of ``model`` and match it to the file's records.

    Records are matched by :func:`brevitas_a2q.analysis.records.weight_fingerprint` (identical
    weights are matched in order), so they survive renaming, layout changes and conv lowering.
    A model without accumulating node (e.g. a float ONNX) gives an empty report whose
    ``all_hold`` is None (nothing checked), not True. ``source`` (e.g. the file name) is named in
    the error raised for corrupt records (:func:`~brevitas_a2q.analysis.records.read_records`).
    """
    pending = list(read_records(model, source))
    results, float_inputs = [], []
    for node, weights in accumulating_nodes(model):
        fingerprint = weight_fingerprint(weights.int_weights)
        match = next((r for r in pending if r.fingerprint == fingerprint), None)
        try:
            result = _analyze_node(model, node, weights)
        except A2QInputError:
            if match is None or match.input_bits is not None or match.target_bits is not None:
                raise
            pending.remove(match)  # recorded at export as a float-input layer (a float stem)
            float_inputs.append(match.layer)
            continue
        if match is not None:
            pending.remove(match)
            _apply_record(result, match)
        results.append(result)
    return AccumulatorReport(results, pending, float_inputs)


def accumulator_analysis(model: ModelWrapper) -> dict:
    """qonnx analysis pass (``model.analysis(accumulator_analysis)``): node name -> its
    :class:`AccumulatorAnalysis` as a dict."""
    return {r.node: asdict(r) | {"proven_datatype": r.proven_datatype}
            for r in analyze_accumulators(model)}


class AnnotateAccumulatorDatatypes(Transformation):
    """Annotate each accumulator output tensor with its proven datatype (exact range):
    ``INT<b>`` when input and weights are plain integers, else ``SCALEDINT<b>``. Nodes that add a
    bias are skipped (their output is not the bare accumulator)."""

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for result in analyze_accumulators(model):
            if not result.has_bias:
                model.set_tensor_datatype(result.output, DataType[result.proven_datatype])
        return model, False
