"""Brevitas's BNN-PYNQ FC and CNV (brevitas_examples.bnn_pynq, the models finn-examples builds) as
shipped, through the chain (issue 17): their ``forward`` computes ``2 * x - 1`` before the input
quantizer and their ``QuantIdentity`` layers return plain tensors. They export with a record per
layer (input types read from the graph), FINN absorbs ``2 * x - 1`` into the input thresholds, which
the build recomputes over every float32 input, and the accelerator equals QONNX bit for bit on
hundreds of random and real inputs and on extreme inputs, every layer alone at its accumulator
extremes included. Their weights
are the examples' own quantizers (A2Q needs quantized tensors at run time, which these
``QuantIdentity`` layers do not return), so no layer has a target: every width is FINN's exact
range, checked."""

from __future__ import annotations

import pytest
import torch
from finn_models import assert_hundreds_checked  # tests/ is on sys.path
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q import export_qonnx
from brevitas_a2q.analysis.records import read_records
from brevitas_a2q.train.data import digit_images
from brevitas_a2q.train.shipped import shipped_bnn_pynq
from finn_flow import build, finn_available

FINN_OK, FINN_REASON = finn_available()


def _export(name: str, path) -> ModelWrapper:
    model = shipped_bnn_pynq(name)
    shape = (1, 28, 28) if name.startswith(("tfc", "sfc", "lfc")) else (3, 32, 32)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        model(x)
    export_qonnx(model, x[:1], path)
    return ModelWrapper(str(path))


def test_fc_exports_a_record_per_layer_with_the_graphs_input_types(tmp_path):
    model = _export("tfc_2w2a", tmp_path / "tfc.onnx")
    records = read_records(model)
    assert [r.layer for r in records] == ["features.2", "features.6", "features.10",
                                          "features.14"]
    assert all(r.input_bits == 2 and r.input_signed and r.target_bits is None for r in records)


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
@pytest.mark.parametrize("name", ["tfc_2w2a", "cnv_2w2a"])
def test_shipped_bnn_pynq_model_builds_bit_exact(tmp_path, name):
    _export(name, tmp_path / f"{name}.onnx")
    fc = name.startswith(("tfc", "sfc", "lfc"))
    real = digit_images(200, channels=1 if fc else 3, size=28 if fc else 32).numpy()
    result = build(tmp_path / f"{name}.onnx", tmp_path / "out", verify=["hls-arith"],
                   verify_inputs=real)  # and 100 random, and the extremes
    assert result.verified is True, result.verification_summary()
    assert_hundreds_checked(result)
    assert len(result.layers) == len(read_records(ModelWrapper(str(tmp_path / f"{name}.onnx"))))
