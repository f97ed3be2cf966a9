"""Accuracy vs accumulator bit width P on Fashion-MNIST: W4A4 CNN, float baseline, plain QAT,
Brevitas's built-in A2Q/A2Q+ and this package's A2Q/A2Q+ with and without Euclidean-projection init.

Setup (one run, every method treated alike):
- Data: Fashion-MNIST 60k/10k IDX files (Debian package dataset-fashion-mnist, or --data-dir).
  Every model is tested on all 10,000 test images.
- Model: ``build_cnn(image_size=28)``: 8-bit signed input quantizer -> conv1 (1->16, 3x3) ->
  conv2 (16->32, 3x3) -> fc (1568->10), W4A4 (4-bit weights, 4-bit unsigned ReLUs), BatchNorm.
- Which layers carry the target P: **conv2 only**. As in the A2Q/A2Q+ papers, the first layer
  (conv1: 8-bit signed input, K = 9; its data types alone need 15 bits) and the last layer
  (fc: K = 1568, data-type bound 19 bits) keep wide accumulators: target 32 for the A2Q methods,
  exact accumulation in the simulation of plain QAT. conv2 does 88% of the network's MACs.
  The same split applies to every method.
- Float baseline: the float twin (``build_float_cnn``), Adam 1e-3 cosine, batch 128,
  --float-epochs epochs over the 60k images, once per seed; its checkpoint is the EP-init source.
- Quantized models: Adam --lr cosine, batch 128, --steps steps (a seeded random subset of
  steps x 128 training images, one pass). "from scratch" rows start from the default init;
  "EP-init" rows copy the float checkpoint of their seed, then ``euclidean_projection_init``,
  and add the A2Q penalty (1e-3). "plain QAT" (no accumulator constraint, Brevitas per-channel
  4-bit weights) is trained once per seed (from scratch and from the float checkpoint) and
  evaluated with conv2 accumulating in a simulated P-bit two's-complement accumulator
  (``int<P>-wrap``), i.e. what hardware without the constraint computes. A2Q models are
  evaluated the same way (their overflow count must be 0).
- Seeds --seeds (default 3); tables give mean ± sample standard deviation over seeds.
- Budget: under an hour on 2 cores. --workers processes (default 2) with 1 torch thread each;
  with the defaults (160 steps, 2 float epochs) a quantized model trains and is evaluated in
  ~30 s on an idle core; 3 seeds x (1 float + 38 quantized) models, ~30 min on 2 idle cores.

Writes accuracy_vs_accumulator.json and .png to --out-dir and prints a markdown table.

Rounding study (``--study rounding``, issue 13): this package's A2Q and A2Q+ with round-to-zero vs
budgeted rounding (``rounding="budgeted"``), default init vs EP-init (+ penalty 1e-3), with the
target P (a) on conv2 only (conv1, fc at 32) and (b) on every layer; P in {16, 12, 10, 8} by
default, 3 seeds. Per model: test accuracy (exact accumulation: the audit proves every layer's
exact worst case fits its target, so a P-bit accumulator computes the same), % of the float twin
of the same seed, share of zero integer weights and all-zero channels per layer, training time.
Every layer at P = 8 is infeasible for this model (conv1's 8-bit signed input: T < 1, no non-zero
integer weight fits) and is recorded as such. Writes accuracy_vs_accumulator_rounding.json/.png
(or --results PATH).

    .venv/bin/python benchmarks/accuracy_vs_accumulator.py                 # the full run
    .venv/bin/python benchmarks/accuracy_vs_accumulator.py --quick         # smoke test, ~1 min
    .venv/bin/python benchmarks/accuracy_vs_accumulator.py --study rounding  # rounding study
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# (label, quantizer, init); init in {"scratch", "ep"}; plain QAT rows use quantizer "none"
METHODS = (
    ("plain QAT", "none", "scratch"),
    ("plain QAT (float init)", "none", "float"),
    ("Brevitas A2Q", "brevitas-a2q", "scratch"),
    ("Brevitas A2Q+", "brevitas-a2q+", "scratch"),
    ("ours A2Q", "a2q", "scratch"),
    ("ours A2Q+", "a2q+", "scratch"),
    ("ours A2Q, EP-init", "a2q", "ep"),
    ("ours A2Q+, EP-init", "a2q+", "ep"),
)
WIDE = {"conv1": 32, "fc": 32}          # layers kept at wide accumulators (target 32 / exact)
SIM_OVERRIDES = {"conv1": None, "fc": None}
PENALTY = 1e-3
_DATA: dict = {}

# rounding study: (quantizer, rounding, init, placement)
ROUNDING_QUANTS = ("a2q", "a2q+")
ROUNDING_MODES = ("zero", "budgeted")
ROUNDING_INITS = ("scratch", "ep")
PLACEMENTS = ("conv2", "all")
ROUNDING_BITS = [16, 12, 10, 8]


def rounding_label(quant: str, rounding: str, init: str) -> str:
    """``"A2Q+, budgeted, EP-init"``."""
    return (f"{'A2Q+' if quant == 'a2q+' else 'A2Q'}, "
            f"{'budgeted' if rounding == 'budgeted' else 'round-to-zero'}, "
            f"{'EP-init' if init == 'ep' else 'default init'}")


def _init_worker(data_dir: str | None, test_limit: int | None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from brevitas_a2q.train.data import load_idx_dataset

    train, test = load_idx_dataset("fashion-mnist", data_dir)
    if test_limit:
        test = torch.utils.data.Subset(test, range(test_limit))
    _DATA.update(train=train, test=test)


def _subset(seed: int, n: int) -> torch.utils.data.Dataset:
    train = _DATA["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))
    return torch.utils.data.Subset(train, order[:n].tolist())


def train_float(seed: int, epochs: int, lr: float, batch: int) -> dict:
    """Float baseline of one seed; returns its row and state dict."""
    from brevitas_a2q.sim.evaluate import evaluate_accuracy
    from brevitas_a2q.train.loop import train_epochs
    from brevitas_a2q.train.models import build_float_cnn

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_float_cnn(image_size=28)
    train_epochs(model, _DATA["train"], epochs, lr=lr, batch_size=batch, seed=seed,
                 progress=False)
    acc, _ = evaluate_accuracy(model, _DATA["test"], batch_size=1000)
    return {"row": {"method": "float", "seed": seed, "P": None, "accuracy": acc,
                    "seconds": time.perf_counter() - start},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def train_quantized(label: str, quant: str, init: str, bits: list[int], seed: int, steps: int,
                    lr: float, batch: int, float_state: dict | None) -> list[dict]:
    """Train one model (one P, or all P for plain QAT) and evaluate it at P-bit accumulators."""
    from brevitas_a2q.analysis.audit import accumulator_report
    from brevitas_a2q.sim.evaluate import evaluate_accuracy
    from brevitas_a2q.train.ep_init import euclidean_projection_init
    from brevitas_a2q.train.loop import train_epochs
    from brevitas_a2q.train.models import build_cnn, build_float_cnn, copy_float_weights

    start = time.perf_counter()
    torch.manual_seed(seed)
    plain = quant == "none"
    target = None if plain else bits[0]
    model = build_cnn(quant, acc_bits=target, image_size=28,
                      layer_acc_bits=None if plain else WIDE)
    example = _DATA["train"].tensors[0][:256]
    if init in ("ep", "float"):
        source = build_float_cnn(image_size=28)
        source.load_state_dict(float_state)
        copy_float_weights(source, model)
    if init == "ep":
        euclidean_projection_init(model, example)
    train_epochs(model, _DATA["train"] if steps <= 0 else _subset(seed, steps * batch), 1,
                 lr=lr, batch_size=batch, penalty_weight=PENALTY if init == "ep" else 0.0,
                 seed=seed, progress=False)
    train_seconds = time.perf_counter() - start
    rows = []
    holds = None
    if not plain:
        report = {r.layer: r for r in accumulator_report(model, example)}
        holds = report["conv2"].target_holds
    # exact accumulation: only plain QAT can differ from its P-bit simulation (A2Q: 0 overflow)
    exact = evaluate_accuracy(model, _DATA["test"], batch_size=1000)[0] if plain else None
    for p in bits:
        acc, stats = evaluate_accuracy(model, _DATA["test"], f"int{p}-wrap", SIM_OVERRIDES,
                                       batch_size=1000)
        conv2 = stats.layers["conv2"]
        rows.append({"method": label, "quant": quant, "init": init, "seed": seed, "P": p,
                     "accuracy": acc, "exact_accuracy": exact,
                     "conv2_overflow_rate": conv2.overflow_rate,
                     "conv2_target_holds": holds, "train_seconds": train_seconds,
                     "seconds": time.perf_counter() - start})
    return rows


def train_rounding_case(quant: str, rounding: str, init: str, placement: str, p: int, seed: int,
                        steps: int, lr: float, batch: int, float_state: dict | None,
                        float_accuracy: float | None) -> list[dict]:
    """One model of the rounding study: build (target P on conv2 or on every layer), optional
    EP-init from the seed's float checkpoint, train, audit exactly, test."""
    from brevitas_a2q.analysis.audit import accumulator_report, capture_layers
    from brevitas_a2q.train.ep_init import euclidean_projection_init
    from brevitas_a2q.train.loop import accuracy, train_epochs
    from brevitas_a2q.train.models import build_cnn, build_float_cnn, copy_float_weights

    start = time.perf_counter()
    row = {"method": rounding_label(quant, rounding, init), "quant": quant, "rounding": rounding,
           "init": init, "placement": placement, "seed": seed, "P": p}
    torch.manual_seed(seed)
    example = _DATA["train"].tensors[0][:256]
    try:
        model = build_cnn(quant, acc_bits=p, image_size=28, rounding=rounding,
                          layer_acc_bits=WIDE if placement == "conv2" else None)
        model(example[:2])  # the bound is checked against the layer's input on the first call
    except ValueError as err:  # conv1 (8-bit signed input) at P = 8: T < 1
        return [{**row, "accuracy": None, "infeasible": " ".join(str(err).split())[:200]}]
    if init == "ep":
        source = build_float_cnn(image_size=28)
        source.load_state_dict(float_state)
        copy_float_weights(source, model)
        euclidean_projection_init(model, example)
    train_epochs(model, _DATA["train"] if steps <= 0 else _subset(seed, steps * batch), 1,
                 lr=lr, batch_size=batch, penalty_weight=PENALTY if init == "ep" else 0.0,
                 seed=seed, progress=False)
    train_seconds = time.perf_counter() - start
    report = accumulator_report(model, example)
    layers = {}
    for cap in capture_layers(model, example):
        q = cap.rows
        layers[cap.name] = {"zero_weight_share": float((q == 0).double().mean()),
                            "zero_channels": int((q.abs().sum(1) == 0).sum()),
                            "out_channels": int(q.shape[0]), "target_bits": cap.target_bits}
    acc = accuracy(model, _DATA["test"], batch_size=1000)
    return [{**row, "accuracy": acc,
             "percent_of_float": 100 * acc / float_accuracy if float_accuracy else None,
             "all_targets_hold": report.all_hold, "layers": layers,
             "train_seconds": train_seconds, "seconds": time.perf_counter() - start}]


def _append_rows(rows: list[dict], partial: Path, result) -> list[dict]:
    """Add a worker's result (one float run ``{"row": ..., "state": ...}`` or a list of rows) to
    ``rows`` and to the ``partial`` JSON-lines file; return the rows added."""
    new = [result["row"]] if isinstance(result, dict) else result
    rows.extend(new)
    with partial.open("a") as f:
        for r in new:
            f.write(json.dumps(r) + "\n")
    return new


def _run_rounding(args: argparse.Namespace, partial: Path, start: float) -> list[dict]:
    """The rounding study on a pool of --workers processes; rows go to ``partial`` as they
    arrive. Default-init models start at once, EP-init ones when their seed's float is done."""
    rows: list[dict] = []
    partial.write_text("")
    jobs = []

    def keep(result) -> None:
        _append_rows(rows, partial, result)
        print(f"  {len(rows)} rows, {time.perf_counter() - start:.0f} s", flush=True)

    common = (args.steps, args.lr, args.batch_size)
    grid = [(q, r, i, pl, b) for q in ROUNDING_QUANTS for r in ROUNDING_MODES
            for i in ROUNDING_INITS for pl in PLACEMENTS for b in args.bits]
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, _init_worker, (args.data_dir, args.test_limit)) as pool:
        floats = [pool.apply_async(train_float, (s, args.float_epochs, args.lr, args.batch_size))
                  for s in range(args.seeds)]
        for s in range(args.seeds):
            jobs += [pool.apply_async(train_rounding_case, (q, r, i, pl, b, s, *common, None,
                                                            None), callback=keep)
                     for q, r, i, pl, b in grid if i == "scratch"]
        for s in range(args.seeds):
            res = floats[s].get()
            keep(res)
            print(f"  float seed {s}: {100 * res['row']['accuracy']:.2f}%", flush=True)
            jobs += [pool.apply_async(train_rounding_case, (q, r, i, pl, b, s, *common,
                                                            res["state"], None), callback=keep)
                     for q, r, i, pl, b in grid if i == "ep"]
        for job in jobs:
            job.get()
    floats_by_seed = {r["seed"]: r["accuracy"] for r in rows if r["method"] == "float"}
    for r in rows:  # % of the float twin of the same seed
        if r["method"] != "float" and r.get("accuracy") is not None:
            r["percent_of_float"] = 100 * r["accuracy"] / floats_by_seed[r["seed"]]
    return rows


def summarize_rounding(rows: list[dict]) -> dict:
    """{placement: {label: {P: {"mean", "std", "values", "percent_of_float", "zero_share",
    "infeasible"}}}}, accuracies in percent."""
    cells: dict = {}
    for r in rows:
        if r["method"] == "float":
            continue
        cells.setdefault(r["placement"], {}).setdefault(r["method"], {}).setdefault(
            r["P"], []).append(r)
    out: dict = {}
    for placement, labels in cells.items():
        for label, by_p in labels.items():
            for p, rs in by_p.items():
                done = [r for r in rs if r.get("accuracy") is not None]
                if not done:
                    out.setdefault(placement, {}).setdefault(label, {})[p] = {
                        "infeasible": rs[0].get("infeasible")}
                    continue
                acc = [100 * r["accuracy"] for r in done]
                pof = [r["percent_of_float"] for r in done if r.get("percent_of_float")]
                names = list(done[0]["layers"])
                out.setdefault(placement, {}).setdefault(label, {})[p] = {
                    "mean": statistics.mean(acc), "std": _spread(acc), "values": acc,
                    "percent_of_float": statistics.mean(pof) if pof else None,
                    "zero_share": {n: statistics.mean(r["layers"][n]["zero_weight_share"]
                                                      for r in done) for n in names},
                    "zero_channels": {n: statistics.mean(r["layers"][n]["zero_channels"]
                                                         for r in done) for n in names},
                    "all_targets_hold": all(r["all_targets_hold"] for r in done)}
    return out


def rounding_table(summary: dict, bits: list[int], float_mean: float | None) -> str:
    """Markdown: one table per placement; cells ``mean ± std (% of float)``, zero shares below."""
    lines = []
    for placement in PLACEMENTS:
        if placement not in summary:
            continue
        where = ("target P on conv2 only (conv1, fc at 32)" if placement == "conv2"
                 else "every layer at P")
        lines += [f"\n**{where}**" + (f" (float {float_mean:.2f}%)" if float_mean else ""), "",
                  "| method | " + " | ".join(f"P = {p}" for p in bits) + " |",
                  "|" + "---|" * (len(bits) + 1)]
        for q in ROUNDING_QUANTS:
            for i in ROUNDING_INITS:
                for r in ROUNDING_MODES:
                    label = rounding_label(q, r, i)
                    if label not in summary[placement]:
                        continue
                    row = []
                    for p in bits:
                        c = summary[placement][label].get(p)
                        if c is None:
                            row.append("–")
                        elif "mean" not in c:
                            row.append("infeasible")
                        else:
                            pof = (f" ({c['percent_of_float']:.0f}%)"
                                   if c["percent_of_float"] else "")
                            zeros = "/".join(f"{100 * v:.0f}" for v in c["zero_share"].values())
                            row.append(f"{c['mean']:.2f} ± {c['std']:.2f}{pof}<br>zeros "
                                       f"{zeros}%")
                    lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("\nzeros: share of zero integer weights in conv1/conv2/fc.")
    return "\n".join(lines)


def plot_rounding(summary: dict, bits: list[int], float_mean: float | None, path: Path) -> None:
    """Two panels (target on conv2 only; every layer at P): accuracy vs P per method; solid
    lines budgeted rounding, dashed round-to-zero; circles default init, squares EP-init."""
    from brevitas_a2q.analysis.plots import legend_outside, pyplot

    plt = pyplot()
    xs = sorted(bits)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.0), sharey=True)
    for ax, placement in zip(axes, PLACEMENTS, strict=True):
        k = 0
        for q in ROUNDING_QUANTS:
            for i in ROUNDING_INITS:
                for r in ROUNDING_MODES:
                    label = rounding_label(q, r, i)
                    cells = summary.get(placement, {}).get(label, {})
                    have = [p for p in xs if "mean" in cells.get(p, {})]
                    if not have:
                        continue
                    ax.errorbar([xs.index(p) + 0.03 * (k - 3.5) for p in have],
                                [cells[p]["mean"] for p in have],
                                yerr=[cells[p]["std"] for p in have], capsize=2,
                                color=f"C{ROUNDING_QUANTS.index(q) * 2 + ROUNDING_INITS.index(i)}",
                                linestyle="-" if r == "budgeted" else "--",
                                marker="o" if i == "scratch" else "s", markersize=5, label=label)
                    k += 1
        if float_mean:
            ax.axhline(float_mean, color="black", linewidth=1, label=f"float {float_mean:.2f}%")
            ax.axhline(0.85 * float_mean, color="gray", linewidth=1, linestyle=":",
                       label="85% of float")
        ax.set_xticks(range(len(xs)), [str(p) for p in xs])
        ax.set_xlabel("accumulator bits P" + (" of conv2 (conv1, fc: 32)"
                                              if placement == "conv2" else " of every layer"))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Fashion-MNIST test accuracy (%)")
    legend_outside(axes[1])
    fig.suptitle("round-to-zero vs budgeted rounding, W4A4 CNN (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main_rounding(args: argparse.Namespace, json_path: Path, png_path: Path) -> int:
    """``--study rounding``: run (or summarize) the study and write its JSON, PNG and table."""
    from brevitas_a2q.io import atomic_output

    partial = json_path.with_suffix(".partial.jsonl")
    start = time.perf_counter()
    if args.summarize_partial:
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line]
        print(f"summarizing {len(rows)} rows of an interrupted run from {partial}")
    elif args.replot:
        rows = json.loads(json_path.read_text())["rows"]
    else:
        print(f"rounding study: Fashion-MNIST, W4A4 CNN, P in {args.bits}, {args.seeds} seeds, "
              f"{args.steps} steps/model, float {args.float_epochs} epochs; {args.workers} "
              "worker processes x 1 torch thread", flush=True)
        rows = _run_rounding(args, partial, start)
    wall = time.perf_counter() - start
    floats = [100 * r["accuracy"] for r in rows if r["method"] == "float"]
    float_mean = statistics.mean(floats) if floats else None
    summary = summarize_rounding(rows)
    table = rounding_table(summary, args.bits, float_mean)
    violations = [r for r in rows if r.get("all_targets_hold") is False]
    if not args.replot:
        result = {
            "benchmark": "accuracy_vs_accumulator rounding study", "issue": 13,
            "dataset": "fashion-mnist (60k/10k)" if not args.test_limit else
                       f"fashion-mnist (60k/{args.test_limit})",
            "model": "build_cnn(image_size=28), W4A4, 8-bit signed input",
            "placements": {"conv2": "target P on conv2, conv1 and fc at 32",
                           "all": "target P on conv1, conv2 and fc"},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "penalty_weight_ep_rows": PENALTY, "workers": args.workers,
            "torch_threads_per_worker": 1, "wall_seconds": wall,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "float": {"mean": float_mean, "values": floats},
            "summary": {pl: {m: {str(p): c for p, c in d.items()} for m, d in ms.items()}
                        for pl, ms in summary.items()},
            "a2q_target_violations": len(violations), "rows": rows,
        }
        with atomic_output(json_path, args.overwrite) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    with atomic_output(png_path, True if args.replot else args.overwrite) as tmp:
        plot_rounding(summary, args.bits, float_mean, tmp)
    print(f"\nFashion-MNIST test accuracy (%), mean ± std over {args.seeds} seed(s), "
          "(% of float), share of zero weights per layer:")
    print(table)
    print(f"\nmodels whose exact worst case exceeds a target: {len(violations)}")
    print(f"wall time {wall / 60:.1f} min; wrote {json_path} and {png_path}")
    if not (args.summarize_partial or args.replot):
        partial.unlink(missing_ok=True)
    return 0


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], bits: list[int]) -> dict:
    """{method: {P or "float": {"mean", "std", "values"}}} in percent."""
    out: dict = {}
    for r in rows:
        key = "float" if r["method"] == "float" else r["P"]
        out.setdefault(r["method"], {}).setdefault(key, []).append(100 * r["accuracy"])
    return {m: {k: {"mean": statistics.mean(v), "std": _spread(v), "values": v}
                for k, v in d.items()} for m, d in out.items()}


def markdown_table(summary: dict, bits: list[int]) -> str:
    head = "| method | " + " | ".join(f"P = {p}" for p in bits) + " |"
    lines = [head, "|" + "---|" * (len(bits) + 1)]
    f = summary["float"]["float"]
    lines.append("| float (no quantization) | " + " | ".join(
        [f"{f['mean']:.2f} ± {f['std']:.2f}"] + ["″"] * (len(bits) - 1)) + " |")
    for label, _, _ in METHODS:
        if label in summary:
            cells = [f"{summary[label][p]['mean']:.2f} ± {summary[label][p]['std']:.2f}"
                     if p in summary[label] else "–" for p in bits]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(summary: dict) -> list[str]:
    """The done-when checks at P = 12."""
    out = []
    if "float" not in summary:
        return out
    f = summary["float"]["float"]["mean"]
    for label in ("ours A2Q+, EP-init", "ours A2Q+"):
        if 12 not in summary.get(label, {}):
            continue
        a = summary[label][12]["mean"]
        ok = a >= 0.99 * f
        out.append(f"P=12 {label}: {a:.2f}% = {100 * a / f:.1f}% of float {f:.2f}% "
                   f"(target >= 99%): {'MET' if ok else f'MISSED by {0.99 * f - a:.2f} points'}")
    for ours, theirs in (("ours A2Q", "Brevitas A2Q"), ("ours A2Q+", "Brevitas A2Q+")):
        for p in sorted(set(summary.get(ours, {})) & set(summary.get(theirs, {})),
                        key=lambda x: -x):
            a, b = summary[ours][p], summary[theirs][p]
            noise = (a["std"] ** 2 + b["std"] ** 2) ** 0.5
            diff = a["mean"] - b["mean"]
            tag = "ok" if diff >= -2 * noise - 1e-9 else "WORSE beyond 2x seed noise"
            out.append(f"P={p:>2} {ours} - {theirs}: {diff:+.2f} points "
                       f"(seed noise {noise:.2f}): {tag}")
    return out


MARKERS = ("o", "s", "^", "v", "D", "X", "P", "*")


def _same_as(summary: dict, label: str) -> str | None:
    """The Brevitas row whose means equal ``label``'s at every P ("ours A2Q" -> "Brevitas A2Q")."""
    twin = label.replace("ours", "Brevitas", 1)
    if not label.startswith("ours") or twin not in summary:
        return None
    same = summary[label].keys() == summary[twin].keys() and all(
        abs(summary[label][p]["mean"] - summary[twin][p]["mean"]) < 1e-9 for p in summary[label])
    return twin if same else None


def _zoom_range(summary: dict, floor: float) -> tuple[float, float]:
    """A y range holding every mean within 10 points of the float accuracy ``floor``."""
    near = [c["mean"] - c["std"] for label, cells in summary.items() if label != "float"
            for c in cells.values() if c["mean"] > floor - 10]
    return float(int(min(near + [floor - 2]) - 1)), float(int(floor) + 1.5)


def plot(summary: dict, bits: list[int], path: Path) -> None:
    """Two panels: every method on the full 0-100% range, and a zoom on the top of the range
    where the methods differ. Curves that coincide are offset sideways and drawn with distinct
    markers; a row identical to Brevitas's says so in the legend. Writes a PNG to ``path``."""
    from brevitas_a2q.analysis.plots import legend_outside, pyplot

    plt = pyplot()
    xs = sorted(bits)
    position = {p: i for i, p in enumerate(xs)}  # evenly spaced: P = 32 is not 2x P = 16
    labels = [label for label, _, _ in METHODS if label in summary]
    inits = {label: init for label, _, init in METHODS}
    f = summary["float"]["float"]["mean"]
    seeds = len(summary["float"]["float"].get("values", [])) or "?"
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.0), gridspec_kw={"width_ratios": [1, 1.25]})
    for ax in (full, zoom):
        for i, label in enumerate(labels):
            have = [p for p in xs if p in summary[label]]
            offset = (i - (len(labels) - 1) / 2) * 0.045 * min(len(xs), 6) / 6
            twin = _same_as(summary, label)
            ax.errorbar([position[p] + offset for p in have],
                        [summary[label][p]["mean"] for p in have],
                        yerr=[summary[label][p]["std"] for p in have], capsize=2,
                        marker=MARKERS[i % len(MARKERS)], markersize=5, color=f"C{i}",
                        linestyle="--" if inits[label] == "ep" else (":" if twin else "-"),
                        label=f"{label} (= {twin})" if twin else label)
        ax.axhline(f, color="black", linewidth=1, label=f"float {f:.2f}%")
        ax.axhline(0.99 * f, color="gray", linewidth=1, linestyle=":", label="99% of float")
        ax.set_xticks(range(len(xs)), [str(p) for p in xs])
        ax.set_xlabel("accumulator bits P of conv2 (conv1 and fc: 32)")
        ax.grid(alpha=0.3)
    full.set_ylim(0, 100)
    full.set_ylabel("Fashion-MNIST test accuracy (%)")
    full.set_title("all methods, 0-100%")
    lo, hi = _zoom_range(summary, f)
    zoom.set_ylim(lo, hi)
    below = any(c["mean"] < lo for label, cells in summary.items() for c in cells.values())
    zoom.set_title(f"zoom on {lo:.0f}-{hi:.1f}%" + (" (lower points off the panel)" if below else ""))
    fig.suptitle(f"W4A4 CNN on Fashion-MNIST: accuracy vs accumulator width "
                 f"(mean ± std over {seeds} seeds)")
    legend_outside(zoom)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _run_all(args: argparse.Namespace, partial: Path, start: float) -> list[dict]:
    """Every model on a pool of --workers processes, seed by seed; rows are appended to
    ``partial`` as they arrive (an interrupted run can be summarized with --summarize-partial)."""
    rows: list[dict] = []
    partial.write_text("")
    jobs = []

    def keep(result) -> None:
        new = _append_rows(rows, partial, result)
        if len(rows) % 10 < len(new) or isinstance(result, dict):
            print(f"  {sum(j.ready() for j in jobs) + 1}/{len(jobs)} jobs done, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    common = (args.steps, args.lr, args.batch_size)
    wanted = {label for label, _, _ in METHODS if args.methods is None or label in args.methods}
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, _init_worker, (args.data_dir, args.test_limit)) as pool:
        floats = [pool.apply_async(train_float, (s, args.float_epochs, args.lr, args.batch_size))
                  for s in range(args.seeds)]
        for s in range(args.seeds):
            if "plain QAT" in wanted:
                jobs.append(pool.apply_async(train_quantized, ("plain QAT", "none", "scratch",
                                                               args.bits, s, *common, None),
                                             callback=keep))
            for label, quant, init in METHODS:
                if init == "scratch" and quant != "none" and label in wanted:
                    jobs += [pool.apply_async(train_quantized, (label, quant, init, [b], s,
                                                                *common, None), callback=keep)
                             for b in args.bits]
            res = floats[s].get()
            keep(res)
            print(f"  float seed {s}: {100 * res['row']['accuracy']:.2f}% "
                  f"({res['row']['seconds']:.0f} s)", flush=True)
            if "plain QAT (float init)" in wanted:
                jobs.append(pool.apply_async(train_quantized, (
                    "plain QAT (float init)", "none", "float", args.bits, s, *common,
                    res["state"]), callback=keep))
            for label, quant, init in METHODS:
                if init == "ep" and label in wanted:
                    jobs += [pool.apply_async(train_quantized, (label, quant, init, [b], s,
                                                                *common, res["state"]),
                                              callback=keep)
                             for b in args.bits]
        for job in jobs:
            job.get()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--study", default="methods", choices=["methods", "rounding"],
                   help="methods: every method at P on conv2 (the README table); rounding: "
                        "round-to-zero vs budgeted rounding")
    p.add_argument("--bits", type=int, nargs="+", default=None,
                   help="accumulator widths P (default: 32 16 14 12 10 8; rounding study: "
                        "16 12 10 8)")
    p.add_argument("--results", type=Path, default=None, metavar="PATH",
                   help="JSON output path (the PNG and partial rows go beside it); default "
                        "OUT_DIR/accuracy_vs_accumulator[_rounding][_TAG].json")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=160,
                   help="training steps (batches of --batch-size) of each quantized model")
    p.add_argument("--float-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="processes, 1 torch thread each")
    p.add_argument("--test-limit", type=int, default=None, help="(smoke tests only)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--methods", nargs="+", default=None, metavar="LABEL",
                   help="run only these rows (labels as in the table, e.g. 'ours A2Q+, "
                        "EP-init'); the float baseline always runs")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--replot", "--plot-only", action="store_true",
                   help="redraw the PNG from the JSON of an earlier run (no training)")
    p.add_argument("--summarize-partial", action="store_true",
                   help="write the JSON/PNG/table from the rows an interrupted run left in "
                        "OUT_DIR/accuracy_vs_accumulator.partial.jsonl")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, P in {16, 12}, 5 steps, 1k test images")
    args = p.parse_args(argv)
    if args.bits is None:
        args.bits = list(ROUNDING_BITS) if args.study == "rounding" else [32, 16, 14, 12, 10, 8]
    if args.quick:
        args.seeds, args.bits, args.steps, args.float_epochs = 1, [16, 12], 5, 1
        args.test_limit = args.test_limit or 1000
    from brevitas_a2q.io import atomic_output

    args.out_dir.mkdir(parents=True, exist_ok=True)
    labels = [label for label, _, _ in METHODS]
    unknown = sorted(set(args.methods or []) - set(labels))
    if unknown:
        print(f"unknown --methods {unknown}; choose from {labels}", file=sys.stderr)
        return 2
    stem = ("accuracy_vs_accumulator" + ("_rounding" if args.study == "rounding" else "")
            + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else ""))
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
    if args.results is not None:
        json_path = args.results.with_suffix(".json")
        png_path = json_path.with_suffix(".png")
        json_path.parent.mkdir(parents=True, exist_ok=True)
    if args.study == "rounding":
        if not args.replot:
            for path in (json_path, png_path):
                if path.exists() and not args.overwrite:
                    print(f"{path} exists; pass --overwrite", file=sys.stderr)
                    return 2
        return main_rounding(args, json_path, png_path)
    if args.replot:
        saved = json.loads(json_path.read_text())
        bits = saved["settings"]["bits"]
        with atomic_output(png_path, overwrite=True) as tmp:
            plot(summarize(saved["rows"], bits), bits, tmp)
        print(f"redrew {png_path} from {json_path}")
        return 0
    for path in (json_path, png_path):
        if path.exists() and not args.overwrite:
            print(f"{path} exists; pass --overwrite", file=sys.stderr)
            return 2
    print(f"accuracy vs accumulator: Fashion-MNIST, W4A4 CNN, P in {args.bits}, "
          f"{args.seeds} seeds, {args.steps} steps/model, float {args.float_epochs} epochs; "
          f"{args.workers} worker processes x 1 torch thread", flush=True)
    start = time.perf_counter()
    partial = json_path.with_suffix(".partial.jsonl")
    if args.summarize_partial:
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line]
        print(f"summarizing {len(rows)} rows of an interrupted run from {partial}")
    else:
        rows = _run_all(args, partial, start)
    wall = time.perf_counter() - start
    summary = summarize(rows, args.bits)
    table = markdown_table(summary, args.bits)
    checks = verdicts(summary)
    violations = [r for r in rows if r.get("conv2_target_holds") is False]
    result = {
        "benchmark": "accuracy_vs_accumulator", "dataset": "fashion-mnist (60k/10k)",
        "model": "build_cnn(image_size=28), W4A4, 8-bit signed input",
        "target_layers": {"conv2": "P", "conv1": "32 (exact in simulation)",
                          "fc": "32 (exact in simulation)"},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "penalty_weight_ep_rows": PENALTY,
        "workers": args.workers, "torch_threads_per_worker": 1,
        "wall_seconds": wall, "machine": {"cpus": os.cpu_count(),
                                          "python": platform.python_version(),
                                          "torch": torch.__version__},
        "summary": {m: {str(k): v for k, v in d.items()} for m, d in summary.items()},
        "checks": checks, "a2q_target_violations": len(violations), "rows": rows,
    }
    with atomic_output(json_path, args.overwrite) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    with atomic_output(png_path, args.overwrite) as tmp:
        plot(summary, args.bits, tmp)
    print(f"\nFashion-MNIST test accuracy (%), W4A4 CNN, target P on conv2 (conv1, fc at 32 "
          f"bits), mean ± std over {args.seeds} seed(s):\n")
    print(table)
    print()
    for line in checks:
        print(line)
    print(f"A2Q models whose conv2 exceeds its target: {len(violations)}")
    print(f"\nwall time {wall / 60:.1f} min with {args.workers} worker processes x 1 thread; "
          f"wrote {json_path} and {png_path}")
    if not args.summarize_partial:
        partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
