"""Calibration: activation scales with Brevitas's ``calibration_mode``, and the second moments of
each layer's inputs that the error-correcting rounding needs.

For a Linear/Conv layer with weight rows ``w_c`` (``(out, K)``, :class:`~brevitas_a2q.quant.
channels.OutputChannelView`), the inputs are laid out as ``(n, K)`` patches (``torch.nn.functional.
unfold`` for convolutions, in the weight's ``(in, kh, kw)`` order) and accumulated in float64 as
``H = X~^T X~ / n`` (quantized inputs of the model being quantized) and ``C = X~^T X / n``
(against the float model's inputs to the same layer): GPFQ's mismatched objective
``|| X~ q - X w ||`` (Lybrand & Saab 2021) needs both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError

__all__ = ["InputMoments", "calibrate_activations", "input_moments", "layer_patches"]


def _batches(data: Tensor, batch_size: int) -> Iterable[Tensor]:
    for start in range(0, len(data), batch_size):
        yield data[start:start + batch_size]


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: Tensor, batch_size: int = 128) -> None:
    """Set every activation quantizer's scale from ``data`` with Brevitas's ``calibration_mode``
    (statistics averaged over the batches, weights and activations unquantized meanwhile).
    BatchNorm statistics are left as they are (the model stays in eval mode)."""
    from brevitas.graph.calibrate import calibration_mode

    model.eval()
    with calibration_mode(model):
        for x in _batches(data, batch_size):
            model(x)
    model.eval()


def layer_patches(layer: nn.Module, x: Tensor) -> Tensor:
    """The ``(n, K)`` rows a Linear/Conv1d/Conv2d layer multiplies by its weight rows: ``x`` itself
    (flattened over leading dims) for Linear, unfolded patches for convolutions."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and not getattr(layer, "transposed", False):
        if layer.groups != 1:
            raise A2QInputError(f"grouped convolutions (groups={layer.groups}) are not supported "
                                "by brevitas_a2q.ptq yet")
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise A2QInputError("convolutions with string padding or a padding_mode other than "
                                "'zeros' are not supported by brevitas_a2q.ptq yet")
        two_d = isinstance(layer, nn.Conv2d)
        if not two_d:
            x = x.unsqueeze(2)
        pair = (lambda v: tuple(v)) if two_d else (lambda v: (1, v[0]))
        cols = nn.functional.unfold(x, pair(layer.kernel_size), dilation=pair(layer.dilation),
                                    padding=(pair(layer.padding) if two_d else (0, layer.padding[0])),
                                    stride=pair(layer.stride))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise A2QInputError(f"{type(layer).__name__} is not supported by brevitas_a2q.ptq (Linear, "
                        "Conv1d and Conv2d are)")


class InputMoments:
    """Running ``H = X~^T X~ / n``, ``C = X~^T X / n`` and ``F = X^T X / n`` of one layer, in
    float64."""

    def __init__(self, k: int) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.c = torch.zeros(k, k, dtype=torch.float64)
        self.f = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, quant_rows: Tensor, float_rows: Tensor) -> None:
        xq = quant_rows.to(torch.float64)
        xf = float_rows.to(torch.float64)
        self.h += xq.T @ xq
        self.c += xq.T @ xf
        self.f += xf.T @ xf
        self.n += xq.shape[0]

    @property
    def hessian(self) -> Tensor:
        return self.h / max(self.n, 1)

    @property
    def cross(self) -> Tensor:
        return self.c / max(self.n, 1)

    @property
    def float_hessian(self) -> Tensor:
        return self.f / max(self.n, 1)


def _record_multiplied(layer: nn.Module, store: list) -> list:
    """Hooks storing what ``layer`` multiplies: the output of its ``input_quant`` for a Brevitas
    layer (value of the quant tensor), its input for a float layer."""
    def keep(t) -> None:
        store.append(t.value if hasattr(t, "value") else t)

    if hasattr(layer, "input_quant"):
        return [layer.input_quant.register_forward_hook(lambda m, a, out: keep(out))]
    return [layer.register_forward_pre_hook(lambda m, args: keep(args[0]))]


@torch.no_grad()
def input_moments(quant_model: nn.Module, float_model: nn.Module, name: str, data: Tensor,
                  batch_size: int = 128) -> InputMoments:
    """:class:`InputMoments` of layer ``name``: the quantized model's input to it (with the layers
    before it as they are now, e.g. already quantized) against the float model's."""
    quant_layer = quant_model.get_submodule(name)
    float_layer = float_model.get_submodule(name)
    moments = None
    quant_model.eval()
    float_model.eval()
    for x in _batches(data, batch_size):
        seen_q: list = []
        seen_f: list = []
        handles = _record_multiplied(quant_layer, seen_q) + _record_multiplied(float_layer, seen_f)
        try:
            quant_model(x)
            float_model(x)
        finally:
            for h in handles:
                h.remove()
        if len(seen_q) != 1 or len(seen_f) != 1:
            raise A2QInputError(f"layer {name!r} is called {len(seen_q)} times per forward pass "
                                f"(float model: {len(seen_f)}); brevitas_a2q.ptq needs each "
                                "quantized layer called once")
        xq = layer_patches(quant_layer, seen_q[0])
        xf = layer_patches(float_layer, seen_f[0])
        if moments is None:
            moments = InputMoments(xq.shape[1])
        moments.add(xq, xf)
    return moments
