"""Euclidean-projection initialization (A2Q+, Colbert et al., ICML 2024, Sec. 4): each output
channel of a pretrained weight projected onto the L1 ball of radius ``s * T`` (Duchi et al.,
2008), ``g = min(g, s * T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from brevitas_a2q.analysis.audit import capture_layers
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.quant.bounds import l1_norm_bound
from brevitas_a2q.train.targets import (
    _accumulator_aware_layers,
    _channel_view,
    _is_zero_centered,
    _pre_scaling,
)


def project_onto_l1_ball(v: Tensor, radius: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the L1 ball of its ``radius`` (Duchi,
    Shalev-Shwartz, Singer, Chandra, "Efficient Projections onto the l1-Ball", ICML 2008, Fig. 1).

    Rows already inside their ball are returned unchanged.
    """
    v = v.reshape(v.shape[0], -1)
    radius = radius.reshape(-1, 1).to(v.dtype)
    u = v.abs().sort(dim=1, descending=True).values
    cssv = u.cumsum(dim=1) - radius
    j = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - cssv / j) > 0).to(v.dtype).mul(j).argmax(dim=1, keepdim=True)
    theta = (cssv.gather(1, rho) / (rho + 1).to(v.dtype)).clamp(min=0)
    projected = v.sign() * (v.abs() - theta).clamp(min=0)
    inside = v.abs().sum(dim=1, keepdim=True) <= radius
    return torch.where(inside, v, projected)


@torch.no_grad()
def euclidean_projection_init(model: nn.Module, example_input: Tensor) -> dict[str, float]:
    """Initialize every A2Q/A2Q+ layer (this package's or Brevitas's built-in) from its current
    (e.g. pretrained float) weights so that the accumulator constraint starts satisfied without
    collapsing channels (A2Q+, Colbert et al. 2024, Sec. 4.1):

    1. ``s = max|w_c| / (2^(M-1) - 1)`` per channel (the A2Q init, from the current weights);
    2. A2Q+ zero-centres each channel (the quantizer does so anyway);
    3. each channel is projected onto the L1 ball of radius ``s * T`` (:func:`project_onto_l1_ball`);
    4. ``g = ||w_c||_1 <= s * T``.

    ``example_input`` gives each layer's input bit width and sign. Returns, per layer, the share of
    channels that had to be projected.
    """
    captures = {c.name: c for c in capture_layers(model, example_input)}
    projected = {}
    layers = _accumulator_aware_layers(model)
    if not layers:
        raise A2QInputError("the model has no layer with an A2Q/A2Q+ weight quantizer (this "
                            "package's or Brevitas's Int8AccumulatorAware*WeightQuant)")
    for name, layer in layers.items():
        cap = captures.get(name)
        if cap is None or cap.input_bits is None:
            raise A2QInputError(f"layer {name!r} saw no quantized input on the example forward pass")
        pre = _pre_scaling(layer)
        weight = layer.weight.detach()
        channels = _channel_view(layer)  # output channels (transposed convs: dim 1, grouped)
        view = channels(weight)
        zero_centered = _is_zero_centered(pre)
        if zero_centered:
            view = view - view.mean(dim=1, keepdim=True)
        scale = view.abs().amax(dim=1) / (2 ** (cap.weight_bits - 1) - 1)
        scale = scale.clamp(min=1e-10)
        if _per_tensor_scale(layer):  # one post-scale for the layer: the largest
            scale = scale.amax().expand_as(scale)
        _set_scales(layer, scale)
        bound = float(l1_norm_bound(cap.target_bits, cap.input_bits, cap.input_signed,
                                    zero_centered))
        radius = scale * bound
        new = project_onto_l1_ball(view, radius)
        projected[name] = float((view.abs().sum(1) > radius).float().mean())
        layer.weight.copy_(channels.unview(new, weight))
        g = new.abs().sum(dim=1).clamp(min=1e-10)
        restrict = pre.restrict_clamp_scaling.restrict_value_impl
        pre.value.copy_(restrict.restrict_init_tensor(g).reshape(pre.value.shape))
    return projected


def _set_scales(layer: nn.Module, scale: Tensor) -> None:
    """Set the learned per-channel scale ``s`` (Brevitas ``ParameterScaling``, log2 domain). Like
    Brevitas's built-in A2Q, the quantizer learns two copies, the one inside the pre-scaling (it
    bounds the integers) and the post-scale (it dequantizes them); both start from ``scale``."""
    tensor_quant = layer.weight_quant.tensor_quant
    for scaling in (tensor_quant.scaling_impl, tensor_quant.pre_scaling_impl.scaling_impl):
        restrict = scaling.restrict_clamp_scaling.restrict_value_impl
        value = scale[:1] if scaling.value.numel() == 1 else scale
        scaling.value.copy_(restrict.restrict_init_tensor(value).reshape(scaling.value.shape))


def _per_tensor_scale(layer: nn.Module) -> bool:
    """True if the layer's post-scale ``s`` is one value (``ScalingPerOutputType.TENSOR``)."""
    return layer.weight_quant.tensor_quant.scaling_impl.value.numel() == 1
