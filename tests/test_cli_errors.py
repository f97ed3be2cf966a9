"""Bad input to every subcommand: exit 2, one line that names the culprit, no traceback, no
partial output; a false pass is impossible (an explicit --target is applied, "nothing checked" is
said); an internal error exits 3, never 1 ("a check failed").

Cheap cases call ``brevitas_a2q.cli.main`` in-process; a representative subset goes through the
installed ``a2q`` entry point in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brevitas_a2q.cli import main
from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.checkpoint import save_checkpoint
from brevitas_a2q.train.models import build_cnn

A2Q = Path(sys.executable).with_name("a2q")
KWARGS = {"quant": "a2q+", "weight_bits": 4, "act_bits": 4, "acc_bits": 12,
          "layer_acc_bits": {"conv1": 32, "fc": 32}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An untrained CNN with per-layer targets: checkpoint, QONNX export, a text file, an empty
    file, a directory."""
    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    model = build_cnn(**KWARGS)
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 8, 8))  # Brevitas collects activation statistics in training mode
    model.eval()
    save_checkpoint(root / "model.pt", model, "cnn", KWARGS)
    export_qonnx(model, torch.rand(1, 1, 8, 8), root / "model.onnx")
    (root / "notes.pt").write_text("hello\nthis is text, not a checkpoint\n")
    torch.save({"format": object}, root / "pickled.pt")  # a Python object: never unpickled
    (root / "empty.onnx").write_bytes(b"")
    (root / "adir").mkdir()
    return root


def unwritable(tmp_path: Path) -> Path:
    """A directory nobody may create files in: /sys for root (who ignores permissions), else a
    read-only temporary directory."""
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return d


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str, *needles: str) -> None:
    """Exit 2 and one line on stderr (after argparse's usage lines) holding every needle."""
    assert rc == 2, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    for needle in needles:
        assert needle in last, (needle, err)


# ----------------------------------------------------------------------------------------------
# a2q report: no false pass


def test_explicit_target_overrides_the_record(files, capsys):
    rc, out, err = run_main(capsys, ["report", str(files / "model.onnx"), "--target", "conv1=8"])
    assert rc == 1, out + err
    assert "--target 8 replaces the recorded target 32 of conv1" in out
    assert "VIOLATED: conv1" in out
    rc, out, _ = run_main(capsys, ["report", str(files / "model.onnx"), "--target", "conv1=32"])
    assert rc == 0 and "ok: 3 of 3" in out


@pytest.mark.parametrize("target, needles", [
    ("=12", ["--target '=12'", "name before '=' is empty"]),
    ("conv1=", ["--target 'conv1='", "whole number"]),
    ("conv1=x", ["whole number"]),
    ("0", ["between 2 and 64"]),
    ("conv1=100", ["between 2 and 64"]),
    ("nosuch=12", ["nosuch", "known:", "conv1", "conv2", "fc"]),
])
def test_malformed_or_unknown_targets_exit_2(files, tmp_path, capsys, target, needles):
    png = tmp_path / "w.png"
    rc, out, err = run_main(capsys, ["report", str(files / "model.onnx"), "--target", target,
                                     "--plot", str(png)])
    assert_clean_error(rc, err, *needles)
    assert out == "" and not png.exists()


def test_no_target_says_nothing_was_checked(tmp_path, capsys):
    """A plain Brevitas QAT export (no records): the widths are printed, nothing is checked, the
    verdict says so, and the exit status is 2 (nothing to pass or fail), never 0."""
    from brevitas.export import export_qonnx as brevitas_export

    model = build_cnn("none", acc_bits=None).eval()
    path = tmp_path / "plain.onnx"
    brevitas_export(model, torch.rand(1, 1, 8, 8), str(path), dynamo=False)
    rc, out, err = run_main(capsys, ["report", str(path)])
    assert_clean_error(rc, err, "nothing checked", str(path), "--target P")
    assert "NOTHING CHECKED" in out and "all hold" not in out and "P(exact)" in out
    rc, out, _ = run_main(capsys, ["report", str(path), "--json"])
    import json

    payload = json.loads(out)
    assert rc == 2 and payload["checked"] == 0 and payload["all_hold"] is None
    assert payload["verdict"].startswith("NOTHING CHECKED")
    rc, out, _ = run_main(capsys, ["report", str(path), "--target", "/conv2/Conv=16"])
    assert rc == 0 and "ok: 1 of 3" in out and "not checked (no target): " in out


@pytest.mark.parametrize("plot, needle", [
    ("widths.txt", "must end in .png"),
    ("adir", "is a directory"),
    ("missing-dir/w.png", "does not exist"),
    ("notes.pt/w.png", "notes.pt is a file, not a directory"),
])
def test_bad_plot_paths_exit_2(files, capsys, plot, needle):
    rc, _, err = run_main(capsys, ["report", str(files / "model.onnx"), "--plot",
                                   str(files / plot)])
    assert_clean_error(rc, err, "--plot", needle)
    assert not (files / "widths.txt").exists()


def test_plot_into_unwritable_directory(files, tmp_path, capsys):
    target = unwritable(tmp_path) / "w.png"
    rc, _, err = run_main(capsys, ["report", str(files / "model.onnx"), "--plot", str(target)])
    assert_clean_error(rc, err, "not writable", str(target.parent))


@pytest.mark.parametrize("model, needle", [
    ("adir", "is a directory"), ("empty.onnx", "empty (0 bytes)"), ("absent.onnx", "does not exist"),
])
def test_bad_report_inputs(files, capsys, model, needle):
    rc, _, err = run_main(capsys, ["report", str(files / model)])
    assert_clean_error(rc, err, str(files / model), needle)


# ----------------------------------------------------------------------------------------------
# a2q train / demo: validated before any work


@pytest.mark.parametrize("argv, needles", [
    (["--acc-bits", "0"], ["--acc-bits", "between 2 and 64 bits, got 0"]),
    (["--acc-bits", "-3"], ["--acc-bits", "got -3"]),
    (["--acc-bits", "100"], ["--acc-bits", "got 100"]),
    (["--quant", "none", "--acc-bits", "8"], ["--acc-bits needs an accumulator-aware --quant",
                                              "--quant none"]),
    (["--quant", "float", "--acc-bits", "8"], ["--acc-bits", "--quant float"]),
    (["--acc-bits", "6"], ["--acc-bits 6 is too small for layer conv1", "P >= 9",
                           "--layer-acc-bits conv1=9"]),
    (["--quant", "a2q", "--layer-acc-bits", "conv2=4"],
     ["--layer-acc-bits conv2=4 is too small for layer conv2 (4-bit unsigned input, a2q)"]),
    (["--layer-acc-bits", "conv1=0"], ["--layer-acc-bits", "'conv1=0'", "between 2 and 64"]),
    (["--layer-acc-bits", "conv9=12"], ["unknown layer(s) ['conv9']", "conv1, conv2, fc"]),
    (["--weight-bits", "0"], ["--weight-bits", "between 2 and 16 bits, got 0"]),
    (["--weight-bits", "1"], ["--weight-bits", "got 1"]),
    (["--act-bits", "1"], ["--act-bits", "between 2 and 16 bits, got 1"]),
    (["--arch", "mlp", "--hidden", "0"], ["--hidden", "at least 1, got 0"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--lr", "-1"], ["--lr", "positive"]),
    (["--finetune-accumulator", "int12-sat", "--finetune-layer", "nosuch=int16-sat"],
     ["--finetune-layer", "nosuch", "conv1, conv2, fc"]),
    (["--finetune-accumulator", "int12-sat", "--finetune-layer", "conv1=int16-bogus"],
     ["--finetune-layer conv1", "int16-bogus"]),
])
def test_train_options_exit_2_before_any_work(tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    rc, stdout, err = run_main(capsys, ["train", *argv, "--out", str(out), "--no-progress"])
    assert_clean_error(rc, err, *needles)
    assert not out.exists() and "epoch" not in stdout


def test_train_and_demo_out_paths(files, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for command in ("train", "demo"):
        rc, _, err = run_main(capsys, [command, "--out", str(a_file), "--no-progress"])
        assert_clean_error(rc, err, str(a_file), "is a file, not a directory")
        rc, _, err = run_main(capsys, [command, "--out", str(a_file / "sub"), "--no-progress"])
        assert_clean_error(rc, err, "is a file, not a directory")
        bad = unwritable(tmp_path) / "run"
        rc, _, err = run_main(capsys, [command, "--out", str(bad), "--no-progress"])
        assert_clean_error(rc, err, "not writable")
        assert not bad.exists()
    assert a_file.read_text() == "x"


# ----------------------------------------------------------------------------------------------
# a2q evaluate


@pytest.mark.parametrize("argv, needles", [
    (["--threads", "0"], ["--threads", "at least 1, got 0"]),
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--limit", "-2"], ["--limit", "at least 1"]),
    (["-a", "int12-wrapp"], ["--accumulator", "int12-wrapp"]),
    (["--only", "nosuch"], ["--only", "nosuch", "conv1, conv2, fc"]),
    (["--layer", "conv1=int0-wrap"], ["--layer conv1", "2..52"]),
    (["--only", "conv1", "--all-layers"], ["--only and --all-layers exclude each other"]),
    (["--data-dir", "/nonexistent"], ["--data-dir /nonexistent does not exist"]),
    (["--data-dir", "."], ["--data-dir", "trained on digits"]),
])
def test_evaluate_options_exit_2(files, capsys, argv, needles):
    rc, out, err = run_main(capsys, ["evaluate", str(files / "model.pt"), *argv,
                                     "--no-progress"])
    assert_clean_error(rc, err, *needles)


@pytest.mark.parametrize("name, needle", [
    ("adir", "is a directory, not a file"),
    ("notes.pt", "not a torch.save archive"),
    ("absent.pt", "does not exist"),
    ("pickled.pt", "not a brevitas_a2q.train.checkpoint/1 checkpoint (it holds Python objects"),
    ("model.onnx", "not a brevitas_a2q.train.checkpoint/1 checkpoint (not a torch.save archive"),
])
def test_evaluate_bad_checkpoints(files, capsys, name, needle):
    rc, _, err = run_main(capsys, ["evaluate", str(files / name)])
    assert_clean_error(rc, err, str(files / name), needle)
    assert "\x1b[" not in err and "weights_only" not in err


def test_evaluate_keeps_per_layer_targets_and_can_simulate_one_layer(files, capsys):
    argv = ["evaluate", str(files / "model.pt"), "-a", "int10-wrap", "--limit", "64",
            "--no-progress", "--json"]
    import json

    rc, out, _ = run_main(capsys, argv)
    assert rc == 0
    plan = json.loads(out)["results"][0]["plan"]
    assert plan["conv1"] == {"accumulator": "int32-wrap", "why": "its own target P=32"}
    assert plan["conv2"]["accumulator"] == "int10-wrap"
    assert plan["fc"]["accumulator"] == "int32-wrap"
    rc, out, _ = run_main(capsys, [*argv, "--all-layers"])
    plan = json.loads(out)["results"][0]["plan"]
    assert {p["accumulator"] for p in plan.values()} == {"int10-wrap"}
    rc, out, _ = run_main(capsys, [*argv, "--only", "conv2"])
    result = json.loads(out)["results"][0]
    assert [layer["name"] for layer in result["layers"]] == ["conv2"]
    assert set(result["skipped"]) == {"conv1", "fc"}
    rc, out, _ = run_main(capsys, argv[:-1])  # the table says which layer simulates what
    assert "int10-wrap: conv1 int32-wrap (its own target P=32), conv2 int10-wrap" in out


# ----------------------------------------------------------------------------------------------
# a2q build: checked before FINN is imported or a step runs


@pytest.mark.parametrize("argv, needles", [
    (["--force-accumulator-bits", "0"], ["--force-accumulator-bits", "got 0"]),
    (["--clk-ns", "-5"], ["--clk-ns", "positive"]),
    (["--random-inputs", "-1"], ["--random-inputs", "at least 0, got -1"]),
    (["--target-fps", "0"], ["--target-fps", "at least 1"]),
])
def test_build_numeric_options_exit_2(files, tmp_path, capsys, argv, needles):
    rc, _, err = run_main(capsys, ["build", str(files / "model.onnx"), "--out",
                                   str(tmp_path / "b"), *argv])
    assert_clean_error(rc, err, *needles)
    assert not (tmp_path / "b").exists()


def test_build_bad_model_and_inputs_exit_2(files, tmp_path, capsys):
    out = tmp_path / "b"
    rc, _, err = run_main(capsys, ["build", str(files / "empty.onnx"), "--out", str(out),
                                   "--verify", "cppsim"])
    assert_clean_error(rc, err, "empty.onnx", "0 bytes")
    rc, _, err = run_main(capsys, ["build", str(files / "adir"), "--out", str(out)])
    assert_clean_error(rc, err, "is a directory")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 7), np.float32))
    rc, _, err = run_main(capsys, ["build", str(files / "model.onnx"), "--out", str(out),
                                   "--verify", "cppsim", "--verify-inputs", str(wrong)])
    assert_clean_error(rc, err, "--verify-inputs", "(5, 7)", "(1, 1, 8, 8)")
    rc, _, err = run_main(capsys, ["build", str(files / "model.onnx"), "--out", str(out),
                                   "--verify", "cppsim", "--verify-inputs", str(files / "adir")])
    assert_clean_error(rc, err, "--verify-inputs", "is a directory")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# exit codes


def test_internal_error_exits_3_not_1(files, monkeypatch, capsys):
    from brevitas_a2q.cli import report

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(report, "run", broken)
    rc, _, err = run_main(capsys, ["report", str(files / "model.onnx")])
    assert rc == 3
    assert "internal error (exit 3): ZeroDivisionError: a bug" in err.splitlines()[-1]


def test_one_line_strips_escape_codes_and_speaks_cli():
    from brevitas_a2q.cli import one_line

    assert one_line("\x1b[31mbad\x1b[0m\nthing; pass overwrite=True (CLI: --overwrite) to "
                    "replace it") == "bad thing; pass --overwrite to replace it"


# ----------------------------------------------------------------------------------------------
# the real entry point, in subprocesses


def _a2q(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = [str(A2Q)] if A2Q.exists() else [sys.executable, "-m", "brevitas_a2q.cli"]
    return subprocess.run([*exe, *argv], capture_output=True, text=True, timeout=timeout)


def test_entry_point_errors(files, tmp_path):
    """Through the installed command: usage errors answer without importing torch; file errors
    are one line; the false pass of issue 12 is a violation (exit 1)."""
    out = tmp_path / "out"
    cases = [
        (("train", "--weight-bits", "1", "--out", str(out)), 2, "--weight-bits"),
        (("train", "--out", str(files / "notes.pt")), 2, "is a file, not a directory"),
        (("evaluate", str(files / "notes.pt")), 2, "not a torch.save archive"),
        (("report", str(files / "model.onnx"), "--target", "conv1=8"), 1, "VIOLATED: conv1"),
        (("report", str(files / "model.onnx"), "--plot", str(files / "adir")), 2,
         "is a directory"),
        (("build", str(files / "empty.onnx"), "--out", str(out), "--verify", "cppsim"), 2,
         "0 bytes"),
    ]
    for argv, code, needle in cases:
        result = _a2q(*argv)
        assert result.returncode == code, (argv, result.stderr)
        assert "Traceback" not in result.stderr, argv
        assert needle in result.stdout + result.stderr, (argv, result.stdout, result.stderr)
    assert not out.exists()
    shutil.rmtree(tmp_path / "none", ignore_errors=True)
