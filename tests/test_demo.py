"""`a2q demo`, the README's main job, end to end."""

import json

import pytest

from brevitas_a2q.cli import main


@pytest.mark.slow
def test_demo_trains_exports_and_every_target_holds(tmp_path, capsys):
    out = tmp_path / "demo"
    # the FINN part is covered by tests/test_finn_flow*.py; here it would add ~90 s where FINN is
    assert main(["demo", "--out", str(out), "--epochs", "3", "--json", "--no-progress",
                 "--no-finn"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["test_accuracy"] > 0.9
    assert results["all_targets_hold"]
    assert results["finn"] == {"ok": True, "summary": "FINN build SKIPPED (--no-finn)"}
    assert [layer["target_bits"] for layer in results["layers"]] == [12, 12, 12]
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.onnx", "results.json"}
    # a second run refuses to overwrite, before training
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # and the saved checkpoint is what `a2q evaluate` reads: no overflow at the target width
    assert main(["evaluate", str(out / "model.pt"), "--accumulator", "int12-wrap", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["accumulator"] == "int12-wrap"
    assert [layer["overflow_events"] for layer in result["layers"]] == [0, 0, 0]
    assert result["accuracy"] == pytest.approx(results["test_accuracy"])


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
