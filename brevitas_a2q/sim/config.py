"""Accumulator specifications: :class:`AccumulatorConfig` and the spec strings of
:func:`parse_accumulator` (``int12-sat``, ``fp12-e4m7-c16``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from brevitas_a2q.errors import A2QInputError
from brevitas_a2q.sim.float_format import FloatFormat

GRADIENT_MODES = ("ste", "immediate", "recursive")


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
