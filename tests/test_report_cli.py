"""``a2q report``: exit 0 when targets hold, 1 when violated, 2 with a clear message on bad input
(and no output file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from brevitas.export import export_qonnx as brevitas_export_qonnx
from onnx import TensorProto, helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.basic import qonnx_make_model

from brevitas_a2q import export_qonnx
from brevitas_a2q.cli import main
from brevitas_a2q.train.models import build_mlp

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = build_mlp("brevitas-a2q", acc_bits=12).eval()
    x = torch.rand(4, 1, 8, 8)
    export_qonnx(model, x, root / "ours.onnx")
    brevitas_export_qonnx(model, x, str(root / "theirs.onnx"), dynamo=False)
    return root


def _graph_file(path, op_type, quantized_weight):
    nodes, inits = [], {"w": np.ones((4, 4, 3, 3) if op_type != "MatMul" else (4, 4), np.float32)}
    weight = "w"
    if quantized_weight:
        nodes.append(helper.make_node("Quant", ["w", "s", "z", "b"], ["wq"], name="qw",
                                      domain="qonnx.custom_op.general", signed=1, narrow=0,
                                      rounding_mode="ROUND"))
        inits |= {"s": np.float32(1), "z": np.float32(0), "b": np.float32(4)}
        weight = "wq"
    shape = [1, 4, 5, 5] if op_type != "MatMul" else [1, 4]
    nodes.append(helper.make_node(op_type, ["x", weight], ["y"], name="acc"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ModelWrapper(qonnx_make_model(graph))
    for name, value in inits.items():
        model.set_initializer(name, value)
    model.save(str(path))
    return path


def test_our_export_holds(files, capsys):
    assert main(["report", str(files / "ours.onnx")]) == 0
    out = capsys.readouterr().out
    assert "fc0" in out and "fc1" in out and "ok:" in out


def test_brevitas_export_shows_the_violation(files, capsys):
    # Brevitas's file carries no records: give the target the model was trained for
    assert main(["report", str(files / "theirs.onnx"), "--target", "12"]) == 1
    assert "VIOLATED" in capsys.readouterr().out


def test_json_and_plot(files, tmp_path, capsys):
    png = tmp_path / "widths.png"
    assert main(["report", str(files / "ours.onnx"), "--json", "--plot", str(png)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["all_hold"] and [r["layer"] for r in payload["layers"]] == ["fc0", "fc1"]
    assert all(r["bits_exact_range"] <= r["target_bits"] == 12 for r in payload["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(files / "ours.onnx"), "--plot", str(png)]) == 2  # no overwrite
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not-onnx", "is not an ONNX model"),
    ("float-onnx", "no accumulating node with quantized weights"),
    ("conv-transpose", "ConvTranspose"),  # named, supported or not
    ("bad-target", "--target"),
])
def test_bad_input_exits_2_with_a_message_and_no_output(case, message, files, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    extra = []
    if case == "not-onnx":
        path.write_text("this is not a protobuf\n")
    elif case == "float-onnx":
        _graph_file(path, "MatMul", quantized_weight=False)
    elif case == "conv-transpose":
        _graph_file(path, "ConvTranspose", quantized_weight=True)
    elif case == "bad-target":
        path = files / "ours.onnx"
        extra = ["--target", "fc9=12"]
    png = tmp_path / "out.png"
    assert main(["report", str(path), "--plot", str(png), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not png.exists()
