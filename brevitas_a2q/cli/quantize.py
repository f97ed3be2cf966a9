"""``a2q quantize FLOAT_CHECKPOINT|MODULE:FN --acc-bits P --out DIR``: accumulator-aware
post-training quantization (:mod:`brevitas_a2q.ptq`) of a float model, with the audit, the exact
QONNX export and, with ``--build``, the FINN build with verification."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from brevitas_a2q.cli.options import (
    ACC_BITS,
    ACT_BITS,
    WEIGHT_BITS,
    HelpFormatter,
    bits_type,
    layer_bits,
    paragraphs,
    positive_int,
)
from brevitas_a2q.errors import A2QInputError

PTQ_STATE_FORMAT = "brevitas_a2q.ptq.state/1"

DESCRIPTION = paragraphs(
    "Quantize a trained float model to this package's A2Q/A2Q+ weights at target accumulator "
    "widths, without training: activation scales from calibration images (Brevitas's "
    "calibration_mode), then, layer by layer, an error-correcting greedy rounding (GPFQ/OPTQ-"
    "style, as Brevitas's AXE) whose every step stays within the exact integer L1 budget of the "
    "layer's target P, so the integer weights provably fit P (checked exactly afterwards, with "
    "the accumulator audit), and a short bias/BatchNorm correction.",
    "SOURCE is a float checkpoint of `a2q train --quant float` (the quantized model is then the "
    "same CNN/MLP, and DIR/model.pt a checkpoint that `a2q evaluate` reads), or MODULE:FN / "
    "FILE.py:FN, a function returning a float nn.Module whose Conv1d/Conv2d/Linear layers "
    "Brevitas's layer swapping replaces (each gets a signed input quantizer: 8 bits for the "
    "first, --act-bits for the others; DIR/model.pt then holds the state dict for "
    "brevitas_a2q.ptq.layerwise_a2q applied to FN()).",
    "DIR receives model.pt, model.onnx (exact QONNX export with per-layer accumulator records, "
    "for a2q report and a2q build) and results.json (settings, per-layer rounding, the audit, "
    "float and quantized test accuracy). It is written beside DIR and renamed when complete: an "
    "error or Ctrl-C leaves no DIR. --build then runs the FINN build into DIR/build with "
    "--verify hls-arith on calibration images and random inputs.",
    "exit status: 0 every target holds (and, with --build, the build verified bit-exact), 1 a "
    "check failed, 2 bad input, 3 internal error, 130 interrupted")

EXAMPLES = """\
examples:
  a2q train --quant float --out float-run
  a2q quantize float-run/model.pt --acc-bits 12 --out ptq-run
  a2q quantize float-run/model.pt --acc-bits 12 --layer-acc-bits conv1=16 --out ptq-run --build
  a2q quantize mypkg.models:make_net --dataset fashion-mnist --acc-bits 14 --out ptq-net"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``a2q quantize``."""
    p = subparsers.add_parser(
        "quantize", help="post-training quantization of a float model to proven accumulator "
                         "widths (no training)",
        description=DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("source", metavar="FLOAT_CHECKPOINT|MODULE:FN",
                   help="float checkpoint (a2q train --quant float), or a function returning a "
                        "float nn.Module (pkg.module:fn or file.py:fn)")
    p.add_argument("--acc-bits", type=bits_type(ACC_BITS), default=16, metavar="P",
                   help="target accumulator width of every layer (default: %(default)s)")
    p.add_argument("--layer-acc-bits", type=layer_bits, nargs="+", default=[], metavar="NAME=P",
                   help="per-layer targets, e.g. conv1=16 fc=20")
    p.add_argument("--quant", default="a2q+", choices=["a2q", "a2q+"],
                   help="weight quantizer and bound: A2Q (L1 norm) or A2Q+ (zero-centred, about "
                        "twice the budget) (default: %(default)s)")
    p.add_argument("--weight-bits", type=bits_type(WEIGHT_BITS), default=4, metavar="M",
                   help="(default: %(default)s)")
    p.add_argument("--act-bits", type=bits_type(ACT_BITS), default=4, metavar="N",
                   help="hidden activation bits (default: %(default)s)")
    p.add_argument("--calib", type=positive_int, default=512, metavar="N",
                   help="calibration images from the training split (default: %(default)s)")
    p.add_argument("--dataset", choices=["digits", "fashion-mnist", "mnist"], default=None,
                   help="data set for calibration and the test accuracy (default: the "
                        "checkpoint's; digits for MODULE:FN)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory with the IDX files (fashion-mnist, mnist)")
    p.add_argument("--objective", default="gpfq", choices=["gpfq", "optq"],
                   help="gpfq: match the float layer's output (corrects earlier layers' error); "
                        "optq: match the float weights on the quantized inputs "
                        "(default: %(default)s)")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="skip the bias/BatchNorm correction")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration subset and the digits split (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--build", action="store_true",
                   help="then build DIR/model.onnx with FINN into DIR/build, verified with "
                        "hls-arith (needs FINN)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------------------------
# inputs


def _is_factory(source: str) -> bool:
    head, sep, fn = source.rpartition(":")
    return bool(sep and head and fn.isidentifier() and not Path(source).exists())


def load_factory(spec: str):
    """The function ``FN`` of ``MODULE:FN`` or ``FILE.py:FN``."""
    from brevitas_a2q.io import import_source

    source, _, name = spec.rpartition(":")
    module = import_source(source, spec, "model file")
    factory = getattr(module, name, None)
    if not callable(factory):
        raise A2QInputError(f"{spec}: {source} has no function {name!r}")
    return factory


def _float_from_factory(spec: str):
    from torch import nn

    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as err:
        raise A2QInputError(f"{spec}: calling {spec.rpartition(':')[2]}() failed: "
                            f"{type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise A2QInputError(f"{spec} returned a {type(model).__name__}, not a torch nn.Module")
    return model.eval()


def _float_from_checkpoint(path: Path):
    from brevitas_a2q.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.kwargs.get("quant") != "float":
        raise A2QInputError(f"{path} holds a quantized model ({ckpt.kwargs.get('quant')}), not a "
                            "float one: give a checkpoint of `a2q train --quant float`")
    return ckpt


def _check_args(args: argparse.Namespace) -> None:
    from brevitas_a2q.io import check_output_dir

    if args.data_dir is not None and args.dataset == "digits":
        raise A2QInputError("--data-dir is for IDX data sets (fashion-mnist, mnist); digits "
                            "ships with scikit-learn")
    check_output_dir(args.out)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise A2QInputError(f"--out {args.out} is not empty; pass --overwrite to replace it or "
                            "choose another --out")
    if not _is_factory(args.source):
        from brevitas_a2q.io import check_input_file

        if not Path(args.source).exists():
            raise A2QInputError(f"{args.source} is neither an existing float checkpoint nor "
                                "MODULE:FN / FILE.py:FN")
        check_input_file(Path(args.source), "float checkpoint")


# ----------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> int:
    """Check, quantize, write DIR atomically, optionally build; see the module docstring."""
    _check_args(args)
    import torch

    torch.set_num_threads(args.threads)
    prepared = _prepare(args)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=_parent(args.out)))
    try:
        results = _quantize(args, prepared, tmp)
        _publish(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["files"] = {name: str(args.out / name) for name in ("model.pt", "model.onnx",
                                                                 "results.json")}
    status = 0 if results["audit"]["all_hold"] else 1
    if args.build and status == 0:
        results["build"], status = _build(args, prepared)
    _print(args, results)
    return status


def _parent(out: Path) -> Path:
    parent = Path(os.path.abspath(out)).parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (replacing an old ``out`` only now)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=_parent(out)))
        os.replace(out, old / "dir")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _prepare(args: argparse.Namespace) -> dict:
    """Float model, quantized model (not yet rounded), data, names and settings."""
    import copy

    from brevitas_a2q.cli.train import layer_names
    from brevitas_a2q.ptq.convert import layerwise_a2q, quantized_twin
    from brevitas_a2q.train.models import copy_float_weights

    overrides = dict(args.layer_acc_bits)
    if _is_factory(args.source):
        float_model = _float_from_factory(args.source)
        dataset = args.dataset or "digits"
        model = layerwise_a2q(copy.deepcopy(float_model), args.quant, args.weight_bits,
                              args.act_bits, args.acc_bits, layer_acc_bits=overrides)
        spec = None
    else:
        ckpt = _float_from_checkpoint(Path(args.source))
        float_model, dataset = ckpt.model, ckpt.dataset
        if args.dataset is not None and args.dataset != dataset:
            raise A2QInputError(f"--dataset {args.dataset}: {args.source} was trained on "
                                f"{dataset}; drop --dataset or pass --dataset {dataset}")
        hidden = ckpt.kwargs.get("hidden", [64])
        names = layer_names(argparse.Namespace(arch=ckpt.arch, hidden=hidden))
        _check_override_names(overrides, names)
        model, kwargs = quantized_twin(ckpt.arch, ckpt.kwargs, args.quant, args.weight_bits,
                                       args.act_bits, args.acc_bits, overrides, float_model)
        copy_float_weights(float_model, model)
        spec = {"arch": ckpt.arch, "kwargs": kwargs}
    if args.data_dir is not None and dataset == "digits":
        raise A2QInputError("--data-dir is for IDX data sets (fashion-mnist, mnist); this model "
                            "uses digits")
    train, test = _load_data(dataset, args)
    return {"float": float_model.eval(), "model": model, "spec": spec, "dataset": dataset,
            "train": train, "test": test, "calibration": _calibration(train, args)}


def _check_override_names(overrides: dict, names: tuple[str, ...]) -> None:
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise A2QInputError(f"--layer-acc-bits names unknown layer(s) {unknown}; the layers of "
                            f"this model are {', '.join(names)}")


def _load_data(dataset: str, args: argparse.Namespace):
    from brevitas_a2q.train.data import load_dataset

    return load_dataset(dataset, args.data_dir, seed=args.seed)


def _calibration(train, args: argparse.Namespace):
    import torch

    if args.calib > len(train):
        raise A2QInputError(f"--calib {args.calib}: the training split has only {len(train)} "
                            "images")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    return torch.stack([train[int(i)][0] for i in pick[:args.calib]])


def _quantize(args: argparse.Namespace, prepared: dict, tmp: Path) -> dict:
    """Round, audit, evaluate and write model.pt, model.onnx and results.json into ``tmp``."""
    import torch

    from brevitas_a2q.export.qonnx import export_qonnx
    from brevitas_a2q.ptq.pipeline import quantize_weights
    from brevitas_a2q.train.checkpoint import save_checkpoint
    from brevitas_a2q.train.loop import accuracy

    model, calib = prepared["model"], prepared["calibration"]
    result = quantize_weights(model, prepared["float"], calib, objective=args.objective,
                              correct_bias=not args.no_bias_correction,
                              progress=not args.no_progress and not args.json)
    settings = {"source": str(args.source), "dataset": prepared["dataset"], "quant": args.quant,
                "weight_bits": args.weight_bits, "act_bits": args.act_bits,
                "acc_bits": args.acc_bits, "layer_acc_bits": dict(args.layer_acc_bits),
                "calibration_images": len(calib), "seed": args.seed, **result.settings}
    float_acc, quant_acc = accuracy(prepared["float"], prepared["test"]), \
        accuracy(model, prepared["test"])
    results = {"settings": settings, "float_accuracy": float_acc, "test_accuracy": quant_acc,
               "rounding": result.to_dict()["rounding"], "audit": result.report.to_dict()}
    if prepared["spec"] is not None:
        save_checkpoint(tmp / "model.pt", model, prepared["spec"]["arch"],
                        prepared["spec"]["kwargs"], prepared["dataset"],
                        {"ptq": settings, "float_accuracy": float_acc,
                         "test_accuracy": quant_acc})
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"format": PTQ_STATE_FORMAT, "source": str(args.source),
                    "settings": settings, "state_dict": state}, tmp / "model.pt")
    export_qonnx(model, calib[:1], tmp / "model.onnx")
    (tmp / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _build(args: argparse.Namespace, prepared: dict) -> tuple[dict, int]:
    """``finn_flow.build`` of DIR/model.onnx into DIR/build with hls-arith verification on 16
    calibration images and 16 random inputs; exit status 0 if verified bit-exact, else 1."""
    from brevitas_a2q.errors import AccumulatorOverflowError
    from finn_flow import build

    inputs = prepared["calibration"][:16].numpy()
    try:
        result = build(args.out / "model.onnx", args.out / "build", verify=["hls-arith"],
                       verify_inputs=inputs, random_count=16, overwrite=True)
    except AccumulatorOverflowError as err:
        return {"error": str(err), "verified": False}, 1
    summary = result.to_dict()
    return summary, 0 if result.verified else 1


def _print(args: argparse.Namespace, results: dict) -> None:
    if args.json:
        print(json.dumps(results, indent=2))
        return
    s = results["settings"]
    print(f"{s['quant']} W{s['weight_bits']}A{s['act_bits']}, P={s['acc_bits']}"
          + "".join(f", {k}={v}" for k, v in s["layer_acc_bits"].items())
          + f", {s['calibration_images']} calibration images of {s['dataset']}")
    print(f"test accuracy: {100 * results['test_accuracy']:.2f}% (float "
          f"{100 * results['float_accuracy']:.2f}%)")
    for r in results["rounding"]:
        print(f"  {r['layer']}: P={r['target_bits']}, ||q||_1 <= {r['l1_norm_max']} "
              f"(budget floor(T) = {r['floor_t']}), output error {r['relative_error']:.3g}")
    print(results["audit"]["summary"])
    if "build" in results:
        b = results["build"]
        print("FINN build: " + ("verified bit-exact (hls-arith)" if b.get("verified") else
                                f"NOT verified: {b.get('error', b.get('verified'))}"))
    print(f"wrote {args.out}")

