"""Real networks through FINN (issue 11): a ResNet-style CNN with two residual blocks (P = 12), a
depthwise-separable CNN with a residual add (P = 12), an ESPCN-style super-resolution network with a
transposed convolution (P = 13, 8x8 in, 16x16 out) and a W8A8 CNN (P = 16), all A2Q+, trained
briefly on digits after EP-init (tests/finn_models.py).

Each exports with ``brevitas_a2q.export_qonnx``, builds with ``finn_flow.build`` (estimate), every
MVAU/VVAU on every branch gets a proven width within its target, and FINN's own execution of the
dataflow graph (``execute_parent`` on ``step_create_dataflow_partition.onnx``) equals the QONNX
model on random and real inputs. The inputs used put no value on (or near) a rounding tie of the
input quantizer: FINN's thresholds round half up where QONNX rounds half to even (CONTEXT.md), which
is handled elsewhere."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from finn_models import MODELS, build_dwsep_residual, trained  # tests/ is on sys.path
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.analysis.records import AccumulatorRecord
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.data import load_digits
from finn_flow import build, finn_available
from finn_flow.steps.accumulators import LayerWidths
from finn_flow.verify.inputs import random_inputs, run_qonnx

FINN_OK, FINN_REASON = finn_available()


def needs_finn(test):
    """Marks ``finn`` and ``slow``; skipped, naming what is missing, where FINN is not
    importable."""
    for mark in (pytest.mark.finn, pytest.mark.slow,
                 pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")):
        test = mark(test)
    return test


# name -> (MVAU/VVAU count, op types the dataflow graph must contain)
EXPECTED = {
    "resnet": (6, {"DuplicateStreams", "MVAU"}),
    "dwsep_residual": (4, {"DuplicateStreams", "VVAU", "MVAU"}),
    "espcn": (3, {"FMPadding_Pixel", "MVAU"}),
    "w8a8_cnn": (3, {"MVAU"}),
}
ADD_LAYERS = ("AddStreams", "ElementwiseAdd")  # upstream FINN / FINN+


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("networks")
    example = load_digits()[0].tensors[0][:1]
    paths = {}
    for name, (make, _, regression) in MODELS.items():
        torch.manual_seed(0)
        paths[name] = root / f"{name}.onnx"
        export_qonnx(trained(make(), regression=regression), example, paths[name])
    return paths


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    """``built(name)``: the build result of one model, built once per module."""
    root = tmp_path_factory.mktemp("builds")
    cache = {}

    def get(name: str):
        if name not in cache:  # a failed build fails every test of that model, built once
            try:
                cache[name] = build(exported[name], root / name)
            except Exception as err:  # noqa: BLE001 - re-raised below, per test
                cache[name] = err
        if isinstance(cache[name], Exception):
            raise cache[name]
        return cache[name]

    return get


def _op_types(model: ModelWrapper) -> set[str]:
    return {n.op_type.removesuffix("_hls").removesuffix("_rtl") for n in model.graph.node}


@needs_finn
@pytest.mark.parametrize("name", list(MODELS))
def test_network_builds_with_proven_widths(built, name):
    result = built(name)
    target = MODELS[name][1]
    count, ops = EXPECTED[name]
    data = json.loads(result.reports["json"].read_text())
    assert data["records"] == count == len(data["layers"]), data["layers"]
    assert len({row["layer"] for row in data["layers"]}) == count  # every layer, once
    for row in data["layers"]:
        assert row["target_bits"] == target and row["bits"] <= target, row
        assert row["bits_exact"] <= row["bits"] <= row["bits_exact"] + 1, row
        assert row["lut_chosen"] <= row["lut_int32"], row
    assert data["totals"]["all_within_target"]
    graph = ModelWrapper(str(result.output_dir / "intermediate_models"
                             / "step_create_dataflow_partition.onnx"))
    present = _op_types(graph)
    assert ops <= present, present
    joins = [n for n in graph.graph.node if n.op_type.startswith(ADD_LAYERS)
             and all(graph.get_initializer(i) is None for i in n.input)]  # not a bias add
    assert len(joins) == {"resnet": 2, "dwsep_residual": 1}.get(name, 0), present
    for node in joins:  # integer adds inside the accelerator
        assert all(graph.get_tensor_datatype(i).is_integer() for i in node.input), node.name


@needs_finn
@pytest.mark.parametrize("name", list(MODELS))
def test_every_threshold_facing_an_integer_is_exact(built, exported, name):
    """Every MultiThreshold after streamlining that faces an integer (an accumulator, or the sum of
    two quantizers' levels at a residual join) has thresholds derived in exact arithmetic from the
    model, none left to FINN's float32 streamlining; each residual join's quantizer is among them
    and is evaluated exactly by the reference too."""
    from finn_flow.verify.exact import ExactModel

    result = built(name)
    nodes = json.loads((result.output_dir / "ties.json").read_text())["nodes"]
    integer = [n for n in nodes if n["stage"] == "integer" and n["input_dtype"] != "FLOAT32"]
    assert integer and all(n["exact"] for n in integer), [(n["node"], n["note"]) for n in integer
                                                          if not n["exact"]]
    exact = ExactModel(ModelWrapper(str(exported[name])))
    assert exact.float32_quantizers == {}
    joins = [layer for layer in exact.layers.values() if layer.chain.join_inputs]
    assert len(joins) == {"resnet": 2, "dwsep_residual": 1}.get(name, 0)


def _input_scale(model: ModelWrapper) -> float:
    quant = model.find_consumer(model.graph.input[0].name)
    assert quant.op_type == "Quant", quant.op_type
    return float(model.get_initializer(quant.input[1]))


def _no_ties(model: ModelWrapper, inputs: np.ndarray, margin: float = 1e-3) -> None:
    """No input value lies within ``margin`` (in quantization steps) of a rounding tie."""
    steps = inputs.astype(np.float64) / _input_scale(model)
    frac = np.abs(steps - np.floor(steps) - 0.5)
    assert frac.min() > margin, "an input lands on a rounding tie of the input quantizer"


def _output_scale(*models: ModelWrapper) -> float:
    """The smallest |scale| of the last constant Mul of the graphs (FINN+: ElementwiseMul in the
    accelerator; upstream: Mul in the parent): one integer step of the outputs."""
    scale = None
    for model in models:
        for node in model.graph.node:
            if node.op_type.split("_")[0] in ("Mul", "ElementwiseMul"):
                consts = [model.get_initializer(i) for i in node.input]
                consts = [c for c in consts if c is not None]
                if consts:
                    scale = float(np.min(np.abs(consts[0])))
    assert scale is not None and scale > 0
    return scale


@needs_finn
@pytest.mark.parametrize("name", list(MODELS))
def test_finn_execution_equals_qonnx(built, exported, name):
    """FINN's Python execution of the dataflow graph it built vs qonnx on the exported model:
    the outputs differ by float rounding only, far less than half an integer step of the output
    (so the integers before the output scale are identical), with the same predicted class."""
    from finn_flow.finn_compat import execute_parent

    result = built(name)
    qonnx_model = ModelWrapper(str(exported[name]))
    inter = result.output_dir / "intermediate_models"
    parent_path = inter / "dataflow_parent.onnx"
    child_path = inter / "step_create_dataflow_partition.onnx"
    parent = ModelWrapper(str(parent_path))
    in_shape = parent.get_tensor_shape(parent.graph.input[0].name)
    out_name = parent.graph.output[0].name
    step = _output_scale(parent, ModelWrapper(str(child_path)))
    sets = {"random": random_inputs(qonnx_model, 6, seed=1),
            "real": load_digits()[1].tensors[0][:6].numpy()}
    for kind, inputs in sets.items():
        _no_ties(qonnx_model, inputs)
        expected = run_qonnx(qonnx_model, inputs)
        if name == "espcn":  # 8x8 in, 16x16 out
            assert inputs.shape[-2:] == (8, 8) and expected.shape[-2:] == (16, 16), expected.shape
        expected = expected.reshape(len(inputs), -1)
        actual = np.stack([execute_parent(str(parent_path), str(child_path), x.reshape(in_shape),
                                          return_full_ctx=True)[out_name]
                           for x in inputs]).reshape(len(inputs), -1)
        diff = float(np.abs(expected - actual).max())
        assert diff < 0.01 * step, (kind, diff, step)
        assert diff <= 1e-5 * float(np.abs(expected).max()), (kind, diff)
        if not MODELS[name][2]:
            assert (expected.argmax(1) == actual.argmax(1)).all(), kind


@needs_finn
def test_plain_model_streamlining_unchanged(built):
    """Our streamlining steps around FINN's ``step_streamline`` change nothing in a feed-forward
    model."""
    inter = built("w8a8_cnn").output_dir / "intermediate_models"
    for ours, before in (("step_a2q_move_scales_past_forks", "step_tidy_up"),
                         ("step_a2q_streamline_residual", "step_streamline")):
        a, b = (ModelWrapper(str(inter / f"{name}.onnx")) for name in (ours, before))
        assert a.graph.SerializeToString() == b.graph.SerializeToString(), ours


def _finn_streamlining_only():
    """FINN's estimate steps with FINN's own ``step_streamline`` under another name, so that
    finn_flow does not add its residual/deconvolution streamlining around it."""
    from finn.builder.build_dataflow_config import estimate_only_dataflow_steps
    from finn.builder.build_dataflow_steps import step_streamline

    def finn_streamline_only(model, cfg):
        return step_streamline(model, cfg)

    return [finn_streamline_only if s == "step_streamline" else s
            for s in estimate_only_dataflow_steps]


@needs_finn
def test_node_without_finn_layer_is_refused_by_name(exported, tmp_path):
    """Without our streamlining the transposed convolution stays a ConvTranspose, which FINN has
    no layer for: the build stops before FINN's dataflow partition (which would fail with
    "partition depends on itself" / "Unsupported/unmapped layer(s)"), naming the node and the fix."""
    with pytest.raises(A2QInputError, match=r"ConvTranspose node '[^']+' \(a transposed conv") as err:
        build(exported["espcn"], tmp_path / "out", steps=_finn_streamlining_only())
    assert "InferPixelPaddingDeconv" in str(err.value)
    assert "step_a2q_streamline_residual" in str(err.value)


@needs_finn
def test_residual_add_without_our_streamlining_is_refused(exported, tmp_path):
    """The issue's failure: with FINN's default streamlining only, the residual branch keeps a
    float input; the build is refused by name (by finn_flow's tie check or its hardware-layer
    check, whichever meets it first), not by FINN's dataflow partition."""
    with pytest.raises(A2QInputError, match=r"(MultiThreshold|Im2Col|MatMul|Mul) '?\w*'?"):
        build(exported["dwsep_residual"], tmp_path / "out", steps=_finn_streamlining_only())


@needs_finn
def test_unquantized_residual_branch_refused_before_finn(tmp_path):
    """An add whose branch output has no activation quantizer: refused before any FINN step,
    naming the Brevitas layers whose outputs meet there."""
    torch.manual_seed(0)
    model = build_dwsep_residual().eval()
    model.blocks[0].shared = [torch.nn.Identity()]
    path = tmp_path / "unshared.onnx"
    export_qonnx(model, load_digits()[0].tensors[0][:1], path)
    with pytest.raises(A2QInputError, match=r"'blocks\.0\.conv2' is not quantized"):
        build(path, tmp_path / "out")
    assert not (tmp_path / "out" / "intermediate_models").exists()


def test_record_without_finn_layer_is_an_error_naming_it():
    """A recorded layer that no MVAU/VVAU matched (left outside the accelerator) fails the
    accumulator step, naming the layer."""
    from finn_flow.steps.pipeline import _check_all_records_matched

    def record(layer, fp):
        return AccumulatorRecord(layer=layer, node=f"{layer}_node", op_type="Conv", weight="w",
                                 output="o", variant="a2q+", target_bits=12, input_bits=4,
                                 input_signed=False, weight_bits=4, out_channels=2, dot_length=9,
                                 fingerprint=fp)

    def widths(layer):
        return LayerWidths(finn_node="MVAU_0", op_type="MVAU_hls", layer=layer, variant="a2q+",
                           target_bits=12, input_datatype="UINT4", weight_datatype="INT4",
                           dot_length=9, out_channels=2, range_min=-5, range_max=5, bits_exact=4,
                           bits_l1_bound=6, bits_datatype=12, finn_datatype="INT6",
                           datatype="INT4")

    records = [record("a", "1"), record("b", "1"), record("c", "2")]
    assert _check_all_records_matched(records[:2], [widths("a")]) == []  # one node finds both
    with pytest.raises(A2QInputError, match=r"'c' \(Conv node 'c_node' at export\)"):
        _check_all_records_matched(records, [widths("a")])
    untargeted = dataclasses.replace(records[2], target_bits=None)  # nothing to check: a note
    assert _check_all_records_matched([*records[:2], untargeted], [widths("a")]) == ["c"]
