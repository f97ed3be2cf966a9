"""Brevitas's own example networks, as shipped in ``brevitas_examples``, with this package's A2Q/A2Q+
weight quantizers swapped in where the example takes a weight quantizer; the model code unedited.

* :func:`shipped_espcn` — ``super_resolution/models/espcn.py`` ``QuantESPCN`` (sub-pixel
  convolution, the network of the A2Q papers' super-resolution results and of Xilinx/finn#1088);
* :func:`shipped_resnet18` — ``imagenet_classification/a2q/resnet.py`` ``quant_resnet18`` (the
  CIFAR-10 ResNet18 of the A2Q papers; float stem: its first convolution has no input quantizer);
* :func:`shipped_bnn_pynq` — ``bnn_pynq/models`` FC/CNV (the networks finn-examples builds), whose
  ``QuantIdentity`` layers return plain tensors, so their weights keep the examples' own quantizers.

Each swapped-in quantizer carries the attributes of the example's own accumulator-aware quantizer
(:func:`as_shipped`), so that only the quantizer's implementation differs. Used by the FINN tests
of these networks and by ``benchmarks/shipped_networks.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from brevitas_a2q.quant.quantizers import A2QPlusWeightQuant, A2QWeightQuant

__all__ = ["as_shipped", "shipped_bnn_pynq", "shipped_espcn", "shipped_resnet18"]

_QUANTIZERS = {"a2q": A2QWeightQuant, "a2q+": A2QPlusWeightQuant}


def _quantizer(variant: str) -> type:
    if variant not in _QUANTIZERS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, _QUANTIZERS))}, got {variant!r}")
    return _QUANTIZERS[variant]


def as_shipped(base: type, **attributes) -> type:
    """``base`` (one of our quantizers) with the example quantizer's ``attributes`` set: the
    examples' ``CommonIntAccumulatorAware*WeightQuant`` take their bit width from the layer
    (``bit_width = None``) and set their own scaling restriction / minimum."""
    return type(f"Shipped{base.__name__}", (base,), {"bit_width": None, **attributes})


def shipped_espcn(variant: str = "a2q+", acc_bits: int = 13, weight_bits: int = 4,
                  act_bits: int = 4, seed: int = 0) -> nn.Module:
    """``QuantESPCN(upscale_factor=2, num_channels=1)`` as the example builds it (conv1's
    accumulator at 32 bits and the sub-pixel conv4 plain per-tensor 8-bit, by its design; P =
    ``acc_bits`` on conv2 and conv3), our ``variant`` quantizer with the attributes of the example's
    ``CommonIntAccumulatorAwareWeightQuant`` (float scale restriction)."""
    from brevitas.core.restrict_val import FloatRestrictValue
    from brevitas_examples.super_resolution.models.espcn import QuantESPCN

    torch.manual_seed(seed)
    quant = as_shipped(_quantizer(variant), restrict_scaling_impl=FloatRestrictValue)
    return QuantESPCN(upscale_factor=2, num_channels=1, weight_bit_width=weight_bits,
                      act_bit_width=act_bits, acc_bit_width=acc_bits, weight_quant=quant).eval()


def shipped_resnet18(variant: str = "a2q+", acc_bits: int = 12, seed: int = 0) -> nn.Module:
    """The example zoo's ``quant_resnet18_w4a4_<variant>_<acc_bits>b`` (``quant_resnet18``, W4A4,
    P = ``acc_bits`` on every hidden layer; the first convolution 8-bit per channel on the raw
    input, the classifier 8-bit), our ``variant`` quantizer with the attributes of the example's
    ``CommonIntAccumulatorAware(ZeroCenter)WeightQuant``."""
    from brevitas_examples.imagenet_classification.a2q.quant import SCALING_MIN_VAL
    from brevitas_examples.imagenet_classification.a2q.resnet import quant_resnet18

    torch.manual_seed(seed)
    quant = as_shipped(_quantizer(variant), scaling_min_val=SCALING_MIN_VAL)
    return quant_resnet18(act_bit_width=4, acc_bit_width=acc_bits, weight_bit_width=4,
                          weight_quant=quant)


def shipped_bnn_pynq(name: str = "tfc_2w2a", seed: int = 0) -> nn.Module:
    """``model_with_cfg(name)`` from ``brevitas_examples.bnn_pynq.models`` (untrained), with the
    examples' own quantizers: their activation layers return plain tensors, which A2Q's run-time
    bound needs as quantized tensors, so no layer has an accumulator target."""
    from brevitas_examples.bnn_pynq.models import model_with_cfg

    torch.manual_seed(seed)
    model, _ = model_with_cfg(name, pretrained=False)
    return model.eval()
