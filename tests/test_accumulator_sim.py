"""Simulated accumulators against independent oracles: numpy int64 arithmetic (wraparound),
straightforward Python loops over exact integers / Fractions (saturation, floating point), and
A2Q's guarantee on trained models."""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brevitas_a2q.analysis.audit import capture_layers
from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.sim import grouped
from brevitas_a2q.sim.chain import _run_chain
from brevitas_a2q.sim.config import AccumulatorConfig, parse_accumulator
from brevitas_a2q.sim.gradients import simulate_matmul
from brevitas_a2q.sim.layers import simulate_accumulators
from brevitas_a2q.train.data import load_digits
from brevitas_a2q.train.models import build_cnn, build_mlp

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------
# independent reference loops


def ref_int_sat(x: list[int], w: list[int], bits: int, chunk: int | None):
    """Sequential saturating accumulation with Python ints: (result, overflow events, per-step
    event flags in product order, chunk-combination event flags)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    chunk = chunk or len(x)
    step_events, comb_events, partials = [], [], []
    for start in range(0, len(x), chunk):
        acc = 0
        for k in range(start, min(start + chunk, len(x))):
            s = acc + x[k] * w[k]
            step_events.append(not lo <= s <= hi)
            acc = min(max(s, lo), hi)
        partials.append(acc)
    total = partials[0]
    comb_events.append(False)
    for part in partials[1:]:
        s = total + part
        comb_events.append(not lo <= s <= hi)
        total = min(max(s, lo), hi)
    return total, sum(step_events) + sum(comb_events), step_events, comb_events


def round_fraction(v: Fraction, e_bits: int, m_bits: int, nearest: bool = True):
    """Exact rounding of ``v`` to sign+E+M (bias 2^(E-1)-1, subnormals, no inf codes, saturating):
    (value, overflowed)."""
    bias = 2 ** (e_bits - 1) - 1
    emin, emax = 1 - bias, 2**e_bits - 1 - bias
    largest = (2 - Fraction(1, 2**m_bits)) * Fraction(2) ** emax
    if v == 0:
        return Fraction(0), False
    a = abs(v)
    e = math.floor(math.log2(a))  # refine exactly
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    e = max(e, emin)
    quantum = Fraction(2) ** (e - m_bits)
    q, rem = divmod(a, quantum)
    if nearest and (rem > quantum / 2 or (rem == quantum / 2 and q % 2 == 1)):
        q += 1
    r = q * quantum
    over = r > largest
    r = min(r, largest)
    return (r if v > 0 else -r), over


def ref_float(x: list[float], w: list[float], e_bits: int, m_bits: int, chunk: int | None,
              nearest: bool = True):
    """Sequential FMA chain with exact Fractions: (result, overflow, swamping, underflow,
    per-step events, chunk events)."""
    chunk = chunk or len(x)
    counts = {"over": 0, "swamp": 0, "under": 0}
    step_events, comb_events = [], [False]

    def add(acc, addend):
        s = acc + addend
        r, over = round_fraction(s, e_bits, m_bits, nearest)
        swamp = s != acc and r == acc and not over
        under = s != 0 and r == 0
        counts["over"] += over
        counts["swamp"] += swamp
        counts["under"] += under
        return r, bool(over or swamp or under)

    partials = []
    for start in range(0, len(x), chunk):
        acc = Fraction(0)
        for k in range(start, min(start + chunk, len(x))):
            acc, ev = add(acc, Fraction(x[k]) * Fraction(w[k]))
            step_events.append(ev)
        partials.append(acc)
    total = partials[0]
    for part in partials[1:]:
        total, ev = add(total, part)
        comb_events.append(ev)
    return total, counts, step_events, comb_events


def wrap_int64(a: np.ndarray, bits: int) -> np.ndarray:
    half = np.int64(2 ** (bits - 1))
    return (a + half) % (2 * half) - half


# ----------------------------------------------------------------------------------------------
# matrix-form engine


def _int_operands(seed, rows=6, outs=5, k=37, xmax=127, wmax=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-xmax - 1, xmax + 1, (rows, k), generator=g).double()
    w = torch.randint(-wmax, wmax + 1, (outs, k), generator=g).double()
    return x, w


@pytest.mark.parametrize("bits", [8, 10, 12, 16])
def test_wraparound_matches_int64_modular_arithmetic(bits):
    x, w = _int_operands(bits)
    xs, ws = 0.5, torch.full((5,), 0.25)  # powers of two: the rescaling is exact
    y, chain = simulate_matmul((x * xs).float(), (w * ws[:, None]).float(), xs, ws,
                               parse_accumulator(f"int{bits}-wrap"))
    exact = x.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T
    expected = wrap_int64(exact, bits) * (xs * 0.25)
    np.testing.assert_array_equal(y.double().numpy(), expected)
    assert chain.overflow_outputs == int(((exact < -(2 ** (bits - 1))) |
                                          (exact > 2 ** (bits - 1) - 1)).sum())
    if bits <= 10:
        assert chain.overflow_outputs > 0  # the case exercises wrapping


@pytest.mark.parametrize("bits,chunk", [(10, None), (10, 8), (12, 5), (9, 1)])
def test_saturation_matches_reference_loop(bits, chunk):
    x, w = _int_operands(bits + (chunk or 0))
    cfg = AccumulatorConfig("int", bits, "saturate", chunk_size=chunk)
    y, chain = simulate_matmul(x.float(), w.float(), 1.0, torch.ones(5), cfg)
    events = 0
    for r in range(x.shape[0]):
        for o in range(w.shape[0]):
            total, ev, _, _ = ref_int_sat([int(v) for v in x[r]], [int(v) for v in w[o]], bits,
                                          chunk)
            assert y[r, o].item() == total
            events += ev
    assert chain.overflow_events == events > 0


def _float_operands(seed, rows=4, outs=3, k=29, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.rand(rows, k, generator=g) * spread - spread / 2)
    x = (torch.randn(rows, k, generator=g).sign() * mag).float()
    w = torch.randn(outs, k, generator=g).float()
    w[:, ::5] = 0.0  # zero products are no events
    return x, w


@pytest.mark.parametrize("spec", ["fp12-e4m7", "fp12-e4m7-c8", "fp9-e3m5", "fp9-e3m5-c4-rz",
                                  "fp8-e4m3-c3"])
def test_float_accumulation_matches_exact_reference(spec):
    cfg = parse_accumulator(spec)
    x, w = _float_operands(len(spec), spread=10.0 if "e4" in spec else 6.0)
    y, chain = simulate_matmul(x, w, 1.0, torch.ones(w.shape[0]), cfg)
    totals = {"over": 0, "swamp": 0, "under": 0}
    for r in range(x.shape[0]):
        for o in range(w.shape[0]):
            total, counts, _, _ = ref_float(x[r].tolist(), w[o].tolist(), cfg.exp_bits,
                                            cfg.man_bits, cfg.chunk_size,
                                            cfg.rounding == "nearest")
            assert Fraction(y[r, o].item()) == total or \
                abs(y[r, o].item() - float(total)) <= 1e-7 * abs(float(total))
            for key in totals:
                totals[key] += counts[key]
    assert chain.swamping_events == totals["swamp"]
    assert chain.underflow_events == totals["under"]
    assert chain.overflow_events == totals["over"]
    assert totals["swamp"] > 0  # low precision: the case exercises swamping


def test_float_overflow_saturates_and_counts():
    cfg = parse_accumulator("fp8-e3m4")  # largest value (2 - 1/16) * 2^4 = 31
    x = torch.full((1, 8), 4.0)
    w = torch.full((1, 8), 2.0)
    y, chain = simulate_matmul(x, w, 1.0, torch.ones(1), cfg)
    assert y.item() == 31.0  # 8, 16, 24, then 32, 40, ... saturate: five overflowing additions
    assert chain.overflow_events == 5 and chain.overflow_outputs == 1
    assert chain.swamping_events == 0


# ----------------------------------------------------------------------------------------------
# gradients


def _masked_grads(x, w, g, masks):
    """dL/dx, dL/dw of sum_{r,o,k} g[r,o] * mask[r,o,k] * x[r,k] * w[o,k]."""
    m = torch.tensor(masks, dtype=torch.float64)
    gx = torch.einsum("ro,rok,ok->rk", g.double(), m, w.double())
    gw = torch.einsum("ro,rok,rk->ok", g.double(), m, x.double())
    return gx, gw


def _reference_masks(x, w, cfg, mode):
    masks = []
    for r in range(x.shape[0]):
        row = []
        for o in range(w.shape[0]):
            if cfg.kind == "int":
                _, _, steps, combs = ref_int_sat([int(v) for v in x[r]], [int(v) for v in w[o]],
                                                 cfg.bits, cfg.chunk_size)
            else:
                _, _, steps, combs = ref_float(x[r].tolist(), w[o].tolist(), cfg.exp_bits,
                                               cfg.man_bits, cfg.chunk_size)
            chunk = cfg.chunk_size or len(steps)
            keep = []
            for k, ev in enumerate(steps):
                c, j = divmod(k, chunk)
                if mode == "immediate":
                    keep.append(not ev and not combs[c])
                else:  # recursive: no event at or after k in its chunk, none at or after c
                    later_in_chunk = steps[k:(c + 1) * chunk]
                    keep.append(not any(later_in_chunk) and not any(combs[c:]))
            row.append(keep)
        masks.append(row)
    return masks


@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int9-sat", "int10-sat-c6", "fp9-e3m5", "fp9-e3m5-c5"])
def test_fine_grained_gradients_match_reference_masks(spec, mode):
    cfg = parse_accumulator(spec, gradient=mode)
    if cfg.kind == "int":
        x, w = _int_operands(3, rows=4, outs=3, k=23)
        x, w = x.float(), w.float()
    else:
        x, w = _float_operands(5, k=23)
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    g = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1))
    y, _ = simulate_matmul(xr, wr, 1.0, torch.ones(w.shape[0]), cfg)
    y.backward(g)
    masks = _reference_masks(x, w, cfg, mode)
    assert any(not all(m) for row in masks for m in row)  # some gradient is cut
    gx, gw = _masked_grads(x, w, g, masks)
    torch.testing.assert_close(xr.grad.double(), gx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(wr.grad.double(), gw, rtol=1e-5, atol=1e-4)


def test_ste_gradient_is_that_of_exact_accumulation():
    x, w = _int_operands(0, rows=4, outs=3, k=23)
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    for spec in ["int9-sat", "int9-wrap", "fp9-e3m5"]:
        xr, wr = x.float().requires_grad_(True), w.float().requires_grad_(True)
        y, chain = simulate_matmul(xr, wr, 1.0, torch.ones(3), parse_accumulator(spec))
        assert chain.overflow_events + chain.swamping_events > 0
        y.backward(g)
        torch.testing.assert_close(xr.grad, g @ w.float())
        torch.testing.assert_close(wr.grad, g.t() @ x.float())


def test_wraparound_fine_grained_cuts_overflowed_outputs():
    x, w = _int_operands(1, rows=4, outs=3, k=23)
    xr, wr = x.float().requires_grad_(True), w.float().requires_grad_(True)
    g = torch.ones(4, 3)
    y, chain = simulate_matmul(xr, wr, 1.0, torch.ones(3), parse_accumulator("int9-wrap",
                                                                            "immediate"))
    y.backward(g)
    keep = (~chain.overflowed).float()
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(xr.grad, (g * keep) @ w.float())


# ----------------------------------------------------------------------------------------------
# Brevitas layers


def _digits_batch(n=64):
    _, test = load_digits()
    return test.tensors[0][:n]


def _outputs(model, x, names):
    """{name: (layer input, layer output)} of one forward pass."""
    seen = {}
    handles = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, (a[0], out))) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def _np_conv_int(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """int64 convolution (stride 1) by explicit windows."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # B,C,H,W,kh,kw
    return np.einsum("bchwij,ocij->bohw", win, w)


@pytest.mark.parametrize("bits", [10, 12])
def test_layers_wrap_like_int64_oracle(bits):
    torch.manual_seed(0)
    model = build_cnn("none").eval()
    x = _digits_batch()
    caps = {c.name: c for c in capture_layers(model, x)}
    with simulate_accumulators(model, f"int{bits}-wrap") as stats:
        outs = _outputs(model, x, ["conv1", "conv2", "fc"])
    for name, (inp, out) in outs.items():
        cap = caps[name]  # integer weights (independent of the input for this quantizer)
        xi = inp.int().numpy().astype(np.int64)
        wi = cap.int_weight.numpy().astype(np.int64)
        if name == "fc":
            exact = xi @ wi.T
            scale = (inp.scale * cap.weight_scale.reshape(1, -1)).numpy()
            bias = cap.module.bias.detach().numpy()
        else:
            exact = _np_conv_int(xi, wi, 1)
            scale = (inp.scale * cap.weight_scale.reshape(1, -1, 1, 1)).numpy()
            bias = 0.0
        expected = wrap_int64(exact, bits) * scale + bias
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
        n_over = int((wrap_int64(exact, bits) != exact).sum())
        assert stats.layers[name].overflow_outputs == n_over
    assert stats.layers["conv1"].overflow_outputs > 0  # 8-bit input: P = 10/12 overflows


def test_layers_restored_and_exact_at_wide_accumulators():
    torch.manual_seed(0)
    model = build_mlp("none").eval()
    x = _digits_batch()
    with torch.no_grad():
        ref = model(x)
    for spec in ["int32-wrap", "int32-sat", "int32-sat-c7"]:
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            y = model(x)
        assert stats.total_overflow_events == 0
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not any("inner_forward_impl" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError), simulate_accumulators(model, "int12-sat"):
        raise RuntimeError("boom")
    assert not any("inner_forward_impl" in vars(m) for m in model.modules())


def test_linear_layers_take_inputs_with_leading_dimensions():
    """A QuantLinear on (batch, tokens, features) with a bias, as in a transformer: the bias
    and the per-channel scale go along the last dimension (they went along the second)."""
    from brevitas.nn import QuantIdentity, QuantLinear
    from brevitas.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    torch.manual_seed(5)
    model = torch.nn.Sequential(
        QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=8, return_quant_tensor=True),
        QuantLinear(20, 5, bias=True, weight_quant=Int8WeightPerChannelFloat,
                    weight_bit_width=4)).eval()
    x = torch.rand(2, 3, 20)
    with torch.no_grad():
        ref = model(x)
        for spec in ["int32-wrap", "int32-sat", "int32-sat-c8", "fp32-e8m23"]:
            with simulate_accumulators(model, spec):
                y = model(x)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_overrides_and_bad_input():
    model = build_cnn("none").eval()
    x = _digits_batch(8)
    with simulate_accumulators(model, "int8-wrap", {"conv1": None, "fc": "int32-wrap"}) as st, \
            torch.no_grad():
        model(x)
    assert st.skipped == {"conv1": "excluded by override"}
    assert st.layers["fc"].accumulator == "int32-wrap"
    assert st.layers["fc"].overflow_events == 0
    with pytest.raises(A2QInputError, match="unknown layers"):
        with simulate_accumulators(model, "int8-wrap", {"conv9": None}):
            pass
    for bad in ["int12", "fp12-e4m8", "int12-wrap-q3", "fp12-e4m7-c0"]:
        with pytest.raises(A2QInputError):
            parse_accumulator(bad)
    assert parse_accumulator("fp12-e4m7-c16-rz").spec == "fp12-e4m7-rz-c16"


def test_conv_chain_matches_wrap_when_nothing_overflows():
    """The unfolded, sequential path agrees with the convolution path on a model without
    overflow (both exact)."""
    torch.manual_seed(1)
    model = build_cnn("none").eval()
    x = _digits_batch(16)
    with simulate_accumulators(model, "int24-wrap"), torch.no_grad():
        a = model(x)
    with simulate_accumulators(model, "int24-sat-c10"), torch.no_grad():
        b = model(x)
    torch.testing.assert_close(a, b)


def _saturating_layer_oracle(layer, xi: np.ndarray, wi: np.ndarray, bits: int, chunk):
    """Each output of ``layer`` (QuantLinear / QuantConv1d / QuantConv2d) on integer input
    ``xi`` with integer weights ``wi``, accumulated by :func:`ref_int_sat` over its receptive
    field in (channel, kernel row, kernel column) order: ``(totals, overflow events)``."""
    if wi.ndim == 2:  # linear
        out = [[ref_int_sat(list(r), list(w), bits, chunk) for w in wi] for r in xi]
        return np.array([[o[0] for o in row] for row in out]), sum(o[1] for r in out for o in r)
    one_d = wi.ndim == 3
    x4, w4 = (xi[:, :, None], wi[:, :, None]) if one_d else (xi, wi)
    if one_d:  # a convolution over a height of one
        (sh, sw), (dh, dw), (ph, pw) = ((1, layer.stride[0]), (1, layer.dilation[0]),
                                        (0, layer.padding[0]))
    else:
        (sh, sw), (dh, dw), (ph, pw) = layer.stride, layer.dilation, layer.padding
    xp = np.pad(x4, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    o_ch, c_group, kh, kw = w4.shape
    o_group = o_ch // layer.groups
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    totals, events = np.zeros((x4.shape[0], o_ch, oh, ow), dtype=np.int64), 0
    for b, o, i, j in np.ndindex(totals.shape):
        g = o // o_group
        patch = xp[b, g * c_group:(g + 1) * c_group, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                   j * sw:j * sw + dw * (kw - 1) + 1:dw]
        totals[b, o, i, j], n, _, _ = ref_int_sat(patch.reshape(-1).tolist(),
                                                  w4[o].reshape(-1).tolist(), bits, chunk)
        events += n
    return (totals[:, :, 0] if one_d else totals), events


@pytest.mark.parametrize("spec", ["int10-sat", "int9-sat-c5"])
@pytest.mark.parametrize("in_bits", [4, 8])  # integers held as int8 / as float32
def test_saturating_layers_equal_the_loop_oracle(spec, in_bits):
    """Each layer type through a saturating accumulator, forward only and under a gradient
    (two paths: the input's integers unfolded, or its values), equals the Python-integer loop
    on the same integers, bit for bit, events counted alike."""
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantIdentity, QuantLinear
    from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    torch.manual_seed(3)
    w = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, bias=False)
    cases = [(QuantConv2d(4, 6, 3, stride=2, dilation=2, padding=1, groups=2, **w), (2, 4, 9, 9)),
             (QuantConv2d(5, 5, 3, padding=1, groups=5, **w), (2, 5, 7, 7)),  # depthwise
             (QuantConv1d(3, 6, 5, padding=2, groups=3, **w), (2, 3, 11)),  # 2 outputs a group
             (QuantConv1d(3, 4, 5, stride=2, padding=2, **w), (2, 3, 11)),
             (QuantLinear(20, 5, **w), (3, 20))]
    cfg = parse_accumulator(spec)
    saturated = []
    for layer, shape in cases:
        model = torch.nn.Sequential(QuantIdentity(act_quant=Uint8ActPerTensorFloat,
                                                  bit_width=in_bits, return_quant_tensor=True),
                                    layer).eval()
        x = torch.rand(shape) * 4
        with torch.no_grad():
            qx, qw = model[0](x), layer.quant_weight()
        expected, n_events = _saturating_layer_oracle(layer, qx.int().numpy().astype(np.int64),
                                                      qw.int().numpy().astype(np.int64),
                                                      cfg.bits, cfg.chunk_size)
        scale = (qx.scale.double() * qw.scale.double().reshape(-1)).numpy()
        scale = scale.reshape((1, -1) + (1,) * (expected.ndim - 2))
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            y_forward = model(x)
        with simulate_accumulators(model, spec) as stats_grad:
            y_grad = model(x.requires_grad_())
        saturated.append(n_events > 0)
        assert np.array_equal(y_forward.numpy(), (expected * scale).astype(np.float32)), layer
        assert torch.equal(y_grad.detach(), y_forward), layer
        name = next(iter(stats.layers))
        assert stats.layers[name].overflow_events == n_events
        assert stats_grad.layers[name].overflow_events == n_events
    assert sum(saturated) >= 3, "most cases must saturate somewhere"


def _layer_against_group_chains(quant_input, layer, x, spec) -> int:
    """``layer`` (a 3x3 convolution, padding 1) behind ``quant_input`` under the floating-point
    ``spec``, forward only, against the step-by-step chain of each group's unfolded input
    values, bit for bit, events counted alike. Returns the swamping and overflow events."""
    cfg = parse_accumulator(spec)
    model = torch.nn.Sequential(quant_input, layer).eval()
    with simulate_accumulators(model, spec) as stats, torch.no_grad():
        y = model(x)
        qx, qw = model[0](x), layer.quant_weight()
    assert grouped.applies(qx.value, qw.value, layer.groups, cfg) == (layer.groups > 1)
    cols = F.unfold(qx.value, 3, padding=1, stride=layer.stride)  # (N, C * 9, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()
    per_group, k = layer.out_channels // layer.groups, cols.shape[1] // layer.groups
    ws = qw.value.reshape(layer.out_channels, -1).double()
    chains = [_run_chain(rows[:, k * g:k * (g + 1)], ws[per_group * g:per_group * (g + 1)],
                         cfg, fast=False) for g in range(layer.groups)]
    expected = torch.cat([c.y for c in chains], dim=1).float()
    expected = expected.reshape(x.shape[0], -1, layer.out_channels).transpose(1, 2)
    assert torch.equal(y.reshape(expected.shape), expected), layer
    layer_stats = next(iter(stats.layers.values()))
    for count in ("overflow_events", "overflow_outputs", "swamping_events", "underflow_events"):
        assert getattr(layer_stats, count) == sum(getattr(c, count) for c in chains), count
    return layer_stats.swamping_events + layer_stats.overflow_events


@pytest.mark.parametrize("spec", ["fp8-e3m4", "fp10-e4m5-c4", "fp9-e3m5-c5-rz", "fp7-e4m2-c16"])
def test_depthwise_float_layers_equal_each_groups_chain(spec):
    """A depthwise convolution (and one of two outputs a group) under a floating-point
    accumulator, forward only: every group at once (:mod:`brevitas_a2q.sim.grouped`) equals
    the step-by-step chain of each group's unfolded input, bit for bit, events counted
    alike."""
    from brevitas.nn import QuantConv2d, QuantIdentity
    from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    torch.manual_seed(5)
    w = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, bias=False)
    events = 0
    for layer in (QuantConv2d(6, 6, 3, padding=1, groups=6, **w),
                  QuantConv2d(3, 6, 3, stride=2, padding=1, groups=3, **w)):
        quant_input = QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=4,
                                    return_quant_tensor=True)
        x = torch.rand(2, layer.in_channels, 8, 8) ** 3 * 40  # small values beside large
        events += _layer_against_group_chains(quant_input, layer, x, spec)
    assert events > 0, "the cases must lose an addend or overflow somewhere"


def _per_channel_relu(channels: int):
    """A 4-bit ReLU quantized per channel as Brevitas's MobileNetV1 quantizes its activations
    (``scaling_per_output_channel``), its scales set apart by factors of up to 2^3."""
    from brevitas.nn import QuantReLU
    from brevitas.quant import Uint8ActPerTensorFloatMaxInit

    relu = QuantReLU(act_quant=Uint8ActPerTensorFloatMaxInit, bit_width=4, max_val=6.0,
                     per_channel_broadcastable_shape=(1, channels, 1, 1),
                     scaling_stats_permute_dims=(1, 0, 2, 3), scaling_per_output_channel=True,
                     return_quant_tensor=True)
    scales = [p for p in relu.parameters() if p.numel() == channels]
    assert len(scales) == 1, "one per-channel scale parameter"
    with torch.no_grad():
        scales[0].copy_(torch.logspace(-1, 2, channels, base=2).reshape(scales[0].shape))
    return relu


@pytest.mark.parametrize("spec", ["fp8-e3m4", "fp10-e4m5-c4"])
def test_float_layers_take_an_input_quantized_per_channel(spec):
    """Brevitas's MobileNetV1 quantizes its activations per channel. A floating-point
    accumulator adds the real products, so a dense and a depthwise convolution behind such an
    input simulate, equal to each group's step-by-step chain bit for bit, and a fine-grained
    training step runs. An integer accumulator refuses the dense one (its products have no
    common scale) in one message naming it and the fixes."""
    from brevitas.nn import QuantConv2d
    from brevitas.quant import Int8WeightPerTensorFloat

    torch.manual_seed(6)
    w = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, bias=False)
    events = 0
    for layer in (QuantConv2d(6, 5, 3, padding=1, **w),
                  QuantConv2d(6, 6, 3, padding=1, groups=6, **w)):
        x = torch.rand(2, 6, 8, 8) ** 3 * 40
        quant_input = _per_channel_relu(6)
        assert quant_input(x).scale.unique().numel() == 6, "per-channel scales, all distinct"
        events += _layer_against_group_chains(quant_input, layer, x, spec)
        model = torch.nn.Sequential(quant_input, layer).train()
        with simulate_accumulators(model, spec, gradient="recursive"):
            model(x).square().sum().backward()
        assert layer.weight.grad is not None and bool(layer.weight.grad.isfinite().all())
        if layer.groups == 1:
            with pytest.raises(A2QInputError,
                               match=r"'1'.*per channel.*per tensor.*\{'1': None\}"):
                with simulate_accumulators(model, "int12-sat"), torch.no_grad():
                    model(x)
    assert events > 0, "the cases must lose an addend or overflow somewhere"


@pytest.mark.parametrize("spec", ["int9-sat", "int9-sat-c5", "fp8-e4m3-c4"])
def test_layer_ste_gradient_is_the_exact_layers(spec):
    """The identity STE of every layer type, with saturating outputs: for a fixed dL/dY, the
    gradients of the input and of the weight equal plain autograd through the same Brevitas
    layer without the simulation."""
    from brevitas.nn import QuantConv1d, QuantConv2d, QuantIdentity, QuantLinear
    from brevitas.quant import Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    torch.manual_seed(4)
    w = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, bias=True)
    cases = [(QuantConv2d(4, 6, 3, stride=2, dilation=2, padding=1, groups=2, **w), (2, 4, 9, 9)),
             (QuantConv1d(3, 4, 5, stride=2, padding=2, **w), (2, 3, 11)),
             (QuantLinear(20, 5, **w), (2, 3, 20))]
    for layer, shape in cases:
        model = torch.nn.Sequential(QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=8,
                                                  return_quant_tensor=True), layer).train()
        x = torch.rand(shape) * 4
        grads = []
        for simulate in (False, True):
            model.zero_grad()
            xr = x.clone().requires_grad_()
            with simulate_accumulators(model, spec) if simulate else contextlib.nullcontext() \
                    as stats:
                y = model(xr)
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
            (y * dy).sum().backward()
            grads.append((xr.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        layer_stats = next(iter(stats.layers.values()))
        assert layer_stats.overflow_events + layer_stats.swamping_events > 0, \
            "the case must round"
        for exact, simulated in zip(*grads, strict=True):
            torch.testing.assert_close(simulated, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["immediate", "recursive"])
@pytest.mark.parametrize("spec", ["int9-sat", "int10-sat-c8", "fp10-e4m5", "fp9-e4m4-c5"])
@pytest.mark.parametrize("block_values", [1, 2**19])  # one sample per block / all at once
def test_convolution_fine_grained_gradients_match_reference_masks(spec, mode, block_values,
                                                                   monkeypatch):
    """A whole convolution's fine-grained gradients (the input's and the weight's, groups,
    stride, dilation, padding, 1-d and 2-d) equal the masked sums of the reference loops'
    events (Python integers, exact fractions) over F.unfold's columns and F.fold's adjoint;
    the backward pass keeps nothing of the unfolded input's size; and the forward values are
    the evaluation path's, bit for bit."""
    from brevitas.nn import QuantConv1d, QuantConv2d
    from brevitas.quant import Int8WeightPerTensorFloat
    from brevitas.quant_tensor import IntQuantTensor

    from brevitas_a2q.sim import conv_gradients, kernels

    if not kernels.available():
        pytest.skip("numba kernels unavailable: the whole-layer gradient runs on them")
    monkeypatch.setattr(conv_gradients, "ROW_BLOCK_VALUES", block_values)
    cfg = parse_accumulator(spec, gradient=mode)
    w = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=4, bias=False)
    cases = [(QuantConv2d(4, 6, 3, stride=2, dilation=2, padding=1, groups=2, **w), (2, 4, 9, 9)),
             (QuantConv2d(5, 5, 3, padding=1, groups=5, **w), (2, 5, 6, 6)),  # depthwise
             (QuantConv1d(3, 4, 5, stride=2, padding=2, **w), (3, 3, 11))]
    gen = torch.Generator().manual_seed(5)
    saved: list[int] = []  # the numel of each tensor autograd keeps for the backward pass
    for layer, shape in cases:
        x_int = torch.randint(0, 256, shape, generator=gen).double()
        w_int = torch.randint(-7, 8, layer.weight.shape, generator=gen).double()
        x_scale, w_scale = (0.5 if cfg.kind == "int" else 2.0**-5), 0.25
        xr = (x_int * x_scale).float().requires_grad_()
        wr = (w_int * w_scale).float().requires_grad_()
        zero = torch.zeros(())
        x_qt = IntQuantTensor(xr, torch.tensor(x_scale), zero, torch.tensor(8.0), False, True)
        w_qt = IntQuantTensor(wr, torch.tensor(w_scale), zero, torch.tensor(4.0), True, True)
        saved.clear()
        with simulate_accumulators(layer, cfg), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = layer.inner_forward_impl(x_qt, w_qt, None)
        with simulate_accumulators(layer, cfg), torch.no_grad():
            assert torch.equal(y.detach(), layer.inner_forward_impl(x_qt, w_qt, None))
        dy = torch.randn(y.shape, generator=gen)
        (y * dy).sum().backward()

        one_d = len(shape) == 3
        x4, y4 = (x_int.unsqueeze(2), dy.unsqueeze(2)) if one_d else (x_int, dy)
        kernel = (1, *layer.kernel_size) if one_d else layer.kernel_size
        geo = {k: (1, *getattr(layer, k)) if one_d else getattr(layer, k)
               for k in ("stride", "dilation")}
        geo["padding"] = (0, *layer.padding) if one_d else layer.padding
        cols = F.unfold(x4, kernel, **geo).transpose(1, 2).reshape(-1, shape[1] * math.prod(kernel))
        g_rows = y4.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
        k, outs = math.prod(layer.weight.shape[1:]), layer.out_channels // layer.groups
        gx_cols, gw = torch.zeros_like(cols), torch.zeros_like(w_int).reshape(w_int.shape[0], -1)
        for group in range(layer.groups):
            c, o = slice(group * k, (group + 1) * k), slice(group * outs, (group + 1) * outs)
            wg = w_int[o].reshape(outs, -1)
            # an integer accumulator adds the integers, a floating-point one the values
            masks = _reference_masks(cols[:, c], wg, cfg, mode) if cfg.kind == "int" else \
                _reference_masks(cols[:, c] * x_scale, wg * w_scale, cfg, mode)
            gx_cols[:, c], gw[o] = _masked_grads(cols[:, c] * x_scale, wg * w_scale,
                                                 g_rows[:, o], masks)
        gx = F.fold(gx_cols.reshape(shape[0], -1, cols.shape[1]).transpose(1, 2),
                    x4.shape[2:], kernel, **geo)
        assert bool((torch.tensor(masks) == 0).any()), "the case must cut some products"
        # float32 sums: the exact part and the cuts, each rounded (at 1e-6 of the largest)
        torch.testing.assert_close(xr.grad.double(), gx.reshape(shape), rtol=1e-5,
                                   atol=1e-6 * float(gx.abs().max()))
        torch.testing.assert_close(wr.grad.double(), gw.reshape(w_int.shape), rtol=1e-5,
                                   atol=1e-6 * float(gw.abs().max()))
        assert max(saved) < cols.numel(), "the unfolded input is kept for the backward pass"


# ----------------------------------------------------------------------------------------------
# A2Q's guarantee on real data


def _train(quant, bits, epochs=3, seed=0):
    from brevitas_a2q.train.loop import train_epochs

    torch.manual_seed(seed)
    train, test = load_digits()
    model = build_cnn(quant, acc_bits=bits)
    train_epochs(model, train, epochs=epochs, lr=1e-2, progress=False, seed=seed)
    return model.eval(), test


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["a2q", "a2q+"])
def test_a2q_models_never_overflow_at_their_target(quant):
    from brevitas_a2q.sim.evaluate import evaluate_accuracy

    bits = 12
    model, test = _train(quant, bits)
    exact, _ = evaluate_accuracy(model, test)
    assert exact > 0.5, "the A2Q model must have learned something for the check to mean much"
    for spec in [f"int{bits}-wrap", f"int{bits}-sat"]:
        acc, stats = evaluate_accuracy(model, test, spec)
        assert stats.total_overflow_events == 0, stats.to_dict()
        assert acc == exact


@pytest.mark.slow
def test_unconstrained_model_overflows_at_same_target():
    from brevitas_a2q.sim.evaluate import evaluate_accuracy

    model, test = _train("none", 12)
    _, stats = evaluate_accuracy(model, test, "int12-wrap")
    assert stats.total_overflow_events > 0
    assert stats.layers["conv1"].overflow_rate > 0


@pytest.mark.slow
def test_finetune_under_simulated_accumulator_runs_and_learns():
    from brevitas_a2q.sim.evaluate import evaluate_accuracy, finetune

    torch.manual_seed(0)
    train, test = load_digits()
    model = build_mlp("none")
    before, _ = evaluate_accuracy(model, test, "fp12-e4m7-c16")
    losses = finetune(model, train, "fp12-e4m7-c16", epochs=2, lr=1e-2, gradient="recursive",
                      progress=False)
    after, _ = evaluate_accuracy(model, test, "fp12-e4m7-c16")
    assert losses[-1] < losses[0]
    assert after > max(before, 0.6)
    assert not any("inner_forward_impl" in vars(m) for m in model.modules())


@pytest.mark.parametrize("spec", ["int8-sat", "int10-sat-c4", "fp8-e3m4", "fp12-e4m7-c4",
                                  "fp10-e3m6-rz", "fp12-e4m7-b3", "fp6-e2m3"])
@pytest.mark.parametrize("seed", range(6))
def test_fast_path_equals_the_step_by_step_chain(spec, seed):
    # the fast path (no per-step events needed) must give the same bits and counts as the loop

    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 8, (7, 37), generator=gen).double() * (0.5 if seed % 2 else 1.0)
    x[x.abs() < 2] = 0.0  # exact zeros, which the fast path skips
    w = torch.randint(-7, 8, (5, 37), generator=gen).double() * (2.0 ** (seed - 3))
    cfg = parse_accumulator(spec)
    fast, slow = _run_chain(x, w, cfg), _run_chain(x, w, cfg, fast=False)
    assert torch.equal(fast.y.view(torch.int64), slow.y.view(torch.int64))
    for count in ("overflow_events", "overflow_outputs", "swamping_events", "underflow_events"):
        assert getattr(fast, count) == getattr(slow, count), count


# (input shape, kernel, stride, dilation, padding) of convolutions to unfold: overlapping and
# disjoint windows, 1-D shapes
UNFOLD_GEOMETRIES = [
    ((2, 3, 9, 11), (3, 2), (2, 1), (1, 2), (1, 0)),
    ((1, 4, 1, 17), (1, 5), (1, 3), (1, 2), (0, 2)),
    ((3, 5, 8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 2, 7, 7), (2, 2), (3, 3), (2, 2), (2, 2))]


def _unfolded_size(shape, kernel, stride, dilation, padding) -> list[int]:
    return [(shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


@pytest.mark.parametrize("shape,kernel,stride,dilation,padding", UNFOLD_GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_im2col_rows_are_unfolds_columns(shape, kernel, stride, dilation, padding, dtype):
    # the simulation's unfolding without a gradient (unfold.im2col, any dtype): F.unfold's
    # columns as rows, in its order, which the weights' (O, C * kh * kw) layout relies on
    from brevitas_a2q.sim.unfold import im2col

    x = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    cols = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)
    size = _unfolded_size(shape, kernel, stride, dilation, padding)
    rows = im2col(x, kernel, stride, dilation, padding, size)
    assert rows.dtype == dtype
    assert torch.equal(rows.float(), cols.transpose(1, 2).reshape(-1, cols.shape[1]))


@pytest.mark.parametrize("shape,kernel,stride,dilation,padding", UNFOLD_GEOMETRIES)
@pytest.mark.parametrize("groups", [1, "depthwise"])
def test_grouped_operands_are_unfolds_columns_and_their_gradient_its(shape, kernel, stride,
                                                                     dilation, padding, groups):
    """The grouped kernel's operands (sim.grouped.per_group_operands, from the channels-last
    windows): each group's F.unfold columns; the backward pass's fold of them gives F.unfold's
    input gradient bit for bit."""
    from brevitas_a2q.sim.grouped import _channels_last, per_group_operands
    from brevitas_a2q.sim.unfold import ConvWindows, fold_channels_last

    groups = shape[1] if groups == "depthwise" else groups
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    size = _unfolded_size(shape, kernel, stride, dilation, padding)
    windows = ConvWindows(kernel, stride, dilation, padding, tuple(size))
    x_kg = per_group_operands(x.detach(), windows, groups)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (R, groups * K)
    assert torch.equal(x_kg, rows.detach().reshape(rows.shape[0], groups, -1).transpose(1, 2))
    g_kg = torch.randn(x_kg.shape, generator=gen)
    ours = fold_channels_last(_channels_last(g_kg, shape[1]), shape, *windows)
    (theirs,) = torch.autograd.grad(rows, x, g_kg.transpose(1, 2).reshape(rows.shape))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape,kernel,stride,dilation,padding", UNFOLD_GEOMETRIES)
def test_unfold_gradient_is_unfolds(shape, kernel, stride, dilation, padding):
    # the fine-grained modes unfold through unfold.Unfold: its backward pass (the adjoint of
    # im2col) gives F.unfold's input gradient bit for bit, overlapping windows included
    from brevitas_a2q.sim.unfold import Unfold

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    size = _unfolded_size(shape, kernel, stride, dilation, padding)
    rows = Unfold.apply(x, kernel, stride, dilation, padding, size)
    g = torch.randn(rows.shape, generator=gen)
    (ours,) = torch.autograd.grad(rows, x, g)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    g_cols = g.reshape(shape[0], -1, cols.shape[1]).transpose(1, 2)
    (theirs,) = torch.autograd.grad(cols, x, g_cols)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", ["int9-sat", "int9-sat-c5", "int8-wrap"])
def test_depthwise_integer_layers_take_an_input_quantized_per_channel(spec, monkeypatch):
    """A depthwise convolution reads one channel a group, so each output's products share that
    channel's scale, and an integer accumulator simulates it behind an input quantized per
    channel: equal to the Python-integer loop on Brevitas's own integers (``.int()``) scaled
    by each output's input and weight scales, bit for bit, events counted alike; its
    fine-grained gradients, every group in one kernel call, equal those of one chain per
    group."""
    from brevitas.nn import QuantConv2d
    from brevitas.quant import Int8WeightPerChannelFloat

    torch.manual_seed(8)
    cfg = parse_accumulator(spec)
    w = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=4, bias=False)
    events = 0
    for layer in (QuantConv2d(6, 6, 3, padding=1, groups=6, **w),
                  QuantConv2d(6, 12, 3, stride=2, padding=1, groups=6, **w)):  # 2 outputs a group
        model = torch.nn.Sequential(_per_channel_relu(6), layer).eval()
        x = torch.rand(2, 6, 8, 8) ** 2 * 30
        with torch.no_grad():
            qx, qw = model[0](x), layer.quant_weight()
        xi, wi = (t.int().numpy().astype(np.int64) for t in (qx, qw))
        if cfg.is_wrap:
            exact, _ = _saturating_layer_oracle(layer, xi, wi, 62, None)
            expected = wrap_int64(exact, cfg.bits)
            n_events = int((expected != exact).sum())  # the outputs out of range
        else:
            expected, n_events = _saturating_layer_oracle(layer, xi, wi, cfg.bits, cfg.chunk_size)
        x_scale = qx.scale.reshape(-1).repeat_interleave(layer.out_channels // 6)  # per output
        w_scale = qw.scale.reshape(-1)
        # wraparound rescales in float32, as the layer does; the chains in float64
        scale = (x_scale * w_scale).numpy() if cfg.is_wrap else \
            (x_scale.double() * w_scale.double()).numpy()
        expected = expected.astype(scale.dtype) * scale.reshape(1, -1, 1, 1)
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            y = model(x)
        assert np.array_equal(y.numpy(), expected.astype(np.float32)), layer
        assert next(iter(stats.layers.values())).overflow_events == n_events, layer
        events += n_events
        grads = []
        for applies in (grouped.applies, lambda *args: False):
            monkeypatch.setattr(grouped, "applies", applies)
            layer.weight.grad = None
            model.train()
            with simulate_accumulators(model, spec, gradient="immediate"):
                model(x).square().sum().backward()
            grads.append(layer.weight.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert events > 0, "the cases must overflow somewhere"


@pytest.mark.parametrize("spec", ["fp12-e4m7-c16", "int10-sat"])
def test_brevitas_mobilenet_v1_as_shipped_simulates(spec, monkeypatch):
    """Brevitas's MobileNetV1 as its example defines it (activations before the depthwise
    convolutions quantized per channel, a stride-2 depthwise convolution), small, an input
    quantizer in front: every layer simulates; its depthwise convolutions, every group in one
    kernel call, give the outputs and event counts of one chain per group, bit for bit, and a
    ``recursive`` fine-grained training step runs."""
    from brevitas.nn import QuantIdentity
    from brevitas.quant import Int8ActPerTensorFloat
    from brevitas_examples.imagenet_classification.models.mobilenetv1 import MobileNet

    torch.manual_seed(7)
    net = MobileNet(channels=[[8], [16], [32]], first_stage_stride=False, act_bit_width=4,
                    weight_bit_width=4, avg_pool_kernel_size=4, num_classes=10)
    model = torch.nn.Sequential(QuantIdentity(act_quant=Int8ActPerTensorFloat,
                                              return_quant_tensor=True), net)
    x = torch.randn(2, 3, 16, 16)

    def forward():
        model.eval()
        with simulate_accumulators(model, spec) as stats, torch.no_grad():
            return model(x), stats.to_dict()

    y, stats = forward()
    assert len(stats["layers"]) == 6 and not stats["skipped"], stats["skipped"]
    assert sum(layer["swamping_events"] + layer["overflow_events"]
               for layer in stats["layers"]) > 0
    monkeypatch.setattr(grouped, "applies", lambda *args: False)
    y_per_group, stats_per_group = forward()
    assert torch.equal(y, y_per_group) and stats == stats_per_group
    monkeypatch.undo()
    model.train()
    with simulate_accumulators(model, spec, gradient="recursive"):
        model(x).square().sum().backward()
    dw = net.features.stage2.unit1.dw_conv.conv
    assert dw.groups == 16 and dw.stride == (2, 2) and bool(dw.weight.grad.abs().sum() > 0)
