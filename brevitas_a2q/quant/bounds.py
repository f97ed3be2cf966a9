"""Exact accumulator bound arithmetic for A2Q and A2Q+.

Everything here is computed with Python integers and :class:`fractions.Fraction`, so the results are
exact for accumulators of any width (the public contract is up to 64 bits). Notation follows the
papers: ``P`` signed accumulator bits, ``N`` input bits, ``M`` weight bits, ``K`` dot-product length,
``1_s`` = 1 if the input is signed, ``q`` one output channel's integer weights.

References:
    * A2Q: I. Colbert, A. Pappalardo, J. Petri-Koenig, "A2Q: Accumulator-Aware Quantization with
      Guaranteed Overflow Avoidance", ICCV 2023 (arXiv:2308.13504), Eq. (12)-(15).
    * A2Q+: I. Colbert et al., "A2Q+: Improving Accumulator-Aware Weight Quantization", ICML 2024
      (arXiv:2401.10432), Eq. (17)-(18).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from brevitas_a2q.errors import A2QInputError

MAX_ACCUMULATOR_BITS = 64
# A signed integer of 1 bit holds only 0 and -1 (narrow: only 0): no accumulator, no A2Q weight.
MIN_BITS = 2

__all__ = [
    "MAX_ACCUMULATOR_BITS",
    "MIN_BITS",
    "AccumulatorRange",
    "check_bits",
    "datatype_accumulator_bits",
    "exact_accumulator_range",
    "input_range",
    "l1_norm_bound",
    "min_accumulator_bits",
    "signed_bits_for_range",
    "unsigned_bits_for_range",
    "zero_centered_l1_norm",
]


def check_bits(name: str, value: int, low: int = MIN_BITS, high: int = MAX_ACCUMULATOR_BITS,
               why: str = "") -> int:
    """Return ``value`` as an int, or raise :class:`~brevitas_a2q.errors.A2QInputError` (a
    ``ValueError``) naming it if it is not a whole number in ``[low, high]``; ``why`` is appended
    to the out-of-range message. The default range is that of a *target* accumulator width ``P``
    a user may set (a 1-bit target admits no non-zero weight)."""
    if isinstance(value, bool) or int(value) != value:
        raise A2QInputError(f"{name} must be a whole number of bits, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise A2QInputError(f"{name} must be between {low} and {high} bits, got {value}{why}")
    return value


def _ceil_log2(x: Fraction | int) -> int:
    """Smallest integer k with 2**k >= x, for x > 0 (exact)."""
    x = Fraction(x)
    if x <= 0:
        raise ValueError(f"log2 of a non-positive value {x}")
    num, den = x.numerator, x.denominator
    k = num.bit_length() - den.bit_length()
    while (Fraction(2) ** k) < x:  # at most two steps either way
        k += 1
    while (Fraction(2) ** (k - 1)) >= x:
        k -= 1
    return k


def l1_norm_bound(
    acc_bits: int, input_bits: int, input_signed: bool, zero_centered: bool = False
) -> Fraction:
    """Largest per-channel ``||q||_1`` that cannot overflow a ``P``-bit signed accumulator.

    A2Q (Colbert et al. 2023, Eq. 15): ``T = (2^(P-1) - 1) * 2^(1_s - N)``.
    A2Q+ (Colbert et al. 2024, Eq. 18), for zero-centred channels (``sum(q) = 0``):
    ``T = (2^P - 2) / (2^N - 1)``, whatever the input sign.
    """
    acc_bits = check_bits("accumulator bit width P", acc_bits, low=1)  # the math holds for P = 1
    input_bits = check_bits("input bit width N", input_bits, low=1)
    if zero_centered:
        return Fraction(2**acc_bits - 2, 2**input_bits - 1)
    return (2 ** (acc_bits - 1) - 1) * Fraction(2) ** (int(bool(input_signed)) - input_bits)


def min_accumulator_bits(
    l1_norm: Fraction | int, input_bits: int, input_signed: bool, zero_centered: bool = False
) -> int:
    """Fewest signed accumulator bits ``P`` whose :func:`l1_norm_bound` admits ``l1_norm``.

    A2Q: ``P = ceil(beta + log2(1 + 2^-beta) + 1)``, ``beta = log2(||q||_1) + N - 1_s``, computed
    exactly as the smallest ``P`` with ``2^(P-1) >= ||q||_1 * 2^(N - 1_s) + 1``.
    A2Q+: ``P = ceil(log2(||q||_1 * (2^N - 1) + 2))``. After rounding, a zero-centred channel is only
    approximately balanced: pass :func:`zero_centered_l1_norm` (twice its larger signed half), which
    equals ``||q||_1`` when ``sum(q) = 0`` and keeps the guarantee when it is not.
    """
    input_bits = check_bits("input bit width N", input_bits, low=1)
    l1_norm = Fraction(l1_norm)
    if l1_norm < 0:
        raise ValueError(f"an L1 norm cannot be negative, got {l1_norm}")
    if zero_centered:
        bits = _ceil_log2(l1_norm * (2**input_bits - 1) + 2)
    else:
        scaled = l1_norm * Fraction(2) ** (input_bits - int(bool(input_signed)))
        bits = 1 + _ceil_log2(scaled + 1)
    return bits


def datatype_accumulator_bits(
    dot_length: int, input_bits: int, weight_bits: int, input_signed: bool
) -> int:
    """Accumulator bits from data types alone (A2Q, Eq. 12).

    ``alpha = log2(K) + N + M - 1 - 1_s``, ``P = ceil(alpha + log2(1 + 2^-alpha) + 1)``: the A2Q bound
    applied to the largest L1 norm an ``M``-bit channel of length ``K`` can have, ``K * 2^(M-1)``.
    """
    dot_length = check_bits("dot-product length K", dot_length, low=1, high=2**40)
    weight_bits = check_bits("weight bit width M", weight_bits, low=1)
    return min_accumulator_bits(dot_length * 2 ** (weight_bits - 1), input_bits, input_signed)


def input_range(input_bits: int, input_signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of an ``N``-bit input: ``[-2^(N-1), 2^(N-1)-1]`` signed, ``[0, 2^N-1]`` unsigned."""
    input_bits = check_bits("input bit width N", input_bits, low=1)
    if input_signed:
        return -(2 ** (input_bits - 1)) + int(narrow), 2 ** (input_bits - 1) - 1
    return 0, 2**input_bits - 1


def _channel_sums(int_weights: np.ndarray | Sequence) -> tuple[list[int], list[int]]:
    """Per output channel (rows) exact sums of positive and of negative integer weights."""
    q = np.asarray(int_weights)
    if q.ndim < 1:
        raise ValueError("integer weights need at least one dimension (output channels first)")
    q = q.reshape(q.shape[0], -1)
    if q.dtype.kind not in "iu":  # floats must hold whole numbers
        if not np.all(np.isfinite(q)) or not np.array_equal(q, np.round(q)):
            raise ValueError("weights are not integers: pass the quantized integer weights")
    q = q.astype(np.int64, copy=False)
    total = q.sum(axis=1)
    magnitude = np.abs(q).sum(axis=1)
    pos = (magnitude + total) // 2  # sum of the positive weights
    neg = (total - magnitude) // 2  # sum of the negative weights
    return [int(v) for v in pos], [int(v) for v in neg]


def zero_centered_l1_norm(int_weights: np.ndarray | Sequence) -> list[int]:
    """Per channel ``2 * max(sum of positive q, -sum of negative q)``: the L1 norm the A2Q+ bound
    must be applied to (equal to ``||q||_1`` for an exactly zero-centred channel)."""
    pos, neg = _channel_sums(int_weights)
    return [2 * max(p, -n) for p, n in zip(pos, neg, strict=True)]


@dataclass(frozen=True)
class AccumulatorRange:
    """Exact per-channel extremes of ``q . x`` over every integer input ``x`` in ``[lo, hi]^K``."""

    minimum: list[int]
    maximum: list[int]

    @property
    def overall(self) -> tuple[int, int]:
        return min(self.minimum), max(self.maximum)

    @property
    def signed_bits(self) -> int:
        """Fewest bits of a signed (two's complement) accumulator holding every channel's range."""
        return signed_bits_for_range(*self.overall)

    @property
    def unsigned_bits(self) -> int | None:
        """Fewest bits of an unsigned accumulator, or None if some sum can be negative."""
        return unsigned_bits_for_range(*self.overall)


def exact_accumulator_range(
    int_weights: np.ndarray | Sequence, input_min: int, input_max: int
) -> AccumulatorRange:
    """Exact accumulator range per output channel (rows of ``int_weights``, any trailing shape).

    Same definition as qonnx's ``calculate_matvec_accumulator_range``: each weight meets the input
    extreme that maximizes (minimizes) its product. Computed with Python integers.
    """
    if input_min > input_max:
        raise ValueError(f"input_min {input_min} is larger than input_max {input_max}")
    pos, neg = _channel_sums(int_weights)
    lo, hi = int(input_min), int(input_max)
    maximum = [p * hi + n * lo for p, n in zip(pos, neg, strict=True)]
    minimum = [p * lo + n * hi for p, n in zip(pos, neg, strict=True)]
    return AccumulatorRange(minimum=minimum, maximum=maximum)


def signed_bits_for_range(minimum: int, maximum: int) -> int:
    """Fewest two's complement bits ``b`` with ``-2^(b-1) <= minimum`` and ``maximum <= 2^(b-1)-1``."""
    bits = 1
    while not (-(2 ** (bits - 1)) <= minimum and maximum <= 2 ** (bits - 1) - 1):
        bits += 1
    return bits


def unsigned_bits_for_range(minimum: int, maximum: int) -> int | None:
    """Fewest unsigned bits holding ``[minimum, maximum]``, or None if ``minimum < 0``."""
    if minimum < 0:
        return None
    return max(int(maximum).bit_length(), 1)
