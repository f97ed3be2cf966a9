"""Export + report cost of a ResNet-18-sized A2Q model against plain Brevitas QONNX export.

ResNet-18 layout (CIFAR stem, 32x32 input, 4 stages x 2 basic blocks, widths 64-512, residual adds)
built from brevitas.nn layers. Timed side by side in one run, alternating, median of --repeats:

* ``brevitas export_qonnx``: ``brevitas.export.export_qonnx(dynamo=False)`` of the model with
  Brevitas's built-in A2Q quantizer (the baseline of every ratio: Brevitas's export alone, no
  qonnx cleanup, no records, weights not exact);
* ``qonnx cleanup``: ``qonnx.util.cleanup.cleanup_model`` of Brevitas's exported file (part of
  ours);
* ``ours (same model)``: :func:`brevitas_a2q.export_qonnx` of that same model;
* ``ours (A2QWeightQuant)``: :func:`brevitas_a2q.export_qonnx` of the model with our quantizer
  (Brevitas's export, exact weights, qonnx cleanup, accumulator records, written to disk);
* ``report (analyze file)``: :func:`brevitas_a2q.analysis.qonnx_analysis.analyze_accumulators` of our file
  (what ``a2q report`` computes).

The headline ratio, "export + report / Brevitas export", is (ours (A2QWeightQuant) + report) /
brevitas export_qonnx. Results go to ``benchmarks/results/export_speed.json`` (ratios rounded to
two decimals, as printed).

Peak memory: tracemalloc peak of Python allocations per step, and the process's max RSS.

    .venv/bin/python benchmarks/export_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from brevitas.export import export_qonnx as brevitas_export_qonnx
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8AccumulatorAwareWeightQuant, Int8ActPerTensorFloat
from brevitas.quant import Uint8ActPerTensorFloat as Uint
from brevitas.quant_tensor import QuantTensor
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model
from torch import nn

from brevitas_a2q import A2QWeightQuant, export_qonnx
from brevitas_a2q.analysis.qonnx_analysis import analyze_accumulators

RESULTS = Path(__file__).parent / "results" / "export_speed.json"


def _relu() -> QuantReLU:
    return QuantReLU(act_quant=Uint, bit_width=4, return_quant_tensor=True)


def _v(t):
    return t.value if isinstance(t, QuantTensor) else t


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, wq: dict) -> None:
        super().__init__()
        self.conv1 = QuantConv2d(cin, cout, 3, stride, 1, bias=False, **wq)
        self.bn1, self.act1 = nn.BatchNorm2d(cout), _relu()
        self.conv2 = QuantConv2d(cout, cout, 3, 1, 1, bias=False, **wq)
        self.bn2, self.act2 = nn.BatchNorm2d(cout), _relu()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(QuantConv2d(cin, cout, 1, stride, bias=False, **wq),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        shortcut = _v(x) if self.down is None else self.down(x)
        return self.act2(y + shortcut)  # residual add, requantized


def resnet18(weight_quant, acc_bits: int = 16, num_classes: int = 10) -> nn.Module:
    wq = {"weight_quant": weight_quant, "weight_bit_width": 4,
          "weight_accumulator_bit_width": acc_bits}
    first = {**wq, "weight_bit_width": 8, "weight_accumulator_bit_width": 24}
    layers = [QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True),
              QuantConv2d(3, 64, 3, 1, 1, bias=False, **first), nn.BatchNorm2d(64), _relu()]
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        layers += [Block(cin, cout, 1 if i == 0 else 2, wq), Block(cout, cout, 1, wq)]
        cin = cout
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(),
               QuantLinear(512, num_classes, bias=True, **{**first, "weight_bit_width": 8})]
    return nn.Sequential(*layers).eval()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak(fn) -> int:
    """tracemalloc peak of Python allocations (its overhead would distort the timings, so
    memory is measured in a separate pass)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results JSON (default: benchmarks/results/export_speed.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    builtin, ours_q = resnet18(Int8AccumulatorAwareWeightQuant), resnet18(A2QWeightQuant)
    with torch.no_grad():  # warm-up (also initializes the quantizers' statistics)
        builtin(x), ours_q(x)
    runs = {"brevitas export_qonnx": [], "qonnx cleanup": [], "ours (same model)": [],
            "ours (A2QWeightQuant)": [], "report (analyze file)": []}
    peaks = {k: 0 for k in runs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steps = {
            "brevitas export_qonnx": lambda: brevitas_export_qonnx(
                builtin, x, str(tmp / "brevitas.onnx"), dynamo=False),
            "qonnx cleanup": lambda: cleanup_model(ModelWrapper(str(tmp / "brevitas.onnx"))),
            "ours (same model)": lambda: export_qonnx(builtin, x, tmp / "ours_same.onnx",
                                                      overwrite=True),
            "ours (A2QWeightQuant)": lambda: export_qonnx(ours_q, x, tmp / "ours.onnx",
                                                          overwrite=True),
            "report (analyze file)": lambda: analyze_accumulators(
                ModelWrapper(str(tmp / "ours.onnx"))),
        }
        for _ in range(args.repeats):
            for name, fn in steps.items():
                runs[name].append(_timed(fn))
        for name, fn in steps.items():
            peaks[name] = _peak(fn)
        report = analyze_accumulators(ModelWrapper(str(tmp / "ours.onnx")))
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["brevitas export_qonnx"]
    print(f"ResNet-18-sized model, 32x32 input, {len(report)} accumulating layers, "
          f"median of {args.repeats} alternating runs, 1 thread")
    print(f"{'step':<24}{'time s':>9}{'x brevitas':>12}{'peak MiB (py)':>15}")
    for name in runs:
        print(f"{name:<24}{med[name]:>9.2f}{med[name] / base:>12.2f}"
              f"{peaks[name] / 2**20:>15.1f}")
    total = med["ours (A2QWeightQuant)"] + med["report (analyze file)"]
    ratios = {
        "export_and_report": round(total / base, 2),
        "export_same_model": round(med["ours (same model)"] / base, 2),
        "qonnx_cleanup": round(med["qonnx cleanup"] / base, 2),
    }
    print("ratios, each relative to Brevitas's export_qonnx(dynamo=False) of the built-in A2Q "
          "model (Brevitas's export alone: no cleanup, no records, inexact weights):")
    print(f"  export + report / Brevitas export: {ratios['export_and_report']:.2f}x  (target <= "
          "2.0x; our export_qonnx of the A2QWeightQuant model — Brevitas's export, exact "
          "weights, qonnx cleanup, records, file written — plus analyze_accumulators of the file)")
    print(f"  export of the same model / Brevitas export: {ratios['export_same_model']:.2f}x  "
          "(our export_qonnx of the built-in A2Q model itself)")
    print(f"  of which qonnx cleanup: {ratios['qonnx_cleanup']:.2f}x  (cleanup_model of "
          "Brevitas's file)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"all targets hold: {report.all_hold}; process max RSS {rss:.0f} MiB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "settings": {"repeats": args.repeats, "threads": 1, "layers": len(report),
                         "torch": torch.__version__, "machine": platform.machine()},
            "seconds": {k: round(v, 3) for k, v in med.items()},
            "peak_python_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
            "ratio_vs_brevitas_export": ratios,
            "all_hold": report.all_hold,
        }, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
