"""The claims of Blumenfeld, Hubara, Soudry, "Towards Cheaper Inference in Deep Networks with Lower
Bit-Width Accumulators" (ICLR 2024), measured on this package's simulation:

(a) fine-tuned under 12-bit accumulators (floating point fp12-e4m7 and saturating int12, each with
    and without chunks of 16 products) a network loses no significant accuracy against the same
    network with exact accumulators;
(b) under narrower accumulators, the fine-grained gradient approximations (``immediate``,
    ``recursive``: per multiply-add) fine-tune to higher accuracy than the identity STE (``ste``).

Setup (every configuration treated alike, 3 seeds by default):
- Data: Fashion-MNIST (60k/10k IDX files, Debian package dataset-fashion-mnist or --data-dir).
- Networks, W4A4 plain QAT (Brevitas per-channel 4-bit weights, no accumulator constraint: the
  paper's setting), trained here with exact accumulators, one model per seed:
  ``cnn``: ``build_cnn(quant="none", image_size=28)``; ``resnet20``: :class:`ResNet20` (ResNet-20
  from Brevitas's ``QuantBasicBlock``, 16/32/64 channels, 271k weights, 28x28 grayscale).
- Simulated layers: every hidden layer (cnn: conv2; resnet20: the 19 block convolutions and
  shortcuts). The first and last layers keep exact accumulators, as in the paper.
- Fine-tuning: Adam --lr (cosine), batch 64, --finetune-images training images (a seeded subset,
  one pass), BatchNorm in training mode. The reference ("exact") is the same fine-tuning with
  exact accumulators, so every row has had the same extra training.
- Accuracy: the model evaluated under the accumulator it was fine-tuned for, on the first
  --test-images test images (cnn: all 10,000). "before" rows: the trained model under that
  accumulator without fine-tuning.
- Verdicts (per network and format, over seeds): (a) holds where the mean accuracy is at most
  --tolerance points below the exact reference; (b) a mode helps where it beats ``ste`` in every
  seed, hurts where it loses in every seed, otherwise "no clear difference".

Resumable: each finished configuration is appended to <out-dir>/low_bitwidth_finetune.partial.jsonl
and trained models are cached under <out-dir>/cache; a rerun skips what is there.

    .venv/bin/python benchmarks/low_bitwidth_finetune.py               # the full run (under an hour, 2 cores)
    .venv/bin/python benchmarks/low_bitwidth_finetune.py --quick       # smoke test, a few minutes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

TWELVE_BIT = ("fp12-e4m7", "fp12-e4m7-c16", "int12-sat", "int12-sat-c16")
NARROW = ("fp9-e5m3", "fp8-e5m2", "int9-sat", "int8-sat")
GRADIENTS = ("ste", "immediate", "recursive")
NETWORKS = ("cnn", "resnet20")
BATCH = 64
RESULTS = Path(__file__).resolve().parent / "results"
_DATA: dict = {}


def build(network: str) -> torch.nn.Module:
    from brevitas_a2q.train.models import build_cnn
    from brevitas_a2q.train.resnet import build_resnet20

    return build_cnn("none", image_size=28) if network == "cnn" else build_resnet20("none")


# the first and last layers (named alike in both networks) keep exact accumulators
EXACT_LAYERS = {"conv1": None, "fc": None}


def _init_worker(data_dir: str | None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from brevitas_a2q.train.data import load_idx_dataset

    _DATA["train"], _DATA["test"] = load_idx_dataset("fashion-mnist", data_dir)


def _loader(seed: int, images: int) -> torch.utils.data.DataLoader:
    train = _DATA["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))
    subset = torch.utils.data.Subset(train, order[:images].tolist())
    return torch.utils.data.DataLoader(subset, batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _test(images: int) -> torch.utils.data.Dataset:
    return torch.utils.data.Subset(_DATA["test"], range(min(images, len(_DATA["test"]))))


def trained(network: str, seed: int, args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    """The seed's W4A4 model trained with exact accumulators (cached); returns it and the
    seconds its training took (0 when it came from the cache)."""
    from brevitas_a2q.train.loop import train_epochs

    path = Path(args.out_dir) / "cache" / f"{network}_seed{seed}_{args.train_images}x{args.epochs}.pt"
    torch.manual_seed(seed)
    model = build(network)
    with torch.no_grad():
        model.train()(next(iter(_loader(seed, BATCH)))[0])
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval(), 0.0
    start = time.perf_counter()
    train_epochs(model, _loader(seed, args.train_images), args.epochs, lr=1e-3, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return model.eval(), time.perf_counter() - start


def _evaluate(model, network: str, spec: str | None, args) -> dict:
    from brevitas_a2q.sim.evaluate import evaluate_accuracy

    test = _test(args.test_images[network])
    acc, stats = evaluate_accuracy(model, test, spec, EXACT_LAYERS if spec else None,
                                   batch_size=250)
    row = {"accuracy": acc, "test_images": len(test)}
    if stats is not None:
        row["overflow_rate"] = max((s.overflow_rate for s in stats.layers.values()), default=0.0)
        row["simulated_layers"] = len(stats.layers)
    return row


def _finetuned(base: dict, network: str, seed: int, spec: str | None, gradient: str, args) -> dict:
    """A copy of the trained model fine-tuned under ``spec`` (exact when None), evaluated under
    the same accumulator."""
    from brevitas_a2q.sim.evaluate import finetune
    from brevitas_a2q.train.loop import train_epochs

    torch.manual_seed(seed)
    model = build(network)
    model.load_state_dict(base)
    loader = _loader(seed + 100, args.finetune_images)
    start = time.perf_counter()
    if spec is None:
        train_epochs(model, loader, 1, lr=args.lr, progress=False)
    else:
        finetune(model, loader, spec, 1, args.lr, EXACT_LAYERS, gradient, progress=False)
    seconds = time.perf_counter() - start
    return {**_evaluate(model, network, spec, args), "finetune_seconds": seconds}


def run_seed(network: str, seed: int, args: argparse.Namespace, done: set) -> list[dict]:
    """Every configuration of one (network, seed) not in ``done``; appends each row to the
    partial file as it finishes."""
    model, train_seconds = trained(network, seed, args)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    plan = [("base", None, None), ("finetuned", None, "ste")]
    plan += [("before", spec, None) for spec in (*TWELVE_BIT, *args.narrow)]
    plan += [("finetuned", spec, "ste") for spec in TWELVE_BIT]
    plan += [("finetuned", spec, g) for spec in args.narrow for g in GRADIENTS]
    rows = []
    for stage, spec, gradient in plan:
        key = (network, seed, stage, spec or "exact", gradient)
        if key in done:
            continue
        start = time.perf_counter()
        if stage == "finetuned":
            result = _finetuned(base, network, seed, spec, gradient, args)
        else:
            model.load_state_dict(base)
            result = _evaluate(model, network, spec, args)
        row = {"network": network, "seed": seed, "stage": stage, "accumulator": spec or "exact",
               "gradient": gradient, **result, "seconds": time.perf_counter() - start,
               "train_seconds": train_seconds}
        with open(Path(args.out_dir) / "low_bitwidth_finetune.partial.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{network} seed {seed} {stage} {spec or 'exact'} {gradient or ''}: "
              f"{100 * row['accuracy']:.2f}% ({row['seconds']:.0f} s)", flush=True)
        rows.append(row)
    return rows


def _job(job: tuple) -> list[dict]:
    return run_seed(*job)


def _key(row: dict) -> tuple:
    return row["network"], row["seed"], row["stage"], row["accumulator"], row["gradient"]


def load_partial(path: Path) -> list[dict]:
    """The finished configurations in a partial file, one row each: the last one written
    where two runs over one directory both finished it."""
    lines = path.read_text().splitlines() if path.exists() else []
    return list({_key(r): r for r in map(json.loads, lines)}.values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _before(by: dict, network: str, spec: str, seeds: list[int]) -> float:
    """Mean accuracy of the trained models under ``spec`` without fine-tuning, over ``seeds``."""
    before = by.get((network, "before", spec, None), {})
    return statistics.fmean(before[s] for s in seeds)


def summarize(rows: list[dict], tolerance: float) -> dict:
    """Per network: mean ± std (percent) per (stage, accumulator, gradient), claim (a) per 12-bit
    format against the exact fine-tuned reference, claim (b) per narrow format and mode against
    ``ste`` (paired by seed)."""
    by = {}
    for r in rows:
        by.setdefault((r["network"], r["stage"], r["accumulator"], r["gradient"]), {})[r["seed"]] = \
            100 * r["accuracy"]
    out: dict = {}
    for network in sorted({r["network"] for r in rows}):
        ref = by.get((network, "finetuned", "exact", "ste"), {})
        net = out[network] = {"cells": [], "twelve_bit": [], "fine_grained": []}
        for (n, stage, acc, grad), seeds in sorted(by.items(), key=lambda kv: str(kv[0])):
            if n == network:
                mean, std = _mean_std(list(seeds.values()))
                net["cells"].append({"stage": stage, "accumulator": acc, "gradient": grad,
                                     "mean": mean, "std": std, "seeds": len(seeds)})
        for spec in TWELVE_BIT:
            tuned = by.get((network, "finetuned", spec, "ste"), {})
            common = sorted(set(tuned) & set(ref))
            if not common:
                continue
            drops = [ref[s] - tuned[s] for s in common]
            mean_drop = statistics.fmean(drops)
            trained = by.get((network, "base", "exact", None), {})
            net["twelve_bit"].append({
                "accumulator": spec, "trained": statistics.fmean(trained[s] for s in common),
                "exact": statistics.fmean(ref[s] for s in common),
                "before": _before(by, network, spec, common),
                "finetuned": statistics.fmean(tuned[s] for s in common), "drop": mean_drop,
                "seeds": len(common), "holds": mean_drop <= tolerance})
        for spec in sorted({r["accumulator"] for r in rows if r["gradient"] == "immediate"}):
            ste = by.get((network, "finetuned", spec, "ste"), {})
            for mode in ("immediate", "recursive"):
                tuned = by.get((network, "finetuned", spec, mode), {})
                common = sorted(set(tuned) & set(ste))
                if not common:
                    continue
                gains = [tuned[s] - ste[s] for s in common]
                verdict = ("helps" if all(g > 0 for g in gains) else
                           "hurts" if all(g < 0 for g in gains) else "no clear difference")
                net["fine_grained"].append({
                    "accumulator": spec, "gradient": mode,
                    "before": _before(by, network, spec, common),
                    "ste": statistics.fmean(ste[s] for s in common),
                    "finetuned": statistics.fmean(tuned[s] for s in common),
                    "gain": statistics.fmean(gains), "gains": gains, "seeds": len(common),
                    "verdict": verdict})
    return out


def tables(summary: dict) -> str:
    """The README/docs tables (markdown), generated from the summary."""
    lines = ["| network | accumulator | trained (exact) | before fine-tuning | fine-tuned "
             "| exact (same fine-tuning) | drop (points) | no significant loss? |",
             "|---|---|---|---|---|---|---|---|"]
    for network, net in summary.items():
        for r in net["twelve_bit"]:
            lines.append(f"| {network} | {r['accumulator']} | {r['trained']:.2f} | {r['before']:.2f} "
                         f"| {r['finetuned']:.2f} "
                         f"| {r['exact']:.2f} | {r['drop']:+.2f} | {'yes' if r['holds'] else 'no'} |")
    lines += ["", "| network | accumulator | before fine-tuning | ste | gradient | fine-tuned "
              "| gain over ste (points, per seed) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for network, net in summary.items():
        for r in net["fine_grained"]:
            per_seed = ", ".join(f"{g:+.2f}" for g in r["gains"])
            lines.append(f"| {network} | {r['accumulator']} | {r['before']:.2f} | {r['ste']:.2f} "
                         f"| {r['gradient']} | {r['finetuned']:.2f} | {r['gain']:+.2f} ({per_seed}) "
                         f"| {r['verdict']} |")
    return "\n".join(lines)


def readme_table(summary: dict) -> str:
    """One row per network: the claims' verdicts over its formats (the README's table)."""
    lines = ["| network | 12-bit formats without significant loss | largest drop (points) "
             "| immediate vs ste | recursive vs ste |", "|---|---|---|---|---|"]
    for network, net in summary.items():
        twelve = net["twelve_bit"]
        worst = max(twelve, key=lambda r: r["drop"])
        modes = []
        for mode in ("immediate", "recursive"):
            cells = [r for r in net["fine_grained"] if r["gradient"] == mode]
            count = {v: sum(r["verdict"] == v for r in cells) for v in ("helps", "hurts")}
            modes.append(f"helps on {count['helps']}/{len(cells)} formats, hurts on {count['hurts']}")
        lines.append(f"| {network} | {sum(r['holds'] for r in twelve)}/{len(twelve)} "
                     f"| {worst['drop']:+.2f} ({worst['accumulator']}) | {modes[0]} | {modes[1]} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """One panel per network: accuracy per accumulator, before / fine-tuned per gradient mode,
    with the exact reference as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(7 * len(summary), 4.8), squeeze=False)
    styles = {("before", None): ("before fine-tuning", "lightgray"), ("finetuned", "ste"): ("ste", "C0"),
              ("finetuned", "immediate"): ("immediate", "C1"),
              ("finetuned", "recursive"): ("recursive", "C2")}
    for ax, (network, net) in zip(axes[0], summary.items(), strict=True):
        cells = {(c["stage"], c["accumulator"], c["gradient"]): c for c in net["cells"]}
        measured = [c["accumulator"] for c in net["cells"] if c["stage"] == "before"]
        order = [*TWELVE_BIT, *NARROW]
        specs = sorted(measured, key=lambda s: (order.index(s) if s in order else len(order), s))
        width = 0.8 / len(styles)
        for i, ((stage, grad), (label, color)) in enumerate(styles.items()):
            xs = [j + (i - 1.5) * width for j, s in enumerate(specs) if (stage, s, grad) in cells]
            cs = [cells[(stage, s, grad)] for s in specs if (stage, s, grad) in cells]
            ax.bar(xs, [c["mean"] for c in cs], width, yerr=[c["std"] for c in cs], label=label,
                   color=color, capsize=2)
        exact = cells.get(("finetuned", "exact", "ste"))
        if exact:
            ax.axhline(exact["mean"], color="k", linestyle="--", linewidth=1,
                       label=f"exact accumulators ({exact['mean']:.1f}%)")
        ax.set_xticks(range(len(specs)), specs, rotation=30, ha="right")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(f"{network}: fine-tuning under simulated accumulators")
        low = min(c["mean"] for c in net["cells"])
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle("Low bit-width accumulators (Blumenfeld et al., ICLR 2024), Fashion-MNIST W4A4")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def redraw(out: Path) -> int:
    """Summary, PNG and tables again from the rows of ``out``'s results file."""
    path = out / "low_bitwidth_finetune.json"
    result = json.loads(path.read_text())
    result["summary"] = summarize(result["rows"], result["settings"]["tolerance"])
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result["summary"], out / "low_bitwidth_finetune.png")
    print(readme_table(result["summary"]))
    print()
    print(tables(result["summary"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-images", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--resnet-test-images", type=int, default=1000)
    parser.add_argument("--narrow", nargs="+", default=list(NARROW))
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="claim (a) holds where the mean drop is at most this (points)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-dir")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny sizes (smoke test)")
    parser.add_argument("--plot-only", action="store_true",
                        help="redo the summary, tables and PNG from <out-dir>'s JSON (no training)")
    args = parser.parse_args(argv)
    if args.plot_only:
        return redraw(Path(args.out_dir))
    if args.quick:
        args.seeds, args.train_images, args.epochs, args.finetune_images = 1, 1024, 1, 128
        args.resnet_test_images, args.narrow = 128, args.narrow[:1]
    args.test_images = {"cnn": 10000, "resnet20": args.resnet_test_images}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "low_bitwidth_finetune.partial.jsonl"
    rows = load_partial(partial)
    resumed = len(rows)
    done = {_key(r) for r in rows}
    jobs = [(n, s, args, done) for n in reversed(args.networks) for s in range(args.seeds)]
    start = time.perf_counter()
    with mp.get_context("fork").Pool(args.workers, _init_worker, (args.data_dir,)) as pool:
        for new in pool.imap_unordered(_job, jobs):
            rows += new
    summary = summarize(rows, args.tolerance)
    result = {
        "paper": "Blumenfeld, Hubara, Soudry, ICLR 2024 (arXiv:2401.14110)",
        "command": "python benchmarks/low_bitwidth_finetune.py" + (" --quick" if args.quick else ""),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "data_dir")},
        "machine": {"cpus": mp.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads_per_worker": 1},
        "wall_seconds": time.perf_counter() - start,  # of this run only, where it resumed
        "rows_from_earlier_runs": resumed,
        "rows": sorted(rows, key=lambda r: str(_key(r))), "summary": summary}
    (out / "low_bitwidth_finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, out / "low_bitwidth_finetune.png")
    print(readme_table(summary))
    print()
    print(tables(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
