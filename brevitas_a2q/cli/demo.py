"""``a2q demo``: train a small A2Q+ CNN on scikit-learn's digits, audit its accumulators, export it
to QONNX with its accumulator widths, report the exported file, and (where FINN is importable) build
it with FINN and check the accelerator bit-exactly: always with hls-arith (a model of finn-hlslib's
arithmetic), and in C++ simulation where g++ and finn-hlslib are available."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from brevitas_a2q.cli.options import (
    ACC_BITS,
    ACT_BITS,
    WEIGHT_BITS,
    HelpFormatter,
    bits_type,
    paragraphs,
    positive_int,
)
from brevitas_a2q.cli.train import QUANTS
from brevitas_a2q.errors import A2QInputError

# the demo's CNN is quantized end to end (its export and FINN build need integer layers)
DEMO_QUANTS = tuple(q for q in QUANTS if q != "float")


def add_parser(subparsers) -> None:
    """Register ``a2q demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="train a small accumulator-aware CNN on the bundled digits and audit it (offline)",
        description=paragraphs(
            "Train a W4A4 CNN with A2Q+ weights at a 12-bit accumulator target on scikit-learn's "
            "bundled 8x8 digits, print test accuracy and the accumulator report of every layer, "
            "export it to QONNX with its accumulator widths (OUT/model.onnx), report the "
            "exported file, and save a checkpoint (OUT/model.pt) for a2q evaluate. Where FINN "
            "is importable, also build the FINN estimate reports with proven accumulator widths "
            "(OUT/finn) and check the accelerator bit-exactly with hls-arith (a model of "
            "finn-hlslib's arithmetic that needs no Xilinx tools) and, only where g++ and "
            "finn-hlslib are available, in C++ simulation of the HLS code; the output says which "
            "checks ran and why any was skipped.",
            "exit status: 0 every target holds (and the FINN check passed), 1 a check failed, "
            "2 bad input, 3 internal error, 130 interrupted"),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--quant", default="a2q+", choices=DEMO_QUANTS,
                        help="weight quantizer (default: %(default)s)")
    parser.add_argument("--acc-bits", type=bits_type(ACC_BITS), default=12, metavar="P",
                        help="target accumulator bits P of every layer (default: %(default)s)")
    parser.add_argument("--weight-bits", type=bits_type(WEIGHT_BITS), default=4, metavar="M",
                        help="weight bits M (default: %(default)s)")
    parser.add_argument("--act-bits", type=bits_type(ACT_BITS), default=4, metavar="N",
                        help="hidden activation bits (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=8, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("a2q-demo"),
                        help="output directory (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier run in --out")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-finn", action="store_true",
                        help="skip the FINN build even where FINN is importable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, audit, export, report (and build with FINN where it is importable)."""
    from brevitas_a2q.io import check_output_dir

    check_output_dir(args.out)
    paths = {name: args.out / name for name in ("model.pt", "model.onnx", "results.json", "finn")}
    for path in paths.values():  # refuse before spending time on training
        if path.exists() and not args.overwrite:
            raise A2QInputError(f"{path} exists from an earlier run; pass --overwrite to replace "
                                "it or choose another --out")
        if path.name != "finn" and path.is_dir():
            raise A2QInputError(f"{path} is a directory; choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    return _run(args, paths)


def _run(args: argparse.Namespace, paths: dict[str, Path]) -> int:
    import torch

    from brevitas_a2q.analysis.audit import accumulator_report
    from brevitas_a2q.cli.report import format_report
    from brevitas_a2q.cli.train import report_warnings
    from brevitas_a2q.export.qonnx import export_qonnx
    from brevitas_a2q.io import atomic_output
    from brevitas_a2q.train.checkpoint import save_checkpoint
    from brevitas_a2q.train.data import load_digits
    from brevitas_a2q.train.loop import accuracy, train_epochs
    from brevitas_a2q.train.models import build_cnn

    torch.manual_seed(args.seed)
    train_set, test_set = load_digits(seed=args.seed)
    kwargs = dict(quant=args.quant, weight_bits=args.weight_bits, act_bits=args.act_bits,
                  acc_bits=args.acc_bits)
    model = build_cnn(**kwargs)
    start = time.perf_counter()
    train_epochs(model, train_set, args.epochs, seed=args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_set)
    example = test_set.tensors[0][:256]
    report = accumulator_report(model, example)
    save_checkpoint(paths["model.pt"], model, "cnn", kwargs, overwrite=args.overwrite)
    export_qonnx(model, example[:1], paths["model.onnx"], overwrite=args.overwrite)
    exported_report = format_report(paths["model.onnx"])
    finn_text, finn_ok = _finn(args, paths["model.onnx"], paths["finn"], example[:10])
    results = {
        **kwargs, "epochs": args.epochs, "train_seconds": round(seconds, 2),
        "test_accuracy": test_accuracy, "layers": report.to_dicts(),
        "all_targets_hold": report.all_hold, "warnings": report_warnings(report),
        "finn": {"ok": finn_ok, "summary": finn_text},
        "files": {k: str(v) for k, v in paths.items()},
    }
    ok = report.all_hold is not False and finn_ok  # None: no target to check (--quant none)
    with atomic_output(paths["results.json"], overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
        for warning in results["warnings"]:  # the table that shows them is not printed
            print(f"a2q demo: warning: {warning}", file=sys.stderr)
        return 0 if ok else 1
    print(f"trained {args.quant} CNN (W{args.weight_bits}A{args.act_bits}, P={args.acc_bits}) "
          f"on digits for {args.epochs} epochs in {seconds:.1f} s")
    print(f"test accuracy: {100 * test_accuracy:.2f}%\n")
    print("accumulators of the trained Brevitas model (P = target, widths in signed bits):")
    print(report.table())
    print(f"\nexported {paths['model.onnx']}; accumulators of the exported QONNX file:")
    print(exported_report)
    print(f"\n{finn_text}")
    print(f"\ncheckpoint: {paths['model.pt']} (try: a2q evaluate {paths['model.pt']} "
          "--accumulator int12-wrap int10-wrap)")
    return 0 if ok else 1


def _finn(args: argparse.Namespace, onnx_path: Path, out_dir: Path, inputs) -> tuple[str, bool]:
    """FINN estimate build + C++ simulation of the exported model, or a plain note of the skip."""
    if args.no_finn:
        return "FINN build SKIPPED (--no-finn)", True
    from finn_flow import demo_build

    return demo_build(onnx_path, out_dir, inputs.numpy(), overwrite=args.overwrite)
