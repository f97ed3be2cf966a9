"""``a2q report MODEL.onnx``: accumulator widths of any QONNX model, checked against its targets.

For each accumulating node (MatMul/Conv/Gemm with quantized weights) it prints the width needed by
the exact range, the A2Q and A2Q+ L1 bounds and data types alone, and the recorded target ``P``
(files written by :func:`brevitas_a2q.export_qonnx`; ``--target`` for other files). Exit status:
0 all targets hold, 1 a target is violated, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import onnx
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.io import atomic_output, check_writable
from brevitas_a2q.qonnx_analysis import AccumulatorReport, analyze_accumulators

__all__ = ["add_parser", "format_report", "load_qonnx", "report_model", "run"]


def load_qonnx(path: str | os.PathLike) -> ModelWrapper:
    """Load an ONNX file as a qonnx ``ModelWrapper``, with a clear error for what is not one."""
    path = Path(path)
    if not path.is_file():
        raise A2QInputError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends
        raise A2QInputError(f"{path} is not an ONNX model ({type(err).__name__}: {err})") from err
    if not proto.graph.node:
        raise A2QInputError(f"{path} is not an ONNX model with a graph (no nodes)")
    return ModelWrapper(proto)


def _parse_targets(specs: list[str]) -> tuple[int | None, dict[str, int]]:
    default, named = None, {}
    for spec in specs:
        name, _, bits = spec.rpartition("=")
        try:
            value = int(bits)
        except ValueError:
            raise A2QInputError(f"--target {spec!r}: expected P or NAME=P with P a whole number "
                                "of bits") from None
        if value < 1 or value > 64:
            raise A2QInputError(f"--target {spec!r}: P must be between 1 and 64")
        if name:
            named[name] = value
        else:
            default = value
    return default, named


def report_model(model: ModelWrapper, targets: list[str] = (), name: str = "model"
                 ) -> AccumulatorReport:
    """Analyze ``model``; ``targets`` (``"P"`` or ``"NODE_OR_LAYER=P"``) apply to nodes the file
    records no target for. Raises :class:`A2QInputError` if it has no quantized accumulator."""
    report = analyze_accumulators(model)
    if not report:
        raise A2QInputError(f"{name} has no accumulating node with quantized weights (MatMul, "
                            "Conv or Gemm fed by a weight Quant node or an integer-annotated "
                            "initializer): nothing to analyze. Is it a quantized (QONNX) model?")
    default, named = _parse_targets(list(targets))
    known = {r.node for r in report} | {r.layer for r in report if r.layer}
    unknown = sorted(set(named) - known)
    if unknown:
        raise A2QInputError(f"--target names {unknown} match no accumulating node or layer; "
                            f"known: {sorted(known)}")
    for r in report:
        target = named.get(r.layer, named.get(r.node, default))
        if r.target_bits is None and target is not None:
            r.target_bits = target
            r.target_holds = r.bits_exact_range <= target
    return report


def format_report(model: ModelWrapper | str | os.PathLike, targets: list[str] = ()) -> str:
    """The report as text (table + verdict), e.g. for ``a2q demo`` to print after exporting."""
    if not isinstance(model, ModelWrapper):
        model = load_qonnx(model)
    report = report_model(model, targets)
    return f"{report.table()}\n{_verdict(report)}"


def _verdict(report: AccumulatorReport) -> str:
    bad = [r.layer or r.node for r in report
           if r.target_holds is False or r.bound_holds is False]
    if bad or report.unmatched_records:
        return f"VIOLATED: {', '.join(bad) or 'records without a matching node'}"
    checked = sum(r.target_bits is not None for r in report)
    return f"ok: {checked} of {len(report)} accumulators checked against a target, all hold"


def _plot(report: AccumulatorReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r.layer or r.node for r in report]
    x = np.arange(len(report))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(report) + 2), 3.5))
    ax.bar(x - 0.27, [r.bits_datatype for r in report], 0.27, label="data-type bound")
    ax.bar(x, [r.bits_exact_range for r in report], 0.27, label="proven (exact range)")
    ax.bar(x + 0.27, [r.target_bits or 0 for r in report], 0.27, label="target P")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("accumulator bits")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_writable(args.plot, args.overwrite)
    model = load_qonnx(args.model)
    report = report_model(model, args.target, name=str(args.model))
    if args.plot is not None:
        _plot(report, Path(args.plot))
    if args.json:
        print(report.to_json(indent=2))
    else:
        print(report.table())
        print(_verdict(report))
    return 0 if report.all_hold else 1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="accumulator widths of a QONNX model, checked against its targets",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="QONNX (.onnx) file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="bar chart per layer: data-type width vs proven width vs target")
    parser.add_argument("--target", action="append", default=[], metavar="[NAME=]P",
                        help="target accumulator bits for nodes without a recorded target "
                             "(all, or one node/layer by name); repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    parser.set_defaults(func=run)
