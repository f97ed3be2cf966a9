"""A ResNet-20 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, the CIFAR
network: 3 stages of 3 basic blocks at 16/32/64 channels) built from Brevitas's own
``QuantBasicBlock`` (``brevitas_examples.bnn_pynq.models.resnet``, the block of Brevitas's A2Q
example), adapted to small grayscale images (28x28 Fashion-MNIST): one input channel and a 7x7
final average pool.

Used by the low bit-width accumulator benchmark (Blumenfeld et al., ICLR 2024, evaluate ResNets);
layer names follow Brevitas's ``QuantResNet``: ``conv1``, ``layer<s>.<b>.conv1``/``conv2``/
``downsample.0``, ``fc``.
"""

from __future__ import annotations

from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU, TruncAvgPool2d
from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Int32Bias,
    TruncTo8bit,
)
from torch import Tensor, nn

from brevitas_a2q.train.models import WEIGHT_QUANTIZERS, weight_quant_kwargs

__all__ = ["ResNet20", "build_resnet20"]


class ResNet20(nn.Module):
    """8-bit signed input quantizer -> conv1 (8-bit weights, 3x3) -> BN -> QuantReLU -> 3 stages
    of Brevitas ``QuantBasicBlock`` (stride 1, 2, 2) -> ``TruncAvgPool2d`` (FLOOR to 8 bits, as
    Brevitas's ``QuantResNet``) -> fc (8-bit weights, Int32Bias). ``weight_quant`` is the hidden
    convolutions' weight quantizer (an injector, e.g. ``A2QPlusWeightQuant.let(...)``)."""

    def __init__(self, weight_quant: type, weight_bits: int = 4, act_bits: int = 4,
                 in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64), blocks: int = 3) -> None:
        from brevitas_examples.bnn_pynq.models.resnet import QuantBasicBlock

        super().__init__()
        self.input_quant = QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)
        self.conv1 = QuantConv2d(in_channels, widths[0], 3, padding=1, bias=False,
                                 weight_quant=Int8WeightPerChannelFloat, weight_bit_width=8)
        self.bn1 = nn.BatchNorm2d(widths[0])
        shared = QuantReLU(bit_width=act_bits, return_quant_tensor=True)
        self.relu = shared
        in_planes, stages = widths[0], []
        for stage, planes in enumerate(widths):
            layers = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(QuantBasicBlock(in_planes, planes, stride, bias=False,
                                              shared_quant_act=shared, act_bit_width=act_bits,
                                              weight_bit_width=weight_bits, weight_quant=weight_quant))
                shared, in_planes = layers[-1].relu_out, planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        side = image_size // 2 ** (len(widths) - 1)
        self.final_pool = TruncAvgPool2d(kernel_size=side, trunc_quant=TruncTo8bit,
                                         float_to_int_impl_type="FLOOR")
        self.fc = QuantLinear(widths[-1], num_classes, bias=True, weight_bit_width=8,
                              weight_quant=Int8WeightPerTensorFloat, bias_quant=Int32Bias)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(self.input_quant(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.final_pool(out).flatten(1))


def build_resnet20(quant: str = "none", weight_bits: int = 4, act_bits: int = 4,
                   acc_bits: int | None = None, **kwargs) -> ResNet20:
    """:class:`ResNet20` whose hidden convolutions use the named weight quantizer of
    :data:`~brevitas_a2q.train.models.WEIGHT_QUANTIZERS` (``"none"``: Brevitas's per-channel
    weights, no accumulator constraint) at target ``acc_bits`` where it takes one; the first and
    last layers stay 8-bit and unconstrained. ``kwargs`` go to :class:`ResNet20`."""
    injector = weight_quant_kwargs(quant, weight_bits, acc_bits)["weight_quant"]
    if WEIGHT_QUANTIZERS[quant][1] and acc_bits is not None:
        injector = injector.let(accumulator_bit_width=acc_bits)
    return ResNet20(injector, weight_bits, act_bits, **kwargs)
