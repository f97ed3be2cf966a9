"""Brevitas's shipped example networks through the whole chain (issue 17): per network, the widths
set against the targets, the LUTs, and the build and verification times.

    python benchmarks/shipped_networks.py --out /tmp/shipped [--only resnet18]

Networks (``brevitas_a2q.train.shipped``: the examples' own definitions, model code unedited, our
A2Q/A2Q+ quantizer swapped in where the example takes a weight quantizer; untrained:
Euclidean-projection init, then batch-norm statistics and activation scales from one forward pass
over the real inputs in training mode):

* ESPCN A2Q and A2Q+ (``QuantESPCN``, sub-pixel convolution, W4A4, P = 13 on conv2/conv3; 1x16x16 in);
* ResNet18 A2Q+ (``quant_resnet18_w4a4_a2q_plus_12b``, float stem, built with its input declared
  UINT8, as FINN's image flows declare it; 3x32x32 in);
* BNN-PYNQ TFC-2W2A and CNV-2W2A (``2 * x - 1`` in ``forward``, the examples' own quantizers, no
  targets).

Each is exported (``export_qonnx``) and built once with FINN (:func:`finn_flow.build`, estimate
outputs, FINN's default folding) with ``--verify hls-arith`` on 100 random inputs, 200 real ones (100
for ResNet18; the digits test images scaled to the input size: the networks' own data sets, MNIST
and CIFAR-10, cannot be had offline) and the extreme inputs, against the exact evaluation of the
model. Times are FINN's own per-step times (its ``time_per_step.json``, whole seconds) from the same build:
FINN's steps, finn_flow's other steps, and verification. Writes ``--results`` (default
``benchmarks/results/shipped_networks.json``). Needs FINN; prints "skipped: <why>" without.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brevitas_a2q.io import atomic_output

RESULTS = Path(__file__).parent / "results" / "shipped_networks.json"
VERIFY_STEP = "step_a2q_verify_hls_arith"
REAL_INPUTS = 200


def networks() -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor, str | None]]:
    """name -> (model builder, real inputs, declared input type)."""
    from brevitas_a2q.train.data import digit_images
    from brevitas_a2q.train.shipped import shipped_bnn_pynq, shipped_espcn, shipped_resnet18

    return {
        "ESPCN A2Q": (lambda: shipped_espcn("a2q"), digit_images(REAL_INPUTS, 1, 16, 1.0), None),
        "ESPCN A2Q+": (lambda: shipped_espcn("a2q+"), digit_images(REAL_INPUTS, 1, 16, 1.0), None),
        "ResNet18 A2Q+": (lambda: shipped_resnet18("a2q+", acc_bits=12),
                          digit_images(REAL_INPUTS // 2, 3, 32, 255), "UINT8"),
        "TFC-2W2A": (lambda: shipped_bnn_pynq("tfc_2w2a"), digit_images(REAL_INPUTS, 1, 28, 1.0),
                     None),
        "CNV-2W2A": (lambda: shipped_bnn_pynq("cnv_2w2a"), digit_images(REAL_INPUTS, 3, 32, 1.0),
                     None),
    }


def _prepared(make: Callable[[], nn.Module], real: torch.Tensor) -> nn.Module:
    """The untrained network with Euclidean-projection init where it has A2Q layers (without it
    an untrained A2Q layer at a narrow P can round whole channels to zero) and its batch-norm
    statistics and activation scales from one pass over the real inputs."""
    from brevitas_a2q.train.ep_init import euclidean_projection_init

    model = make()
    if any(q.__name__.startswith("Shipped") for q in _weight_quantizers(model)):
        euclidean_projection_init(model, real[:8])
    model.train()
    with torch.no_grad():
        model(real)
    return model.eval()


def _weight_quantizers(model: nn.Module) -> list[type]:
    """The weight quantizer classes of the model's Brevitas layers (``as_shipped`` names ours)."""
    return [m.weight_quant.quant_injector for m in model.modules() if hasattr(m, "weight_quant")]


def _layer_row(w) -> dict:
    return {"layer": w.layer, "finn_node": w.finn_node, "target_bits": w.target_bits,
            "bits": w.bits, "bits_exact": w.bits_exact, "finn_bits": w.finn_bits,
            "within_target": w.within_target, "lut_set": w.lut_chosen, "lut_int32": w.lut_int32}


def measure(name: str, out: Path) -> dict:
    """Export and build one network with hls-arith verification; what it set, cost and checked."""
    from qonnx.core.modelwrapper import ModelWrapper

    from brevitas_a2q.export.qonnx import export_qonnx
    from finn_flow import build
    from finn_flow.finn_compat import step_times
    from finn_flow.options import declare_input_type
    from finn_flow.verify.exact import ExactModel

    make, real, input_type = networks()[name]
    slug = name.lower().replace(" ", "_").replace("+", "plus").replace("-", "_")
    onnx = out / f"{slug}.onnx"
    start = time.perf_counter()
    export_qonnx(_prepared(make, real), real[:1], onnx, overwrite=True)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    result = build(onnx, out / slug, verify=("hls-arith",), verify_inputs=real.numpy(),
                   input_type=input_type, overwrite=True)
    wall_s = time.perf_counter() - start
    times = {k: int(v) for k, v in step_times(out / slug).items()}  # FINN writes whole seconds
    times.pop("total_build_time", None)
    finn_s = sum(v for k, v in times.items() if not k.startswith("step_a2q_"))
    ours_s = sum(v for k, v in times.items() if k.startswith("step_a2q_") and k != VERIFY_STEP)
    ties = json.loads((out / slug / "ties.json").read_text())["nodes"]
    integer = [n for n in ties if n["stage"] == "integer" and n["input_dtype"] != "FLOAT32"]
    declared = ModelWrapper(str(onnx))
    if input_type is not None:
        declare_input_type(declared, input_type)
    exact = ExactModel(declared)
    layers = [_layer_row(w) for w in result.layers]
    targeted = [row for row in layers if row["target_bits"] is not None]
    return {
        "network": name, "input_type": input_type or "float (input quantizer in the model)",
        "layers": layers,
        "targets_proven": f"{sum(bool(r['within_target']) for r in targeted)}/{len(targeted)}",
        "lut_set": sum(r["lut_set"] or 0 for r in layers),
        "lut_int32": sum(r["lut_int32"] or 0 for r in layers),
        "verification": {v.kind: {"inputs": v.inputs, "bit_exact": v.matched,
                                  "reference": v.reference,
                                  "qonnx_float32_rounding": v.qonnx_float32_rounding,
                                  "qonnx_unexplained": v.qonnx_unexplained}
                         for v in result.verification},
        "layer_extremes_ok": f"{sum(c.ok for c in result.layer_extremes)}/"
                             f"{len(result.layer_extremes)}",
        "verified": result.verified,
        "exact_thresholds": f"{sum(n['exact'] for n in integer)}/{len(integer)}",
        "quantizers_evaluated_in_float32": exact.float32_quantizers,
        "seconds": {"export": round(export_s, 1), "build_wall": round(wall_s, 1),
                    "finn_steps": finn_s, "finn_flow_steps": ours_s,
                    "verification": times.get(VERIFY_STEP, 0)},
        # FINN's per-step times are whole seconds: no ratio where its steps took under 1 s
        "ratio_verification_to_finn_steps": round(times.get(VERIFY_STEP, 0) / finn_s, 2)
        if finn_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working directory for the builds")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME",
                        help="networks to build (default: all); results of the others are kept")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from finn_flow import finn_available

    ok, reason = finn_available()
    if not ok:
        print(f"skipped: {reason}")
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(networks())
    chosen = [n for n in names if args.only is None or any(o.lower() in n.lower() for o in args.only)]
    data = json.loads(args.results.read_text()) if args.results.exists() else {"networks": {}}
    for name in chosen:  # the results file is rewritten after each network
        print(f"building {name} ...", flush=True)
        row = measure(name, args.out)
        data["networks"][name] = row
        s = row["seconds"]
        print(f"  targets proven {row['targets_proven']}, verified {row['verified']} "
              f"({row['verification']}), FINN steps {s['finn_steps']} s, verification "
              f"{s['verification']} s, ratio {row['ratio_verification_to_finn_steps']}", flush=True)
        data["networks"] = {n: data["networks"][n] for n in names if n in data["networks"]}
        data["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                           "torch_threads": 1, "numpy": np.__version__}
        with atomic_output(args.results, overwrite=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
