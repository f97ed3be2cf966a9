"""``a2q build`` through the installed ``a2q`` command (a subprocess, as a user runs it): the exit
codes (1 a violated target, 2 bad input, 130 interrupted), one line on stderr for every error, what
FINN would reject refused before FINN starts, no partial output, no false pass (forced widths, the
report of a finished build), and help that matches the code. FINN+ builds run here; skipped, naming
what is missing, where FINN is not importable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.analysis.qonnx_analysis import analyze_accumulators
from brevitas_a2q.analysis.records import read_records, write_records
from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.models import build_cnn
from finn_flow import finn_available

A2Q = Path(sys.executable).with_name("a2q")
FINN_OK, FINN_REASON = finn_available()

pytestmark = [pytest.mark.finn, pytest.mark.slow,
              pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")]


def _calibrated_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_cnn("a2q+", weight_bits=4, act_bits=4, acc_bits=12)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))  # Brevitas collects activation statistics in training mode
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An A2Q+ CNN at P = 12 (every target holds: A2Q+ bounds any weights), the same file with
    conv1's recorded target lowered below its exact range, and Brevitas's own QONNX export."""
    from brevitas.export import export_qonnx as brevitas_export_qonnx

    root = tmp_path_factory.mktemp("build-cli")
    model = _calibrated_cnn()
    x = torch.rand(1, 1, 8, 8)
    export_qonnx(model, x, root / "model.onnx")
    wrapper = ModelWrapper(str(root / "model.onnx"))
    exact = {a.layer: a.bits_exact_range for a in analyze_accumulators(wrapper)}
    records = read_records(wrapper)
    records[0].target_bits = exact[records[0].layer] - 1
    write_records(wrapper, records)
    wrapper.save(str(root / "violated.onnx"))
    brevitas_export_qonnx(model, x, str(root / "theirs.onnx"), dynamo=False)
    (root / "exact.json").write_text(json.dumps(exact))
    return root


def a2q(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(A2Q), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def assert_one_line(done: subprocess.CompletedProcess, rc: int, *needles: str) -> str:
    """Exit ``rc`` with exactly one line on stderr holding every needle."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == rc, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def assert_nothing_left(out: Path) -> None:
    """No output directory and no temporary build directory beside it."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_violated_target_exits_1_in_one_line(files, tmp_path):
    done = a2q("build", files / "violated.onnx", "--out", tmp_path / "out")
    assert_one_line(done, 1, "VIOLATED", "conv1", "target P")
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("case", ["nan_inputs", "fpga_part", "board", "folding_json",
                                  "folding_pe", "bitfile_without_vivado", "step_name",
                                  "brevitas_export", "forced_below_proven"])
def test_bad_input_refused_in_one_line_without_output(files, tmp_path, case):
    """Each refused with exit 2 and one line naming the option; FINN's PE check runs as the
    first thing after the graph it needs exists (a second of FINN), the rest before FINN runs."""
    out = tmp_path / "out"
    model = files / "model.onnx"
    exact = json.loads((files / "exact.json").read_text())
    if case == "nan_inputs":
        inputs = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
        inputs[1, 0, 3, 4] = np.nan
        np.save(tmp_path / "x.npy", inputs)
        args, needles = ["--verify", "hls-arith", "--verify-inputs", tmp_path / "x.npy"], \
            ["--verify-inputs", "NaN", "(1, 0, 3, 4)"]
    elif case == "fpga_part":
        args, needles = ["--fpga-part", "xcNOSUCH"], ["--fpga-part 'xcNOSUCH'"]
    elif case == "board":
        args, needles = ["--board", "Pynq-Z9"], ["--board 'Pynq-Z9'", "Pynq-Z1"]
    elif case == "folding_json":
        (tmp_path / "f.json").write_text("{MVAU_hls_0: {PE: 2}}")
        args, needles = ["--folding-config", tmp_path / "f.json"], ["--folding-config",
                                                                    "not valid JSON", "line 1"]
    elif case == "folding_pe":  # conv1 has 16 output channels (MH = 16)
        (tmp_path / "f.json").write_text(json.dumps({"MVAU_hls_0": {"PE": 3, "SIMD": 1}}))
        args, needles = ["--folding-config", tmp_path / "f.json"], ["MVAU_hls_0 PE = 3",
                                                                    "MH = 16", "1, 2, 4, 8, 16"]
    elif case == "bitfile_without_vivado":
        env_has_vivado = os.environ.get("XILINX_VIVADO")
        if env_has_vivado:
            pytest.skip("Vivado is set up here")
        args, needles = ["--board", "Pynq-Z1", "--outputs", "bitfile"], ["bitfile", "Vivado"]
    elif case == "step_name":
        (tmp_path / "steps.py").write_text(
            "STEPS = ['step_qonnx_to_finn', 'step_tidy_up', 'step_streamlin']\n")
        args, needles = ["--steps", f"{tmp_path / 'steps.py'}:STEPS"], \
            ["'step_streamlin' is not a FINN step name", "step_streamline"]
    elif case == "brevitas_export":
        model, args, needles = files / "theirs.onnx", [], ["Brevitas's own QONNX export",
                                                          "brevitas_a2q.export_qonnx"]
    else:
        bits = max(exact.values()) - 1
        args, needles = ["--force-accumulator-bits", bits], \
            [f"--force-accumulator-bits {bits}", "--allow-overflow-demo"]
    start = time.perf_counter()
    done = a2q("build", model, "--out", out, *args)
    assert_one_line(done, 2, *needles)
    assert_nothing_left(out)
    assert time.perf_counter() - start < 120  # before: each ran FINN's build for 7-15 s, then failed


def _ctrl_c_interrupts() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT
    ignored (a background job inherits SIG_IGN, and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupt_during_finn_exits_130_and_leaves_nothing(files, tmp_path):
    """Ctrl-C while FINN runs its steps (FINN+ catches KeyboardInterrupt itself)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([str(A2Q), "build", str(files / "model.onnx"), "--out", str(out),
                             "--verify", "hls-arith"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_interrupts)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logs = list(tmp_path.glob(".out.*/build_dataflow.log"))
        if logs and "Running step" in logs[0].read_text(errors="replace"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == ["a2q build: interrupted"]
    assert_nothing_left(out)


def test_failed_finn_step_one_line_log_kept_rerun_needs_no_overwrite(files, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "steps.py").write_text(
        "from finn.builder.build_dataflow_config import estimate_only_dataflow_steps as S\n"
        "def step_explode(model, cfg):\n"
        "    raise RuntimeError('boom in a user step')\n"
        "STEPS = [*S[:2], step_explode, *S[2:]]\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # FINN+ re-raises
    done = a2q("build", files / "model.onnx", "--out", out, "--steps",
               f"{tmp_path / 'steps.py'}:STEPS", env=env)  # under pytest, a user's run does not
    line = assert_one_line(done, 2, "step_explode", "boom in a user step", "FINN's log")
    log = tmp_path / "out.failed-build.log"
    assert str(log) in line and "step_explode" in log.read_text()
    assert_nothing_left(out)
    done = a2q("build", files / "model.onnx", "--out", out)  # no --overwrite needed
    assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists()  # the failure it recorded is superseded
    assert done.stderr.strip() == ""  # FINN's console output only with --verbose
    report = (out / "accumulators.md").read_text()
    assert "Verification: not run" in report and "--verify" in report
    assert (out / "build_dataflow.log").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_forced_below_proven_is_an_explicit_demo_and_labelled(files, tmp_path):
    exact = json.loads((files / "exact.json").read_text())
    bits = max(exact.values()) - 1
    out = tmp_path / "out"
    done = a2q("build", files / "model.onnx", "--out", out, "--force-accumulator-bits", bits,
               "--allow-overflow-demo", "--verify", "hls-arith", "--random-inputs", "4", "--json")
    result = json.loads(done.stdout)
    below = [row for row in result["layers"] if not row["holds_exact_range"]]
    assert below and all(row["forced"] for row in below)
    report = (out / "accumulators.md").read_text()
    assert "FORCED below exact range" in report and "can overflow" in report
    assert "only a verification can tell" not in report
    # a layer below its exact range overflows at its extremes: the check says so, exit 1
    assert done.returncode == (1 if result["verified"] is False else 0), done.stderr[-2000:]
    assert result["verified"] is False
