"""FINN builds with per-layer accumulator widths proven from the A2Q bound.

:func:`build` drives FINN's ``build_dataflow_cfg`` with FINN's own steps (or a user's step list)
plus ours from :mod:`finn_flow.steps`: HLS variants for every layer, the proven accumulator widths
after ``step_minimize_bit_width`` and, when asked, the C++-simulation check. It runs inside
:func:`finn_flow.finn_compat.build_session`, so the process (environment, FINN+ settings, streams,
logging) is left as it was found, and works with FINN+ and upstream FINN dev alike.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.analysis.records import read_records
from brevitas_a2q.errors import A2QInputError
from finn_flow.environment import prepare_cppsim
from finn_flow.errors import FinnBuildError
from finn_flow.finn_compat import (
    FinnStepFailure,
    auto_folding_config,
    build_session,
    config_options,
    import_builder,
    run_build,
)
from finn_flow.options import (
    check_brevitas_export,
    check_float_inputs,
    check_forced_width,
    check_step_names,
    check_target,
    check_targets_hold,
    check_tools,
    declare_input_type,
    load_folding_config,
)
from finn_flow.steps.accumulators import LayerWidths
from finn_flow.steps.pipeline import insert_a2q_steps, make_accumulator_step, make_verify_step
from finn_flow.steps.preflight import check_activation_quantizers
from finn_flow.steps.report import totals, write_reports
from finn_flow.steps.streamline import check_residual_adds
from finn_flow.verify.compare import (
    EXECUTORS,
    STAGE_CPPSIM,
    STAGE_WIDTHS,
    VerificationResult,
    first_differences,
)
from finn_flow.verify.cppsim import NodeExecution
from finn_flow.verify.hls_arith import LayerExtremes
from finn_flow.verify.inputs import extreme_inputs, random_inputs

__all__ = ["OUTPUTS", "BuildResult", "FinnBuildError", "build"]

OUTPUTS = ("estimate", "stitched_ip", "bitfile")
VERIFY = tuple(EXECUTORS)  # "cppsim", "hls-arith" (descriptions in finn_flow.verify.EXECUTORS)


@dataclass
class BuildResult:
    """What :func:`build` produced."""

    output_dir: Path
    layers: list[LayerWidths]
    reports: dict[str, Path]
    verification: list[VerificationResult] = field(default_factory=list)
    cppsim_layers: list[NodeExecution] = field(default_factory=list)
    layer_extremes: list[LayerExtremes] = field(default_factory=list)

    @property
    def verified(self) -> bool | None:
        checks = [v.ok for v in self.verification] + [c.ok for c in self.layer_extremes]
        return None if not checks else all(checks)

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "layers": [w.to_dict() for w in self.layers],
                "totals": totals(self.layers), "reports": {k: str(v) for k, v in
                                                           self.reports.items()},
                "verification": [v.to_dict() for v in self.verification],
                "cppsim_layers": [e.to_dict() for e in self.cppsim_layers],
                "layer_extremes": [c.to_dict() for c in self.layer_extremes],
                "verified": self.verified}

    def verification_summary(self) -> str:
        """Plain-text lines: per executor and input set, how many accelerator outputs were
        bit-exact and, on a mismatch, at which stage the outputs first differ; the per-layer
        extreme check; which layers were C++-simulated and which ran in Python, and why."""
        if not self.verification and not self.layer_extremes:
            return "Verification: not run"
        lines = []
        firsts = first_differences(self.verification)
        for v in self.verification:
            lines.append(v.describe(firsts.get(v.kind, {})))
        if any(v.executor == "hls-arith" for v in self.verification):
            lines.append(f"hls-arith: {EXECUTORS['hls-arith']}")
        if self.layer_extremes:
            bad = [c for c in self.layer_extremes if not c.ok]
            executors = sorted({c.executor for c in self.layer_extremes})
            single_cppsim = "" if "cppsim" in executors else "; single-node cppsim not run"
            lines.append(f"Per-layer extremes ({len(self.layer_extremes) - len(bad)}/"
                         f"{len(self.layer_extremes)} checks ok; each MVAU/VVAU alone under "
                         f"{' and '.join(executors)} on inputs reaching every channel's exact "
                         "accumulator minimum and maximum, against exact integer arithmetic"
                         f"{single_cppsim}):")
            names = {w.finn_node: w.layer for w in self.layers}
            lines += [f"  {c.describe(names.get(c.node))}" for c in self.layer_extremes]
            if bad:
                first = [c for c in bad if c.executor == "hls-arith"]
                stage = STAGE_WIDTHS if first else f"FINN's exact arithmetic vs {STAGE_CPPSIM}"
                lines.append(f"Per-layer extremes first differ at {stage}: " + ", ".join(
                    f"{c.node} ({'layer ' + names[c.node] + ', ' if names.get(c.node) else ''}"
                    f"{c.accumulator_type}, needs {c.bits_exact} bits)"
                    for c in (first or bad)))
        simulated = [e.node for e in self.cppsim_layers if e.mode == "cppsim"]
        if self.cppsim_layers:
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


def _check_options(outputs: Sequence[str], verify: Sequence[str], board, fpga_part, *,
                   clk_ns: float, target_fps: int | None, random_count: int,
                   force_accumulator_bits: int | None) -> None:
    """Refuse bad options before any work, each naming the option (CLI spelling) and value."""
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
    if not clk_ns > 0:
        raise A2QInputError(f"--clk-ns must be a positive clock period in ns, got {clk_ns}")
    if target_fps is not None and target_fps < 1:
        raise A2QInputError(f"--target-fps must be at least 1, got {target_fps}")
    if random_count < 0:
        raise A2QInputError(f"--random-inputs must be 0 or more, got {random_count}")
    if force_accumulator_bits is not None and not 2 <= force_accumulator_bits <= 64:
        raise A2QInputError("--force-accumulator-bits must be between 2 and 64, got "
                            f"{force_accumulator_bits}")


def _check_model(model: ModelWrapper, path: Path) -> list:
    """The model's accumulator records, after checking that it is a quantized model FINN can
    take: one input, quantized layers (QONNX Quant nodes)."""
    graph = model.graph
    check_brevitas_export(model, path)
    if len(graph.input) != 1 or len(graph.output) < 1 or not graph.node:
        raise A2QInputError(f"{path}: FINN builds need a model with one input and nodes; this one "
                            f"has {len(graph.input)} inputs and {len(graph.node)} nodes")
    try:
        records = read_records(model)
    except ValueError as err:
        raise A2QInputError(f"{path}: {err}") from err
    if not records and not any(n.op_type in ("Quant", "BipolarQuant", "Trunc", "IntQuant")
                               for n in graph.node):
        raise A2QInputError(
            f"{path} has no quantization (no QONNX Quant nodes, no accumulator records): FINN "
            "would leave its layers outside the accelerator and no accumulator width could be "
            "proven. Export a quantized Brevitas model with brevitas_a2q.export_qonnx")
    check_residual_adds(model)  # an add FINN has no layer for, named before any FINN step
    check_activation_quantizers(model, str(path))  # quantizers FINN rejects or rounds otherwise
    return records


def _verify_sets(model: ModelWrapper, path: Path, random_count: int,
                 verify_inputs: np.ndarray | None) -> dict[str, np.ndarray]:
    """Random, real (checked against the model's input shape) and extreme inputs."""
    shape = tuple(model.get_tensor_shape(model.graph.input[0].name))
    sets = {"random": random_inputs(model, random_count)} if random_count else {}
    if verify_inputs is not None:
        real = np.asarray(verify_inputs, dtype=np.float32)
        per_input = shape[1:] if shape and shape[0] == 1 else shape
        if real.ndim < 1 or int(np.prod(real.shape[1:])) != int(np.prod(per_input)):
            raise A2QInputError(
                f"--verify-inputs has shape {real.shape}, but {path} takes inputs of shape "
                f"{shape}: give an array of shape (count, {', '.join(map(str, per_input))})")
        bad = ~np.isfinite(real)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise A2QInputError(
                f"--verify-inputs holds {int(bad.sum())} values that are not finite numbers (NaN "
                f"or infinity), the first at index {first}: give finite inputs")
        sets["real"] = real
    sets["extreme"] = extreme_inputs(model)
    return sets


def _generate_outputs(bdc, outputs: Sequence[str]) -> list:
    generate = [bdc.DataflowOutputType.ESTIMATE_REPORTS]
    if "stitched_ip" in outputs:
        generate.append(bdc.DataflowOutputType.STITCHED_IP)
    if "bitfile" in outputs:
        generate += [bdc.DataflowOutputType.BITFILE, bdc.DataflowOutputType.PYNQ_DRIVER,
                     bdc.DataflowOutputType.DEPLOYMENT_PACKAGE]
    return generate


def _finn_reports(out: Path) -> dict[str, Path]:
    """FINN's own estimate reports that exist in ``out/report``."""
    names = {"finn_estimates": "estimate_layer_resources.json",
             "finn_performance": "estimate_network_performance.json",
             "finn_cycles": "estimate_layer_cycles.json"}
    reports = {key: out / "report" / name for key, name in names.items()
               if (out / "report" / name).exists()}
    folding = auto_folding_config(out)
    if folding is not None:
        reports["finn_auto_folding"] = folding
    return reports


def _recording_errors(step: Callable, state: dict) -> Callable:
    """``step`` that keeps our own error in ``state`` (upstream FINN logs a failed step's exception
    and returns -1, so it would otherwise be lost)."""
    @functools.wraps(step)
    def wrapper(model, cfg):
        try:
            return step(model, cfg)
        except A2QInputError as err:
            state["error"] = err
            raise
    return wrapper


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
    random_count: int = 100,
    force_accumulator_bits: int | None = None,
    lut_estimates: bool = True,
    steps: Sequence | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    allow_overflow_demo: bool = False,
    input_type: str | None = None,
) -> BuildResult:
    """Build ``model_onnx`` (QONNX, as written by ``brevitas_a2q.export.export_qonnx``) with FINN
    into ``output_dir``.

    ``board`` (FINN board name, default Pynq-Z1 when no ``fpga_part`` is given) or ``fpga_part``;
    ``clk_ns`` target clock; ``target_fps`` or a FINN ``folding_config`` JSON for parallelism (default:
    fully folded); ``outputs`` among :data:`OUTPUTS` (``bitfile`` and ``stitched_ip`` need Vivado);
    ``verify`` among :data:`VERIFY`: ``"cppsim"`` (C++ simulation of the HLS code) and/or
    ``"hls-arith"`` (FINN's dataflow graph with every MVAU/VVAU accumulator and threshold
    comparison at its accDataType in two's complement, a model of finn-hlslib's arithmetic that
    needs no finn-hlslib; cppsim stays the authority where it runs), each compared bit-exactly with
    FINN's exact execution of the graph and with the QONNX model on ``random_count`` random inputs,
    on ``verify_inputs`` ("real") and on extreme inputs (:func:`finn_flow.verify.extreme_inputs`);
    with either, every MVAU/VVAU is also checked alone at each channel's accumulator extremes
    (:func:`finn_flow.verify.verify_layer_extremes`). ``steps``: a FINN step list (names and callables)
    to use instead of FINN's defaults; ours are inserted where they belong
    (:func:`finn_flow.steps.insert_a2q_steps`). ``force_accumulator_bits`` imposes a width on every
    layer without proof; below a layer's proven width (the exact range of its integer weights) it
    is refused unless ``allow_overflow_demo`` (to show that the check catches an overflowing
    model), and such layers are labelled in the reports. ``input_type`` (a qonnx integer datatype
    name, e.g. ``"UINT8"``) declares the model input integer, as FINN's image flows do, for a
    model whose first layer reads the float input directly (a float stem: "the input is already
    8-bit RGB"); verification inputs are then drawn from that type. ``verbose`` shows FINN's console output
    (its steps, and its traceback on a failure); FINN's log is written either way.

    Everything FINN would reject (board, FPGA part, folding file, step names, outputs needing
    Vivado) is checked before FINN starts (:mod:`finn_flow.options`). The build runs in a temporary
    directory beside ``output_dir`` and is renamed to it only when it succeeded: a failed or
    interrupted build leaves no output directory (a failed FINN step leaves its log as
    ``<output_dir>.failed-build.log``). Raises
    :class:`~brevitas_a2q.errors.AccumulatorOverflowError` if a layer does not fit its target
    (before FINN runs), :class:`FinnUnavailableError` without FINN, :class:`FinnBuildError` if a
    FINN step fails, ``KeyboardInterrupt`` when interrupted (also inside FINN, which catches it).
    """
    outputs, verify = tuple(outputs), tuple(verify)
    _check_options(outputs, verify, board, fpga_part, clk_ns=clk_ns, target_fps=target_fps,
                   random_count=random_count, force_accumulator_bits=force_accumulator_bits)
    path = Path(model_onnx).resolve()
    qonnx_model = _load(path)
    if input_type is not None:
        declare_input_type(qonnx_model, input_type)
    _check_model(qonnx_model, path)
    check_float_inputs(qonnx_model, path)
    analysis = check_targets_hold(qonnx_model, path)
    forced_below = check_forced_width(analysis, force_accumulator_bits, allow_overflow_demo)
    out = Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise A2QInputError(f"output directory {out} is a file")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise A2QInputError(f"output directory {out} is not empty; pass overwrite=True "
                            "(CLI: --overwrite) to build into it")
    if folding_config is not None:
        load_folding_config(folding_config)
    verify_sets = _verify_sets(qonnx_model, path, random_count, verify_inputs) \
        if verify else {}
    build_dataflow = import_builder()
    from finn.builder import build_dataflow_config as bdc

    check_target(board, fpga_part, outputs)
    check_tools(outputs)
    if steps is None:
        steps = (bdc.estimate_only_dataflow_steps if set(outputs) == {"estimate"}
                 else bdc.default_build_dataflow_steps)
    check_step_names(steps)
    state: dict = {}
    accumulators = make_accumulator_step(
        force_accumulator_bits, lut_estimates,
        on_result=lambda layers, reports: state.update(layers=layers, reports=reports))
    verify_step = make_verify_step(
        verify_sets, qonnx_model, executors=verify,
        on_result=lambda results, plan, extremes: state.update(
            verification=results, plan=plan, extremes=extremes)) if verify else None
    step_list = [_recording_errors(step, state) if callable(step) else step
                 for step in insert_a2q_steps(steps, accumulators=accumulators,
                                              verify=verify_step)]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with build_session(work / "finn_build", console=verbose):
            if "cppsim" in verify:
                prepare_cppsim(work / "finn_build")
            cfg = bdc.DataflowBuildConfig(
                output_dir=str(work), synth_clk_period_ns=clk_ns,
                board=board if board or fpga_part else "Pynq-Z1", fpga_part=fpga_part,
                shell_flow_type=bdc.ShellFlowType.VIVADO_ZYNQ, target_fps=target_fps,
                folding_config_file=None if folding_config is None else str(folding_config),
                generate_outputs=_generate_outputs(bdc, outputs), steps=step_list,
                save_intermediate_models=True, enable_build_pdb_debug=False, verbose=verbose,
                **config_options(bdc, verbose))
            finn_input = path
            if input_type is not None:  # FINN reads the model with its input declared integer
                finn_input = work / "model_input_declared.onnx"
                qonnx_model.save(str(finn_input))
            status, error = run_build(build_dataflow, str(finn_input), cfg)
        error = state.get("error", error)
        if isinstance(error, A2QInputError):  # ours, e.g. AccumulatorOverflowError: as raised
            raise error
        if status != 0:
            raise _finn_failure(work, out, error)
        result = _result(work, out, state)
        _finish_reports(result, work, force_accumulator_bits, forced_below)
    except BaseException:  # failed or interrupted: nothing that looks like a finished build
        shutil.rmtree(work, ignore_errors=True)
        raise
    _move_into_place(work, out)
    return _relocated(result, work, out)


def _result(work: Path, out: Path, state: dict) -> BuildResult:
    return BuildResult(output_dir=work, layers=state.get("layers", []),
                       reports={**state.get("reports", {}), **_finn_reports(work)},
                       verification=state.get("verification", []),
                       cppsim_layers=state.get("plan", []),
                       layer_extremes=state.get("extremes", []))


def _finish_reports(result: BuildResult, work: Path, force_bits: int | None,
                    forced_below: list[str]) -> None:
    """Rewrite the accumulator reports with what the finished build verified (the step wrote them
    before verification ran)."""
    if not result.layers:
        return
    written = json.loads(result.reports["json"].read_text()) if "json" in result.reports else {}
    extra = {"records": written.get("records"), "forced_bits": force_bits,
             "forced_below_proven": forced_below}
    result.reports.update(write_reports(result.layers, work, extra=extra,
                                        verification=_verification_line(result)))


def _verification_line(result: BuildResult) -> str:
    """One sentence for the reports: what the finished build verified."""
    if result.verified is None:
        return ("Verification: not run (build with --verify hls-arith or --verify cppsim to check "
                "the accelerator bit-exactly).")
    checks = len(result.verification) + len(result.layer_extremes)
    failed = sum(not v.ok for v in result.verification) + \
        sum(not c.ok for c in result.layer_extremes)
    executors = sorted({v.executor for v in result.verification})
    if failed:
        return (f"Verification ({', '.join(executors)}): FAILED, {failed} of {checks} checks "
                "mismatched (see the build summary).")
    return f"Verification ({', '.join(executors)}): all {checks} checks bit-exact."


def _finn_failure(work: Path, out: Path, error: Exception | None) -> FinnBuildError:
    """The error for a failed FINN step, naming the step and FINN's message, with FINN's log kept
    beside ``out`` (the partial build itself is removed)."""
    log = work / "build_dataflow.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    steps = re.findall(r"Running step: (\S+)", text)
    if isinstance(error, FinnStepFailure):
        reason = str(error)
    elif error is not None:
        reason = f"{type(error).__name__}: {error}"
    else:
        found = re.findall(r"FINN (?:INTERNAL COMPILER )?ERROR: (.*)", text)
        reason = found[-1].strip() if found else "FINN gave no reason"
    kept = out.parent / f"{out.name}.failed-build.log"
    if log.exists():
        shutil.copyfile(log, kept)
    where = f" in {steps[-1]}" if steps else ""
    log_note = f"; FINN's log: {kept}" if log.exists() else ""
    return FinnBuildError(f"the FINN build failed{where}: {reason}{log_note}")


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished build ``work`` to ``out``, replacing what ``out`` held (only reached
    with overwrite, or an empty ``out``)."""
    stale = out.parent / f".{out.name}.replaced-{os.getpid()}"
    if out.exists():
        out.rename(stale)
    work.rename(out)
    shutil.rmtree(stale, ignore_errors=True)
    failed_log = out.parent / f"{out.name}.failed-build.log"
    failed_log.unlink(missing_ok=True)  # from an earlier failed build of the same --out


def _relocated(result: BuildResult, work: Path, out: Path) -> BuildResult:
    """``result`` with its paths under ``out`` instead of the temporary build directory."""
    def moved(p: Path) -> Path:
        p = Path(p)
        return out / p.relative_to(work) if p.is_relative_to(work) else p

    result.output_dir = out
    result.reports = {k: moved(v) for k, v in result.reports.items()}
    return result
