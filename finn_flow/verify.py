"""Bit-exact check of FINN's C++ simulation (cppsim) against the QONNX model.

The accelerator's HLS layers are compiled with g++ (:func:`finn_flow.environment.prepare_cppsim`)
and executed by FINN; the QONNX model the build started from is executed by qonnx. Both must give
identical outputs on every input. Random inputs rarely reach an accumulator's extremes (an
overflowing accumulator passes them), so the check also uses *extreme* inputs: for a few output
channels of the first accumulating layer, inputs whose signs follow that channel's weights (and
their negation), saturating the input quantizer, which drive its accumulator to the ends of its
range (:func:`extreme_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.io import atomic_output
from finn_flow.accumulators import FINN_DOMAIN
from finn_flow.cppsim import NodeExecution, PythonFallback, plan_cppsim
from finn_flow.environment import prepare_cppsim
from finn_flow.errors import FinnBuildError
from finn_flow.finn_compat import execute_parent

__all__ = ["VerificationResult", "extreme_inputs", "random_inputs", "run_qonnx", "verify_cppsim"]

ACCUMULATING_OP_TYPES = ("MatMul", "Gemm", "Conv")


@dataclass
class VerificationResult:
    """Per input set: how many inputs matched bit-exactly, and the worst difference."""

    kind: str  # "random", "real" or "extreme"
    inputs: int
    matched: int
    max_abs_diff: float
    mismatched_indices: list[int] = field(default_factory=list)
    final_max_rel_diff: float | None = None  # model output vs QONNX, relative to max |output|
    final_argmax_agree: int | None = None

    @property
    def ok(self) -> bool:
        """Every accelerator output bit-exact, and the model outputs equal to the QONNX model's
        up to float rounding in FINN's float tail (relative 1e-5)."""
        tail_ok = self.final_max_rel_diff is None or self.final_max_rel_diff <= 1e-5
        return self.matched == self.inputs and tail_ok

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _input_info(model: ModelWrapper) -> tuple[str, tuple[int, ...]]:
    name = model.graph.input[0].name
    return name, tuple(model.get_tensor_shape(name))


def run_qonnx(model: ModelWrapper, inputs: np.ndarray) -> np.ndarray:
    """Outputs of the QONNX model (qonnx ``execute_onnx``), one input at a time."""
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(model)
    name, shape = _input_info(model)
    out_name = model.graph.output[0].name
    return np.stack([execute_onnx(model, {name: x.reshape(shape).astype(np.float32)})[out_name]
                     for x in inputs])


def random_inputs(model: ModelWrapper, count: int, seed: int = 0,
                  low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``count`` inputs uniform in ``[low, high)`` shaped like the model's input."""
    _, shape = _input_info(model)
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(count, *shape)).astype(np.float32)


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
    out = []
    for c in order:
        for sign in (1.0, -1.0):
            x = np.zeros(shape, dtype=np.float32)
            pattern = sign * amplitude * np.sign(rows[c])
            if node.op_type == "Conv":
                _, _, kh, kw = weight.shape
                h0, w0 = (shape[2] - kh) // 2, (shape[3] - kw) // 2
                x[0, :, h0:h0 + kh, w0:w0 + kw] = pattern.reshape(weight.shape[1:])
            else:
                x = pattern.reshape(shape).astype(np.float32)
            out.append(x)
    return np.stack(out).astype(np.float32)


def compare(kind: str, expected: np.ndarray, actual: np.ndarray,
            final_expected: np.ndarray | None = None,
            final_actual: np.ndarray | None = None) -> VerificationResult:
    """Bit-exact comparison of the accelerator's integer outputs (``actual``) with the exact
    integer arithmetic of the same graph (``expected``). ``final_*``: the model outputs after
    the float tail FINN leaves outside the accelerator, against the QONNX model, which may differ
    by float rounding only (reported as ``final_max_rel_diff``)."""
    expected = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    actual = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    same = np.all(expected == actual, axis=1)
    diff = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    result = VerificationResult(kind=kind, inputs=len(expected), matched=int(same.sum()),
                                max_abs_diff=diff,
                                mismatched_indices=[int(i) for i in np.flatnonzero(~same)])
    if final_expected is not None and final_actual is not None:
        fe = np.asarray(final_expected, dtype=np.float64).reshape(len(final_expected), -1)
        fa = np.asarray(final_actual, dtype=np.float64).reshape(len(final_actual), -1)
        scale = max(float(np.max(np.abs(fe))), 1e-30)
        result.final_max_rel_diff = float(np.max(np.abs(fe - fa))) / scale
        result.final_argmax_agree = int((fe.argmax(1) == fa.argmax(1)).sum())
    return result


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's file descriptor 2 (inherited by FINN's g++ subprocesses) to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _executables_missing(model: ModelWrapper) -> list[str]:
    """HLS layers whose cppsim executable was not produced (FINN does not check g++'s status)."""
    from qonnx.custom_op.registry import getCustomOp

    missing = []
    for node in model.graph.node:
        if node.domain == FINN_DOMAIN + ".hls":
            exe = getCustomOp(node).get_nodeattr("executable_path")
            if not exe or not Path(exe).is_file():
                script = Path(getCustomOp(node).get_nodeattr("code_gen_dir_cppsim")) / "compile.sh"
                missing.append(f"{node.name} (compile script {script})")
    return missing


def verify_cppsim(model: ModelWrapper, output_dir: Path, verify_sets: dict[str, np.ndarray],
                  qonnx_model: ModelWrapper) -> tuple[list[VerificationResult], list[NodeExecution]]:
    """C++-simulate a copy of the dataflow graph ``model`` and compare it bit-exactly, per input
    set, with FINN's Python execution of the same graph before specialization and width setting
    (exact integer arithmetic, no wrap-around); the model outputs are compared with the QONNX
    model. Layers the available finn-hlslib cannot compile run in Python
    (:func:`finn_flow.cppsim.plan_cppsim`); the plan is returned and written to
    ``verification_output/cppsim.json``. ``model`` itself is not changed."""
    from finn.transformation.fpgadataflow.compile_cppsim import CompileCppSim
    from finn.transformation.fpgadataflow.prepare_cppsim import PrepareCppSim
    from finn.transformation.fpgadataflow.set_exec_mode import SetExecMode

    prepare_cppsim(output_dir / "finn_build")
    plan = plan_cppsim(model)
    sim = ModelWrapper(copy.deepcopy(model.model)).transform(PythonFallback(plan))
    verify_dir = output_dir / "verification_output"
    verify_dir.mkdir(exist_ok=True)
    sim = sim.transform(PrepareCppSim(num_workers=1))
    with _stderr_to(verify_dir / "compile.log"):  # g++ warnings of finn-hlslib, hundreds of lines
        sim = sim.transform(CompileCppSim(num_workers=1))
    missing = _executables_missing(sim)
    if missing:
        raise FinnBuildError("g++ did not build the C++ simulation of " + "; ".join(missing)
                             + f"; the compiler's messages are in {verify_dir / 'compile.log'}")
    sim = sim.transform(SetExecMode("cppsim"))
    child = verify_dir / "cppsim_dataflow.onnx"
    sim.save(str(child))
    reference = output_dir / "intermediate_models" / "step_create_dataflow_partition.onnx"
    parent = str(output_dir / "intermediate_models" / "dataflow_parent.onnx")
    parent_model = ModelWrapper(parent)
    partition = next(n for n in parent_model.graph.node
                     if n.op_type == "StreamingDataflowPartition")
    acc_out, out_name = partition.output[0], parent_model.graph.output[0].name
    in_shape = parent_model.get_tensor_shape(parent_model.graph.input[0].name)

    def run(child_path, x):
        ctx = execute_parent(parent, str(child_path), x.reshape(in_shape), return_full_ctx=True)
        return ctx[acc_out], ctx[out_name]

    results = []
    for kind, inputs in verify_sets.items():
        expected = run_qonnx(qonnx_model, inputs)
        hw = [run(child, x) for x in inputs]
        ideal = [run(reference, x) for x in inputs]
        results.append(compare(kind, np.stack([i[0] for i in ideal]), np.stack([h[0] for h in hw]),
                               final_expected=expected, final_actual=np.stack([h[1] for h in hw])))
    with atomic_output(verify_dir / "cppsim.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"results": [r.to_dict() for r in results],
                                   "layers": [e.to_dict() for e in plan]}, indent=2) + "\n")
    return results, plan
