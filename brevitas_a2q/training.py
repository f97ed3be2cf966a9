"""Training helpers for models that use this package's quantizers: per-layer accumulator targets,
Euclidean-projection initialization (A2Q+) and the A2Q penalty.

EP-init and the penalty also accept Brevitas's built-in accumulator-aware quantizers
(``Int8AccumulatorAwareWeightQuant``, ``Int8AccumulatorAwareZeroCenterWeightQuant``): they share
the weight-normalization parametrization (``g`` in ``pre_scaling_impl.value``, the learned ``s``),
so the same recipe applies to every accumulator-aware method."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch
from brevitas.core.scaling.pre_scaling import (
    AccumulatorAwareParameterPreScaling,
    AccumulatorAwareZeroCenterParameterPreScaling,
)
from torch import Tensor, nn

from brevitas_a2q.audit import capture_layers, iter_accumulating_layers
from brevitas_a2q.bounds import check_bits, l1_norm_bound
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.pre_scaling import OutputChannelView
from brevitas_a2q.quantizers import is_a2q_proxy

__all__ = [
    "a2q_penalty",
    "accumulator_targets",
    "accuracy",
    "euclidean_projection_init",
    "project_onto_l1_ball",
    "set_accumulator_bit_width",
    "track_accumulator_inputs",
    "train_epochs",
    "train_one_epoch",
]


def _a2q_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer for name, layer in iter_accumulating_layers(model)
            if is_a2q_proxy(layer.weight_quant)}


def _accumulator_aware_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with an A2Q/A2Q+ pre-scaling: this package's quantizers and Brevitas's built-in."""
    return {name: layer for name, layer in iter_accumulating_layers(model)
            if isinstance(getattr(getattr(layer.weight_quant, "tensor_quant", None),
                                  "pre_scaling_impl", None),
                          AccumulatorAwareParameterPreScaling)}


def _is_zero_centered(pre: nn.Module) -> bool:
    return isinstance(pre, AccumulatorAwareZeroCenterParameterPreScaling)


def _target_bits(pre: nn.Module) -> int:
    """The layer's target ``P`` (ours and Brevitas's keep it in ``accumulator_bit_width``)."""
    return int(pre.accumulator_bit_width().item())


def _channel_view(layer: nn.Module) -> OutputChannelView:
    """Output channels of the layer's weight (this package's view for ours, the same layout
    computed from the layer for Brevitas's built-in)."""
    view = getattr(_pre_scaling(layer), "output_channel_view", None)
    if isinstance(view, OutputChannelView):
        return view
    return OutputChannelView(int(getattr(layer, "groups", 1)),
                             bool(getattr(layer, "transposed", False)))


def _record_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a built-in pre-scaling ``forward(weights, input_bit_width, signed)``:
    keeps ``(N, signed)`` and ``P`` as this package's pre-scaling does."""
    module.last_input = (int(float(args[1])), bool(args[2]))
    module.last_accumulator_bits = _target_bits(module)


def track_accumulator_inputs(model: nn.Module) -> int:
    """Make Brevitas's built-in A2Q/A2Q+ layers remember their latest input bit width and sign
    (ours always do), which :func:`a2q_penalty` needs. Idempotent; returns how many layers were
    hooked. Call before the forward pass whose penalty is wanted."""
    hooked = 0
    for layer in _accumulator_aware_layers(model).values():
        pre = _pre_scaling(layer)
        if is_a2q_proxy(layer.weight_quant) or getattr(pre, "_a2q_tracks_input", False):
            continue
        pre.register_forward_pre_hook(_record_input)
        pre._a2q_tracks_input = True
        pre.last_input = None
        hooked += 1
    return hooked


def accumulator_targets(model: nn.Module) -> dict[str, int]:
    """``{layer name: target P}`` of every layer with an A2Q/A2Q+ weight quantizer of this package."""
    return {name: layer.weight_quant.accumulator_bit_width
            for name, layer in _a2q_layers(model).items()}


def set_accumulator_bit_width(
    model: nn.Module, bit_width: int | None = None, overrides: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Set the target accumulator width ``P`` of every A2Q/A2Q+ layer, with per-layer overrides.

    ``bit_width`` applies to all layers (None: keep each layer's own); ``overrides`` maps a layer
    name or an ``fnmatch`` pattern (``"features.*"``) to its ``P`` and wins over ``bit_width``
    (the first matching pattern, in the given order). Every pattern must match some A2Q layer.
    Works on a trained model: the next forward pass uses the new bound. Returns the targets set.
    """
    layers = _a2q_layers(model)
    if not layers:
        raise A2QInputError("the model has no layer with brevitas_a2q.A2QWeightQuant or "
                            "A2QPlusWeightQuant")
    overrides = dict(overrides or {})
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in layers):
            raise A2QInputError(f"accumulator override {pattern!r} matches no A2Q layer; A2Q "
                                f"layers are: {', '.join(layers)}")
    targets = {}
    for name, layer in layers.items():
        bits = next((b for p, b in overrides.items() if fnmatch.fnmatchcase(name, p)), bit_width)
        if bits is not None:
            bits = check_bits(f"accumulator bit width of layer {name!r}", bits)
            impl = layer.weight_quant.tensor_quant.pre_scaling_impl.accumulator_bit_width
            impl.bit_width.fill_(bits)
        targets[name] = layer.weight_quant.accumulator_bit_width
    return targets


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


def _pre_scaling(layer: nn.Module):
    return layer.weight_quant.tensor_quant.pre_scaling_impl


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


def a2q_penalty(model: nn.Module) -> Tensor:
    """A2Q regularizer ``sum_layers sum_c relu(g_c - s_c * T)`` (Colbert et al. 2023, Sec. 5.1).

    It keeps the learned norm ``g`` from drifting above the clamp ``s * T``, where it would get no
    gradient. Uses each layer's input bit width and sign from its latest forward pass; add it to
    the loss with a small weight (the paper uses ~1e-3). Brevitas's built-in A2Q/A2Q+ layers are
    included once :func:`track_accumulator_inputs` has hooked them (``train_one_epoch`` does).
    Plain QAT has no ``g`` and no bound: the penalty does not apply to it.
    """
    terms = []
    for name, layer in _accumulator_aware_layers(model).items():
        pre = _pre_scaling(layer)
        if getattr(pre, "last_input", None) is None:
            hint = ("" if is_a2q_proxy(layer.weight_quant) else
                    " (Brevitas's built-in A2Q layers: call brevitas_a2q.training."
                    "track_accumulator_inputs(model) before the forward pass)")
            raise A2QInputError(f"layer {name!r} has not run a forward pass yet; compute the "
                                f"penalty after the model's forward{hint}")
        bound = float(l1_norm_bound(_target_bits(pre), *pre.last_input, _is_zero_centered(pre)))
        weights = pre.stats_input_view_shape_impl(layer.weight)
        g = pre.restrict_clamp_scaling(pre.value)
        s = pre.scaling_impl(weights)
        terms.append(torch.relu(g - s * bound).sum())
    if not terms:
        raise A2QInputError("the model has no layer with an A2Q/A2Q+ weight quantizer")
    return torch.stack(terms).sum()


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
    penalty_weight: float = 0.0,
    desc: str = "epoch",
    progress: bool = True,
) -> float:
    """One pass of cross-entropy (plus ``penalty_weight * a2q_penalty``) over ``loader``, stepping
    ``schedule`` per batch, with a tqdm bar (on a terminal). Returns the mean loss; leaves the model
    in eval mode."""
    from tqdm.auto import tqdm

    model.train()
    if penalty_weight:
        track_accumulator_inputs(model)
    total = 0.0
    bar = tqdm(loader, desc=desc, disable=None if progress else True, leave=False)
    for x, y in bar:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty_weight:
            loss = loss + penalty_weight * a2q_penalty(model)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        total += loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return total / max(len(loader), 1)


def train_epochs(
    model: nn.Module,
    data: torch.utils.data.Dataset | torch.utils.data.DataLoader,
    epochs: int,
    lr: float = 1e-2,
    batch_size: int = 64,
    penalty_weight: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "epoch",
) -> list[float]:
    """Adam with a cosine schedule over all steps, :func:`train_one_epoch` ``epochs`` times.
    ``data`` is a DataLoader, or a Dataset shuffled in batches of ``batch_size``. Returns the mean
    loss of each epoch and leaves the model in eval mode."""
    loader = data
    if isinstance(data, torch.utils.data.Dataset):
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * len(loader), 1))
    return [train_one_epoch(model, loader, optimizer, schedule, penalty_weight,
                            f"{desc} {epoch + 1}/{epochs}", progress)
            for epoch in range(epochs)]


@torch.no_grad()
def accuracy(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in eval mode on ``dataset``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)
