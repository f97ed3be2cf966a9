"""FINN LUT estimates: A2Q at P = 12 (widths set by finn_flow) against the same network with 32-bit
accumulators, and against FINN's own accumulator minimization of the same network trained without
A2Q (plain W4A4 QAT). Needs FINN (see the README's developer notes); prints "skipped: <why>" without.

    python benchmarks/finn_luts.py --out /tmp/finn_luts [--epochs 6]

Models: digits 8x8, MLP 64-64-64-10 and CNN conv(8)-pool-conv(16)-pool-fc, W4A4, 8-bit signed input,
every layer at P = 12 (A2Q, Euclidean-projection init), Adam 3e-3, 1 CPU thread. Estimates: FINN HLS
layers, xc7z020 (Pynq-Z1), 100 MHz, the same folding for every variant of a network:

* ``full``: PE = SIMD = 1 everywhere (FINN's default);
* ``fps`` and ``fps x10``: the folding FINN's ``SetFolding`` chooses for ``--mlp-fps`` /
  ``--cnn-fps`` (and ten times that) on the A2Q model (``auto_folding_config.json``), applied to
  both models as a folding config (FINN raises SIMD first, then PE);

each with thresholds in BRAM (``ram_style_thresholds`` / ``ram_style`` = block) and in LUTRAM
(distributed): FINN's MVAU LUT model charges threshold memory and comparators per accumulator bit
only for LUTRAM. Columns (LUTs):

* ``A2Q-12``: the A2Q model at the widths finn_flow proved (all <= 12);
* ``FINN plain``: the plain-QAT model at the widths FINN's ``MinimizeAccumulatorWidth`` chose;
* ``INT32 (FINN)``: the A2Q model with ``accDataType`` INT32 costed by FINN, whose estimator caps the
  accumulator at the data-type bound (A2Q Eq. 12: 15-18 bits here);
* ``INT32 (true)``: the same with the cap removed: FINN's own ``lut_estimation`` evaluated on node
  copies at 2..cap bits, a straight line through those estimates, evaluated at 32 bits
  (:func:`finn_flow.luts.uncapped_lut_estimate`; FINN's code is not changed).

"MVAU" sums the accumulating layers; "network" is FINN's whole-network estimate
(``report/estimate_layer_resources.json``) with the MVAU part replaced accordingly. JSON and a
markdown table are written to ``--out`` (``finn_luts.json``, ``finn_luts.md``), and the JSON also to
``--results`` (default ``benchmarks/results/finn_luts.json``, the file the README's table quotes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp

from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.io import atomic_output
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.ep_init import euclidean_projection_init
from brevitas_a2q.train.loop import accuracy, train_one_epoch
from brevitas_a2q.train.models import build_cnn, build_mlp
from finn_flow import build, finn_available
from finn_flow.finn_compat import detect_finn

NETWORKS = {
    "mlp": lambda q, p: build_mlp(q, acc_bits=p, hidden=(64, 64)),
    "cnn": lambda q, p: build_cnn(q, acc_bits=p, channels=(8, 16)),
}
STYLES = ("block", "distributed")


def train(model, a2q: bool, epochs: int) -> float:
    """Train on digits; test accuracy."""
    train_set, test_set = load_digits()
    if a2q:
        euclidean_projection_init(model, train_set.tensors[0][:1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for epoch in range(epochs):  # constant learning rate: no schedule
        train_one_epoch(model, loader, opt, desc=f"epoch {epoch + 1}/{epochs}", progress=False)
    return accuracy(model, test_set)


def folding_configs(autos: dict[str, Path], out: Path) -> dict[tuple[str, str], Path]:
    """Folding configs (``full`` and one per FINN auto folding in ``autos``) x threshold memory
    styles: PE/SIMD only (``full``: all 1), plus the threshold memory style of MVAUs and
    Thresholding layers."""
    paths = {}
    for folding in ("full", *autos):
        auto = json.loads(autos[folding if folding != "full" else next(iter(autos))].read_text())
        for style in STYLES:
            cfg: dict = {"Defaults": {}}
            for name, attrs in auto.items():
                if name == "Defaults" or not isinstance(attrs, dict):
                    continue
                entry = {k: (1 if folding == "full" else v) for k, v in attrs.items()
                         if k in ("PE", "SIMD")}
                if name.startswith("MVAU"):
                    entry["ram_style_thresholds"] = style
                elif name.startswith("Thresholding"):
                    entry["ram_style"] = style
                cfg[name] = entry
            out.mkdir(parents=True, exist_ok=True)
            paths[(folding, style)] = out / f"folding_{folding.replace(' ', '')}_{style}.json"
            with atomic_output(paths[(folding, style)], overwrite=True) as tmp:
                tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    return paths


def measure(model_path: Path, out: Path, folding_config: Path) -> dict:
    """One estimate build: per-MVAU figures and FINN's network totals."""
    result = build(model_path, out, folding_config=folding_config, overwrite=True)
    estimates = json.loads((out / "report" / "estimate_layer_resources.json").read_text())
    config = json.loads(folding_config.read_text())
    final = ModelWrapper(str(out / "intermediate_models" / "step_generate_estimate_reports.onnx"))
    weights = {n.name: getCustomOp(n).get_nodeattr("weightDataType") for n in final.graph.node
               if n.op_type.startswith(("MVAU", "VVAU"))}
    layers = [{"node": w.finn_node, "layer": w.layer, "bits": w.bits, "finn_bits": w.finn_bits,
               "weights": weights[w.finn_node], "PE": config.get(w.finn_node, {}).get("PE", 1),
               "SIMD": config.get(w.finn_node, {}).get("SIMD", 1), "lut_set": w.lut_chosen,
               "lut_finn": w.lut_finn, "lut_int32_finn": w.lut_int32,
               "lut_int32_true": w.lut_int32_uncapped} for w in result.layers]
    return {"layers": layers, "network_lut": int(estimates["total"]["LUT"]),
            "network_bram18": float(estimates["total"]["BRAM_18K"])}


def summarize(a2q: dict, plain: dict) -> dict:
    """The four columns, MVAU sums and whole-network figures."""
    def mvau(run, key):
        return sum(r[key] for r in run["layers"])

    base_a2q = a2q["network_lut"] - mvau(a2q, "lut_set")
    base_plain = plain["network_lut"] - mvau(plain, "lut_set")
    cols = {"A2Q-12": (mvau(a2q, "lut_set"), base_a2q),
            "FINN plain": (mvau(plain, "lut_finn"), base_plain),
            "INT32 (FINN)": (mvau(a2q, "lut_int32_finn"), base_a2q),
            "INT32 (true)": (mvau(a2q, "lut_int32_true"), base_a2q)}
    return {"mvau": {k: v[0] for k, v in cols.items()},
            "network": {k: v[0] + v[1] for k, v in cols.items()},
            "bram18": {"A2Q-12": a2q["network_bram18"], "FINN plain": plain["network_bram18"]}}


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ("A2Q-12", "FINN plain", "INT32 (FINN)", "INT32 (true)")
    lines = ["# FINN LUT estimates: A2Q P = 12 vs baselines", "",
             f"Command: `{meta['command']}`; {meta['seconds']:.0f} s. Ratios are baseline / A2Q-12.",
             "", "| net | folding | thresholds | scope | " + " | ".join(cols)
             + " | plain/A2Q | INT32 FINN/A2Q | INT32 true/A2Q |",
             "|---|---|---|---|" + "---|" * (len(cols) + 3)]
    for r in rows:
        for scope in ("mvau", "network"):
            v = r["summary"][scope]
            a = v["A2Q-12"]
            lines.append(
                f"| {r['net']} | {r['folding']} | {r['style']} | {scope} | "
                + " | ".join(str(v[c]) for c in cols)
                + f" | {v['FINN plain'] / a:.3f} | {v['INT32 (FINN)'] / a:.3f} | "
                f"{v['INT32 (true)'] / a:.3f} |")
    lines += ["", "Accumulator widths (A2Q set / FINN plain), weight types, PE x SIMD:", ""]
    for r in rows:
        if r["style"] != STYLES[0]:
            continue
        parts = [f"{x['layer']}: {x['bits']}/{y['finn_bits']} bits, {x['weights']}/{y['weights']}, "
                 f"{x['PE']}x{x['SIMD']}" for x, y in zip(r["a2q"]["layers"], r["plain"]["layers"],
                                                          strict=True)]
        lines.append(f"- {r['net']} {r['folding']}: " + "; ".join(parts))
    lines += ["", "Accuracy (digits test set): " + ", ".join(
        f"{k} {100 * v:.1f}%" for k, v in meta["accuracy"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (JSON, markdown, builds)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).parent / "results" / "finn_luts.json",
                        help="where to write the results JSON as well (default: %(default)s)")
    parser.add_argument("--mlp-fps", type=int, default=200_000,
                        help="target_fps for the MLP's realistic folding")
    parser.add_argument("--cnn-fps", type=int, default=50_000,
                        help="target_fps for the CNN's realistic folding")
    args = parser.parse_args()
    ok, reason = finn_available()
    if not ok:
        print(f"skipped: {reason}")
        return 0
    torch.set_num_threads(1)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x0 = load_digits()[0].tensors[0][:1]
    rows, accuracy = [], {}
    header = (f"{'net':4} {'folding':8} {'thr':11} {'scope':8} {'A2Q-12':>7} {'plain':>7} "
              f"{'I32 FINN':>8} {'I32 true':>8} {'plain/A':>7} {'I32F/A':>7} {'I32T/A':>7}")
    print(header)
    for net, make in NETWORKS.items():
        paths = {}
        for quant in ("a2q", "none"):
            torch.manual_seed(0)
            model = make(quant, 12 if quant == "a2q" else None)
            accuracy[f"{net} {quant}"] = train(model, quant == "a2q", args.epochs)
            paths[quant] = out / f"{net}_{quant}.onnx"
            export_qonnx(model, x0, paths[quant], overwrite=True)
        fps = args.mlp_fps if net == "mlp" else args.cnn_fps
        autos = {}
        for name, rate in (("fps", fps), ("fps x10", 10 * fps)):
            auto_dir = out / "builds" / f"{net}_a2q_fps{rate}"
            result = build(paths["a2q"], auto_dir, target_fps=rate, overwrite=True)
            autos[name] = result.reports["finn_auto_folding"]
        configs = folding_configs(autos, out / net)
        for (folding, style), cfg in configs.items():
            tag = f"{folding.replace(' ', '')}_{style}"
            runs = {q: measure(paths[q], out / "builds" / f"{net}_{q}_{tag}", cfg)
                    for q in ("a2q", "none")}
            row = {"net": net, "folding": folding, "style": style, "a2q": runs["a2q"],
                   "plain": runs["none"], "summary": summarize(runs["a2q"], runs["none"])}
            rows.append(row)
            for scope in ("mvau", "network"):
                v = row["summary"][scope]
                a = v["A2Q-12"]
                print(f"{net:4} {folding:8} {style:11} {scope:8} {a:>7} {v['FINN plain']:>7} "
                      f"{v['INT32 (FINN)']:>8} {v['INT32 (true)']:>8} {v['FINN plain'] / a:>7.3f} "
                      f"{v['INT32 (FINN)'] / a:>7.3f} {v['INT32 (true)'] / a:>7.3f}", flush=True)
    meta = {"command": f"python benchmarks/finn_luts.py --out {args.out} --epochs {args.epochs} "
                       f"--mlp-fps {args.mlp_fps} --cnn-fps {args.cnn_fps}",
            "seconds": time.time() - start, "accuracy": accuracy, "fpga_part": "xc7z020 (Pynq-Z1)",
            "clk_ns": 10.0, "finn": detect_finn().describe().split(" at ")[0]}
    for path in (out / "finn_luts.json", args.results):
        with atomic_output(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    with atomic_output(out / "finn_luts.md", overwrite=True) as tmp:
        tmp.write_text(markdown(rows, meta))
    print(f"accuracy: {meta['accuracy']}; {meta['seconds']:.0f} s; tables in {out}/finn_luts.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
