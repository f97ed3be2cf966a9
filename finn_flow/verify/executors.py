"""The executors: the QONNX reference, FINN's Python execution, hls-arith and cppsim, run over the
verification sets and per-layer extreme inputs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.io import atomic_output
from finn_flow.environment import prepare_cppsim
from finn_flow.errors import FinnBuildError
from finn_flow.steps.accumulators import FINN_DOMAIN
from finn_flow.verify.compare import EXECUTORS, VerificationResult, compare
from finn_flow.verify.cppsim import NodeExecution, PythonFallback, plan_cppsim
from finn_flow.verify.exact import ExactEvaluation, ExactModel
from finn_flow.verify.graph_exec import GraphRunner, one_thread
from finn_flow.verify.hls_arith import (
    LayerExtremes,
    ToHlsArith,
    check_layer_extremes,
    extreme_cases,
    run_hls_arith_case,
)
from finn_flow.verify.inputs import progress, run_qonnx


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
    exact: ExactEvaluation | None = None  # None where the exact evaluation does not apply


class _Dataflow:
    """FINN's parent model (``dataflow_parent.onnx``) run with a given dataflow child model, as
    FINN's ``execute_parent`` runs it, each graph prepared once
    (:class:`finn_flow.verify.graph_exec.GraphRunner`)."""

    def __init__(self, output_dir: Path) -> None:
        self.parent = str(output_dir / "intermediate_models" / "dataflow_parent.onnx")
        self.reference = output_dir / "intermediate_models" / "step_create_dataflow_partition.onnx"
        parent_model = ModelWrapper(self.parent)
        partition = next(n for n in parent_model.graph.node
                         if n.op_type == "StreamingDataflowPartition")
        self.acc_out = partition.output[0]
        self.in_name = parent_model.graph.input[0].name
        self.out_name = parent_model.graph.output[0].name
        self.in_shape = parent_model.get_tensor_shape(self.in_name)
        self.runner = GraphRunner(parent_model)

    def run(self, child: Path, inputs: np.ndarray, label: str = ""
            ) -> tuple[np.ndarray, np.ndarray]:
        """``(accelerator outputs, model outputs)`` for every input (a progress bar on a
        terminal, described by ``label``)."""
        self.runner.set_partition(child, return_full_context=True)
        acc, final = [], []
        with one_thread():
            for x in progress(inputs, label):
                ctx = self.runner.run({self.in_name: x.reshape(self.in_shape)},
                                      return_full_context=True)
                acc.append(ctx[self.acc_out])
                final.append(ctx[self.out_name])
        return np.stack(acc), np.stack(final)


def reference_outputs(output_dir: Path, verify_sets: dict[str, np.ndarray],
                      qonnx_model: ModelWrapper) -> dict[str, Reference]:
    """Per input set, the outputs every executor is compared with (:class:`Reference`)."""
    flow = _Dataflow(output_dir)
    exact = _exact_model(qonnx_model)
    out = {}
    for kind, inputs in verify_sets.items():
        acc, final = flow.run(flow.reference, inputs, f"verify: FINN graph, {kind} inputs")
        out[kind] = Reference(qonnx=run_qonnx(qonnx_model, inputs, f"verify: QONNX, {kind} inputs"),
                              finn_accelerator=acc, finn_final=final,
                              exact=_evaluate(exact, inputs))
    return out


def _evaluate(exact: ExactModel | None, inputs: np.ndarray) -> ExactEvaluation | None:
    try:
        return None if exact is None else exact.evaluate(inputs)
    except ValueError:  # an input off a quantizer's grid where the evaluation assumed one
        return None


def _exact_model(qonnx_model: ModelWrapper) -> ExactModel | None:
    """The exact evaluation of the model (:mod:`finn_flow.verify.exact`), or None where its graph
    is beyond it (the comparison then stays with QONNX's float32 execution, and says so)."""
    try:
        return ExactModel(qonnx_model)
    except (ValueError, KeyError, StopIteration, TypeError):  # A2QInputError is a ValueError
        return None


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
        acc, final = flow.run(child, inputs, f"verify: {executor}, {kind} inputs")
        expected = ref.qonnx if ref.exact is None else ref.exact.outputs.reshape(ref.qonnx.shape)
        result = compare(kind, ref.finn_accelerator, acc, final_expected=expected,
                         final_actual=final, executor=executor, final_reference=ref.finn_final)
        if ref.exact is not None:
            result.reference = "exact"
            result.qonnx_float32_rounding = int(sum(ref.exact.float32_rounding.values()))
            result.qonnx_unexplained = int(sum(ref.exact.unexplained.values()))
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
    (:func:`finn_flow.verify.cppsim.plan_cppsim`); the plan is returned and written to
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
    arithmetic (:func:`finn_flow.verify.hls_arith.check_layer_extremes`; single-node cppsim is not run).
    Written to ``verification_output/layer_extremes.json``."""
    with one_thread():
        checks = check_layer_extremes(model)
    verify_dir = output_dir / "verification_output"
    verify_dir.mkdir(exist_ok=True)
    with atomic_output(verify_dir / "layer_extremes.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps({"executor": "hls-arith", "single_node_cppsim": False,
                                   "layers": [c.to_dict() for c in checks]}, indent=2) + "\n")
    return checks


def cppsim_layer_extremes(model: ModelWrapper, output_dir: Path) -> list[LayerExtremes]:
    """The per-layer extreme check under cppsim: every MVAU/VVAU alone (the inputs of
    :func:`finn_flow.verify.hls_arith.extreme_cases`), C++-simulated, against exact integer arithmetic,
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
    (:class:`finn_flow.verify.hls_arith.ToHlsArith`: every MVAU/VVAU accumulator and threshold comparison
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
