"""FINN builds with per-layer accumulator widths proven from the A2Q bound.

:func:`build` drives FINN's ``build_dataflow_cfg`` with FINN's own steps plus three of ours (FINN
step callables ``step(model, cfg) -> model``):

* ``step_a2q_prefer_hls`` (before ``step_specialize_layers``): HLS variants for every layer, so
  FINN's LUT model costs the accumulators and the layers can be simulated in C++;
* ``step_a2q_accumulators`` (after ``step_minimize_bit_width``): :class:`SetProvenAccumulatorWidths`
  with the export records, then ``accumulators.json`` / ``.md`` / ``.png``;
* ``step_a2q_verify_cppsim`` (last, when asked): C++ simulation compared bit-exactly with the
  QONNX model (:mod:`finn_flow.verify`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.io import atomic_output
from brevitas_a2q.records import read_records
from finn_flow.accumulators import FINN_DOMAIN, LayerWidths, SetProvenAccumulatorWidths
from finn_flow.cppsim import NodeExecution, PythonFallback, plan_cppsim
from finn_flow.environment import import_finn, prepare_cppsim
from finn_flow.report import totals, write_reports
from finn_flow.verify import VerificationResult, compare, extreme_inputs, random_inputs, run_qonnx

__all__ = ["OUTPUTS", "BuildResult", "FinnBuildError", "build"]

OUTPUTS = ("estimate", "stitched_ip", "bitfile")
VERIFY = ("cppsim",)


class FinnBuildError(A2QInputError):
    """A FINN step failed; the message names the step log."""


@dataclass
class BuildResult:
    """What :func:`build` produced."""

    output_dir: Path
    layers: list[LayerWidths]
    reports: dict[str, Path]
    verification: list[VerificationResult] = field(default_factory=list)
    cppsim_layers: list[NodeExecution] = field(default_factory=list)

    @property
    def verified(self) -> bool | None:
        return None if not self.verification else all(v.ok for v in self.verification)

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "layers": [w.to_dict() for w in self.layers],
                "totals": totals(self.layers), "reports": {k: str(v) for k, v in
                                                           self.reports.items()},
                "verification": [v.to_dict() for v in self.verification],
                "cppsim_layers": [e.to_dict() for e in self.cppsim_layers],
                "verified": self.verified}

    def verification_summary(self) -> str:
        """Plain-text lines: per input set, how many accelerator outputs were bit-exact; which
        layers were C++-simulated and which ran in Python, and why."""
        if not self.verification:
            return "C++ simulation: not run"
        lines = []
        for v in self.verification:
            status = "bit-exact" if v.ok else "MISMATCH"
            rel = "-" if v.final_max_rel_diff is None else f"{v.final_max_rel_diff:.2g}"
            lines.append(f"cppsim {v.kind}: {v.matched}/{v.inputs} accelerator outputs bit-exact "
                         f"({status}; model output vs QONNX rel. diff {rel})")
        simulated = [e.node for e in self.cppsim_layers if e.mode == "cppsim"]
        lines.append(f"C++-simulated layers ({len(simulated)}): {', '.join(simulated)}")
        python = [e for e in self.cppsim_layers if e.mode == "python"]
        if python:
            lines.append(f"Not C++-simulated, executed by FINN in Python ({len(python)}):")
            groups: dict[str, list[str]] = {}
            for e in python:  # one line per reason
                groups.setdefault(e.reason, []).append(e.node)
            lines += [f"  {', '.join(nodes)}: {reason}" for reason, nodes in groups.items()]
        return "\n".join(lines)


def _load(model_onnx: str | os.PathLike) -> ModelWrapper:
    path = Path(model_onnx)
    if not path.is_file():
        raise A2QInputError(f"model file {path} does not exist")
    try:
        return ModelWrapper(str(path))
    except Exception as err:  # onnx raises several types for a bad file
        raise A2QInputError(f"{path} is not a readable ONNX model: {err}") from err


def _check_options(outputs: Sequence[str], verify: Sequence[str], board, fpga_part) -> None:
    for name in outputs:
        if name not in OUTPUTS:
            raise A2QInputError(f"unknown output {name!r}; choose from {', '.join(OUTPUTS)}")
    for name in verify:
        if name not in VERIFY:
            raise A2QInputError(f"unknown verification {name!r}; choose from {', '.join(VERIFY)}")
    if "bitfile" in outputs and board is None:
        raise A2QInputError("a bitfile needs --board (e.g. Pynq-Z1)")
    if board is not None and fpga_part is not None:
        raise A2QInputError("give a board or an FPGA part, not both")


def _lut_estimator():
    from finn_flow.luts import lut_estimate

    return lambda node, model: lut_estimate(node)


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
    from finn.util.test import execute_parent

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


def _make_steps(state: dict, records, force_bits, verify_sets, qonnx_model, output_dir: Path,
                lut_estimates: bool):
    """Our FINN steps, closing over the build's records and results (``state``)."""

    def step_a2q_prefer_hls(model, cfg):
        for node in model.graph.node:
            if node.domain == FINN_DOMAIN:
                attrs = [a for a in node.attribute if a.name == "preferred_impl_style"]
                for a in attrs:
                    node.attribute.remove(a)
                from onnx import helper
                node.attribute.append(helper.make_attribute("preferred_impl_style", "hls"))
        return model

    def step_a2q_accumulators(model, cfg):
        from qonnx.transformation.infer_datatypes import InferDataTypes

        transform = SetProvenAccumulatorWidths(
            records, force_bits=force_bits,
            lut_estimator=_lut_estimator() if lut_estimates else None)
        try:
            model = model.transform(transform)
        except A2QInputError as err:
            state["error"] = err
            raise
        model = model.transform(InferDataTypes())
        if lut_estimates:
            from finn_flow.luts import uncapped_lut_estimate

            nodes = {n.name: n for n in model.graph.node}
            for w in transform.layers:
                w.lut_int32_uncapped = uncapped_lut_estimate(nodes[w.finn_node], 32)
        state["layers"] = transform.layers
        state["reports"] = write_reports(transform.layers, output_dir,
                                         extra={"records": len(records),
                                                "forced_bits": force_bits})
        return model

    def step_a2q_verify_cppsim(model, cfg):
        results, plan = verify_cppsim(model, output_dir, verify_sets, qonnx_model)
        state["verification"], state["cppsim_plan"] = results, plan
        return model

    return step_a2q_prefer_hls, step_a2q_accumulators, step_a2q_verify_cppsim


def _steps(build_dataflow_config, outputs, verify, ours) -> list:
    prefer_hls, accumulators, verify_step = ours
    if set(outputs) == {"estimate"}:
        names = list(build_dataflow_config.estimate_only_dataflow_steps)
    else:
        names = list(build_dataflow_config.default_build_dataflow_steps)
    steps: list = []
    for name in names:
        if name == "step_specialize_layers":
            steps.append(prefer_hls)
        steps.append(name)
        if name == "step_minimize_bit_width":
            steps.append(accumulators)
    if "cppsim" in verify:
        at = steps.index("step_generate_estimate_reports") + 1
        steps.insert(at, verify_step)
    return steps


def build(
    model_onnx: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    board: str | None = None,
    fpga_part: str | None = None,
    clk_ns: float = 10.0,
    target_fps: int | None = None,
    folding_config: str | os.PathLike | None = None,
    outputs: Sequence[str] = ("estimate",),
    verify: Sequence[str] = (),
    verify_inputs: np.ndarray | None = None,
    random_count: int = 20,
    force_accumulator_bits: int | None = None,
    lut_estimates: bool = True,
    overwrite: bool = False,
    verbose: bool = False,
) -> BuildResult:
    """Build ``model_onnx`` (QONNX, as written by ``brevitas_a2q.export.export_qonnx``) with FINN
    into ``output_dir``.

    ``board`` (FINN board name, default Pynq-Z1 when no ``fpga_part`` is given) or ``fpga_part``;
    ``clk_ns`` target clock; ``target_fps`` or a FINN ``folding_config`` JSON for parallelism (default:
    fully folded); ``outputs`` among :data:`OUTPUTS` (``bitfile`` and ``stitched_ip`` need Vivado);
    ``verify=("cppsim",)`` compares C++ simulation with the QONNX model on random inputs, on
    ``verify_inputs`` ("real") and on extreme inputs (:func:`finn_flow.verify.extreme_inputs`).
    ``force_accumulator_bits`` imposes a width on every layer without proof (to show that the check
    catches an overflowing model). Raises :class:`~brevitas_a2q.errors.AccumulatorOverflowError` if
    a layer does not fit its target, :class:`FinnUnavailableError` without FINN.
    """
    outputs, verify = tuple(outputs), tuple(verify)
    _check_options(outputs, verify, board, fpga_part)
    qonnx_model = _load(model_onnx)
    try:
        records = read_records(qonnx_model)
    except ValueError as err:
        raise A2QInputError(f"{model_onnx}: {err}") from err
    out = Path(output_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise A2QInputError(f"output directory {out} is not empty; pass overwrite=True "
                            "(CLI: --overwrite) to build into it")
    build_dataflow = import_finn()
    from finn.builder import build_dataflow_config as bdc

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FINN_BUILD_DIR", str(out / "finn_build"))
    Path(os.environ["FINN_BUILD_DIR"]).mkdir(parents=True, exist_ok=True)
    verify_sets: dict[str, np.ndarray] = {}
    if "cppsim" in verify:
        prepare_cppsim(out / "finn_build")
        verify_sets["random"] = random_inputs(qonnx_model, random_count)
        if verify_inputs is not None:
            verify_sets["real"] = np.asarray(verify_inputs, dtype=np.float32)
        verify_sets["extreme"] = extreme_inputs(qonnx_model)
    state: dict = {}
    ours = _make_steps(state, records, force_accumulator_bits, verify_sets, qonnx_model, out,
                       lut_estimates)
    generate = [bdc.DataflowOutputType.ESTIMATE_REPORTS]
    if "stitched_ip" in outputs:
        generate.append(bdc.DataflowOutputType.STITCHED_IP)
    if "bitfile" in outputs:
        generate += [bdc.DataflowOutputType.BITFILE, bdc.DataflowOutputType.PYNQ_DRIVER,
                     bdc.DataflowOutputType.DEPLOYMENT_PACKAGE]
    cfg = bdc.DataflowBuildConfig(
        output_dir=str(out),
        synth_clk_period_ns=clk_ns,
        board=board if board or fpga_part else "Pynq-Z1",
        fpga_part=fpga_part,
        shell_flow_type=bdc.ShellFlowType.VIVADO_ZYNQ,
        target_fps=target_fps,
        folding_config_file=None if folding_config is None else str(folding_config),
        generate_outputs=generate,
        steps=_steps(bdc, outputs, verify, ours),
        save_intermediate_models=True,
        enable_build_pdb_debug=False,
        verbose=verbose,
    )
    status = build_dataflow.build_dataflow_cfg(str(Path(model_onnx).resolve()), cfg)
    if "error" in state:
        raise state["error"]
    if status != 0:
        raise FinnBuildError(f"the FINN build failed; see {out / 'build_dataflow.log'}")
    reports = dict(state.get("reports", {}))
    estimates = out / "report" / "estimate_layer_resources_hls.json"
    if estimates.exists():
        reports["finn_estimates"] = estimates
    return BuildResult(output_dir=out, layers=state.get("layers", []), reports=reports,
                       verification=state.get("verification", []),
                       cppsim_layers=state.get("cppsim_plan", []))
