"""FINN LUT estimates of the accumulating layers: A2Q at P = 12 (widths set by finn_flow) against
the same network costed with 32-bit accumulators, and against FINN's own minimization of the same
network trained without A2Q (plain W4A4 QAT). Needs FINN (see README, developer notes).

    python benchmarks/finn_luts.py [--epochs 6] [--out /tmp/finn_luts]

Models: digits 8x8, MLP 64-64-64-10 and CNN conv(8)-pool-conv(16)-pool-fc, W4A4, 8-bit signed input,
all layers at P = 12, Euclidean-projection init, Adam 3e-3, 1 CPU thread. Estimates: FINN HLS MVAUs,
fully folded (PE = SIMD = 1), xc7z020 (Pynq-Z1), 100 MHz.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from brevitas_a2q.data import load_digits
from brevitas_a2q.export import export_qonnx
from brevitas_a2q.models import build_cnn, build_mlp
from brevitas_a2q.training import euclidean_projection_init
from finn_flow import build, finn_available
from finn_flow.report import totals


def train(model, a2q: bool, epochs: int) -> float:
    train_set, test_set = load_digits()
    if a2q:
        euclidean_projection_init(model, train_set.tensors[0][:1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        x, y = test_set.tensors
        return float((model(x).argmax(1) == y).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ok, reason = finn_available()
    if not ok:
        print(f"skipped: {reason}")
        return 0
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="finn_luts_"))
    out.mkdir(parents=True, exist_ok=True)
    x0 = load_digits()[0].tensors[0][:1]
    print(f"{'network':6} {'variant':6} {'acc%':>5} {'widths':>16} {'LUT set':>8} "
          f"{'LUT INT32':>9} {'INT32/set':>9}")
    for net, make in [("mlp", lambda q, p: build_mlp(q, acc_bits=p, hidden=(64, 64))),
                      ("cnn", lambda q, p: build_cnn(q, acc_bits=p, channels=(8, 16)))]:
        results = {}
        for quant in ("a2q", "none"):
            torch.manual_seed(0)
            model = make(quant, 12 if quant == "a2q" else None)
            acc = train(model, quant == "a2q", args.epochs)
            path = out / f"{net}_{quant}.onnx"
            export_qonnx(model, x0, path, overwrite=True)
            result = build(path, out / f"{net}_{quant}", overwrite=True)
            results[quant] = totals(result.layers)
            widths = "/".join(str(w.bits) for w in result.layers)
            t = results[quant]
            print(f"{net:6} {quant:6} {100 * acc:5.1f} {widths:>16} {t['lut_chosen']:>8} "
                  f"{t['lut_int32']:>9} {t['lut_int32'] / t['lut_chosen']:>9.3f}")
        a2q, plain = results["a2q"]["lut_chosen"], results["none"]["lut_chosen"]
        print(f"{net}: A2Q P=12 {a2q} LUTs vs FINN-minimized plain QAT {plain} "
              f"({plain / a2q:.3f}x) vs A2Q network at INT32 {results['a2q']['lut_int32']} "
              f"({results['a2q']['lut_int32'] / a2q:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
