"""finn_flow without FINN: the accumulator pass on FINN-format MVAU/VVAU nodes built with
onnx.helper, reports, configuration and errors. Oracles: exact integer arithmetic (brute force
over input extremes), qonnx DataType ranges, the records' fingerprints."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import qonnx_make_model

from brevitas_a2q.analysis.records import (
    AccumulatorRecord,
    channel_set_fingerprint,
    weight_fingerprint,
)
from brevitas_a2q.errors import A2QInputError, AccumulatorOverflowError
from brevitas_a2q.quant.bounds import l1_norm_bound
from finn_flow import FINN_COMMIT, SetProvenAccumulatorWidths, finn_available
from finn_flow.steps.accumulators import FINN_DOMAIN, integer_weights, range_datatype
from finn_flow.steps.report import summary_markdown, write_reports
from finn_flow.verify.inputs import extreme_inputs

ROOT = Path(__file__).resolve().parents[1]


def _attr(node, name):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def mvau_model(q: np.ndarray, idt: str = "UINT4", thresholds: np.ndarray | None = None,
               acc: str = "INT32", op_type: str = "MVAU_hls") -> ModelWrapper:
    """One FINN MVAU node: weights stored (MW, MH) = (K, out) as FINN does."""
    out_ch, k = q.shape
    inputs = ["inp", "weights"] + (["thresh"] if thresholds is not None else [])
    node = helper.make_node(
        op_type, inputs, ["out"], name=f"{op_type}_0",
        domain=FINN_DOMAIN + (".hls" if op_type.endswith("_hls") else ""),
        MW=k, MH=out_ch, SIMD=1, PE=1, inputDataType=idt, weightDataType="INT4",
        outputDataType="UINT4" if thresholds is not None else acc, accDataType=acc,
        noActivation=0 if thresholds is not None else 1, binaryXnorMode=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, out_ch])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("weights", q.T.astype(np.float32))
    model.set_tensor_datatype("weights", DataType["INT4"])
    model.set_tensor_datatype("inp", DataType[idt])
    if thresholds is not None:
        model.set_initializer("thresh", thresholds.astype(np.float32))
    return model


def record_for(q: np.ndarray, target: int | None, layer: str = "fc1", variant: str = "a2q"):
    return AccumulatorRecord(layer=layer, node="/fc1/MatMul", op_type="MatMul", weight="w",
                             output="y", variant=variant if target else "none",
                             target_bits=target, input_bits=4, input_signed=False, weight_bits=4,
                             out_channels=q.shape[0], dot_length=q.shape[1],
                             fingerprint=weight_fingerprint(q))


def a2q_weights(target: int, n_bits: int = 4, k: int = 32, out: int = 6, seed: int = 0):
    """Integer weights whose every channel meets the A2Q bound for ``target`` exactly or below."""
    rng = np.random.default_rng(seed)
    limit = int(l1_norm_bound(target, n_bits, False))
    q = rng.integers(-7, 8, size=(out, k))
    for row in q:
        while np.abs(row).sum() > limit:
            i = rng.integers(k)
            row[i] -= np.sign(row[i])
    return q


def brute_force_range(q: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Independent oracle: each channel's extremes over the corner inputs, evaluated as dot
    products with Python integers."""
    best_lo, best_hi = 0, 0
    for row in q.astype(int).tolist():
        x_max = [hi if w > 0 else lo for w in row]
        x_min = [lo if w > 0 else hi for w in row]
        best_hi = max(best_hi, sum(w * x for w, x in zip(row, x_max, strict=True)))
        best_lo = min(best_lo, sum(w * x for w, x in zip(row, x_min, strict=True)))
    return best_lo, best_hi


@pytest.mark.parametrize("target", [10, 12, 14])
def test_a2q_layer_gets_width_within_target_and_holding_exact_range(target):
    q = a2q_weights(target)
    model = mvau_model(q)
    transform = SetProvenAccumulatorWidths([record_for(q, target)])
    model = model.transform(transform)
    (widths,) = transform.layers
    node = model.graph.node[0]
    acc = DataType[_attr(node, "accDataType").decode()]
    lo, hi = brute_force_range(q, 0, 15)
    assert acc.min() <= lo and hi <= acc.max()
    assert acc.bitwidth() <= target
    # tightest: one bit fewer cannot hold the range
    narrower = DataType[acc.name.replace(str(acc.bitwidth()), str(acc.bitwidth() - 1))]
    assert not (narrower.min() <= lo and hi <= narrower.max())
    # no activation: the hardware accumulates in the output type, which must be the same
    assert _attr(node, "outputDataType").decode() == acc.name
    assert widths.layer == "fc1" and widths.target_bits == target
    assert widths.bits_exact <= widths.bits_l1_bound <= target <= widths.bits_datatype


def test_record_follows_a_permutation_of_the_output_channels():
    """An exact graph transformation that reorders a layer's output channels (and its consumer's
    inputs) changes the ordered fingerprint; the record still finds its layer by the set of its
    channels (stored at export), the target is proven, and the width says it was matched so. A
    layer whose channel multiset changed (one weight altered) still matches nothing."""
    q = a2q_weights(12)
    record = record_for(q, 12)
    record.extra["channel_set_fingerprint"] = channel_set_fingerprint(q)
    permuted = q[[3, 0, 5, 1, 4, 2]]
    transform = SetProvenAccumulatorWidths([record])
    mvau_model(permuted).transform(transform)
    (widths,) = transform.layers
    assert widths.layer == "fc1" and widths.within_target
    assert widths.extra["channels_permuted"] is True
    changed = permuted.copy()
    changed[0, 0] += 1 if changed[0, 0] < 7 else -1
    with pytest.raises(A2QInputError, match="matches no accumulator record"):
        mvau_model(changed).transform(SetProvenAccumulatorWidths([record], require_records=True))


def test_layers_with_identical_weights_each_get_their_own_record():
    """Two layers whose integer weights are identical (e.g. both rounded to zero) share a
    fingerprint; matched in graph order, each FINN node takes the first record not yet taken."""
    from finn_flow.steps.accumulators import _find_record

    q = np.zeros((4, 8))
    first, second = record_for(q, 12, layer="conv2"), record_for(q, 12, layer="conv3")
    assert _find_record([first, second], q)[0] is first
    assert _find_record([first, second], q, used=[first])[0] is second


def test_exported_records_carry_the_channel_set_fingerprint(tmp_path):
    from brevitas_a2q import export_qonnx
    from brevitas_a2q.analysis.records import read_records
    from brevitas_a2q.train.models import build_mlp

    model = build_mlp("a2q", acc_bits=14).eval()
    export_qonnx(model, torch.rand(1, 1, 8, 8), tmp_path / "m.onnx")
    for record in read_records(ModelWrapper(str(tmp_path / "m.onnx"))):
        assert len(record.extra["channel_set_fingerprint"]) == 40


def test_layer_over_target_stops_with_error_naming_it():
    q = np.full((4, 64), 7)  # ||q||_1 = 448 with UINT4 inputs: needs 13 unsigned bits
    model = mvau_model(q)
    with pytest.raises(AccumulatorOverflowError, match=r"layer 'fc3'.*P = 10.*not overflow-safe"):
        model.transform(SetProvenAccumulatorWidths([record_for(q, 10, layer="fc3")]))


def test_thresholds_clipped_into_range_and_typed_like_accumulator():
    q = a2q_weights(12, out=4)
    lo, hi = brute_force_range(q, 0, 15)
    rng = np.random.default_rng(1)
    thresholds = np.sort(rng.uniform(lo - 500, hi + 500, size=(4, 15)), axis=1)
    model = mvau_model(q, thresholds=thresholds)
    model = model.transform(SetProvenAccumulatorWidths([record_for(q, 12)]))
    node = model.graph.node[0]
    acc = DataType[_attr(node, "accDataType").decode()]
    new = model.get_initializer("thresh")
    assert model.get_tensor_datatype("thresh") == acc  # one type: no truncation (FINN #1561)
    assert np.all(new >= lo) and np.all(new <= hi + 1) and np.all(new == np.round(new))
    assert all(acc.allowed(t) for t in new.flatten())
    # same activation for every reachable accumulator value
    for a in range(lo, hi + 1, max((hi - lo) // 200, 1)):
        np.testing.assert_array_equal((a >= np.ceil(thresholds)).sum(1), (a >= new).sum(1))


def test_unmatched_node_is_an_error_when_the_model_has_records():
    q = a2q_weights(12)
    other = a2q_weights(12, seed=5)
    with pytest.raises(A2QInputError, match="matches no accumulator record"):
        mvau_model(q).transform(SetProvenAccumulatorWidths([record_for(other, 12)]))


def test_without_records_widths_are_exact_and_unchecked():
    q = np.full((2, 64), 7)
    transform = SetProvenAccumulatorWidths([])
    mvau_model(q).transform(transform)
    (w,) = transform.layers
    assert w.layer is None and w.target_bits is None and w.within_target is None
    assert w.datatype == range_datatype(*brute_force_range(q, 0, 15)).name


def test_forced_width_is_imposed_and_marked():
    q = np.full((2, 64), 7)
    transform = SetProvenAccumulatorWidths([record_for(q, 10)], force_bits=10)
    model = mvau_model(q).transform(transform)
    assert _attr(model.graph.node[0], "accDataType").decode() == "INT10"
    assert transform.layers[0].forced


def test_vvau_and_conv_layout_match_record_of_pytorch_weights():
    """A depthwise layer's (C, 1, kh, kw) FINN weights and an MVAU lowered from a convolution,
    whose rows are in (kh, kw, C) order, both match the record made from PyTorch's layout."""
    rng = np.random.default_rng(3)
    w = rng.integers(-3, 4, size=(8, 4, 3, 3))  # PyTorch conv (out, C, kh, kw)
    finn_conv = w.transpose(0, 2, 3, 1).reshape(8, -1)  # FINN im2col order
    model = mvau_model(finn_conv)
    rec = record_for(w.reshape(8, -1), 16, layer="conv2")
    transform = SetProvenAccumulatorWidths([rec])
    model.transform(transform)
    assert transform.layers[0].layer == "conv2"
    dw = rng.integers(-3, 4, size=(8, 1, 3, 3))
    node = helper.make_node("VVAU", ["inp", "w"], ["out"], domain=FINN_DOMAIN, name="VVAU_0")
    graph = helper.make_graph([node], "g", [], [])
    vv = ModelWrapper(qonnx_make_model(graph))
    vv.set_initializer("w", dw.astype(np.float32))
    assert np.array_equal(integer_weights(vv, node), dw.reshape(8, 9))


def test_range_datatype_matches_qonnx_ranges():
    for lo, hi in [(0, 0), (0, 255), (0, 256), (-1, 0), (-128, 127), (-129, 5), (-3, 128)]:
        dt = range_datatype(lo, hi)
        assert dt.min() <= lo and hi <= dt.max()
        smaller = DataType[re.sub(r"\d+$", str(dt.bitwidth() - 1), dt.name)] \
            if dt.bitwidth() > 1 else None
        assert smaller is None or not (smaller.min() <= lo and hi <= smaller.max())


def test_reports_are_written_and_readable(tmp_path):
    q = a2q_weights(12)
    transform = SetProvenAccumulatorWidths([record_for(q, 12)],
                                           lut_estimator=lambda n, m: 100 + 3 * DataType[
                                               _attr(n, "accDataType").decode()].bitwidth())
    mvau_model(q).transform(transform)
    paths = write_reports(transform.layers, tmp_path)
    data = json.loads(paths["json"].read_text())
    (row,) = data["layers"]
    assert row["layer"] == "fc1" and row["within_target"] is True
    assert row["lut_int32"] == 100 + 3 * 32 and row["lut_chosen"] == 100 + 3 * row["bits"]
    assert data["totals"]["all_within_target"] is True
    assert "| MVAU_hls_0 | fc1 | 12 |" in paths["summary"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("Targets checked: 1 of 1 layers; every checked width is within its target."
            in summary_markdown(transform.layers))


def test_verdict_never_claims_an_unchecked_or_forced_width():
    """No record: nothing was checked, and the summary says so; forced widths are unproven."""
    q = a2q_weights(12)
    unrecorded = SetProvenAccumulatorWidths([])
    mvau_model(q).transform(unrecorded)
    text = summary_markdown(unrecorded.layers)
    assert "no target was checked" in text and "within its target" not in text
    forced = SetProvenAccumulatorWidths([record_for(q, 12)], force_bits=10)
    mvau_model(q).transform(forced)
    text = summary_markdown(forced.layers)
    assert "FORCED" in text and "unproven" in text and "within its target" not in text
    assert "no accumulator width was set" in summary_markdown([])


def test_extreme_inputs_drive_first_layer_to_its_ends():
    """On a QONNX-like graph (input -> MatMul), the extreme inputs reach the extremes of the
    first layer's accumulator over inputs clipped to [-1, 1]."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 5)).astype(np.float32)  # MatMul weight (in, out)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 5])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("w", w)
    xs = np.clip(extreme_inputs(model, channels=5), -1, 1)
    reached = np.concatenate([x.reshape(1, -1) @ w for x in xs])
    l1 = np.abs(w).sum(0)
    np.testing.assert_allclose(reached.max(0), l1, rtol=1e-5)
    np.testing.assert_allclose(reached.min(0), -l1, rtol=1e-5)


def test_install_pins_equal_the_python_constants():
    """The Docker image (upstream FINN dev), the Makefile (FINN+) and finn_flow agree on versions."""
    from finn_flow import FINN_PLUS_VERSION

    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert f"FINN_COMMIT={FINN_COMMIT}" in dockerfile
    assert "fetch-repos.sh" in dockerfile and "exec a2q" in dockerfile
    assert re.search(rf"^FINN_PLUS_VERSION := {re.escape(FINN_PLUS_VERSION)}$", makefile, re.M)
    assert "--no-deps finn-plus==$(FINN_PLUS_VERSION)" in makefile
    hls4ml = re.search(r"hls4ml==([\d.]+)", makefile).group(1)
    assert f"ARG HLS4ML_VERSION={hls4ml}" in dockerfile
    assert "torch==2.13.0" in dockerfile and "torch==2.13.0" in makefile


def test_build_errors_are_clear_before_finn_is_needed(tmp_path):
    from finn_flow import build

    with pytest.raises(A2QInputError, match="does not exist"):
        build(tmp_path / "missing.onnx", tmp_path / "out")
    bad = tmp_path / "bad.onnx"
    bad.write_text("not onnx")
    with pytest.raises(A2QInputError, match="not a readable ONNX model"):
        build(bad, tmp_path / "out")
    with pytest.raises(A2QInputError, match="unknown output"):
        build(bad, tmp_path / "out", outputs=["gds"])
    with pytest.raises(A2QInputError, match="needs --board"):
        build(bad, tmp_path / "out", outputs=["bitfile"], fpga_part="xc7z020clg400-1")


def test_finn_available_explains_itself():
    status = finn_available()
    ok, reason = status  # unpacks like a pair ...
    assert isinstance(ok, bool) and reason
    assert bool(status) is ok  # ... but is false in a condition when FINN is missing
    if not ok:
        assert "Docker" in reason and FINN_COMMIT in reason


@pytest.mark.skipif(not finn_available(), reason="needs FINN+ installed to make its import fail")
def test_a_finn_that_fails_to_import_is_reported_not_raised():
    """FINN+ raises its own errors (and OSError) at import, not ImportError: with XILINX_VIVADO
    pointing nowhere its builder demands an XSI setup. finn_available() says so, never raises."""
    import subprocess
    import sys

    from finn_flow.finn_compat import detect_finn

    if detect_finn().flavour != "finn-plus":
        pytest.skip("the XSI import exists in FINN+ only")
    code = ("from finn_flow import finn_available; s = finn_available(); "
            "print(bool(s)); print(s.reason)")
    env = {**os.environ, "XILINX_VIVADO": "/nonexistent/Vivado"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    verdict, reason = run.stdout.split("\n", 1)
    assert verdict == "False" and "does not import" in reason and "finn deps update" in reason


# --- cppsim plan: which layers the available finn-hlslib can compile (finn_flow.verify.cppsim) ---

OLD_POOL_API = """
/* a comment mentioning template<typename T> class MaxPoolFunction must not count */
template<typename T, unsigned size>
class MaxPoolFunction : public PoolFunction<T, T, size> {};
template<unsigned Channels, unsigned PE, unsigned TotalK, typename TSrcI = Identity,
         typename TI, typename TO, typename TA>
void Pool_batch(hls::stream<TI> &in, hls::stream<TO> &out, TA const &function, int const reps) {}
"""
NEW_POOL_API = """
template<typename T>
class MaxPoolFunction {};
template<unsigned ISIZE, unsigned K, typename TI, typename TO, typename F>
void Pool_batch(hls::stream<TI> &in, hls::stream<TO> &out, F const &fxn) {}
"""


def _hlslib(tmp_path, text):
    (tmp_path / "pool.hpp").write_text(text)
    return tmp_path


def _dataflow_graph(*op_types):
    nodes, prev = [], "x"
    for i, op in enumerate(op_types):
        backend = op.rsplit("_", 1)[1] if op.endswith(("_hls", "_rtl")) else None
        attrs = {"Function": "MaxPool"} if op.startswith("Pool") else {}
        nodes.append(helper.make_node(
            op, [prev], [f"t{i}"], name=f"{op}_{i}",
            domain=FINN_DOMAIN + (f".{backend}" if backend else ""), **attrs))
        prev = f"t{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info(
            prev, TensorProto.FLOAT, [1, 4])])
    return ModelWrapper(qonnx_make_model(graph))


def test_hlslib_api_check_tells_old_from_new_pool_api(tmp_path):
    from finn_flow.verify.cppsim import HLSLIB_API, missing_api

    uses = HLSLIB_API["Pool_hls"]["MaxPool"]
    (tmp_path / "old").mkdir()
    old = missing_api(uses, _hlslib(tmp_path / "old", OLD_POOL_API))
    assert len(old) == 2 and "MaxPoolFunction<typename T, unsigned size>" in old[0]
    assert "int const reps" in old[1]
    (tmp_path / "new").mkdir()
    assert missing_api(uses, _hlslib(tmp_path / "new", NEW_POOL_API)) == []
    (tmp_path / "none").mkdir()
    assert "not declared" in " ".join(missing_api(uses, _hlslib(tmp_path / "none", "")))


def test_cppsim_plan_runs_only_non_accumulating_layers_in_python(tmp_path):
    from finn_flow.verify.cppsim import plan_cppsim

    (tmp_path / "old").mkdir()
    old = _hlslib(tmp_path / "old", OLD_POOL_API)
    model = _dataflow_graph("Thresholding_hls", "ConvolutionInputGenerator_rtl", "MVAU_hls",
                            "Pool_hls", "Shuffle")
    plan = {e.node: e for e in plan_cppsim(model, old)}
    assert [e.mode for e in plan.values()] == ["cppsim", "python", "cppsim", "python", "python"]
    assert "lacks the API" in plan["Pool_hls_3"].reason
    assert "RTL" in plan["ConvolutionInputGenerator_rtl_1"].reason
    (tmp_path / "new").mkdir()
    new = _hlslib(tmp_path / "new", NEW_POOL_API)
    assert plan_cppsim(model, new)[3].mode == "cppsim"
    with pytest.raises(A2QInputError, match="RTL layer"):
        plan_cppsim(_dataflow_graph("MVAU_rtl"), new)
    with pytest.raises(A2QInputError, match="not specialized"):
        plan_cppsim(_dataflow_graph("Thresholding"), new)


@pytest.mark.skipif(finn_available()[0], reason="checks the message shown where FINN is absent")
def test_demo_build_says_what_it_skipped_without_finn(tmp_path):
    from finn_flow import demo_build

    text, ok = demo_build(tmp_path / "model.onnx", tmp_path / "out")
    assert ok and text.startswith("FINN build SKIPPED") and finn_available()[1] in text


def test_readme_lut_table_is_the_committed_benchmark_result():
    """Every row of the FINN LUT table (docs/benchmarks.md) equals benchmarks/results/finn_luts.json
    (written by benchmarks/finn_luts.py), to the digits shown."""
    results = json.loads((ROOT / "benchmarks/results/finn_luts.json").read_text())
    readme = (ROOT / "docs/benchmarks.md").read_text()
    section = readme.split("### LUT estimates (`benchmarks/finn_luts.py`)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if re.match(r"\| (mlp|cnn) \|", line)]
    assert len(rows) == 7
    styles, scopes = {"BRAM": "block", "LUTRAM": "distributed"}, {"MVAUs": "mvau",
                                                                  "network": "network"}
    for line in rows:
        net, folding, thresholds, scope, a2q, plain, cap, true = (
            c.strip() for c in line.strip("|").split("|"))
        (row,) = [r for r in results["rows"] if (r["net"], r["folding"], r["style"]) ==
                  (net, folding, styles[thresholds])]
        v = row["summary"][scopes[scope]]
        base = v["A2Q-12"]
        assert int(a2q) == base, line
        for shown, key in ((plain, "FINN plain"), (cap, "INT32 (FINN)"), (true, "INT32 (true)")):
            assert shown == f"{v[key] / base:.3f}", (line, key)


def _forced_and_proven_layers():
    q = a2q_weights(12)
    proven = SetProvenAccumulatorWidths([record_for(q, 12)],
                                        lut_estimator=lambda node, model: 7)
    mvau_model(q).transform(proven)
    forced = SetProvenAccumulatorWidths([record_for(q, 12)], force_bits=6,
                                        lut_estimator=lambda node, model: 7)
    mvau_model(q).transform(forced)
    for w in (*proven.layers, *forced.layers):
        w.lut_int32_uncapped = 9
    return proven.layers, forced.layers


def test_plot_is_readable_target_exact_range_luts_forced():
    """accumulators.png: a title saying what the widths are, the target P and the exact range
    drawn, all four LUT columns of the table, forced widths below the exact range labelled, and
    both legends outside the data area."""
    import matplotlib.pyplot as plt

    from finn_flow.steps.report import plot_figure

    proven, forced = _forced_and_proven_layers()
    for layers, status in ((proven, "proven widths"), (forced, "FORCED below the exact range")):
        fig = plot_figure(layers)
        assert status in fig._suptitle.get_text()
        ax_bits, ax_lut = fig.axes
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in (ax_bits, ax_lut):
            legend = ax.get_legend().get_window_extent(renderer)
            assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()
        labels = ax_bits.get_legend_handles_labels()[1]
        assert "target P" in labels and "exact range" in labels
        assert len(ax_lut.containers) == 4 and set(ax_lut.get_legend_handles_labels()[1]) == {
            "width set", "FINN's width", "INT32 (FINN model, capped)", "32 bits (uncapped)"}
        texts = [t.get_text() for t in ax_bits.texts]
        assert ("FORCED" in texts) == (layers is forced)
        assert "P=12" in texts
        plt.close(fig)


def test_verification_line_never_reads_as_a_pass_on_a_mismatch():
    """All accelerator outputs bit-exact but the model outputs off (e.g. NaN): said as MISMATCH
    first, not "16/16 accelerator outputs bit-exact (MISMATCH ...)"."""
    from finn_flow.build import BuildResult
    from finn_flow.verify.compare import VerificationResult

    tail_off = VerificationResult(kind="extreme", inputs=16, matched=16, max_abs_diff=0.0,
                                  final_max_rel_diff=float("nan"), executor="hls-arith")
    exact = VerificationResult(kind="random", inputs=4, matched=4, max_abs_diff=0.0,
                               final_max_rel_diff=1e-7, executor="hls-arith")
    lines = BuildResult(output_dir=Path("."), layers=[], reports={},
                        verification=[tail_off, exact]).verification_summary().splitlines()
    assert lines[0].startswith("hls-arith extreme: MISMATCH:")
    assert "16/16 accelerator outputs bit-exact" not in lines[0]
    assert lines[1].startswith("hls-arith random: 4/4 accelerator outputs bit-exact (ok;")


def test_report_says_what_was_verified(tmp_path):
    """A report written by the accumulator step says verification had not run; the finished
    build's rewrite says what ran."""
    proven, _ = _forced_and_proven_layers()
    paths = write_reports(proven, tmp_path)
    assert "Verification: not run when this report was written" in paths["summary"].read_text()
    assert json.loads(paths["json"].read_text())["verification"].startswith(
        "Verification: not run")
    paths = write_reports(proven, tmp_path, verification="Verification (hls-arith): all 5 checks "
                                                          "bit-exact.")
    assert "not run" not in paths["summary"].read_text()


@pytest.mark.skipif(not finn_available(), reason="FINN not importable")
@pytest.mark.parametrize("part, ok", [
    ("xc7z020clg400-1", True), ("xcvu9p-flgb2104-2-i", True), ("xc7a35ticsg324-1L", True),
    ("xcku115-flvb2104-2-e", True), ("xcve2802-vsvh1760-2MP-e-S", True),
    ("xcNOSUCH", False), ("xc7z020", False), ("Pynq-Z1", False)])
def test_fpga_part_check_takes_xilinx_part_numbers_only(part, ok):
    """Parts outside FINN's board map are accepted when shaped like a Xilinx part number (device,
    package, speed grade); names and typos are refused before FINN runs."""
    from finn_flow.options import check_target

    if ok:
        check_target(None, part, ["estimate"])
    else:
        with pytest.raises(A2QInputError, match="--fpga-part"):
            check_target(None, part, ["estimate"])
