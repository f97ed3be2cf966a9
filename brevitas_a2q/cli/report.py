"""a2q report MODEL.onnx: accumulator widths of any QONNX model, checked against its targets.

For each accumulating node (MatMul/Conv/Gemm with quantized weights) it prints the width needed by
the exact range, the A2Q and A2Q+ L1 bounds and data types alone, and the target P: the one the
file records (files written by brevitas_a2q.export_qonnx), or the one given with --target, which
wins over the record (P from 2 to 64). A layer without a target is not checked, and the verdict
says so.

Exit status: 0 every checked target holds (at least one was checked), 1 a target is violated,
2 bad input, including a model with nothing to check (no quantized accumulator, or no target:
the table is still printed), 3 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from brevitas_a2q.cli.options import HelpFormatter, paragraphs
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.io import atomic_output, check_input_file, check_writable

__all__ = ["add_parser", "format_report", "load_qonnx", "parse_targets", "report_model", "run"]

MIN_TARGET_BITS, MAX_TARGET_BITS = 2, 64  # as a2q train --acc-bits and the records


def load_qonnx(path: str | os.PathLike):
    """Load an ONNX file as a qonnx ``ModelWrapper``, with a clear error for what is not one."""
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper

    path = check_input_file(path, "model")
    if path.stat().st_size == 0:
        raise A2QInputError(f"model {path} is empty (0 bytes), not an ONNX model")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends
        raise A2QInputError(f"{path} is not an ONNX model ({type(err).__name__}: {err})") from err
    if not proto.graph.node:
        raise A2QInputError(f"{path} is not an ONNX model with a graph (no nodes)")
    return ModelWrapper(proto)


def parse_targets(specs: list[str]) -> tuple[int | None, dict[str, int]]:
    """``["12", "conv1=8"]`` -> ``(12, {"conv1": 8})``: a default P and per-name targets."""
    default, named = None, {}
    for spec in specs:
        name, sep, bits = spec.rpartition("=")
        if sep and not name.strip():
            raise A2QInputError(f"--target {spec!r}: the layer name before '=' is empty; use "
                                "--target P (every node) or --target NAME=P")
        try:
            value = int(bits)
        except ValueError:
            raise A2QInputError(f"--target {spec!r}: expected P or NAME=P with P a whole number "
                                "of bits") from None
        if not MIN_TARGET_BITS <= value <= MAX_TARGET_BITS:
            raise A2QInputError(f"--target {spec!r}: P must be between {MIN_TARGET_BITS} and "
                                f"{MAX_TARGET_BITS}, got {value}")
        if sep:
            named[name] = value
        else:
            default = value
    return default, named


def _set_target(r, target: int) -> None:
    """Check ``r`` against ``target`` as a recorded target would be (exact range, and the L1
    bound of the variant the layer was trained with)."""
    r.target_bits = target
    r.target_holds = r.bits_exact_range <= target
    if r.variant == "a2q+":
        r.bound_holds = r.bits_a2q_plus_bound <= target
    elif r.variant == "a2q":
        r.bound_holds = r.bits_a2q_bound <= target
    else:
        r.bound_holds = None


def report_model(model, targets: list[str] = (), name: str = "model"):
    """Analyze ``model`` (a qonnx ``ModelWrapper``). ``targets`` (``"P"`` for every node or
    ``"NODE_OR_LAYER=P"``) override what the file records. Raises :class:`A2QInputError` if the
    model has no quantized accumulator or a target names no node or layer."""
    from brevitas_a2q.analysis.qonnx_analysis import analyze_accumulators

    default, named = parse_targets(list(targets))
    report = analyze_accumulators(model, source=name)
    if not report:
        raise A2QInputError(f"{name} has no accumulating node with quantized weights (MatMul, "
                            "Conv or Gemm fed by a weight Quant node or an integer-annotated "
                            "initializer): nothing to analyze. Is it a quantized (QONNX) model?")
    known = {r.node for r in report} | {r.layer for r in report if r.layer}
    unknown = sorted(set(named) - known)
    if unknown:
        raise A2QInputError(f"--target names {', '.join(unknown)}, which match no accumulating "
                            f"node or layer of {name}; known: {', '.join(sorted(known))}")
    report.overridden = {}
    for r in report:
        target = named.get(r.layer, named.get(r.node, default))
        if target is not None:
            if r.target_bits is not None and r.target_bits != target:
                report.overridden[r.layer or r.node] = (r.target_bits, target)
            _set_target(r, target)
    return report


def format_report(model, targets: list[str] = ()) -> str:
    """The report as text (table + verdict), e.g. for ``a2q demo`` to print after exporting.
    ``model`` is a ``ModelWrapper`` or a path."""
    if isinstance(model, (str, os.PathLike)):
        model = load_qonnx(model)
    report = report_model(model, targets)
    return f"{report.table()}\n{verdict(report)}"


def _warnings(report) -> list[str]:
    return list(getattr(report, "warnings", None) or [])


def verdict(report) -> str:
    """One or two lines: what was checked, what was not, and whether every checked target holds."""
    lines = [f"--target {new} replaces the recorded target {old} of {name}"
             for name, (old, new) in getattr(report, "overridden", {}).items()]
    bad = [r.layer or r.node for r in report
           if r.target_holds is False or r.bound_holds is False]
    unchecked, checked = report.unchecked, report.checked
    if bad or report.unmatched_records:
        lines.append(f"VIOLATED: {', '.join(bad) or 'records without a matching node'}")
    elif checked == 0:
        lines.append(f"NOTHING CHECKED: none of the {len(report)} accumulators has a target (the "
                     "file records none); pass --target P or --target LAYER=P to check them")
    else:
        lines.append(f"ok: {checked} of {len(report)} accumulators checked against a target, "
                     "every checked target holds")
    if unchecked and checked:
        lines.append(f"not checked (no target): {', '.join(unchecked)}")
    return "\n".join(lines)


def _json(report) -> dict:
    """The report's dict plus what the verdict says: how many accumulators were checked, which
    were not, which recorded targets --target replaced, and the verdict line itself."""
    return {**report.to_dict(), "overridden": {k: {"recorded": old, "target": new}
                           for k, (old, new) in getattr(report, "overridden", {}).items()},
            "warnings": _warnings(report), "verdict": verdict(report).splitlines()[-1]}


def _plot(report, path: Path, overwrite: bool) -> None:
    from brevitas_a2q.analysis.plots import accumulator_widths_plot

    fig = accumulator_widths_plot(report)
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Analyze, print, plot; exit 0/1 by the verdict."""
    parse_targets(args.target)  # malformed targets fail before the model is read
    if args.plot is not None:
        check_writable(args.plot, args.overwrite, suffix=".png", what="--plot")
    model = load_qonnx(args.model)
    report = report_model(model, args.target, name=str(args.model))
    if args.plot is not None:
        _plot(report, Path(args.plot), args.overwrite)
    if args.json:
        print(json.dumps(_json(report), indent=2))
    else:
        print(report.table())
        print(verdict(report))
    if report.violated:
        return 1
    if not report.checked:  # the widths are printed, but there is nothing to pass or fail
        raise A2QInputError(f"nothing checked: none of the {len(report)} accumulators of "
                            f"{args.model} has a target (the file records none); pass --target "
                            "P or --target LAYER=P to check them")
    return 0


def add_parser(subparsers) -> None:
    """Register ``a2q report``."""
    parser = subparsers.add_parser(
        "report", help="accumulator widths of a QONNX model, checked against its targets",
        description=paragraphs(*__doc__.split("\n\n")), formatter_class=HelpFormatter)
    parser.add_argument("model", type=Path, help="QONNX (.onnx) file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="bar chart per layer (.png): data-type bound, L1 bounds, proven "
                             "width and target; violations in red")
    parser.add_argument("--target", action="append", default=[], metavar="[NAME=]P",
                        help="target accumulator bits P (2 to 64), for every node (P) or one "
                             "node/layer (NAME=P); replaces the recorded target; repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    parser.set_defaults(func=run)
