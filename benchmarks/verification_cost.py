"""Verification in proportion (issue 17): the cost of ``--verify hls-arith`` with the default
inputs against FINN's own build steps, on Brevitas's shipped A2Q ResNet18, in one build.

    python benchmarks/verification_cost.py --out /tmp/verification_cost [--blocks 1]

Model: ``brevitas_examples.imagenet_classification.a2q.resnet.quant_resnet18`` (the CIFAR-10
ResNet18 of the A2Q papers, 32x32x3 in, 10 classes) as the example zoo's
``quant_resnet18_w4a4_a2q_plus_12b`` with this package's A2Q+ quantizer swapped in
(:func:`brevitas_a2q.train.shipped.shipped_resnet18`: W4A4, P = 12; conv1 and the classifier stay
Brevitas's plain 8-bit layers as shipped), its float stem built on inputs declared UINT8
(``input_type="UINT8"``); Euclidean-projection init, BN at its initial statistics (untrained: the
cost does not depend on the values). ``--blocks 1`` builds the one-block-per-stage variant
(``QuantResNet`` with ``num_blocks=[1, 1, 1, 1]``) instead.

One :func:`finn_flow.build` (estimate outputs, FINN's default folding, ``verify=("hls-arith",)``,
``random_count`` at its default unless ``--random-inputs`` is given) and FINN's own per-step times
(its ``time_per_step.json``, whole seconds): the verification step
``step_a2q_verify_hls_arith`` (QONNX model, FINN's graph before specialization and the hls-arith
dataflow graph on every default input, plus every MVAU/VVAU alone at its accumulators' extremes)
against the sum of FINN's own steps (``step_*`` not ours) and against the whole build without
verification (FINN's steps plus finn_flow's ``step_a2q_*``). Prints the ratios and writes
``--results`` (default ``benchmarks/results/verification_cost.json``). The machine's load is
recorded: both sides are measured in the same run, so a loaded machine slows both. Needs FINN;
prints "skipped: <why>" without.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from brevitas_a2q.io import atomic_output

RESULTS = Path(__file__).parent / "results" / "verification_cost.json"
VERIFY_STEP = "step_a2q_verify_hls_arith"


def resnet18(blocks: int) -> nn.Module:
    """Brevitas's A2Q ResNet18 (``blocks`` = 2: ``quant_resnet18_w4a4_a2q_plus_12b`` with our A2Q+,
    :func:`brevitas_a2q.train.shipped.shipped_resnet18`) or its one-block-per-stage variant (the
    same arguments, ``num_blocks=[1, 1, 1, 1]``), float stem, Euclidean-projection init."""
    from brevitas.quant import Int8WeightPerChannelFloat
    from brevitas_examples.bnn_pynq.models.resnet import QuantBasicBlock, QuantResNet

    from brevitas_a2q.train.ep_init import euclidean_projection_init
    from brevitas_a2q.train.shipped import as_shipped, shipped_resnet18

    if blocks == 2:
        model = shipped_resnet18("a2q+", acc_bits=12)
    else:  # quant_resnet18's arguments, num_blocks changed
        from brevitas_examples.imagenet_classification.a2q.quant import SCALING_MIN_VAL

        from brevitas_a2q.quant.quantizers import A2QPlusWeightQuant

        torch.manual_seed(0)
        quant = as_shipped(A2QPlusWeightQuant, scaling_min_val=SCALING_MIN_VAL)
        model = QuantResNet(block_impl=QuantBasicBlock, num_blocks=[blocks] * 4, num_classes=10,
                            act_bit_width=4, weight_bit_width=4,
                            weight_quant=quant.let(accumulator_bit_width=12),
                            last_layer_weight_quant=Int8WeightPerChannelFloat,
                            first_maxpool=False, zero_init_residual=False,
                            round_average_pool=False)
    euclidean_projection_init(model, torch.rand(8, 3, 32, 32) * 255)
    return model.eval()


def _step_times(out: Path) -> dict[str, int]:
    from finn_flow.finn_compat import step_times

    times = {k: int(v) for k, v in step_times(out).items()}  # FINN writes whole seconds
    times.pop("total_build_time", None)
    return times


def measure(out: Path, blocks: int, random_count: int | None = None) -> dict:
    """Export, build with hls-arith verification (``random_count`` random inputs, default:
    :func:`finn_flow.build`'s), and the per-step times of that one build."""
    from brevitas_a2q.export.qonnx import export_qonnx
    from finn_flow import build

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    onnx = out / f"resnet18_blocks{blocks}.onnx"
    start = time.perf_counter()
    export_qonnx(resnet18(blocks), torch.rand(1, 3, 32, 32) * 255, onnx, overwrite=True)
    export_s = time.perf_counter() - start
    default = inspect.signature(build).parameters["random_count"].default
    random_count = default if random_count is None else random_count
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = build(onnx, out / "build", verify=("hls-arith",), random_count=random_count,
                   input_type="UINT8", overwrite=True)
    build_s = time.perf_counter() - start
    times = _step_times(out / "build")
    ours = {k: v for k, v in times.items() if k.startswith("step_a2q_") and k != VERIFY_STEP}
    finn = {k: v for k, v in times.items() if not k.startswith("step_a2q_")}
    verify_s = times[VERIFY_STEP]
    finn_s = sum(finn.values())
    build_without_verify = finn_s + sum(ours.values())
    return {
        "model": ("brevitas_examples quant_resnet18" if blocks == 2 else
                  f"brevitas_examples QuantResNet num_blocks=[{blocks}]*4")
                 + " with A2Q+ (W4A4, P=12), float stem, input UINT8 32x32x3",
        "blocks_per_stage": blocks,
        "accumulating_layers": len(result.layers),
        "inputs": {r.kind: r.inputs for r in result.verification},
        "random_count": random_count,
        "random_count_is_build_default": random_count == default,
        "layer_extreme_vectors": sum(c.vectors for c in result.layer_extremes),
        "verification_passed": all(r.ok for r in result.verification)
        and all(c.ok for c in result.layer_extremes),
        "outcome": {r.kind: {"inputs": r.inputs, "accelerator_equal_to_finn_graph": r.matched,
                             "reference": r.reference,
                             "model_outputs_differing_from_reference":
                                 len(r.final_mismatched_indices),
                             "finn_graph_differing_from_reference":
                                 len(r.reference_mismatched_indices),
                             "qonnx_float32_rounding": r.qonnx_float32_rounding}
                    for r in result.verification}
        | {"layer_extremes_ok": f"{sum(c.ok for c in result.layer_extremes)}/"
                                f"{len(result.layer_extremes)}"},
        "seconds": {"export": round(export_s, 1), "build_total_wall": round(build_s, 1),
                    "finn_steps": finn_s, "finn_flow_steps_without_verification": sum(ours.values()),
                    "verification": verify_s},
        "ratio_verification_to_finn_steps": round(verify_s / finn_s, 3),
        "ratio_verification_to_build_without_verification": round(
            verify_s / build_without_verify, 3),
        "per_step_seconds": times,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                    "torch_threads": 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working directory for the build")
    parser.add_argument("--blocks", type=int, default=2, choices=(1, 2),
                        help="residual blocks per stage: 2 is ResNet18 (default), 1 the "
                             "one-block-per-stage variant")
    parser.add_argument("--random-inputs", type=int, default=None, metavar="COUNT",
                        help="random verification inputs (default: finn_flow.build's default)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from finn_flow import finn_available

    ok, reason = finn_available()
    if not ok:
        print(f"skipped: {reason}")
        return
    data = measure(args.out, args.blocks, args.random_inputs)
    s = data["seconds"]
    print(f"{data['model']}: {data['accumulating_layers']} accumulating layers, inputs "
          f"{data['inputs']} + {data['layer_extreme_vectors']} per-layer extreme vectors, "
          f"verification passed: {data['verification_passed']}")
    print(f"FINN's steps {s['finn_steps']} s, finn_flow's other steps "
          f"{s['finn_flow_steps_without_verification']} s, verification {s['verification']} s")
    print(f"verification / FINN's steps = {data['ratio_verification_to_finn_steps']:.2f}; "
          f"verification / build without it = "
          f"{data['ratio_verification_to_build_without_verification']:.2f}")
    with atomic_output(args.results, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
