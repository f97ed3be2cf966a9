"""Bit-exact verification of FINN's dataflow graph against FINN's exact execution and the QONNX model.

Two executors run the accelerator's dataflow graph at the widths set:

* ``cppsim`` (:func:`verify_cppsim`): the HLS layers compiled with g++
  (:func:`finn_flow.environment.prepare_cppsim`) against finn-hlslib and executed by FINN: the real
  HLS code, the authority where finn-hlslib is available;
* ``hls-arith`` (:func:`verify_hls_arith`): FINN's dataflow graph with every MVAU/VVAU
  accumulator and threshold comparison computed at its accDataType in two's complement, a model of
  finn-hlslib's arithmetic (:mod:`finn_flow.hls_arith`) that needs no finn-hlslib and runs in CI.

Each is compared bit-exactly with FINN's Python execution of the same graph before specialization
and width setting (exact integer arithmetic), and the model outputs with the QONNX model the build
started from (qonnx). Random inputs rarely reach an accumulator's extremes (an overflowing
accumulator passes them), so the check also uses *extreme* inputs that drive the first
accumulating layer's accumulators to the ends of their range (:func:`extreme_inputs`), and checks
every MVAU/VVAU alone on inputs that reach each output channel's exact minimum and maximum
(:func:`verify_layer_extremes`). A mismatch is attributed to the first stage where outputs differ
(:func:`first_differences`): FINN's conversion, the widths set (hls-arith), or cppsim.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
from finn_flow.hls_arith import DESCRIPTION as HLS_ARITH_DESCRIPTION
from finn_flow.hls_arith import (
    LayerExtremes,
    ToHlsArith,
    check_layer_extremes,
    extreme_cases,
    run_hls_arith_case,
)

__all__ = [
    "EXECUTORS",
    "STAGE_CONVERSION",
    "STAGE_CPPSIM",
    "STAGE_WIDTHS",
    "Reference",
    "VerificationResult",
    "compare",
    "cppsim_layer_extremes",
    "extreme_inputs",
    "first_differences",
    "random_inputs",
    "reference_outputs",
    "run_qonnx",
    "verify_cppsim",
    "verify_hls_arith",
    "verify_layer_extremes",
]

ACCUMULATING_OP_TYPES = ("MatMul", "Gemm", "Conv")
EXECUTORS = {"cppsim": "C++ simulation of the HLS code FINN generates, compiled with g++ against "
                       "finn-hlslib",
             "hls-arith": HLS_ARITH_DESCRIPTION}
# where the outputs first differ, in the order the flow produces them
STAGE_CONVERSION = ("QONNX model vs FINN's graph before specialization "
                    "(FINN's conversion/streamlining)")
STAGE_WIDTHS = "FINN's graph vs the dataflow graph at the widths set (hls-arith)"
STAGE_CPPSIM = "cppsim (the compiled HLS code)"
FLOAT_TAIL_TOLERANCE = 1e-5  # relative, for the float ops FINN leaves after the integer layers


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
    executor: str = "cppsim"  # "cppsim" or "hls-arith"
    # FINN's graph before specialization vs the QONNX model (beyond float-tail rounding)
    reference_mismatched_indices: list[int] = field(default_factory=list)
    reference_max_rel_diff: float | None = None
    final_mismatched_indices: list[int] = field(default_factory=list)  # beyond float rounding
    # cppsim with hls-arith run too: inputs whose accelerator outputs agree bit for bit
    hls_arith_agreed: int | None = None

    @property
    def ok(self) -> bool:
        """Every accelerator output bit-exact, and the model outputs equal to the QONNX model's
        up to float rounding in FINN's float tail (relative 1e-5)."""
        tail_ok = self.final_max_rel_diff is None or \
            self.final_max_rel_diff <= FLOAT_TAIL_TOLERANCE
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


def _rel_diffs(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per input, max |expected - actual| relative to max |expected| over the whole set."""
    fe = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    fa = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    scale = max(float(np.max(np.abs(fe))), 1e-30) if fe.size else 1.0
    return np.max(np.abs(fe - fa), axis=1) / scale if fe.size else np.zeros(len(fe))


def compare(kind: str, expected: np.ndarray, actual: np.ndarray,
            final_expected: np.ndarray | None = None,
            final_actual: np.ndarray | None = None, *, executor: str = "cppsim",
            final_reference: np.ndarray | None = None) -> VerificationResult:
    """Bit-exact comparison of the accelerator's integer outputs (``actual``) with the exact
    integer arithmetic of the same graph (``expected``). ``final_*``: the model outputs after
    the float tail FINN leaves outside the accelerator, against the QONNX model, which may differ
    by float rounding only (reported as ``final_max_rel_diff``). ``final_reference``: the model
    outputs of FINN's graph before specialization, compared with the QONNX model the same way
    (``reference_*``: where FINN's conversion already changed the result)."""
    expected = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    actual = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    same = np.all(expected == actual, axis=1)
    diff = float(np.max(np.abs(expected - actual))) if expected.size else 0.0
    result = VerificationResult(kind=kind, inputs=len(expected), matched=int(same.sum()),
                                max_abs_diff=diff,
                                mismatched_indices=[int(i) for i in np.flatnonzero(~same)],
                                executor=executor)
    if final_expected is not None and final_actual is not None:
        fe = np.asarray(final_expected, dtype=np.float64).reshape(len(final_expected), -1)
        fa = np.asarray(final_actual, dtype=np.float64).reshape(len(final_actual), -1)
        rel = _rel_diffs(fe, fa)
        result.final_max_rel_diff = float(np.max(rel)) if rel.size else 0.0
        result.final_mismatched_indices = [int(i) for i in
                                           np.flatnonzero(rel > FLOAT_TAIL_TOLERANCE)]
        result.final_argmax_agree = int((fe.argmax(1) == fa.argmax(1)).sum())
    if final_expected is not None and final_reference is not None:
        rel = _rel_diffs(final_expected, final_reference)
        result.reference_max_rel_diff = float(np.max(rel)) if rel.size else 0.0
        result.reference_mismatched_indices = [
            int(i) for i in np.flatnonzero(rel > FLOAT_TAIL_TOLERANCE)]
    return result


def first_differences(results: list[VerificationResult]) -> dict[str, dict[str, int]]:
    """Per input set (``kind``), how many inputs first differ at each stage, in the flow's
    order: :data:`STAGE_CONVERSION` (FINN's graph before specialization already differs from the
    QONNX model), :data:`STAGE_WIDTHS` (hls-arith differs from FINN's exact graph), cppsim (differs
    where hls-arith, if it ran, agreed). Sets without differences are absent."""
    out: dict[str, dict[str, int]] = {}
    for kind in dict.fromkeys(r.kind for r in results):
        same_kind = [r for r in results if r.kind == kind]
        by_executor = {r.executor: r for r in same_kind}
        conversion = set().union(*(r.reference_mismatched_indices for r in same_kind))
        widths = set(by_executor["hls-arith"].mismatched_indices) \
            if "hls-arith" in by_executor else set()
        cppsim = set(by_executor["cppsim"].mismatched_indices) \
            if "cppsim" in by_executor else set()
        cppsim_stage = ("hls-arith vs " if "hls-arith" in by_executor
                        else "FINN's graph vs ") + STAGE_CPPSIM
        tail = set().union(*(r.final_mismatched_indices for r in same_kind))
        counts = {STAGE_CONVERSION: len(conversion), STAGE_WIDTHS: len(widths - conversion),
                  cppsim_stage: len(cppsim - conversion - widths),
                  "the float tail after the accelerator (model output vs QONNX)":
                      len(tail - conversion - widths - cppsim)}
        counts = {stage: n for stage, n in counts.items() if n}
        if counts:
            out[kind] = counts
    return out


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


@dataclass
class Reference:
    """One input set's outputs of the QONNX model and of FINN's graph before specialization
    (``step_create_dataflow_partition.onnx``: exact integer arithmetic): the accelerator's output
    and the model output after FINN's float tail."""

    qonnx: np.ndarray
    finn_accelerator: np.ndarray
    finn_final: np.ndarray


class _Dataflow:
    """FINN's parent model (``dataflow_parent.onnx``) run with a given dataflow child model."""

    def __init__(self, output_dir: Path) -> None:
        self.parent = str(output_dir / "intermediate_models" / "dataflow_parent.onnx")
        self.reference = output_dir / "intermediate_models" / "step_create_dataflow_partition.onnx"
        parent_model = ModelWrapper(self.parent)
        partition = next(n for n in parent_model.graph.node
                         if n.op_type == "StreamingDataflowPartition")
        self.acc_out = partition.output[0]
        self.out_name = parent_model.graph.output[0].name
        self.in_shape = parent_model.get_tensor_shape(parent_model.graph.input[0].name)

    def run(self, child: Path, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(accelerator outputs, model outputs)`` for every input."""
        acc, final = [], []
        for x in inputs:
            ctx = execute_parent(self.parent, str(child), x.reshape(self.in_shape),
                                 return_full_ctx=True)
            acc.append(ctx[self.acc_out])
            final.append(ctx[self.out_name])
        return np.stack(acc), np.stack(final)


def reference_outputs(output_dir: Path, verify_sets: dict[str, np.ndarray],
                      qonnx_model: ModelWrapper) -> dict[str, Reference]:
    """Per input set, the outputs every executor is compared with (:class:`Reference`)."""
    flow = _Dataflow(output_dir)
    out = {}
    for kind, inputs in verify_sets.items():
        acc, final = flow.run(flow.reference, inputs)
        out[kind] = Reference(qonnx=run_qonnx(qonnx_model, inputs), finn_accelerator=acc,
                              finn_final=final)
    return out


def _compare_sets(executor: str, child: Path, output_dir: Path,
                  verify_sets: dict[str, np.ndarray], reference: dict[str, Reference],
                  outputs: dict[str, np.ndarray] | None = None,
                  agree_with: dict[str, np.ndarray] | None = None) -> list[VerificationResult]:
    """Run ``child`` on every set and compare; ``outputs`` (if given) receives the accelerator
    outputs per set, ``agree_with`` (another executor's) sets ``hls_arith_agreed``."""
    flow = _Dataflow(output_dir)
    results = []
    for kind, inputs in verify_sets.items():
        ref = reference[kind]
        acc, final = flow.run(child, inputs)
        result = compare(kind, ref.finn_accelerator, acc, final_expected=ref.qonnx,
                         final_actual=final, executor=executor, final_reference=ref.finn_final)
        if outputs is not None:
            outputs[kind] = acc
        if agree_with is not None and kind in agree_with:
            other = agree_with[kind].reshape(len(acc), -1)
            result.hls_arith_agreed = int(np.all(other == acc.reshape(len(acc), -1),
                                                 axis=1).sum())
        results.append(result)
    return results


def verify_cppsim(model: ModelWrapper, output_dir: Path, verify_sets: dict[str, np.ndarray],
                  qonnx_model: ModelWrapper, reference: dict[str, Reference] | None = None,
                  hls_arith_outputs: dict[str, np.ndarray] | None = None
                  ) -> tuple[list[VerificationResult], list[NodeExecution]]:
    """C++-simulate a copy of the dataflow graph ``model`` and compare it bit-exactly, per input
    set, with FINN's Python execution of the same graph before specialization and width setting
    (exact integer arithmetic, no wrap-around); the model outputs are compared with the QONNX
    model (``reference``: those outputs, if already computed by :func:`reference_outputs`;
    ``hls_arith_outputs``: hls-arith's accelerator outputs, to count bit-for-bit agreement).
    Layers the available finn-hlslib cannot compile run in Python
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
    if reference is None:
        reference = reference_outputs(output_dir, verify_sets, qonnx_model)
    results = _compare_sets("cppsim", child, output_dir, verify_sets, reference,
                            agree_with=hls_arith_outputs)
    with atomic_output(verify_dir / "cppsim.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"executor": "cppsim", "description": EXECUTORS["cppsim"],
                                   "results": [r.to_dict() for r in results],
                                   "layers": [e.to_dict() for e in plan]}, indent=2) + "\n")
    return results, plan


def verify_layer_extremes(model: ModelWrapper, output_dir: Path) -> list[LayerExtremes]:
    """Every MVAU/VVAU of the dataflow graph ``model`` alone, on inputs reaching each output
    channel's exact accumulator minimum and maximum, under hls-arith against exact integer
    arithmetic (:func:`finn_flow.hls_arith.check_layer_extremes`; single-node cppsim is not run).
    Written to ``verification_output/layer_extremes.json``."""
    checks = check_layer_extremes(model)
    verify_dir = output_dir / "verification_output"
    verify_dir.mkdir(exist_ok=True)
    with atomic_output(verify_dir / "layer_extremes.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"executor": "hls-arith", "single_node_cppsim": False,
                                   "layers": [c.to_dict() for c in checks]}, indent=2) + "\n")
    return checks


def cppsim_layer_extremes(model: ModelWrapper, output_dir: Path) -> list[LayerExtremes]:
    """The per-layer extreme check under cppsim: every MVAU/VVAU alone (the inputs of
    :func:`finn_flow.hls_arith.extreme_cases`), C++-simulated, against exact integer arithmetic,
    and compared with hls-arith on the same inputs (``hls_arith_agreed``). The accumulator itself
    is not observable in cppsim, so ``wrapped_channels`` stays empty: a wrap hidden by the
    thresholds shows only under hls-arith. Call inside :func:`finn_flow.finn_compat.build_session`
    (each node is compiled with g++). Appended to ``verification_output/layer_extremes.json``."""
    from finn.transformation.fpgadataflow.compile_cppsim import CompileCppSim
    from finn.transformation.fpgadataflow.prepare_cppsim import PrepareCppSim
    from finn.transformation.fpgadataflow.set_exec_mode import SetExecMode
    from qonnx.core.onnx_exec import execute_onnx

    prepare_cppsim(output_dir / "finn_build")
    verify_dir = output_dir / "verification_output"
    verify_dir.mkdir(exist_ok=True)
    checks = []
    for case in extreme_cases(model):
        hls, hls_out = run_hls_arith_case(case)
        sim = ModelWrapper(copy.deepcopy(case.single.model)).transform(PrepareCppSim())
        with _stderr_to(verify_dir / "compile.log"):
            sim = sim.transform(CompileCppSim())
        missing = _executables_missing(sim)
        if missing:
            raise FinnBuildError("g++ did not build the C++ simulation of " + "; ".join(missing)
                                 + f"; the compiler's messages are in {verify_dir / 'compile.log'}")
        sim = sim.transform(SetExecMode("cppsim"))
        node = sim.graph.node[0]
        actual = execute_onnx(sim, {node.input[0]: case.feed})[node.output[0]]
        actual = np.asarray(actual, dtype=np.float64).reshape(len(case.expected), -1)
        checks.append(dataclasses.replace(
            hls, executor="cppsim", wrapped_channels=[],
            output_mismatches=int((~np.all(actual == case.expected, axis=1)).sum()),
            hls_arith_agreed=int(np.all(actual == hls_out, axis=1).sum())))
    path = verify_dir / "layer_extremes.json"
    saved = json.loads(path.read_text()) if path.exists() else {"layers": []}
    saved["single_node_cppsim"] = True
    saved["layers"] = [c for c in saved["layers"] if c.get("executor") != "cppsim"] + \
        [c.to_dict() for c in checks]
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(saved, indent=2) + "\n")
    return checks


def verify_hls_arith(model: ModelWrapper, output_dir: Path, verify_sets: dict[str, np.ndarray],
                     qonnx_model: ModelWrapper, reference: dict[str, Reference] | None = None,
                     layer_extremes: list[LayerExtremes] | None = None,
                     outputs: dict[str, np.ndarray] | None = None
                     ) -> tuple[list[VerificationResult], list[LayerExtremes]]:
    """Execute a copy of the dataflow graph ``model`` with finn-hlslib's accumulator arithmetic
    (:class:`finn_flow.hls_arith.ToHlsArith`: every MVAU/VVAU accumulator and threshold comparison
    at its accumulator type in two's complement, every other layer FINN's Python model) and compare
    it as :func:`verify_cppsim` does; also the per-layer extreme check
    (:func:`verify_layer_extremes`, unless given); ``outputs`` (if given) receives the
    accelerator outputs per input set. Writes ``verification_output/hls_arith.json``
    and the converted graph ``hls_arith_dataflow.onnx`` beside it. ``model`` is not changed."""
    convert = ToHlsArith()
    child_model = ModelWrapper(copy.deepcopy(model.model)).transform(convert)
    verify_dir = output_dir / "verification_output"
    verify_dir.mkdir(exist_ok=True)
    child = verify_dir / "hls_arith_dataflow.onnx"
    child_model.save(str(child))
    if reference is None:
        reference = reference_outputs(output_dir, verify_sets, qonnx_model)
    results = _compare_sets("hls-arith", child, output_dir, verify_sets, reference, outputs)
    if layer_extremes is None:
        layer_extremes = verify_layer_extremes(model, output_dir)
    layers = [{"node": name, "op_type": op, "accumulator_type": acc, "acc_datatype": adt}
              for name, (op, acc, adt) in convert.layers.items()]
    with atomic_output(verify_dir / "hls_arith.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"executor": "hls-arith", "description": EXECUTORS["hls-arith"],
                                   "results": [r.to_dict() for r in results],
                                   "modeled_layers": layers,
                                   "layer_extremes": [c.to_dict() for c in layer_extremes]},
                                  indent=2) + "\n")
    return results, layer_extremes
