"""Super-resolution quality through the whole chain (the scenario of Xilinx/finn#1088, where an A2Q
ESPCN lost ~5 dB PSNR between Brevitas and the FINN accelerator).

Brevitas's shipped ESPCN definition (``brevitas_examples.super_resolution.models.espcn``:
``FloatESPCN`` and ``QuantESPCN`` with this package's A2Q+ quantizer swapped in, W4A4, P on the
hidden layers conv2/conv3, conv1 at 32 bits and the sub-pixel conv4 plain 8-bit per tensor, as the
example is built), upscale 2, one channel. High-resolution targets are Fashion-MNIST images
(28x28, 0..255); inputs are their 2x2 averages (14x14, in [0, 1]). The float model is trained
first; the quantized one starts from it (Euclidean-projection init) and is fine-tuned.

PSNR (peak 255) over the evaluated test images of: the float model; the Brevitas model; the QONNX
file executed by qonnx (float32); the exact evaluation of that file (finn_flow.verify.exact); and
the FINN accelerator (FINN+, hls-arith executor on the dataflow graph, its sub-pixel layer built as
a transposed convolution), whose outputs must equal the exact evaluation to the bit. Pixels where
QONNX's float32 differs from the exact evaluation are counted and explained (float32 rounding
within QONNX's error bound, or not).

    .venv/bin/python benchmarks/espcn_psnr.py                       # writes benchmarks/results/
    .venv/bin/python benchmarks/espcn_psnr.py --train 2000 --test 200 --epochs 1 --out-dir /tmp/x

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
from finn_flow.verify.exact import ExactModel
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
    """Mean over images of 10 log10(255^2 / MSE), predictions clipped to 0..255."""
    pred = np.clip(np.asarray(pred, dtype=np.float64).reshape(len(target), -1), 0, 255)
    mse = ((pred - np.asarray(target, dtype=np.float64).reshape(len(target), -1)) ** 2).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))))


def train(model: torch.nn.Module, lr_in: torch.Tensor, hr: torch.Tensor, epochs: int,
          desc: str, lr: float = 2e-3, batch: int = 32) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc=desc):
        order = torch.randperm(len(lr_in))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.mse_loss(model(lr_in[idx]), hr[idx]).backward()
            opt.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=10000, help="training images")
    parser.add_argument("--test", type=int, default=1000, help="test images evaluated")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--acc-bits", type=int, default=12, help="P of conv2 and conv3")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/espcn_psnr"),
                        help="trained models, exported file and FINN build (not committed)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the trained models an earlier run saved in --work-dir")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_set, test_set = load_idx_dataset("fashion-mnist")
    lr_train, hr_train = pairs(train_set.tensors[0][:args.train])
    lr_test, hr_test = pairs(test_set.tensors[0][:args.test])
    timings = {}

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    float_model = FloatESPCN(upscale_factor=2, num_channels=1)
    quant = QuantESPCN(upscale_factor=2, num_channels=1, weight_bit_width=4, act_bit_width=4,
                       acc_bit_width=args.acc_bits, weight_quant=ShippedA2QPlus)
    if args.reuse:
        float_model.load_state_dict(torch.load(work / "float.pt"))
        with torch.no_grad():
            quant(lr_train[:2])  # builds the quantizers' state before loading it
        quant.load_state_dict(torch.load(work / "a2q.pt"))
        quant.eval(), float_model.eval()
    else:
        train(float_model, lr_train, hr_train, args.epochs, "float")
        quant.load_state_dict(float_model.state_dict(), strict=False)
        euclidean_projection_init(quant, lr_train[:64])
        train(quant, lr_train, hr_train, args.epochs, "A2Q+")
        torch.save(float_model.state_dict(), work / "float.pt")
        torch.save(quant.state_dict(), work / "a2q.pt")
    timings["training_s"] = time.perf_counter() - start

    with torch.no_grad():
        float_out = float_model(lr_test).numpy()
        brevitas_out = quant(lr_test).numpy()
    onnx_path = work / "espcn_a2q.onnx"
    export_qonnx(quant, lr_test[:1], onnx_path, overwrite=True)
    model = ModelWrapper(str(onnx_path))
    inputs = lr_test.numpy().reshape(len(lr_test), 1, 1, 14, 14)

    start = time.perf_counter()
    qonnx_out = run_qonnx(model, inputs)
    timings["qonnx_s"] = time.perf_counter() - start
    start = time.perf_counter()
    exact = ExactModel(model).evaluate(inputs)
    timings["exact_s"] = time.perf_counter() - start
    exact_out = exact.outputs.reshape(qonnx_out.shape)

    start = time.perf_counter()
    result = build(onnx_path, work / "finn", verify=["hls-arith"], verify_inputs=inputs,
                   random_count=0, overwrite=True)
    timings["finn_build_and_verify_s"] = time.perf_counter() - start
    real = [v for v in result.verification if v.kind == "real"]

    hr = hr_test.numpy()
    out = {
        "setup": {"model": "brevitas_examples QuantESPCN (ours A2Q+ swapped in), upscale 2, W4A4",
                  "targets": {"conv1": 32, "conv2": args.acc_bits, "conv3": args.acc_bits,
                              "conv4": None},
                  "data": "Fashion-MNIST, HR 28x28 0..255, LR = 2x2 average in [0, 1]",
                  "train_images": args.train, "test_images": args.test, "epochs": args.epochs},
        "psnr_db": {"float": psnr(float_out, hr), "brevitas": psnr(brevitas_out, hr),
                    "qonnx_float32": psnr(qonnx_out, hr), "exact": psnr(exact_out, hr)},
        "pixels_qonnx_differs_from_exact": int((qonnx_out != exact_out).sum()),
        "float32_rounding": {k: int(v) for k, v in exact.float32_rounding.items()},
        "unexplained": {k: int(v) for k, v in exact.unexplained.items()},
        "accelerator": {"verified": result.verified,
                        "real_inputs_bit_exact": [v.to_dict() for v in real],
                        "layers": [{"layer": w.layer, "target": w.target_bits, "bits": w.bits}
                                   for w in result.layers]},
        "timings_s": timings,
    }
    if result.verified:  # the accelerator equals the exact evaluation bit for bit: same PSNR
        out["psnr_db"]["finn_accelerator"] = out["psnr_db"]["exact"]
    out["psnr_db_brevitas_minus_accelerator"] = (
        round(out["psnr_db"]["brevitas"] - out["psnr_db"]["finn_accelerator"], 2)
        if "finn_accelerator" in out["psnr_db"] else None)
    with atomic_output(args.out_dir / "espcn_psnr.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["psnr_db"], indent=2))
    return out


if __name__ == "__main__":
    main()
