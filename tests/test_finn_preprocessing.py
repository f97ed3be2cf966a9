"""Affine preprocessing inside the model (``2 * x - 1`` before the input quantizer, as Brevitas's
BNN-PYNQ FC/CNV do in ``forward``) through FINN: FINN absorbs the ops into the input quantizer's
thresholds in float32; the build replaces them by thresholds computed over every float32 input
(the ops in float32, then QONNX's round half to even), so the accelerator equals QONNX on inputs
placed exactly at and just below every threshold, where float32 absorption alone can be off."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from qonnx.core.modelwrapper import ModelWrapper
from torch import nn

from brevitas_a2q import A2QPlusWeightQuant, export_qonnx
from finn_flow import build, finn_available
from finn_flow.steps.input_thresholds import float_input_thresholds, record_input_chains
from finn_flow.steps.ties import quant_levels

FINN_OK, FINN_REASON = finn_available()


class Preprocessed(nn.Module):
    """``2 * x - 1`` -> signed 4-bit input quantizer -> A2Q+ linear (P = 12) -> ReLU4 -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=4,
                                 return_quant_tensor=True)
        self.fc1 = QuantLinear(16, 8, bias=False, weight_quant=A2QPlusWeightQuant,
                               weight_bit_width=4, weight_accumulator_bit_width=12)
        self.act = QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.fc2 = QuantLinear(8, 4, bias=False, weight_quant=A2QPlusWeightQuant,
                               weight_bit_width=4, weight_accumulator_bit_width=12)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.inp(2.0 * x - 1.0))))


def _export(tmp_path) -> ModelWrapper:
    model = Preprocessed().eval()
    x = torch.rand(32, 16)
    with torch.no_grad():
        model(x)
    export_qonnx(model, x[:1], tmp_path / "pre.onnx")
    return ModelWrapper(str(tmp_path / "pre.onnx"))


def test_input_thresholds_are_the_boundaries_of_the_float32_model(tmp_path):
    """Oracle: QONNX's own arithmetic on every float32 at and just below each threshold."""
    model = _export(tmp_path)
    chain = next(iter(record_input_chains(model).values()))
    assert [op for op, _ in chain.ops] == ["Mul", "Sub"] or [op for op, _ in chain.ops] == \
        ["Mul", "Add"]
    t = float_input_thresholds(chain, 1, chain.low, chain.high - chain.low)
    scale = np.float32(chain.scale[0])
    at = quant_levels(chain.apply(t), scale, chain.low, chain.high)
    below = quant_levels(chain.apply(np.nextafter(t, np.float32(-np.inf))), scale, chain.low,
                         chain.high)
    levels = chain.low + 1 + np.arange(t.shape[1])
    np.testing.assert_array_equal(at[0], levels)
    np.testing.assert_array_equal(below[0], levels - 1)


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_preprocessed_model_builds_equal_to_qonnx_at_every_threshold(tmp_path):
    model = _export(tmp_path)
    chain = next(iter(record_input_chains(model).values()))
    t = float_input_thresholds(chain, 1, chain.low, chain.high - chain.low)[0]
    edges = np.concatenate([t, np.nextafter(t, np.float32(-np.inf))])
    rng = np.random.default_rng(0)
    inputs = np.stack([rng.permutation(np.resize(edges, 16)) for _ in range(24)]).astype(np.float32)
    inputs = inputs.reshape(24, 1, 16)
    result = build(tmp_path / "pre.onnx", tmp_path / "out", verify=["hls-arith"],
                   verify_inputs=inputs, random_count=4)
    assert result.verified is True, result.verification_summary()
    ties = json.loads((tmp_path / "out" / "ties.json").read_text())["nodes"]
    assert any(n["exact"] and n["note"].startswith("float input") for n in ties)
