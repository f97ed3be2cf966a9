"""Simulated accumulators (Blumenfeld et al., ICLR 2024): a training step and a forward pass under
the simulation against the same model's plain ones, measured side by side in one run.

Setups: ``cnn`` is the benchmark CNN (``build_cnn``, W4A4, 28x28 digits upsampled, batch 64);
``k1152`` and ``k2304`` are one ResNet18-like block of a later stage (4-bit post-ReLU input ->
QuantConv2d 3x3, 128 channels at 16x16 (K = 1152) or 256 at 8x8 (K = 2304) -> BN -> 4-bit ReLU
-> linear), batch 8; ``dw256`` is a MobileNet depthwise-separable block (4-bit input -> depthwise
3x3, 256 channels at 14x14 (K = 9, one output per group) -> BN -> 4-bit ReLU -> pointwise 1x1
(K = 256) -> BN -> 4-bit ReLU -> linear), batch 8; ``mobilenet_v1`` is Brevitas's
``quant_mobilenet_v1_4b`` as its example defines it (randomly initialised: its trained weights are
a download), an 8-bit input quantizer in front so that every layer accumulates integers, one
224x224 image. For each accumulator spec and gradient mode, a training step (forward,
cross-entropy, backward, SGD update) under ``simulate_accumulators`` is timed interleaved with a
plain step of the same model, repeated ``--reps`` times; the ratio of the medians is reported.
Forward-only (``torch.no_grad``, eval mode) likewise. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` around one step; on CPU the growth of the process's
peak resident set over one step, after a warm-up step and with the freed memory handed back to
the system first (``malloc_trim``), each mode in a fresh subprocess whose glibc maps every
allocation of 64 KiB or more on its own (``MALLOC_MMAP_THRESHOLD_``), so that memory freed is
returned at once and the growth is the step's peak of live memory, as on CUDA. (With glibc's
default, which raises that threshold as blocks are freed, the same step's figure moved by several
MB from run to run, with whatever its free lists happened to hold.)

    PYTHONPATH=. .venv/bin/python benchmarks/accumulator_speed.py
    PYTHONPATH=. .venv/bin/python benchmarks/accumulator_speed.py --device cuda \\
        --out benchmarks/results/accumulator_speed_cuda.json

The GPU figures (benchmarks/results/accumulator_speed_cuda.json, with
accumulator_speed_cuda_env.txt) come from benchmarks/run_cuda_checks.sh on one H200.

Targets (issue 18): training step <= 3x a plain step with the identity STE, <= 5x with
``immediate`` / ``recursive``; forward <= 3x; peak memory <= 2x a plain step's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat
from torch import nn

from brevitas_a2q.io import atomic_output
from brevitas_a2q.sim.layers import simulate_accumulators
from brevitas_a2q.train.models import build_cnn

SPECS = ("int12-sat", "int12-sat-c32", "fp12-e4m7", "fp12-e4m7-c16")
GRADIENTS = ("ste", "immediate", "recursive")
SETUPS = ("cnn", "k1152", "k2304", "dw256", "mobilenet_v1")
TARGETS = {"ste": 3.0, "immediate": 5.0, "recursive": 5.0, "forward": 3.0, "memory": 2.0}


def _block(channels: int, side: int) -> nn.Module:
    """A later-stage ResNet18 conv (K = 9 * channels) between 4-bit activations."""
    return nn.Sequential(
        QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        QuantConv2d(channels, channels, 3, padding=1, bias=False,
                    weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4),
        nn.BatchNorm2d(channels),
        QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        nn.Flatten(),
        QuantLinear(channels * side * side, 10, bias=True, weight_quant=Int8WeightPerTensorFloat,
                    weight_bit_width=4),
    )


def _separable_block(channels: int, side: int) -> nn.Module:
    """A MobileNet depthwise-separable block between 4-bit activations."""
    weights = dict(bias=False, weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4)
    return nn.Sequential(
        QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        QuantConv2d(channels, channels, 3, padding=1, groups=channels, **weights),
        nn.BatchNorm2d(channels),
        QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        QuantConv2d(channels, channels, 1, **weights),
        nn.BatchNorm2d(channels),
        QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True),
        nn.Flatten(),
        QuantLinear(channels * side * side, 10, bias=True, weight_quant=Int8WeightPerTensorFloat,
                    weight_bit_width=4),
    )


def build_setup(name: str, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """``(model, inputs, labels, description)`` for one setup, seeded."""
    torch.manual_seed(0)
    if name == "cnn":
        from brevitas_a2q.train.data import load_digits

        _, test = load_digits()
        x = F.interpolate(test.tensors[0][:64], size=28, mode="bilinear", align_corners=False)
        y = test.tensors[1][:64]
        model = build_cnn("none", image_size=28)
        desc = {"model": "build_cnn W4A4 (conv K = 9, 144; fc K = 1568)", "batch": 64,
                "input": "digits upsampled to 28x28"}
    elif name == "mobilenet_v1":
        from brevitas_examples.imagenet_classification.models import model_with_cfg

        net, _ = model_with_cfg("quant_mobilenet_v1_4b")  # no pretrained download
        model = nn.Sequential(QuantIdentity(act_quant=Int8ActPerTensorFloat,
                                            return_quant_tensor=True), net)
        x = torch.randn(1, 3, 224, 224)
        y = torch.randint(0, 1000, (1,))
        desc = {"model": "Brevitas's quant_mobilenet_v1_4b as defined (random init), an 8-bit "
                         "input quantizer in front", "batch": 1,
                "input": "N(0, 1) at 224x224 through an 8-bit quantizer"}
    elif name == "dw256":
        x = torch.randn(8, 256, 14, 14).relu()
        y = torch.randint(0, 10, (8,))
        model = _separable_block(256, 14)
        desc = {"model": "MobileNet depthwise-separable block: depthwise 3x3, 256 channels at "
                         "14x14 (K = 9), pointwise 1x1 (K = 256), W4A4, + linear", "batch": 8,
                "input": "ReLU(N(0, 1)) through a 4-bit quantizer"}
    else:
        channels, side = (128, 16) if name == "k1152" else (256, 8)
        x = torch.randn(8, channels, side, side).relu()
        y = torch.randint(0, 10, (8,))
        model = _block(channels, side)
        desc = {"model": f"QuantConv2d {channels}->{channels} 3x3 at {side}x{side} "
                         f"(K = {9 * channels}), W4A4, + linear", "batch": 8,
                "input": "ReLU(N(0, 1)) through a 4-bit quantizer"}
    return model.to(device), x.to(device), y.to(device), desc


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train_step(model, x, y, opt) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def measure_setup(name: str, device: str, reps: int, specs, gradients) -> dict:
    """Interleaved timings: each rep times a plain step, then every simulated mode."""
    model, x, y, desc = build_setup(name, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    modes = [(s, g) for s in specs for g in gradients]

    def plain_train():
        model.train()
        _train_step(model, x, y, opt)

    def plain_fwd():
        model.eval()
        with torch.no_grad():
            model(x)

    def sim_train(spec, grad):
        def run():
            model.train()
            with simulate_accumulators(model, spec, gradient=grad):
                _train_step(model, x, y, opt)
        return run

    def sim_fwd(spec):
        def run():
            model.eval()
            with simulate_accumulators(model, spec), torch.no_grad():
                model(x)
        return run

    jobs = {("plain", "train"): plain_train, ("plain", "forward"): plain_fwd}
    jobs |= {(s, g): sim_train(s, g) for s, g in modes}
    jobs |= {(s, "forward"): sim_fwd(s) for s in specs}
    for fn in jobs.values():  # warm-up (numba compiles here)
        fn()
    times: dict = {key: [] for key in jobs}
    ratios: dict = {key: [] for key in jobs if key[0] != "plain"}
    for _ in range(reps):
        base = {kind: _timed(jobs[("plain", kind)], device) for kind in ("train", "forward")}
        for key, fn in jobs.items():
            if key[0] == "plain":
                times[key].append(base[key[1]])
                continue
            t = _timed(fn, device)
            times[key].append(t)
            ratios[key].append(t / base["forward" if key[1] == "forward" else "train"])
    out = {"setup": desc, "plain_train_seconds": statistics.median(times[("plain", "train")]),
           "plain_forward_seconds": statistics.median(times[("plain", "forward")]), "modes": []}
    for (spec, kind), r in ratios.items():
        ratio = statistics.median(r)
        target = TARGETS[kind]
        out["modes"].append({"spec": spec, "gradient": None if kind == "forward" else kind,
                             "what": "forward" if kind == "forward" else "train step",
                             "seconds": statistics.median(times[(spec, kind)]),
                             "ratio": ratio, "target": target, "met": ratio <= target})
    return out


def _memory_child(name: str, device: str, spec: str | None, grad: str) -> int:
    """Bytes a training step adds to the peak (CUDA: allocator peak; CPU: peak RSS growth)."""
    model, x, y, _ = build_setup(name, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    with contextlib.ExitStack() as stack:
        if spec:
            stack.enter_context(simulate_accumulators(model, spec, gradient=grad))
        _train_step(model, x, y, opt)  # warm-up: compiles, allocates the optimizer's state
        if device != "cuda":
            return _peak_rss_growth(lambda: _train_step(model, x, y, opt))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _train_step(model, x, y, opt)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_growth(fn) -> int:
    """Largest resident set seen (polled every 0.2 ms from a thread) while ``fn`` runs, minus
    the resident set before it."""
    import ctypes
    import gc
    import threading

    gc.collect()
    # hand the memory freed so far back to the system, so that the step's growth is its own
    # working set rather than whatever glibc's free lists happen to hold
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_bytes()) - base


def measure_memory(name: str, device: str, specs, gradients) -> dict:
    """Peak memory of one step per mode, each in a fresh process (CPU) or after a reset (CUDA)."""
    res = {}
    for spec, grad in [(None, "ste")] + [(s, g) for s in specs for g in gradients]:
        if device == "cuda":  # the allocator's peak statistics are exact in process
            res[f"{spec or 'plain'}/{grad}"] = _memory_child(name, device, spec, grad)
            continue
        cmd = [sys.executable, __file__, "--memory-child", name, device, spec or "plain", grad]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}  # (module docstring)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        res[f"{spec or 'plain'}/{grad}"] = int(out.stdout.strip().splitlines()[-1])
    plain = res.pop("plain/ste")
    # CPU: a plain step that reuses memory freed earlier shows no growth at all; no ratio then
    ratio = (lambda v: v / plain) if plain > 0 else (lambda v: None)
    return {"plain_step_bytes": plain,
            "modes": [{"spec": k.split("/")[0], "gradient": k.split("/")[1], "bytes": v,
                       "ratio": ratio(v), "target": TARGETS["memory"],
                       "met": None if ratio(v) is None else ratio(v) <= TARGETS["memory"]}
                      for k, v in res.items()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--specs", nargs="+", default=list(SPECS))
    p.add_argument("--gradients", nargs="+", default=list(GRADIENTS), choices=GRADIENTS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/accumulator_speed.json")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true",
                   help="print the markdown table of the results file --out and stop")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, device, spec, grad = args.memory_child
        print(_memory_child(name, device, None if spec == "plain" else spec, grad))
        return
    result = {"device": args.device, "threads": args.threads, "reps": args.reps,
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "targets": TARGETS, "setups": {}}
    failed: list[str] = []
    for name in args.setups:
        t = time.perf_counter()
        try:
            r = measure_setup(name, args.device, args.reps, args.specs, args.gradients)
            if not args.no_memory:
                r["memory"] = measure_memory(name, args.device, args.specs, args.gradients)
        except Exception as err:  # noqa: BLE001 -- recorded, the other setups still run
            failed.append(name)
            result["setups"][name] = {"error": f"{type(err).__name__}: {err}"}
            print(f"\n{name}: FAILED {type(err).__name__}: {err}")
            continue
        result["setups"][name] = r
        result["kernels"] = _kernels_used(args.device)
        print(f"\n{name}: {r['setup']['model']}, batch {r['setup']['batch']}; plain train step "
              f"{1000 * r['plain_train_seconds']:.1f} ms, forward "
              f"{1000 * r['plain_forward_seconds']:.1f} ms ({time.perf_counter() - t:.0f} s)")
        for m in r["modes"]:
            print(f"  {m['spec']:<15} {m['what']:<10} {m['gradient'] or '':<9} "
                  f"{m['ratio']:6.2f}x  (target {m['target']}x: {'met' if m['met'] else 'MISSED'})")
        for m in r.get("memory", {}).get("modes", []):
            if m["ratio"] is None:
                print(f"  {m['spec']:<15} memory     {m['gradient']:<9} {m['bytes']} bytes "
                      "(plain step: no growth, no ratio)")
                continue
            print(f"  {m['spec']:<15} memory     {m['gradient']:<9} {m['ratio']:6.2f}x  "
                  f"(target {m['target']}x: {'met' if m['met'] else 'MISSED'})")
        _write(args.out, result, args.overwrite or len(result["setups"]) > 1)
    print(f"\nwrote {args.out}")
    if failed:
        sys.exit(f"setups that failed: {', '.join(failed)}")


def _cell(mode: dict | None) -> str:
    if mode is None:
        return "–"
    if mode["ratio"] is None:
        return "no ratio (plain step: no growth)"
    text = f"{mode['ratio']:.2f}x"
    return text if mode["met"] else f"**{text}** missed"


def table(result: dict) -> str:
    """The benchmarks page's table (markdown) of a results file: each ratio of a setup and
    accumulator, missed targets in bold."""
    t = result["targets"]
    lines = [f"| setup | accumulator | train step, ste (<= {t['ste']:g}x) | immediate "
             f"(<= {t['immediate']:g}x) | recursive (<= {t['recursive']:g}x) | forward "
             f"(<= {t['forward']:g}x) | peak memory, ste / immediate / recursive "
             f"(<= {t['memory']:g}x) |", "|---|---|---|---|---|---|---|"]
    for name, setup in result["setups"].items():
        if "error" in setup:
            lines.append(f"| {name} | failed: {setup['error']} | | | | | |")
            continue
        modes = {(m["spec"], m["gradient"]): m for m in setup["modes"]}
        memory = {(m["spec"], m["gradient"]): m for m in setup.get("memory", {}).get("modes", [])}
        for spec in dict.fromkeys(m["spec"] for m in setup["modes"]):
            cells = [_cell(modes.get((spec, g))) for g in GRADIENTS + (None,)]
            peak = " / ".join(_cell(memory.get((spec, g))) for g in GRADIENTS)
            lines.append(f"| {name} | {spec} | {' | '.join(cells)} | {peak} |")
    return "\n".join(lines)


def _kernels_used(device: str) -> str:
    """Which chain ran: the compiled kernels, or the torch chain and why."""
    from brevitas_a2q.sim import kernels

    if device == "cuda":
        failed = kernels._CUDA_FAILED
        return "numba.cuda" if failed is None else f"torch chain (numba.cuda: {failed})"
    return "numba (CPU)" if kernels.available() else f"torch chain (numba: {kernels._FAILED})"


def _write(path: str, result: dict, overwrite: bool) -> None:
    """The results so far (after each setup: a run stopped early keeps what it measured)."""
    with atomic_output(Path(path), overwrite) as tmp:
        tmp.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
