"""Transposed convolutions (a UNet's or a decoder's upsampling) under simulated accumulators,
against oracles built from the transposed convolution's definition,
``y[b, o, h] = sum_{i, t: h = s * u - p + d * t} x[b, i, u] w[i, o, t]``, enumerated in Python:
Brevitas's own layer at a wide accumulator, and the Python-integer / exact-fraction loops of
:mod:`test_accumulator_sim` over each output's products in the documented order (input
channel, then kernel taps from last to first, as the direct convolution with the flipped kernel
reads them) at narrow ones; fine-grained gradients against those loops' event masks."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from brevitas.nn import QuantConv2d, QuantConvTranspose1d, QuantConvTranspose2d, QuantIdentity
from brevitas.quant import (
    Int8WeightPerChannelFloat,
    Int8WeightPerTensorFloat,
    Uint8ActPerTensorFloat,
)
from brevitas.quant_tensor import IntQuantTensor
from test_accumulator_sim import (  # tests/ is on sys.path
    _masked_grads,
    _reference_masks,
    ref_float,
    ref_int_sat,
)

from brevitas_a2q.sim.config import parse_accumulator
from brevitas_a2q.sim.layers import simulate_accumulators

torch.set_num_threads(1)

_W = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, bias=False)


def _cases():
    """(layer, input shape): stride, padding (also past the kernel: a crop), output padding,
    dilation, groups, a per-channel weight scale, 1-d and 2-d."""
    return [
        (QuantConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2, **_W),
         (2, 4, 4, 5)),
        (QuantConvTranspose2d(3, 2, 2, stride=2, weight_quant=Int8WeightPerChannelFloat,
                              weight_bit_width=4, bias=False), (1, 3, 4, 4)),  # UNet's 2x2
        (QuantConvTranspose2d(2, 3, 3, stride=3, padding=5, dilation=2, **_W), (1, 2, 5, 4)),
        (QuantConvTranspose1d(3, 4, 4, stride=2, padding=1, **_W), (2, 3, 6)),
    ]


def _direct_rows(layer, x, w):
    """Each output's operands in the documented order, from the definition: ``rows`` (R, K)
    of input entries (0 where no input element meets the tap), ``w_rows`` (O, K), and for the
    gradients where each came from (``x_at[r][k]``: an index of ``x`` or None; ``w_at[o][k]``:
    an index of ``w``). Rows run over (batch, output position), outputs over channels; K over
    the group's input channels, then the taps from last to first."""
    one_d = x.dim() == 3
    x4 = x.unsqueeze(2) if one_d else x
    kernel = (1, *layer.kernel_size) if one_d else tuple(layer.kernel_size)
    stride, padding, dilation = ((first, *getattr(layer, a)) if one_d else tuple(getattr(layer, a))
                                 for a, first in (("stride", 1), ("padding", 0), ("dilation", 1)))
    out_pad = (0, *layer.output_padding) if one_d else tuple(layer.output_padding)
    batch, c_in, height, width = x4.shape
    size = [(n - 1) * s - 2 * p + d * (k - 1) + q + 1
            for n, s, p, d, k, q in zip((height, width), stride, padding, dilation, kernel,
                                        out_pad, strict=True)]
    groups = layer.groups
    i_group, o_group = c_in // groups, layer.out_channels // groups
    taps = list(itertools.product(reversed(range(kernel[0])), reversed(range(kernel[1]))))

    def source(pos, tap, axis):
        u, rem = divmod(pos + padding[axis] - dilation[axis] * tap, stride[axis])
        return u if rem == 0 and 0 <= u < (height, width)[axis] else None

    rows, x_at = [], []
    for b, h, v in itertools.product(range(batch), range(size[0]), range(size[1])):
        for g in range(groups):
            row, at = [], []
            for i in range(g * i_group, (g + 1) * i_group):
                for th, tw in taps:
                    uh, uw = source(h, th, 0), source(v, tw, 1)
                    index = None if uh is None or uw is None else (b, i, uh, uw)
                    row.append(0.0 if index is None else float(x4[index]))
                    at.append(index)
            rows.append(row)
            x_at.append(at)
    w4 = w.unsqueeze(2) if one_d else w
    w_at = [[(i, o % o_group, th, tw) for i in range((o // o_group) * i_group,
                                                     (o // o_group + 1) * i_group)
             for th, tw in taps] for o in range(layer.out_channels)]
    w_rows = [[float(w4[index]) for index in at] for at in w_at]
    return rows, w_rows, x_at, w_at, size, one_d


def _per_output(rows_y, layer, batch, size, one_d):
    """(batch * positions * groups) rows of each group's outputs as the layer's output."""
    groups, o_group = layer.groups, layer.out_channels // layer.groups
    y = torch.tensor(rows_y, dtype=torch.float64).reshape(batch, size[0], size[1], groups,
                                                          o_group)
    y = y.reshape(batch, size[0], size[1], -1).permute(0, 3, 1, 2)
    return y[:, :, 0] if one_d else y


def _quantized(layer, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    quant_input = QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4,
                                return_quant_tensor=True)
    model = torch.nn.Sequential(quant_input, layer).eval()
    x = torch.rand(shape, generator=gen) ** 2 * 6  # small values beside large
    with torch.no_grad():
        qx, qw = quant_input(x), layer.quant_weight()
    return model, x, qx, qw


@pytest.mark.parametrize("spec", ["int32-sat", "int32-wrap", "fp40-e8m31"])
def test_transposed_layers_equal_brevitas_at_a_wide_accumulator(spec):
    """At an accumulator no sum can overflow or round, each transposed layer under the
    simulation returns Brevitas's own output (float32 rounding apart), with no event, no layer
    skipped, ``output_size`` honoured, and every product of the direct convolution counted."""
    for seed, (layer, shape) in enumerate(_cases()):
        model, x, qx, qw = _quantized(layer, shape, seed)
        with torch.no_grad():
            expected = model(x)
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            y = model(x)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
        assert not stats.skipped
        (layer_stats,) = stats.layers.values()
        assert layer_stats.overflow_events == layer_stats.swamping_events == 0
        k_direct = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        assert layer_stats.additions == expected.numel() * k_direct
        if max(layer.dilation) > 1:
            continue  # (Brevitas derives the output padding of output_size without dilation)
        # the other output padding (0 <-> 1; every case has a stride of at least 2)
        size = [n + 1 - 2 * q
                for n, q in zip(expected.shape[2:], layer.output_padding, strict=True)]
        with torch.no_grad():
            expected = layer(qx, output_size=size)
            with simulate_accumulators(layer, spec):
                y = layer(qx, output_size=size)
        assert list(y.shape[2:]) == size
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("spec", ["int7-sat", "int8-sat-c4"])
def test_saturating_transposed_layers_equal_the_integer_loop(spec):
    """A saturating accumulator, forward only and under a gradient: bit for bit the
    Python-integer loop over each output's products in the documented order, overflow events
    counted alike."""
    cfg = parse_accumulator(spec)
    saturated = 0
    for seed, (layer, shape) in enumerate(_cases()):
        model, x, qx, qw = _quantized(layer, shape, seed)
        rows, w_rows, _, _, size, one_d = _direct_rows(layer, qx.int().double(),
                                                       qw.int().double())
        o_group = layer.out_channels // layer.groups
        totals, events = [], 0
        for r, row in enumerate(rows):
            g = r % layer.groups
            for o in range(g * o_group, (g + 1) * o_group):
                total, n, _, _ = ref_int_sat([int(v) for v in row], [int(v) for v in w_rows[o]],
                                             cfg.bits, cfg.chunk_size)
                totals.append(total)
                events += n
        scale = qx.scale.double() * qw.scale.double().reshape(1, -1, *[1] * (len(shape) - 2))
        expected = (_per_output(totals, layer, shape[0], size, one_d) * scale).float()
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            y = model(x)
        with simulate_accumulators(model, spec) as stats_grad:
            y_grad = model(x.requires_grad_())
        assert torch.equal(y, expected), layer
        assert torch.equal(y_grad.detach(), expected), layer
        assert next(iter(stats.layers.values())).overflow_events == events
        assert next(iter(stats_grad.layers.values())).overflow_events == events
        saturated += events > 0
    assert saturated >= 3, "most cases must saturate somewhere"


@pytest.mark.parametrize("spec", ["fp8-e3m4", "fp9-e4m4-c5", "fp8-e3m4-rz"])
def test_float_transposed_layers_equal_the_exact_fraction_loop(spec):
    """A floating-point accumulator, forward only: bit for bit the exact-fraction loop over
    each output's real products in the documented order, swamping, underflow and overflow
    events counted alike."""
    cfg = parse_accumulator(spec)
    lost = 0
    for seed, (layer, shape) in enumerate(_cases()):
        model, x, qx, qw = _quantized(layer, shape, seed)
        rows, w_rows, _, _, size, one_d = _direct_rows(layer, qx.value, qw.value)
        o_group = layer.out_channels // layer.groups
        totals, counts = [], {"over": 0, "swamp": 0, "under": 0}
        for r, row in enumerate(rows):
            g = r % layer.groups
            for o in range(g * o_group, (g + 1) * o_group):
                total, n, _, _ = ref_float(row, w_rows[o], cfg.exp_bits, cfg.man_bits,
                                           cfg.chunk_size, cfg.rounding == "nearest")
                totals.append(total)
                for key in counts:
                    counts[key] += n[key]
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            y = model(x)
        expected = _per_output([float(t) for t in totals], layer, shape[0], size, one_d)
        assert all(Fraction(float(t)) == t for t in totals), "float64 holds every result"
        assert torch.equal(y, expected.float()), layer
        layer_stats = next(iter(stats.layers.values()))
        assert (layer_stats.overflow_events, layer_stats.swamping_events,
                layer_stats.underflow_events) == (counts["over"], counts["swamp"],
                                                  counts["under"])
        lost += counts["swamp"] + counts["over"]
    assert lost > 0, "the cases must lose an addend or overflow somewhere"


@pytest.mark.parametrize("mode", ["ste", "immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int9-sat-c6", "fp9-e4m4"])
def test_transposed_gradients_are_the_masked_sums_of_the_loops_events(spec, mode):
    """The input's and the weight's gradients: with ``ste`` the exact transposed
    convolution's (autograd of ``F.conv_transpose``); with ``immediate`` / ``recursive`` the
    sums over the products the reference loops' events keep, taken back to the input elements
    and weights each product came from."""
    cfg = parse_accumulator(spec, gradient=mode)
    cut = 0
    for seed, (layer, shape) in enumerate(_cases()):
        gen = torch.Generator().manual_seed(seed)
        x_scale, w_scale = (0.5 if cfg.kind == "int" else 2.0**-3), 0.25
        x_int = torch.randint(0, 256, shape, generator=gen).double()
        w_int = torch.randint(-7, 8, layer.weight.shape, generator=gen).double()
        xr = (x_int * x_scale).float().requires_grad_()
        wr = (w_int * w_scale).float().requires_grad_()
        zero = torch.zeros(())
        x_qt = IntQuantTensor(xr, torch.tensor(x_scale), zero, torch.tensor(8.0), False, True)
        w_qt = IntQuantTensor(wr, torch.tensor(w_scale), zero, torch.tensor(4.0), True, True)
        with simulate_accumulators(layer, cfg):
            y = layer.inner_forward_impl(x_qt, w_qt, None)
        dy = torch.randn(y.shape, generator=gen)
        (y * dy).sum().backward()
        if mode == "ste":
            xe, we = xr.detach().requires_grad_(), wr.detach().requires_grad_()
            exact = type(layer).inner_forward_impl(layer, xe, we, None)
            (exact * dy).sum().backward()
            for simulated, exact in ((xr.grad, xe.grad), (wr.grad, we.grad)):  # float32 sums
                torch.testing.assert_close(simulated, exact, rtol=1e-5,
                                           atol=1e-6 * float(exact.abs().max()))
            continue
        rows, w_rows, x_at, w_at, size, one_d = _direct_rows(layer, x_int, w_int)
        rows, w_rows = torch.tensor(rows), torch.tensor(w_rows)
        dy4 = dy.unsqueeze(2) if one_d else dy
        groups, o_group = layer.groups, layer.out_channels // layer.groups
        gx, gw = torch.zeros(x_int.shape).double(), torch.zeros(w_int.shape).double()
        gx4, gw4 = (gx.unsqueeze(2), gw.unsqueeze(2)) if one_d else (gx, gw)
        for g in range(groups):
            outs = slice(g * o_group, (g + 1) * o_group)
            g_rows = dy4[:, outs].permute(0, 2, 3, 1).reshape(-1, o_group).double()
            xg, wg = rows[g::groups], w_rows[outs]
            # an integer accumulator adds the integers, a floating-point one the values
            masks = _reference_masks(xg, wg, cfg, mode) if cfg.kind == "int" else \
                _reference_masks(xg * x_scale, wg * w_scale, cfg, mode)
            cut += int((torch.tensor(masks) == 0).sum())
            g_xrows, g_wrows = _masked_grads(xg * x_scale, wg * w_scale, g_rows, masks)
            for r, at in enumerate(x_at[g::groups]):
                for k, index in enumerate(at):
                    if index is not None:
                        gx4[index] += g_xrows[r, k]
            for o, at in enumerate(w_at[outs]):
                for k, index in enumerate(at):
                    gw4[index] += g_wrows[o, k]
        torch.testing.assert_close(xr.grad.double(), gx, rtol=1e-5,
                                   atol=1e-6 * float(gx.abs().max()))
        torch.testing.assert_close(wr.grad.double(), gw, rtol=1e-5,
                                   atol=1e-6 * float(gw.abs().max()))
    assert mode == "ste" or cut > 0, "the cases must cut some products"


def test_a_unet_step_trains_under_a_narrow_float_accumulator():
    """A small UNet (a strided convolution down, a transposed one up, the skip concatenated,
    a convolution out) takes a fine-grained training step under fp10-e4m5-c8 with no layer
    left out, and its loss falls over a few steps."""
    torch.manual_seed(0)

    class TinyUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            act = dict(act_quant=Uint8ActPerTensorFloat, bit_width=4, return_quant_tensor=True)
            self.inp = QuantIdentity(**act)
            self.down = QuantConv2d(1, 4, 3, stride=2, padding=1, **_W)
            self.mid = QuantIdentity(**act)
            self.up = QuantConvTranspose2d(4, 4, 2, stride=2, **_W)
            self.cat = QuantIdentity(**act)
            self.out = QuantConv2d(5, 1, 3, padding=1, **_W)

        def forward(self, x):
            skip = self.inp(x)
            up = self.up(self.mid(torch.relu(self.down(skip))))
            return self.out(self.cat(torch.cat([skip.value, torch.relu(up)], dim=1)))

    model = TinyUNet().train()
    x = torch.rand(4, 1, 8, 8)
    target = x.flip(-1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with simulate_accumulators(model, "fp10-e4m5-c8", gradient="recursive") as stats:
        for _ in range(8):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert not stats.skipped and set(stats.layers) == {"down", "up", "out"}
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
