"""Low-precision floating-point formats for simulated accumulators.

A format has 1 sign bit, ``E`` exponent bits and ``M`` mantissa (fraction) bits, as in the
accumulators of Blumenfeld, Hubara, Soudry, "Towards Cheaper Inference in Deep Networks with Lower
Bit-Width Accumulators", ICLR 2024 (arXiv:2401.14110), e.g. 1+4+7 = 12 bits ("fp12-e4m7").

Conventions (documented, not negotiable by the hardware you may have in mind, so check them):

* exponent bias ``b`` defaults to ``2^(E-1) - 1`` (IEEE-like); every exponent code encodes a finite
  number (no inf/NaN codes), so the largest magnitude is ``(2 - 2^-M) * 2^(2^E - 1 - b)``;
* gradual underflow: the smallest normal is ``2^(1-b)``, below it subnormals with spacing
  ``2^(1-b-M)``;
* rounding: ``"nearest"`` (round half to even) or ``"toward_zero"`` (truncation);
* overflow saturates to the largest magnitude (and is reported), it does not produce inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from brevitas_a2q.errors import A2QInputError

__all__ = ["ROUNDING_MODES", "FloatFormat"]

ROUNDING_MODES = ("nearest", "toward_zero")


@dataclass(frozen=True)
class FloatFormat:
    """A sign + ``exp_bits`` + ``man_bits`` floating-point format (see the module docstring)."""

    exp_bits: int
    man_bits: int
    bias: int | None = None
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if not 1 <= int(self.exp_bits) <= 10:
            raise A2QInputError(f"floating-point accumulator: exponent bits must be 1..10, "
                                f"got {self.exp_bits}")
        if not 0 <= int(self.man_bits) <= 40:
            raise A2QInputError(f"floating-point accumulator: mantissa bits must be 0..40, "
                                f"got {self.man_bits}")
        if self.rounding not in ROUNDING_MODES:
            raise A2QInputError(f"floating-point accumulator: rounding must be one of "
                                f"{', '.join(ROUNDING_MODES)}, got {self.rounding!r}")

    @property
    def total_bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def exponent_bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 if self.bias is None else int(self.bias)

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (subnormals share its spacing)."""
        return 1 - self.exponent_bias

    @property
    def max_exponent(self) -> int:
        return 2**self.exp_bits - 1 - self.exponent_bias

    @property
    def max_value(self) -> float:
        return (2.0 - 2.0**-self.man_bits) * 2.0**self.max_exponent

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Round float64 ``x`` to this format. Returns ``(rounded, overflowed)``: magnitudes above
        :attr:`max_value` after rounding saturate to it and are flagged in ``overflowed``."""
        if x.dtype != torch.float64:
            raise TypeError("FloatFormat.quantize expects float64 (exact for the sums it rounds)")
        if self.rounding == "nearest":
            r = self._round_nearest(x)
        else:
            r = self._round_toward_zero(x)
        overflowed = r.abs() > self.max_value
        return r.clamp_(-self.max_value, self.max_value), overflowed

    def _exponent_field(self, x: Tensor) -> Tensor:
        """Biased float64 exponent of ``x``, at least that of the format's smallest normal (so
        zeros and tiny values get the subnormal spacing)."""
        e = (x.view(torch.int64) >> 52) & 0x7FF
        return e.clamp_(min=self.min_exponent + 1023)

    def _round_nearest(self, x: Tensor) -> Tensor:
        # Adding and subtracting c = 1.5 * 2^52 * quantum rounds to a multiple of the quantum
        # 2^(exponent - M), half to even, in one float64 rounding (exact for M < 50).
        e = self._exponent_field(x)
        c = (((e + (52 - self.man_bits)) << 52) | (1 << 51)).view(torch.float64)
        return (x + c) - c

    def _round_toward_zero(self, x: Tensor) -> Tensor:
        e = self._exponent_field(x)
        quantum = ((e - self.man_bits) << 52).view(torch.float64)
        return torch.trunc(x / quantum) * quantum  # exact: division by a power of two
