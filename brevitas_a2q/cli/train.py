"""``a2q train``: train a small quantized CNN or MLP at a chosen accumulator width on digits,
Fashion-MNIST or MNIST, with checkpoints and resume; export it to QONNX with its accumulator
widths and print the accumulator report.

Recipe (A2Q, Colbert et al. ICCV 2023; A2Q+, Colbert et al. ICML 2024): optional float (or plain
QAT) pretraining, Euclidean-projection init onto each channel's L1 ball (``--ep-init``), then
quantization-aware training with Adam and a cosine schedule, plus ``--penalty`` times the A2Q
regularizer ``sum relu(g - s*T)``. Optionally fine-tunes under a simulated accumulator
(Blumenfeld et al., ICLR 2024; ``--finetune-accumulator``).

The recipe is the same for every method: ``--ep-init`` and ``--penalty`` apply to this package's
A2Q/A2Q+ and to Brevitas's built-in ones; for plain QAT (``--quant none``) ``--ep-init`` is the
float init (no bound, nothing to project) and the penalty does not apply. ``--rounding budgeted``
(ours only) rounds to nearest within the exact budget. ``--quant float`` trains the float twin, reports
its accuracy (the reference of "% of float") and saves it (the input of ``a2q quantize``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from brevitas_a2q.cli.options import (
    ACC_BITS,
    ACT_BITS,
    WEIGHT_BITS,
    HelpFormatter,
    add_resumable_output_options,
    bits_type,
    layer_bits,
    non_negative_float,
    paragraphs,
    positive_float,
    positive_int,
)
from brevitas_a2q.errors import A2QInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

ARCHS = ("cnn", "mlp")
QUANTS = ("a2q", "a2q+", "brevitas-a2q", "brevitas-a2q+", "none", "float")
OURS = ("a2q", "a2q+")
ACCUMULATOR_AWARE = ("a2q", "a2q+", "brevitas-a2q", "brevitas-a2q+")
ROUNDINGS = ("zero", "budgeted")
DEFAULT_ACC_BITS = 16
# settings that define a run: a checkpoint written with other values cannot be resumed
CONFIG_KEYS = ("dataset", "arch", "model", "epochs", "lr", "batch_size", "seed", "ep_init",
               "pretrain", "pretrain_epochs", "penalty", "train_limit")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``a2q train``."""
    p = subparsers.add_parser(
        "train",
        help="train a quantized CNN/MLP at a chosen accumulator width (checkpoints, resume, "
             "QONNX export, accumulator report)",
        description=paragraphs(
            "Train a small quantized CNN or MLP with accumulator-aware weights on digits "
            "(bundled), Fashion-MNIST or MNIST (IDX files, plain or .gz). Every epoch is saved "
            "to OUT/model.pt (brevitas_a2q.train.checkpoint/1 with optimizer state); --resume "
            "continues bit-identically, also after Ctrl-C. At the end: test accuracy, the "
            "accumulator report of every layer, OUT/model.onnx (QONNX with accumulator "
            "records) and OUT/results.json. Every option is checked before training starts."),
        epilog="example:\n  a2q train --dataset fashion-mnist --quant a2q+ --acc-bits 12 \\\n"
               "      --layer-acc-bits conv1=32 fc=32 --ep-init --pretrain-epochs 1 \\\n"
               "      --epochs 2 --out runs/fmnist-a2q+-12\n\n" + paragraphs(
                   "exit status: 0 every target holds (--quant none and float have none to "
                   "check), 1 a target is violated, 2 bad input, 3 internal error, 130 "
                   "interrupted (Ctrl-C; resume with --resume)"),
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist", "mnist"],
                      help="(default: %(default)s)")
    data.add_argument("--data-dir", type=Path, default=None,
                      help="directory with the IDX files (train-images-idx3-ubyte[.gz], ...) "
                           "(default: for fashion-mnist /usr/share/datasets/fashion-mnist, "
                           "Debian package dataset-fashion-mnist)")
    data.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                      help="train on the first N training samples only (default: all)")
    model = p.add_argument_group("model and quantization")
    model.add_argument("--arch", default="cnn", choices=ARCHS, help="(default: %(default)s)")
    model.add_argument("--hidden", type=positive_int, nargs="+", default=[64], metavar="WIDTH",
                       help="MLP hidden widths (default: 64)")
    model.add_argument("--quant", default="a2q+", choices=QUANTS,
                       help="weight quantizer: ours (a2q, a2q+), Brevitas's built-in "
                            "(brevitas-a2q, brevitas-a2q+), plain per-channel QAT (none), or "
                            "float: train the float twin, report its accuracy and save it "
                            "for a2q quantize (no export or accumulator report) "
                            "(default: %(default)s)")
    model.add_argument("--rounding", default="zero", choices=ROUNDINGS,
                       help="integer rounding of ours (a2q, a2q+): zero (round-to-zero, as "
                            "Brevitas) or budgeted (round to nearest, then take back the "
                            "cheapest rounded-up units per channel until the exact L1 budget "
                            "holds) (default: %(default)s)")
    model.add_argument("--weight-bits", type=bits_type(WEIGHT_BITS), default=4, metavar="M",
                       help=f"weight bits M, {WEIGHT_BITS[0]} to {WEIGHT_BITS[1]} "
                            "(default: %(default)s)")
    model.add_argument("--act-bits", type=bits_type(ACT_BITS), default=4, metavar="N",
                       help=f"hidden activation bits, {ACT_BITS[0]} to {ACT_BITS[1]} "
                            "(default: %(default)s)")
    model.add_argument("--acc-bits", type=bits_type(ACC_BITS), default=None, metavar="P",
                       help=f"target accumulator bits P of every layer, {ACC_BITS[0]} to "
                            f"{ACC_BITS[1]}; for an accumulator-aware --quant only "
                            f"(default: {DEFAULT_ACC_BITS})")
    model.add_argument("--layer-acc-bits", type=layer_bits, nargs="+", default=[],
                       metavar="LAYER=P",
                       help=f"per-layer targets, P from {ACC_BITS[0]} to {ACC_BITS[1]}, e.g. "
                            "conv1=32 fc=32 (CNN layers: conv1 conv2 fc; MLP: fc0 fc1 ...)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=positive_int, default=4, help="(default: %(default)s)")
    train.add_argument("--lr", type=positive_float, default=1e-3,
                       help="Adam learning rate (default: %(default)s)")
    train.add_argument("--batch-size", type=positive_int, default=64,
                       help="(default: %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    train.add_argument("--ep-init", action="store_true",
                       help="Euclidean-projection init (A2Q+) from a pretraining phase, for "
                            "ours and Brevitas's A2Q/A2Q+; with --quant none it is the float "
                            "init (the pretrained weights, nothing to project)")
    train.add_argument("--pretrain", default="float", choices=["float", "qat"],
                       help="what the pretraining phase of --ep-init trains: the float twin or "
                            "plain QAT (default: %(default)s)")
    train.add_argument("--pretrain-epochs", type=positive_int, default=2,
                       help="epochs of the pretraining phase of --ep-init (default: %(default)s)")
    train.add_argument("--penalty", type=non_negative_float, default=0.0,
                       help="weight of the A2Q penalty sum relu(g - s*T), for ours and "
                            "Brevitas's A2Q/A2Q+ (plain QAT has no g and no bound: it does not "
                            "apply); the papers use about 1e-3 (default: %(default)s)")
    ft = p.add_argument_group("fine-tuning under a simulated accumulator (optional)")
    ft.add_argument("--finetune-accumulator", default=None, metavar="SPEC",
                    help="after training, fine-tune with every layer accumulating in SPEC "
                         "(e.g. int12-sat, fp12-e4m7; see a2q evaluate --help) and report "
                         "the accuracy under it (default: no fine-tuning)")
    ft.add_argument("--finetune-layer", action="append", default=[], metavar="NAME=SPEC",
                    help="per-layer accumulator for fine-tuning, e.g. conv1=int16-sat, or "
                         "NAME=exact (repeatable)")
    ft.add_argument("--finetune-epochs", type=positive_int, default=1,
                    help="(default: %(default)s)")
    ft.add_argument("--finetune-lr", type=positive_float, default=1e-4,
                    help="(default: %(default)s)")
    add_resumable_output_options(p, "a2q-train", "same configuration")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------------------------
# configuration


def _layer_acc_bits(items: list[tuple[str, int]]) -> dict[str, int]:
    """``[("conv1", 16)]`` (parsed by :func:`~brevitas_a2q.cli.options.layer_bits`) -> dict."""
    return dict(items)


def layer_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The accumulating layers of the model ``args`` describe (see ``build_cnn``/``build_mlp``)."""
    if args.arch == "cnn":
        return ("conv1", "conv2", "fc")
    return tuple(f"fc{i}" for i in range(len(args.hidden) + 1))


def _check_names(option: str, names, known: tuple[str, ...]) -> None:
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise A2QInputError(f"{option} names unknown layer(s) {unknown}; the {len(known)} "
                            f"layers of this model are {', '.join(known)}")


def _check_args(args: argparse.Namespace) -> None:
    """Every check that needs no data and no model: run before anything slow."""
    if args.quant == "float":
        for given, option in ((args.ep_init, "--ep-init"), (args.penalty, "--penalty"),
                              (args.layer_acc_bits, "--layer-acc-bits"),
                              (args.rounding != "zero", "--rounding budgeted"),
                              (args.resume, "--resume"),
                              (args.finetune_accumulator is not None, "--finetune-accumulator")):
            if given:
                raise A2QInputError(f"{option} does not apply to --quant float (it trains the "
                                    "float twin in one go and reports its accuracy)")
    if args.quant not in ACCUMULATOR_AWARE and args.penalty:
        raise A2QInputError(f"--penalty does not apply to --quant {args.quant}: plain QAT has "
                            "no learned norm g and no accumulator bound T, so there is no "
                            "relu(g - s*T) term")
    if args.quant == "none" and args.ep_init and args.pretrain != "float":
        raise A2QInputError("--ep-init with --quant none is the float init: use --pretrain "
                            "float")
    if args.rounding == "budgeted" and args.quant not in OURS:
        raise A2QInputError(f"--rounding budgeted is an option of this package's quantizers "
                            f"(--quant a2q or a2q+), not of {args.quant!r}")
    if args.quant == "none" and args.layer_acc_bits:
        raise A2QInputError("--layer-acc-bits needs an accumulator-aware --quant (plain QAT "
                            "has no accumulator target)")
    if args.quant in ("none", "float") and args.acc_bits is not None:
        raise A2QInputError(f"--acc-bits needs an accumulator-aware --quant "
                            f"({', '.join(ACCUMULATOR_AWARE)}); --quant {args.quant} has no "
                            "accumulator target and would drop P unchecked: drop --acc-bits "
                            "or choose one of those")
    if args.acc_bits is None and args.quant in ACCUMULATOR_AWARE:
        args.acc_bits = DEFAULT_ACC_BITS
    if args.resume and args.overwrite:
        raise A2QInputError("--resume and --overwrite exclude each other")
    if args.data_dir is not None and args.dataset == "digits":
        raise A2QInputError("--data-dir is for IDX data sets (fashion-mnist, mnist); digits "
                            "ships with scikit-learn")
    _check_names("--layer-acc-bits", _layer_acc_bits(args.layer_acc_bits), layer_names(args))
    _check_targets_admit_weights(args)
    if args.finetune_accumulator is None:
        if args.finetune_layer:
            raise A2QInputError("--finetune-layer needs --finetune-accumulator")
        return
    overrides = _finetune_overrides(args)
    _check_names("--finetune-layer", overrides, layer_names(args))
    from brevitas_a2q.sim.config import parse_accumulator

    for option, spec in (("--finetune-accumulator", args.finetune_accumulator),
                         *((f"--finetune-layer {k}", v) for k, v in overrides.items())):
        if spec is not None:
            try:
                parse_accumulator(spec)
            except A2QInputError as err:
                raise A2QInputError(f"{option}: {err}") from None


def layer_inputs(args: argparse.Namespace) -> dict[str, tuple[int, bool]]:
    """``{layer: (N, signed)}``: what each layer of ``build_cnn``/``build_mlp`` multiplies (the
    first an 8-bit signed quantized image, the others unsigned ``--act-bits`` ReLU outputs)."""
    names = layer_names(args)
    return {name: (8, True) if i == 0 else (args.act_bits, False) for i, name in enumerate(names)}


def _check_targets_admit_weights(args: argparse.Namespace) -> None:
    """Refuse a target P whose L1 bound T is below 1 for a layer's input: every weight of that
    layer would round to zero (A2Q Eq. 15, A2Q+ Eq. 18), named by layer and flag."""
    if args.quant not in ACCUMULATOR_AWARE:
        return
    from brevitas_a2q.quant.bounds import min_accumulator_bits

    zero_centered = args.quant.endswith("+")
    overrides = _layer_acc_bits(args.layer_acc_bits)
    for name, (bits, signed) in layer_inputs(args).items():
        target = overrides.get(name, args.acc_bits)
        need = min_accumulator_bits(1, bits, signed, zero_centered)
        if target < need:
            flag = f"--layer-acc-bits {name}={target}" if name in overrides else \
                f"--acc-bits {target}"
            sign = "signed" if signed else "unsigned"
            raise A2QInputError(
                f"{flag} is too small for layer {name} ({bits}-bit {sign} input, "
                f"{args.quant}): below P = {need} its L1 bound admits no non-zero integer "
                f"weight, so every weight would round to zero; use P >= {need} for {name} "
                f"(--acc-bits {need}, or --layer-acc-bits {name}={need})")


def _model_kwargs(args: argparse.Namespace, image_shape: tuple[int, ...]) -> dict:
    channels, side = image_shape[0], image_shape[-1]
    kwargs = dict(quant=args.quant, weight_bits=args.weight_bits, act_bits=args.act_bits,
                  acc_bits=None if args.quant in ("none", "float") else args.acc_bits)
    if args.arch == "cnn":
        kwargs.update(in_channels=channels, image_size=side)
    else:
        kwargs.update(in_features=channels * side * image_shape[-2], hidden=list(args.hidden))
    overrides = _layer_acc_bits(args.layer_acc_bits)
    if overrides:
        kwargs["layer_acc_bits"] = overrides
    if args.rounding != "zero":  # absent by default: earlier checkpoints keep their config
        kwargs["rounding"] = args.rounding
    return kwargs


def _config(args: argparse.Namespace, kwargs: dict) -> dict:
    return {"dataset": args.dataset, "arch": args.arch, "model": kwargs, "epochs": args.epochs,
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
            "ep_init": args.ep_init, "pretrain": args.pretrain if args.ep_init else None,
            "pretrain_epochs": args.pretrain_epochs if args.ep_init else None,
            "penalty": args.penalty, "train_limit": args.train_limit}


def _build(arch: str, kwargs: dict) -> nn.Module:
    from brevitas_a2q.train.models import build_cnn, build_mlp

    kwargs = dict(kwargs)
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return (build_cnn if arch == "cnn" else build_mlp)(**kwargs)


def _load_data(args: argparse.Namespace):
    import torch

    from brevitas_a2q.train.data import load_dataset

    train, test = load_dataset(args.dataset, args.data_dir, seed=args.seed)
    if args.train_limit is not None:
        train = torch.utils.data.Subset(train, range(min(args.train_limit, len(train))))
    return train, test


# ----------------------------------------------------------------------------------------------
# checkpoints


def _save(path: Path, model: nn.Module, config: dict, extra: dict) -> None:
    from brevitas_a2q.train.checkpoint import save_checkpoint

    save_checkpoint(path, model, config["arch"], config["model"], config["dataset"],
                    {"config": config, **extra}, overwrite=True)


def _read_checkpoint(path: Path) -> dict:
    from brevitas_a2q.train.checkpoint import read_payload

    if not path.is_file():
        raise A2QInputError(f"--resume: {path} does not exist (start without --resume)")
    payload = read_payload(path)
    extra = payload.get("extra") or {}
    if "config" not in extra or "epoch" not in extra or "optimizer" not in extra:
        raise A2QInputError(f"--resume: {path} was not written by `a2q train` (no training "
                            "state in it); start afresh with --overwrite")
    return payload


def _config_differences(saved: dict, current: dict) -> list[str]:
    return [f"{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}"
            for key in CONFIG_KEYS if saved.get(key) != current.get(key)]


# ----------------------------------------------------------------------------------------------
# training


def _loader(dataset, batch_size: int, seed: int, epoch: int) -> torch.utils.data.DataLoader:
    """The shuffled loader of one epoch: its order depends on (seed, epoch) only, so a resumed
    run sees the same batches as an uninterrupted one."""
    import torch

    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       generator=gen)


def _pretrain_and_project(args, config, model, train, test, example) -> dict:
    """The EP-init phase: pretrain the float twin (or plain QAT), copy its weights, project."""
    import torch

    from brevitas_a2q.train.ep_init import euclidean_projection_init
    from brevitas_a2q.train.loop import accuracy, train_epochs
    from brevitas_a2q.train.models import copy_float_weights

    kwargs = config["model"]
    torch.manual_seed(args.seed)
    if args.pretrain == "qat":
        source = _build(args.arch, {**kwargs, "quant": "none", "acc_bits": None,
                                    "layer_acc_bits": None, "rounding": "zero"})
    else:
        source = _float_twin(args.arch, kwargs)
    start = time.perf_counter()
    train_epochs(source, train, args.pretrain_epochs, lr=args.lr, batch_size=args.batch_size,
                 seed=args.seed, progress=not args.no_progress and not args.json,
                 desc=f"pretraining ({'float twin' if args.pretrain == 'float' else 'plain QAT'})")
    copy_float_weights(source, model)
    init = {"pretrain_seconds": round(time.perf_counter() - start, 2)}
    if args.pretrain == "float":
        init["float_accuracy"] = accuracy(source, test)
    # plain QAT has no bound: its "EP-init" is the float init, nothing to project
    init["projected_channels"] = (None if args.quant == "none"
                                  else euclidean_projection_init(model, example))
    return init


def _float_twin(arch: str, kwargs: dict) -> nn.Module:
    """The float model with the quantized model's layer names and weight shapes."""
    from brevitas_a2q.train.models import build_float_cnn, build_float_mlp

    if arch == "cnn":
        return build_float_cnn(kwargs["in_channels"], kwargs["image_size"])
    return build_float_mlp(kwargs["in_features"], tuple(kwargs["hidden"]))


def _output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """OUT's files, after checking that OUT can be written and holds no earlier run (unless
    --resume or --overwrite)."""
    from brevitas_a2q.io import check_output_dir

    check_output_dir(args.out)
    paths = {name: args.out / name for name in ("model.pt", "model.onnx", "results.json")}
    for path in paths.values():
        if path.is_dir():
            raise A2QInputError(f"{path} is a directory; choose another --out")
    if not args.resume and not args.overwrite:
        for path in paths.values():
            if path.exists():
                raise A2QInputError(f"{path} exists from an earlier run; pass --resume to "
                                    "continue it, --overwrite to start afresh, or choose "
                                    "another --out")
    return paths


def run(args: argparse.Namespace) -> int:
    """``a2q train``: check everything, train (or resume), finish; Ctrl-C exits 130 with a note
    of the epoch saved."""
    _check_args(args)
    paths = _output_paths(args)
    import torch

    torch.set_num_threads(args.threads)
    progress = {"phase": "loading data", "saved": 0}
    try:
        return _train(args, paths, progress)
    except KeyboardInterrupt:
        return _interrupted(args, paths, progress)


def _interrupted(args: argparse.Namespace, paths: dict[str, Path], progress: dict) -> int:
    """The one-line message after Ctrl-C; exit status 130."""
    saved, phase = progress["saved"], progress["phase"]
    if saved:
        what = (f"{paths['model.pt']} holds epoch {saved}/{args.epochs}; continue with the same "
                "command plus --resume")
    elif args.resume:
        what = f"{paths['model.pt']} is unchanged; continue with the same command"
    else:
        what = ("nothing was saved (the first checkpoint is written after epoch 1); rerun the "
                "command to start again")
    print(f"a2q train: interrupted during {phase}: {what}", file=sys.stderr)
    return 130


def _train(args: argparse.Namespace, paths: dict[str, Path], progress: dict) -> int:
    """Load data, build (or resume) the model, train the remaining epochs saving each, finish.
    ``progress`` tells :func:`_interrupted` what was running and which epoch is saved."""
    import torch

    from brevitas_a2q.train.loop import accuracy, train_one_epoch

    train, test = _load_data(args)
    example = torch.stack([train[i][0] for i in range(min(256, len(train)))])
    kwargs = _model_kwargs(args, tuple(example.shape[1:]))
    config = _config(args, kwargs)
    if args.quant == "float":
        return _train_float(args, config, paths, progress, train, test)
    torch.manual_seed(args.seed)
    model = _build(args.arch, kwargs)
    state = {"epoch": 0, "history": [], "init": {}, "train_seconds": 0.0, "finetuned": None}
    payload = None
    if args.resume:
        progress["phase"] = "loading the checkpoint"
        payload = _load_for_resume(paths["model.pt"], model, config)
        progress["saved"] = payload["extra"]["epoch"]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.ep_init:
            progress["phase"] = "pretraining (EP-init)"
            state["init"] = _pretrain_and_project(args, config, model, train, test, example)
        # the first checkpoint comes after epoch 1: Brevitas initializes activation scales from
        # the statistics of the first training steps, and a checkpoint needs them
    # the optimizer is built after the model's state is loaded: Brevitas may replace parameter
    # objects while loading, and an optimizer built before would train orphans
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * len(_loader(train, args.batch_size, args.seed, 0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    if payload is not None:
        _restore(paths["model.pt"], optimizer.load_state_dict, payload["extra"]["optimizer"])
        _restore(paths["model.pt"], schedule.load_state_dict, payload["extra"]["scheduler"])
        for key in state:
            state[key] = payload["extra"].get(key, state[key])

    def save() -> None:
        _save(paths["model.pt"], model, config, _extra(model, optimizer, schedule, state))

    show = not args.no_progress and not args.json
    first = state["epoch"]
    for epoch in range(first, args.epochs):
        progress["phase"] = f"epoch {epoch + 1}/{args.epochs}"
        start = time.perf_counter()
        loss = train_one_epoch(model, _loader(train, args.batch_size, args.seed, epoch),
                               optimizer, schedule, args.penalty,
                               f"epoch {epoch + 1}/{args.epochs}", show)
        state["train_seconds"] += time.perf_counter() - start
        acc = accuracy(model, test)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": loss, "test_accuracy": acc})
        save()
        progress["saved"] = epoch + 1
        if not args.json:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, test accuracy "
                  f"{100 * acc:.2f}%", flush=True)
    progress["phase"] = "fine-tuning and export (training is complete)"
    return _finish(args, model, config, state, train, test, example, paths, resumed_at=first,
                   save=save)


def _load_for_resume(path: Path, model, config: dict) -> dict:
    """Read ``path``, check it comes from the same configuration, load the model's state and the
    runtime state a state dict lacks (see :func:`brevitas_a2q.train.checkpoint.runtime_state`)."""
    from brevitas_a2q.train.checkpoint import restore_runtime_state

    payload = _read_checkpoint(path)
    diffs = _config_differences(payload["extra"]["config"], config)
    if diffs:
        raise A2QInputError(f"--resume: {path} comes from another configuration "
                            f"({'; '.join(diffs)}); rerun with the same settings, or use "
                            "--overwrite / another --out")
    _restore(path, model.load_state_dict, payload["state_dict"])
    if "runtime" in payload["extra"]:  # checkpoints written before it was saved lack it
        _restore(path, lambda saved: restore_runtime_state(model, saved),
                 payload["extra"]["runtime"])
    return payload


def _restore(path: Path, load, state) -> None:
    try:
        load(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise A2QInputError(f"--resume: {path} does not match the model or optimizer "
                            f"({' '.join(str(err).split())[:300]})") from err


def _extra(model, optimizer, schedule, state: dict) -> dict:
    """What a checkpoint of ``a2q train`` holds beside the state dict, for a bit-identical
    resume: optimizer, scheduler, the statistics Brevitas collects in its first training steps
    and the random number generators, and the run's progress."""
    from brevitas_a2q.train.checkpoint import runtime_state

    return {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
            "runtime": runtime_state(model), **{k: v for k, v in state.items()}}


def _finish(args, model, config, state, train, test, example, paths, resumed_at: int,
            save) -> int:
    from brevitas_a2q.analysis.audit import accumulator_report
    from brevitas_a2q.cli.report import format_report
    from brevitas_a2q.export.qonnx import export_qonnx
    from brevitas_a2q.io import atomic_output
    from brevitas_a2q.train.loop import accuracy

    finetuned = state.get("finetuned")
    if args.finetune_accumulator is not None and finetuned is None:
        finetuned = _finetune(args, model, train, test)
        state["finetuned"] = finetuned
        save()
    test_accuracy = accuracy(model, test)
    report = accumulator_report(model, example)
    export_qonnx(model, example[:1], paths["model.onnx"], overwrite=True)
    exported = format_report(paths["model.onnx"])
    results = {**config, "quant": args.quant, "resumed_at_epoch": resumed_at if args.resume
               else None, "epochs_done": state["epoch"],
               "train_seconds": round(state["train_seconds"], 2), "init": state["init"],
               "history": state["history"], "test_accuracy": test_accuracy,
               "float_accuracy": (state["init"] or {}).get("float_accuracy"),
               "finetune": finetuned, "layers": report.to_dicts(),
               "all_targets_hold": report.all_hold, "warnings": report_warnings(report),
               "files": {k: str(v) for k, v in paths.items()}}
    with atomic_output(paths["results.json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
        for warning in results["warnings"]:  # the table that shows them is not printed
            print(f"a2q train: warning: {warning}", file=sys.stderr)
        return 1 if report.all_hold is False else 0
    m = config["model"]
    targets = ("no accumulator target" if m["acc_bits"] is None else f"P={m['acc_bits']}") \
        + "".join(f", {k}={v}" for k, v in (m.get("layer_acc_bits") or {}).items())
    print(f"\n{args.quant} {args.arch} (W{args.weight_bits}A{args.act_bits}, {targets}) on "
          f"{args.dataset}: {state['epoch']} epochs, {state['train_seconds']:.1f} s training")
    float_acc = results["float_accuracy"]
    of_float = (f" ({100 * test_accuracy / float_acc:.1f}% of the float twin's "
                f"{100 * float_acc:.2f}% after pretraining)") if float_acc else ""
    print(f"test accuracy: {100 * test_accuracy:.2f}%{of_float}")
    if finetuned:
        print(f"after fine-tuning under {finetuned['accumulator']} "
              f"{finetuned['layers'] or ''}: "
              f"{100 * finetuned['accuracy']:.2f}% with that accumulator")
    print("\naccumulators of the trained model (P = target, widths in signed bits):")
    print(report.table())
    print(f"\nexported {paths['model.onnx']}; accumulators of the exported QONNX file:")
    print(exported)
    print(f"\ncheckpoint {paths['model.pt']}, results {paths['results.json']}")
    return 1 if report.all_hold is False else 0  # None: nothing to check (plain QAT)


def _train_float(args, config, paths, progress, train, test) -> int:
    """``--quant float``: the float twin, trained as the quantized models are (Adam, cosine
    schedule, the same batches), tested, and written to OUT/results.json."""
    import torch

    from brevitas_a2q.io import atomic_output
    from brevitas_a2q.train.loop import accuracy, train_one_epoch

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = _float_twin(args.arch, config["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * len(_loader(train, args.batch_size, args.seed, 0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    show = not args.no_progress and not args.json
    history, seconds = [], 0.0
    for epoch in range(args.epochs):
        progress["phase"] = f"epoch {epoch + 1}/{args.epochs} (float)"
        start = time.perf_counter()
        loss = train_one_epoch(model, _loader(train, args.batch_size, args.seed, epoch),
                               optimizer, schedule, 0.0, f"epoch {epoch + 1}/{args.epochs}", show)
        seconds += time.perf_counter() - start
        acc = accuracy(model, test)
        history.append({"epoch": epoch + 1, "loss": loss, "test_accuracy": acc})
        if not args.json:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, test accuracy "
                  f"{100 * acc:.2f}%", flush=True)
    _save(paths["model.pt"], model, config, {"history": history, "test_accuracy": acc})
    results = {**config, "quant": "float", "resumed_at_epoch": None, "epochs_done": args.epochs,
               "train_seconds": round(seconds, 2), "init": {}, "history": history,
               "test_accuracy": acc, "float_accuracy": acc, "finetune": None, "layers": [],
               "all_targets_hold": None, "warnings": [],
               "files": {"model.pt": str(paths["model.pt"]),
                         "results.json": str(paths["results.json"])}}
    with atomic_output(paths["results.json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"\nfloat {args.arch} on {args.dataset}: {args.epochs} epochs, {seconds:.1f} s "
              f"training\nfloat test accuracy: {100 * acc:.2f}% (the reference of \"% of "
              f"float\"; no export or accumulator report)\nfloat checkpoint "
              f"{paths['model.pt']} (a2q quantize turns it into an A2Q model without training), "
              f"results {paths['results.json']}")
    return 0


def report_warnings(report) -> list[str]:
    """The audit's warnings (e.g. layers whose integer weights are all zero), if it has any."""
    return [str(w) for w in (getattr(report, "warnings", None) or [])]


def _finetune(args, model, train, test) -> dict:
    from brevitas_a2q.sim.evaluate import evaluate_accuracy, finetune

    spec, overrides = args.finetune_accumulator, _finetune_overrides(args)
    before, _ = evaluate_accuracy(model, test, spec, overrides)
    loader = _loader(train, args.batch_size, args.seed, 10_000)
    finetune(model, loader, spec, epochs=args.finetune_epochs, lr=args.finetune_lr,
             overrides=overrides, progress=not args.no_progress and not args.json)
    after, stats = evaluate_accuracy(model, test, spec, overrides)
    return {"accumulator": spec, "layers": overrides, "epochs": args.finetune_epochs,
            "lr": args.finetune_lr, "accuracy_before": before, "accuracy": after,
            "simulation": stats.to_dict()}


def _finetune_overrides(args: argparse.Namespace) -> dict:
    from brevitas_a2q.cli.evaluate import parse_layer_overrides

    return parse_layer_overrides(args.finetune_layer)
