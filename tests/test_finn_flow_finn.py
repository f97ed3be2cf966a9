"""finn_flow with FINN (pinned dev commit): estimate builds of A2Q models exported by
brevitas_a2q.export.qonnx, widths within target, and C++ simulation bit-exact; a model without A2Q forced
to the same narrow widths must be caught. Skipped, naming what is missing, where FINN is not
importable."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from finn_models import trained_on_digits  # tests/ is on sys.path
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.models import build_cnn, build_mlp
from finn_flow import build, cppsim_available, demo_build, finn_available
from finn_flow.luts import lut_at_width

FINN_OK, FINN_REASON = finn_available()
CPPSIM_OK, CPPSIM_REASON = cppsim_available() if FINN_OK else (False, FINN_REASON)

pytestmark = [pytest.mark.finn, pytest.mark.slow,
              pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    x = load_digits()[0].tensors[0][:1]
    paths = {}
    makers = {"mlp_a2q": lambda: build_mlp("a2q", acc_bits=12, hidden=(32,)),
              "cnn_a2q": lambda: build_cnn("a2q", acc_bits=12, channels=(4, 8)),
              "mlp_none": lambda: build_mlp("none", acc_bits=None, hidden=(32,)),
              "cnn_none": lambda: build_cnn("none", acc_bits=None, channels=(4, 8))}
    for name, make in makers.items():
        torch.manual_seed(0)
        paths[name] = root / f"{name}.onnx"
        export_qonnx(trained_on_digits(make(), a2q="a2q" in name), x, paths[name])
    return paths


@pytest.mark.parametrize("name", ["mlp_a2q", "cnn_a2q"])
def test_estimate_build_widths_within_target(exported, tmp_path, name):
    result = build(exported[name], tmp_path / "out")
    assert (tmp_path / "out/report/estimate_layer_resources.json").exists()
    data = json.loads(result.reports["json"].read_text())
    assert len(data["layers"]) == (2 if name == "mlp_a2q" else 3)
    for row in data["layers"]:
        assert row["target_bits"] == 12 and row["bits"] <= 12, row
        # one bit above the exact range only where a threshold sits at max + 1 (never fires) and
        # needs it; FINN's accDataType leaves such thresholds wider than the accumulator
        assert row["bits_exact"] <= row["bits"] <= row["bits_exact"] + 1
        assert row["bits"] <= row["finn_bits"] or row["range_max"] + 1 == 2 ** (row["bits"] - 2)
        assert row["lut_chosen"] <= row["lut_int32"] <= row["lut_int32_uncapped"]
    # FINN caps its LUT formula at the data-type bound: the uncapped 32-bit figure continues the
    # line through FINN's own estimates at 4 and 8 bits (below any cap here)
    final = ModelWrapper(str(tmp_path / "out/intermediate_models/step_a2q_accumulators.onnx"))
    nodes = {n.name: n for n in final.graph.node}
    for row in data["layers"]:
        at4, at8 = (lut_at_width(nodes[row["finn_node"]], b) for b in (4, 8))
        assert abs(row["lut_int32_uncapped"] - (at8 + (at8 - at4) / 4 * 24)) <= 7, row


def _process_state() -> dict:
    """What a build must leave as it found it: the environment, the streams, the root logger's
    handlers, the warning hook and (FINN+) FINN's global settings."""
    import warnings

    state = {"env": dict(os.environ), "streams": (sys.stdout, sys.stderr),
             "handlers": list(logging.getLogger().handlers), "showwarning": warnings.showwarning}
    try:
        import finn.util.settings

        state["settings"] = finn.util.settings._SETTINGS
    except ImportError:  # upstream FINN has no global settings
        pass
    return state


def test_two_builds_in_one_process_leave_no_state_behind(exported, tmp_path):
    """A second build must not write into (or need) the first build's folder, which is deleted in
    between; the process state is the same after each build as before."""
    made: list[Path] = []

    def step_probe_build_dir(model, cfg):  # where FINN puts generated code (both FINNs)
        from finn.util.basic import make_build_dir

        made.append(Path(make_build_dir("probe_")))
        return model

    def steps():
        from finn.builder.build_dataflow_config import estimate_only_dataflow_steps

        return [*estimate_only_dataflow_steps, step_probe_build_dir]

    before = _process_state()
    build(exported["mlp_a2q"], tmp_path / "first", steps=steps())
    assert _process_state() == before
    # generated while building in a temporary folder beside the output, then renamed with it
    assert (tmp_path / "first" / "finn_build" / made[-1].name).is_dir()
    shutil.rmtree(tmp_path / "first")
    second = build(exported["cnn_a2q"], tmp_path / "second", steps=steps())
    assert _process_state() == before
    assert not (tmp_path / "first").exists()
    assert (tmp_path / "second" / "finn_build" / made[-1].name).is_dir()
    assert {p.name for p in tmp_path.iterdir()} == {"second"}  # no temporary build folder left
    assert len(second.layers) == 3 and all(w.within_target for w in second.layers)
    assert second.reports["finn_estimates"].name == "estimate_layer_resources.json"
    assert second.reports["finn_estimates"].is_file()


def test_a2q_build_runs_a_users_step_list(exported, tmp_path, capsys):
    """`a2q build --steps FILE.py:NAME`: the user's FINN steps run, ours are inserted, the widths
    are proven as usual; a bad step list is refused with exit 2."""
    from brevitas_a2q.cli import main

    script = tmp_path / "my_build.py"
    script.write_text(
        "from pathlib import Path\n"
        "from finn.builder.build_dataflow_config import estimate_only_dataflow_steps\n\n"
        "def step_mark(model, cfg):\n"
        "    Path(cfg.output_dir, 'mine.txt').write_text(str(len(model.graph.node)))\n"
        "    return model\n\n"
        "STEPS = [*estimate_only_dataflow_steps[:3], step_mark, *estimate_only_dataflow_steps[3:]]\n"
        "BAD = 42\n")
    out = tmp_path / "out"
    assert main(["build", str(exported["mlp_a2q"]), "--out", str(out), "--steps",
                 f"{script}:STEPS", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (out / "mine.txt").is_file()
    assert [row["bits"] <= 12 for row in result["layers"]] == [True, True]
    assert main(["build", str(exported["mlp_a2q"]), "--out", str(tmp_path / "o2"), "--steps",
                 f"{script}:BAD"]) == 2
    assert "BAD must be a non-empty list" in capsys.readouterr().err


@pytest.mark.skipif(not CPPSIM_OK, reason=f"C++ simulation unavailable: {CPPSIM_REASON}")
def test_demo_build_cppsim_bit_exact_for_a2q_mlp(exported, tmp_path):
    """The demo entry point: estimate build, widths within P, C++ simulation bit-exact on random,
    real and extreme inputs, all said in the text it returns."""
    real = load_digits()[1].tensors[0][:5].numpy()
    text, ok = demo_build(exported["mlp_a2q"], tmp_path / "out", real, random_count=5)
    assert ok, text
    for kind, count in (("random", 5), ("real", 5), ("extreme", 16)):
        assert f"cppsim {kind}: {count}/{count} accelerator outputs bit-exact" in text, text
    assert "Targets checked: 2 of 2 layers; every checked width is within its target." in text
    saved = json.loads((tmp_path / "out/verification_output/cppsim.json").read_text())
    assert {r["kind"] for r in saved["results"]} == {"random", "real", "extreme"}
    assert all(r["ok"] for r in saved["results"])


@pytest.mark.skipif(not CPPSIM_OK, reason=f"C++ simulation unavailable: {CPPSIM_REASON}")
def test_cppsim_catches_plain_model_forced_to_narrow_accumulators(exported, tmp_path):
    result = build(exported["mlp_none"], tmp_path / "out", verify=["cppsim"], random_count=5,
                   force_accumulator_bits=10, allow_overflow_demo=True)
    extreme = next(v for v in result.verification if v.kind == "extreme")
    assert result.verified is False and extreme.matched < extreme.inputs


def _python_layers_are_explained(result):
    """No accumulating/thresholding layer ran in Python; every Python layer says why."""
    for e in result.cppsim_layers:
        base = e.op_type.split("_")[0]
        if base in ("MVAU", "VVAU", "Thresholding"):
            assert e.mode == "cppsim", e
        if e.mode == "python":
            assert e.reason and e.node in result.verification_summary()


@pytest.mark.skipif(not CPPSIM_OK, reason=f"C++ simulation unavailable: {CPPSIM_REASON}")
def test_cppsim_bit_exact_for_a2q_cnn(exported, tmp_path):
    """conv, max pooling, fully connected: every MVAU and the input thresholds C++-simulated,
    bit-exact on random, real and extreme inputs; layers the available finn-hlslib cannot compile
    (FINN dev's Pool_hls on a finn-hlslib without its API) run in Python and are named."""
    from finn_flow.verify.cppsim import HLSLIB_API, hlslib_dir, missing_api

    real = load_digits()[1].tensors[0][:5].numpy()
    result = build(exported["cnn_a2q"], tmp_path / "out", verify=["cppsim"], verify_inputs=real,
                   random_count=5)
    assert result.verified, result.verification_summary()
    assert {v.kind for v in result.verification} == {"random", "real", "extreme"}
    assert all(w.bits <= 12 for w in result.layers)
    modes = {e.op_type: e.mode for e in result.cppsim_layers}
    assert modes["MVAU_hls"] == "cppsim" and modes["Thresholding_hls"] == "cppsim"
    pool_api_missing = bool(missing_api(HLSLIB_API["Pool_hls"]["MaxPool"], hlslib_dir()))
    assert modes["Pool_hls"] == ("python" if pool_api_missing else "cppsim")
    _python_layers_are_explained(result)
    saved = json.loads((tmp_path / "out/verification_output/cppsim.json").read_text())
    assert {e["node"] for e in saved["layers"]} == {e.node for e in result.cppsim_layers}


@pytest.mark.skipif(not CPPSIM_OK, reason=f"C++ simulation unavailable: {CPPSIM_REASON}")
def test_cppsim_catches_plain_cnn_forced_to_the_a2q_width(exported, tmp_path):
    result = build(exported["cnn_none"], tmp_path / "out", verify=["cppsim"], random_count=5,
                   force_accumulator_bits=12, allow_overflow_demo=True)
    extreme = next(v for v in result.verification if v.kind == "extreme")
    assert result.verified is False and extreme.matched < extreme.inputs
    _python_layers_are_explained(result)
