"""``a2q finetune CHECKPOINT --accumulator SPEC``: on checkpoints of ``a2q train`` (CNN and MLP, every
kind of quantizer, digits and an IDX data set), the accuracy it reports before and after equals an
independent evaluation (the source checkpoint's, and ``a2q evaluate`` of the fine-tuned one), every
gradient mode trains, ``--resume`` after an interruption ends bit-identical to an uninterrupted
run, and bad input exits 2 with one line naming the option or file."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brevitas_a2q.cli import finetune as finetune_cli
from brevitas_a2q.cli import main
from brevitas_a2q.sim.config import GRADIENT_MODES
from brevitas_a2q.sim.evaluate import evaluate_accuracy
from brevitas_a2q.train.checkpoint import load_checkpoint
from brevitas_a2q.train.data import IDX_FILES, load_digits
from brevitas_a2q.train.loop import accuracy

# 64 training samples in batches of 32: 2 steps an epoch
TINY = ["--train-limit", "64", "--batch-size", "32", "--no-progress"]


def _train(out, *argv) -> None:
    torch.set_num_threads(1)
    rc = main(["train", "--epochs", "1", "--lr", "1e-2", "--train-limit", "256", "--batch-size",
               "32", "--out", str(out), "--no-progress", "--json", *argv])
    assert rc == 0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A digits CNN of ``a2q train`` (A2Q+, target 12 bits, conv1 at its own 16)."""
    out = tmp_path_factory.mktemp("source")
    _train(out, "--acc-bits", "12", "--layer-acc-bits", "conv1=16")
    return out / "model.pt"


def _finetune(capsys, *argv) -> tuple[int, dict | None, str]:
    torch.set_num_threads(1)
    capsys.readouterr()
    rc = main(["finetune", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc in (0, 1) else None), captured.err


def _state_differs(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


def test_accuracy_before_and_after_matches_an_independent_evaluation(source, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, results, _ = _finetune(capsys, source, "-a", "int10-sat", "--epochs", "2", "--lr", "1e-3",
                               "--out", out, *TINY)
    assert rc == 0 and results["all_targets_hold"] is True
    # conv1 has its own target (16) and keeps it, as a2q evaluate plans it
    assert results["layers"] == {"conv1": "int16-sat", "conv2": "int10-sat", "fc": "int10-sat"}
    _, test = load_digits(seed=0)
    src = load_checkpoint(source)
    assert results["before"]["exact"] == accuracy(src.model, test)
    assert results["before"]["simulated"] == evaluate_accuracy(src.model, test, "int10-sat",
                                                               results["layers"])[0]
    tuned = load_checkpoint(out / "model.pt")
    assert _state_differs(src.model, tuned.model), "fine-tuning changed no weight"
    assert tuned.extra["finetune"]["epoch"] == 2 and len(results["history"]) == 2
    # the written checkpoint is what `a2q evaluate` reads, and it reproduces the accuracy after
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.pt"), "-a", "int10-sat", "--json",
                 "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["exact_accuracy"] == results["after"]["exact"]
    assert evaluated["results"][0]["accuracy"] == results["after"]["simulated"]
    assert results["history"][-1]["accuracy_simulated"] == results["after"]["simulated"]
    assert json.loads((out / "results.json").read_text()) == results
    # the QONNX export is what `a2q report` reads, with the fine-tuned model's targets
    assert main(["report", str(out / "model.onnx")]) == 0


def test_text_output_shows_the_before_and_after_table(source, tmp_path, capsys):
    rc = main(["finetune", str(source), "-a", "fp10-e4m5", "--out", str(tmp_path / "ft"), *TINY])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert rc == 0
    rows = {line.split()[0]: [float(v) for v in re.findall(r"([\d.]+)%", line)]
            for line in out.splitlines() if line.strip().startswith(("before", "after"))}
    assert rows == {when: [round(100 * results[when][k], 2) for k in ("exact", "simulated")]
                    for when in ("before", "after")}
    assert "fp10-e4m5" in out and "every accumulator target holds" in out


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
def test_each_gradient_mode_trains(source, tmp_path, capsys, gradient):
    rc, results, _ = _finetune(capsys, source, "-a", "fp10-e4m5-c16", "--all-layers",
                               "--gradient", gradient, "--lr", "1e-2", "--out", tmp_path / "ft",
                               *TINY)
    assert rc == 0 and results["gradient"] == gradient
    assert set(results["layers"].values()) == {"fp10-e4m5-c16"}
    differ = _state_differs(load_checkpoint(source).model,
                            load_checkpoint(tmp_path / "ft" / "model.pt").model)
    assert any(k.endswith("weight") for k in differ), differ


def test_gradient_choices_are_the_simulators():
    assert finetune_cli.GRADIENTS == GRADIENT_MODES


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                         for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _idx_digits(directory):
    """digits written as the IDX files of "mnist"."""
    directory.mkdir()
    train, test = load_digits(seed=0)
    for key, ds in (("train", train), ("test", test)):
        x, y = ds.tensors
        _write_idx(directory / IDX_FILES[f"{key}_images"], (x.squeeze(1) * 255).round().numpy())
        _write_idx(directory / IDX_FILES[f"{key}_labels"], y.numpy())
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("train_argv, holds", [
    (["--arch", "mlp", "--quant", "none"], None),
    (["--arch", "mlp", "--quant", "brevitas-a2q+", "--acc-bits", "12"], True),
    (["--arch", "cnn", "--quant", "brevitas-a2q", "--acc-bits", "14"], True),
    (["--arch", "cnn", "--quant", "a2q", "--rounding", "budgeted", "--acc-bits", "12"], True),
    (["--dataset", "mnist", "--arch", "mlp", "--quant", "a2q+", "--acc-bits", "12"], True),
], ids=["mlp-none", "mlp-brevitas-a2q+", "cnn-brevitas-a2q", "cnn-a2q-budgeted", "mnist-idx"])
def test_any_checkpoint_of_a2q_train(tmp_path, capsys, train_argv, holds):
    data = []
    if "mnist" in train_argv:
        data = ["--data-dir", str(_idx_digits(tmp_path / "idx"))]
    _train(tmp_path / "src", *train_argv, *data)
    rc, results, err = _finetune(capsys, tmp_path / "src" / "model.pt", "-a", "int11-sat",
                                 "--out", tmp_path / "ft", *data, *TINY)
    assert rc == 0, err
    assert results["all_targets_hold"] is holds
    src = load_checkpoint(tmp_path / "src" / "model.pt")
    tuned = load_checkpoint(tmp_path / "ft" / "model.pt")
    assert (tuned.arch, tuned.kwargs, tuned.dataset) == (src.arch, src.kwargs, src.dataset)
    assert _state_differs(src.model, tuned.model)


def _stop_after_epoch(monkeypatch, epoch: int):
    real_save = finetune_cli._save

    def save_then_stop(path, model, ckpt, extra):
        real_save(path, model, ckpt, extra)
        if extra["finetune"]["epoch"] == epoch:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C right after that epoch

    monkeypatch.setattr(finetune_cli, "_save", save_then_stop)
    return real_save


def test_resume_after_an_interruption_is_bit_identical(source, tmp_path, capsys, monkeypatch):
    argv = ["-a", "int10-sat", "--gradient", "immediate", "--epochs", "3", "--lr", "1e-2", *TINY]
    rc_a, a_results, _ = _finetune(capsys, source, *argv, "--out", tmp_path / "a")
    assert rc_a == 0

    real_save = _stop_after_epoch(monkeypatch, 1)
    rc, _, err = _finetune(capsys, source, *argv, "--out", tmp_path / "b")
    assert rc == 130
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert "holds epoch 1/3" in line and "--resume" in line
    assert not (tmp_path / "b" / "results.json").exists()
    assert not list((tmp_path / "b").glob(".*.tmp"))

    # another configuration is refused, naming what differs; the checkpoint is untouched
    monkeypatch.setattr(finetune_cli, "_save", real_save)
    rc, _, err = _finetune(capsys, source, *argv[:-len(TINY)], "--lr", "1e-3", *TINY, "--out",
                           tmp_path / "b", "--resume")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--resume" in err and "lr: checkpoint 0.01, now 0.001" in err

    rc, b_results, err = _finetune(capsys, source, *argv, "--out", tmp_path / "b", "--resume")
    assert rc == 0, err
    assert b_results["resumed_at_epoch"] == 1
    a = load_checkpoint(tmp_path / "a" / "model.pt")
    b = load_checkpoint(tmp_path / "b" / "model.pt")
    assert _state_differs(a.model, b.model) == []
    assert a.extra["finetune"]["history"] == b.extra["finetune"]["history"]
    for key in ("before", "after", "history"):
        assert a_results[key] == b_results[key], key


def test_the_documented_commands_run(tmp_path, monkeypatch, capsys):
    """docs/simulation.md's finetune command and the evaluate of its output, as written, on a
    stand-in for the demo checkpoint (``a2q demo`` writes no training settings)."""
    from brevitas_a2q.train.checkpoint import save_checkpoint
    from brevitas_a2q.train.loop import train_epochs
    from brevitas_a2q.train.models import build_cnn

    page = (Path(__file__).resolve().parents[1] / "docs" / "simulation.md").read_text()
    commands = re.findall(r"^a2q (?:finetune a2q-demo|evaluate a2q-finetune)/.*$", page, re.M)
    assert [c.split()[1] for c in commands] == ["finetune", "evaluate"]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kwargs = {"quant": "a2q+", "weight_bits": 4, "act_bits": 4, "acc_bits": 12}
    model = build_cnn(**kwargs)
    train, _ = load_digits()
    train_epochs(model, torch.utils.data.Subset(train, range(256)), 1, progress=False)
    monkeypatch.chdir(tmp_path)
    Path("a2q-demo").mkdir()
    save_checkpoint("a2q-demo/model.pt", model, "cnn", kwargs)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "accuracy" in out
    results = json.loads(Path("a2q-finetune/results.json").read_text())
    assert (results["batch_size"], results["seed"], results["train_limit"]) == (64, 0, 512)


def test_a2q_help_lists_finetune():
    done = subprocess.run([sys.executable, "-m", "brevitas_a2q.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "finetune" in done.stdout


@pytest.mark.parametrize("argv, needles", [
    (["-a", "int12-bogus"], ["--accumulator", "int12-bogus"]),
    (["-a", "int12-sat", "--layer", "nosuch=int16-sat"], ["--layer", "nosuch", "conv1, conv2, fc"]),
    (["-a", "int12-sat", "--layer", "conv1=int16-bogus"], ["--layer conv1", "int16-bogus"]),
    (["-a", "int12-sat", "--layer", "conv1"], ["--layer", "NAME=SPEC"]),
    (["-a", "int12-sat", "--gradient", "bogus"], ["--gradient", "bogus"]),
    (["-a", "int12-sat", "--epochs", "0"], ["--epochs"]),
    (["-a", "int12-sat", "--resume"], ["--resume", "does not exist"]),
    (["-a", "int12-sat", "--resume", "--overwrite"], ["--resume and --overwrite"]),
    (["-a", "int12-sat", "--data-dir", "{tmp}/absent"], ["--data-dir", "does not exist"]),
    (["-a", "int12-sat", "--data-dir", "{tmp}"], ["--data-dir", "digits"]),
])
def test_bad_options_exit_2_with_one_line(source, tmp_path, capsys, argv, needles):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = main(["finetune", str(source), *argv, "--out", str(tmp_path / "ft"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    if "--gradient" not in argv and "--epochs" not in argv:  # argparse prints its usage first
        assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "ft" / "model.pt").exists()


@pytest.mark.parametrize("content, needle", [
    (b"not a checkpoint\n", "is not a brevitas_a2q.train.checkpoint/1 checkpoint"),
    (b"", "is empty"),
    (None, "does not exist"),
])
def test_a_file_that_is_not_a_checkpoint_exits_2(tmp_path, capsys, content, needle):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    rc = main(["finetune", str(path), "-a", "int12-sat", "--out", str(tmp_path / "ft")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(path) in err and needle in err


def test_existing_output_without_resume_or_overwrite_exits_2(source, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "results.json").write_text("{}")
    rc = main(["finetune", str(source), "-a", "int12-sat", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--out" in err and "--resume" in err and "--overwrite" in err
    assert (out / "results.json").read_text() == "{}"


def test_resume_of_a_directory_not_written_by_finetune_exits_2(source, tmp_path, capsys):
    out = tmp_path / "train-run"
    out.mkdir()
    (out / "model.pt").write_bytes(source.read_bytes())  # a checkpoint of a2q train
    rc = main(["finetune", str(source), "-a", "int12-sat", "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "not written by `a2q finetune`" in err


def test_out_holding_the_source_checkpoint_exits_2(source, tmp_path, capsys):
    before = source.read_bytes()
    for extra in ([], ["--overwrite"], ["--resume"]):
        rc = main(["finetune", str(source), "-a", "int12-sat", "--out", str(source.parent),
                   *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "--out" in err and "another --out" in err, err
    assert source.read_bytes() == before


def _default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT
    ignored (a background job of a non-interactive shell passes the ignore on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_real_sigint_then_resume_is_bit_identical(source, tmp_path):
    """A real Ctrl-C (SIGINT) to the real command, as soon as its first epoch is saved."""
    argv = [sys.executable, "-m", "brevitas_a2q.cli", "finetune", str(source), "-a", "int10-sat",
            "--epochs", "4", "--train-limit", "512", "--batch-size", "8", "--lr", "1e-3",
            "--no-progress"]
    a = subprocess.run([*argv, "--out", str(tmp_path / "a")], capture_output=True, text=True,
                       timeout=600)
    assert a.returncode == 0, a.stderr
    proc = subprocess.Popen([*argv, "--out", str(tmp_path / "b")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not (tmp_path / "b" / "model.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err
    saved = load_checkpoint(tmp_path / "b" / "model.pt").extra["finetune"]["epoch"]
    assert 1 <= saved < 4, "the interruption came too late to test a resume"
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert f"holds epoch {saved}/4" in line and "--resume" in line
    assert not (tmp_path / "b" / "results.json").exists()
    b = subprocess.run([*argv, "--out", str(tmp_path / "b"), "--resume"], capture_output=True,
                       text=True, timeout=600)
    assert b.returncode == 0, b.stderr
    ta = load_checkpoint(tmp_path / "a" / "model.pt")
    tb = load_checkpoint(tmp_path / "b" / "model.pt")
    assert _state_differs(ta.model, tb.model) == []
    assert ta.extra["finetune"]["history"] == tb.extra["finetune"]["history"]
