"""Ctrl-C during ``a2q train`` (a real SIGINT to the real command) exits 130 with a one-line
message naming the saved epoch, and ``--resume`` then ends bit-identical to an uninterrupted run.

The run is a CNN on digits with batches of 4: 80 steps per epoch (320 in all), so the interruption falls
inside the first 300 training steps, in which Brevitas initializes the activation scales from
running statistics (the state a plain state dict loses), and the resumed run crosses the end of
that phase."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from brevitas_a2q.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ARGV = [sys.executable, "-m", "brevitas_a2q.cli", "train", "--arch", "cnn", "--quant", "a2q+",
        "--acc-bits", "12", "--layer-acc-bits", "conv1=16", "--train-limit", "320",
        "--batch-size", "4", "--epochs", "4", "--penalty", "1e-3", "--no-progress"]


def _default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even if this test runs where SIGINT is
    ignored (a background job of a non-interactive shell passes the ignore on to its children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after_first_checkpoint(out) -> subprocess.CompletedProcess:
    """Start a run, send SIGINT as soon as its first checkpoint exists, wait for it to end."""
    proc = subprocess.Popen([*ARGV, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not (out / "model.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigint_then_resume_is_bit_identical(tmp_path):
    uninterrupted = subprocess.Popen([*ARGV, "--out", str(tmp_path / "a")],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = _interrupt_after_first_checkpoint(tmp_path / "b")
    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    saved = load_checkpoint(tmp_path / "b" / "model.pt").extra["epoch"]
    assert 1 <= saved < 4, "the interruption came too late to test a resume"
    (line,) = [x for x in stopped.stderr.splitlines() if x.strip()]
    assert f"holds epoch {saved}/4" in line and "--resume" in line
    assert "interrupted during epoch" in line
    assert not (tmp_path / "b" / "model.onnx").exists()
    assert not (tmp_path / "b" / "results.json").exists()
    assert not list((tmp_path / "b").glob(".*.tmp"))  # no half-written checkpoint

    resumed = subprocess.run([*ARGV, "--out", str(tmp_path / "b"), "--resume"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err

    a = load_checkpoint(tmp_path / "a" / "model.pt")
    b = load_checkpoint(tmp_path / "b" / "model.pt")
    assert b.extra["epoch"] == 4 and len(b.extra["history"]) == 4
    differ = [k for k, v in a.model.state_dict().items()
              if not torch.equal(v, b.model.state_dict()[k])]
    assert differ == [], f"{len(differ)} state tensors differ: {differ[:5]}"
    assert a.extra["history"] == b.extra["history"]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["resumed_at_epoch"] == saved
