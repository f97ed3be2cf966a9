"""Simulated low bit-width accumulators for any Brevitas model's quantized Linear/Conv layers.

Inside ``with simulate_accumulators(model, "int12-sat") as stats:`` every ``QuantLinear``,
``QuantConv1d`` and ``QuantConv2d`` computes its dot products as a ``P``-bit integer accumulator
(two's-complement wraparound or saturation) or a low-precision floating-point accumulator would,
and ``stats`` counts overflow (and, for floating point, swamping/underflow) events per layer. The
layers' forward is restored on exit. This is the evaluation and fine-tuning method of Blumenfeld,
Hubara, Soudry, "Towards Cheaper Inference in Deep Networks with Lower Bit-Width Accumulators",
ICLR 2024 (arXiv:2401.14110), and the tool that shows what happens to a model that is not
overflow-safe (A2Q, arXiv:2308.13504, guarantees there is nothing to see).

What is accumulated
    The layer's quantized input ``x`` (an ``IntQuantTensor``: ``x.value / x.scale`` are integers,
    i.e. the codes minus the zero point) and its quantized weights (``quant_weight()``, integers
    ``value / scale`` per output channel). Integer accumulators sum the integer products
    ``x_int[k] * w_int[o, k]``; the result is rescaled by ``input_scale * weight_scale[o]``.
    Floating-point accumulators sum the real-valued products ``x.value[k] * w.value[o, k]``
    (each exact in float64) in the low-precision format (:class:`FloatFormat`). The bias (if any,
    as Brevitas quantizes it) is added after accumulation, in float32, as is the layer's output
    quantizer. The input scale must be per tensor.

Order of accumulation (matters for saturation and floating point; wraparound is associative)
    A convolution is unfolded to matrix form, ``(batch * positions, K) x (K, out)``, with
    ``K = in_channels/groups * kernel`` in PyTorch's ``unfold`` order (input channel major, then
    kernel rows, then columns). With ``chunk_size = C`` the ``K`` products are split into
    consecutive chunks of ``C``; each chunk is a sequential chain ``acc = A(acc + p_k)`` from
    ``acc = 0`` in increasing ``k``, then the chunk results are added sequentially, in chunk
    order, in the same accumulator ``A`` (``A`` = clamp to ``[-2^(P-1), 2^(P-1) - 1]``, or rounding
    to the float format: fused multiply-add, one rounding per addition). Without ``chunk_size``
    the whole row is one chain.

Events
    * integer wraparound: an output is an overflow event when its exact sum is outside the
      ``P``-bit range (the wrapped result is then wrong; intermediate wraps that cancel are
      harmless and not counted).
    * integer saturation / floating point: every addition whose exact result is outside the range
      (saturated) is an overflow event; for floating point, a *swamping* event is an addition
      whose exact result differs from the accumulator but which leaves it unchanged (and did not
      overflow), an
      *underflow* event an addition whose non-zero exact result rounds to zero (a non-zero
      addend to a zero accumulator that stays zero is both).

Gradients (``gradient=``)
    * ``"ste"``: identity straight-through estimator. The backward pass is that of the exact
      (unsimulated) layer: ``dL/dx`` and ``dL/dw`` as if the accumulator were exact.
    * ``"immediate"``: fine-grained STE (Blumenfeld et al., Sec. 4). An addition with an event
      (overflow/saturation, swamping, underflow) passes no gradient to its addend: a product
      ``x_k * w_ok`` whose own addition had an event gets zero gradient, and so do all products of
      a chunk whose addition to the running total had an event. Gradient through the running sum
      is kept.
    * ``"recursive"``: an event also stops the gradient through the running sum, so it reaches no
      product added at or before it: product ``k`` of chunk ``c`` gets gradient iff no addition at
      position ``>= k`` in chunk ``c`` and no chunk addition at chunk ``>= c`` had an event.
    For wraparound only the final result can be wrong, so both fine-grained modes give zero
    gradient to every product of an output that overflowed (and identity otherwise).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from brevitas.nn import QuantConv1d, QuantConv2d, QuantLinear
from brevitas.quant_tensor import IntQuantTensor, QuantTensor
from torch import Tensor, nn

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.float_accumulator import FloatFormat

__all__ = [
    "GRADIENT_MODES",
    "AccumulatorConfig",
    "LayerStats",
    "SimulationStats",
    "evaluate_accuracy",
    "finetune",
    "parse_accumulator",
    "simulate_accumulators",
    "simulate_matmul",
]

GRADIENT_MODES = ("ste", "immediate", "recursive")
_BLOCK_ELEMENTS = 1 << 17  # elements per vectorized step; keeps the working set in cache


@dataclass(frozen=True)
class AccumulatorConfig:
    """One simulated accumulator.

    ``kind="int"``: ``bits`` = P signed bits, ``overflow`` ``"wrap"`` or ``"saturate"``.
    ``kind="float"``: ``exp_bits``, ``man_bits`` (``bits`` = 1 + E + M), ``exp_bias``,
    ``rounding``. ``chunk_size``: partial sums over chunks of that many products, then combined
    (see the module docstring). ``gradient``: one of :data:`GRADIENT_MODES`.
    """

    kind: str = "int"
    bits: int = 16
    overflow: str = "wrap"
    chunk_size: int | None = None
    exp_bits: int | None = None
    man_bits: int | None = None
    exp_bias: int | None = None
    rounding: str = "nearest"
    gradient: str = "ste"

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float"):
            raise A2QInputError(f"accumulator kind must be 'int' or 'float', got {self.kind!r}")
        if self.kind == "int":
            if not 2 <= int(self.bits) <= 52:
                raise A2QInputError(f"integer accumulator bits must be 2..52, got {self.bits}")
            if self.overflow not in ("wrap", "saturate"):
                raise A2QInputError(f"integer overflow must be 'wrap' or 'saturate', got "
                                    f"{self.overflow!r}")
        else:
            if self.exp_bits is None or self.man_bits is None:
                raise A2QInputError("a floating-point accumulator needs exp_bits and man_bits")
            if self.bits != 1 + self.exp_bits + self.man_bits:
                raise A2QInputError(f"floating-point accumulator: {self.bits} bits != 1 + "
                                    f"{self.exp_bits} + {self.man_bits}")
            FloatFormat(self.exp_bits, self.man_bits, self.exp_bias, self.rounding)
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise A2QInputError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.gradient not in GRADIENT_MODES:
            raise A2QInputError(f"gradient must be one of {', '.join(GRADIENT_MODES)}, got "
                                f"{self.gradient!r}")

    @property
    def float_format(self) -> FloatFormat:
        return FloatFormat(self.exp_bits, self.man_bits, self.exp_bias, self.rounding)

    @property
    def is_wrap(self) -> bool:
        return self.kind == "int" and self.overflow == "wrap"

    @property
    def spec(self) -> str:
        """The short name :func:`parse_accumulator` reads back."""
        if self.kind == "int":
            s = f"int{self.bits}-{'wrap' if self.overflow == 'wrap' else 'sat'}"
        else:
            s = f"fp{self.bits}-e{self.exp_bits}m{self.man_bits}"
            if self.exp_bias is not None:
                s += f"-b{self.exp_bias}"
            if self.rounding == "toward_zero":
                s += "-rz"
        if self.chunk_size is not None:
            s += f"-c{self.chunk_size}"
        return s


_SPEC = re.compile(r"^(?:int(?P<ibits>\d+)-(?P<ovf>wrap|sat)"
                   r"|fp(?P<fbits>\d+)-e(?P<e>\d+)m(?P<m>\d+))(?P<opts>(?:-[a-z]+-?\d*)*)$")


def parse_accumulator(spec: str | AccumulatorConfig, gradient: str = "ste") -> AccumulatorConfig:
    """Parse ``int<P>-wrap``, ``int<P>-sat``, ``fp<T>-e<E>m<M>`` with optional suffixes ``-c<C>``
    (chunk size), and for floating point ``-b<B>`` (exponent bias) and ``-rz`` (round toward zero;
    default round to nearest even). Examples: ``int12-wrap``, ``int12-sat-c64``,
    ``fp12-e4m7``, ``fp12-e4m7-c16-rz``."""
    if isinstance(spec, AccumulatorConfig):
        return spec
    m = _SPEC.match(str(spec).strip().lower())
    if not m:
        raise A2QInputError(
            f"cannot read accumulator {spec!r}: use int<P>-wrap, int<P>-sat or fp<T>-e<E>m<M> "
            "(T = 1 + E + M), optionally followed by -c<chunk>, and for floating point -b<bias> "
            "or -rz, e.g. int12-wrap, int12-sat-c64, fp12-e4m7")
    kwargs: dict = {"gradient": gradient}
    if m["ibits"]:
        kwargs.update(kind="int", bits=int(m["ibits"]),
                      overflow="wrap" if m["ovf"] == "wrap" else "saturate")
    else:
        kwargs.update(kind="float", bits=int(m["fbits"]), exp_bits=int(m["e"]),
                      man_bits=int(m["m"]))
    for opt in filter(None, m["opts"].split("-")):
        if re.fullmatch(r"c\d+", opt):
            kwargs["chunk_size"] = int(opt[1:])
        elif re.fullmatch(r"b-?\d+", opt) and kwargs["kind"] == "float":
            kwargs["exp_bias"] = int(opt[1:])
        elif opt == "rz" and kwargs["kind"] == "float":
            kwargs["rounding"] = "toward_zero"
        else:
            raise A2QInputError(f"accumulator {spec!r}: unknown option -{opt}")
    return AccumulatorConfig(**kwargs)


# ----------------------------------------------------------------------------------------------
# statistics


@dataclass
class LayerStats:
    """Event counts of one layer, summed over every simulated forward pass."""

    name: str
    accumulator: str
    outputs: int = 0  # dot products computed
    additions: int = 0  # multiply-adds (outputs * K)
    overflow_outputs: int = 0  # outputs with at least one overflow event
    overflow_events: int = 0
    swamping_events: int = 0
    underflow_events: int = 0

    @property
    def overflow_rate(self) -> float:
        """Share of outputs with at least one overflow event."""
        return self.overflow_outputs / self.outputs if self.outputs else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overflow_rate"] = self.overflow_rate
        d["swamping_rate"] = self.swamping_events / self.additions if self.additions else 0.0
        return d


@dataclass
class SimulationStats:
    """Per-layer :class:`LayerStats` (``layers``) and layers left unsimulated (``skipped``:
    name -> reason)."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:
        for name, s in self.layers.items():
            self.layers[name] = LayerStats(name, s.accumulator)

    @property
    def total_overflow_events(self) -> int:
        return sum(s.overflow_events for s in self.layers.values())

    def to_dict(self) -> dict:
        return {"layers": [s.to_dict() for s in self.layers.values()],
                "skipped": dict(self.skipped)}


# ----------------------------------------------------------------------------------------------
# the accumulation chain, in matrix form: Y[r, o] = sum_k X[r, k] * W[o, k]


def _int_range(bits: int) -> tuple[float, float]:
    return -float(2 ** (bits - 1)), float(2 ** (bits - 1) - 1)


def _add(cfg: AccumulatorConfig, acc: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor | None,
                                                                   Tensor | None]:
    """One accumulator addition: ``s`` is the exact ``acc + addend``; returns ``(A(s), overflow,
    swamping, underflow)``. Swamping: ``s != acc`` yet the result equals ``acc`` without
    overflow (the addend was lost entirely; includes a tiny addend to a zero accumulator).
    Underflow: ``s != 0`` rounds to 0. The two can coincide."""
    if cfg.kind == "int":
        lo, hi = _int_range(cfg.bits)
        over = (s < lo) | (s > hi)
        return s.clamp_(lo, hi), over, None, None
    r, over = cfg.float_format.quantize(s)
    swamp = (r == acc) & (s != acc) & ~over
    under = (r == 0) & (s != 0)
    return r, over, swamp, under


@dataclass
class _ChainResult:
    y: Tensor  # (R, O) float64
    overflow_events: int = 0
    overflow_outputs: int = 0
    swamping_events: int = 0
    underflow_events: int = 0
    combine_event: Tensor | None = None  # (R, O, nC) bool, for "immediate"
    last_step_event: Tensor | None = None  # (R, O, nC) int, for "recursive"
    last_combine_event: Tensor | None = None  # (R, O) int, for "recursive"
    overflowed: Tensor | None = None  # (R, O) bool, wraparound only
    grad_x: Tensor | None = None
    grad_w: Tensor | None = None


def _chunked(x: Tensor, w: Tensor, chunk: int) -> tuple[Tensor, Tensor, int]:
    """Zero-pad K to a multiple of ``chunk``; return X as (R, C, nC) and W as (O, C, nC), so that
    step ``j`` of every chunk is the contiguous slice ``[:, j]``."""
    k = x.shape[1]
    n_chunks = max(1, math.ceil(k / chunk))
    pad = n_chunks * chunk - k
    if pad:
        x = F.pad(x, (0, pad))
        w = F.pad(w, (0, pad))
    x3 = x.reshape(x.shape[0], n_chunks, chunk).transpose(1, 2).contiguous()
    w3 = w.reshape(w.shape[0], n_chunks, chunk).transpose(1, 2).contiguous()
    return x3, w3, n_chunks


def _row_blocks(rows: int, per_row: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(per_row, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _run_chain(x: Tensor, w: Tensor, cfg: AccumulatorConfig, record: str | None = None,
               grad: Tensor | None = None, grad_factors: tuple[Tensor, Tensor] | None = None,
               keep_chunk: Tensor | None = None, fast: bool = True) -> _ChainResult:
    """Sequential accumulation of ``x @ w.T`` (float64 addend factors), vectorized over rows,
    outputs and chunks, looping over the positions inside a chunk, then over chunks.

    ``record``: ``"immediate"`` stores the chunk-combination events, ``"recursive"`` the index of
    the last event. With ``grad`` (dL/dY, (R, O)) the pass also computes the "immediate"
    fine-grained gradient w.r.t. the real-valued factors ``grad_factors = (x_val, w_val)``
    (``keep_chunk``: (R, O, nC) chunks whose addition to the total had no event), returned as
    ``res.grad_x`` (R, K), ``res.grad_w`` (O, K). Without either, ``fast`` takes
    :func:`_run_fast` where it applies (same results and counts).
    """
    rows, k = x.shape
    outs = w.shape[0]
    chunk = min(cfg.chunk_size or k, k) if k else 1
    if fast and record is None and grad is None:
        res = _run_fast(x, w, cfg, chunk)
        if res is not None:
            return res
    x3, w3, n_chunks = _chunked(x, w, chunk)
    res = _ChainResult(y=torch.empty(rows, outs, dtype=torch.float64))
    if record == "immediate":
        res.combine_event = torch.zeros(rows, outs, n_chunks, dtype=torch.bool)
    if record == "recursive":
        res.last_step_event = torch.full((rows, outs, n_chunks), -1, dtype=torch.int16)
        res.last_combine_event = torch.full((rows, outs), -1, dtype=torch.int16)
    if grad is not None:
        xg3, wg3, _ = _chunked(grad_factors[0], grad_factors[1], chunk)
        gx3 = torch.zeros(rows, chunk, n_chunks, dtype=torch.float64)
        gw3 = torch.zeros(outs, chunk, n_chunks, dtype=torch.float64)
    n_over = n_swamp = n_under = n_over_out = 0
    need_event = record is not None or grad is not None
    for rb in _row_blocks(rows, outs * n_chunks):
        xb = x3[rb]
        acc = torch.zeros(xb.shape[0], outs, n_chunks, dtype=torch.float64)
        # per-element event counters, summed once per block (cheaper than a reduction per step)
        c_over = torch.zeros(acc.shape, dtype=torch.int32)
        c_swamp = torch.zeros(acc.shape, dtype=torch.int32) if cfg.kind == "float" else None
        c_under = torch.zeros(acc.shape, dtype=torch.int32) if cfg.kind == "float" else None
        if grad is not None:
            g = grad[rb].unsqueeze(-1) * keep_chunk[rb]  # (rb, O, nC)
        for j in range(chunk):
            acc, over, swamp, under = _add(
                cfg, acc, torch.addcmul(acc, xb[:, None, j, :], w3[None, :, j, :]))
            c_over += over
            if swamp is not None:
                c_swamp += swamp
                c_under += under
            if not need_event:
                continue
            event = over if swamp is None else over | swamp | under
            if res.last_step_event is not None:
                res.last_step_event[rb].masked_fill_(event, j)
            if grad is not None:
                gm = g.masked_fill(event, 0.0)
                gx3[rb, j, :] += torch.einsum("roc,oc->rc", gm, wg3[:, j, :])
                gw3[:, j, :] += torch.einsum("roc,rc->oc", gm, xg3[rb, j, :])
        any_over = c_over.any(-1)
        n_over += int(c_over.sum())
        if c_swamp is not None:
            n_swamp += int(c_swamp.sum())
            n_under += int(c_under.sum())
        total = acc[..., 0].clone()
        for c in range(1, n_chunks):
            total, over, swamp, under = _add(cfg, total, total + acc[..., c])
            event = over
            if swamp is not None:
                event = over | swamp | under
                n_swamp += int(swamp.sum())
                n_under += int(under.sum())
            n_over += int(over.sum())
            any_over |= over
            if res.combine_event is not None:
                res.combine_event[rb, :, c] = event
            if res.last_combine_event is not None:
                res.last_combine_event[rb].masked_fill_(event, c)
        res.y[rb] = total
        n_over_out += int(any_over.sum())
    res.overflow_events, res.overflow_outputs = n_over, n_over_out
    res.swamping_events, res.underflow_events = n_swamp, n_under
    if grad is not None:
        res.grad_x = gx3.transpose(1, 2).reshape(rows, -1)[:, :k]
        res.grad_w = gw3.transpose(1, 2).reshape(outs, -1)[:, :k]
    return res


# ----------------------------------------------------------------------------------------------
# fast path (forward only, no per-step event masks): the same float64 operations as _run_chain,
# without per-element masks, with provably idle work left out.

_FAST_BLOCK_ELEMENTS = 1 << 16  # elements per step; larger blocks gain little, smaller lose
_EXP_MASK = 0x7FF << 52


def _fast_rounder(fmt: FloatFormat):
    """``round(s, out, scratch)``: ``out = FloatFormat.quantize(s)`` for in-range ``s``, with the
    same float64 operations, in place and without allocations. ``scratch`` is left holding
    ``2^max(e, emin)`` (nearest) or ``2^(max(e, emin) - M)`` (toward zero), ``e`` the exponent
    of ``s``, as int64 bit patterns."""
    if fmt.rounding == "nearest":
        min_bits = (fmt.min_exponent + 1023) << 52
        magic = 1.5 * 2.0 ** (52 - fmt.man_bits)

        def round_nearest(s: Tensor, out: Tensor, scratch: Tensor) -> None:
            # scratch = 2^max(exponent(s), emin); out = (s + c) - c with c = magic * scratch
            torch.bitwise_and(s.view(torch.int64), _EXP_MASK, out=scratch).clamp_(min=min_bits)
            power = scratch.view(torch.float64)
            torch.add(s, power, alpha=magic, out=out).sub_(power, alpha=magic)

        return round_nearest
    min_bits = (fmt.min_exponent - fmt.man_bits + 1023) << 52
    shift = fmt.man_bits << 52

    def round_toward_zero(s: Tensor, out: Tensor, scratch: Tensor) -> None:
        torch.bitwise_and(s.view(torch.int64), _EXP_MASK, out=scratch).sub_(shift)
        quantum = scratch.clamp_(min=min_bits).view(torch.float64)
        torch.div(s, quantum, out=out).trunc_().mul_(quantum)

    return round_toward_zero


def _l1_bound(x: Tensor, w: Tensor) -> Tensor:
    """Per row, ``L = sum_k |x_k| max_o |w_ok|`` >= every ``sum_k |x_k w_ok|``."""
    return x.abs() @ w.abs().amax(0)


def _run_fast(x: Tensor, w: Tensor, cfg: AccumulatorConfig, chunk: int) -> _ChainResult | None:
    """:func:`_run_chain` without ``record``/``grad``, bit for bit, or None where that needs
    per-step masks. Integer saturation: rows with ``L <= 2^(P-1) - 1`` (:func:`_l1_bound`)
    cannot saturate, so their exact sum is one matmul; the others go through the chain.
    Floating point: :func:`_run_fast_float`."""
    rows, outs = x.shape[0], w.shape[0]
    if rows == 0 or outs == 0 or x.shape[1] == 0:
        return None
    if cfg.kind == "float":
        return _run_fast_float(x, w, cfg, chunk)
    safe = _l1_bound(x, w) <= _int_range(cfg.bits)[1]
    if not bool(safe.any()):
        return None
    # exact (integers below 2^53); + 0.0 turns a -0 into the chain's +0
    if bool(safe.all()):
        return _ChainResult(y=(x @ w.t()).add_(0.0))
    res = _run_chain(x[~safe], w, cfg, fast=False)
    y = torch.empty(rows, outs, dtype=torch.float64)
    y[safe], y[~safe] = (x[safe] @ w.t()).add_(0.0), res.y
    res.y = y
    return res


def _lanes(x: Tensor, chunk: int, nonzeros: tuple[Tensor, Tensor] | None
           ) -> tuple[Tensor, Tensor, Tensor | None, list[int]]:
    """Each (row, chunk) pair of ``x`` (R, nC * C) is a lane: a chain of up to ``C`` additions
    from zero. Returns the lanes' operands in accumulation order as ``(<= C, L)`` values and their
    columns of ``x`` (int32), where each lane went in that order (None: unsorted), and the steps
    of each sorted lane (``L = R * nC`` lanes, lane ``r * nC + c``, sorted by decreasing number
    of steps). Given ``nonzeros`` (the flat indices of ``x``'s nonzero entries, ascending, and
    their values), zero operands are left out (the rest moved up,
    zero-padded): adding an exact zero changes nothing (round to nearest never yields -0, so
    ``a + (+-0) == a`` bit for bit) and has no event, so this is exact."""
    width = x.shape[1]
    lanes = x.reshape(-1, chunk)
    n_lanes = lanes.shape[0]
    if nonzeros is None:
        cols = (torch.arange(chunk, dtype=torch.int32)[:, None]
                + (torch.arange(n_lanes, dtype=torch.int32) * chunk % width)[None])
        return lanes.t().contiguous(), cols, None, [chunk] * n_lanes
    flat, values = nonzeros  # flat = lane * C + k
    lane = flat // chunk
    steps = torch.bincount(lane, minlength=n_lanes)
    order = torch.argsort(steps, descending=True)
    slot = torch.empty_like(order)
    slot[order] = torch.arange(n_lanes)
    pos = torch.arange(len(flat)) - (steps.cumsum(0) - steps)[lane]  # step within the lane
    dest = pos * n_lanes + slot[lane]
    longest = int(steps.max()) if n_lanes else 0
    vals = torch.zeros(longest, n_lanes, dtype=x.dtype)
    vals.view(-1)[dest] = values
    cols = torch.zeros(longest, n_lanes, dtype=torch.int32)
    cols.view(-1)[dest] = (flat % width).to(torch.int32)
    return vals, cols, slot, steps[order].tolist()


def _run_fast_float(x: Tensor, w: Tensor, cfg: AccumulatorConfig,
                    chunk: int) -> _ChainResult | None:
    """Floating-point chain, forward only. The chunks' chains run as independent lanes
    (:func:`_lanes`; zero products skipped under round to nearest), then the chunk results are
    added in chunk order, with the rounding of :class:`FloatFormat` as integer bit operations.
    No saturation is applied: when ``L`` (:func:`_l1_bound`), grown by the worst rounding,
    may exceed the largest value, every addition's exponent is checked to be below the top
    binade (``|s| < 2^emax``, so nothing overflowed), and None is returned if one is not.
    Events are counted with reductions: swamping ``(A(s) == a) & (s != a)`` as
    ``#(s != a) - #(A(s) != a)``, underflow ``(A(s) == 0) & (s != 0)`` as
    ``#(s != 0) - #(A(s) != 0)`` (``s == a`` implies ``A(s) == a``: ``a`` is representable)."""
    rows, k = x.shape
    outs = w.shape[0]
    fmt = cfg.float_format
    n_chunks = math.ceil(k / chunk)
    pad = n_chunks * chunk - k
    if pad:
        x, w = F.pad(x, (0, pad)), F.pad(w, (0, pad))
    # |A(a + p)| <= (|a| + |p|)(1 + 2^-52)(1 + 2^-M) + u, u the subnormal spacing
    u = 2.0 ** (fmt.min_exponent - fmt.man_bits)
    growth = ((1 + 2.0**-52) * (1 + 2.0**-fmt.man_bits)) ** (chunk + n_chunks) * (1 + 1e-6)
    xa, wa = x.abs(), w.abs()
    l1 = float((xa @ wa.amax(0)).max())  # as _l1_bound
    bound = (l1 * (1 + 1e-6) + (k + pad + n_chunks) * u) * growth
    check = bound > fmt.max_value
    top = (fmt.max_exponent + 1023) << 52  # the exponent field of 2^emax, in scratch's terms:
    if fmt.rounding != "nearest":
        top -= fmt.man_bits << 52
    exps: list[Tensor] = []  # with check: the largest exponent field of each addition
    # fl64(a + p) == a iff p == 0 when no non-zero product is below half an ulp of any
    # |a| < 2^(emax + 1) (which the bound guarantees or the check verifies)
    del xa
    nonzero = x != 0
    flat = nonzero.view(-1).nonzero().squeeze(1)
    nonzeros = (flat, x.reshape(-1)[flat])
    x_min = float(nonzeros[1].abs().amin()) if len(flat) else math.inf
    w_min = float(wa.masked_fill_(wa == 0, math.inf).amin())
    analytic = x_min * w_min > 2.0 ** (fmt.max_exponent + 1 - 52)
    nearest = fmt.rounding == "nearest"
    counts: dict[str, list[Tensor]] = {"s!=a": [], "r!=a": [], "s!=0": [], "r!=0": []}
    if analytic:  # #(p != 0) over all products
        counts["s!=a"].append(nonzero.sum(0) @ (w != 0).sum(0))
    rnd = _fast_rounder(fmt)
    # round to nearest never makes a -0 here (a starts at +0; x - x = +0), so the int64 bit
    # patterns are zero exactly where the values are: a cheaper count
    bits = (lambda t: t.view(torch.int64)) if nearest else (lambda t: t)

    def add(acc: Tensor, s: Tensor, r: Tensor, diff: Tensor, sc: Tensor, exact: bool) -> None:
        rnd(s, r, sc)
        if check:
            exps.append(torch.amax(sc))
        if not exact:
            counts["s!=a"].append(torch.count_nonzero(bits(torch.sub(s, acc, out=diff))))
        counts["r!=a"].append(torch.count_nonzero(bits(torch.sub(r, acc, out=diff))))
        counts["s!=0"].append(torch.count_nonzero(bits(s)))
        counts["r!=0"].append(torch.count_nonzero(bits(r)))

    def overflowed() -> bool:
        return bool(exps) and int(torch.stack(exps).max()) >= top

    vals, cols, slot, steps = _lanes(x, chunk, nonzeros if nearest else None)
    del nonzero, nonzeros, flat
    w_cols = w.t().contiguous()  # (nC * C, O)
    n_lanes = rows * n_chunks
    sorted_parts = torch.empty(n_lanes, outs, dtype=torch.float64)
    step = max(1, _FAST_BLOCK_ELEMENTS // outs)
    size = min(step, n_lanes) * outs
    bufs = [torch.empty(size, dtype=torch.float64) for _ in range(5)]
    scratch = torch.empty(size, dtype=torch.int64)
    for start in range(0, n_lanes, step):
        stop = min(n_lanes, start + step)
        acc, s, out, diff, wg = (b[:(stop - start) * outs].view(-1, outs) for b in bufs)
        sc = scratch[:(stop - start) * outs].view(-1, outs)
        acc.zero_()
        for j in range(steps[start]):  # lanes sorted by decreasing number of steps
            torch.index_select(w_cols, 0, cols[j, start:stop], out=wg)
            torch.addcmul(acc, vals[j, start:stop, None], wg, out=s)
            add(acc, s, out, diff, sc, analytic)
            acc, out = out, acc
        sorted_parts[start:stop] = acc
        if overflowed():
            return None
    if n_chunks == 1:
        y = sorted_parts if slot is None else sorted_parts.index_select(0, slot)
    else:  # add the chunk results in order; chunk c of row r is sorted lane slot[r * nC + c]
        lane_of = torch.arange(rows * n_chunks) if slot is None else slot
        lane_of = lane_of.view(rows, n_chunks).t().contiguous()
        y = torch.empty(rows, outs, dtype=torch.float64)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            total, part, s, out, diff = (b[:(stop - start) * outs].view(-1, outs) for b in bufs)
            sc = scratch[:(stop - start) * outs].view(-1, outs)
            torch.index_select(sorted_parts, 0, lane_of[0, start:stop], out=total)
            for c in range(1, n_chunks):
                torch.index_select(sorted_parts, 0, lane_of[c, start:stop], out=part)
                torch.add(total, part, out=s)
                add(total, s, out, diff, sc, False)
                total, out = out, total
            y[start:stop] = total
    if overflowed():
        return None
    n = {key: int(torch.stack(v).sum()) if v else 0 for key, v in counts.items()}
    return _ChainResult(y=y, swamping_events=n["s!=a"] - n["r!=a"],
                        underflow_events=n["s!=0"] - n["r!=0"])


def _recursive_grads(x: Tensor, w: Tensor, g: Tensor, chunk: int, last_step: Tensor,
                     last_combine: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the "recursive" fine-grained STE: product (c, j) of output (r, o) passes
    ``g[r, o]`` iff ``j > last_step[r, o, c]`` and ``c > last_combine[r, o]``."""
    rows, k = x.shape
    outs = w.shape[0]
    x3, w3, n_chunks = _chunked(x, w, chunk)
    gx3 = torch.zeros(rows, chunk, n_chunks, dtype=x.dtype)
    gw3 = torch.zeros(outs, chunk, n_chunks, dtype=x.dtype)
    chunk_ids = torch.arange(n_chunks)
    for rb in _row_blocks(rows, outs * n_chunks):
        keep_chunk = chunk_ids > last_combine[rb].unsqueeze(-1)  # (rb, O, nC)
        gb = g[rb].unsqueeze(-1) * keep_chunk
        lsb = last_step[rb]
        for j in range(chunk):
            gm = gb.masked_fill(lsb >= j, 0.0)
            gx3[rb, j, :] += torch.einsum("roc,oc->rc", gm, w3[:, j, :])
            gw3[:, j, :] += torch.einsum("roc,rc->oc", gm, x3[rb, j, :])
    return (gx3.transpose(1, 2).reshape(rows, -1)[:, :k],
            gw3.transpose(1, 2).reshape(outs, -1)[:, :k])


class _FineGrainedChain(torch.autograd.Function):
    """Forward: the simulated result (given). Backward: the config's fine-grained STE, w.r.t. the
    real-valued factors ``x_val`` (R, K) and ``w_val`` (O, K)."""

    @staticmethod
    def forward(ctx, x_val, w_val, y_sim, addend_x, addend_w, cfg, chain):
        ctx.cfg, ctx.chain = cfg, chain
        ctx.save_for_backward(x_val, w_val, addend_x, addend_w)
        return y_sim.clone()

    @staticmethod
    def backward(ctx, g):
        x_val, w_val, addend_x, addend_w = ctx.saved_tensors
        cfg, chain = ctx.cfg, ctx.chain
        xv, wv, g64 = x_val.double(), w_val.double(), g.double()
        k = x_val.shape[1]
        chunk = min(cfg.chunk_size or k, k) if k else 1
        if cfg.gradient == "recursive":
            gx, gw = _recursive_grads(xv, wv, g64, chunk, chain.last_step_event,
                                      chain.last_combine_event)
        else:  # immediate: re-run the additions to find each product's events
            res = _run_chain(addend_x, addend_w, cfg, grad=g64, grad_factors=(xv, wv),
                             keep_chunk=~chain.combine_event)
            gx, gw = res.grad_x, res.grad_w
        return gx.to(x_val.dtype), gw.to(w_val.dtype), None, None, None, None, None


def simulate_matmul(x_val: Tensor, w_val: Tensor, x_scale: Tensor | float,
                    w_scale: Tensor, cfg: AccumulatorConfig) -> tuple[Tensor, _ChainResult]:
    """``Y[r, o] = sum_k x[r, k] * w[o, k]`` through the simulated accumulator ``cfg``.

    ``x_val`` (R, K) and ``w_val`` (O, K) are the real (dequantized) values, ``x_scale`` a scalar
    and ``w_scale`` (O,) their scales, so ``x_val / x_scale`` and ``w_val / w_scale`` are
    integers. Returns the real-valued result (R, O) in ``x_val``'s dtype, differentiable per
    ``cfg.gradient``, and the event counts.
    """
    x_scale = torch.as_tensor(x_scale, dtype=torch.float64).reshape(())
    w_scale = torch.as_tensor(w_scale, dtype=torch.float64).reshape(-1)
    if cfg.kind == "int":
        ax = torch.round(x_val.detach().double() / x_scale)
        aw = torch.round(w_val.detach().double() / w_scale[:, None])
    else:
        ax, aw = x_val.detach().double(), w_val.detach().double()
    if cfg.is_wrap:
        chain = _wrap_chain(ax, aw, cfg.bits)
    else:
        record = cfg.gradient if cfg.gradient != "ste" and torch.is_grad_enabled() else None
        with torch.no_grad():
            chain = _run_chain(ax, aw, cfg, record=record)
    y = chain.y
    if cfg.kind == "int":
        y = y * (x_scale * w_scale)[None, :]
    y = y.to(x_val.dtype)
    if not (torch.is_grad_enabled() and (x_val.requires_grad or w_val.requires_grad)):
        return y, chain
    if cfg.gradient == "ste":
        exact = x_val @ w_val.t()
        return exact + (y - exact).detach(), chain
    if cfg.is_wrap:
        exact = x_val @ w_val.t()
        ste = exact + (y - exact).detach()
        return torch.where(chain.overflowed, y, ste), chain
    return _FineGrainedChain.apply(x_val, w_val, y, ax, aw, cfg, chain), chain


def _wrap_chain(ax: Tensor, aw: Tensor, bits: int) -> _ChainResult:
    """Exact integer dot products (float64: exact below 2^53), wrapped to ``bits``."""
    exact = ax @ aw.t()
    wrapped, over = _wrap(exact, bits)
    res = _ChainResult(y=wrapped, overflow_events=int(over.sum()),
                       overflow_outputs=int(over.sum()))
    res.overflowed = over
    return res


def _wrap(exact: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Two's-complement wraparound of integer-valued ``exact`` to ``bits``:
    ``(wrapped, overflowed)``."""
    half = 2.0 ** (bits - 1)
    wrapped = torch.remainder(exact + half, 2.0 * half) - half
    return wrapped, wrapped != exact


# ----------------------------------------------------------------------------------------------
# Brevitas layers


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
    cols = F.unfold(x4, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, K, L)
    size = [(x4.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i]
            + 1 for i in range(2)]
    batch = x4.shape[0]
    rows = cols.transpose(1, 2).reshape(batch * cols.shape[2], cols.shape[1])
    one_d = isinstance(layer, QuantConv1d)
    return rows, ("conv", batch, size, one_d)


def _from_matrix(y: Tensor, info: tuple) -> Tensor:
    if info[0] == "linear":
        return y.reshape(*info[1], y.shape[-1])
    _, batch, size, one_d = info
    out = y.reshape(batch, size[0] * size[1], -1).transpose(1, 2).reshape(batch, -1, *size)
    return out.squeeze(-2) if one_d else out


def _integers(name: str, what: str, value: Tensor, scale: Tensor) -> None:
    err = (value.detach() / scale.detach() - torch.round(value.detach() / scale.detach()))
    if err.numel() and float(err.abs().max()) > 1e-3:
        raise A2QInputError(f"layer {name!r}: the {what} is not on an integer grid (value/scale "
                            f"is off by {float(err.abs().max()):.3g}); cannot simulate its "
                            "integer accumulator")


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
        _integers(name, "input", xv, x.scale)
        _integers(name, "weight", wv, quant_weight.scale)
        if cfg.is_wrap:
            y = _wrap_layer(layer, exact_impl, xv, wv, x_scale, w_scale, cfg, stats)
        else:
            y = _chain_layer(layer, xv, wv, x_scale, w_scale, cfg, stats)
        bias = quant_bias.value if isinstance(quant_bias, QuantTensor) else quant_bias
        if bias is not None:
            y = y + bias.reshape(1, -1, *([1] * (y.dim() - 2))) if y.dim() > 2 \
                else y + bias
        if layer.return_quant_tensor and not layer.output_quant.is_quant_enabled:
            if cfg.kind != "int" or bias is not None:
                raise A2QInputError(f"layer {name!r} returns a quant tensor without an output "
                                    f"quantizer; {cfg.spec} with a bias or a float accumulator "
                                    "gives values off the integer grid. Give it output_quant=...")
            shape = (1, -1) + (1,) * (y.dim() - 2)
            return IntQuantTensor(y, (x_scale * w_scale).reshape(shape), torch.zeros(()),
                                  cfg.bits, True, layer.training)
        return y

    return inner_forward_impl


def _weight_shape(w_scale: Tensor, like: Tensor) -> Tensor:
    return w_scale.reshape(-1, *([1] * (like.dim() - 1)))


def _wrap_layer(layer, exact_impl, xv, wv, x_scale, w_scale, cfg, stats) -> Tensor:
    """Wraparound: the exact integer convolution/linear (float32 when every partial sum is below
    2^24 in magnitude, else float64), wrapped mod 2^P. Costs about one plain forward pass."""
    with torch.no_grad():
        xi = torch.round(xv / x_scale)
        wi = torch.round(wv / _weight_shape(w_scale, wv))
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
        shape = (1, -1) + (1,) * (exact.dim() - 2) if exact.dim() > 2 else (1, -1)
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


def _chain_layer(layer, xv, wv, x_scale, w_scale, cfg, stats) -> Tensor:
    """Saturating / floating-point: the sequential chain in matrix form, per group."""
    rows, info = _to_matrix(layer, xv)
    groups = getattr(layer, "groups", 1)
    out_channels = wv.shape[0]
    k_group = rows.shape[1] // groups
    o_group = out_channels // groups
    parts = []
    for g in range(groups):
        xg = rows[:, g * k_group:(g + 1) * k_group]
        sl = slice(g * o_group, (g + 1) * o_group)
        wg = wv[sl].reshape(o_group, -1)
        y, chain = simulate_matmul(xg, wg, x_scale, w_scale[sl], cfg)
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
    from brevitas_a2q.audit import iter_accumulating_layers

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


# ----------------------------------------------------------------------------------------------
# evaluation and fine-tuning


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    config: str | AccumulatorConfig | None = None,
    overrides: Mapping[str, str | AccumulatorConfig | None] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[float, SimulationStats | None]:
    """Top-1 accuracy of ``model`` (eval mode) on ``dataset``, through the simulated accumulator
    ``config`` (exact when None). Returns ``(accuracy, stats)``."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    ctx = simulate_accumulators(model, config, overrides) if config is not None \
        else contextlib.nullcontext(None)
    correct = total = 0
    try:
        with ctx as stats:
            label = parse_accumulator(config).spec if config is not None else "exact"
            for x, y in tqdm(loader, desc=f"evaluate {label}", disable=None if progress else True,
                             leave=False):
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += len(y)
    finally:
        model.train(was_training)
    return correct / max(total, 1), stats


def finetune(
    model: nn.Module,
    loader: torch.utils.data.DataLoader | torch.utils.data.Dataset,
    accumulator_config: str | AccumulatorConfig,
    epochs: int = 1,
    lr: float = 1e-3,
    overrides: Mapping[str, str | AccumulatorConfig | None] | None = None,
    gradient: str | None = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` with its layers' accumulators simulated (Blumenfeld et al., ICLR 2024):
    Adam (``lr``, cosine schedule), cross-entropy, ``epochs`` passes over ``loader`` (a
    DataLoader, or a Dataset batched by 64, shuffled), gradients per ``gradient`` /
    the config's mode (identity STE by default). Returns each epoch's mean loss; leaves the model
    in eval mode and un-patched."""
    from brevitas_a2q.training import train_epochs

    if epochs < 0:
        raise A2QInputError(f"epochs must be >= 0, got {epochs}")
    with simulate_accumulators(model, accumulator_config, overrides, gradient=gradient):
        return train_epochs(model, loader, epochs, lr=lr, progress=progress, desc="finetune")
