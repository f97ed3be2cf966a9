"""The verification's graph execution (``finn_flow.verify.graph_exec.GraphRunner``: each graph
prepared once, hundreds of inputs through it) gives exactly what qonnx's ``execute_onnx`` and
FINN's ``execute_parent`` give one input at a time: every tensor of the execution context, on
random and extreme inputs, for the QONNX model, FINN's graph before specialization and the
hls-arith dataflow graph of real networks (tests/finn_models.py: a residual CNN with
DuplicateStreams/AddStreams and a depthwise-separable one with a VVAU), and the verification's
results equal those computed with the one-at-a-time execution. Quantization annotations are
sanitized as qonnx sanitizes them (same values, same error).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finn_models import MODELS, trained  # tests/ is on sys.path
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q.export.qonnx import export_qonnx
from brevitas_a2q.train.data import load_digits
from finn_flow import build, finn_available
from finn_flow.verify.inputs import extreme_inputs, random_inputs, run_qonnx

FINN_OK, FINN_REASON = finn_available()


def needs_finn(test):
    """Marks ``finn`` and ``slow``; skipped, naming what is missing, where FINN is not importable."""
    for mark in (pytest.mark.finn, pytest.mark.slow,
                 pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")):
        test = mark(test)
    return test

NETWORKS = ("resnet", "dwsep_residual")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """name -> (QONNX model, build result) with hls-arith verification on 6 random inputs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fast_exec")
    example = load_digits()[0].tensors[0][:1]
    out = {}
    for name in NETWORKS:
        make, _, regression = MODELS[name]
        torch.manual_seed(0)
        path = root / f"{name}.onnx"
        export_qonnx(trained(make(), regression=regression), example, path)
        out[name] = (ModelWrapper(str(path)),
                     build(path, root / name, verify=("hls-arith",), random_count=6))
    return out


def _inputs(model: ModelWrapper) -> np.ndarray:
    return np.concatenate([random_inputs(model, 5, seed=3), extreme_inputs(model)[:4]])


def _assert_same_context(expected: dict, actual: dict) -> None:
    names = [k for k in expected if k and expected[k] is not None]
    assert set(names) <= set(actual), sorted(set(names) - set(actual))
    for name in names:
        e, a = np.asarray(expected[name]), np.asarray(actual[name])
        assert e.shape == a.shape and e.dtype == a.dtype, name
        assert np.array_equal(e, a), name


@needs_finn
@pytest.mark.parametrize("name", NETWORKS)
def test_dataflow_runs_equal_execute_parent_tensor_for_tensor(builds, name, monkeypatch):
    """Every tensor, FINN's graph before specialization (its MVAUs through the 2-D product) and
    the hls-arith graph."""
    from finn_flow.finn_compat import execute_parent
    from finn_flow.verify import graph_exec
    from finn_flow.verify.executors import _Dataflow

    fast = []
    original = graph_exec._exact_mvau
    monkeypatch.setattr(graph_exec, "_exact_mvau",
                        lambda node, context: fast.append(original(node, context)) or fast[-1])

    qonnx_model, result = builds[name]
    out = result.output_dir
    flow = _Dataflow(out)
    children = (flow.reference, out / "verification_output" / "hls_arith_dataflow.onnx")
    inputs = _inputs(qonnx_model)
    for child in children:
        flow.runner.set_partition(child, return_full_context=True)
        for x in inputs:
            expected = execute_parent(flow.parent, str(child), x.reshape(flow.in_shape),
                                      return_full_ctx=True)
            actual = flow.runner.run({flow.in_name: x.reshape(flow.in_shape)},
                                     return_full_context=True)
            _assert_same_context(expected, actual)
    assert fast and all(fast)  # every generic MVAU took the 2-D product


@needs_finn
@pytest.mark.parametrize("name", NETWORKS)
def test_qonnx_runs_equal_execute_onnx(builds, name):
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    qonnx_model, _ = builds[name]
    inputs = _inputs(qonnx_model)
    clean = cleanup_model(qonnx_model)
    in_name = clean.graph.input[0].name
    shape = clean.get_tensor_shape(in_name)
    expected = np.stack([execute_onnx(clean, {in_name: x.reshape(shape)})[clean.graph.output[0].name]
                         for x in inputs])
    actual = run_qonnx(qonnx_model, inputs)
    assert actual.dtype == expected.dtype and np.array_equal(actual, expected)


@needs_finn
@pytest.mark.parametrize("name", NETWORKS)
def test_verification_results_equal_one_at_a_time_execution(builds, name, monkeypatch):
    """The whole hls-arith verification with the prepared runner and with qonnx's/FINN's own
    one-input-at-a-time execution (patched in as the oracle) reports the same results."""
    from qonnx.core.onnx_exec import execute_onnx

    from finn_flow.finn_compat import execute_parent
    from finn_flow.verify import executors
    from finn_flow.verify.executors import reference_outputs, verify_hls_arith

    qonnx_model, result = builds[name]
    out = result.output_dir
    # the specialized dataflow graph the verify step received (and returned unchanged)
    model = ModelWrapper(str(out / "intermediate_models" / "step_a2q_verify_hls_arith.onnx"))
    sets = {"random": random_inputs(qonnx_model, 4, seed=5), "extreme": extreme_inputs(qonnx_model)}
    fast = verify_hls_arith(model, out, sets, qonnx_model,
                            reference_outputs(out, sets, qonnx_model))[0]

    class OneAtATime:
        """FINN's execute_parent / qonnx's execute_onnx per input: the path before GraphRunner."""

        def __init__(self, model):
            self.model = model
            self.child = None

        def set_partition(self, child, return_full_context):
            self.child = str(child)

        def run(self, feed, return_full_context=False):
            if self.child is None:
                return execute_onnx(self.model, feed)
            (x,) = feed.values()
            return execute_parent(str(out / "intermediate_models" / "dataflow_parent.onnx"),
                                  self.child, x, return_full_ctx=True)

    monkeypatch.setattr(executors, "GraphRunner", OneAtATime)
    monkeypatch.setattr("finn_flow.verify.graph_exec.GraphRunner", OneAtATime)  # run_qonnx's
    slow = verify_hls_arith(model, out, sets, qonnx_model,
                            reference_outputs(out, sets, qonnx_model))[0]
    assert [r.to_dict() for r in fast] == [r.to_dict() for r in slow]
    assert all(r.to_dict()["inputs"] for r in fast)


def _relu_graph(annotation: str):
    """x -> Relu -> y -> Relu -> z, x and y annotated with ``annotation`` (qonnx sanitizes both)."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.util.basic import qonnx_make_model

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = ModelWrapper(qonnx_make_model(graph))
    for name in ("x", "y"):
        model.set_tensor_datatype(name, DataType[annotation])
    return model


@pytest.mark.parametrize("values, fails", [
    ([1.0, -2.0, 3.0, 0.0], False),  # allowed by INT4: unchanged
    ([1.0000001, -2.0, 3.0, 0.0], False),  # within qonnx's error threshold: rounded
    ([0.4, -2.0, 3.0, 0.0], True),  # beyond it: qonnx raises
    ([9.0, -2.0, 3.0, 0.0], False),  # out of INT4's range but integer: qonnx lets it through
])
def test_sanitizing_is_qonnx_own(values, fails):
    """The quantization annotations are checked as ``execute_onnx`` checks them: same values
    out, an error where it raises one."""
    from qonnx.core.onnx_exec import execute_onnx

    from finn_flow.verify.graph_exec import GraphRunner

    model = _relu_graph("INT4")
    x = np.asarray([values], dtype=np.float32)
    runner = GraphRunner(model)
    if fails:
        with pytest.raises(Exception, match="Rounding error is too high"):
            execute_onnx(model, {"x": x})
        with pytest.raises(Exception, match="Rounding error is too high"):
            runner.run({"x": x})
        return
    expected = execute_onnx(model, {"x": x}, return_full_exec_context=True)
    actual = runner.run({"x": x}, return_full_context=True)
    for name in ("x", "y", "z"):
        assert np.array_equal(expected[name], actual[name]), name
