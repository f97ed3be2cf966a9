"""Verification inputs: random ones in the model's input range, and *extreme* ones that drive the
first accumulating layer's accumulators to the ends of their range.
"""

from __future__ import annotations

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.errors import A2QInputError

ACCUMULATING_OP_TYPES = ("MatMul", "Gemm", "Conv")


def _input_info(model: ModelWrapper) -> tuple[str, tuple[int, ...]]:
    name = model.graph.input[0].name
    return name, tuple(model.get_tensor_shape(name))


def progress(items, label: str):
    """``items`` with a tqdm progress bar described by ``label``, shown only on a terminal
    (``disable=None``), as the package's other loops. It goes to the process's original stderr
    (``sys.__stderr__``): FINN's builder redirects ``sys.stderr`` into its build log while a step
    runs, where a bar would add a line per update."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, desc=label, disable=None, leave=False, file=sys.__stderr__)


def run_qonnx(model: ModelWrapper, inputs: np.ndarray, label: str = "verify: QONNX") -> np.ndarray:
    """Outputs of the QONNX model, one input at a time, as qonnx's ``execute_onnx`` computes them
    (:class:`finn_flow.verify.graph_exec.GraphRunner`: the graph prepared once); a progress bar
    on a terminal."""
    from qonnx.util.cleanup import cleanup_model

    from finn_flow.verify.graph_exec import GraphRunner, one_thread

    model = cleanup_model(model)
    name, shape = _input_info(model)
    out_name = model.graph.output[0].name
    runner = GraphRunner(model)
    with one_thread():
        return np.stack([runner.run({name: x.reshape(shape).astype(np.float32)})[out_name]
                         for x in progress(inputs, label)])


def random_inputs(model: ModelWrapper, count: int, seed: int = 0,
                  low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``count`` inputs uniform in ``[low, high)`` shaped like the model's input, or uniform over
    the integers of the input's qonnx datatype where it has an integer one (``--input-type``)."""
    _, shape = _input_info(model)
    rng = np.random.default_rng(seed)
    declared = integer_input_range(model)
    if declared is not None:
        return rng.integers(declared[0], declared[1] + 1, size=(count, *shape)).astype(np.float32)
    return rng.uniform(low, high, size=(count, *shape)).astype(np.float32)


def integer_input_range(model: ModelWrapper) -> tuple[int, int] | None:
    """``(min, max)`` of the graph input's integer qonnx datatype, or None for a float input."""
    dtype = model.get_tensor_datatype(model.graph.input[0].name)
    return (int(dtype.min()), int(dtype.max())) if dtype.is_integer() else None


def _first_accumulating_weight(model: ModelWrapper) -> tuple[object, np.ndarray]:
    """The first MatMul/Gemm/Conv whose weight is a constant (behind a Quant node or not)."""
    for node in model.graph.node:
        if node.op_type not in ACCUMULATING_OP_TYPES:
            continue
        source = node.input[1]
        producer = model.find_producer(source)
        if producer is not None and producer.op_type in ("Quant", "IntQuant"):
            source = producer.input[0]
        weight = model.get_initializer(source)
        if weight is not None:
            return node, np.asarray(weight)
    raise A2QInputError("the model has no MatMul/Gemm/Conv with constant weights to drive")


def extreme_inputs(model: ModelWrapper, channels: int = 8, amplitude: float = 1e3) -> np.ndarray:
    """Inputs that drive the first accumulating layer's accumulators to their extremes.

    For each of up to ``channels`` output channels (those with the largest weight L1 norm), the
    input takes ``amplitude * sign(weight)`` (and its negation) on the elements that channel reads,
    so every product has the same sign; ``amplitude`` saturates the input quantizer. Works when the
    layer reads the graph input through elementwise/reshape ops only (a fully connected layer after
    a flatten, or a convolution, whose centre output position is driven).
    """
    node, weight = _first_accumulating_weight(model)
    _, shape = _input_info(model)
    if node.op_type == "Conv":
        if len(shape) != 4 or weight.ndim != 4:
            raise A2QInputError(f"cannot build extreme inputs for Conv node {node.name!r} with "
                                f"input shape {shape}")
        rows = weight.reshape(weight.shape[0], -1)
    else:
        transposed = node.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 1 for a in node.attribute)
        rows = weight if transposed else weight.T
        if rows.shape[1] != int(np.prod(shape[1:])):
            raise A2QInputError(f"first layer {node.name!r} reads {rows.shape[1]} values, not the "
                                f"{int(np.prod(shape[1:]))} of the graph input")
    order = np.argsort(-np.abs(rows).sum(axis=1))[:channels]
    declared = integer_input_range(model)  # an integer input: its own extremes
    out = []
    for c in order:
        for sign in (1.0, -1.0):
            x = np.zeros(shape, dtype=np.float32)
            pattern = sign * amplitude * np.sign(rows[c])
            if declared is not None:
                pattern = np.where(pattern > 0, declared[1], np.where(pattern < 0, declared[0], 0))
            if node.op_type == "Conv":
                _, _, kh, kw = weight.shape
                h0, w0 = (shape[2] - kh) // 2, (shape[3] - kw) // 2
                x[0, :, h0:h0 + kh, w0:w0 + kw] = pattern.reshape(weight.shape[1:])
            else:
                x = pattern.reshape(shape).astype(np.float32)
            out.append(x)
    return np.stack(out).astype(np.float32)
