"""Brevitas layers under a simulated accumulator: :func:`simulate_accumulators` patches each
quantized Linear/Conv layer's ``inner_forward_impl`` for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.sim.chain import _int_range, _wrap
from brevitas_a2q.sim.config import AccumulatorConfig, parse_accumulator
from brevitas_a2q.sim.gradients import integer_codes, simulate_integer_forward, simulate_matmul
from brevitas_a2q.sim.stats import LayerStats, SimulationStats


def _layer_k(layer: nn.Module) -> int:
    return int(layer.weight[0].numel())


def _unsupported(layer: nn.Module, cfg: AccumulatorConfig) -> str | None:
    """Why ``layer`` cannot be simulated with ``cfg``, or None."""
    if not isinstance(layer, (QuantLinear, QuantConv1d, QuantConv2d)):
        return f"{type(layer).__name__} is not supported (QuantLinear, QuantConv1d/2d are)"
    if cfg.is_wrap or isinstance(layer, QuantLinear):
        return None
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} is not supported (only 'zeros')"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding={layer.padding!r} is not supported by {cfg.spec} (give explicit padding)"
    return None


def _to_matrix(layer: nn.Module, x: Tensor) -> tuple[Tensor, tuple]:
    """Input ``x`` as rows of dot-product operands (R, K); also what :func:`_from_matrix` needs."""
    if isinstance(layer, QuantLinear):
        return x.reshape(-1, x.shape[-1]), ("linear", x.shape[:-1])
    if isinstance(layer, QuantConv1d):
        x4 = x.unsqueeze(-2)
        kernel, stride = (1, layer.kernel_size[0]), (1, layer.stride[0])
        dilation = (1, layer.dilation[0])
        padding = (0, 0) if layer.padding == "valid" else (0, layer.padding[0])
    else:
        x4, kernel, stride, dilation = x, layer.kernel_size, layer.stride, layer.dilation
        padding = (0, 0) if layer.padding == "valid" else tuple(layer.padding)
    size = [(x4.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i]
            + 1 for i in range(2)]
    rows = _Unfold.apply(x4, kernel, stride, dilation, padding, size)
    one_d = isinstance(layer, QuantConv1d)
    return rows, ("conv", x4.shape[0], size, one_d)


def _window(padded: Tensor, i: int, j: int, stride, dilation, size) -> Tensor:
    """The (B, C, *size) view of a padded input that kernel offset ``(i, j)`` reads."""
    h0, w0 = i * dilation[0], j * dilation[1]
    return padded[:, :, h0:h0 + stride[0] * (size[0] - 1) + 1:stride[0],
                  w0:w0 + stride[1] * (size[1] - 1) + 1:stride[1]]


def _im2col(x4: Tensor, kernel, stride, dilation, padding, size) -> Tensor:
    """``F.unfold``'s columns as rows (B * L, C * kh * kw), in its order, for any dtype (int8
    included): one copy of a channels-last slice per kernel offset, several times faster than
    unfold and a transpose for the layers of the benchmarks (:class:`_Unfold` differentiates
    it)."""
    xp = F.pad(x4, (padding[1], padding[1], padding[0], padding[0]))
    batch, channels = xp.shape[:2]
    out = xp.new_empty(batch, size[0], size[1], channels, kernel[0], kernel[1])
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            out[..., i, j] = _window(xp, i, j, stride, dilation, size).permute(0, 2, 3, 1)
    return out.reshape(-1, channels * kernel[0] * kernel[1])


def _fold_rows(rows: Tensor, x_shape, kernel, stride, dilation, padding, size) -> Tensor:
    """The adjoint of :func:`_im2col` (``F.fold`` of the rows' columns): each kernel offset's
    slice added into its window of a zero padded input, then the padding cut off. For each
    input value the contributions are added in kernel-offset order, as ``col2im`` adds them."""
    batch, channels, height, width = x_shape
    g6 = rows.reshape(batch, size[0], size[1], channels, kernel[0], kernel[1])
    out = rows.new_zeros(batch, channels, height + 2 * padding[0], width + 2 * padding[1])
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            _window(out, i, j, stride, dilation, size).add_(g6[..., i, j].permute(0, 3, 1, 2))
    return out[:, :, padding[0]:padding[0] + height, padding[1]:padding[1] + width]


class _Unfold(torch.autograd.Function):
    """``F.unfold``'s columns as rows, differentiable: forward :func:`_im2col`, backward its
    adjoint :func:`_fold_rows`. Unlike ``F.unfold`` and a transposed copy, it makes one
    (B * L, K) array in the forward pass and none in the backward pass."""

    @staticmethod
    def forward(ctx, x4, kernel, stride, dilation, padding, size):
        ctx.geometry = (x4.shape, kernel, stride, dilation, padding, size)
        return _im2col(x4, kernel, stride, dilation, padding, size)

    @staticmethod
    def backward(ctx, g):
        return _fold_rows(g, *ctx.geometry), None, None, None, None, None


def _from_matrix(y: Tensor, info: tuple) -> Tensor:
    if info[0] == "linear":
        return y.reshape(*info[1], y.shape[-1])
    _, batch, size, one_d = info
    out = y.reshape(batch, size[0] * size[1], -1).transpose(1, 2).reshape(batch, -1, *size)
    return out.squeeze(-2) if one_d else out


def _integers(name: str, what: str, value: Tensor, scale: Tensor) -> Tensor:
    """``round(value / scale)`` in ``value``'s type, checked to be within 1e-3 of the quotient
    (an error names the layer where it is not)."""
    quotient = value.detach() / scale.detach()
    rounded = torch.round(quotient)
    off = float(quotient.sub_(rounded).abs_().max()) if quotient.numel() else 0.0
    if off > 1e-3:
        raise A2QInputError(f"layer {name!r}: the {what} is not on an integer grid (value/scale "
                            f"is off by {off:.3g}); cannot simulate its integer accumulator")
    return rounded


def _simulated_forward(name: str, layer: nn.Module, cfg: AccumulatorConfig,
                       stats: LayerStats):
    """A replacement for ``layer.inner_forward_impl`` that accumulates through ``cfg``."""
    exact_impl = type(layer).inner_forward_impl

    def inner_forward_impl(x, quant_weight, quant_bias):
        if not isinstance(x, IntQuantTensor) or not isinstance(quant_weight, IntQuantTensor):
            what = "input" if not isinstance(x, IntQuantTensor) else "weight"
            raise A2QInputError(
                f"layer {name!r}: its {what} is not an integer-quantized tensor, so there is no "
                f"integer accumulation to simulate. Give the layer input_quant=... (or make the "
                f"layer before it return_quant_tensor=True) and an integer weight quantizer, or "
                f"exclude it with an override {{{name!r}: None}}.")
        if x.scale.numel() != 1:
            raise A2QInputError(f"layer {name!r}: the input scale is not per tensor "
                                f"(shape {tuple(x.scale.shape)}); cannot simulate one integer "
                                "accumulation per output")
        xv, wv = x.value, quant_weight.value
        out_channels = wv.shape[0]
        x_scale = x.scale.reshape(())
        w_scale = quant_weight.scale.reshape(-1).expand(out_channels) \
            if quant_weight.scale.numel() in (1, out_channels) else None
        if w_scale is None:
            raise A2QInputError(f"layer {name!r}: weight scale of shape "
                                f"{tuple(quant_weight.scale.shape)} is neither per tensor nor "
                                "per output channel")
        xq = _integers(name, "input", xv, x.scale)
        wq = _integers(name, "weight", wv, quant_weight.scale)
        if cfg.is_wrap:
            y = _wrap_layer(layer, exact_impl, xv, wv, x_scale, w_scale, cfg, stats, xq, wq)
        else:
            y = _chain_layer(layer, xv, wv, x_scale, w_scale, cfg, stats, (xq, wq))
        bias = quant_bias.value if isinstance(quant_bias, QuantTensor) else quant_bias
        if bias is not None:
            y = y + bias.reshape(_channel_shape(layer, y.dim()))
        if layer.return_quant_tensor and not layer.output_quant.is_quant_enabled:
            if cfg.kind != "int" or bias is not None:
                raise A2QInputError(f"layer {name!r} returns a quant tensor without an output "
                                    f"quantizer; {cfg.spec} with a bias or a float accumulator "
                                    "gives values off the integer grid. Give it output_quant=...")
            scale = (x_scale * w_scale).reshape(_channel_shape(layer, y.dim()))
            return IntQuantTensor(y, scale, torch.zeros((), device=y.device), cfg.bits, True,
                                  layer.training)
        return y

    return inner_forward_impl


def _channel_shape(layer: nn.Module, dims: int) -> tuple[int, ...]:
    """The shape that lays a per-output-channel vector along a layer's output of ``dims``
    dimensions: the last one for a linear layer (any leading dimensions), the second for a
    convolution."""
    if isinstance(layer, QuantLinear):
        return (1,) * (dims - 1) + (-1,)
    return (1, -1) + (1,) * (dims - 2)


def _wrap_layer(layer, exact_impl, xv, wv, x_scale, w_scale, cfg, stats, xi, wi) -> Tensor:
    """Wraparound: the exact integer convolution/linear of the input's and weights' integers
    ``xi``, ``wi`` (float32 when every partial sum is below 2^24 in magnitude, else float64),
    wrapped mod 2^P. Costs about one plain forward pass."""
    with torch.no_grad():
        bound = float(xi.abs().max()) * float(wi.reshape(wi.shape[0], -1).abs().sum(1).max())
        dtype = torch.float32 if bound < 2**24 else torch.float64
        exact = exact_impl(layer, xi.to(dtype), wi.to(dtype), None)
        lo, hi = _int_range(cfg.bits)
        if bound <= hi:  # no dot product can leave the P-bit range
            over = None
        else:
            over = (exact < lo) | (exact > hi)
            if bool(over.any()):
                exact[over] = _wrap(exact[over].double(), cfg.bits)[0].to(dtype)
        shape = _channel_shape(layer, exact.dim())
        y = (exact * (x_scale * w_scale).to(dtype).reshape(shape)).to(xv.dtype)
    n_over = 0 if over is None else int(over.sum())
    stats.outputs += exact.numel()
    stats.additions += exact.numel() * _layer_k(layer)
    stats.overflow_outputs += n_over
    stats.overflow_events += n_over
    if not (torch.is_grad_enabled() and (xv.requires_grad or wv.requires_grad)):
        return y
    real = exact_impl(layer, xv, wv, None)
    ste = real + (y - real).detach()
    if cfg.gradient == "ste" or over is None:
        return ste
    return torch.where(over, y, ste)


def _conv_geometry(layer: nn.Module) -> tuple[list, list, list, int]:
    """``(stride, padding, dilation, groups)`` of a QuantConv1d/2d, as lists."""
    padding = [0] * len(layer.kernel_size) if layer.padding == "valid" else list(layer.padding)
    return list(layer.stride), padding, list(layer.dilation), layer.groups


class _LayerSTE(torch.autograd.Function):
    """The identity STE of a whole layer (Blumenfeld et al., ICLR 2024, Sec. 4): forward, the
    simulated output (given); backward, the exact layer's gradient, from its input and weight
    (``convolution_backward`` for a convolution), so that the unfolded input is neither kept
    nor differentiated."""

    @staticmethod
    def forward(ctx, x, w, y_sim, geometry):
        ctx.geometry = geometry
        ctx.save_for_backward(x, w)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if ctx.geometry is None:  # linear
            gx = g @ w if need_x else None
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if need_w else None
            return gx, gw, None, None
        stride, padding, dilation, groups = ctx.geometry
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g.contiguous(), x, w, None, stride, padding, dilation, False, [0] * len(stride),
            groups, [need_x, need_w, False])
        return gx, gw, None, None


def _chain_layer(layer, xv, wv, x_scale, w_scale, cfg, stats, rounded) -> Tensor:
    """Saturating / floating-point: the sequential chain in matrix form, per group, with the
    identity STE (:class:`_LayerSTE`) or the fine-grained gradients of
    :func:`simulate_matmul`. An integer accumulator unfolds the input's integers (found before
    unfolding: K times fewer divisions than over the unfolded rows, and no float temporaries of
    the rows' size), and its values only where a fine-grained gradient needs them.
    ``rounded``: ``round(value / scale)`` of the input and the weight (:func:`_integers`)."""
    grad = torch.is_grad_enabled() and (xv.requires_grad or wv.requires_grad)
    if grad and cfg.gradient == "ste":
        with torch.no_grad():
            y = _chain_layer(layer, xv, wv, x_scale, w_scale, cfg, stats, rounded)
        geometry = None if isinstance(layer, QuantLinear) else _conv_geometry(layer)
        return _LayerSTE.apply(xv, wv, y, geometry)
    xq, wq = rounded
    codes = integer_codes(xv, x_scale, xq) if cfg.kind == "int" else None
    values = grad or codes is None  # (a fine-grained gradient, or a float accumulator)
    code_rows, info = _to_matrix(layer, codes) if codes is not None else (None, None)
    rows, info = _to_matrix(layer, xv) if values else (None, info)
    groups = getattr(layer, "groups", 1)
    k_group = _layer_k(layer)
    o_group = wv.shape[0] // groups
    parts = []
    for g in range(groups):
        cols = slice(g * k_group, (g + 1) * k_group)
        sl = slice(g * o_group, (g + 1) * o_group)
        wg = wv[sl].reshape(o_group, -1)
        xc = None if code_rows is None else code_rows[:, cols].contiguous()
        if values:
            y, chain = simulate_matmul(rows[:, cols], wg, x_scale, w_scale[sl], cfg, xc)
        else:
            y, chain = simulate_integer_forward(xc, wg, x_scale, w_scale[sl], cfg, xv.dtype,
                                                wq[sl].reshape(o_group, -1))
        parts.append(y)
        stats.outputs += y.numel()
        stats.additions += y.numel() * k_group
        stats.overflow_outputs += chain.overflow_outputs
        stats.overflow_events += chain.overflow_events
        stats.swamping_events += chain.swamping_events
        stats.underflow_events += chain.underflow_events
    y = parts[0] if groups == 1 else torch.cat(parts, dim=1)
    return _from_matrix(y, info)


ACCUMULATING_TYPES = (QuantLinear, QuantConv1d, QuantConv2d)


def _accumulating_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from brevitas_a2q.analysis.audit import iter_accumulating_layers

    layers = list(iter_accumulating_layers(model))
    seen = {id(m) for _, m in layers}
    # anything else Brevitas calls a weight-quantized layer (e.g. transposed convolutions)
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
    layers += [(n, m) for n, m in model.named_modules()
               if isinstance(m, QuantWeightBiasInputOutputLayer) and id(m) not in seen]
    return layers


@contextlib.contextmanager
def simulate_accumulators(
    model: nn.Module,
    config: str | AccumulatorConfig,
    overrides: Mapping[str, str | AccumulatorConfig | None] | None = None,
    gradient: str | None = None,
) -> Iterator[SimulationStats]:
    """Run ``model``'s quantized Linear/Conv layers through simulated accumulators.

    ``config``: an :class:`AccumulatorConfig` or a spec such as ``"int12-wrap"``, ``"int12-sat"``,
    ``"fp12-e4m7-c16"`` (see :func:`parse_accumulator`). ``overrides``: layer name -> config,
    spec, or ``None`` to leave that layer exact (e.g. the first and last layers at wide
    accumulators). ``gradient`` (``"ste"``, ``"immediate"``, ``"recursive"``) overrides every
    config's gradient mode. Yields a :class:`SimulationStats` that accumulates per-layer event
    counts over every forward pass inside the block; the layers are restored on exit, also on
    error. See the module docstring for the exact semantics.
    """
    def resolve(c):
        c = parse_accumulator(c)
        return replace(c, gradient=gradient) if gradient is not None else c

    base = resolve(config)
    overrides = dict(overrides or {})
    layers = _accumulating_layers(model)
    names = {n for n, _ in layers}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise A2QInputError(f"accumulator overrides name unknown layers {unknown}; the model's "
                            f"quantized Linear/Conv layers are {sorted(names)}")
    stats = SimulationStats()
    patched = []
    try:
        for name, layer in layers:
            cfg = overrides.get(name, base)
            if cfg is None:
                stats.skipped[name] = "excluded by override"
                continue
            cfg = resolve(cfg)
            reason = _unsupported(layer, cfg)
            if reason is not None:
                if name in overrides:
                    raise A2QInputError(f"layer {name!r}: {reason}")
                stats.skipped[name] = reason
                continue
            if "inner_forward_impl" in vars(layer):
                raise A2QInputError(f"layer {name!r} is already being simulated (nested "
                                    "simulate_accumulators on the same model?)")
            stats.layers[name] = LayerStats(name, cfg.spec)
            layer.inner_forward_impl = _simulated_forward(name, layer, cfg, stats.layers[name])
            patched.append(layer)
        yield stats
    finally:
        for layer in patched:
            del layer.inner_forward_impl
