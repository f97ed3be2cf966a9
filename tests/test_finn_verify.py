"""Verification that can fail, in CI: the hls-arith executor (FINN's dataflow graph with every
MVAU/VVAU accumulator and threshold comparison at its accumulator type in two's complement, a model
of finn-hlslib's arithmetic) and the per-layer extreme check.

* the wrap and the threshold step against numpy int64 arithmetic modulo 2^P, on hand-built MVAU and
  VVAU nodes (qonnx helper graphs);
* plain (no A2Q) MLP and CNN trained briefly on digits, forced below their exact accumulator range,
  are caught on extreme inputs and, per layer, in exactly the layers that are too narrow; one bit
  too narrow in any single layer is caught in that layer;
* A2Q models (and plain models) at their proven widths pass everything;
* with cppsim (upstream FINN dev + finn-hlslib), hls-arith and cppsim agree bit for bit; skipped
  naming what is missing elsewhere.

Everything but the cppsim tests runs under FINN+ (CI): no finn-hlslib needed.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from finn_models import trained_on_digits  # tests/ is on sys.path
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import qonnx_make_model

from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.models import build_cnn, build_mlp, weight_quant_kwargs
from finn_flow import build, cppsim_available, finn_available
from finn_flow.steps.accumulators import FINN_DOMAIN, range_datatype
from finn_flow.verify.compare import (
    STAGE_CONVERSION,
    STAGE_CPPSIM,
    STAGE_WIDTHS,
    VerificationResult,
    first_differences,
)
from finn_flow.verify.hls_arith import (
    HLS_ARITH_DOMAIN,
    ToHlsArith,
    check_layer_extremes,
    exact_matmul,
    extreme_vectors,
    threshold_step,
    wrap_twos_complement,
)

FINN_OK, FINN_REASON = finn_available()
CPPSIM_OK, CPPSIM_REASON = cppsim_available() if FINN_OK else (False, FINN_REASON)
requires_finn = pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
requires_cppsim = pytest.mark.skipif(
    not CPPSIM_OK, reason=f"C++ simulation unavailable (needs finn-hlslib): {CPPSIM_REASON}")


def _wrap_reference(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Two's complement in plain numpy int64: ``v mod 2^P``, shifted to ``[-2^(P-1), 2^(P-1))``
    for a signed type."""
    v = np.asarray(values, dtype=np.int64)
    if signed:
        half = np.int64(1) << (bits - 1)
        return np.mod(v + half, np.int64(1) << bits) - half
    return np.mod(v, np.int64(1) << bits)


# ---------------------------------------------------------------- arithmetic, no FINN needed

@pytest.mark.parametrize("bits", [2, 5, 9, 12, 16, 31])
@pytest.mark.parametrize("signed", [True, False])
def test_wrap_matches_int64_modular_arithmetic(bits, signed):
    rng = np.random.default_rng(bits)
    values = rng.integers(-(2 ** 40), 2 ** 40, size=2000)
    dt = DataType[f"{'INT' if signed else 'UINT'}{bits}"]
    got = wrap_twos_complement(values, dt)
    assert np.array_equal(got, _wrap_reference(values, bits, signed))
    assert got.min() >= dt.min() and got.max() <= dt.max()
    inside = values[(values >= dt.min()) & (values <= dt.max())]
    assert np.array_equal(wrap_twos_complement(inside, dt), inside)  # no change within the type


def test_threshold_step_counts_thresholds_at_or_below_the_accumulator():
    acc = np.array([[-5, 0, 3], [7, -8, 2]], dtype=np.float64)  # 2 vectors, 3 channels
    thr = np.array([[-5, 0], [0, 1], [3, 4]], dtype=np.float64)
    # accu >= threshold counts (finn-hlslib: comp::less_equal(threshold, accu))
    assert threshold_step(acc, thr).tolist() == [[1, 1, 1], [2, 0, 0]]
    assert threshold_step(acc, thr[:1], out_bias=-1).tolist() == [[0, 1, 1], [1, -1, 1]]


def test_extreme_vectors_reach_each_channels_bounds():
    rng = np.random.default_rng(0)
    q = rng.integers(-7, 8, size=(5, 40))
    x_max, x_min = extreme_vectors(q, -128, 127)
    for c in range(5):
        best = (np.where(q[c] > 0, 127, -128) * q[c]).sum()
        assert (x_max[c] * q[c]).sum() == best == (np.abs(q[c]) * np.where(q[c] > 0, 127, 128)).sum()
        assert (x_min[c] * q[c]).sum() == -(np.abs(q[c]) * np.where(q[c] > 0, 128, 127)).sum()


@pytest.mark.parametrize("scale", [1, 2**8, 2**20, 2**28])
def test_exact_matmul_equals_int64_matmul(scale):
    """Float32/float64 BLAS where every partial sum is exact, int64 beyond (2^28 * 2^28 * 64 >
    2^53):
    equal to numpy's int64 product either way, extremes of the range included."""
    rng = np.random.default_rng(scale)
    x = rng.integers(-scale, scale, size=(30, 64), endpoint=True)
    w = rng.integers(-scale, scale, size=(64, 7), endpoint=True)
    x[0], w[:, 0] = scale, -scale
    got = exact_matmul(x, w)
    assert got.dtype == np.int64 and np.array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


def _result(kind, executor, mismatched, reference=(), inputs=4):
    return VerificationResult(kind=kind, inputs=inputs, matched=inputs - len(mismatched),
                              max_abs_diff=float(bool(mismatched)),
                              mismatched_indices=list(mismatched), executor=executor,
                              reference_mismatched_indices=list(reference))


def test_first_differences_names_the_earliest_stage():
    results = [_result("real", "hls-arith", [1, 2], reference=[0]),
               _result("real", "cppsim", [0, 1, 2, 3], reference=[0]),
               _result("extreme", "hls-arith", []), _result("extreme", "cppsim", [])]
    firsts = first_differences(results)
    assert "extreme" not in firsts
    assert firsts["real"] == {STAGE_CONVERSION: 1, STAGE_WIDTHS: 2,
                              "hls-arith vs " + STAGE_CPPSIM: 1}
    only_cppsim = first_differences([_result("random", "cppsim", [3])])
    assert only_cppsim == {"random": {"FINN's graph vs " + STAGE_CPPSIM: 1}}


# ---------------------------------------------------------------- hand-built MVAU / VVAU

def _mvau(q: np.ndarray, idt: str, acc: str, thresholds: np.ndarray | None, vectors: int,
          act_val: int = 0) -> ModelWrapper:
    """One FINN MVAU_hls node, weights stored (MW, MH) = (K, out) as FINN does; ``acc`` is the
    accumulator type (accDataType, and the thresholds' or output type, as finn_flow sets them)."""
    out_ch, k = q.shape
    inputs = ["inp", "weights"] + (["thresh"] if thresholds is not None else [])
    odt = "UINT4" if act_val == 0 else "INT4"
    node = helper.make_node(
        "MVAU_hls", inputs, ["out"], name="MVAU_hls_0", domain=FINN_DOMAIN + ".hls",
        backend="fpgadataflow",
        MW=k, MH=out_ch, SIMD=1, PE=1, inputDataType=idt,
        weightDataType="INT4", outputDataType=odt if thresholds is not None else acc,
        accDataType=acc, noActivation=0 if thresholds is not None else 1, binaryXnorMode=0,
        numInputVectors=[vectors], ActVal=act_val, mem_mode="internal_decoupled")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [vectors, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [vectors, out_ch])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("weights", q.T.astype(np.float32))
    model.set_tensor_datatype("weights", DataType["INT4"])
    model.set_tensor_datatype("inp", DataType[idt])
    if thresholds is not None:
        model.set_initializer("thresh", thresholds.astype(np.float32))
        model.set_tensor_datatype("thresh", DataType[acc])
    return model


def _run(model: ModelWrapper, x: np.ndarray) -> np.ndarray:
    from qonnx.core.onnx_exec import execute_onnx

    return execute_onnx(model, {"inp": x.astype(np.float32)})["out"]


def _random_thresholds(rng, channels: int, dt: DataType, steps: int = 15) -> np.ndarray:
    return np.sort(rng.integers(int(dt.min()), int(dt.max()) + 1, size=(channels, steps)), axis=1)


@pytest.mark.finn
@requires_finn
@pytest.mark.parametrize("acc", ["INT8", "INT10", "INT13", "INT20", "UINT9"])
@pytest.mark.parametrize("activation", [False, True])
@pytest.mark.parametrize("idt", ["INT8", "UINT4"])
def test_hls_arith_mvau_is_int64_arithmetic_modulo_2p(acc, activation, idt):
    rng = np.random.default_rng(len(acc) + activation)
    dt, in_dt = DataType[acc], DataType[idt]
    q = rng.integers(-8, 8, size=(6, 48))
    x = rng.integers(int(in_dt.min()), int(in_dt.max()) + 1, size=(64, 48))
    x[:2] = np.stack(extreme_vectors(q, int(in_dt.min()), int(in_dt.max())))[:, 0]
    thresholds = _random_thresholds(rng, 6, dt) if activation else None
    model = _mvau(q, idt, acc, thresholds, len(x))
    converted = model.transform(ToHlsArith())
    node = converted.graph.node[0]
    assert (node.domain, node.op_type) == (HLS_ARITH_DOMAIN, "MVAU")
    exact = x.astype(np.int64) @ q.T.astype(np.int64)
    wrapped = _wrap_reference(exact, dt.bitwidth(), dt.signed())
    expected = (wrapped[..., None] >= thresholds).sum(-1) if activation else wrapped
    assert np.array_equal(_run(converted, x), expected)
    if dt.bitwidth() < range_datatype(int(exact.min()), int(exact.max())).bitwidth():
        assert not np.array_equal(wrapped, exact)  # the case wraps: the test is not vacuous
    if acc == "INT20":  # wide enough: hls-arith equals FINN's exact execution of the node
        assert np.array_equal(wrapped, exact)
        assert np.array_equal(_run(converted, x), _run(model_generic(model), x))


def model_generic(model: ModelWrapper) -> ModelWrapper:
    """The same node as FINN's generic MVAU/VVAU (FINN's exact Python execution)."""
    from qonnx.custom_op.registry import getCustomOp

    model = ModelWrapper(copy.deepcopy(model.model))
    for node in model.graph.node:
        node.op_type, node.domain = node.op_type.removesuffix("_hls"), FINN_DOMAIN
        known = getCustomOp(node).get_nodeattr_types()
        for a in [a for a in node.attribute if a.name not in known]:
            node.attribute.remove(a)
    return model


def _vvau(q: np.ndarray, acc: str, thresholds: np.ndarray | None, dim: tuple[int, int],
          kernel: tuple[int, int] = (3, 3)) -> ModelWrapper:
    """One FINN VVAU_hls node (depthwise, INT8 inputs already im2col'd; PE = Channels, so FINN
    reads the input as (kernel position, channel))."""
    channels, (kh, kw) = len(q), kernel
    inputs = ["inp", "weights"] + (["thresh"] if thresholds is not None else [])
    node = helper.make_node(
        "VVAU_hls", inputs, ["out"], name="VVAU_hls_0", domain=FINN_DOMAIN + ".hls",
        backend="fpgadataflow",
        PE=channels, SIMD=1, Dim=list(dim), Channels=channels,
        Kernel=[kh, kw], inputDataType="INT8", weightDataType="INT4",
        outputDataType="UINT4" if thresholds is not None else acc, accDataType=acc,
        noActivation=0 if thresholds is not None else 1, ActVal=0,
        mem_mode="internal_decoupled")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("inp", TensorProto.FLOAT,
                                                    [1, *dim, kh * kw * channels])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, *dim, channels])])
    model = ModelWrapper(qonnx_make_model(graph))
    model.set_initializer("weights", q.reshape(channels, 1, kh, kw).astype(np.float32))
    model.set_tensor_datatype("weights", DataType["INT4"])
    model.set_tensor_datatype("inp", DataType["INT8"])
    if thresholds is not None:
        model.set_initializer("thresh", thresholds.astype(np.float32))
        model.set_tensor_datatype("thresh", DataType[acc])
    return model


@pytest.mark.finn
@requires_finn
@pytest.mark.parametrize("activation", [False, True])
def test_hls_arith_vvau_is_int64_arithmetic_modulo_2p(activation):
    """A depthwise 3x3 VVAU on 2x3 output positions."""
    rng = np.random.default_rng(1)
    channels, kh, kw, dim = 4, 3, 3, (2, 3)
    dt = DataType["INT9"]
    q = rng.integers(-8, 8, size=(channels, kh * kw))
    q[0] = 7  # a channel whose extreme wraps
    thresholds = _random_thresholds(rng, channels, dt) if activation else None
    model = _vvau(q, dt.name, thresholds, dim)
    x = rng.integers(-128, 128, size=(1, *dim, kh * kw, channels))
    x[0, 0, 0] = extreme_vectors(q, -128, 127)[0].T  # every channel at its maximum
    exact = np.einsum("nhwkc,ck->nhwc", x.astype(np.int64), q.astype(np.int64))
    wrapped = _wrap_reference(exact, 9, True)
    assert not np.array_equal(wrapped, exact)
    expected = (wrapped[..., None] >= thresholds).sum(-1) if activation else wrapped
    converted = model.transform(ToHlsArith())
    assert converted.graph.node[0].domain == HLS_ARITH_DOMAIN
    assert np.array_equal(_run(converted, x.reshape(1, *dim, -1)), expected)
    checks = check_layer_extremes(model)
    assert len(checks) == 1 and not checks[0].ok and 0 in checks[0].wrapped_channels
    assert checks[0].min_reached == checks[0].max_reached == channels


@pytest.mark.finn
@requires_finn
@pytest.mark.parametrize("activation", [False, True])
def test_layer_extremes_exact_width_passes_one_bit_less_fails(activation):
    rng = np.random.default_rng(2)
    q = rng.integers(-8, 8, size=(6, 40))
    lows, highs = (np.where(q > 0, -128, 127) * q).sum(1), (np.where(q > 0, 127, -128) * q).sum(1)
    exact = range_datatype(int(lows.min()), int(highs.max()))
    for bits, ok in ((exact.bitwidth(), True), (exact.bitwidth() - 1, False)):
        dt = DataType[f"INT{bits}"]
        thr = np.clip(_random_thresholds(rng, 6, exact), dt.min(), dt.max()) if activation \
            else None
        [check] = check_layer_extremes(_mvau(q, "INT8", dt.name, thr, 1))
        assert check.ok is ok, check.describe()
        assert (check.range_min, check.range_max) == (lows.min(), highs.max())
        assert check.min_reached == check.max_reached == check.channels == 6
        assert check.vectors == 12 and check.bits_exact == exact.bitwidth()
        if not ok:  # the channels whose extreme leaves INT(bits)
            outside = {c for c in range(6) if lows[c] < dt.min() or highs[c] > dt.max()}
            assert set(check.wrapped_channels) == outside and outside


# ---------------------------------------------------------------- builds of trained models


def _depthwise_cnn(quant: str, acc_bits: int | None) -> torch.nn.Module:
    """conv 3x3 (MVAU) -> depthwise conv 3x3 (VVAU) -> max pool -> fully connected (MVAU)."""
    def w() -> dict:
        return weight_quant_kwargs(quant, 4, acc_bits)

    def act() -> QuantReLU:
        return QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)

    return torch.nn.Sequential(OrderedDict([
        ("input_quant", QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)),
        ("conv1", QuantConv2d(1, 8, 3, padding=1, bias=False, **w())),
        ("bn1", torch.nn.BatchNorm2d(8)), ("act1", act()),
        ("dwconv", QuantConv2d(8, 8, 3, padding=1, groups=8, bias=False, **w())),
        ("bn2", torch.nn.BatchNorm2d(8)), ("act2", act()),
        ("pool", torch.nn.MaxPool2d(2)), ("flatten", torch.nn.Flatten()),
        ("fc", QuantLinear(8 * 4 * 4, 10, bias=True, **w()))]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    x = load_digits()[0].tensors[0][:1]
    makers = {"mlp_a2q": lambda: build_mlp("a2q", acc_bits=12, hidden=(32,)),
              "cnn_a2q": lambda: build_cnn("a2q+", acc_bits=12, channels=(4, 8)),
              "mlp_none": lambda: build_mlp("none", acc_bits=None, hidden=(32,)),
              "cnn_none": lambda: build_cnn("none", acc_bits=None, channels=(4, 8)),
              "dw_a2q": lambda: _depthwise_cnn("a2q+", 12),
              "dw_none": lambda: _depthwise_cnn("none", None)}
    paths = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        paths[name] = root / f"{name}.onnx"
        export_qonnx(trained_on_digits(make(), a2q="none" not in name), x, paths[name])
    return paths


REAL = load_digits()[1].tensors[0][:8].numpy()


def _build(exported, tmp_path, name, bits=None, verify=("hls-arith",), random_count=8):
    return build(exported[name], tmp_path / "out", verify=verify, verify_inputs=REAL,
                 random_count=random_count, force_accumulator_bits=bits,
                 allow_overflow_demo=bits is not None)


@pytest.mark.finn
@pytest.mark.slow
@requires_finn
@pytest.mark.parametrize("name, bits", [("mlp_none", 9), ("mlp_none", 12), ("cnn_none", 11),
                                        ("cnn_none", 12), ("dw_none", 9)])
def test_hls_arith_catches_plain_models_forced_below_their_range(exported, tmp_path, name, bits):
    """hls-arith mismatches on extreme inputs, says the widths set are where outputs first
    differ, and the per-layer check names exactly the layers whose exact range needs more bits."""
    result = _build(exported, tmp_path, name, bits)
    assert result.verified is False
    assert {v.executor for v in result.verification} == {"hls-arith"}
    extreme = next(v for v in result.verification if v.kind == "extreme")
    assert extreme.matched < extreme.inputs
    assert first_differences(result.verification)["extreme"] == {
        STAGE_WIDTHS: extreme.inputs - extreme.matched}
    needs_more = {w.finn_node for w in result.layers if w.bits_exact > bits}
    assert needs_more, "the forced width must be below some layer's exact range"
    assert {c.node for c in result.layer_extremes if not c.ok} == needs_more
    names = {w.finn_node: w.layer for w in result.layers}
    for c in result.layer_extremes:
        assert c.min_reached == c.max_reached == c.channels
        assert bool(c.wrapped_channels) == (c.node in needs_more)
    summary = result.verification_summary()
    assert f"hls-arith extreme: {extreme.matched}/{extreme.inputs} accelerator outputs" in summary
    assert f"outputs first differ at {STAGE_WIDTHS}" in summary
    for node in needs_more:
        assert f"{node} (layer {names[node]}, INT{bits}" in summary.split("first differ at")[-1]
    saved = json.loads((tmp_path / "out/verification_output/hls_arith.json").read_text())
    assert saved["executor"] == "hls-arith" and "two's complement" in saved["description"]
    assert {r["kind"] for r in saved["results"]} == {"random", "real", "extreme"}
    assert all(r["executor"] == "hls-arith" for r in saved["results"])
    assert {c["node"] for c in saved["layer_extremes"] if not c["ok"]} == needs_more


@pytest.mark.finn
@pytest.mark.slow
@requires_finn
@pytest.mark.parametrize("name", ["mlp_a2q", "cnn_a2q", "dw_a2q", "mlp_none"])
def test_proven_widths_pass_everything(exported, tmp_path, name):
    """A2Q models at their proven widths (and a plain model at the exact widths finn_flow sets
    without a target): bit-exact on every set, every layer's extremes reached without wrapping;
    the model outputs equal the QONNX model's; FINN's graph equals the QONNX model."""
    result = _build(exported, tmp_path, name)
    assert result.verified, result.verification_summary()
    for v in result.verification:
        assert v.ok and v.matched == v.inputs and not v.reference_mismatched_indices, v
    assert first_differences(result.verification) == {}
    assert len(result.layer_extremes) == len(result.layers)
    for c in result.layer_extremes:
        assert c.ok and c.min_reached == c.max_reached == c.channels, c.describe()
    if "a2q" in name:
        assert all(w.within_target for w in result.layers)
    assert "MISMATCH" not in result.verification_summary()
    assert result.to_dict()["layer_extremes"][0]["ok"] is True


def _narrow(model: ModelWrapper, node, bits: int) -> None:
    """Set one node's accumulator (and thresholds / pass-through output) to INT``bits``,
    thresholds clipped into it, as ``force_accumulator_bits`` does for every node."""
    from qonnx.custom_op.registry import getCustomOp

    dt, inst = DataType[f"INT{bits}"], getCustomOp(node)
    inst.set_nodeattr("accDataType", dt.name)
    if inst.get_nodeattr("noActivation"):
        inst.set_nodeattr("outputDataType", dt.name)
        model.set_tensor_datatype(node.output[0], dt)
    else:
        thr = np.clip(model.get_initializer(node.input[2]), dt.min(), dt.max())
        model.set_initializer(node.input[2], thr.astype(np.float32))
        model.set_tensor_datatype(node.input[2], dt)


@pytest.mark.finn
@pytest.mark.slow
@requires_finn
@pytest.mark.parametrize("name", ["mlp_none", "cnn_none", "cnn_a2q", "dw_none"])
def test_one_bit_too_narrow_in_any_single_layer_is_caught_there(exported, tmp_path, name):
    """From the built dataflow graph at proven widths, each MVAU narrowed alone to one bit below
    its exact range: the per-layer check flags that layer and no other."""
    result = _build(exported, tmp_path, name, verify=("hls-arith",), random_count=1)
    assert result.verified
    graph = tmp_path / "out/intermediate_models/step_generate_estimate_reports.onnx"
    for w in result.layers:
        model = ModelWrapper(str(graph))
        node = next(n for n in model.graph.node if n.name == w.finn_node)
        _narrow(model, node, w.bits_exact - 1)
        checks = {c.node: c for c in check_layer_extremes(model)}
        assert {n for n, c in checks.items() if not c.ok} == {w.finn_node}, w
        assert checks[w.finn_node].wrapped_channels


@pytest.mark.finn
@pytest.mark.slow
@requires_finn
def test_cli_verify_hls_arith_exits_1_on_a_forced_plain_model(exported, tmp_path, capsys):
    from brevitas_a2q.cli import main

    rc = main(["build", str(exported["mlp_none"]), "--out", str(tmp_path / "out"), "--verify",
               "hls-arith", "--force-accumulator-bits", "9", "--allow-overflow-demo",
               "--random-inputs", "2"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "hls-arith extreme: 0/16 accelerator outputs bit-exact (MISMATCH" in out
    assert "Per-layer extremes (0/2 checks ok" in out


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.cppsim
@requires_finn
@requires_cppsim
@pytest.mark.parametrize("name, bits", [("mlp_none", 9), ("mlp_none", 12), ("cnn_none", 12),
                                        ("dw_none", 9), ("mlp_a2q", None), ("cnn_a2q", None),
                                        ("dw_a2q", None)])
def test_cppsim_and_hls_arith_agree_bit_for_bit(exported, tmp_path, name, bits):
    """The evidence that hls-arith models finn-hlslib: on every input, forced or proven widths,
    the C++-simulated accelerator's outputs equal hls-arith's."""
    result = _build(exported, tmp_path, name, bits, verify=("hls-arith", "cppsim"))
    by = {(v.executor, v.kind): v for v in result.verification}
    for kind in ("random", "real", "extreme"):
        cpp, hls = by["cppsim", kind], by["hls-arith", kind]
        assert cpp.hls_arith_agreed == cpp.inputs, result.verification_summary()
        assert cpp.matched == hls.matched and cpp.ok == hls.ok
    assert result.verified is (bits is None)
    assert f"hls-arith agreed bit for bit on {by['cppsim', 'extreme'].inputs}/" in \
        result.verification_summary()
    # every layer alone, C++-simulated at its extremes: the same outputs as under hls-arith
    cpp_layers = [c for c in result.layer_extremes if c.executor == "cppsim"]
    hls_layers = {c.node: c for c in result.layer_extremes if c.executor == "hls-arith"}
    assert {c.node for c in cpp_layers} == set(hls_layers) == {w.finn_node for w in result.layers}
    for c in cpp_layers:
        assert c.hls_arith_agreed == c.vectors, c.describe()
        assert c.output_mismatches == hls_layers[c.node].output_mismatches


@pytest.mark.finn
@pytest.mark.slow
@requires_finn
def test_a_difference_already_in_finns_graph_is_attributed_to_the_conversion(exported, tmp_path):
    """A QONNX model that FINN's graph does not compute (here: its output bias changed after the
    build) is reported at the first stage, FINN's conversion, not at the widths set."""
    from finn_flow.build import BuildResult
    from finn_flow.verify.executors import verify_hls_arith

    _build(exported, tmp_path, "mlp_a2q", random_count=1)
    qonnx = ModelWrapper(str(exported["mlp_a2q"]))
    gemm = [n for n in qonnx.graph.node if n.op_type == "Gemm"][-1]
    qonnx.set_initializer(gemm.input[2], qonnx.get_initializer(gemm.input[2]) + 1.0)
    dataflow = ModelWrapper(str(tmp_path / "out/intermediate_models/"
                                           "step_generate_estimate_reports.onnx"))
    results, extremes = verify_hls_arith(dataflow, tmp_path / "out", {"real": REAL[:4]}, qonnx)
    [real] = results
    assert real.matched == 4 and not real.ok  # the accelerator equals FINN's graph
    assert real.reference_mismatched_indices == [0, 1, 2, 3]
    assert first_differences(results) == {"real": {STAGE_CONVERSION: 4}}
    summary = BuildResult(tmp_path, [], {}, verification=results,
                          layer_extremes=extremes).verification_summary()
    assert f"outputs first differ at {STAGE_CONVERSION}: 4/4" in summary


def _hand_built_cases():
    """MVAU (thresholds or not, signed/unsigned accumulator) and VVAU nodes at widths that wrap."""
    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, size=(6, 40))
    qv = rng.integers(-8, 8, size=(4, 9))
    return {
        "mvau_int10_thresholds": _mvau(q, "INT8", "INT10",
                                       _random_thresholds(rng, 6, DataType["INT10"]), 1),
        "mvau_int11_no_activation": _mvau(q, "INT8", "INT11", None, 1),
        "mvau_uint9_thresholds": _mvau(np.minimum(np.abs(q), 7), "UINT4", "UINT9",
                                       _random_thresholds(rng, 6, DataType["UINT9"]), 1),
        "vvau_int10_thresholds": _vvau(qv, "INT10", _random_thresholds(rng, 4, DataType["INT10"]),
                                       (1, 1)),
        "vvau_int9_no_activation": _vvau(qv, "INT9", None, (1, 1)),
    }


@pytest.mark.finn
@pytest.mark.cppsim
@pytest.mark.slow
@requires_finn
@requires_cppsim
@pytest.mark.parametrize("case", list(_hand_built_cases()))
def test_single_node_cppsim_agrees_with_hls_arith_at_the_extremes(case, tmp_path):
    """Hand-built nodes whose accumulators wrap at every channel's extremes: the C++-simulated
    node (finn-hlslib compiled) gives exactly hls-arith's outputs."""
    from finn_flow.finn_compat import build_session
    from finn_flow.verify.executors import cppsim_layer_extremes

    model = _hand_built_cases()[case]
    [hls] = check_layer_extremes(model)
    assert not hls.ok and hls.wrapped_channels  # the case wraps
    with build_session(tmp_path / "finn_build"):
        [cpp] = cppsim_layer_extremes(model, tmp_path)
    assert cpp.executor == "cppsim" and cpp.hls_arith_agreed == cpp.vectors == hls.vectors
    assert cpp.output_mismatches == hls.output_mismatches
