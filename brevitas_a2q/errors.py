"""Errors that reach users: each message names what is at fault and how to fix it."""

__all__ = ["A2QInputError", "AccumulatorOverflowError"]


class A2QInputError(ValueError):
    """Bad input from the user (a file, a model, a setting). The CLI prints it and exits with 2."""


class AccumulatorOverflowError(A2QInputError):
    """A layer's integer weights do not fit its target accumulator width."""
