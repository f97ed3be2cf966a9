"""Integer thresholds derived in exact arithmetic from the model, wherever float32 streamlining put
them.

FINN's streamlining absorbs the scales, biases and batch norm between an integer accumulator and an
activation quantizer into the quantizer's thresholds in float32, ``(t - b) / a``, then rounds them
up. A threshold whose exact value is an integer (a tie of the quantizer's round half to even) or lies
within float32 error of one can land on the wrong side: Brevitas's ESPCN layout with plain weights
gave 4620.00048828125 for the exact tie 4620, so the accelerator rounded 105.5 down where the model
rounds it to 106 (``shared/cases/espcn_plain_deconv_tie.onnx``).

The model's own definition is exact: a quantized tensor is ``level * scale``; an accumulating
layer's output is ``s_x * s_w[c] * acc`` with ``acc`` the integer dot product of the levels and the
integer weights; then come the layer's bias, elementwise ``Add``/``Sub``/``Mul``/``Div`` by
constants, at most one ``BatchNormalization`` (``(x - mean) * gamma / sqrt(var + eps) + beta``) and
``Relu``, and the quantizer's ``round_half_even(clip(x / s))``. Every float32 constant is taken as the
rational it denotes, so ``x`` is ``r0 + r1 / sqrt(v)`` with rationals ``r0``, ``r1``, ``v``, and the
quantizer's decision is an exact comparison (:class:`ExactValue`).

A residual join of two quantized tensors with one scale ``s`` (``Add``, as FINN needs it) is the
same with ``(a + b)`` in place of the accumulator: ``(a + b) * s`` with ``a``, ``b`` the two levels.

Two steps use it:

* :func:`step_a2q_record_activation_chains` (before ``step_qonnx_to_finn``): for every activation
  ``Quant`` fed by such a chain from an accumulating layer or a join, the chain's constants are
  stored in the graph metadata under the ``Quant``'s output tensor (:class:`ActivationChain`).
* :class:`finn_flow.steps.ties.RoundHalfEvenIntegerThresholds` (after streamlining) replaces each
  threshold of a ``MultiThreshold`` facing that accumulator by the smallest integer ``acc`` whose
  exact level reaches the threshold's level within the accumulator's reachable range
  (:mod:`finn_flow.steps.threshold_matching`), after proving that the node it faces is the layer's
  accumulator (the same integer weights on integer inputs of the recorded levels; for a join, an
  ``Add`` of the two quantizers' levels) and that FINN's float32 thresholds are within float32
  streamlining error of the exact ones.
  Anything it cannot prove keeps FINN's thresholds and is reported as such.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import get_by_name

from brevitas_a2q.analysis.records import weight_fingerprint

__all__ = [
    "CHAINS_KEY",
    "ActivationChain",
    "ExactValue",
    "LevelTable",
    "attach_quant_tensor",
    "input_levels",
    "is_join",
    "level_source",
    "level_table",
    "read_activation_chains",
    "record_activation_chains",
    "step_a2q_record_activation_chains",
]

CHAINS_KEY = "brevitas_a2q.activation_chains"
QUANT_ATTR = "a2q_rhe_quant"  # on a MultiThreshold: the Quant output tensor it replaced
ACCUMULATING = ("Conv", "ConvTranspose", "MatMul", "Gemm")
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
PASS_THROUGH = ("MaxPool", "Reshape", "Flatten", "Transpose", "Pad", "Identity", "Squeeze",
                "Unsqueeze")  # between a Quant and the layer it feeds: levels unchanged


def _fraction(value) -> Fraction:
    return Fraction(float(value))


@dataclass(frozen=True)
class ExactValue:
    """``r0 + r1 * w`` with ``w = 1 / sqrt(v)`` (``v > 0``; ``r1 = 0`` without batch norm), in
    rationals: what a chain of affine ops and one batch norm makes of an integer accumulator."""

    r0: Fraction
    r1: Fraction = Fraction(0)
    v: Fraction = Fraction(1)

    def affine(self, mul: Fraction, add: Fraction) -> ExactValue:
        return ExactValue(self.r0 * mul + add, self.r1 * mul, self.v)

    def compare(self, c: Fraction) -> int:
        """Sign of ``self - c``, exactly (``r1 w`` against ``c - r0`` by their squares)."""
        d = self.r0 - c
        if self.r1 == 0:
            return (d > 0) - (d < 0)
        a = self.r1  # sign(a w + d), w > 0
        if (a > 0) == (d >= 0) or d == 0:
            return 1 if a > 0 else -1
        lhs, rhs = a * a / self.v, d * d  # |a w| vs |d|, opposite signs
        if lhs == rhs:
            return 0
        return (1 if a > 0 else -1) if lhs > rhs else (1 if d > 0 else -1)


@dataclass
class ActivationChain:
    """From an accumulating layer's integer accumulator to an activation ``Quant`` (one channel's
    constants per list entry; one entry when all channels share them)."""

    layer_node: str  # the accumulating node's name in the QONNX model
    fingerprint: str  # weight_fingerprint of its integer weights (rows = output channels)
    scale: list[str]  # s_x * s_w[c] as fractions "p/q"
    ops: list[dict]  # {"op": "affine", "mul": [...], "add": [...]} | {"op": "bn", ...} | {"op": "relu"}
    quant_scale: list[str]
    low: int  # the quantizer's lowest and highest level
    high: int
    # [lowest, highest] level of each integer input: the layer's input (one), or a join's two
    input_ranges: list[list[int]] | None = None
    # a residual join: the two activation Quant outputs whose levels the Add sums (one scale); the
    # "accumulator" is then the sum of their levels, layer_node the Add and fingerprint empty
    join_inputs: list[str] | None = None

    @property
    def channels(self) -> int:
        lengths = [len(self.scale), len(self.quant_scale)]
        for op in self.ops:
            lengths += [len(v) for k, v in op.items() if k != "op"]
        return max(lengths)

    @functools.cached_property
    def float_constants(self) -> tuple[np.ndarray, list, np.ndarray]:
        """``(scale, ops, quant_scale)`` as float64 arrays (one entry per channel, or one for
        all), for :func:`_float_sign`; computed once (not a field: not recorded)."""
        def floats(values: list[str]) -> np.ndarray:
            return np.array([float(_parsed(v)) for v in values])
        ops = [(op["op"], {k: floats(v) for k, v in op.items() if k != "op"}) for op in self.ops]
        return floats(self.scale), ops, floats(self.quant_scale)


def _per_channel(value: np.ndarray | float) -> list[str]:
    flat = np.asarray(value, dtype=np.float64).reshape(-1)
    return [str(_fraction(x)) for x in flat]


def _at(values: list[str], c: int) -> Fraction:
    return _parsed(values[0] if len(values) == 1 else values[c])


@functools.lru_cache(maxsize=1 << 16)
def _parsed(text: str) -> Fraction:
    """A chain constant ``"p/q"`` as a Fraction (parsed once: thresholds evaluate each many times)."""
    return Fraction(text)


def _init(model: ModelWrapper, name: str) -> np.ndarray | None:
    value = model.get_initializer(name)
    return None if value is None else np.asarray(value)


def _quant_params(model: ModelWrapper, quant) -> tuple[np.ndarray, int, int] | None:
    """A Quant node's scale and level range, or None if not a zero-point, round-half-even one."""
    scale, zero, bits = (_init(model, quant.input[i]) for i in (1, 2, 3))
    mode = get_by_name(quant.attribute, "rounding_mode")
    if scale is None or zero is None or bits is None or np.any(zero != 0) or \
            (mode is not None and mode.s.decode() != "ROUND") or not np.all(scale > 0):
        return None
    signed = bool(get_by_name(quant.attribute, "signed").i)
    narrow = bool(get_by_name(quant.attribute, "narrow").i)
    b = int(np.asarray(bits).reshape(-1)[0])
    low = -(2 ** (b - 1)) + narrow if signed else 0
    high = 2 ** (b - 1) - 1 if signed else 2**b - 1 - narrow
    return scale, low, high


def level_source(model: ModelWrapper, tensor: str) -> str:
    """The tensor whose values reach ``tensor`` unchanged up to a reshuffle (through layout and
    max-pool ops): an activation Quant's output, the graph input, or ``tensor`` itself."""
    producer, source = model.find_producer(tensor), tensor
    while producer is not None and producer.op_type in PASS_THROUGH:
        source = producer.input[0]
        producer = model.find_producer(source)
    if producer is not None and producer.op_type == "Quant":
        return producer.output[0]
    return source


def input_levels(model: ModelWrapper, tensor: str) -> tuple[float, int, int] | None:
    """``(scale, lowest level, highest level)`` of the integers reaching ``tensor`` unchanged: an
    activation Quant's (through layout and max-pool ops), or the graph input's integer datatype
    (``--input-type``, scale 1); None otherwise."""
    source = level_source(model, tensor)
    producer = model.find_producer(source)
    if producer is None:
        dtype = model.get_tensor_datatype(source)
        return (1.0, int(dtype.min()), int(dtype.max())) if dtype.is_integer() else None
    if producer.op_type != "Quant" or _init(model, producer.input[0]) is not None:
        return None
    params = _quant_params(model, producer)
    if params is None or np.asarray(params[0]).size != 1:
        return None
    return float(np.asarray(params[0]).reshape(-1)[0]), params[1], params[2]


def _gemm_trans_b(node) -> bool:
    attr = get_by_name(node.attribute, "transB")
    return attr is not None and attr.i == 1


def _weight_rows(model: ModelWrapper, node) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer weight rows (per output channel) and per-channel weight scales of ``node``."""
    quant = model.find_producer(node.input[1])
    if quant is None or quant.op_type != "Quant":
        return None
    params = _quant_params(model, quant)
    values = _init(model, quant.input[0])
    if params is None or values is None:
        return None
    scale = np.asarray(params[0], dtype=np.float64)
    q = np.rint(values.astype(np.float64) / scale)
    if node.op_type == "ConvTranspose":
        rows = q.transpose(1, 0, *range(2, q.ndim)).reshape(q.shape[1], -1)
        scale = scale.reshape(-1) if scale.size == 1 else scale.transpose(1, 0, 2, 3).reshape(-1)
    elif node.op_type == "Gemm" and _gemm_trans_b(node):  # weight (out, in)
        rows, scale = q.reshape(q.shape[0], -1), scale.reshape(-1)
    elif node.op_type in ("MatMul", "Gemm"):  # weight (in, out)
        rows, scale = q.reshape(q.shape[0], -1).T, scale.reshape(-1)
    else:
        rows, scale = q.reshape(q.shape[0], -1), scale.reshape(-1)
    return rows, scale


def _chain_ops(model: ModelWrapper, start, quant) -> list | None:
    """The ops from ``start`` (the accumulating node) to ``quant``, or None if one is unsupported."""
    ops, tensor = [], start.output[0]
    if len(start.input) == 3 and start.op_type in ("Conv", "ConvTranspose", "Gemm"):
        ops.append({"op": "affine", "mul": ["1"], "add": _per_channel(_init(model, start.input[2]))})
    bn_seen = False
    while True:
        consumers = model.find_consumers(tensor) or []
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node is quant or node.name == quant.name:
            return ops
        if node.op_type in ELEMENTWISE:
            const = _init(model, node.input[1])
            if const is None or node.input[0] != tensor:
                return None
            k = _per_channel(const)
            one, zero = ["1"], ["0"]
            ops.append({"Add": {"op": "affine", "mul": one, "add": k},
                        "Sub": {"op": "affine", "mul": one, "add": [str(-Fraction(x)) for x in k]},
                        "Mul": {"op": "affine", "mul": k, "add": zero},
                        "Div": {"op": "affine", "mul": [str(1 / Fraction(x)) for x in k],
                                "add": zero}}[node.op_type])
        elif node.op_type == "BatchNormalization" and not bn_seen:
            gamma, beta, mean, var = (_init(model, node.input[i]) for i in range(1, 5))
            eps = get_by_name(node.attribute, "epsilon")
            eps = Fraction(float(np.float32(eps.f))) if eps is not None else Fraction(1, 100000)
            ops.append({"op": "bn", "gamma": _per_channel(gamma), "beta": _per_channel(beta),
                        "mean": _per_channel(mean),
                        "var": [str(Fraction(x) + eps) for x in _per_channel(var)]})
            bn_seen = True
        elif node.op_type == "Relu":
            ops.append({"op": "relu"})
        else:
            return None
        tensor = node.output[0]


def is_join(model: ModelWrapper, node) -> bool:
    """Whether ``node`` is an ``Add`` of two computed tensors (a residual join)."""
    return node.op_type == "Add" and len(node.input) == 2 and \
        all(_init(model, name) is None for name in node.input)


def record_activation_chains(model: ModelWrapper) -> dict[str, ActivationChain]:
    """Every activation Quant reached by a supported chain from an accumulating layer whose input is
    a quantized tensor, or from a residual join of two quantized tensors with one scale (see the
    module docstring), keyed by the Quant's output tensor."""
    chains = {}
    for quant in model.graph.node:
        if quant.op_type != "Quant" or _init(model, quant.input[0]) is not None:
            continue
        params = _quant_params(model, quant)
        producer = model.find_producer(quant.input[0])
        while producer is not None and producer.op_type not in ACCUMULATING and \
                not is_join(model, producer):
            producer = model.find_producer(producer.input[0])
        if params is None or producer is None:
            continue
        start = _join_start(model, producer) if is_join(model, producer) else \
            _layer_start(model, producer)
        ops = _chain_ops(model, producer, quant)
        if start is None or ops is None:
            continue
        chains[quant.output[0]] = ActivationChain(
            layer_node=producer.name, ops=ops, quant_scale=_per_channel(params[0]),
            low=params[1], high=params[2], **start)
    return chains


def _layer_start(model: ModelWrapper, layer) -> dict | None:
    """The chain's start at an accumulating layer: ``acc * s_x * s_w[c]``."""
    levels, weights = input_levels(model, layer.input[0]), _weight_rows(model, layer)
    if levels is None or weights is None:
        return None
    rows, s_w = weights
    return {"fingerprint": weight_fingerprint(rows),
            "scale": [str(_fraction(levels[0]) * _fraction(s)) for s in s_w],
            "input_ranges": [[levels[1], levels[2]]]}


def _join_start(model: ModelWrapper, add) -> dict | None:
    """The chain's start at a residual join of two quantized tensors with one scale ``s``:
    ``(a + b) * s``, the sum of their levels being the "accumulator"."""
    levels = [input_levels(model, name) for name in add.input]
    if any(level is None for level in levels) or \
            _fraction(levels[0][0]) != _fraction(levels[1][0]):
        return None
    return {"fingerprint": "", "scale": [str(_fraction(levels[0][0]))],
            "input_ranges": [[low, high] for _, low, high in levels],
            "join_inputs": [level_source(model, name) for name in add.input]}


def read_activation_chains(model: ModelWrapper) -> dict[str, ActivationChain]:
    raw = model.get_metadata_prop(CHAINS_KEY)
    return {} if not raw else {k: ActivationChain(**v) for k, v in json.loads(raw).items()}


def step_a2q_record_activation_chains(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step (before ``step_qonnx_to_finn``): :func:`record_activation_chains` and
    :func:`record_input_chains` into the graph metadata, for
    :class:`finn_flow.steps.ties.RoundHalfEvenIntegerThresholds`."""
    chains = record_activation_chains(model)
    model.set_metadata_prop(CHAINS_KEY, json.dumps({k: asdict(v) for k, v in chains.items()}))
    from finn_flow.steps.input_thresholds import INPUT_CHAINS_KEY, record_input_chains

    inputs = record_input_chains(model)
    model.set_metadata_prop(INPUT_CHAINS_KEY, json.dumps({k: asdict(v) for k, v in inputs.items()}))
    return model


def _value(chain: ActivationChain, c: int, acc: int, relu: bool = True) -> ExactValue:
    """The exact input of the chain's Quant node, channel ``c``, for accumulator ``acc`` (``relu``
    False: the affine part alone, for estimates)."""
    x = ExactValue(_at(chain.scale, c) * acc)
    for op in chain.ops:
        if op["op"] == "affine":
            x = x.affine(_at(op["mul"], c), _at(op["add"], c))
        elif op["op"] == "bn":
            gamma, beta, mean = (_at(op[k], c) for k in ("gamma", "beta", "mean"))
            x = ExactValue(beta, (x.r0 - mean) * gamma, _at(op["var"], c))
        elif relu and x.compare(Fraction(0)) < 0:
            x = ExactValue(Fraction(0))
    return x


FLOAT_MARGIN = 1e-12
"""Relative margin of :func:`_float_sign`: float64 evaluation of a chain (a dozen operations, each
rounding by at most 2^-53 of the magnitudes involved) errs by less than 1e-14 of the sum of those
magnitudes, so a float64 difference beyond 1e-12 of it has the exact difference's sign."""


def _float_sign(chain: ActivationChain, c: int, acc: int, level: int) -> int:
    """Sign of ``value(acc) - (level - 1/2) * quant_scale`` from a float64 mirror of :func:`_value`,
    or 0 where float64 cannot decide it (a difference, or a ReLU's input, within
    :data:`FLOAT_MARGIN` of the magnitudes it came from): then only the exact comparison can."""
    scale, ops, quant_scale = chain.float_constants

    def at(values: np.ndarray) -> float:
        return float(values[0] if len(values) == 1 else values[c])

    r0, r1 = at(scale) * acc, 0.0  # value = r0 + r1, as ExactValue's r0 + r1 * w
    m0, m1 = abs(r0), 0.0  # magnitudes bounding each part's float64 error
    for kind, k in ops:
        if kind == "affine":
            mul, add = at(k["mul"]), at(k["add"])
            r0, r1, m0, m1 = r0 * mul + add, r1 * mul, m0 * abs(mul) + abs(add), m1 * abs(mul)
        elif kind == "bn":
            gain, mean = at(k["gamma"]) / math.sqrt(at(k["var"])), at(k["mean"])
            r0, r1, m0, m1 = at(k["beta"]), (r0 - mean) * gain, abs(at(k["beta"])), \
                (m0 + abs(mean)) * abs(gain)
        elif kind == "relu":
            if abs(r0 + r1) <= FLOAT_MARGIN * (m0 + m1):
                return 0
            if r0 + r1 < 0:
                r0 = r1 = m0 = m1 = 0.0
        else:
            return 0
    half = (level - 0.5) * at(quant_scale)
    difference = r0 + r1 - half
    if abs(difference) <= FLOAT_MARGIN * (m0 + m1 + abs(half)):
        return 0
    return 1 if difference > 0 else -1


def _reaches(chain: ActivationChain, c: int, acc: int, level: int) -> bool:
    """Whether the Quant's level for ``acc`` is ``>= level`` (round half to even, exact): decided
    in float64 where :func:`_float_sign` can, else in rationals (:func:`_reaches_exactly`)."""
    sign = _float_sign(chain, c, acc, level)
    return sign > 0 if sign else _reaches_exactly(chain, c, acc, level)


def _reaches_exactly(chain: ActivationChain, c: int, acc: int, level: int) -> bool:
    """:func:`_reaches` in rational arithmetic alone."""
    half = (Fraction(level) - Fraction(1, 2)) * _at(chain.quant_scale, c)
    sign = _value(chain, c, acc).compare(half)
    return sign > 0 or (sign == 0 and level % 2 == 0)


def attach_quant_tensor(node, tensor: str) -> None:
    """Mark a MultiThreshold with the Quant output tensor it replaced (for the chain lookup)."""
    for a in [a for a in node.attribute if a.name == QUANT_ATTR]:
        node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(QUANT_ATTR, tensor))



@dataclass
class LevelTable:
    """A chain's exact quantizer as integer thresholds over an accumulator range: channel ``c``'s
    level for ``acc`` is ``first[c] + #{t : acc >= thresholds[c][t]}``."""

    first: np.ndarray  # (channels,) level at the lowest accumulator
    thresholds: list[np.ndarray]  # per channel, increasing int64

    def levels(self, acc: np.ndarray, channel_axis: int = 1) -> np.ndarray:
        """Exact levels of integer accumulators ``acc`` (channels along ``channel_axis``)."""
        acc = np.asarray(acc, dtype=np.int64)
        if len(self.thresholds) == 1:
            return self.first[0] + np.searchsorted(self.thresholds[0], acc, side="right")
        acc = np.moveaxis(acc, channel_axis, -1)
        out = np.stack([f + np.searchsorted(t, acc[..., c], side="right")
                        for c, (f, t) in enumerate(zip(self.first, self.thresholds, strict=True))],
                       axis=-1)
        return np.moveaxis(out, -1, channel_axis)


def level_table(chain: ActivationChain, channels: int, lo: int, hi: int) -> LevelTable | None:
    """The exact thresholds of every channel over accumulators in ``[lo, hi]`` by bisection on the
    exact level (:func:`_reaches`), or None where a channel's level is not non-decreasing in the
    accumulator there (a negative batch-norm scale)."""
    firsts, tables = [], []
    for c in range(channels if chain.channels > 1 else 1):
        first, last = _level(chain, c, lo), _level(chain, c, hi)
        if last < first:
            return None
        thresholds = []
        zero, one = (_float(_value(chain, c, acc, relu=False)) for acc in (0, 1))
        scale = float(_at(chain.quant_scale, c))
        for level in range(first + 1, last + 1):
            a, b = lo, hi  # not reached at a, reached at b
            if one != zero:  # bracket the float64 estimate first; bisection proves it exactly
                guess = ((level - 0.5) * scale - zero) / (one - zero)
                if math.isfinite(guess):
                    near_a, near_b = max(lo, math.floor(guess) - 2), min(hi, math.ceil(guess) + 2)
                    if (near_a == lo or not _reaches(chain, c, near_a, level)) and \
                            _reaches(chain, c, near_b, level):
                        a, b = near_a, near_b
            while b - a > 1:
                mid = (a + b) // 2
                a, b = (a, mid) if _reaches(chain, c, mid, level) else (mid, b)
            thresholds.append(b)
        firsts.append(first)
        tables.append(np.asarray(thresholds, dtype=np.int64))
    return LevelTable(np.asarray(firsts), tables)


def _float(value: ExactValue) -> float:
    return float(value.r0) + float(value.r1) / math.sqrt(float(value.v))


def _level(chain: ActivationChain, c: int, acc: int) -> int:
    """The exact quantizer level for ``acc`` (bisection over the level range)."""
    lo, hi = chain.low, chain.high  # reached: lo always; find the largest level reached
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _reaches(chain, c, acc, mid) else (lo, mid - 1)
    return lo
