"""Accumulator-aware post-training quantization on Fashion-MNIST: this package's PTQ
(``brevitas_a2q.ptq``) against Brevitas's AXE (``A2GPFQ``, ``A2GPTQ`` from
``brevitas_examples.common.axe``), EP-init alone and round-to-zero alone.

Setup (one run, every method treated alike):
- Data: Fashion-MNIST 60k/10k IDX files (Debian package dataset-fashion-mnist, or --data-dir);
  every model is tested on all 10,000 test images.
- Float model: ``build_float_cnn(image_size=28)`` (conv1 1->16 3x3, BN, ReLU, pool, conv2 16->32
  3x3, BN, ReLU, pool, fc 1568->10), Adam 1e-3 cosine, batch 128, --float-epochs epochs, seed 0,
  trained once; "% of float" is relative to its test accuracy.
- Quantized models: the same network as ``build_cnn`` (8-bit signed input quantizer, unsigned
  A-bit ReLUs, M-bit weights: W4A4 and W8A8), activation scales from the calibration images with
  Brevitas's ``calibration_mode``. Calibration: 512 training images, a different seeded random
  subset per seed (--seeds, default 3); the float model is the same for every seed.
- Target P on the hidden layer conv2 (P = 16, 14, 12, 10). The first layer conv1 (8-bit signed
  input, K = 9) and the last layer fc (K = 1568) keep wide accumulators: target 32 for our A2Q+
  methods, and no accumulator constraint for AXE (its layer filter selects conv2 only; conv1 and
  fc get plain GPFQ/GPTQ).
- Methods: (a) ours: ``quantize_weights`` (A2Q+ budget, GPFQ objective, act-order, bias/BN
  correction); (b) Brevitas AXE, ``a2gpfq_mode`` / ``a2gptq_mode`` with
  ``max_accumulator_bit_width=P`` on conv2, Brevitas's built-in per-channel weight quantizer
  (``Int8WeightPerChannelFloat`` at M bits), as in brevitas_examples' ptq_evaluate: with its
  default scales, recomputed from the weights at every call (ptq_evaluate's ``stats``), and with
  frozen scales (``PARAMETER_FROM_STATS``: set from the float weights, then fixed; AXE computes
  its integer limits with the scales it reads before rounding); (c) EP-init
  alone: our A2Q+ quantizer (round-to-zero) after ``euclidean_projection_init``; (d) round-to-zero
  alone: our A2Q+ quantizer with the A2Q default init (``s = max|w|/(2^(M-1)-1)``,
  ``g = ||w||_1``, clamped to ``T`` by the quantizer).
- For every model the accumulator audit gives the P each layer really needs (the exact range of
  its integer weights over its input range); a layer needing more than its target is a failure.

Writes ptq_vs_axe.json and .png to --out-dir and prints a markdown table.

    .venv/bin/python benchmarks/ptq_vs_axe.py            # the full run (~30 min on 2 cores)
    .venv/bin/python benchmarks/ptq_vs_axe.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

METHODS = ("ours", "AXE A2GPFQ", "AXE A2GPTQ", "AXE A2GPFQ, frozen scales",
           "AXE A2GPTQ, frozen scales", "EP-init alone", "round-to-zero alone")
CONFIGS = {"W4A4": (4, 4), "W8A8": (8, 8)}
WIDE = {"conv1": 32, "fc": 32}
HIDDEN = "conv2"


def _data(data_dir):
    from brevitas_a2q.train.data import load_dataset

    return load_dataset("fashion-mnist", data_dir)


def train_float(train, epochs: int, cache: Path | None):
    """The float CNN (seed 0), cached in ``cache`` when given."""
    from brevitas_a2q.train.loop import train_epochs
    from brevitas_a2q.train.models import build_float_cnn

    model = build_float_cnn(1, 28)
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("epochs") == epochs:
            model.load_state_dict(saved["state"])
            return model.eval(), saved["seconds"]
    torch.manual_seed(0)
    start = time.perf_counter()
    train_epochs(model, train, epochs, lr=1e-3, batch_size=128, seed=0, progress=False)
    seconds = time.perf_counter() - start
    if cache is not None:
        torch.save({"epochs": epochs, "state": model.state_dict(), "seconds": seconds}, cache)
    return model.eval(), seconds


def _targets(p: int) -> dict:
    return {**WIDE, HIDDEN: p}


def _a2q_model(float_model, m: int, a: int, p: int, rounding: str):
    from brevitas_a2q.train.models import build_cnn, copy_float_weights

    model = build_cnn("a2q+", m, a, p, 1, 28, layer_acc_bits=WIDE, rounding=rounding)
    copy_float_weights(float_model, model)
    return model.eval()


def run_ours(float_model, calib, m, a, p):
    from brevitas_a2q.ptq.convert import quantized_twin
    from brevitas_a2q.ptq.pipeline import quantize_weights
    from brevitas_a2q.train.models import copy_float_weights

    model, _ = quantized_twin("cnn", {"in_channels": 1, "image_size": 28}, "a2q+", m, a, p, WIDE,
                              float_model)
    copy_float_weights(float_model, model)
    quantize_weights(model, float_model, calib)
    return model


def _plain_cnn(m: int, a: int, frozen: bool):
    """``build_cnn("none")``: Brevitas's ``Int8WeightPerChannelFloat`` at ``m`` bits, whose scale
    is recomputed from the current weights at every call (Brevitas's default, and ptq_evaluate's
    ``stats``), or, ``frozen``, the same quantizer with ``PARAMETER_FROM_STATS`` scales (set from
    the float weights once, then fixed)."""
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import Int8WeightPerChannelFloat

    from brevitas_a2q.train import models

    saved = models.WEIGHT_QUANTIZERS["none"]
    if frozen:
        models.WEIGHT_QUANTIZERS["none"] = (Int8WeightPerChannelFloat.let(
            scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS), False)
    try:
        return models.build_cnn("none", m, a, None, 1, 28)
    finally:
        models.WEIGHT_QUANTIZERS["none"] = saved


def run_axe(float_model, calib, m, a, p, algorithm: str, frozen: bool):
    from brevitas_examples.common.axe import a2gpfq_mode, a2gptq_mode

    from brevitas_a2q.ptq.calibration import calibrate_activations
    from brevitas_a2q.train.models import copy_float_weights

    model = _plain_cnn(m, a, frozen)
    copy_float_weights(float_model, model)
    model.eval()
    with torch.no_grad():  # initializes weight scales that need a forward pass (ptq_evaluate)
        model(calib[:128])
    calibrate_activations(model, calib)
    hidden = model.get_submodule(HIDDEN)
    mode = a2gpfq_mode if algorithm == "gpfq" else a2gptq_mode
    with torch.no_grad(), mode(model, a2q_layer_filter_fnc=lambda layer: layer is hidden,
                               max_accumulator_bit_width=p) as algo:
        for _ in range(algo.num_layers):
            for start in range(0, len(calib), 128):
                algo.model(calib[start:start + 128])
            algo.update()
    return model.eval()


@torch.no_grad()
def default_a2q_init(model, bits: int):
    """The A2Q default init from the current (copied float) weights: ``s = max|v_c|/(2^(M-1)-1)``
    (``v`` zero-centred for A2Q+), ``g = ||v_c||_1``; the quantizer clamps ``g/s`` to ``T``."""
    from brevitas_a2q.train.ep_init import _set_scales
    from brevitas_a2q.train.targets import (
        _accumulator_aware_layers,
        _channel_view,
        _is_zero_centered,
        _pre_scaling,
    )

    for layer in _accumulator_aware_layers(model).values():
        pre = _pre_scaling(layer)
        rows = _channel_view(layer)(layer.weight.detach())
        if _is_zero_centered(pre):
            rows = rows - rows.mean(dim=1, keepdim=True)
        _set_scales(layer, (rows.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).clamp(min=1e-10))
        g = rows.abs().sum(dim=1).clamp(min=1e-10)
        restrict = pre.restrict_clamp_scaling.restrict_value_impl
        pre.value.copy_(restrict.restrict_init_tensor(g).reshape(pre.value.shape))


def run_baseline(float_model, calib, m, a, p, ep: bool, weight_bits: int):
    from brevitas_a2q.ptq.calibration import calibrate_activations
    from brevitas_a2q.train.ep_init import euclidean_projection_init

    model = _a2q_model(float_model, m, a, p, "zero")
    calibrate_activations(model, calib)
    if ep:
        euclidean_projection_init(model, calib[:128])
    else:
        default_a2q_init(model, weight_bits)
    return model


def audit(model, example, p) -> dict:
    from brevitas_a2q.analysis.audit import accumulator_report

    targets = _targets(p)
    layers = {}
    for r in accumulator_report(model, example):
        need = r.bits_exact_range
        layers[r.layer] = {"target": targets[r.layer], "needed": need,
                           "exceeds": need is not None and need > targets[r.layer],
                           "zero_channels": r.zero_channels}
    return layers


def evaluate(model, test) -> float:
    from brevitas_a2q.train.loop import accuracy

    return accuracy(model, test, batch_size=1000)


def run_one(method, float_model, calib, test, m, a, p) -> dict:
    start = time.perf_counter()
    try:
        if method == "ours":
            model = run_ours(float_model, calib, m, a, p)
        elif method.startswith("AXE"):
            model = run_axe(float_model, calib, m, a, p, "gpfq" if "GPFQ" in method else "gptq",
                            frozen="frozen" in method)
        else:
            model = run_baseline(float_model, calib, m, a, p, ep=method.startswith("EP"),
                                 weight_bits=m)
        seconds = time.perf_counter() - start
    except Exception as err:  # a method that cannot run here is recorded, not hidden
        return {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    layers = audit(model, calib[:64], p)
    return {"accuracy": evaluate(model, test), "quantize_seconds": round(seconds, 2),
            "layers": layers, "any_exceeds": any(v["exceeds"] for v in layers.values())}


def summarize(rows: list[dict], float_acc: float) -> list[dict]:
    out = []
    keys = sorted({(r["config"], r["P"], r["method"]) for r in rows},
                  key=lambda k: (k[0], -k[1], METHODS.index(k[2])))
    for config, p, method in keys:
        group = [r for r in rows if (r["config"], r["P"], r["method"]) == (config, p, method)]
        ok = [r for r in group if "accuracy" in r]
        pct = [100 * r["accuracy"] / float_acc for r in ok]
        out.append({
            "config": config, "P": p, "method": method, "seeds": len(ok),
            "errors": [r["error"] for r in group if "error" in r],
            "pct_of_float_mean": round(statistics.mean(pct), 2) if pct else None,
            "pct_of_float_std": round(statistics.stdev(pct), 2) if len(pct) > 1 else None,
            "accuracy_mean": round(100 * statistics.mean(r["accuracy"] for r in ok), 2)
            if ok else None,
            "hidden_needed_max": max((r["layers"][HIDDEN]["needed"] for r in ok), default=None),
            "needed_max": {name: max(r["layers"][name]["needed"] for r in ok)
                           for name in (ok[0]["layers"] if ok else {})},
            "runs_exceeding_target": sum(r["any_exceeds"] for r in ok),
        })
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| config | P | method | % of float (mean ± sd) | conv2 needs P | runs over target |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        if s["pct_of_float_mean"] is None:
            acc = "failed: " + "; ".join(s["errors"])[:80]
        else:
            sd = f" ± {s['pct_of_float_std']:.2f}" if s["pct_of_float_std"] is not None else ""
            acc = f"{s['pct_of_float_mean']:.2f}{sd}"
        over = f"**{s['runs_exceeding_target']} of {s['seeds']}**" \
            if s["runs_exceeding_target"] else f"0 of {s['seeds']}"
        lines.append(f"| {s['config']} | {s['P']} | {s['method']} | {acc} | "
                     f"{s['hidden_needed_max']} | {over} |")
    return "\n".join(lines)


def verdicts(summary: list[dict]) -> str:
    """Per config and P, ours against each AXE variant, as measured (Markdown list): the gap in
    points of % of float, and every variant that exceeded its target named as a failure."""
    lines = []
    cells = {(s["config"], s["P"], s["method"]): s for s in summary}
    for config, p in sorted({(s["config"], s["P"]) for s in summary}, key=lambda k: (k[0], -k[1])):
        ours = cells.get((config, p, "ours"))
        if ours is None or ours["pct_of_float_mean"] is None:
            continue
        parts = []
        for method in METHODS[1:5]:
            other = cells.get((config, p, method))
            if other is None or other["pct_of_float_mean"] is None:
                continue
            gap = ours["pct_of_float_mean"] - other["pct_of_float_mean"]
            word = "ahead of" if gap > 0 else "behind" if gap < 0 else "equal to"
            text = f"{word} {method}" + (f" by {abs(gap):.2f}" if gap else "")
            if other["runs_exceeding_target"]:
                text += (f" (which exceeded its target in {other['runs_exceeding_target']} of "
                         f"{other['seeds']} runs: conv2 needs up to P = "
                         f"{other['hidden_needed_max']})")
            parts.append(text)
        held = "every target held" if not ours["runs_exceeding_target"] else \
            f"a target was EXCEEDED in {ours['runs_exceeding_target']} runs"
        lines.append(f"- {config}, P = {p}: ours {ours['pct_of_float_mean']:.2f}% of float "
                     f"({held}); in points of % of float, " + "; ".join(parts) + ".")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, float_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CONFIGS), figsize=(12, 4.6), sharey=True)
    markers = dict(zip(METHODS, "osD^v<>", strict=True))
    for ax, config in zip(axes, CONFIGS, strict=True):
        for method in METHODS:
            pts = sorted((s for s in summary if s["config"] == config and s["method"] == method
                          and s["pct_of_float_mean"] is not None), key=lambda s: s["P"])
            if not pts:
                continue
            xs = [s["P"] for s in pts]
            ys = [s["pct_of_float_mean"] for s in pts]
            es = [s["pct_of_float_std"] or 0 for s in pts]
            ax.errorbar(xs, ys, yerr=es, marker=markers[method], capsize=3, label=method)
            bad = [(x, y) for x, y, s in zip(xs, ys, pts, strict=True)
                   if s["runs_exceeding_target"]]
            if bad:
                ax.scatter(*zip(*bad, strict=True), s=160, facecolors="none", edgecolors="red",
                           linewidths=2, zorder=5)
        ax.set_title(f"{config}: target P on conv2 (conv1, fc at 32)")
        ax.set_xlabel("target accumulator bits P (conv2)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy, % of float ({100 * float_acc:.2f}%)")
    axes[0].scatter([], [], s=160, facecolors="none", edgecolors="red", linewidths=2,
                    label="a layer needs more than its target")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Accumulator-aware PTQ on Fashion-MNIST (512 calibration images; mean ± sd "
                 "over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--accs", type=int, nargs="+", default=[16, 14, 12, 10])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--float-cache", type=Path, default=Path("/tmp/ptq_vs_axe_float.pt"))
    parser.add_argument("--quick", action="store_true", help="1 seed, P 16 and 10, W4A4, "
                        "1 float epoch, 2,000 test images (smoke test; results not written "
                        "unless --out-dir is given)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out-dir's JSON and do the rest")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = _data(args.data_dir)
    if args.quick:
        args.seeds, args.accs, args.configs, args.float_epochs = 1, [16, 10], ["W4A4"], 1
        test = torch.utils.data.Subset(test, range(2000))
    started = time.perf_counter()
    float_model, float_seconds = train_float(train, args.float_epochs,
                                             None if args.quick else args.float_cache)
    float_acc = evaluate(float_model, test)
    print(f"float: {100 * float_acc:.2f}% after {args.float_epochs} epochs "
          f"({float_seconds:.0f} s)", flush=True)
    images = train.tensors[0] if hasattr(train, "tensors") else torch.stack([x for x, _ in train])
    out_json = args.out_dir / "ptq_vs_axe.json"
    rows = []
    if args.resume and out_json.exists():  # keep the runs of an interrupted run
        rows = json.loads(out_json.read_text())["runs"]
    done = {(r["seed"], r["config"], r["P"], r["method"]) for r in rows}
    for seed in range(args.seeds):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        calib = images[pick[:args.calib]]
        for config in args.configs:
            m, a = CONFIGS[config]
            for p in args.accs:
                for method in args.methods:
                    if (seed, config, p, method) in done:
                        continue
                    torch.manual_seed(seed)
                    row = {"config": config, "P": p, "method": method, "seed": seed,
                           **run_one(method, copy.deepcopy(float_model), calib, test, m, a, p)}
                    rows.append(row)
                    acc = row.get("accuracy")
                    print(f"seed {seed} {config} P={p} {method}: "
                          f"{'%.2f%%' % (100 * acc) if acc is not None else row['error']}"
                          f"{' OVER TARGET' if row.get('any_exceeds') else ''} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
                if not (args.quick and "--out-dir" not in (argv or sys.argv)):
                    _write(args, rows, float_acc, float_seconds, test, started, partial=True)
    if args.quick and "--out-dir" not in (argv or sys.argv):
        print(markdown(summarize(rows, float_acc)))
        return 0
    _write(args, rows, float_acc, float_seconds, test, started, partial=False)
    return 0


def _write(args, rows, float_acc, float_seconds, test, started, partial: bool) -> None:
    """The results JSON (after every (seed, config, P): an interrupted run keeps what it did,
    ``--resume`` continues it), and at the end the PNG and the table."""
    summary = summarize(rows, float_acc)
    table = markdown(summary)
    result = {
        "description": __doc__.split("\n\n")[1].strip(),
        "float": {"epochs": args.float_epochs, "test_accuracy": float_acc,
                  "train_seconds": round(float_seconds, 1), "seed": 0},
        "settings": {"calibration_images": args.calib, "seeds": args.seeds,
                     "targets": "conv2 at P; conv1 and fc at 32 (ours, EP-init, round-to-zero) "
                                "or unconstrained (AXE: plain GPFQ/GPTQ there)",
                     "accumulator_bits": args.accs, "configs": {c: CONFIGS[c]
                                                                 for c in args.configs},
                     "test_images": len(test), "torch_threads": args.threads},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "brevitas": __import__("brevitas").__version__,
                        "machine": platform.machine()},
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
        "complete": not partial,
        "summary": summary, "runs": rows, "table": table, "verdicts": verdicts(summary),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = args.out_dir / ".ptq_vs_axe.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out_dir / "ptq_vs_axe.json")
    if not partial:
        plot(summary, args.out_dir / "ptq_vs_axe.png", float_acc)
        print(table)
        print(f"wrote {args.out_dir / 'ptq_vs_axe.json'} and .png")


if __name__ == "__main__":
    sys.exit(main())
