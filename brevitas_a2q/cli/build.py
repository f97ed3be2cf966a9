"""``a2q build MODEL.onnx --out DIR``: a FINN build with accumulator widths proven from the A2Q
bound (see :mod:`finn_flow`)."""

from __future__ import annotations

import argparse
import json

import numpy as np

from brevitas_a2q.errors import A2QInputError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "build", help="build an exported QONNX model with FINN (proven accumulator widths)",
        description="Build a QONNX model written by brevitas_a2q's export with FINN. Each MVAU/VVAU "
                    "accumulator is set to its tightest proven width and checked against the "
                    "target P the layer was trained for; reports go to DIR. Needs FINN "
                    "(the Docker image has it).")
    parser.add_argument("model", help="QONNX model file (.onnx)")
    parser.add_argument("--out", required=True, help="output directory")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--board", help="FINN board name (default Pynq-Z1)")
    target.add_argument("--fpga-part", help="FPGA part, e.g. xc7z020clg400-1")
    parser.add_argument("--clk-ns", type=float, default=10.0, help="target clock period (ns)")
    fold = parser.add_mutually_exclusive_group()
    fold.add_argument("--target-fps", type=int, help="let FINN choose folding for this rate")
    fold.add_argument("--folding-config", help="FINN folding configuration JSON")
    parser.add_argument("--outputs", nargs="+", default=["estimate"],
                        choices=["estimate", "stitched_ip", "bitfile"],
                        help="what to build (stitched_ip and bitfile need Vivado)")
    parser.add_argument("--verify", nargs="*", default=[], choices=["cppsim"],
                        help="cppsim: C++ simulation compared bit-exactly with the QONNX model")
    parser.add_argument("--verify-inputs", help=".npy file of real inputs for --verify")
    parser.add_argument("--random-inputs", type=int, default=20,
                        help="random inputs for --verify (default 20)")
    parser.add_argument("--force-accumulator-bits", type=int,
                        help="UNSAFE: impose this width on every layer without proof "
                             "(to show that --verify catches overflow)")
    parser.add_argument("--overwrite", action="store_true", help="build into a non-empty --out")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true", help="show FINN's step output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finn_flow import build

    inputs = None
    if args.verify_inputs:
        try:
            inputs = np.load(args.verify_inputs)
        except (OSError, ValueError) as err:
            raise A2QInputError(f"cannot read --verify-inputs {args.verify_inputs}: {err}") from err
    result = build(
        args.model, args.out, board=args.board, fpga_part=args.fpga_part, clk_ns=args.clk_ns,
        target_fps=args.target_fps, folding_config=args.folding_config, outputs=args.outputs,
        verify=args.verify, verify_inputs=inputs, random_count=args.random_inputs,
        force_accumulator_bits=args.force_accumulator_bits, overwrite=args.overwrite,
        verbose=args.verbose)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.reports["summary"].read_text())
        if result.verification:
            print(result.verification_summary())
        print(f"reports in {result.output_dir}")
    return 0 if result.verified is not False else 1
