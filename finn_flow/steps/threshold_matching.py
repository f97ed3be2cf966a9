"""FINN's streamlined ``MultiThreshold`` nodes matched to the model's exact chains, and their
thresholds replaced by exact integers (issue 17).

After streamlining, FINN's thresholds face an integer accumulator. :func:`faces_accumulator` proves
that a ``MultiThreshold`` reads the accumulator of the chain recorded for its quantizer
(:mod:`finn_flow.steps.exact_thresholds`): a MatMul/Conv with the layer's integer weights (a
depthwise layer lowered by FINN included) on integer inputs of the recorded level range, or, for a
residual join, an ``Add`` of the two quantizers' levels. :func:`exact_integer_thresholds` then
computes each threshold as the smallest accumulator whose exact level reaches it, within the
accumulator's reachable range (:func:`accumulator_range`), and keeps FINN's only where FINN's
float32 values are further from the exact ones than float32 streamlining explains
(:func:`finn_deviation`). Used by :class:`finn_flow.steps.ties.RoundHalfEvenIntegerThresholds`.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import get_by_name

from brevitas_a2q.analysis.records import weight_fingerprint
from brevitas_a2q.quant.bounds import exact_accumulator_range
from finn_flow.steps.exact_thresholds import (
    QUANT_ATTR,
    ActivationChain,
    _at,
    _float,
    _init,
    _reaches,
    _value,
    is_join,
)

__all__ = ["STREAMLINING_ERROR", "accumulator_range", "exact_integer_thresholds",
           "faces_accumulator", "finn_deviation"]


def exact_integer_thresholds(chain: ActivationChain, finn: np.ndarray, first_level: int,
                             window: int = 4, acc_range: tuple[list[int], list[int]] | None = None
                             ) -> tuple[np.ndarray, str | None]:
    """Integer thresholds ``T[r, t]`` = the smallest ``acc`` whose exact level is
    ``>= first_level + t + 1``, searched within ``window`` of FINN's ``ceil(finn[r, t])``.

    With ``acc_range`` (the accumulator's reachable ``(minimum, maximum)`` per row, or one value
    for all), only that range matters: a level reached nowhere in it gets ``maximum + 1``, one
    reached everywhere ``minimum`` (both equivalent to any threshold beyond the range, such as the
    ~1e13 FINN computes for a channel whose weight scale is tiny), and a threshold whose exact value
    is not near FINN's is found by bisection over the range.

    Returns ``(thresholds, None)``, or ``(finn, reason)`` where the exact thresholds cannot be
    proven: rows that do not match the chain's channels, a level that does not change within the
    window (without ``acc_range``), or FINN's float32 thresholds further from the exact real ones
    than float32 streamlining explains (:func:`finn_deviation`; then the node does not compute
    this chain as assumed)."""
    rows, count = finn.shape
    if chain.channels not in (1, rows):
        return finn, f"{rows} threshold rows for a chain of {chain.channels} channels"
    out = np.empty((rows, count), dtype=np.float64)
    inside = np.ones((rows, count), dtype=bool)  # thresholds within the accumulator range
    for r in range(rows):
        bounds = None if acc_range is None else \
            tuple(int(v[r] if len(v) > 1 else v[0]) for v in acc_range)
        for t in range(count):
            level = first_level + t + 1
            found = _threshold(chain, r, level, math.ceil(float(finn[r, t])), window, bounds)
            if found is None:
                return finn, f"row {r} threshold {t}: the exact threshold is not within {window} of FINN's"
            out[r, t], inside[r, t] = found
    if np.abs(out).max(initial=0) > 2**24:
        return finn, "thresholds beyond 2^24 are not exact in float32"
    deviation, allowed = finn_deviation(chain, finn, first_level, inside)
    if deviation > allowed:
        return finn, f"FINN's thresholds differ from the exact ones by up to {deviation:.3g}, " \
                     f"beyond float32 streamlining error ({allowed:.3g}): the node does not " \
                     "compute this chain as assumed"
    return out.astype(np.float32), None


def _threshold(chain: ActivationChain, c: int, level: int, guess: int, window: int,
               bounds: tuple[int, int] | None) -> tuple[int, bool] | None:
    """``(smallest acc reaching level, whether it lies inside bounds)``: bisection from
    ``guess +- window`` (or over ``bounds``, where given and the window does not bracket it)."""
    if bounds is not None:
        low, high = bounds
        if not _reaches(chain, c, high, level):
            return high + 1, False
        if _reaches(chain, c, low, level):
            return low, False
        guess = min(max(guess, low), high)
    lo, hi = guess - window, guess + window
    if _reaches(chain, c, lo, level) or not _reaches(chain, c, hi, level):
        if bounds is None:
            return None
        lo, hi = bounds  # not reached at low, reached at high (checked above)
    while hi - lo > 1:  # invariant: not reached at lo, reached at hi
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _reaches(chain, c, mid, level) else (mid, hi)
    return hi, True


STREAMLINING_ERROR = 2.0**-13
"""Relative error allowed between FINN's streamlined float32 thresholds and the exact ones: float32
rounding of ``(t - b) / a`` over a few ops (~1e-7), and qonnx's ``RemoveIdentityOps`` (run by FINN's
``Streamline()`` after every pass) dropping a ``Mul`` within 1e-5 of 1 or an ``Add`` within 1e-5 of 0
-- a batch norm at its initial statistics (``1 / sqrt(1 + eps)`` = 0.999995) is removed, moving every
threshold by 5e-6 relative. A larger difference means another computation, not rounding."""


def finn_deviation(chain: ActivationChain, finn: np.ndarray, first_level: int,
                   where: np.ndarray | None = None) -> tuple[float, float]:
    """``(largest |FINN's threshold - the exact real threshold|, its allowed value)`` over the
    thresholds of ``finn`` (accumulator units; only ``where`` is true, if given): the exact real
    threshold is where the chain's affine value crosses the rounding boundary, in float64; the
    allowance is :data:`STREAMLINING_ERROR` of the threshold's and the chain's offset's
    magnitudes."""
    deviation, allowed = 0.0, math.inf
    rows, count = finn.shape
    for r in range(rows):
        if where is not None and not where[r].any():
            continue
        zero, one = (_float(_value(chain, r, acc, relu=False)) for acc in (0, 1))
        slope = one - zero
        if slope <= 0:
            return math.inf, 0.0
        scale = float(_at(chain.quant_scale, r))
        real = ((first_level + np.arange(count) + 0.5) * scale - zero) / slope
        gap = np.abs(finn[r].astype(np.float64) - real)
        bound = STREAMLINING_ERROR * (np.abs(real) + abs(zero / slope) + 1.0)
        if where is not None:
            gap = np.where(where[r], gap, 0.0)
        worst = int(np.argmax(gap - bound))
        if gap[worst] - bound[worst] > deviation - allowed:
            deviation, allowed = float(gap[worst]), float(bound[worst])
    return deviation, allowed


def _through_transposes(model: ModelWrapper, tensor: str):
    producer = model.find_producer(tensor)
    while producer is not None and producer.op_type == "Transpose":
        tensor = producer.input[0]
        producer = model.find_producer(tensor)
    return producer, tensor


def _holds_levels(model: ModelWrapper, tensor: str, levels: list[int] | None) -> str | None:
    """None if FINN's datatype of ``tensor`` admits every level in ``levels`` (the integers the
    chain assumes there), else why not: a level offset moved past the layer (FINN's count
    ``0..n`` where the chain sums signed levels) shows up as a datatype that excludes them."""
    dtype = model.get_tensor_datatype(tensor)
    if levels is None:
        return None
    if not dtype.is_integer() or dtype.min() > levels[0] or dtype.max() < levels[1]:
        return f"its input {tensor!r} is {dtype.name}, not the levels {levels[0]}..{levels[1]}"
    return None


def faces_accumulator(model: ModelWrapper, node, chain: ActivationChain) -> str | None:
    """None if the MultiThreshold ``node`` reads the chain's accumulator, else why not: for a layer,
    a MatMul or Conv (through Transposes) with the layer's integer weights per output channel on
    the layer's input levels; for a join, an ``Add`` of the two quantizers' levels."""
    producer, _ = _through_transposes(model, node.input[0])
    if chain.join_inputs is not None:
        return _faces_join(model, producer, chain)
    if producer is None or producer.op_type not in ("MatMul", "Conv"):
        return f"it reads a {getattr(producer, 'op_type', 'graph input')}, not a MatMul or Conv"
    rows = _facing_rows(model, producer, chain)
    if rows is None:
        return f"the weights of {producer.name or producer.output[0]!r} are not the integer weights of " \
               f"{chain.layer_node!r}"
    return _holds_levels(model, producer.input[0], (chain.input_ranges or [None])[0])


def _facing_rows(model: ModelWrapper, producer, chain: ActivationChain) -> np.ndarray | None:
    """The integer weight rows of FINN's MatMul/Conv ``producer`` if they are the chain layer's
    (by fingerprint; a depthwise layer lowered by FINN included), else None."""
    weights = _init(model, producer.input[1])
    if weights is None:
        return None
    weights = weights.astype(np.float64)
    rows = weights.T if producer.op_type == "MatMul" else weights.reshape(weights.shape[0], -1)
    if producer.op_type == "MatMul" and weight_fingerprint(rows) != chain.fingerprint:
        rows = _depthwise_rows(weights)
    if rows is None or not np.array_equal(rows, np.rint(rows)) or \
            weight_fingerprint(rows) != chain.fingerprint:
        return None
    return rows


def accumulator_range(model: ModelWrapper, node, chain: ActivationChain
                      ) -> tuple[list[int], list[int]] | None:
    """The reachable ``(minimum, maximum)`` of the accumulator the MultiThreshold ``node`` faces
    (per row for a layer, one value for a join), from the chain's input level ranges; None where
    :func:`faces_accumulator` does not hold."""
    if faces_accumulator(model, node, chain) is not None or chain.input_ranges is None:
        return None
    if chain.join_inputs is not None:
        (low_a, high_a), (low_b, high_b) = chain.input_ranges
        return [low_a + low_b], [high_a + high_b]
    producer, _ = _through_transposes(model, node.input[0])
    rows = _facing_rows(model, producer, chain)
    found = exact_accumulator_range(rows.astype(np.int64), *chain.input_ranges[0])
    return found.minimum, found.maximum


def _depthwise_rows(weights: np.ndarray) -> np.ndarray | None:
    """A depthwise convolution lowered by FINN (``LowerConvsToMatMul``): a ``(K * C, C)`` matrix,
    row ``k * C + c`` of column ``c`` holding kernel tap ``k`` of channel ``c`` and zeros elsewhere.
    Its rows per channel ``(C, K)``, or None if the matrix is not of that form."""
    channels = weights.shape[1]
    if weights.ndim != 2 or weights.shape[0] % channels:
        return None
    taps = weights.reshape(-1, channels, channels)
    diagonal = np.einsum("kcc->kc", taps)
    if np.count_nonzero(taps) != np.count_nonzero(diagonal):
        return None
    return diagonal.T.copy()


def _faces_join(model: ModelWrapper, add, chain: ActivationChain) -> str | None:
    if add is None or not is_join(model, add):
        return f"it reads a {getattr(add, 'op_type', 'graph input')}, not the join Add"
    ranges = dict(zip(chain.join_inputs, chain.input_ranges, strict=True))
    sources = []
    for tensor in add.input:
        mt, _ = _through_transposes(model, tensor)
        quant = get_by_name(mt.attribute, QUANT_ATTR) if mt is not None else None
        if mt is None or mt.op_type != "MultiThreshold" or quant is None:
            return f"the input {tensor!r} of its Add is not a quantizer's MultiThreshold"
        sources.append(helper.get_attribute_value(quant).decode())
        reason = _holds_levels(model, tensor, ranges.get(sources[-1]))
        if reason is not None:
            return reason
    if sorted(sources) != sorted(chain.join_inputs):
        return f"its Add sums {sources}, not the quantizers {chain.join_inputs} of the join"
    return None
