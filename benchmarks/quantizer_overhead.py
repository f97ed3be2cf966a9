"""Training-step cost of our A2Q/A2Q+ quantizers against Brevitas's built-in ones and plain
per-channel QAT, measured interleaved in one run (the machine is noisy; compare ratios).

    .venv/bin/python benchmarks/quantizer_overhead.py [--rounds 15] [--batch 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from brevitas_a2q.models import build_cnn

METHODS = ("a2q", "brevitas-a2q", "a2q+", "brevitas-a2q+", "none")


def step_time(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--acc-bits", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    setups = {}
    for name in METHODS:
        model = build_cnn(name, acc_bits=args.acc_bits, image_size=28)
        setups[name] = (model, torch.optim.Adam(model.parameters(), 1e-3))
        step_time(*setups[name], x, y)  # warm-up
    times = {name: [] for name in METHODS}
    for _ in range(args.rounds):  # interleaved: each round times every method once
        for name in METHODS:
            times[name].append(step_time(*setups[name], x, y))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"W4A4 CNN on 28x28, batch {args.batch}, {args.threads} thread(s), P={args.acc_bits}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'method':<15}{'ms/step':>10}{'vs plain':>10}")
    for name in METHODS:
        print(f"{name:<15}{1000 * median[name]:>10.1f}{median[name] / median['none']:>10.2f}")
    for ours, theirs in (("a2q", "brevitas-a2q"), ("a2q+", "brevitas-a2q+")):
        print(f"ratio {ours} / {theirs}: {median[ours] / median[theirs]:.3f}")


if __name__ == "__main__":
    main()
