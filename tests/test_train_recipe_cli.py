"""``a2q train``: the same recipe for every method (EP-init and the penalty for Brevitas's built-in
A2Q/A2Q+, float init for plain QAT), ``--rounding budgeted`` and ``--quant float``, through the real
CLI on digits with one short epoch; and EP-init / penalty of Brevitas's built-in quantizers against
this package's (an independent implementation of the same math: identical numbers expected)."""

from __future__ import annotations

import json

import pytest
import torch

from brevitas_a2q.analysis.audit import accumulator_report, capture_layers
from brevitas_a2q.cli import main
from brevitas_a2q.train.checkpoint import load_checkpoint
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.ep_init import euclidean_projection_init
from brevitas_a2q.train.loop import accuracy
from brevitas_a2q.train.models import build_cnn, build_float_cnn, copy_float_weights
from brevitas_a2q.train.penalty import a2q_penalty
from brevitas_a2q.train.targets import track_accumulator_inputs

FAST = ["--no-progress", "--batch-size", "128", "--epochs", "1", "--lr", "1e-2"]


def run(tmp_path, *argv) -> tuple[int, dict]:
    torch.set_num_threads(1)
    out = tmp_path / "out"
    rc = main(["train", *argv, "--out", str(out), *FAST])
    results = json.loads((out / "results.json").read_text())
    return rc, results


def test_float_mode_trains_the_float_twin_and_reports_its_accuracy(tmp_path, capsys):
    rc, results = run(tmp_path, "--quant", "float")
    text = capsys.readouterr().out
    assert rc == 0
    assert results["quant"] == "float"
    assert results["all_targets_hold"] is None  # no target: nothing checked, never a pass
    assert results["float_accuracy"] == results["test_accuracy"] > 0.5
    assert f"float test accuracy: {100 * results['float_accuracy']:.2f}%" in text
    assert not (tmp_path / "out" / "model.onnx").exists()  # nothing quantized to export


@pytest.mark.parametrize("quant", ["brevitas-a2q", "brevitas-a2q+"])
def test_ep_init_and_penalty_for_brevitas_builtin_quantizers(tmp_path, capsys, quant):
    rc, results = run(tmp_path, "--quant", quant, "--acc-bits", "12", "--ep-init",
                      "--pretrain-epochs", "1", "--penalty", "1e-3")
    text = capsys.readouterr().out
    assert rc == 0 and results["all_targets_hold"]
    assert set(results["init"]["projected_channels"]) == {"conv1", "conv2", "fc"}
    assert 0 < results["float_accuracy"] <= 1
    assert "% of the float twin's" in text
    assert all(r["target_bits"] == 12 for r in results["layers"])


def test_plain_qat_ep_init_is_the_float_init(tmp_path):
    rc, results = run(tmp_path, "--quant", "none", "--ep-init", "--pretrain-epochs", "1")
    assert rc == 0 and results["all_targets_hold"] is None  # no target: nothing checked
    assert results["init"]["projected_channels"] is None  # no bound, nothing projected
    assert results["float_accuracy"] is not None


def test_budgeted_rounding_through_the_cli(tmp_path):
    rc, results = run(tmp_path, "--quant", "a2q+", "--acc-bits", "10", "--rounding", "budgeted")
    assert rc == 0 and results["all_targets_hold"]
    assert results["model"]["rounding"] == "budgeted"
    zero = {r["layer"]: r["zero_channels"] for r in results["layers"]}
    assert zero["conv1"] == 0
    # the checkpoint rebuilds the budgeted quantizer and reproduces the accuracy
    ckpt = load_checkpoint(tmp_path / "out" / "model.pt")
    assert ckpt.model.conv1.weight_quant.tensor_quant.rounding == "budgeted"
    _, test = load_digits(seed=0)
    assert accuracy(ckpt.model, test) == pytest.approx(results["test_accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--quant", "none", "--penalty", "1e-3"], "--penalty does not apply to --quant none"),
    (["--quant", "float", "--ep-init"], "--ep-init does not apply to --quant float"),
    (["--quant", "brevitas-a2q", "--rounding", "budgeted"],
     "--rounding budgeted is an option of this package's quantizers"),
    (["--quant", "none", "--ep-init", "--pretrain", "qat"], "use --pretrain float"),
])
def test_options_that_do_not_apply_exit_2(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "out"), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _ep_initialized(quant: str, example: torch.Tensor):
    torch.manual_seed(3)
    source = build_float_cnn()
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(3.0)  # large weights: every channel needs projecting at P = 12
    torch.manual_seed(0)
    model = build_cnn(quant, acc_bits=12)
    copy_float_weights(source, model)
    projected = euclidean_projection_init(model, example)
    return model, projected


@pytest.mark.parametrize("variant", ["a2q", "a2q+"])
def test_builtin_ep_init_and_penalty_match_ours(variant):
    train, _ = load_digits(seed=0)
    x = torch.stack([train[i][0] for i in range(64)])
    ours, p_ours = _ep_initialized(variant, x)
    builtin, p_builtin = _ep_initialized(f"brevitas-{variant}", x)
    assert p_ours == p_builtin and all(v > 0 for v in p_ours.values())
    report = {r.layer: r for r in accumulator_report(builtin, x)}
    assert all(report[name].target_holds and report[name].zero_channels == 0
               for name in ("conv1", "conv2", "fc"))
    # the same integer weights as ours after the same EP-init
    for a, b in zip(capture_layers(ours, x), capture_layers(builtin, x), strict=True):
        assert a.name == b.name
        assert torch.equal(a.int_weight, b.int_weight)
    # the penalty of the built-in quantizer needs its input recorded, then equals ours
    assert track_accumulator_inputs(builtin) == 3 and track_accumulator_inputs(builtin) == 0
    for model in (ours, builtin):
        with torch.no_grad():
            for layer in (model.conv1, model.conv2, model.fc):  # push g above s * T
                pre = layer.weight_quant.tensor_quant.pre_scaling_impl
                pre.value.add_(1.0)
        model.train()
        model(x)
    penalty_ours, penalty_builtin = a2q_penalty(ours), a2q_penalty(builtin)
    assert penalty_ours.item() > 0
    torch.testing.assert_close(penalty_builtin, penalty_ours)
