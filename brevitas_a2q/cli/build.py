"""``a2q build MODEL.onnx --out DIR``: a FINN build with accumulator widths proven from the A2Q
bound (see :mod:`finn_flow`). Every option, the model and the --verify-inputs array are checked
before FINN is imported (a --steps file is read after it, as it may import FINN) or a step runs."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from brevitas_a2q.cli.options import (
    ACC_BITS,
    HelpFormatter,
    bits_type,
    int_range,
    positive_float,
    positive_int,
)
from brevitas_a2q.errors import A2QInputError

DESCRIPTION = """\
Build a QONNX model written by brevitas_a2q's export with FINN. Each MVAU/VVAU accumulator is set
to its tightest proven width and checked against the target P the layer was trained for; reports
go to DIR. Needs FINN (FINN+ from PyPI, or the Docker image). The build runs in a temporary
directory beside DIR, renamed to DIR when it succeeds: a failed or interrupted build leaves no DIR
(a failed FINN step leaves its log as DIR.failed-build.log).

exit status: 0 built (and verified, with --verify), 1 a check failed (a layer's exact range
exceeds its target P, or a verification mismatch), 2 bad input, 3 internal error, 130 interrupted"""


def add_parser(subparsers) -> None:
    """Register ``a2q build``."""
    parser = subparsers.add_parser(
        "build", help="build an exported QONNX model with FINN (proven accumulator widths)",
        description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("model", type=Path, help="QONNX model file (.onnx)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--board", help="FINN board name, e.g. Pynq-Z1 or ZCU104 (without --board "
                        "and --fpga-part, estimates are for Pynq-Z1's part; --outputs bitfile "
                        "needs --board given)")
    target.add_argument("--fpga-part", help="FPGA part, e.g. xc7z020clg400-1 (estimates only)")
    parser.add_argument("--clk-ns", type=positive_float, default=10.0,
                        help="target clock period in ns (default: %(default)s)")
    fold = parser.add_mutually_exclusive_group()
    fold.add_argument("--target-fps", type=positive_int,
                      help="let FINN choose folding for this rate (default: fully folded)")
    fold.add_argument("--folding-config", type=Path, help="FINN folding configuration JSON")
    parser.add_argument("--outputs", nargs="+", default=["estimate"],
                        choices=["estimate", "stitched_ip", "bitfile"],
                        help="what to build; stitched_ip and bitfile need Vivado "
                             "(default: estimate)")
    parser.add_argument("--verify", nargs="*", default=[], choices=["cppsim", "hls-arith"],
                        help="cppsim: C++ simulation of the HLS code (needs finn-hlslib); "
                             "hls-arith: FINN's dataflow graph with every MVAU/VVAU accumulator "
                             "and threshold comparison at its accDataType in two's complement, "
                             "a model of finn-hlslib's arithmetic (no finn-hlslib needed; cppsim "
                             "stays the authority where it runs). Each is compared bit-exactly "
                             "with FINN's exact graph and the QONNX model, and every MVAU/VVAU is "
                             "checked alone at its accumulators' extremes")
    parser.add_argument("--verify-inputs", type=Path, metavar="NPY",
                        help=".npy array of real inputs for --verify, shaped like the model's "
                             "input with any batch size")
    parser.add_argument("--random-inputs", type=int_range(0), default=100, metavar="COUNT",
                        help="random inputs for --verify (default: %(default)s)")
    parser.add_argument("--force-accumulator-bits", type=bits_type(ACC_BITS), metavar="B",
                        help="impose this width on every layer instead of the proven one; "
                             "below a layer's proven width (its exact range) it is refused "
                             "unless --allow-overflow-demo")
    parser.add_argument("--allow-overflow-demo", action="store_true",
                        help="UNSAFE: accept --force-accumulator-bits below the proven widths, "
                             "to demonstrate that --verify catches the overflow; such layers "
                             "are marked FORCED below their exact range in the reports")
    parser.add_argument("--input-type", metavar="TYPE",
                        help="declare the model input integer (a qonnx datatype, e.g. UINT8 for "
                             "8-bit images), as FINN's image flows do: needed where the first "
                             "layer reads the float input directly (a float stem); verification "
                             "inputs are then drawn from that type")
    parser.add_argument("--steps", metavar="FILE.py:NAME",
                        help="your FINN step list (step names and step(model, cfg) functions) "
                             "instead of FINN's defaults, from a Python file or module "
                             "(my_build.py:STEPS or my_package.steps:STEPS); finn_flow's own "
                             "steps are inserted where they belong")
    parser.add_argument("--overwrite", action="store_true", help="build into a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true",
                        help="show FINN's console output (its steps and, when a step fails, its "
                             "traceback); without it FINN's output goes to its log only "
                             "(DIR/build_dataflow.log)")
    parser.set_defaults(func=run)


def _input_shape(model) -> tuple[int, ...]:
    graph = model.graph
    if len(graph.input) != 1:
        raise A2QInputError(f"FINN builds need a model with one input; this one has "
                            f"{len(graph.input)}")
    shape = model.get_tensor_shape(graph.input[0].name)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise A2QInputError(f"the model's input {graph.input[0].name!r} has no fixed shape "
                            f"({shape}); export it with a concrete example input")
    return tuple(shape)


def load_verify_inputs(path: Path, shape: tuple[int, ...]):
    """The --verify-inputs array, checked against the model's input ``shape`` (any count)."""
    import numpy as np

    from brevitas_a2q.io import check_input_file

    check_input_file(path, "--verify-inputs")
    try:
        inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise A2QInputError(f"--verify-inputs {path} is not a .npy array ({err})") from None
    if not isinstance(inputs, np.ndarray) or not np.issubdtype(inputs.dtype, np.number):
        raise A2QInputError(f"--verify-inputs {path} must hold one numeric array")
    bad = ~np.isfinite(inputs)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise A2QInputError(f"--verify-inputs {path} holds {int(bad.sum())} values that are not "
                            f"finite numbers (NaN or infinity), the first at index {first}: "
                            "give finite inputs")
    per_input = shape[1:] if shape[0] == 1 else shape
    # like finn_flow, each input may come flattened: its size must match
    if inputs.ndim < 1 or len(inputs) == 0 or \
            int(np.prod(inputs.shape[1:])) != int(np.prod(per_input)):
        raise A2QInputError(
            f"--verify-inputs {path} has shape {tuple(inputs.shape)}, but the model takes inputs "
            f"of shape {shape}: give an array of shape (count, {', '.join(map(str, per_input))})")
    return inputs


def load_steps(spec: str) -> list:
    """The step list ``NAME`` of a Python file (``path.py:NAME``) or module (``pkg.mod:NAME``)."""
    from brevitas_a2q.io import import_source
    from finn_flow.errors import FinnUnavailableError
    from finn_flow.finn_compat import import_builder

    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise A2QInputError(f"--steps {spec!r}: give FILE.py:NAME or MODULE:NAME")
    with contextlib.suppress(FinnUnavailableError):  # reported when the build needs FINN
        import_builder()  # FINN imported with its fixes (finn_compat) before the file imports it
    module = import_source(source, f"--steps {spec!r}", "--steps")
    steps = getattr(module, name, None)
    if not isinstance(steps, (list, tuple)) or not steps or not all(
            isinstance(s, str) or callable(s) for s in steps):
        raise A2QInputError(f"--steps {spec!r}: {name} must be a non-empty list of FINN step names "
                            "and step(model, cfg) functions")
    return list(steps)


def _check(args: argparse.Namespace):
    """Everything that can be checked without FINN; returns the --verify-inputs array."""
    from brevitas_a2q.cli.report import load_qonnx
    from brevitas_a2q.io import check_input_file, check_output_dir
    from finn_flow.options import check_brevitas_export, load_folding_config

    if "bitfile" in args.outputs and args.board is None:
        raise A2QInputError("--outputs bitfile needs --board (e.g. Pynq-Z1)")
    if args.verify_inputs is not None and not args.verify:
        raise A2QInputError("--verify-inputs needs --verify cppsim or --verify hls-arith")
    if args.allow_overflow_demo and args.force_accumulator_bits is None:
        raise A2QInputError("--allow-overflow-demo needs --force-accumulator-bits B")
    if args.folding_config is not None:
        check_input_file(args.folding_config, "--folding-config")
        load_folding_config(args.folding_config)
    check_output_dir(args.out)
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise A2QInputError(f"--out {args.out} is not empty; pass --overwrite to build into it")
    model = load_qonnx(args.model)
    check_brevitas_export(model, args.model)
    shape = _input_shape(model)
    if args.verify_inputs is not None:
        return load_verify_inputs(args.verify_inputs, shape)
    return None


def run(args: argparse.Namespace) -> int:
    """Check, build, print the summary; exit 1 if a target is violated or verification failed."""
    import sys

    from brevitas_a2q.cli import one_line
    from brevitas_a2q.errors import AccumulatorOverflowError

    inputs = _check(args)
    steps = load_steps(args.steps) if args.steps else None
    try:
        result = _build(args, inputs, steps)
    except AccumulatorOverflowError as err:  # a check failed (as a2q report says), not bad input
        print(f"a2q build: target VIOLATED: {one_line(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.reports["summary"].read_text())
        if result.verification:
            print(result.verification_summary())
        print(f"reports in {result.output_dir}")
    return 0 if result.verified is not False else 1


def _build(args: argparse.Namespace, inputs, steps):
    from finn_flow import build

    return build(
        args.model, args.out, board=args.board, fpga_part=args.fpga_part, clk_ns=args.clk_ns,
        target_fps=args.target_fps,
        folding_config=str(args.folding_config) if args.folding_config else None,
        outputs=args.outputs, verify=args.verify, verify_inputs=inputs,
        random_count=args.random_inputs, force_accumulator_bits=args.force_accumulator_bits,
        steps=steps, overwrite=args.overwrite, verbose=args.verbose,
        allow_overflow_demo=args.allow_overflow_demo, input_type=args.input_type)
