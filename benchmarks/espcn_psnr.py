"""Super-resolution quality through the whole chain (the scenario of Xilinx/finn#1088, where an A2Q
ESPCN lost ~5 dB PSNR between Brevitas and the FINN accelerator).

Brevitas's shipped ESPCN definition (``brevitas_examples.super_resolution.models.espcn``:
``FloatESPCN`` and ``QuantESPCN`` with this package's A2Q+ quantizer swapped in, W4A4, P on the
hidden layers conv2/conv3, conv1 at 32 bits and the sub-pixel conv4 plain 8-bit per tensor, as the
example is built), upscale 2, one channel. High-resolution targets are Fashion-MNIST images
(28x28, 0..255); inputs are their 2x2 averages (14x14, in [0, 1]). As in the example's own
trainer (``brevitas_examples/super_resolution``: targets from ``ToTensor``, PSNR peak 1), both
models are trained on targets in [0, 1]: the shipped output quantizer (``ConstUint8ActQuant``)
is 8-bit unsigned with scale 1/255, so its integer output is the 0..255 pixel value, and targets
in 0..255 would saturate it. The float model is trained first; the quantized one starts from it
(Euclidean-projection init) and is fine-tuned. Baselines: bilinear and bicubic upsampling of the
inputs.

PSNR (peak 255) over the evaluated test images of: the float model; the Brevitas model; the QONNX
file executed by qonnx (float32); the exact evaluation of that file (finn_flow.verify.exact); and
the FINN accelerator (FINN+, hls-arith executor on the dataflow graph, its sub-pixel layer built as
a transposed convolution), whose outputs must equal the exact evaluation to the bit. Pixels where
QONNX's float32 differs from the exact evaluation are counted and explained (float32 rounding
within QONNX's error bound, or not).

    .venv/bin/python benchmarks/espcn_psnr.py                       # writes benchmarks/results/
    .venv/bin/python benchmarks/espcn_psnr.py --train 500 --test 200 --accelerator-test 50 \
        --epochs 1 --out-dir /tmp/x                                 # a quick run

Needs Fashion-MNIST (Debian package dataset-fashion-mnist) and FINN (``make test`` installs FINN+).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from brevitas.core.restrict_val import FloatRestrictValue
from brevitas_examples.super_resolution.models.espcn import FloatESPCN, QuantESPCN
from qonnx.core.modelwrapper import ModelWrapper
from tqdm.auto import tqdm

from brevitas_a2q import A2QPlusWeightQuant, export_qonnx
from brevitas_a2q.io import atomic_output
from brevitas_a2q.train.data import load_idx_dataset
from brevitas_a2q.train.ep_init import euclidean_projection_init
from finn_flow import build
from finn_flow.verify.exact import ExactEvaluation, ExactModel
from finn_flow.verify.executors import verify_hls_arith
from finn_flow.verify.inputs import run_qonnx

RESULTS = Path(__file__).resolve().parent / "results"


class ShippedA2QPlus(A2QPlusWeightQuant):
    """Our A2Q+ quantizer with the attributes of the example's CommonIntAccumulatorAwareWeightQuant."""

    restrict_scaling_impl = FloatRestrictValue
    bit_width = None


def pairs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-resolution input in [0, 1], high-resolution target in 0..255): 2x2 area downsampling."""
    hr = images.float().reshape(-1, 1, 28, 28)
    if hr.max() <= 1.0:
        hr = hr * 255.0
    return F.avg_pool2d(hr / 255.0, 2), hr


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over images of 10 log10(255^2 / MSE) in dB, predictions (0..255) clipped to 0..255."""
    pred = np.clip(np.asarray(pred, dtype=np.float64).reshape(len(target), -1), 0, 255)
    mse = ((pred - np.asarray(target, dtype=np.float64).reshape(len(target), -1)) ** 2).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))))


def train(model: torch.nn.Module, lr_in: torch.Tensor, target: torch.Tensor, epochs: int,
          desc: str, lr: float, batch: int = 64) -> None:
    """Adam on the MSE to ``target`` (in [0, 1]) with a one-cycle learning-rate schedule."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(lr_in) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(epochs), desc=desc):
        order = torch.randperm(len(lr_in))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.mse_loss(model(lr_in[idx]), target[idx]).backward()
            opt.step()
            schedule.step()
    model.eval()


def output_scale(model: ModelWrapper) -> float:
    """The scale of the quantizer that produces the model output (1/255 for the shipped ESPCN)."""
    quant = model.find_producer(model.graph.output[0].name)
    while quant.op_type != "Quant":
        quant = model.find_producer(quant.input[0])
    return float(model.get_initializer(quant.input[1]))


def qonnx_vs_exact(qonnx_out: np.ndarray, exact: ExactEvaluation) -> dict:
    """Output pixels where QONNX's float32 execution differs from the exact evaluation, and the
    exact evaluation's classification of every quantizer value where they differ."""
    exact_out = exact.outputs.reshape(qonnx_out.shape)
    differ = (qonnx_out != exact_out).reshape(len(qonnx_out), -1)
    return {"output_pixels": int(differ.sum()), "images": int(differ.any(1).sum()),
            "quantizer_values_float32_rounding": {k: int(v) for k, v in exact.float32_rounding.items()},
            "quantizer_values_unexplained": {k: int(v) for k, v in exact.unexplained.items()},
            "exact_quantizers": exact.exact_quantizers,
            "float32_quantizers": exact.float32_quantizers}


def accelerator_vs_exact(acc: np.ndarray, exact_out: np.ndarray, scale: float) -> dict:
    """The accelerator's outputs (FINN's dataflow partition output: the output level times the
    output scale, float32) against the exact evaluation's, pixel by pixel and bit for bit, and
    the levels both are on (their values over the output scale, checked to be integers)."""
    acc = np.asarray(acc).reshape(len(acc), -1)
    exact_out = np.asarray(exact_out).reshape(len(acc), -1)
    differ = acc.astype(np.float32).view(np.uint32) != exact_out.astype(np.float32).view(np.uint32)
    levels = np.rint(acc.astype(np.float64) / scale)
    on_levels = bool(np.all(acc == (levels * np.float32(scale)).astype(np.float32)))
    return {"images": len(acc), "images_bit_exact": int((~differ.any(1)).sum()),
            "pixels": int(acc.size), "pixels_differing": int(differ.sum()),
            "outputs_on_integer_levels": on_levels,
            "levels_min_max": [int(levels.min()), int(levels.max())],
            "bit_exact": bool(not differ.any())}


def evaluate_exact(exact: ExactModel, inputs: np.ndarray, chunk: int) -> ExactEvaluation:
    """:meth:`ExactModel.evaluate` over ``inputs`` in chunks (it runs a whole batch at once,
    about 1.6 MB per ESPCN image), the chunks' outputs and float32 differences merged."""
    parts = [exact.evaluate(inputs[i:i + chunk]) for i in range(0, len(inputs), chunk)]
    merged = ExactEvaluation(np.concatenate([e.outputs for e in parts]),
                             exact_quantizers=parts[0].exact_quantizers,
                             float32_quantizers=parts[0].float32_quantizers)
    for e in parts:
        for mine, theirs in ((merged.float32_rounding, e.float32_rounding),
                             (merged.unexplained, e.unexplained)):
            for name, count in theirs.items():
                mine[name] = mine.get(name, 0) + count
    return merged


def accelerator_outputs(result, model: ModelWrapper, inputs: np.ndarray, chunk: int):
    """The FINN accelerator's outputs for ``inputs`` (hls-arith, :func:`verify_hls_arith` on the
    verified dataflow graph, in chunks: its reference runs each chunk as one batch) and the
    verification result of each chunk against the exact evaluation."""
    dataflow, outputs, checks = dataflow_model(result.output_dir), [], []
    for i in range(0, len(inputs), chunk):
        found: dict = {}
        checks += verify_hls_arith(dataflow, result.output_dir, {"real": inputs[i:i + chunk]}, model,
                                   layer_extremes=result.layer_extremes, outputs=found)[0]
        outputs.append(found["real"])
    return np.concatenate(outputs), checks


def dataflow_model(build_dir: Path) -> ModelWrapper:
    """The dataflow graph the build verified (saved after its verification step)."""
    found = sorted((build_dir / "intermediate_models").glob("step_a2q_verify*.onnx"))
    if not found:
        raise FileNotFoundError(f"no verified dataflow graph under {build_dir}/intermediate_models")
    return ModelWrapper(str(found[0]))


def timed(timings: dict, key: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    timings[key] = round(time.perf_counter() - start, 1)
    return value


def train_models(args, lr_train: torch.Tensor, hr_train: torch.Tensor, timings: dict):
    """The float ESPCN and the A2Q+ one (fine-tuned from it), trained or reloaded from --work-dir."""
    work = args.work_dir
    float_model = FloatESPCN(upscale_factor=2, num_channels=1)
    quant = QuantESPCN(upscale_factor=2, num_channels=1, weight_bit_width=4, act_bit_width=4,
                       acc_bit_width=args.acc_bits, weight_quant=ShippedA2QPlus)
    target = hr_train / 255.0
    if args.reuse:
        float_model.load_state_dict(torch.load(work / "float.pt"))
        with torch.no_grad():
            quant(lr_train[:2])  # builds the quantizers' state before loading it
        quant.load_state_dict(torch.load(work / "a2q.pt"))
        quant.eval(), float_model.eval()
        timings.update(json.loads((work / "train_timings.json").read_text()), training_reused=True)
        return float_model, quant
    timed(timings, "train_float_s", train, float_model, lr_train, target, args.epochs, "float",
          lr=3e-3)
    quant.load_state_dict(float_model.state_dict(), strict=False)
    euclidean_projection_init(quant, lr_train[:64])
    timed(timings, "train_a2q_s", train, quant, lr_train, target, args.epochs, "A2Q+", lr=1e-3)
    torch.save(float_model.state_dict(), work / "float.pt")
    torch.save(quant.state_dict(), work / "a2q.pt")
    (work / "train_timings.json").write_text(json.dumps(timings))
    return float_model, quant


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--test", type=int, default=10000, help="test images evaluated")
    parser.add_argument("--accelerator-test", type=int, default=10000,
                        help="of those, the first N also run on the FINN accelerator (hls-arith)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--acc-bits", type=int, default=12, help="P of conv2 and conv3")
    parser.add_argument("--chunk", type=int, default=1000,
                        help="images per exact-evaluation / accelerator batch (memory)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/espcn_psnr"),
                        help="trained models, exported file and FINN build (not committed)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the trained models an earlier run saved in --work-dir")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train_set, test_set = load_idx_dataset("fashion-mnist")
    lr_train, hr_train = pairs(train_set.tensors[0][:args.train])
    lr_test, hr_test = pairs(test_set.tensors[0][:args.test])
    hr = hr_test.numpy()
    n_acc = min(args.accelerator_test, len(lr_test))
    timings: dict = {}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    float_model, quant = train_models(args, lr_train, hr_train, timings)

    with torch.no_grad():
        float_out = float_model(lr_test).numpy() * 255.0
        brevitas_out = quant(lr_test).numpy() * 255.0
        baselines = {mode: psnr(F.interpolate(lr_test, scale_factor=2, mode=mode,
                                              align_corners=False).numpy() * 255.0, hr)
                     for mode in ("bilinear", "bicubic")}
    onnx_path = args.work_dir / "espcn_a2q.onnx"
    timed(timings, "export_s", export_qonnx, quant, lr_test[:1], onnx_path, overwrite=True)
    model = ModelWrapper(str(onnx_path))
    scale = output_scale(model)
    inputs = lr_test.numpy().reshape(len(lr_test), 1, 1, 14, 14)
    qonnx_out = timed(timings, "qonnx_s", run_qonnx, model, inputs)
    exact = timed(timings, "exact_s", evaluate_exact, ExactModel(model), inputs, args.chunk)
    exact_out = exact.outputs.reshape(qonnx_out.shape)

    # the build verifies the accelerator on random and extreme inputs and every layer at its
    # accumulator extremes; the test images then run through the same verification, keeping the
    # accelerator outputs
    result = timed(timings, "finn_build_s", build, onnx_path, args.work_dir / "finn",
                   verify=["hls-arith"], random_count=100, overwrite=True)
    acc, checks = timed(timings, "accelerator_verify_s", accelerator_outputs, result, model,
                        inputs[:n_acc], args.chunk)
    vs_exact = accelerator_vs_exact(acc, exact_out[:n_acc], scale)

    out = {
        "setup": {"model": "brevitas_examples QuantESPCN with this package's A2Q+ weight quantizer "
                           "(ShippedA2QPlus), upscale 2, one channel, W4A4 hidden, 8-bit I/O",
                  "targets_bits": {"conv1": 32, "conv2": args.acc_bits, "conv3": args.acc_bits,
                                   "conv4": None},
                  "data": "Fashion-MNIST: HR 28x28 0..255, LR = 2x2 average in [0, 1]; trained "
                          "on targets in [0, 1], PSNR at peak 255 (outputs x 255)",
                  "train_images": args.train, "epochs_float": args.epochs,
                  "epochs_a2q": args.epochs, "test_images": len(lr_test),
                  "accelerator_test_images": n_acc, "output_scale": scale},
        "psnr_db": {**{f"{k}_baseline": v for k, v in baselines.items()},
                    "float": psnr(float_out, hr), "brevitas": psnr(brevitas_out, hr),
                    "qonnx_float32": psnr(qonnx_out * 255.0, hr),
                    "exact": psnr(exact_out * 255.0, hr)},
        "psnr_db_on_accelerator_images": {
            "brevitas": psnr(brevitas_out[:n_acc], hr[:n_acc]),
            "exact": psnr(exact_out[:n_acc] * 255.0, hr[:n_acc]),
            "finn_accelerator": psnr(acc.reshape(n_acc, -1) * 255.0, hr[:n_acc])},
        "qonnx_float32_vs_exact": qonnx_vs_exact(qonnx_out, exact),
        "accelerator_vs_exact": vs_exact,
        "accelerator_checks": {"build": [v.to_dict() for v in result.verification],
                               "test_images": [v.to_dict() for v in checks],
                               "layer_extremes": [c.to_dict() for c in result.layer_extremes],
                               "verified": result.verified and all(v.ok for v in checks)},
        "layers": [{"layer": w.layer, "finn_node": w.finn_node, "target_bits": w.target_bits,
                    "bits_set": w.bits, "finn_bits": w.finn_bits, "bits_exact": w.bits_exact,
                    "within_target": w.within_target} for w in result.layers],
        "timings_s": timings,
    }
    p = out["psnr_db"]
    p["brevitas_minus_exact"] = round(p["brevitas"] - p["exact"], 2)
    a = out["psnr_db_on_accelerator_images"]
    a["brevitas_minus_accelerator"] = round(a["brevitas"] - a["finn_accelerator"], 2)
    with atomic_output(args.out_dir / "espcn_psnr.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")
    plot(out, lr_test, hr, float_out, acc, args.out_dir / "espcn_psnr.png")
    print(json.dumps({"psnr_db": out["psnr_db"], "accelerator": a, "vs_exact": vs_exact,
                      "timings_s": timings}, indent=2))
    return out


def plot(out: dict, lr_test: torch.Tensor, hr: np.ndarray, float_out: np.ndarray,
         acc: np.ndarray, path: Path) -> None:
    """PSNR per stage (bars, failures marked) and a few test images: input, bicubic, float,
    A2Q+ on the FINN accelerator, target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, a = out["psnr_db"], out["psnr_db_on_accelerator_images"]
    n, n_acc = out["setup"]["test_images"], out["setup"]["accelerator_test_images"]
    bars = [("bilinear", p["bilinear_baseline"], True), ("bicubic", p["bicubic_baseline"], True),
            ("float", p["float"], True), ("Brevitas\nA2Q+", p["brevitas"], True),
            ("QONNX\nfloat32", p["qonnx_float32"], True), ("exact", p["exact"], True),
            (f"FINN accel.\n({n_acc} img)", a["finn_accelerator"],
             out["accelerator_vs_exact"]["bit_exact"])]
    samples = 3
    fig = plt.figure(figsize=(11, 9))
    grid = fig.add_gridspec(2 + samples, 5)
    ax = fig.add_subplot(grid[0:2, :])
    colors = ["#999999"] * 2 + ["#4c72b0"] + ["#55a868"] * 4
    for i, (_label, value, ok) in enumerate(bars):
        ax.bar(i, value, color=colors[i] if ok else "#c44e52")
        ax.text(i, value + 0.2, f"{value:.2f}" + ("" if ok else "\nNOT bit-exact"), ha="center")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel("PSNR (dB), mean over images")
    ax.set_ylim(0, max(b[1] for b in bars) + 3)
    ax.set_title(f"ESPCN x2 on Fashion-MNIST ({n} test images), W4A4 A2Q+ P="
                 f"{out['setup']['targets_bits']['conv2']}: accelerator == exact evaluation on "
                 f"{out['accelerator_vs_exact']['images_bit_exact']}/{n_acc} images")
    bicubic = F.interpolate(lr_test[:samples], scale_factor=2, mode="bicubic",
                            align_corners=False).numpy() * 255.0
    columns = [("input 14x14", lr_test[:samples].numpy() * 255.0), ("bicubic", bicubic),
               ("float", float_out[:samples]), ("A2Q+ on the accelerator", acc[:samples] * 255.0),
               ("target 28x28", hr[:samples])]
    for c, (label, images) in enumerate(columns):
        for r in range(samples):
            side = int(round(np.sqrt(images[r].size)))
            sub = fig.add_subplot(grid[2 + r, c])
            sub.imshow(np.clip(images[r].reshape(side, side), 0, 255), cmap="gray", vmin=0,
                       vmax=255)
            sub.set_xticks([]), sub.set_yticks([])
            if r == 0:
                sub.set_title(label, fontsize=9)
    fig.tight_layout()
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


STAGES = [("bilinear upsampling", "bilinear_baseline"), ("bicubic upsampling", "bicubic_baseline"),
          ("float ESPCN", "float"), ("Brevitas, A2Q+", "brevitas"),
          ("QONNX file (qonnx, float32)", "qonnx_float32"), ("exact evaluation", "exact")]


def docs_tables(out: dict) -> str:
    """The tables of docs/benchmarks.md's "Super-resolution quality (ESPCN)" section, from the
    results (``--tables`` prints them from the committed JSON)."""
    p, a = out["psnr_db"], out["psnr_db_on_accelerator_images"]
    n, q, acc = out["setup"]["test_images"], out["qonnx_float32_vs_exact"], out["accelerator_vs_exact"]
    differ = {"brevitas": "not compared pixel by pixel",
              "qonnx_float32": f"{q['output_pixels']:,} pixels in {q['images']:,} images",
              "exact": "(the reference)"}
    lines = ["### PSNR per stage (ESPCN)", "",
             "| stage | images | PSNR (dB) | minus exact (dB) | output pixels != exact evaluation |",
             "|---|---|---|---|---|"]
    for label, key in STAGES:
        minus = f"{round(p[key] - p['exact'], 2) + 0.0:.2f}" if key in differ else "–"
        lines.append(f"| {label} | {n:,} | {p[key]:.2f} | {minus} | {differ.get(key, '–')} |")
    lines.append(f"| FINN accelerator (hls-arith) | {acc['images']:,} | {a['finn_accelerator']:.2f} | "
                 f"{round(a['finn_accelerator'] - a['exact'], 2) + 0.0:.2f} | {acc['pixels_differing']:,} of "
                 f"{acc['pixels']:,} ({acc['images_bit_exact']:,}/{acc['images']:,} images bit-exact) |")
    lines += ["", "### Accumulator widths (ESPCN)", "",
              "| layer | FINN node | target P | width set | FINN's own width | exact range needs |",
              "|---|---|---|---|---|---|"]
    for w in out["layers"]:
        target = "–" if w["target_bits"] is None else str(w["target_bits"])
        lines.append(f"| {w['layer']} | {w['finn_node']} | {target} | {w['bits_set']} | "
                     f"{w['finn_bits']} | {w['bits_exact']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--tables"]:
        print(docs_tables(json.loads((RESULTS / "espcn_psnr.json").read_text())))
    else:
        main()
