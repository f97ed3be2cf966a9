"""Input quantizers fed by the graph input through elementwise float32 ops (``2 * x - 1`` in
Brevitas's BNN-PYNQ models): their thresholds over every float32 input.

FINN's streamlining absorbs elementwise ops in front of an input quantizer into its thresholds in
float32. The ops are IEEE float32 operations, so Brevitas, QONNX and numpy compute them identically,
to the bit: the exact thresholds are the smallest float32 inputs whose level (the ops, then QONNX's
round-half-even ``Quant``) reaches each level, found by bisection over the float32 values
(:func:`float_input_thresholds`). :func:`record_input_chains` finds those ops in the QONNX graph;
:func:`finn_flow.steps.exact_thresholds.step_a2q_record_activation_chains` stores them in the graph
metadata for :class:`finn_flow.steps.ties.RoundHalfEvenIntegerThresholds`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from finn_flow.steps.exact_thresholds import _init, _quant_params

__all__ = ["INPUT_CHAINS_KEY", "InputChain", "float_input_thresholds", "read_input_chains",
           "record_input_chains"]

INPUT_CHAINS_KEY = "brevitas_a2q.input_chains"
_FLOAT_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


@dataclass
class InputChain:
    """Elementwise float32 ops from the graph input to an input quantizer (``2 * x - 1``): IEEE
    operations, so Brevitas, QONNX and numpy compute them identically, to the bit."""

    ops: list[list]  # [op type, float32 constant] or ["Relu", 0]
    scale: list[float]
    low: int
    high: int

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        with np.errstate(over="ignore"):  # the far ends of the float32 range overflow to +-inf
            for op, const in self.ops:
                x = np.maximum(x, np.float32(0)) if op == "Relu" else \
                    _FLOAT_OPS[op](x, np.float32(const)).astype(np.float32)
        return x

    @property
    def increasing(self) -> bool:
        return all(const > 0 for op, const in self.ops if op in ("Mul", "Div"))


def record_input_chains(model: ModelWrapper) -> dict[str, InputChain]:
    """Every Quant reached from the graph input through scalar Add/Sub/Mul/Div, Relu and layout
    ops only (a Quant directly on the input included), keyed by its output tensor."""
    chains, graph_input = {}, model.graph.input[0].name
    for quant in model.graph.node:
        if quant.op_type != "Quant" or _init(model, quant.input[0]) is not None:
            continue
        params = _quant_params(model, quant)
        ops, tensor = [], quant.input[0]
        while params is not None and tensor != graph_input:
            node = model.find_producer(tensor)
            if node is None:
                break
            const = _init(model, node.input[1]) if len(node.input) > 1 else None
            if node.op_type in ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"):
                pass  # elementwise ops commute with layout
            elif node.op_type == "Relu":
                ops.append(["Relu", 0.0])
            elif node.op_type in _FLOAT_OPS and const is not None and const.size == 1:
                ops.append([node.op_type, float(np.float32(const.reshape(-1)[0]))])
            else:
                break
            tensor = node.input[0]
        if params is not None and tensor == graph_input:
            chains[quant.output[0]] = InputChain(ops[::-1], [float(s) for s in
                                                             np.asarray(params[0]).reshape(-1)],
                                                 params[1], params[2])
    return chains


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys in the same order (for bisection over float32 values)."""
    i = np.asarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(i >= 0, i, -(i & 0x7FFFFFFF))


def _unordered(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.int64)
    i = np.where(k >= 0, k, (-k) | -0x80000000)
    return i.astype(np.int32).view(np.float32)


def float_input_thresholds(chain: InputChain, rows: int, first_level: int,
                           count: int) -> np.ndarray | None:
    """Float32 thresholds ``T[r, t]``: the smallest float32 input whose level (the chain's ops, then
    QONNX's round-half-even ``Quant``, all in float32) reaches ``first_level + t + 1``; by bisection
    over every finite float32. None where the chain is not non-decreasing (a negative factor)."""
    from finn_flow.steps.ties import quant_levels

    if not chain.increasing:
        return None
    scale = np.broadcast_to(np.asarray(chain.scale, dtype=np.float32).reshape(-1, 1), (rows, 1))
    target = (first_level + 1 + np.arange(count))[None, :].repeat(rows, axis=0)
    lo = np.full((rows, count), _ordered(np.float32(-3.4e38)))
    hi = np.full((rows, count), _ordered(np.float32(3.4e38)))

    def reached(keys):
        x = _unordered(keys)
        return quant_levels(chain.apply(x), scale, chain.low, chain.high) >= target

    if reached(lo).any() or not reached(hi).all():
        return None
    while np.any(hi - lo > 1):  # invariant: not reached at lo, reached at hi
        mid = (lo + hi) // 2
        ok = reached(mid)
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return _unordered(hi)


def read_input_chains(model: ModelWrapper) -> dict[str, InputChain]:
    raw = model.get_metadata_prop(INPUT_CHAINS_KEY)
    return {} if not raw else {k: InputChain(**v) for k, v in json.loads(raw).items()}
