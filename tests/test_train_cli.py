"""``a2q train``: end to end on digits (per-layer targets in the model, the audit, the QONNX
records and the checkpoint agree), resume is bit-identical to an uninterrupted run, IDX data sets
through --data-dir, and bad input (unknown dataset, missing data directory, a checkpoint from
another configuration, ...) exits 2 with a clear message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.analysis.records import read_records
from brevitas_a2q.cli import main
from brevitas_a2q.cli import train as train_cli
from brevitas_a2q.train.checkpoint import load_checkpoint
from brevitas_a2q.train.data import IDX_FILES, load_digits
from brevitas_a2q.train.loop import accuracy

FAST = ["--no-progress", "--batch-size", "128"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One digits CNN, 2 short epochs, target 12 with conv1 at 16."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["train", "--epochs", "2", "--lr", "1e-2", "--acc-bits", "12",
               "--layer-acc-bits", "conv1=16", "--out", str(out), "--no-progress"])
    return rc, out


def test_end_to_end_targets_audit_export_checkpoint(trained):
    rc, out = trained
    results = json.loads((out / "results.json").read_text())
    layers = {r["layer"]: r for r in results["layers"]}
    assert {k: v["target_bits"] for k, v in layers.items()} == {"conv1": 16, "conv2": 12,
                                                                "fc": 12}
    # the exact accumulator range of every layer fits its target, and rc says so
    assert all(v["bits_exact_range"] <= v["target_bits"] for v in layers.values())
    assert rc == 0 and results["all_targets_hold"]
    # the exported QONNX file carries the same per-layer targets
    records = {r.layer: r.target_bits for r in read_records(ModelWrapper(str(out / "model.onnx")))}
    assert records == {"conv1": 16, "conv2": 12, "fc": 12}
    # the checkpoint is readable by `a2q evaluate`'s loader and reproduces the reported accuracy
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.kwargs["layer_acc_bits"] == {"conv1": 16}
    _, test = load_digits(seed=0)
    assert accuracy(ckpt.model, test) == pytest.approx(results["test_accuracy"])
    assert results["test_accuracy"] > 0.5  # far above chance (0.1) after two short epochs


def test_existing_output_is_refused(trained, capsys):
    _, out = trained
    assert main(["train", "--epochs", "1", "--out", str(out), *FAST]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_from_another_configuration_exits_2(trained, capsys):
    _, out = trained
    before = (out / "model.pt").read_bytes()
    rc = main(["train", "--epochs", "2", "--lr", "1e-2", "--acc-bits", "10",
               "--layer-acc-bits", "conv1=16", "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "another configuration" in err and "'acc_bits': 12" in err and "'acc_bits': 10" in err
    assert (out / "model.pt").read_bytes() == before  # untouched


def test_unknown_dataset_exits_2(capsys):
    assert main(["train", "--dataset", "cifar10"]) == 2
    assert "invalid choice: 'cifar10'" in capsys.readouterr().err


def test_missing_data_directory_exits_2(tmp_path, capsys):
    rc = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "absent"),
               "--out", str(tmp_path / "out"), *FAST])
    assert rc == 2
    assert f"{tmp_path / 'absent'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--quant", "none", "--penalty", "1e-3"], "--penalty does not apply to --quant none"),
    (["--layer-acc-bits", "conv9=12"], "unknown layer(s) ['conv9']"),
    (["--layer-acc-bits", "conv1:12"], "expected LAYER=P"),
    (["--finetune-accumulator", "int12-bogus"], "int12-bogus"),
    (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "out"), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.slow
def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    argv = ["train", "--arch", "mlp", "--quant", "a2q", "--acc-bits", "12", "--epochs", "2",
            "--penalty", "1e-3", *FAST]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0

    real_save = train_cli._save

    def save_then_stop(path, model, config, extra):
        real_save(path, model, config, extra)
        if extra["epoch"] == 1:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after epoch 1

    monkeypatch.setattr(train_cli, "_save", save_then_stop)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(train_cli, "_save", real_save)
    assert main([*argv, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "a" / "model.pt")
    b = load_checkpoint(tmp_path / "b" / "model.pt")
    assert b.extra["epoch"] == 2 and len(b.extra["history"]) == 2
    for key, value in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["resumed_at_epoch"] == 1


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                         for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.slow
def test_idx_dataset_ep_init_and_finetune(tmp_path, capsys):
    """digits written as an IDX "mnist" directory: --data-dir, EP-init from float pretraining,
    the penalty, fine-tuning under a saturating 12-bit accumulator, --json output."""
    torch.set_num_threads(1)
    train, test = load_digits(seed=0)
    data = tmp_path / "idx"
    data.mkdir()
    for key, ds in (("train", train), ("test", test)):
        x, y = ds.tensors
        _write_idx(data / IDX_FILES[f"{key}_images"], (x.squeeze(1) * 255).round().numpy())
        _write_idx(data / IDX_FILES[f"{key}_labels"], y.numpy())
    rc = main(["train", "--dataset", "mnist", "--data-dir", str(data), "--arch", "mlp",
               "--quant", "a2q+", "--acc-bits", "11", "--layer-acc-bits", "fc0=16", "--ep-init",
               "--pretrain-epochs", "2", "--penalty", "1e-3", "--epochs", "1",
               "--finetune-accumulator", "int11-sat", "--finetune-layer", "fc0=int16-sat",
               "--batch-size", "32", "--out", str(tmp_path / "out"), "--json", "--no-progress"])
    results = json.loads(capsys.readouterr().out)
    assert rc == 0 and results["all_targets_hold"]
    assert results["dataset"] == "mnist" and results["model"]["in_features"] == 64
    assert set(results["init"]["projected_channels"]) == {"fc0", "fc1"}
    ft = results["finetune"]
    assert ft["accumulator"] == "int11-sat" and ft["layers"] == {"fc0": "int16-sat"}
    layers = {layer["name"]: layer for layer in ft["simulation"]["layers"]}
    assert layers["fc0"]["accumulator"] == "int16-sat" and layers["fc1"]["accumulator"] == "int11-sat"
    # A2Q+ trained for these widths cannot overflow them: no overflow event in any addition,
    # so the simulated accuracy is the exact one
    assert all(layer["overflow_events"] == 0 for layer in layers.values())
    assert ft["accuracy"] == pytest.approx(results["test_accuracy"])
    assert results["test_accuracy"] > 0.6
    assert (tmp_path / "out" / "model.onnx").is_file()
    # the checkpoint of an IDX dataset is evaluated on that dataset (--data-dir), as trained
    rc = main(["evaluate", str(tmp_path / "out" / "model.pt"), "--data-dir", str(data),
               "--accumulator", "int11-wrap", "--layer", "fc0=int16-wrap", "--json"])
    evaluation = json.loads(capsys.readouterr().out)
    assert rc == 0 and evaluation["dataset"] == "mnist" and evaluation["samples"] == len(test)
    (result,) = evaluation["results"]
    assert all(layer["overflow_events"] == 0 for layer in result["layers"])
    assert result["accuracy"] == pytest.approx(evaluation["exact_accuracy"])


def test_audit_warnings_are_visible_in_text_and_json_modes(tmp_path, capsys):
    """A2Q at P = 10 from the default init rounds whole layers to zero: the audit's warnings
    reach the user in both output modes and results.json."""
    argv = ["train", "--quant", "a2q", "--acc-bits", "10", "--epochs", "1", "--train-limit",
            "128", *FAST]
    assert main([*argv, "--out", str(tmp_path / "text")]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "text" / "results.json").read_text())
    assert results["warnings"], "the audit must warn about all-zero layers"
    assert all(f"warning: {w}" in out for w in results["warnings"])
    assert main([*argv, "--out", str(tmp_path / "json"), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warnings"] == results["warnings"]
    assert all(f"a2q train: warning: {w}" in captured.err for w in results["warnings"])
