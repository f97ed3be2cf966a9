"""Errors that reach users: each message names what is at fault and how to fix it."""

__all__ = ["A2QInputError", "A2QInputNotQuantizedError", "AccumulatorOverflowError",
           "AccumulatorTargetTooSmallError"]


class A2QInputError(ValueError):
    """Bad input from the user (a file, a model, a setting). The CLI prints it and exits with 2."""


class A2QInputNotQuantizedError(A2QInputError, AssertionError):
    """An accumulator-aware layer has no integer-quantized input to read ``N`` and its sign from.

    Also an ``AssertionError``: Brevitas's own input-aware proxy asserts there ("No cached quant
    input found", "Input must be quantized"), and code written against Brevitas catches that."""


class AccumulatorOverflowError(A2QInputError):
    """A layer's integer weights do not fit its target accumulator width."""


class AccumulatorTargetTooSmallError(A2QInputError):
    """A layer's target accumulator width ``P`` admits no non-zero integer weight for its input
    (the L1 bound ``T < 1``); ``needed_bits`` is the smallest ``P`` that admits one."""

    def __init__(self, message: str, needed_bits: int) -> None:
        super().__init__(message)
        self.needed_bits = needed_bits
