"""Brevitas layers under a simulated accumulator: :func:`simulate_accumulators` patches each
quantized Linear/Conv layer's ``inner_forward_impl`` for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace

import torch
from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.sim import grouped
from brevitas_a2q.sim.chain import _int_range, _wrap
from brevitas_a2q.sim.config import AccumulatorConfig, parse_accumulator
from brevitas_a2q.sim.conv_gradients import (
    ConvFineGrained,
    float_conv_forward,
    integer_blocks_apply,
    integer_records,
    samples_per_block,
)
from brevitas_a2q.sim.gradients import integer_codes, simulate_integer_forward, simulate_matmul
from brevitas_a2q.sim.stats import LayerStats, SimulationStats
from brevitas_a2q.sim.transposed import (
    TRANSPOSED_TYPES,
    DirectConv,
    direct_output_scale,
    direct_weight,
)
from brevitas_a2q.sim.unfold import Unfold, conv_windows


def _layer_k(layer: nn.Module) -> int:
    return int(layer.weight[0].numel())


def _unsupported(layer: nn.Module, cfg: AccumulatorConfig) -> str | None:
    """Why ``layer`` cannot be simulated with ``cfg``, or None."""
    if not isinstance(layer, (QuantLinear, QuantConv1d, QuantConv2d, *TRANSPOSED_TYPES)):
        return (f"{type(layer).__name__} is not supported (QuantLinear, QuantConv1d/2d and "
                "QuantConvTranspose1d/2d are)")
    if cfg.is_wrap or isinstance(layer, (QuantLinear, *TRANSPOSED_TYPES)):
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
    x4, windows, one_d = conv_windows(layer, x)
    return Unfold.apply(x4, *windows), ("conv", x4.shape[0], windows.size, one_d)


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
        xv, wv = x.value, quant_weight.value
        x_scale = _input_scale(name, layer, x.scale, cfg)
        transposed = isinstance(layer, TRANSPOSED_TYPES)
        if transposed:
            w_scale = direct_output_scale(quant_weight.scale, wv, layer.groups)
        else:
            w_scale = quant_weight.scale.reshape(-1).expand(wv.shape[0]) \
                if quant_weight.scale.numel() in (1, wv.shape[0]) else None
        if w_scale is None:
            raise A2QInputError(f"layer {name!r}: weight scale of shape "
                                f"{tuple(quant_weight.scale.shape)} is neither per tensor nor "
                                "per output channel")
        xq = _integers(name, "input", xv, x.scale)
        wq = _integers(name, "weight", wv, quant_weight.scale)
        conv, conv_impl = layer, exact_impl
        if transposed:  # as the direct convolution that computes it
            conv, conv_impl = DirectConv.of(layer, xv, wv), DirectConv.conv
            xv, wv, wq = conv.stuff(xv), conv.weight, direct_weight(wq, layer.groups)
            xq = conv.stuff(xq) if cfg.kind == "int" else None  # (floats add the values)
        if cfg.is_wrap:
            y = _wrap_layer(conv, conv_impl, xv, wv, x_scale, w_scale, cfg, stats, xq, wq)
        else:
            codes = integer_codes(xv, x.scale, xq) if cfg.kind == "int" else None
            y = _chain_layer(conv, xv, wv, x_scale, w_scale, cfg, stats, (codes, wq))
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


def _input_scale(name: str, layer: nn.Module, scale: Tensor, cfg: AccumulatorConfig) -> Tensor:
    """The scale of the input's integers in each output's accumulator: a scalar where the
    input is quantized per tensor. An input quantized per channel (Brevitas's MobileNetV1
    quantizes the activations before its depthwise convolutions so) has one per output
    (O,) where every group of a grouped convolution reads channels of one scale (a depthwise
    convolution: one channel a group): each output's products then share it. A
    floating-point accumulator adds the products' real values, where the scales play no
    part, so it takes any input scale (ones: not used)."""
    if scale.numel() == 1:
        return scale.reshape(())
    if cfg.kind == "float":
        return torch.ones((), dtype=scale.dtype, device=scale.device)
    groups = getattr(layer, "groups", 1)
    channels = getattr(layer, "in_channels", None)
    if groups > 1 and scale.numel() == channels and scale.shape[1:2] == (channels,):
        per_group = scale.reshape(groups, channels // groups)
        if bool((per_group == per_group[:, :1]).all()):
            return per_group[:, 0].repeat_interleave(layer.out_channels // groups)
    raise A2QInputError(
        f"layer {name!r}: its input is quantized per channel (scale of shape "
        f"{tuple(scale.shape)}), so the products of one output have no common integer scale "
        f"in an integer accumulator ({cfg.spec}). Quantize that input per tensor "
        "(scaling_per_output_channel=False on the quantizer before the layer), simulate the "
        f"layer with a floating-point accumulator (fp<T>-e<E>m<M>), or exclude it with an "
        f"override {{{name!r}: None}}.")


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
    identity STE (:class:`_LayerSTE`) or the fine-grained gradients: of a whole convolution on
    the CPU kernels (:class:`~brevitas_a2q.sim.conv_gradients.ConvFineGrained`, which keeps
    the input as it is), else of :func:`simulate_matmul`. An integer accumulator unfolds the
    input's integers (found before unfolding: K times fewer divisions than over the unfolded
    rows, and no float temporaries of the rows' size), and its values only where the matrix
    form's fine-grained gradient needs them. ``x_scale``: :func:`_input_scale`. ``rounded``:
    an integer accumulator's input integers (:func:`integer_codes`; None for floating point)
    and ``round(value / scale)`` of the weight (:func:`_integers`)."""
    grad = torch.is_grad_enabled() and (xv.requires_grad or wv.requires_grad)
    if grad and cfg.gradient == "ste":
        with torch.no_grad():
            y = _chain_layer(layer, xv, wv, x_scale, w_scale, cfg, stats, rounded)
        geometry = None if isinstance(layer, QuantLinear) else _conv_geometry(layer)
        return _LayerSTE.apply(xv, wv, y, geometry)
    codes, wq = rounded
    groups = getattr(layer, "groups", 1)
    k_group = _layer_k(layer)

    def count(chain, outputs: int) -> None:
        stats.outputs += outputs
        stats.additions += outputs * k_group
        stats.overflow_outputs += chain.overflow_outputs
        stats.overflow_events += chain.overflow_events
        stats.swamping_events += chain.swamping_events
        stats.underflow_events += chain.underflow_events

    if grouped.applies(xv, wv, groups, cfg):
        return _grouped_layer(layer, xv, wv, x_scale, w_scale, cfg, codes, wq, count, grad)
    whole = _whole_conv_gradient(layer, xv, codes, wv, wq, w_scale, cfg, groups) \
        if grad else None
    if whole is not None and codes is None:  # floating point, by blocks of samples
        _, windows, samples = whole
        y, records = float_conv_forward(xv, wv, cfg, windows, groups, samples, count)
        y = _from_matrix(y, ("conv", xv.shape[0], windows.size, xv.dim() == 3))
        return ConvFineGrained.apply(xv, wv, y, None, None, cfg, windows, groups, records,
                                     samples)
    values = (grad and whole is None) or codes is None  # (matrix-form gradient, float chain)
    code_rows, info = _to_matrix(layer, codes) if codes is not None else (None, None)
    rows, info = _to_matrix(layer, xv) if values else (None, info)
    o_group = wv.shape[0] // groups
    parts, last_combs = [], []
    for g in range(groups):
        cols = slice(g * k_group, (g + 1) * k_group)
        sl = slice(g * o_group, (g + 1) * o_group)
        wg = wv[sl].reshape(o_group, -1)
        xc = None if code_rows is None else code_rows[:, cols].contiguous()
        xs = x_scale if x_scale.dim() == 0 else x_scale[g * o_group]  # (one per group)
        if values:
            y, chain = simulate_matmul(rows[:, cols], wg, xs, w_scale[sl], cfg, xc)
        else:  # (the weights' integers: found once where the whole layer's gradient has them)
            w_rounded = whole[0][sl] if whole is not None else wq[sl].reshape(o_group, -1)
            with torch.no_grad():
                y, chain = simulate_integer_forward(xc, wg, xs, w_scale[sl], cfg, xv.dtype,
                                                    w_rounded)
        parts.append(y)
        last_combs.append(chain.last_combine_event)
        count(chain, y.numel())
    y = _from_matrix(parts[0] if groups == 1 else torch.cat(parts, dim=1), info)
    if whole is None:
        return y
    w_codes, windows, samples = whole
    records = integer_records(last_combs, xv.shape[0], samples, windows.size[0] * windows.size[1])
    return ConvFineGrained.apply(xv, wv, y, codes, w_codes, cfg, windows, groups, records,
                                 samples)


def _grouped_layer(layer, xv, wv, x_scale, w_scale, cfg, codes, wq, count, grad) -> Tensor:
    """:func:`_chain_layer` of a convolution with many small groups: every group in one
    kernel call (:mod:`.grouped`), on the integers of an integer accumulator (its result
    scaled back), on the float32 values of a floating-point one; with ``grad``, the
    fine-grained gradients of the input's and the weight's values
    (:class:`~brevitas_a2q.sim.grouped.GroupedFineGrained`)."""
    x4, windows, one_d = conv_windows(layer, xv.detach() if codes is None else codes)
    w_rows = wv.detach().reshape(wv.shape[0], -1)
    aw = w_rows if codes is None else \
        integer_codes(w_rows, w_scale[:, None].double(), wq.reshape(wq.shape[0], -1))
    chain, keep_bits = grouped.grouped_chain(
        grouped.per_group_operands(x4, windows, layer.groups), aw, cfg, record=grad)
    count(chain, chain.y.numel())
    y = chain.y if codes is None else chain.y * (x_scale.double() * w_scale.double())[None, :]
    y = _from_matrix(y.to(xv.dtype), ("conv", x4.shape[0], windows.size, one_d))
    if not grad:
        return y
    return grouped.GroupedFineGrained.apply(xv, wv, y, keep_bits, windows, layer.groups)


def _whole_conv_gradient(layer, xv, codes, wv, wq, w_scale, cfg, groups) -> tuple | None:
    """``(w_codes, windows, samples per block)`` where a convolution's fine-grained gradient
    runs on the whole layer (:mod:`.conv_gradients`: the CPU kernels; for saturating integers
    where the block method applies), else None."""
    from brevitas_a2q.sim import kernels

    if isinstance(layer, QuantLinear) or xv.device.type != "cpu" or not _layer_k(layer) \
            or not kernels.available():
        return None
    windows = conv_windows(layer, xv)[1]
    samples = samples_per_block(xv.shape[0], windows, _layer_k(layer), groups)
    if codes is None:
        return None, windows, samples
    shape = (-1,) + (1,) * (wv.dim() - 1)
    w_codes = integer_codes(wv, w_scale.reshape(shape), wq).reshape(wv.shape[0], -1)
    return (w_codes, windows, samples) if integer_blocks_apply(codes, w_codes, cfg) else None


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
