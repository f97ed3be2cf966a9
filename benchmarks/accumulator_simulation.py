"""Simulated accumulators: cost against a plain forward pass, and accuracy at P bits.

Part 1 (cost): the benchmark CNN (build_cnn, 28x28 input, 16/32 channels, W4A4) on one batch;
each accumulator mode is timed interleaved with the plain forward pass (median of --reps), and the
ratio printed.
Part 2 (accuracy, skip with --skip-accuracy): Fashion-MNIST at P in --bits: plain QAT evaluated at
P-bit accumulators (wraparound), plain QAT fine-tuned under the simulated accumulator (Blumenfeld
et al. 2024; integer saturating at P and fp12-e4m7-c16), A2Q and A2Q+ trained at P.

Data: Fashion-MNIST IDX files from /usr/share/datasets/fashion-mnist/ (Debian package
dataset-fashion-mnist) when present; otherwise scikit-learn's digits upsampled to 28x28, with a
printed note. Outputs a table, JSON and a PNG plot in --out-dir.

    .venv/bin/python benchmarks/accumulator_simulation.py --skip-accuracy
    .venv/bin/python benchmarks/accumulator_simulation.py --epochs 2 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.io import atomic_output
from brevitas_a2q.sim.evaluate import evaluate_accuracy, finetune
from brevitas_a2q.sim.layers import simulate_accumulators
from brevitas_a2q.train.data import load_digits, load_idx_dataset
from brevitas_a2q.train.models import build_cnn

COST_MODES = ("int16-wrap", "int12-wrap", "int12-sat", "int12-sat-c32", "fp12-e4m7",
              "fp12-e4m7-c16")


def load_data() -> tuple[TensorDataset, TensorDataset, str]:
    """Fashion-MNIST (Debian package dataset-fashion-mnist), or digits upsampled to 28x28."""
    try:
        train, test = load_idx_dataset("fashion-mnist")
        return train, test, "fashion-mnist"
    except A2QInputError as err:
        print(f"NOTE: {err}\nusing scikit-learn digits upsampled to 28x28 instead.")
    train, test = load_digits()

    def up(d):
        x, y = d.tensors
        return TensorDataset(F.interpolate(x, size=28, mode="bilinear", align_corners=False), y)

    return up(train), up(test), "digits-28x28 (fallback)"


def cost_ratios(batch: torch.Tensor, reps: int) -> dict:
    torch.manual_seed(0)
    model = build_cnn("none", image_size=28).eval()
    times = {"plain": []} | {m: [] for m in COST_MODES}
    with torch.no_grad():
        model(batch)
        for _ in range(reps):
            for mode in times:
                if mode == "plain":
                    t = time.perf_counter()
                    model(batch)
                    times[mode].append(time.perf_counter() - t)
                    continue
                with simulate_accumulators(model, mode):
                    t = time.perf_counter()
                    model(batch)
                    times[mode].append(time.perf_counter() - t)
    plain = statistics.median(times["plain"])
    return {"batch": int(batch.shape[0]), "reps": reps, "plain_seconds": plain,
            "modes": {m: {"seconds": statistics.median(v), "ratio": statistics.median(v) / plain}
                      for m, v in times.items() if m != "plain"}}


def _train(quant, bits, train, epochs, seed=0):
    from brevitas_a2q.train.loop import train_epochs

    torch.manual_seed(seed)
    model = build_cnn(quant, acc_bits=bits if quant != "none" else None, image_size=28)
    train_epochs(model, train, epochs=epochs, lr=1e-3, batch_size=128, progress=False, seed=seed)
    return model.eval()


def accuracy_part(train, test, bits_list, epochs, ft_epochs, ft_limit) -> list[dict]:
    rows = []
    plain = _train("none", None, train, epochs)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    exact, _ = evaluate_accuracy(plain, test)
    rows.append({"method": "plain QAT", "P": None, "accumulator": "exact", "accuracy": exact})
    ft_set = Subset(train, range(min(ft_limit, len(train))))
    loader = torch.utils.data.DataLoader(ft_set, batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    fp = "fp12-e4m7-c16"
    t = time.perf_counter()
    finetune(plain, loader, fp, epochs=ft_epochs, lr=1e-4, progress=False)
    acc, st = evaluate_accuracy(plain, test, fp)
    rows.append({"method": "plain QAT + fine-tune (fp12)", "P": 12, "accumulator": fp,
                 "accuracy": acc, "overflow_events": st.total_overflow_events,
                 "finetune_seconds": time.perf_counter() - t})
    for bits in bits_list:
        plain.load_state_dict(state)
        for spec in (f"int{bits}-wrap", f"int{bits}-sat"):
            acc, st = evaluate_accuracy(plain, test, spec)
            rows.append({"method": "plain QAT", "P": bits, "accumulator": spec, "accuracy": acc,
                         "overflow_events": st.total_overflow_events})
        spec = f"int{bits}-sat"
        t = time.perf_counter()
        finetune(plain, loader, spec, epochs=ft_epochs, lr=1e-4, progress=False)
        acc, st = evaluate_accuracy(plain, test, spec)
        rows.append({"method": "plain QAT + fine-tune (int sat)", "P": bits, "accumulator": spec,
                     "accuracy": acc, "overflow_events": st.total_overflow_events,
                     "finetune_seconds": time.perf_counter() - t})
        for quant in ("a2q", "a2q+"):
            model = _train(quant, bits, train, epochs)
            acc, st = evaluate_accuracy(model, test, f"int{bits}-wrap")
            rows.append({"method": quant.upper(), "P": bits, "accumulator": f"int{bits}-wrap",
                         "accuracy": acc, "overflow_events": st.total_overflow_events})
        print(f"  P={bits} done", flush=True)
    return rows


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float, int]]]:
    """``{label: [(P, accuracy %, overflow events)]}`` for the plot, one label per method and
    accumulator kind."""
    series: dict[str, list[tuple[int, float, int]]] = {}
    for r in rows:
        if r["P"] is None:
            continue
        kind = r["accumulator"].split("-")[1] if r["accumulator"].startswith("int") \
            else r["accumulator"]
        series.setdefault(f"{r['method']}: {kind}", []).append(
            (r["P"], 100 * r["accuracy"], r.get("overflow_events", 0)))
    return {k: sorted(v) for k, v in series.items()}


def _plot(rows: list[dict], path, exact: float | None = None) -> None:
    """Accuracy vs P per method and accumulator; hollow markers where the accumulator
    overflowed on the test set, filled where it never did. Writes a PNG to ``path``."""
    from brevitas_a2q.analysis.plots import legend_outside, pyplot

    plt = pyplot()
    series = _series(rows)
    markers = ("o", "s", "^", "v", "D", "X", "P", "*")
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for i, (label, pts) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * 0.06  # coinciding points stay visible
        xs = [p + offset for p, _, _ in pts]
        marker = markers[i % len(markers)]
        ax.plot(xs, [a for _, a, _ in pts], color=f"C{i}", linewidth=1.2, marker=marker,
                markersize=7, linestyle="--" if "fine-tune" in label else "-", label=label)
        for x, (_, a, events) in zip(xs, pts, strict=True):
            if events:
                ax.plot([x], [a], marker=marker, markersize=7, color=f"C{i}",
                        markerfacecolor="white")
    if exact is not None:
        ax.axhline(100 * exact, color="black", linewidth=1,
                   label=f"plain QAT, exact accumulation {100 * exact:.2f}%")
    ax.plot([], [], marker="o", color="gray", markerfacecolor="white", linestyle="none",
            label="hollow: overflow events on the test set")
    bits = sorted({p for pts in series.values() for p, _, _ in pts})
    ax.set_xticks(bits, [str(b) for b in bits])  # the widths measured, nothing in between
    ax.set_xlabel("accumulator bits P (every layer)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("W4A4 CNN: accuracy with simulated P-bit accumulators")
    legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _exact(rows: list[dict]) -> float | None:
    return next((r["accuracy"] for r in rows if r["accumulator"] == "exact"), None)


def plot_only(out: Path) -> None:
    """Redraw the PNG from the committed JSON (no training, no timing)."""
    saved = json.loads((out / "accumulator_simulation.json").read_text())
    with atomic_output(out / "accumulator_simulation.png", overwrite=True) as tmp:
        _plot(saved["accuracy"], tmp, _exact(saved["accuracy"]))
    print(f"redrew {out / 'accumulator_simulation.png'} from {out / 'accumulator_simulation.json'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1, help="training epochs per model")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-limit", type=int, default=2000,
                   help="training samples used for fine-tuning under simulation")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--bits", type=int, nargs="+", default=[16, 12, 10])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNG from OUT_DIR/accumulator_simulation.json and stop")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    if args.plot_only:
        plot_only(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    train, test, source = load_data()
    if args.train_limit:
        train = Subset(train, range(min(args.train_limit, len(train))))
    print(f"data: {source}; 1 thread")
    batch = test.tensors[0][:args.batch_size]
    cost = cost_ratios(batch, args.reps)
    print(f"\nsimulation cost, benchmark CNN (28x28, batch {cost['batch']}, median of "
          f"{cost['reps']}): plain forward {1000 * cost['plain_seconds']:.1f} ms")
    print(f"{'mode':<16} {'ms':>8} {'ratio':>7}")
    for mode, r in cost["modes"].items():
        print(f"{mode:<16} {1000 * r['seconds']:>8.1f} {r['ratio']:>6.1f}x")
    result = {"data": source, "cost": cost}
    if not args.skip_accuracy:
        print(f"\naccuracy (epochs {args.epochs}, fine-tune epochs {args.finetune_epochs} on "
              f"{args.finetune_limit} samples)")
        rows = accuracy_part(train, test, args.bits, args.epochs, args.finetune_epochs,
                             args.finetune_limit)
        result["accuracy"] = rows
        print(f"{'method':<34} {'P':>3} {'accumulator':<16} {'acc %':>6} {'overflows':>10}")
        for r in rows:
            print(f"{r['method']:<34} {r['P'] or '-':>3} {r['accumulator']:<16} "
                  f"{100 * r['accuracy']:>6.2f} {r.get('overflow_events', '-'):>10}")
        with atomic_output(out / "accumulator_simulation.png", args.overwrite) as tmp:
            _plot(rows, tmp, _exact(rows))
    with atomic_output(out / "accumulator_simulation.json", args.overwrite) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'accumulator_simulation.json'}")


if __name__ == "__main__":
    main()
