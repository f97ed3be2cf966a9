"""Option types shared by the subcommands: values are checked while the command line is parsed,
before anything is imported, loaded or trained, and a bad one is an argparse error (exit 2) that
names the option and the value."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["ACC_BITS", "ACT_BITS", "WEIGHT_BITS", "bits_type", "int_range", "positive_float",
           "positive_int", "non_negative_float", "add_resumable_output_options"]

# the ranges the reference models and the exact bounds support
ACC_BITS = (2, 64)
WEIGHT_BITS = (2, 16)  # 1-bit weights have no magnitude to scale (2^(M-1) - 1 = 0)
ACT_BITS = (2, 16)  # 1-bit activations export as QONNX BipolarQuant, which nothing here handles


def int_range(low: int, high: int | None = None, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {span}{unit}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def bits_type(bounds: tuple[int, int]) -> Callable[[str], int]:
    """An argparse type for a bit width in ``bounds``."""
    return int_range(*bounds, unit=" bits")


positive_int = int_range(1)


def _float_type(check: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not check(value) or value != value:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_float = _float_type(lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _float_type(lambda v: 0 <= v < float("inf"), "zero or a positive number")


def layer_bits(text: str) -> tuple[str, int]:
    """``conv1=16`` -> ``("conv1", 16)``, P checked against :data:`ACC_BITS`."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected LAYER=P (e.g. conv1=16), got {text!r}")
    try:
        bits = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: P must be a whole number of bits, "
                                         f"got {value!r}") from None
    low, high = ACC_BITS
    if not low <= bits <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: P must be between {low} and {high} bits, "
                                         f"got {bits}")
    return name, bits


layer_bits.__name__ = "LAYER=P"


def add_resumable_output_options(parser: argparse.ArgumentParser, default_out: str,
                                 resume_requires: str) -> None:
    """The "output" options of a resumable run (``a2q train``, ``a2q finetune``): ``--out``
    (default ``default_out``), ``--resume`` (``resume_requires``: what must be unchanged),
    ``--overwrite``, ``--threads``, ``--json``, ``--no-progress``."""
    from pathlib import Path

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path(default_out),
                     help="output directory (default: %(default)s)")
    out.add_argument("--resume", action="store_true",
                     help=f"continue from OUT/model.pt ({resume_requires} required)")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh, replacing the files of an earlier run in OUT")
    out.add_argument("--threads", type=positive_int, default=1,
                     help="torch threads (default: %(default)s)")
    out.add_argument("--json", action="store_true", help="print the results as JSON")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")


def paragraphs(*texts: str, width: int = 78) -> str:
    """Help text for a ``RawDescriptionHelpFormatter`` parser: each text filled to ``width``
    without breaking words or option names at hyphens; texts starting with two spaces (examples)
    are kept as they are."""
    import textwrap

    return "\n\n".join(t if t.startswith("  ") else
                       textwrap.fill(" ".join(t.split()), width, break_on_hyphens=False)
                       for t in texts)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (fill them with :func:`paragraphs`); option help
    wrapped without breaking words or option names at hyphens."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)
