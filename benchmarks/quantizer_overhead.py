"""Training-step cost of our A2Q/A2Q+ quantizers against Brevitas's built-in ones, measured
interleaved in one run (the machine is noisy; compare ratios, not milliseconds).

Two parts, both timed round-robin (each round times every variant once; medians):

* ``cnn``: the W4A4 benchmark CNN (28x28, batch 128, P = ``--acc-bits``): ours, Brevitas's
  built-in A2Q/A2Q+ and plain per-channel QAT;
* ``sweep``: one ``QuantLinear`` with K = OUT in ``--sizes`` (4-bit unsigned input, P = 16,
  batch 128), ours vs built-in, A2Q and A2Q+.
* ``rounding`` (not run by default): budgeted rounding vs round-to-zero, the W4A4 CNN with every
  layer at each P of ``--rounding-bits`` (where the budget binds, the per-channel sort runs) and
  the ``QuantLinear`` of the largest ``--sizes``, A2Q and A2Q+.

Results go to ``benchmarks/results/quantizer_overhead.json`` (``--out``); ratios are rounded to
two decimals there and in the printout.

    .venv/bin/python benchmarks/quantizer_overhead.py [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from brevitas.nn import QuantLinear
from brevitas.quant import (
    Int8AccumulatorAwareWeightQuant,
    Int8AccumulatorAwareZeroCenterWeightQuant,
    Uint8ActPerTensorFloat,
)

from brevitas_a2q import A2QPlusWeightQuant, A2QWeightQuant
from brevitas_a2q.train.models import build_cnn

METHODS = ("a2q", "brevitas-a2q", "a2q+", "brevitas-a2q+", "none")
SWEEP_QUANTS = {"a2q": A2QWeightQuant, "brevitas-a2q": Int8AccumulatorAwareWeightQuant,
                "a2q+": A2QPlusWeightQuant,
                "brevitas-a2q+": Int8AccumulatorAwareZeroCenterWeightQuant}
PAIRS = (("a2q", "brevitas-a2q"), ("a2q+", "brevitas-a2q+"))
RESULTS = Path(__file__).parent / "results" / "quantizer_overhead.json"


def step_time(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def interleaved(setups: dict, x, y, rounds: int) -> dict[str, float]:
    """Median step time per setup, each round timing every setup once (after one warm-up)."""
    for setup in setups.values():
        step_time(*setup, x, y)
    times = {name: [] for name in setups}
    for _ in range(rounds):
        for name, setup in setups.items():
            times[name].append(step_time(*setup, x, y))
    return {name: statistics.median(t) for name, t in times.items()}


def seeded_setups(makers: dict) -> dict:
    """``(model, Adam(lr=1e-3))`` per name, each model built by its maker after
    ``torch.manual_seed(1)``, so every variant starts from the same random weights."""
    setups = {}
    for name, make in makers.items():
        torch.manual_seed(1)
        model = make()
        setups[name] = (model, torch.optim.Adam(model.parameters(), 1e-3))
    return setups


def cnn_part(args) -> dict:
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    setups = {}
    for name in METHODS:
        model = build_cnn(name, acc_bits=args.acc_bits, image_size=28)
        setups[name] = (model, torch.optim.Adam(model.parameters(), 1e-3))
    median = interleaved(setups, x, y, args.rounds)
    print(f"W4A4 CNN on 28x28, batch {args.batch}, {args.threads} thread(s), P={args.acc_bits}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'method':<15}{'ms/step':>10}{'vs plain':>10}")
    for name in METHODS:
        print(f"{name:<15}{1000 * median[name]:>10.1f}{median[name] / median['none']:>10.2f}")
    ratios = {ours: round(median[ours] / median[theirs], 2) for ours, theirs in PAIRS}
    for ours, theirs in PAIRS:
        print(f"ratio {ours} / {theirs}: {ratios[ours]:.2f}")
    return {"ms_per_step": {k: round(1000 * v, 2) for k, v in median.items()},
            "ratio_ours_vs_builtin": ratios}


def linear(quant, k: int, acc_bits: int) -> torch.nn.Module:
    return QuantLinear(k, k, bias=False, weight_quant=quant, weight_bit_width=4,
                       weight_accumulator_bit_width=acc_bits, input_quant=Uint8ActPerTensorFloat,
                       input_bit_width=4)


def sweep_part(args) -> dict:
    out = {}
    print(f"\nOne QuantLinear K = OUT, 4-bit unsigned input, P={args.sweep_acc_bits}, batch "
          f"{args.batch}, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print(f"{'K':>6}  " + "".join(f"{n:>15}" for n in SWEEP_QUANTS) + "   ours/built-in A2Q, A2Q+")
    for k in args.sizes:
        torch.manual_seed(0)
        x = torch.rand(args.batch, k)
        y = torch.randint(0, k, (args.batch,))
        setups = seeded_setups({name: functools.partial(linear, quant, k, args.sweep_acc_bits)
                                for name, quant in SWEEP_QUANTS.items()})
        median = interleaved(setups, x, y, args.rounds)
        ratios = {ours: round(median[ours] / median[theirs], 2) for ours, theirs in PAIRS}
        print(f"{k:>6}  " + "".join(f"{1000 * median[n]:>13.1f}ms" for n in SWEEP_QUANTS)
              + f"   {ratios['a2q']:.2f}, {ratios['a2q+']:.2f}")
        out[str(k)] = {"ms_per_step": {n: round(1000 * v, 2) for n, v in median.items()},
                       "ratio_ours_vs_builtin": ratios}
    return out


ROUNDING_SETUPS = (("a2q", "zero"), ("a2q", "budgeted"), ("a2q+", "zero"), ("a2q+", "budgeted"))


def rounding_part(args) -> dict:
    """Training-step time of budgeted rounding relative to round-to-zero (same quantizer)."""
    from brevitas_a2q import A2QBudgetedWeightQuant, A2QPlusBudgetedWeightQuant

    out = {}
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    print(f"\nbudgeted rounding / round-to-zero, training step, batch {args.batch}, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds")
    for p in args.rounding_bits:
        setups = seeded_setups({
            f"{quant} {rounding}": functools.partial(build_cnn, quant, acc_bits=p, image_size=28,
                                                     rounding=rounding)
            for quant, rounding in ROUNDING_SETUPS})
        median = interleaved(setups, x, y, args.rounds)
        ratios = {q: round(median[f"{q} budgeted"] / median[f"{q} zero"], 2) for q in ("a2q", "a2q+")}
        print(f"CNN, every layer at P={p}: " + ", ".join(
            f"{n} {1000 * v:.1f} ms" for n, v in median.items())
            + f"; ratio A2Q {ratios['a2q']:.2f}, A2Q+ {ratios['a2q+']:.2f}")
        out[f"cnn_P{p}"] = {"ms_per_step": {n: round(1000 * v, 2) for n, v in median.items()},
                            "ratio_budgeted_vs_zero": ratios}
    k = max(args.sizes)
    torch.manual_seed(0)
    xl = torch.rand(args.batch, k)
    yl = torch.randint(0, k, (args.batch,))
    quants = {"a2q zero": A2QWeightQuant, "a2q budgeted": A2QBudgetedWeightQuant,
              "a2q+ zero": A2QPlusWeightQuant, "a2q+ budgeted": A2QPlusBudgetedWeightQuant}
    setups = seeded_setups({name: functools.partial(linear, quant, k, args.rounding_linear_bits)
                            for name, quant in quants.items()})
    median = interleaved(setups, xl, yl, args.rounds)
    ratios = {q: round(median[f"{q} budgeted"] / median[f"{q} zero"], 2) for q in ("a2q", "a2q+")}
    print(f"QuantLinear K = OUT = {k}, P={args.rounding_linear_bits}: " + ", ".join(
        f"{n} {1000 * v:.1f} ms" for n, v in median.items())
        + f"; ratio A2Q {ratios['a2q']:.2f}, A2Q+ {ratios['a2q+']:.2f}")
    out[f"linear_K{k}_P{args.rounding_linear_bits}"] = {
        "ms_per_step": {n: round(1000 * v, 2) for n, v in median.items()},
        "ratio_budgeted_vs_zero": ratios}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--acc-bits", type=int, default=12, help="P of the CNN part")
    parser.add_argument("--sweep-acc-bits", type=int, default=16, help="P of the size sweep")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--parts", nargs="+", default=["cnn", "sweep"],
                        choices=["cnn", "sweep", "rounding"])
    parser.add_argument("--rounding-bits", type=int, nargs="+", default=[16, 10],
                        help="P of every CNN layer in the rounding part")
    parser.add_argument("--rounding-linear-bits", type=int, default=14,
                        help="P of the QuantLinear in the rounding part (binds for K = 4096)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results JSON (default: benchmarks/results/quantizer_overhead.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"settings": {"rounds": args.rounds, "batch": args.batch, "threads": args.threads,
                            "cnn_acc_bits": args.acc_bits, "sweep_acc_bits": args.sweep_acc_bits,
                            "rounding_bits": args.rounding_bits,
                            "rounding_linear_bits": args.rounding_linear_bits,
                            "torch": torch.__version__, "machine": platform.machine()}}
    if "cnn" in args.parts:
        results["cnn"] = cnn_part(args)
    if "sweep" in args.parts:
        results["sweep"] = sweep_part(args)
    if "rounding" in args.parts:
        results["rounding"] = rounding_part(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
