"""Digits-sized networks of the kinds the A2Q papers build with FINN, for tests/test_finn_networks.py.

* :func:`build_resnet` — ResNet-style CNN, a stem and ``blocks`` residual blocks (two 3x3 convs per
  block), P = 12;
* :func:`build_dwsep_residual` — depthwise-separable CNN (3x3 depthwise + 1x1 pointwise) with a
  residual add, P = 12;
* :func:`build_espcn` — ESPCN-style super-resolution, 8x8 in, 16x16 out, upscaling by a transposed
  convolution (stride 2), P = 13;
* :func:`build_w8a8_cnn` — the package's CNN at 8-bit weights and activations, P = 16.

Residual adds follow what FINN needs: both inputs of an add leave *one* activation quantizer (the
same Brevitas module, so the same scale), and the sum goes into the next activation quantizer.
:func:`trained` trains any of them briefly on digits after Euclidean-projection init.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantIdentity, QuantLinear, QuantReLU
from brevitas.quant import Int8ActPerTensorFloat, Uint8ActPerTensorFloat
from torch import nn

from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.ep_init import euclidean_projection_init
from brevitas_a2q.train.models import build_cnn, weight_quant_kwargs

__all__ = ["MODELS", "build_dwsep_residual", "build_espcn", "build_resnet", "build_w8a8_cnn",
           "assert_hundreds_checked", "espcn_data", "trained"]


def _act(bits: int = 4) -> QuantReLU:
    return QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=bits, return_quant_tensor=True)


def _input_quant() -> QuantIdentity:
    return QuantIdentity(act_quant=Int8ActPerTensorFloat, return_quant_tensor=True)


def _conv(cin: int, cout: int, k: int, quant: str, acc_bits: int, weight_bits: int = 4,
          groups: int = 1) -> QuantConv2d:
    return QuantConv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False,
                       **weight_quant_kwargs(quant, weight_bits, acc_bits))


class ResidualBlock(nn.Module):
    """``out = act_out(x + shared(bn2(conv2(act1(bn1(conv1(x)))))))``, where ``shared`` is the
    quantizer that produced ``x`` (passed in, not owned), so both add inputs have one scale."""

    def __init__(self, channels: int, shared: QuantReLU, quant: str, acc_bits: int,
                 depthwise: bool = False) -> None:
        super().__init__()
        if depthwise:  # 3x3 depthwise then 1x1 pointwise
            self.conv1 = _conv(channels, channels, 3, quant, acc_bits, groups=channels)
            self.conv2 = _conv(channels, channels, 1, quant, acc_bits)
        else:
            self.conv1 = _conv(channels, channels, 3, quant, acc_bits)
            self.conv2 = _conv(channels, channels, 3, quant, acc_bits)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.act1 = _act()
        self.shared = [shared]  # a list: not registered twice as a submodule
        self.act_out = _act()

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.shared[0](self.bn2(self.conv2(y)))
        return self.act_out(x + y)


class ResidualNet(nn.Module):
    """input quantizer -> stem conv 3x3 -> BN -> act -> residual blocks -> MaxPool 2 -> flatten ->
    QuantLinear (digits: 1x8x8 in, 10 classes)."""

    def __init__(self, quant: str, acc_bits: int, channels: int, blocks: int,
                 depthwise: bool) -> None:
        super().__init__()
        self.input_quant = _input_quant()
        self.stem = _conv(1, channels, 3, quant, acc_bits)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.stem_act = _act()
        acts = [self.stem_act]
        layers = []
        for _ in range(blocks):
            layers.append(ResidualBlock(channels, acts[-1], quant, acc_bits, depthwise))
            acts.append(layers[-1].act_out)
        self.blocks = nn.ModuleList(layers)
        self.pool, self.flatten = nn.MaxPool2d(2), nn.Flatten()
        self.fc = QuantLinear(channels * 16, 10, bias=True,
                              **weight_quant_kwargs(quant, 4, acc_bits))

    def forward(self, x):
        x = self.stem_act(self.stem_bn(self.stem(self.input_quant(x))))
        for block in self.blocks:
            x = block(x)
        return self.fc(self.flatten(self.pool(x)))


def build_resnet(quant: str = "a2q+", acc_bits: int = 12, channels: int = 8,
                 blocks: int = 2) -> ResidualNet:
    """ResNet-style CNN: stem and ``blocks`` residual blocks of two 3x3 convs."""
    return ResidualNet(quant, acc_bits, channels, blocks, depthwise=False)


def build_dwsep_residual(quant: str = "a2q+", acc_bits: int = 12, channels: int = 8,
                         blocks: int = 1) -> ResidualNet:
    """Depthwise-separable CNN: stem and ``blocks`` residual blocks of a 3x3 depthwise and a 1x1
    pointwise conv."""
    return ResidualNet(quant, acc_bits, channels, blocks, depthwise=True)


class ESPCN(nn.Module):
    """ESPCN-style super-resolution, upscale 2: input quantizer -> conv 3x3 (1->c) -> BN -> act ->
    conv 3x3 (c->c) -> BN -> act -> transposed conv (c->1, kernel 4, stride 2, padding 1):
    1x8x8 in, 1x16x16 out."""

    def __init__(self, quant: str = "a2q+", acc_bits: int = 13, channels: int = 8,
                 deconv_quant: str | None = None) -> None:
        super().__init__()
        self.input_quant = _input_quant()
        self.conv1 = _conv(1, channels, 3, quant, acc_bits)
        self.bn1, self.act1 = nn.BatchNorm2d(channels), _act()
        self.conv2 = _conv(channels, channels, 3, quant, acc_bits)
        self.bn2, self.act2 = nn.BatchNorm2d(channels), _act()
        self.deconv = QuantConvTranspose2d(
            channels, 1, 4, stride=2, padding=1, bias=False,
            **weight_quant_kwargs(deconv_quant or quant, 4, acc_bits))

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(self.input_quant(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.deconv(x)


def build_espcn(quant: str = "a2q+", acc_bits: int = 13, channels: int = 8,
                deconv_quant: str | None = None) -> ESPCN:
    """ESPCN-style network at P = ``acc_bits``; ``deconv_quant`` another quantizer for the
    transposed convolution (e.g. ``"brevitas-a2q+"``)."""
    return ESPCN(quant, acc_bits, channels, deconv_quant)


def build_w8a8_cnn(quant: str = "a2q+", acc_bits: int = 16) -> nn.Module:
    """The package's CNN (:func:`brevitas_a2q.train.models.build_cnn`) with 8-bit weights and
    activations."""
    return build_cnn(quant, weight_bits=8, act_bits=8, acc_bits=acc_bits, channels=(4, 8))


def espcn_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits training images (1x8x8 in [0, 1]) and their bilinear 16x16 upscalings as targets."""
    x = load_digits()[0].tensors[0]
    return x, nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def trained(model: nn.Module, steps: int = 60, regression: bool = False,
            seed: int = 0) -> nn.Module:
    """``model`` after Euclidean-projection init and ``steps`` Adam steps (batch 64) on digits:
    classification (cross-entropy) or, with ``regression``, 2x upscaling (MSE,
    :func:`espcn_data`). Returns it in eval mode."""
    torch.manual_seed(seed)
    if regression:
        x, y = espcn_data()
        loss_fn: Callable = nn.functional.mse_loss
    else:
        x, y = load_digits()[0].tensors
        loss_fn = nn.functional.cross_entropy
    euclidean_projection_init(model, x[:1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def trained_on_digits(model: nn.Module, a2q: bool, steps: int = 60) -> nn.Module:
    """``steps`` Adam steps (batch 64, shuffled with seed 0) of digits classification; A2Q layers
    start from the Euclidean-projection init (without it, narrow targets can round whole layers to
    zero). The fixtures of tests/test_finn_flow_finn.py and tests/test_finn_verify.py."""
    torch.manual_seed(0)
    train, _ = load_digits()
    if a2q:
        euclidean_projection_init(model, train.tensors[0][:1])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    for step, (x, y) in enumerate(loader):
        if step >= steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


# name -> (builder, target P, regression)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, bool]] = {
    "resnet": (lambda: build_resnet(acc_bits=12), 12, False),
    "dwsep_residual": (lambda: build_dwsep_residual(acc_bits=12), 12, False),
    "espcn": (lambda: build_espcn(acc_bits=13), 13, True),
    "w8a8_cnn": (lambda: build_w8a8_cnn(acc_bits=16), 16, False),
}


def assert_hundreds_checked(result, real: int = 200) -> None:
    """The build verified 100 random and ``real`` real inputs bit for bit against the exact
    model."""
    counts = {v.kind: (v.inputs, v.matched, v.reference) for v in result.verification}
    assert counts["random"] == (100, 100, "exact") and counts["real"] == (real, real, "exact"), counts
