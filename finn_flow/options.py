"""Build options and models checked against what FINN accepts, before FINN runs.

FINN checks its configuration deep inside a build: an unknown board when a step first resolves the
FPGA part, a folding file when ``step_apply_folding_config`` reads it, PE/SIMD with an
``assert`` in the layer's code, step names when the step list is resolved, Vivado when a step
calls it. Each function here refuses the same input up front with one line naming the option
(CLI spelling) and the fix (:class:`~brevitas_a2q.errors.A2QInputError`, exit status 2), except
:func:`check_folding_against_graph`, which needs FINN's graph and runs as a build step
(:func:`step_a2q_check_folding`) right before FINN applies the folding.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.errors import A2QInputError, AccumulatorOverflowError

__all__ = [
    "FOLDING_DIVISORS",
    "check_brevitas_export",
    "check_float_inputs",
    "check_folding_against_graph",
    "check_forced_width",
    "check_step_names",
    "check_target",
    "check_targets_hold",
    "check_tools",
    "declare_input_type",
    "load_folding_config",
    "step_a2q_check_folding",
]

# a Xilinx part number: family/device, package and speed grade (xc7z020clg400-1,
# xczu3eg-sbva484-1-e, xcu50-fsvh2104-2L-e, xcve2802-vsvh1760-2MP-e-S)
XILINX_PART = re.compile(r"^x[cqa][a-z0-9]+-?[a-z]{2,5}\d{3,4}-\d[a-z0-9]*(-[a-z0-9]+)*$", re.I)

# per FINN layer kind: folding attribute -> what it must divide (FINN's asserts in
# finn/custom_op/fpgadataflow/*.py: "Requirement MH divisable by PE", "SIMD must divide IFMChannels")
FOLDING_DIVISORS = {
    "MVAU": {"PE": ("MH",), "SIMD": ("MW",)},
    "VVAU": {"PE": ("Channels",), "SIMD": ("Kernel",)},  # Kernel: k_h * k_w
    "Thresholding": {"PE": ("NumChannels",)},
    "ConvolutionInputGenerator": {"SIMD": ("IFMChannels",)},
    "Pool": {"PE": ("Channels",)},
    "LabelSelect": {"PE": ("Labels",)},
}
OUTPUTS_NEEDING_VIVADO = ("stitched_ip", "bitfile")


def check_target(board: str | None, fpga_part: str | None, outputs: Sequence[str]) -> None:
    """``board`` must be one of FINN's boards (a bitfile: one its Zynq flow builds for) and
    ``fpga_part`` one of their parts or shaped like a Xilinx part number; a bitfile needs a
    board."""
    from finn_flow.finn_compat import board_parts, zynq_boards

    boards = board_parts()
    if board is not None and board not in boards:
        raise A2QInputError(f"--board {board!r} is not a board FINN knows; choose from "
                            f"{', '.join(boards)}, or give --fpga-part")
    if "bitfile" in outputs:
        if board is None:
            raise A2QInputError("--outputs bitfile needs --board (one of "
                                f"{', '.join(zynq_boards())}); --fpga-part alone has no shell")
        if board not in zynq_boards():
            raise A2QInputError(f"--outputs bitfile: --board {board} is not a Zynq board, which "
                                f"is what this flow builds bitfiles for; choose from "
                                f"{', '.join(zynq_boards())}")
    if fpga_part is not None and fpga_part not in boards.values() and \
            not XILINX_PART.match(fpga_part):
        raise A2QInputError(
            f"--fpga-part {fpga_part!r} is not an FPGA part FINN's boards use nor shaped like a "
            "Xilinx part number (device, package, speed grade, e.g. xc7z020clg400-1); give the "
            f"full part name, or --board (one of {', '.join(boards)})")


def check_tools(outputs: Sequence[str]) -> None:
    """Outputs that need Vivado (stitched IP, bitfiles) are refused where it is not set up."""
    from finn_flow.finn_compat import vivado_available

    needing = [o for o in outputs if o in OUTPUTS_NEEDING_VIVADO]
    if needing and not vivado_available():
        raise A2QInputError(
            f"--outputs {' '.join(needing)} needs Vivado (XILINX_VIVADO set and vivado on the "
            "PATH), which is not set up here; build them in the Docker image with the Xilinx "
            "tools mounted (README, \"FINN builds\"), or use --outputs estimate")


def load_folding_config(path: str | os.PathLike) -> dict:
    """The folding file as FINN's ``ApplyConfig`` reads it: a JSON object mapping node names
    (and ``Defaults``) to objects of node attributes, with PE and SIMD positive whole numbers."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise A2QInputError(f"--folding-config {path} cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise A2QInputError(f"--folding-config {path} is not valid JSON: {err.msg} at line "
                            f"{err.lineno}, column {err.colno}") from None
    if not isinstance(config, dict):
        raise A2QInputError(f"--folding-config {path} must hold a JSON object mapping FINN node "
                            "names to their attributes, e.g. {\"MVAU_hls_0\": {\"PE\": 2}}")
    for node, attrs in config.items():
        if not isinstance(attrs, dict):
            raise A2QInputError(f"--folding-config {path}: {node!r} must map to an object of node "
                                f"attributes, e.g. {{\"PE\": 2}}, not {json.dumps(attrs)}")
        if node == "Defaults":
            continue
        for name in ("PE", "SIMD"):
            value = attrs.get(name)
            if name in attrs and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
                raise A2QInputError(f"--folding-config {path}: {node} {name} must be a positive "
                                    f"whole number, got {json.dumps(value)}")
    return config


def _attr(node, name: str):
    from qonnx.util.basic import get_by_name

    a = get_by_name(node.attribute, name)
    if a is None:
        return None
    from onnx import helper

    return helper.get_attribute_value(a)


def check_folding_against_graph(model: ModelWrapper, config: dict, source: str) -> None:
    """Every PE/SIMD of ``config`` for a node of ``model`` must divide the dimension FINN requires
    (:data:`FOLDING_DIVISORS`); raise naming the node, the value and the values that fit."""
    nodes = {n.name: n for n in model.graph.node}
    for name, attrs in config.items():
        node = nodes.get(name)
        if node is None or not isinstance(attrs, dict):
            continue  # FINN ignores names its graph lacks
        rules = FOLDING_DIVISORS.get(node.op_type.split("_")[0], {})
        for attr, (dim_name,) in rules.items():
            if attr not in attrs:
                continue
            dim = _attr(node, dim_name)
            if dim is None:
                continue
            dim = int(dim[0] * dim[1]) if dim_name == "Kernel" else int(dim)
            value = int(attrs[attr])
            if dim % value:
                fits = [d for d in range(1, dim + 1) if dim % d == 0]
                what = "k_h*k_w" if dim_name == "Kernel" else dim_name
                raise A2QInputError(
                    f"--folding-config {source}: {name} {attr} = {value} does not divide its "
                    f"{what} = {dim} (FINN requires it); use one of {', '.join(map(str, fits))}")


def step_a2q_check_folding(model: ModelWrapper, cfg) -> ModelWrapper:
    """Before ``step_apply_folding_config``: the folding file's PE/SIMD against FINN's graph
    (:func:`check_folding_against_graph`), so a bad value fails with one line instead of an
    ``assert`` deep in FINN."""
    path = getattr(cfg, "folding_config_file", None)
    if path is not None:
        check_folding_against_graph(model, load_folding_config(path), str(path))
    return model


def check_step_names(steps: Sequence) -> None:
    """Every step given by name must be one FINN resolves: a FINN step name or an importable
    ``module.function``."""
    import importlib

    from finn_flow.finn_compat import step_names

    known = set(step_names())
    for step in steps:
        if not isinstance(step, str) or step in known:
            continue
        module, _, attr = step.rpartition(".")
        try:
            ok = bool(module) and callable(getattr(importlib.import_module(module), attr, None))
        except Exception:  # not importable: reported below
            ok = False
        if not ok:
            close = sorted(n for n in known if n.startswith(step[:9]) or step[5:] in n)[:5]
            hint = f" (did you mean {', '.join(close)}?)" if close and step.startswith("step_") \
                else ""
            raise A2QInputError(f"--steps: {step!r} is not a FINN step name nor an importable "
                                f"module.function{hint}; FINN's steps: {', '.join(sorted(known))}")


def check_brevitas_export(model: ModelWrapper, path: str | os.PathLike) -> None:
    """Refuse Brevitas's own QONNX export (``brevitas.export.export_qonnx``): it lists parameters
    as graph inputs, keeps float weights behind Quant nodes and carries no accumulator records,
    so FINN sees many inputs and no width could be checked."""
    from brevitas_a2q.analysis.records import METADATA_KEY

    graph = model.graph
    initialized = {i.name for i in graph.initializer}
    params_as_inputs = [i.name for i in graph.input if i.name in initialized]
    if model.get_metadata_prop(METADATA_KEY) is None and params_as_inputs:
        raise A2QInputError(
            f"{path} looks like Brevitas's own QONNX export (parameters such as "
            f"{params_as_inputs[0]!r} are graph inputs, and no accumulator records): export the "
            "model with brevitas_a2q.export_qonnx (or a2q train / a2q demo), which writes the "
            "records a build checks the widths against")


def check_targets_hold(model: ModelWrapper, path: str | os.PathLike):
    """The exported model's accumulators (:func:`brevitas_a2q.analysis.qonnx_analysis.
    analyze_accumulators`, exact range of the integer weights); raise
    :class:`~brevitas_a2q.errors.AccumulatorOverflowError` (a check failed: exit 1) for the first
    layer whose exact range exceeds its recorded target P."""
    from brevitas_a2q.analysis.qonnx_analysis import analyze_accumulators

    report = analyze_accumulators(model)
    for a in report:
        if a.target_holds is False:
            raise AccumulatorOverflowError(
                f"{path}: layer {a.layer!r} needs a {a.bits_exact_range}-bit accumulator for its "
                f"exact range [{a.exact_min}, {a.exact_max}], wider than its target P = "
                f"{a.target_bits}: the model is not overflow-safe at that width (a2q report "
                f"{path} shows every layer). Retrain with A2Q at P = {a.target_bits}, or export "
                "the layer with a wider target")
    return report


def check_forced_width(report, force_bits: int | None, allow_overflow_demo: bool) -> list[str]:
    """A forced width below a layer's proven width (exact range) is refused unless
    ``allow_overflow_demo``; returns the layers it is below (to label them)."""
    if force_bits is None:
        return []
    below = [f"{a.layer or a.node} (needs {a.bits_exact_range})" for a in report
             if a.bits_exact_range > force_bits]
    if below and not allow_overflow_demo:
        raise A2QInputError(
            f"--force-accumulator-bits {force_bits} is below the proven width of "
            f"{', '.join(below)}: those accumulators can overflow. Pass --allow-overflow-demo to "
            "build it anyway to demonstrate the overflow (with --verify), or force at least "
            f"{max(a.bits_exact_range for a in report)} bits")
    return below


def declare_input_type(model: ModelWrapper, input_type: str) -> None:
    """Annotate the graph input with the integer qonnx datatype ``input_type`` (``--input-type``),
    as FINN's image flows declare 8-bit image inputs: the model then builds with a first layer
    that reads the float input directly (a float stem), on inputs of that type."""
    from qonnx.core.datatype import DataType

    try:
        dtype = DataType[input_type.upper()]
    except KeyError:
        dtype = None
    if dtype is None or not dtype.is_integer() or dtype.bitwidth() > 32:
        raise A2QInputError(f"--input-type {input_type!r} is not an integer qonnx datatype of at "
                            "most 32 bits; use e.g. UINT8 (8-bit images) or INT8")
    model.set_tensor_datatype(model.graph.input[0].name, dtype)


def check_float_inputs(model: ModelWrapper, path: str | os.PathLike) -> None:
    """Refuse, naming the layer and the fix, a layer recorded at export with a float input (a float
    stem) whose input is still not integer: FINN builds integer inputs only."""
    from brevitas_a2q.analysis.qonnx_analysis import accumulating_nodes, node_input_datatype
    from brevitas_a2q.analysis.records import read_records, weight_fingerprint

    floats = {r.fingerprint: r.layer for r in read_records(model, str(path))
              if r.input_bits is None}
    for node, weights in accumulating_nodes(model) if floats else ():
        layer = floats.get(weight_fingerprint(weights.int_weights))
        if layer is None:
            continue
        try:
            node_input_datatype(model, node.input[0], node)
        except A2QInputError:
            raise A2QInputError(
                f"{path}: layer {layer!r} reads a float input (a float stem, no input quantizer), "
                "and FINN builds integer inputs only: if the model input only takes integer "
                "values, declare their type with --input-type (build(input_type=...)), e.g. "
                "UINT8 for 8-bit images, as FINN's image flows do; else quantize the input "
                "(input_quant=...)") from None
