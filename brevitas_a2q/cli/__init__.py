"""The ``a2q`` command. Each subcommand lives in its own module with ``add_parser(subparsers)``;
the parser it adds sets ``func(args) -> int`` as its default."""

from __future__ import annotations

import argparse
import importlib
import sys

from brevitas_a2q.errors import A2QInputError

SUBCOMMANDS = ("demo", "train", "report", "evaluate", "build")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="a2q",
        description="Accumulator-aware quantization for Brevitas, QONNX and FINN.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"brevitas_a2q.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. Exit status: 0 success, 1 a check failed, 2 bad input or usage."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except A2QInputError as err:
        print(f"a2q {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
