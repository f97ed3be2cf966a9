"""``a2q quantize`` through the installed ``a2q`` command (a subprocess, as a user runs it): a float
checkpoint of ``a2q train --quant float`` becomes an A2Q+ checkpoint that ``a2q evaluate`` and
``a2q report`` read, with every target holding exactly; bad input is one line on stderr, exit 2,
and leaves no output; a FINN+ build of the result is verified bit-exact (marked finn, slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from brevitas_a2q.analysis.audit import capture_layers
from brevitas_a2q.quant.bounds import exact_accumulator_range, input_range
from brevitas_a2q.train.checkpoint import load_checkpoint
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.loop import accuracy
from finn_flow import finn_available

A2Q = Path(sys.executable).with_name("a2q")


def a2q(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(A2Q), *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def assert_one_line(done: subprocess.CompletedProcess, rc: int, *needles: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == rc, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ptq-float")
    done = a2q("train", "--quant", "float", "--epochs", "3", "--lr", "1e-2", "--batch-size",
               "128", "--no-progress", "--out", root / "f")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "f" / "model.pt"


@pytest.fixture(scope="module")
def quantized(float_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ptq-q") / "q"
    done = a2q("quantize", float_ckpt, "--acc-bits", "12", "--layer-acc-bits", "conv1=16",
               "--calib", "256", "--out", out, "--json", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["audit"]["all_hold"] is True
    return out


def test_float_checkpoint_to_proven_checkpoint(float_ckpt, quantized):
    results = json.loads((quantized / "results.json").read_text())
    assert results["audit"]["all_hold"] is True and results["audit"]["checked"] == 3
    # the checkpoint is an ordinary one: rebuilt and loaded strictly, same accuracy
    ckpt = load_checkpoint(quantized / "model.pt")
    _, test = load_digits()
    assert accuracy(ckpt.model, test) == pytest.approx(results["test_accuracy"])
    assert results["test_accuracy"] > 0.8 * results["float_accuracy"]
    # every layer's exact range fits its target, recomputed here from the integers
    targets = {"conv1": 16, "conv2": 12, "fc": 12}
    for cap in capture_layers(ckpt.model, test.tensors[0][:8]):
        rng = exact_accumulator_range(cap.rows.to(torch.int64).numpy(),
                                      *input_range(cap.input_bits, cap.input_signed))
        assert cap.target_bits == targets[cap.name]
        assert rng.signed_bits <= targets[cap.name]


def test_evaluate_and_report_read_the_result(quantized):
    done = a2q("evaluate", quantized / "model.pt", "-a", "int12-wrap", "--no-progress", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    done = a2q("report", quantized / "model.onnx", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["all_hold"] is True


def test_any_module_from_a_python_file(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 8 * 8, 10))\n")
    out = tmp_path / "q"
    done = a2q("quantize", f"{source}:make", "--acc-bits", "14", "--calib", "64", "--out", out,
               "--json", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert results["audit"]["all_hold"] is True
    assert {r["layer"] for r in results["audit"]["layers"]} == {"0", "3"}
    assert (out / "model.onnx").is_file()
    assert torch.load(out / "model.pt", weights_only=True)["format"] == "brevitas_a2q.ptq.state/1"


@pytest.mark.parametrize("case", ["missing", "quantized_ckpt", "no_module", "not_a_module",
                                  "unknown_layer", "too_many_calib", "target_too_small",
                                  "out_not_empty", "bad_acc_bits"])
def test_bad_input_one_line_exit_2_nothing_written(case, float_ckpt, quantized, tmp_path):
    out = tmp_path / "out"
    source, extra, needles = float_ckpt, [], []
    if case == "missing":
        source, needles = tmp_path / "nope.pt", ["nope.pt", "MODULE:FN"]
    elif case == "quantized_ckpt":
        source, needles = quantized / "model.pt", ["quantized model", "--quant float"]
    elif case == "no_module":
        source, needles = "no_such_module_xyz:make", ["no_such_module_xyz"]
    elif case == "not_a_module":
        (tmp_path / "bad.py").write_text("def make():\n    return 3\n")
        source, needles = f"{tmp_path / 'bad.py'}:make", ["not a torch nn.Module"]
    elif case == "unknown_layer":
        extra, needles = ["--layer-acc-bits", "conv9=12"], ["--layer-acc-bits", "conv9"]
    elif case == "too_many_calib":
        extra, needles = ["--calib", "100000"], ["--calib 100000"]
    elif case == "target_too_small":
        extra, needles = ["--acc-bits", "8"], ["conv1", "P >= 9"]
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        needles = ["--out", "--overwrite"]
    elif case == "bad_acc_bits":
        extra, needles = ["--acc-bits", "1"], ["--acc-bits"]
    done = a2q("quantize", source, "--out", out, "--calib", "64", "--no-progress", *extra)
    if case == "bad_acc_bits":  # argparse's usage error: exit 2, the option named
        assert done.returncode == 2 and "--acc-bits" in done.stderr
    else:
        assert_one_line(done, 2, *needles)
    if case == "out_not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


FINN_OK, FINN_REASON = finn_available()


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_quantize_build_is_verified_bit_exact(float_ckpt, tmp_path):
    """One command from a float checkpoint to a FINN accelerator verified bit-exact (hls-arith,
    calibration images and random inputs); then `a2q build` of the same file, as for a trained
    model."""
    out = tmp_path / "q"
    done = a2q("quantize", float_ckpt, "--acc-bits", "12", "--layer-acc-bits", "conv1=16",
               "--calib", "128", "--out", out, "--build", "--json", "--no-progress")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    results = json.loads(done.stdout)
    assert results["build"]["verified"] is True
    built = a2q("build", out / "model.onnx", "--out", tmp_path / "b", "--verify", "hls-arith",
                "--random-inputs", "8", "--json")
    assert built.returncode == 0, built.stderr[-3000:]
    assert json.loads(built.stdout)["verified"] is True
