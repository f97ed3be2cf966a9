"""Sub-pixel convolutions (``PixelShuffle``, ONNX ``DepthToSpace``) through FINN (issue 17):
Brevitas's shipped ESPCN definition with our quantizers swapped in, and a sub-pixel layer with its
own accumulator target.

Oracles: qonnx's execution of the model before and after the rewrite (the rewrite is exact), the
A2Q bound per sub-pixel channel computed here from the exported integer weights, and the build's
verification (hls-arith, bit-exact against FINN's exact execution and QONNX, every MVAU alone at its
reachable accumulator extremes), which a forced width one bit narrower must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brevitas.inject.enum import ScalingPerOutputType
from brevitas.nn import QuantConv2d, QuantIdentity, QuantReLU
from brevitas.quant import Uint8ActPerTensorFloat
from finn_models import assert_hundreds_checked  # tests/ is on sys.path
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.util.cleanup import cleanup_model
from torch import nn

from brevitas_a2q import A2QPlusWeightQuant, export_qonnx
from brevitas_a2q.analysis.records import read_records, weight_fingerprint
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant.bounds import min_accumulator_bits, zero_centered_l1_norm
from brevitas_a2q.train.data import digit_images
from brevitas_a2q.train.shipped import shipped_espcn
from finn_flow import build, finn_available
from finn_flow.steps.subpixel import SubPixelToTransposedConv

FINN_OK, FINN_REASON = finn_available()


class PerTensorA2QPlus(A2QPlusWeightQuant):
    scaling_per_output_type = ScalingPerOutputType.TENSOR


class SubPixelNet(nn.Module):
    """input quantizer -> conv 3x3 (A2Q+, P = 12) -> ReLU4 -> sub-pixel conv 3x3 to 4 channels (A2Q+
    per tensor, P = ``target``, no bias) -> PixelShuffle(2) -> ReLU8: 1x8x8 in, 1x16x16 out."""

    def __init__(self, target: int = 12, bias: bool = False, per_tensor: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        kw = {"weight_bit_width": 4, "return_quant_tensor": False}
        self.inp = QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=8,
                                 return_quant_tensor=True)
        self.conv1 = QuantConv2d(1, 8, 3, padding=1, bias=False, weight_quant=A2QPlusWeightQuant,
                                 weight_accumulator_bit_width=12, **kw)
        self.act = QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
        self.conv2 = QuantConv2d(8, 4, 3, padding=1, bias=bias,
                                 weight_quant=PerTensorA2QPlus if per_tensor else A2QPlusWeightQuant,
                                 weight_accumulator_bit_width=target, **kw)
        self.shuffle = nn.PixelShuffle(2)
        self.out = QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=8)

    def forward(self, x):
        return self.out(self.shuffle(self.conv2(self.act(self.conv1(self.inp(x))))))


def _export(model: nn.Module, shape: tuple[int, ...], path) -> ModelWrapper:
    torch.manual_seed(1)
    x = torch.rand(4, *shape)
    with torch.no_grad():
        model(x)
    export_qonnx(model, x[:1], path)
    return cleanup_model(ModelWrapper(str(path)))


def _int_weights(model: ModelWrapper, node) -> np.ndarray:
    quant = model.find_producer(node.input[1])
    values = model.get_initializer(quant.input[0]).astype(np.float64)
    return np.rint(values / model.get_initializer(quant.input[1]))


def _ints(attr_node, name: str) -> list[int]:
    return list(next(a for a in attr_node.attribute if a.name == name).ints)


def test_rewrite_is_exact_and_the_record_follows(tmp_path):
    """The transposed convolution computes what the sub-pixel convolution did, exactly: on integer
    inputs and the nodes' integer weights (float64, exact), ONNX ConvTranspose with the new node's
    attributes equals Conv + PixelShuffle (torch as the oracle of both). The sub-pixel layer's record
    now names the new node: the union fingerprint of its weights, the same target, one fingerprint
    per sub-pixel channel group; the other records are unchanged."""
    model = _export(SubPixelNet(), (1, 8, 8), tmp_path / "sp.onnx")
    before = {r.layer: r for r in read_records(model)}
    d2s = next(n for n in model.graph.node if n.op_type == "DepthToSpace")
    q_conv = torch.from_numpy(_int_weights(model, model.find_producer(d2s.input[0])))
    converted = model.transform(SubPixelToTransposedConv())
    assert [n.op_type for n in converted.graph.node].count("DepthToSpace") == 0
    deconv = next(n for n in converted.graph.node if n.op_type == "ConvTranspose")
    w = _int_weights(converted, deconv)
    x = torch.randint(0, 16, (5, 8, 8, 8), generator=torch.Generator().manual_seed(0)).double()
    sub_pixel = nn.functional.pixel_shuffle(nn.functional.conv2d(x, q_conv, padding=1), 2)
    pads, strides = _ints(deconv, "pads"), _ints(deconv, "strides")
    assert pads[:2] == pads[2:]
    transposed = nn.functional.conv_transpose2d(x, torch.from_numpy(w), stride=strides,
                                                padding=pads[:2])
    assert torch.equal(transposed, sub_pixel)
    after = {r.layer: r for r in read_records(converted)}
    assert after["conv1"] == before["conv1"]
    rec = after["conv2"]
    assert (rec.node, rec.op_type, rec.out_channels) == (deconv.name, "ConvTranspose", 1)
    assert rec.fingerprint == weight_fingerprint(w.transpose(1, 0, 2, 3).reshape(1, -1))
    assert rec.target_bits == before["conv2"].target_bits == 12
    assert rec.extra["subpixel"]["source_fingerprint"] == before["conv2"].fingerprint
    assert len(rec.extra["subpixel"]["group_fingerprints"]) == 4


@pytest.mark.parametrize("change, needle", [
    ("bias", "has a bias.*bias=False"),
    ("per_channel", "per output channel.*weight_scaling_per_output_channel=False"),
    ("dcr", "mode is DCR"),
])
def test_unconvertible_subpixel_layers_are_refused_by_name(tmp_path, change, needle):
    model = SubPixelNet(bias=change == "bias", per_tensor=change != "per_channel")
    wrapped = _export(model, (1, 8, 8), tmp_path / "sp.onnx")
    d2s = next(n for n in wrapped.graph.node if n.op_type == "DepthToSpace")
    if change == "dcr":
        next(a for a in d2s.attribute if a.name == "mode").s = b"DCR"
    conv = wrapped.find_producer(d2s.input[0])
    with pytest.raises(A2QInputError, match=rf"sub-pixel convolution '{conv.name}'.*{needle}"):
        wrapped.transform(SubPixelToTransposedConv())


def _per_group_bits(q: np.ndarray, idt_bits: int, signed: bool) -> int:
    """The A2Q+ bound's width over the sub-pixel conv's own channels (``q``: ``(C r^2, in, k, k)``),
    each one accumulator's dot product."""
    return max(min_accumulator_bits(l1, idt_bits, signed, zero_centered=True)
               for l1 in zero_centered_l1_norm(q.reshape(q.shape[0], -1)))


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
def test_subpixel_target_is_proven_per_sub_pixel_channel(tmp_path):
    """A target on the sub-pixel layer holds on FINN's lowered MVAU, whose accumulator sums one
    sub-pixel channel's products per output pixel: the width set is within P and equals the
    per-channel exact range, narrower than FINN's own width for the whole union; verification
    (hls-arith, extremes reachable under pixel padding) passes; one bit narrower, forced, fails."""
    path = tmp_path / "sp.onnx"
    model = _export(SubPixelNet(target=12), (1, 8, 8), path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv"
                and model.find_consumers(n.output[0])[0].op_type == "DepthToSpace")
    quant = model.find_producer(conv.input[1])
    q = np.rint(model.get_initializer(quant.input[0]) / model.get_initializer(quant.input[1]))
    result = build(path, tmp_path / "out", verify=["hls-arith"], random_count=8)
    sub = next(w for w in result.layers if w.layer == "conv2")
    assert sub.target_bits == 12 and sub.within_target
    assert sub.bits_l1_bound == _per_group_bits(q, 4, False) <= 12
    assert sub.bits < sub.finn_bits  # FINN sized it for the union of the four channels
    assert sub.extra["subpixel_groups"] == 4
    assert result.verified is True, result.verification_summary()
    forced = build(path, tmp_path / "forced", verify=["hls-arith"], random_count=2,
                   force_accumulator_bits=sub.bits_exact - 1, allow_overflow_demo=True)
    assert forced.verified is False
    forced_sub = next(c for c in forced.layer_extremes if c.node == sub.finn_node)
    assert not forced_sub.ok and forced_sub.wrapped_channels


@pytest.mark.finn
@pytest.mark.slow
@pytest.mark.skipif(not FINN_OK, reason=f"FINN not importable: {FINN_REASON}")
@pytest.mark.parametrize("variant", ["a2q", "a2q+"])
def test_shipped_espcn_builds_and_verifies(tmp_path, variant):
    """Brevitas's QuantESPCN, unedited, our quantizer swapped in: the sub-pixel layer becomes a
    transposed convolution inside the build, every target holds on its FINN node, and the
    accelerator equals QONNX and FINN's exact execution on 100 random, 200 real (digits)
    and extreme inputs."""
    path = tmp_path / "espcn.onnx"
    _export(shipped_espcn(variant), (1, 16, 16), path)
    real = digit_images(200, channels=1, size=16).numpy()
    result = build(path, tmp_path / "out", verify=["hls-arith"], verify_inputs=real)
    by_layer = {w.layer: w for w in result.layers}
    assert set(by_layer) == {"conv1", "conv2", "conv3", "conv4"}
    assert all(w.within_target for w in result.layers if w.target_bits is not None)
    assert by_layer["conv4"].target_bits is None and by_layer["conv4"].extra["subpixel_groups"] == 4
    assert result.verified is True, result.verification_summary()
    assert_hundreds_checked(result)
