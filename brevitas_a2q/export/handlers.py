"""Brevitas export handlers for this package's weight-quantizer proxy (QONNX, ONNX QCDQ, torch
QCDQ).

Brevitas's exporters pick a proxy's handler by exact class, so ours are registered with each
export manager when :mod:`brevitas_a2q.quant.quantizers` is imported.
"""

from __future__ import annotations

from brevitas.export.onnx.qonnx.function import BrevitasBinaryQuantOp, BrevitasQuantOp
from brevitas.export.onnx.qonnx.handler import BrevitasDecoupledWeightQuantWithInputProxyHandler
from brevitas.export.onnx.qonnx.manager import QONNXManager
from brevitas.export.onnx.standard.qcdq.handler import (
    StdQCDQCastONNXDecoupledWeightQuantWithInputProxyHandler,
)
from brevitas.export.onnx.standard.qcdq.manager import StdQCDQONNXManager
from brevitas.export.torch.qcdq.handler import (
    TorchQCDQCastDecoupledWeightQuantWithInputProxyHandler,
)
from brevitas.export.torch.qcdq.manager import TorchQCDQManager
from brevitas.proxy.parameter_quant import DecoupledWeightQuantWithInputProxyFromInjector
from torch import Tensor

from brevitas_a2q.quant.quantizers import A2QWeightQuantProxy

__all__ = ["A2QONNXQCDQWeightHandler", "A2QQONNXWeightHandler", "A2QTorchQCDQWeightHandler",
           "A2QWeightExportHandler"]


class A2QWeightExportHandler(BrevitasDecoupledWeightQuantWithInputProxyHandler):
    """QONNX export handler of :func:`brevitas_a2q.export_qonnx` for our proxy and Brevitas's A2Q
    proxy (Brevitas matches proxies to handlers by exact class): raw float weights behind the Quant
    node, as Brevitas's own handler; :func:`brevitas_a2q.export_qonnx` then places the exact ones.

    The Quant node's parameters come from the weight the layer computed on the exporter's first
    (untraced) forward pass when :func:`export_qonnx` captured it (``proxy._a2q_export_weight``),
    else from one ``quant_weight()`` call (Brevitas's handler makes two): each layer's weights are
    quantized once or twice per export instead of three times.
    """

    handled_layer = (A2QWeightQuantProxy, DecoupledWeightQuantWithInputProxyFromInjector)

    def prepare_for_export(self, module) -> None:
        self.exact_weights = None
        if not module.is_quant_enabled:
            return
        weight = getattr(module, "_a2q_export_weight", None)
        if weight is None:
            weight = module.tracked_module_list[0].quant_weight()
        self.validate(weight.bit_width, weight.zero_point)
        self.symbolic_kwargs = {
            "scale": weight.scale, "zero_point": weight.zero_point,
            "bit_width": weight.bit_width, "narrow_range": module.is_narrow_range,
            "signed": weight.signed, "rounding_mode": "ROUND"}
        self.quant_op = BrevitasBinaryQuantOp if weight.bit_width == 1 else BrevitasQuantOp
        self.exact_weights = weight.value.detach()


class A2QQONNXWeightHandler(A2QWeightExportHandler):
    """Handler registered with Brevitas's ``QONNXManager`` for this package's proxy: the weight
    ``Quant`` node quantizes the layer's exact quantized weights ``q * s`` (from the cached
    quantized input), so ``Quant(q * s) = q * s`` and the file computes what Brevitas computes
    (Brevitas's handler feeds the raw float weights, which ``Quant`` rounds to other integers)."""

    handled_layer = A2QWeightQuantProxy

    def symbolic_execution(self, x: Tensor, *args):
        if self.exact_weights is not None:
            x = self.exact_weights
        return super().symbolic_execution(x, *args)


class A2QTorchQCDQWeightHandler(TorchQCDQCastDecoupledWeightQuantWithInputProxyHandler):
    """Handler registered with Brevitas's ``TorchQCDQManager`` (``export_torch_qcdq``): as for
    Brevitas's A2Q, the integer weights ``q`` are exported, which are exact."""

    handled_layer = A2QWeightQuantProxy


class A2QONNXQCDQWeightHandler(StdQCDQCastONNXDecoupledWeightQuantWithInputProxyHandler):
    """Handler registered with Brevitas's ``StdQCDQONNXManager`` (``export_onnx_qcdq``, which
    needs ``dynamo=False`` for any input-aware A2Q quantizer in Brevitas 0.13): as Brevitas's
    handler for its A2Q, the integer weights ``q`` the layer computes with (from its cached
    quantized input) are stored, followed by ``DequantizeLinear``; they are exact."""

    handled_layer = A2QWeightQuantProxy


def _register(manager, handler) -> None:
    if handler not in manager.handlers:
        manager.handlers = [handler, *manager.handlers]


_register(QONNXManager, A2QQONNXWeightHandler)
_register(TorchQCDQManager, A2QTorchQCDQWeightHandler)
_register(StdQCDQONNXManager, A2QONNXQCDQWeightHandler)
