"""Brevitas's A2Q ResNet18 as shipped (``brevitas_examples.imagenet_classification.a2q``, the
CIFAR-10 network of the A2Q papers), full size, through the chain (issue 17).

The example's ``quant_resnet18_w4a4_a2q_plus_12b`` with this package's A2Q+ quantizer swapped in for
the example's ``CommonIntAccumulatorAwareZeroCenterWeightQuant`` (same attributes), model code
unedited. Its first convolution has plain 8-bit weights and no input quantizer ("the input is
already 8-bit RGB"): it exports with that layer recorded as having no integer input and no target,
FINN builds it only with the input declared as integers (``input_type="UINT8"``, as FINN's own
flows declare image inputs), and then every target is proven on its FINN node, every threshold is
derived exactly (residual joins included), and the accelerator equals the exact evaluation of the
model on 100 random and 100 real inputs and on every layer's accumulator extremes.

The network is untrained and without Euclidean-projection init, so at P = 12 whole layers round to
zero: their FINN thresholds (~1e13, from tiny weight scales) lie far outside the accumulator's
range and are clamped to it exactly (``finn_flow.steps.threshold_matching``), and several layers
with identical (zero) weights each keep their own record.

Oracles: the exact evaluation (:class:`finn_flow.verify.exact.ExactModel`, rational arithmetic)
and qonnx's execution of the exported file; the targets from the model definition.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from finn_models import assert_hundreds_checked  # tests/ is on sys.path
from qonnx.core.modelwrapper import ModelWrapper

from brevitas_a2q import export_qonnx
from brevitas_a2q.analysis.records import read_records
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.train.data import digit_images
from brevitas_a2q.train.shipped import shipped_resnet18
from finn_flow import build, finn_available

FINN_OK, FINN_REASON = finn_available()
TARGET = 12


def real_images(count: int) -> np.ndarray:
    """Digits scaled to 32x32 RGB in 0..255 (integers): real-image inputs for the CIFAR-10
    network."""
    return digit_images(count, channels=3, size=32, peak=255).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = shipped_resnet18("a2q+", acc_bits=TARGET)
    x = torch.from_numpy(real_images(32))
    model.train()
    with torch.no_grad():  # batch-norm statistics and activation scales of real inputs
        model(x)
    model.eval()
    path = tmp_path_factory.mktemp("resnet18") / "resnet18.onnx"
    export_qonnx(model, x[:1], path)
    return path


def test_float_stem_exports_with_its_first_layer_unchecked(exported):
    records = {r.layer: r for r in read_records(ModelWrapper(str(exported)))}
    assert len(records) == 21
    assert records["conv1"].input_bits is None and records["conv1"].target_bits is None
    assert records["linear"].target_bits is None  # 8-bit classifier, by the example's design
    hidden = [r for name, r in records.items() if name not in ("conv1", "linear")]
    assert all(r.target_bits == TARGET and r.input_bits == 4 for r in hidden)


@pytest.mark.finn
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_float_stem_without_an_input_type_is_refused_naming_the_option(exported, tmp_path):
    with pytest.raises(A2QInputError, match="--input-type"):
        build(exported, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_shipped_resnet18_builds_proven_and_equal_to_the_exact_model(exported, tmp_path):
    from finn_flow.options import declare_input_type
    from finn_flow.verify.exact import ExactModel

    result = build(exported, tmp_path / "out", input_type="UINT8", verify=["hls-arith"],
                   verify_inputs=real_images(100))
    assert len(result.layers) == len({w.layer for w in result.layers}) == 21  # each its own
    for layer in result.layers:
        if layer.target_bits is not None:
            assert layer.within_target and layer.bits <= TARGET, layer
    assert {w.layer for w in result.layers if w.target_bits is None} == {"conv1", "linear"}
    assert result.verified is True, result.verification_summary()
    assert_hundreds_checked(result, real=100)
    ties = json.loads((result.output_dir / "ties.json").read_text())["nodes"]
    integer = [n for n in ties if n["stage"] == "integer" and n["input_dtype"] != "FLOAT32"]
    assert len(integer) == 28 and all(n["exact"] for n in integer), \
        [(n["node"], n["note"]) for n in integer if not n["exact"]]
    declared = ModelWrapper(str(exported))
    declare_input_type(declared, "UINT8")  # what the build evaluated exactly
    exact = ExactModel(declared)
    assert exact.float32_quantizers == {}
    assert sum(1 for layer in exact.layers.values() if layer.chain.join_inputs) == 8
