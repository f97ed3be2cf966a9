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

    .venv/bin/python benchmarks/accuracy_vs_accumulator.py                 # the full run
    .venv/bin/python benchmarks/accuracy_vs_accumulator.py --quick         # smoke test, ~1 min
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


def _init_worker(data_dir: str | None, test_limit: int | None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from brevitas_a2q.data import load_idx_dataset

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
    from brevitas_a2q.accumulator_sim import evaluate_accuracy
    from brevitas_a2q.models import build_float_cnn
    from brevitas_a2q.training import train_epochs

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
    from brevitas_a2q.accumulator_sim import evaluate_accuracy
    from brevitas_a2q.audit import accumulator_report
    from brevitas_a2q.models import build_cnn, build_float_cnn, copy_float_weights
    from brevitas_a2q.training import euclidean_projection_init, train_epochs

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
    from brevitas_a2q.plots import legend_outside, pyplot

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
        new = [result["row"]] if isinstance(result, dict) else result
        rows.extend(new)
        with partial.open("a") as f:
            for r in new:
                f.write(json.dumps(r) + "\n")
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
    p.add_argument("--bits", type=int, nargs="+", default=[32, 16, 14, 12, 10, 8])
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
    stem = ("accuracy_vs_accumulator" + ("_quick" if args.quick else "")
            + (f"_{args.tag}" if args.tag else ""))
    json_path, png_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.png"
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
    partial = args.out_dir / f"{stem}.partial.jsonl"
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
