"""`a2q demo`, the README's main job, end to end."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brevitas_a2q.cli import main
from finn_flow import cppsim_available, finn_available

FINN = finn_available()
A2Q = Path(sys.executable).with_name("a2q")


@pytest.mark.slow
def test_demo_trains_exports_and_every_target_holds(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--json", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)  # FINN's console output went to stderr
    assert results["test_accuracy"] > 0.9
    assert results["all_targets_hold"]
    assert [layer["target_bits"] for layer in results["layers"]] == [12, 12, 12]
    finn = results["finn"]
    assert finn["ok"], finn["summary"]
    if not FINN:
        assert finn["summary"].startswith("FINN build SKIPPED") and FINN.reason in finn["summary"]
    else:  # the main job builds hardware: FINN's estimate build with the widths table
        for name in ("conv1", "conv2", "fc"):
            assert f"| {name} | 12 | INT" in finn["summary"] or f"| {name} | 12 | UINT" in \
                finn["summary"], finn["summary"]
        assert "Targets checked: 3 of 3 layers; every checked width is within its target." \
            in finn["summary"]
        assert "Total LUTs of the accumulating layers" in finn["summary"]
        assert "Bitstream SKIPPED: synthesis needs Vivado" in finn["summary"]
        for kind in ("random", "real", "extreme"):  # the CI executor always runs
            assert re.search(rf"hls-arith {kind}: (\d+)/\1 accelerator outputs bit-exact",
                             finn["summary"]), finn["summary"]
        # 3 layers, each checked under hls-arith (and under cppsim where it runs)
        assert re.search(r"Per-layer extremes \(([36])/\1 checks ok", finn["summary"]), \
            finn["summary"]
        if not cppsim_available():
            assert f"C++ simulation SKIPPED: {cppsim_available().reason}" in finn["summary"]
        assert (out / "finn" / "report" / "estimate_layer_resources.json").is_file()
        assert (out / "finn" / "accumulators.md").is_file()
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.onnx", "results.json"} | (
        {"finn"} if FINN else set())
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


def _help(command: str) -> str:
    done = subprocess.run([str(A2Q), command, "--help"], capture_output=True, text=True,
                          timeout=120, check=True)
    return done.stdout


def test_help_matches_the_code():
    """--board's default and --outputs bitfile agree; every demo --quant choice is accepted."""
    from brevitas_a2q.train.models import build_cnn

    build_help = " ".join(_help("build").split())
    assert "default: Pynq-Z1)" not in build_help  # bitfile needs --board given explicitly
    assert "--outputs bitfile needs --board given" in build_help
    demo_help = " ".join(_help("demo").split())
    choices = demo_help.split("--quant {", 1)[1].split("}", 1)[0].split(",")
    assert "a2q+" in choices
    for quant in choices:  # the demo builds exactly this model
        build_cnn(quant, weight_bits=4, act_bits=4, acc_bits=12)
    assert "only where g++ and finn-hlslib are available, in C++ simulation" in demo_help
