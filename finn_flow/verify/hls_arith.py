"""hls-arith: FINN's dataflow graph executed with finn-hlslib's accumulator arithmetic.

FINN's Python model of an MVAU/VVAU computes exact dot products (``np.matmul``) and thresholds
them; the HLS code finn-hlslib compiles does not. In ``mvau.hpp``/``vvau.hpp`` the accumulator has
the type of the activation's ``init`` (``decltype(activation.init(0, 0))``): the thresholds' type
``TA`` for ``ThresholdsActivation``, the output type for ``PassThroughActivation`` (a layer without
activation), and ``mac.hpp`` adds every product into it (``res += mul(c[i], d(i, mmv), r)``): an
``ap_int``/``ap_uint`` that wraps modulo ``2^P``. ``ThresholdsActivation::activate``
(``activations.hpp``) returns ``ActVal + sum_i Compare(threshold_i, accu)`` and FINN instantiates it
with ``comp::less_equal``: a threshold counts when ``accu >= threshold``, on the wrapped
accumulator. Order of the additions (SIMD/PE folding) does not matter modulo ``2^P``.

So the width that matters in hardware is the type FINN's code generation declares the accumulator
with, the thresholds' tensor type or ``outputDataType``, not ``accDataType`` itself (FINN widens
the thresholds' type to at least ``accDataType``). finn_flow's accumulator step sets all three to
one type, so there "at its accumulator type" is "at its accDataType"; hls-arith uses the declared
type, as the hardware does, and reports both (``hls_arith.json``, ``modeled_layers``).

:class:`ToHlsArith` converts a specialized dataflow graph (``X_hls``/``X_rtl`` layers) into one
FINN can execute in Python: every layer becomes FINN's generic layer (its ``execute_node`` is FINN's
Python model), except each MVAU/VVAU, which becomes the op of the same name in
:mod:`finn_flow.verify.hls_arith_ops` with ``hlsAccDataType`` set from the graph (what FINN's HLS code
generation declares it with). That op computes the exact dot products (an MVAU's as one exact
integer matrix product, :func:`exact_matmul`; a VVAU's with FINN's own Python model) and applies
only the wrap (:func:`wrap_twos_complement`) and the threshold step (:func:`threshold_step`) of finn-hlslib.
This is a *model* of finn-hlslib's arithmetic that runs wherever FINN does (CI included); cppsim
compiles the real HLS code and stays the authority where it runs.

:func:`check_layer_extremes` drives every MVAU/VVAU alone, through that op, with inputs within its
input type that reach each output channel's exact accumulator minimum and maximum, and compares
with exact integer arithmetic: a width one bit too narrow in any layer is always caught.

Only qonnx and numpy are imported here; executing a converted graph needs FINN.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation

from brevitas_a2q.errors import A2QInputError
from finn_flow.steps.accumulators import ACCUMULATING_OPS, FINN_DOMAIN, integer_weights, range_datatype
from finn_flow.steps.subpixel import read_column_groups, restrict_to_groups

__all__ = [
    "DESCRIPTION",
    "HLS_ARITH_DOMAIN",
    "ExtremeCase",
    "LayerExtremes",
    "ToHlsArith",
    "check_layer_extremes",
    "extreme_cases",
    "exact_matmul",
    "extreme_vectors",
    "hls_accumulator_datatype",
    "integer_weights_info",
    "run_hls_arith_case",
    "threshold_step",
    "wrap_twos_complement",
]

HLS_ARITH_DOMAIN = "finn_flow.verify.hls_arith_ops"
DESCRIPTION = ("FINN's dataflow graph with every MVAU/VVAU accumulator and threshold comparison "
               "computed at its accDataType in two's complement, a model of finn-hlslib's "
               "arithmetic; cppsim compiles the real HLS code and stays the authority where it "
               "runs")


def wrap_twos_complement(values: np.ndarray, datatype: DataType) -> np.ndarray:
    """``values`` (integers) as an ``ap_int``/``ap_uint`` of ``datatype`` holds them: modulo
    ``2^bits``, in ``[min, max]`` of the type (two's complement for a signed type). A non-integer
    type (a float accumulator) leaves them unchanged. Returns float64."""
    if not datatype.is_integer() or datatype.bitwidth() >= 62:  # float64 sums stay below 2^53
        return np.asarray(values, dtype=np.float64)
    ints = np.asarray(np.round(values), dtype=np.int64)
    modulus = np.int64(1) << np.int64(datatype.bitwidth())
    low = np.int64(datatype.min())
    return (np.mod(ints - low, modulus) + low).astype(np.float64)


def threshold_step(acc: np.ndarray, thresholds: np.ndarray, out_scale: float = 1,
                   out_bias: float = 0) -> np.ndarray:
    """finn-hlslib's ``ThresholdsActivation::activate`` with ``comp::less_equal``:
    ``out_bias + out_scale * #{i : acc >= threshold[c, i]}`` for each value of ``acc`` (channels
    last, ``C`` channels); ``thresholds`` has shape ``(C, T)`` or ``(1, T)`` (shared)."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    count = (np.asarray(acc, dtype=np.float64)[..., None] >= thresholds).sum(axis=-1)
    return out_bias + out_scale * count.astype(np.float64)


def _base(op_type: str) -> str:
    return op_type.rsplit("_", 1)[0] if op_type.endswith(("_hls", "_rtl")) else op_type


def hls_accumulator_datatype(model: ModelWrapper, node) -> DataType:
    """The type FINN's HLS code gives ``node``'s accumulator: the thresholds' tensor type with
    an activation (``ThresholdsActivation<..., TA, ...>``, FINN's ``generate_params``), else the
    output type (``PassThroughActivation<TO>``, FINN's ``docompute``)."""
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    if inst.get_nodeattr("noActivation") == 0 and len(node.input) > 2:
        return model.get_tensor_datatype(node.input[2])
    return DataType[inst.get_nodeattr("outputDataType")]


def _check_thresholds(model: ModelWrapper, node, datatype: DataType) -> None:
    """FINN's code generation refuses thresholds its type cannot hold; so does hls-arith."""
    if len(node.input) < 3 or not datatype.is_integer():
        return
    thresholds = model.get_initializer(node.input[2])
    if thresholds is None:
        raise A2QInputError(f"{node.name}: thresholds are not an initializer")
    if not (np.array_equal(thresholds, np.round(thresholds))
            and thresholds.min() >= datatype.min() and thresholds.max() <= datatype.max()):
        raise A2QInputError(f"{node.name}: thresholds in [{thresholds.min()}, {thresholds.max()}] "
                            f"cannot be expressed with their type {datatype.name}")


class ToHlsArith(Transformation):
    """Convert a specialized FINN dataflow graph for hls-arith execution (module docstring):
    ``X_hls``/``X_rtl`` -> FINN's generic ``X`` (HLS-only attributes dropped), and each HLS
    MVAU/VVAU -> :mod:`finn_flow.verify.hls_arith_ops` with ``hlsAccDataType``. An RTL or unspecialized
    MVAU/VVAU is refused (its arithmetic is not finn-hlslib's). After :meth:`apply`,
    :attr:`layers` maps each MVAU/VVAU to ``(op_type, accumulator type, accDataType)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, tuple[str, str, str]] = {}

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        from qonnx.custom_op.registry import getCustomOp

        for node in model.graph.node:
            if not node.domain.startswith(FINN_DOMAIN):
                continue
            base = _base(node.op_type)
            if base in ACCUMULATING_OPS and node.domain != FINN_DOMAIN + ".hls":
                kind = "an RTL" if node.domain.endswith(".rtl") else "an unspecialized"
                raise A2QInputError(f"{node.name} is {kind} {base}; hls-arith models finn-hlslib's "
                                    "HLS arithmetic: build the accumulating layers as HLS "
                                    "(finn_flow does unless told otherwise)")
            acc_type = None
            if base in ACCUMULATING_OPS:
                acc_type = hls_accumulator_datatype(model, node)
                _check_thresholds(model, node, acc_type)
                self.layers[node.name] = (node.op_type, acc_type.name,
                                          getCustomOp(node).get_nodeattr("accDataType"))
            if node.domain in (FINN_DOMAIN + ".hls", FINN_DOMAIN + ".rtl"):
                node.op_type, node.domain = base, FINN_DOMAIN
                known = getCustomOp(node).get_nodeattr_types()
                for a in [a for a in node.attribute if a.name not in known]:
                    node.attribute.remove(a)
            if acc_type is not None:
                node.domain = HLS_ARITH_DOMAIN
                node.attribute.append(helper.make_attribute("hlsAccDataType", acc_type.name))
        return model, False


@dataclass
class LayerExtremes:
    """The per-layer extreme check of one MVAU/VVAU (:func:`check_layer_extremes`; with
    ``executor`` "cppsim", :func:`finn_flow.verify.cppsim_layer_extremes`)."""

    node: str
    op_type: str
    accumulator_type: str  # the type the HLS code accumulates in (hlsAccDataType)
    acc_datatype: str  # the node's accDataType
    input_datatype: str
    channels: int
    range_min: int  # exact accumulator range over all channels
    range_max: int
    bits_exact: int  # bits of the tightest signed/unsigned type holding that range
    min_reached: int  # channels whose exact minimum the inputs produced (FINN's exact execution)
    max_reached: int
    vectors: int  # input vectors executed
    output_mismatches: int  # vectors whose node output differs from exact integer arithmetic
    # hls-arith: channels whose accumulator left its type (cppsim: not observable, empty)
    wrapped_channels: list[int] = field(default_factory=list)
    executor: str = "hls-arith"
    hls_arith_agreed: int | None = None  # cppsim: vectors whose output equals hls-arith's

    @property
    def ok(self) -> bool:
        return (self.min_reached == self.max_reached == self.channels
                and not self.wrapped_channels and self.output_mismatches == 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def describe(self, layer: str | None = None) -> str:
        """One line; ``layer``: the Brevitas layer the node came from, if known."""
        status = "ok" if self.ok else "MISMATCH"
        named = f"layer {layer}, " if layer else ""
        text = (f"{self.executor} {self.node} ({named}{self.accumulator_type}, exact range "
                f"[{self.range_min}, {self.range_max}] needs {self.bits_exact} bits): "
                f"{self.channels} channels, min reached {self.min_reached}/{self.channels}, "
                f"max reached {self.max_reached}/{self.channels}, "
                f"{self.output_mismatches}/{self.vectors} outputs mismatched")
        if self.wrapped_channels:
            text += f", accumulator wrapped in {len(self.wrapped_channels)} channels"
        if self.hls_arith_agreed is not None:
            text += f", hls-arith agreed on {self.hls_arith_agreed}/{self.vectors}"
        return f"{text} ({status})"


def extreme_vectors(q: np.ndarray, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel ``c`` of integer weights ``q`` (``(channels, K)``), the inputs in
    ``[low, high]`` giving its largest and smallest dot product: ``x_k = high`` where
    ``q_ck > 0`` else ``low``, and the opposite. Returns ``(x_max, x_min)``, each ``(channels, K)``
    int64."""
    q = np.asarray(q)
    x_max = np.where(q > 0, high, low).astype(np.int64)
    x_min = np.where(q > 0, low, high).astype(np.int64)
    return x_max, x_min


_WEIGHTS: dict[int, tuple[weakref.ref, dict]] = {}


def integer_weights_info(w: np.ndarray) -> dict | None:
    """For a weight matrix ``w`` (``(K, N)``) with integer values: ``{"l1": max_j sum_k |w_kj|,
    "float32": w as float32, "float64": ...}`` (the conversions made when first asked); None for
    non-integer values. Remembered per array object while it lives (weights are constants of the
    graph executed again and again; an array written in place after the first call is not
    supported)."""
    hit = _WEIGHTS.get(id(w))
    if hit is not None and hit[0]() is w:
        return hit[1]
    info = None
    if np.array_equal(w, np.round(w)):
        info = {"l1": float(np.abs(w).astype(np.float64).sum(axis=0).max(initial=0)),
                "array": w}
    if len(_WEIGHTS) > 4096:  # forget arrays that no longer exist
        for key in [k for k, (ref, _) in _WEIGHTS.items() if ref() is None]:
            del _WEIGHTS[key]
    try:
        _WEIGHTS[id(w)] = (weakref.ref(w), info)
    except TypeError:  # not weak-referenceable: not remembered
        pass
    return info


def _as(info: dict, dtype) -> np.ndarray:
    key = np.dtype(dtype).name
    if key not in info:
        info[key] = np.asarray(info["array"], dtype=dtype)
    return info[key]


def exact_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w`` of integer-valued arrays (``x`` ``(M, K)``, ``w`` ``(K, N)``), exactly, as int64.
    With ``bound = max|x| * max_j sum_k |w_kj|`` (the largest partial sum's magnitude), through
    float32 BLAS where ``bound < 2^24`` and float64 BLAS where ``bound < 2^53``: every partial sum
    is then an integer the float type holds, so every addition is exact whatever the order; in
    int64 otherwise. ``w``'s conversions are remembered (:func:`integer_weights_info`)."""
    x = np.asarray(x)
    if not np.array_equal(x, np.round(x)):
        raise ValueError("exact_matmul: x has non-integer values")
    info = integer_weights_info(w)
    if info is None:
        raise ValueError("exact_matmul: w has non-integer values")
    # a margin for the float64 rounding of the L1 sum itself
    bound = float(np.abs(x).max(initial=0)) * info["l1"] * (1 + 2.0 ** -20)
    for limit, dtype in ((2.0 ** 24, np.float32), (2.0 ** 53, np.float64)):
        if bound < limit:
            return (x.astype(dtype) @ _as(info, dtype)).astype(np.int64)
    return x.astype(np.int64) @ _as(info, np.int64)


def _single_node(model: ModelWrapper, node, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], attrs: dict) -> ModelWrapper:
    """``node`` alone in a graph with input/output shapes given, its initializers and tensor
    types copied, attributes overridden by ``attrs``."""
    from qonnx.util.basic import qonnx_make_model

    new = copy.deepcopy(node)
    for name, value in attrs.items():
        for a in [a for a in new.attribute if a.name == name]:
            new.attribute.remove(a)
        new.attribute.append(helper.make_attribute(name, value))
    graph = helper.make_graph(
        [new], f"{node.name}_alone",
        [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, list(out_shape))])
    single = ModelWrapper(qonnx_make_model(graph))
    for name in node.input[1:]:
        single.set_initializer(name, model.get_initializer(name))
        single.set_tensor_datatype(name, model.get_tensor_datatype(name))
    single.set_tensor_datatype(node.input[0], model.get_tensor_datatype(node.input[0]))
    single.set_tensor_datatype(node.output[0], model.get_tensor_datatype(node.output[0]))
    return single


def _exact_activation(model: ModelWrapper, node, acc: np.ndarray, inst) -> np.ndarray:
    """The node's output from exact accumulators ``acc`` (channels last) in exact arithmetic."""
    if inst.get_nodeattr("noActivation"):
        return acc.astype(np.float64)
    bipolar = inst.get_nodeattr("outputDataType") == "BIPOLAR"
    return threshold_step(acc, model.get_initializer(node.input[2]),
                          out_scale=2 if bipolar else 1,
                          out_bias=-1 if bipolar else inst.get_nodeattr("ActVal"))


@dataclass
class ExtremeCase:
    """One MVAU/VVAU alone (``single``, as built: ``X_hls``) with inputs ``feed`` that reach
    each output channel's exact accumulator maximum ``ch_max`` and minimum ``ch_min``; ``expected``:
    its output in exact integer arithmetic, one row per input vector."""

    node: str
    op_type: str
    single: ModelWrapper
    feed: np.ndarray
    exact: np.ndarray  # (vectors, channels) exact accumulators
    expected: np.ndarray  # (vectors, channels) exact outputs
    ch_max: np.ndarray
    ch_min: np.ndarray
    input_datatype: str
    acc_datatype: str

    @property
    def channels(self) -> int:
        return len(self.ch_max)


def extreme_cases(model: ModelWrapper) -> list[ExtremeCase]:
    """An :class:`ExtremeCase` for every MVAU/VVAU of the dataflow graph ``model``: an MVAU gets
    ``2 * MH`` input vectors (channel ``c``'s maximum, then its minimum; every channel is computed
    on each), a VVAU two (every channel reads its own inputs: all maxima, all minima; ``PE`` =
    ``Channels``, so FINN reads the input as (kernel position, channel))."""
    from qonnx.custom_op.registry import getCustomOp

    groups = read_column_groups(model)
    cases = []
    for node in model.graph.node:
        if not (node.domain.startswith(FINN_DOMAIN) and _base(node.op_type) in ACCUMULATING_OPS):
            continue
        inst = getCustomOp(node)
        idt = DataType[inst.get_nodeattr("inputDataType")]
        if not idt.is_integer():
            raise A2QInputError(f"{node.name}: input type {idt.name} is not integer")
        q = integer_weights(model, node).astype(np.int64)
        x_max, x_min = extreme_vectors(q, int(idt.min()), int(idt.max()))
        if node.name in groups:  # a sub-pixel layer sums one column group at a time
            x_max, x_min = restrict_to_groups(q, x_max, x_min, groups[node.name])
        channels, k = q.shape
        if _base(node.op_type) == "MVAU":
            x = np.stack([x_max, x_min], axis=1).reshape(2 * channels, k)
            exact = exact_matmul(x, q.T)
            in_shape, out_shape = (2 * channels, k), (2 * channels, channels)
            attrs = {"numInputVectors": [2 * channels]}
            feed = x.astype(np.float32)
        else:
            x = np.stack([x_max, x_min])  # (2, channels, k)
            exact = np.einsum("vck,ck->vc", x, q)
            in_shape, out_shape = (1, 1, 2, k * channels), (1, 1, 2, channels)
            attrs = {"Dim": [1, 2], "PE": channels}
            feed = x.transpose(0, 2, 1).reshape(in_shape).astype(np.float32)
        cases.append(ExtremeCase(
            node=node.name, op_type=node.op_type,
            single=_single_node(model, node, in_shape, out_shape, attrs), feed=feed,
            exact=exact, expected=_exact_activation(model, node, exact, inst),
            ch_max=(x_max * q).sum(axis=1), ch_min=(x_min * q).sum(axis=1),
            input_datatype=idt.name, acc_datatype=inst.get_nodeattr("accDataType")))
    return cases


def _reached(case: ExtremeCase, acc: np.ndarray) -> tuple[int, int]:
    """How many channels' exact minimum and maximum the accumulators ``acc`` (FINN's exact
    execution of the case, ``(vectors, channels)``) hold."""
    n = np.arange(case.channels)
    if _base(case.op_type) == "MVAU":
        at_max, at_min = acc[0::2][n, n], acc[1::2][n, n]
    else:
        at_max, at_min = acc[0], acc[1]
    return int((at_min == case.ch_min).sum()), int((at_max == case.ch_max).sum())


def run_hls_arith_case(case: ExtremeCase) -> tuple[LayerExtremes, np.ndarray]:
    """``case`` through its node under hls-arith: the check, and the outputs (one row per
    vector)."""
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.verify.graph_exec import GraphRunner

    single = copy.deepcopy(case.single).transform(ToHlsArith())
    snode = single.graph.node[0]
    sinst = getCustomOp(snode)
    context = single.make_empty_exec_context()
    context[snode.input[0]] = case.feed
    acc = sinst.accumulate(context, single.graph).reshape(case.exact.shape)
    min_reached, max_reached = _reached(case, acc)
    acc_type = sinst.accumulator_datatype()
    extremes = np.concatenate([case.ch_max, case.ch_min])
    wrapped = wrap_twos_complement(extremes, acc_type)
    wrapped_channels = sorted({int(c) % case.channels
                               for c in np.flatnonzero(wrapped != extremes)})
    actual = GraphRunner(single).run({snode.input[0]: case.feed})[snode.output[0]]
    actual = actual.reshape(len(case.expected), -1)
    lo, hi = int(case.ch_min.min()), int(case.ch_max.max())
    check = LayerExtremes(
        node=case.node, op_type=case.op_type, accumulator_type=acc_type.name,
        acc_datatype=case.acc_datatype, input_datatype=case.input_datatype,
        channels=case.channels, range_min=lo, range_max=hi,
        bits_exact=range_datatype(lo, hi).bitwidth(), min_reached=min_reached,
        max_reached=max_reached, vectors=len(case.expected),
        output_mismatches=int((~np.all(actual == case.expected, axis=1)).sum()),
        wrapped_channels=wrapped_channels)
    return check, actual


def check_layer_extremes(model: ModelWrapper) -> list[LayerExtremes]:
    """Every HLS MVAU/VVAU of the dataflow graph ``model`` alone, at its accumulator type under
    hls-arith, on inputs within its input type that reach each output channel's exact accumulator
    minimum and maximum (:func:`extreme_cases`), against exact integer arithmetic (int64).

    Reported per node: the channels whose extremes FINN's exact execution of the node reached,
    those whose accumulator wrapped at the node's accumulator type, and the vectors whose node
    output differs from exact arithmetic. Needs FINN."""
    return [run_hls_arith_case(case)[0] for case in extreme_cases(model)]
