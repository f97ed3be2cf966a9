"""Round half to even in FINN's thresholds, so that a FINN build computes what QONNX computes.

QONNX's ``Quant`` (``rounding_mode="ROUND"``, qonnx ``int_quant``: ``np.round(clip(x / scale))``)
and Brevitas round half to even. FINN's ``ConvertQuantActToMultiThreshold`` replaces an activation
``Quant`` by a ``MultiThreshold`` (output = number of thresholds ``t`` with ``x >= t``) whose
thresholds sit at the half-way points ``(L + 1/2) * scale``, followed by ``Add(L0)`` and
``Mul(scale)``: an input exactly on a half-way point always goes *up*, whatever the parity of the
level below it. Inputs on ties are common, e.g. a 4-bit input quantizer with scale 1/8 on the digits
data (pixel values k/16): half of the pixel values are ties.

Two FINN build steps fix that, each a qonnx :class:`~qonnx.transformation.base.Transformation`:

* :func:`step_a2q_round_half_even` (right after FINN's ``step_qonnx_to_finn``,
  :class:`RoundHalfEvenFloatThresholds`). Each threshold FINN derived from a ``Quant`` node is
  replaced by the smallest float32 ``x`` for which QONNX's own arithmetic,
  ``round_half_even(clip(float32(x / scale)))``, reaches the level above. That function of ``x`` is
  monotone, so ``x >= threshold`` then equals QONNX's ``Quant`` for *every* float32 input, ties
  included (a tie whose level below is even gets the next float32 above it: a strict comparison).
  This is exact for thresholds that keep facing the float input of the ``Quant`` node they came from
  (the input quantizer, FINN's first ``Thresholding`` layer), and the step records, on each
  ``MultiThreshold`` node, the level below its first threshold and a digest of its thresholds.
* :func:`step_a2q_round_half_even_streamlined` (after streamlining, right before
  ``step_convert_to_hw``, :class:`RoundHalfEvenIntegerThresholds`). Streamlining absorbs the scales
  and biases in front of a ``MultiThreshold`` into its thresholds in float32, ``(t - b) / a``, so
  that they face an integer accumulator; FINN then rounds them up (``ceil``), which makes
  ``acc >= ceil(t)`` round half up again, and float arithmetic can move a threshold nudged by the
  first step back onto the integer. Here a threshold that is an exact integer ``n`` is a tie at
  ``acc == n``; where the level below it is even it becomes ``n + 1`` (strict). This is exact
  whenever FINN's streamlined thresholds are exact, as they are for power-of-two scales and biases
  on their grid (proven in the tests over whole input ranges, including biases large enough that
  float32 loses the first step's nudge). With learned float scales an accumulator value lands on a
  tie only by a coincidence of float32 values; there the thresholds keep FINN's own float32
  rounding of ``(t - b) / a`` (as without this step), so agreement near a level boundary is limited
  by FINN's float32 arithmetic, not by ties. Float-input thresholds (the input quantizer) are exact
  for every float32 input in any case.

A float-input ``MultiThreshold`` whose thresholds streamlining changed (an operation in front of an
input quantizer absorbed into it) can no longer be proven to match QONNX at ties: the second step
refuses the build (:class:`~brevitas_a2q.errors.A2QInputError`) naming the node, as does the first
for a ``MultiThreshold`` whose thresholds are not a ``Quant`` node's round-to-nearest grid (FINN's
Selu conversion). Both steps write what they changed to ``ties.json`` in ``cfg.output_dir``.
Tests: ``tests/test_finn_ties.py`` (exhaustive over integer ranges, every tie of the input grid).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from onnx import helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation
from qonnx.util.basic import get_by_name

from brevitas_a2q.errors import A2QInputError
from finn_flow.steps.exact_thresholds import QUANT_ATTR, attach_quant_tensor, read_activation_chains
from finn_flow.steps.input_thresholds import float_input_thresholds, read_input_chains
from finn_flow.steps.threshold_matching import (
    accumulator_range,
    exact_integer_thresholds,
    faces_accumulator,
    finn_deviation,
)

__all__ = [
    "DIGEST_ATTR",
    "FIRST_LEVEL_ATTR",
    "RoundHalfEvenFloatThresholds",
    "RoundHalfEvenIntegerThresholds",
    "TieFix",
    "quant_levels",
    "round_half_even_thresholds",
    "step_a2q_round_half_even",
    "step_a2q_round_half_even_streamlined",
]

FIRST_LEVEL_ATTR = "a2q_rhe_first_level"  # int: the Quant level below threshold 0
DIGEST_ATTR = "a2q_rhe_digest"  # str: sha1 of the float thresholds the first step left
REPORT = "ties.json"
_SEARCH_STEPS = 256  # float32 steps from FINN's threshold to QONNX's boundary (a few in practice)


@dataclass
class TieFix:
    """What a tie step did to one ``MultiThreshold`` node."""

    stage: str  # "float" (after step_qonnx_to_finn) or "integer" (after streamlining)
    node: str  # node name, or the tensor it writes (FINN's converted nodes have no names yet)
    quant_output: str  # the tensor the Quant node wrote (stage "float")
    first_level: int
    thresholds: int
    changed: int
    input_dtype: str
    changed_at: list[list[int]] = field(default_factory=list)  # [row, index], at most 20
    exact: bool = False  # stage "integer": thresholds derived in exact arithmetic from the model
    note: str = ""  # stage "integer": why FINN's float32 thresholds were kept, where they were
    # stage "integer", exact: largest |FINN's float32 threshold - the exact real one| (acc units)
    finn_deviation: float | None = None


def quant_levels(x: np.ndarray, scale: np.ndarray, low: int, high: int) -> np.ndarray:
    """QONNX ``Quant`` (``ROUND``, zero point 0) on float32 ``x``, as an integer level:
    ``np.round(clip(float32(x / scale), low, high))``, exactly as qonnx's ``int_quant`` computes
    it (float32 division, clip, then round half to even)."""
    y = np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)
    y = np.where(y > high, np.float32(high), y)
    y = np.where(y < low, np.float32(low), y)
    return np.round(y)


def round_half_even_thresholds(scale: np.ndarray, first_level: int, count: int) -> np.ndarray:
    """Float32 thresholds ``T[r, t]`` such that, for every float32 ``x``,
    ``first_level + #{t : x >= T[r, t]} == quant_levels(x, scale[r], first_level,
    first_level + count)``: ``T[r, t]`` is the smallest float32 whose QONNX level reaches
    ``first_level + t + 1``. ``scale``: one positive float32 per threshold row."""
    s = np.asarray(scale, dtype=np.float32).reshape(-1, 1)
    if not np.all(s > 0) or not np.all(np.isfinite(s)):
        raise A2QInputError(f"quantizer scales must be positive and finite, got {s.ravel()}")
    low, high = first_level, first_level + count
    target = (first_level + 1 + np.arange(count, dtype=np.float64))[None, :]
    x = ((target - 0.5) * s.astype(np.float64)).astype(np.float32)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    for _ in range(_SEARCH_STEPS):  # up to the first x that reaches the level
        short = quant_levels(x, s, low, high) < target
        if not short.any():
            break
        x = np.where(short, np.nextafter(x, up), x)
    for _ in range(_SEARCH_STEPS):  # down while the float below still reaches it
        below = np.nextafter(x, down)
        reach = quant_levels(below, s, low, high) >= target
        if not reach.any():
            break
        x = np.where(reach, below, x)
    ok = (quant_levels(x, s, low, high) >= target) & \
        (quant_levels(np.nextafter(x, down), s, low, high) < target)
    if not ok.all():  # cannot happen for finite positive scales; never return unproven thresholds
        raise A2QInputError("could not place round-half-even thresholds for scales "
                            f"{s.ravel()[:4]}...")
    return x.astype(np.float32)


def _digest(thresholds: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(thresholds, dtype=np.float32).tobytes()).hexdigest()


def _set_attr(node, name: str, value) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _attr(node, name: str, default=None):
    a = get_by_name(node.attribute, name)
    return default if a is None else helper.get_attribute_value(a)


def _only_consumer(model: ModelWrapper, tensor: str, op_type: str):
    """The single consumer of ``tensor`` if it is an ``op_type`` with a constant second input."""
    consumers = model.find_consumers(tensor) or []
    if len(consumers) == 1 and consumers[0].op_type == op_type and len(consumers[0].input) == 2:
        value = model.get_initializer(consumers[0].input[1])
        if value is not None:
            return consumers[0], np.asarray(value)
    return None, None


def _attr_str(node, name: str) -> str | None:
    value = _attr(node, name)
    return value.decode() if isinstance(value, bytes) else value


def _is_multithreshold(node) -> bool:
    return node.op_type == "MultiThreshold"


class RoundHalfEvenFloatThresholds(Transformation):
    """Thresholds of every ``MultiThreshold`` FINN converted from a ``Quant`` node replaced by the
    exact float32 boundaries of QONNX's round-half-even ``Quant`` (:func:`round_half_even_thresholds`).

    Apply right after FINN's ``ConvertQONNXtoFINN``: FINN's pattern ``MultiThreshold ->
    [Add(L0)] -> [Mul(scale)]`` gives the level below the first threshold (``L0``, 0 without the
    ``Add``) and the scale (1 without the ``Mul``); FINN's thresholds must be that grid's half-way
    points ``(L0 + t + 1/2) * scale`` (checked; anything else, e.g. FINN's Selu conversion, is
    refused). Bipolar nodes have no rounding and are left alone. Each node handled gets the
    attributes ``a2q_rhe_first_level`` and ``a2q_rhe_digest`` for
    :class:`RoundHalfEvenIntegerThresholds`. ``fixes`` lists what was done.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fixes: list[TieFix] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        for node in model.graph.node:
            if not _is_multithreshold(node) or _attr(node, FIRST_LEVEL_ATTR) is not None:
                continue
            raw = _attr(node, "out_dtype", b"FLOAT32")
            out_dtype = DataType[raw.decode() if isinstance(raw, bytes) else raw]
            if out_dtype == DataType["BIPOLAR"]:
                continue  # BipolarQuant: a sign, no rounding
            thresholds = model.get_initializer(node.input[1])
            if thresholds is None:
                raise A2QInputError(f"MultiThreshold writing {node.output[0]!r} has no constant "
                                    "thresholds; round half to even cannot be applied")
            thresholds = np.asarray(thresholds, dtype=np.float32)
            self.fixes.append(self._fix(model, node, thresholds, out_dtype))
        return model, False

    def _fix(self, model: ModelWrapper, node, thresholds: np.ndarray, out_dtype) -> TieFix:
        add, bias = _only_consumer(model, node.output[0], "Add")
        tail = add.output[0] if add is not None else node.output[0]
        mul, scale = _only_consumer(model, tail, "Mul")
        quant_output = mul.output[0] if mul is not None else tail
        where = f"the MultiThreshold FINN made from the Quant node writing {quant_output!r}"
        if float(_attr(node, "out_scale", 1.0)) != 1.0 or float(_attr(node, "out_bias", 0.0)) != 0:
            raise A2QInputError(f"{where} already has out_scale/out_bias: run "
                                "step_a2q_round_half_even right after step_qonnx_to_finn")
        rows, count = thresholds.shape
        # FINN's Add(L0)/Mul(scale) after the node, or none (L0 = 0 / scale 1: FINN omits them)
        candidates = [(b, s) for b in ([bias] if bias is None else [bias, None])
                      for s in ([scale] if scale is None else [scale, None])]
        found = None
        for b, s in candidates:
            level = _level_offset_of(b)
            s = np.ones(1, np.float32) if s is None else s.astype(np.float32).ravel()
            if level is None or s.size not in (1, rows) or not np.all(s > 0):
                continue
            s = np.broadcast_to(s, (rows,)).copy()
            grid = (level + np.arange(count) + 0.5)[None, :] * s.astype(np.float64)[:, None]
            if np.allclose(thresholds, grid, rtol=0, atol=1e-3 * float(s.min())) and \
                    out_dtype.min() <= level and level + count <= out_dtype.max():
                found = level, s
                break
        if found is None:
            raise A2QInputError(
                f"{where}: its thresholds are not the half-way points (L + 1/2) * scale of a "
                "round-to-nearest Quant node with a positive scale (FINN's Selu conversion, or a "
                "graph already streamlined), so FINN's rounding of ties cannot be made QONNX's "
                "round half to even. Use a QuantReLU or QuantIdentity activation with a positive "
                "scale, and run step_a2q_round_half_even right after step_qonnx_to_finn")
        first_level, scale = found
        exact = round_half_even_thresholds(scale, first_level, count)
        changed = np.argwhere(exact != thresholds)
        model.set_initializer(node.input[1], exact)
        attach_quant_tensor(node, quant_output)
        _set_attr(node, FIRST_LEVEL_ATTR, first_level)
        _set_attr(node, DIGEST_ATTR, _digest(exact))
        return TieFix("float", node.name or node.output[0], quant_output, first_level,
                      int(exact.size), len(changed), str(model.get_tensor_datatype(node.input[0])),
                      changed[:20].tolist())


def _level_offset_of(bias: np.ndarray | None) -> int | None:
    """The integer level offset of FINN's ``Add`` after a MultiThreshold (None if not one)."""
    if bias is None:
        return 0
    if np.size(bias) != 1:
        return None
    value = float(np.ravel(bias)[0])
    return int(value) if value == round(value) else None


class RoundHalfEvenIntegerThresholds(Transformation):
    """After streamlining: every ``MultiThreshold`` handled by :class:`RoundHalfEvenFloatThresholds`
    that now faces an integer input gets ``t + 1`` for each threshold ``t`` that is an exact integer
    (a tie at ``input == t``) with an even level below it, so that ``input >= threshold`` rounds
    half to even once FINN rounds the thresholds up (``ceil``). Float-input nodes must still have the
    thresholds the first step gave them (else :class:`~brevitas_a2q.errors.A2QInputError`).
    ``fixes`` lists what was done; ``unmarked`` names ``MultiThreshold`` nodes the first step never
    saw (their ties are FINN's)."""

    def __init__(self) -> None:
        super().__init__()
        self.fixes: list[TieFix] = []
        self.unmarked: list[str] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        chains, inputs = read_activation_chains(model), read_input_chains(model)
        for node in model.graph.node:
            if not _is_multithreshold(node):
                continue
            first_level = _attr(node, FIRST_LEVEL_ATTR)
            name = node.name or node.output[0]
            if first_level is None:
                if _attr(node, "out_dtype") not in (b"BIPOLAR", "BIPOLAR"):  # bipolar: a sign
                    self.unmarked.append(name)
                continue
            thresholds = np.asarray(model.get_initializer(node.input[1]), dtype=np.float32)
            idt = model.get_tensor_datatype(node.input[0])
            digest = _attr(node, DIGEST_ATTR)
            digest = digest.decode() if isinstance(digest, bytes) else digest
            if not idt.is_integer():
                if _digest(thresholds) != digest:
                    fix = self._absorbed_input_ops(model, node, name, thresholds,
                                                   int(first_level), idt, inputs)
                    if fix is not None:
                        self.fixes.append(fix)
                        continue
                    raise A2QInputError(
                        f"MultiThreshold {name!r} faces a float input ({idt.name}) and "
                        "streamlining changed its thresholds (an operation in front of a "
                        "quantizer, e.g. a scaling Mul, Add or BatchNorm before the input "
                        "quantizer, was absorbed into it in float32), so its rounding of ties can "
                        "no longer be proven to equal QONNX's. Do that operation outside the "
                        "model (preprocess the input) or quantize its output first")
                self.fixes.append(TieFix("integer", name, "", int(first_level),
                                         int(thresholds.size), 0, idt.name))
                continue
            if np.any(np.diff(thresholds, axis=1) < 0):
                raise A2QInputError(f"MultiThreshold {name!r}: its thresholds are not increasing "
                                    "after streamlining, so its levels cannot be matched to the "
                                    "Quant node's for round half to even")
            self.fixes.append(self._integer_fix(model, node, name, thresholds, int(first_level),
                                                idt, chains))
        return model, False

    @staticmethod
    def _absorbed_input_ops(model: ModelWrapper, node, name: str, thresholds: np.ndarray,
                            first_level: int, idt, inputs: dict) -> TieFix | None:
        """An input quantizer whose thresholds took in elementwise ops on the graph input
        (``2 * x - 1``): thresholds recomputed over every float32 input with those ops in
        float32 (:func:`~finn_flow.steps.input_thresholds.float_input_thresholds`), if FINN's are
        those within float32 error; else None."""
        chain = inputs.get(_attr_str(node, QUANT_ATTR))
        if chain is None or not chain.ops:
            return None
        exact = float_input_thresholds(chain, thresholds.shape[0], first_level,
                                       thresholds.shape[1])
        if exact is None or not np.allclose(exact, thresholds, rtol=1e-5, atol=1e-6):
            return None
        changed = np.argwhere(exact != thresholds)
        model.set_initializer(node.input[1], exact)
        return TieFix("integer", name, "", first_level, int(thresholds.size), len(changed),
                      idt.name, changed[:20].tolist(), exact=True,
                      note="float input: elementwise ops before the quantizer absorbed, exact "
                           "over every float32 input")

    @staticmethod
    def _integer_fix(model: ModelWrapper, node, name: str, thresholds: np.ndarray,
                     first_level: int, idt, chains: dict) -> TieFix:
        """Exact integer thresholds where the node provably faces its layer's accumulator
        (:mod:`finn_flow.steps.exact_thresholds`); else FINN's, with exact-integer ties made even."""
        chain = chains.get(_attr_str(node, QUANT_ATTR))
        note, deviation = "no exact chain was recorded for its quantizer", None
        if chain is not None:
            note = faces_accumulator(model, node, chain)
            if note is None:
                bounds = accumulator_range(model, node, chain)
                exact, note = exact_integer_thresholds(chain, thresholds, first_level,
                                                       acc_range=bounds)
        if note is None:
            inside = None
            if bounds is not None:
                low, high = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in bounds)
                inside = (exact > low) & (exact <= high)
            deviation = finn_deviation(chain, thresholds, first_level, inside)[0]
            new = exact
        else:
            lower = first_level + np.arange(thresholds.shape[1])
            new = thresholds + ((thresholds == np.floor(thresholds)) & (lower % 2 == 0)[None, :])
        changed = np.argwhere(new != thresholds)
        if changed.size:
            model.set_initializer(node.input[1], new.astype(np.float32))
        return TieFix("integer", name, "", first_level, int(thresholds.size), len(changed),
                      idt.name, changed[:20].tolist(), exact=note is None, note=note or "",
                      finn_deviation=deviation)


def _report(cfg, fixes: list[TieFix], unmarked: list[str] | None = None) -> None:
    """Append ``fixes`` to ``ties.json`` in ``cfg.output_dir`` (if the config has one)."""
    out = getattr(cfg, "output_dir", None)
    if not out:
        return
    path = Path(out) / REPORT
    data = json.loads(path.read_text()) if path.exists() else {"nodes": []}
    data["nodes"] += [asdict(f) for f in fixes]
    if unmarked is not None:
        data["unmarked_multithresholds"] = unmarked
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def step_a2q_round_half_even(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step, right after ``step_qonnx_to_finn``: thresholds FINN derived from Quant nodes
    made QONNX's round half to even for every float32 input (:class:`RoundHalfEvenFloatThresholds`).
    """
    transform = RoundHalfEvenFloatThresholds()
    model = model.transform(transform)
    if cfg is not None and getattr(cfg, "output_dir", None):
        path = Path(cfg.output_dir) / REPORT
        if path.exists():
            path.unlink()  # a new build
    _report(cfg, transform.fixes)
    return model


def step_a2q_round_half_even_streamlined(model: ModelWrapper, cfg) -> ModelWrapper:
    """FINN build step, after streamlining (before ``step_convert_to_hw``): ties of thresholds that
    face integer inputs made round half to even, float-input thresholds checked unchanged
    (:class:`RoundHalfEvenIntegerThresholds`)."""
    transform = RoundHalfEvenIntegerThresholds()
    model = model.transform(transform)
    _report(cfg, transform.fixes, transform.unmarked)
    return model
