"""The ``a2q`` command. Each subcommand lives in its own module with ``add_parser(subparsers)``;
the parser it adds sets ``func(args) -> int`` as its default.

The subcommand modules import nothing heavy at module level (torch, Brevitas, qonnx are imported
inside ``run``), so ``a2q --help`` and ``a2q COMMAND --help`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback

from brevitas_a2q.cli.options import HelpFormatter
from brevitas_a2q.errors import A2QInputError

SUBCOMMANDS = ("demo", "train", "report", "evaluate", "build")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_STATUS_HELP = """exit status (every command):
  0    success; every checked target holds
  1    a check failed (a target violated, a verification mismatch)
  2    bad input or usage (the message names the file, option or value at fault)
  3    internal error (a bug: please report it with the traceback that is printed)
  130  interrupted (Ctrl-C)"""

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# library messages speak Python keywords; on the command line the option is the flag
_CLI_WORDING = (("pass overwrite=True (CLI: --overwrite)", "pass --overwrite"),
                ("pass overwrite=True", "pass --overwrite"))


def build_parser() -> argparse.ArgumentParser:
    """The ``a2q`` parser with every subcommand (cheap: no torch/Brevitas import)."""
    parser = argparse.ArgumentParser(
        prog="a2q",
        description="Accumulator-aware quantization for Brevitas, QONNX and FINN.",
        epilog=EXIT_STATUS_HELP, formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"brevitas_a2q.cli.{name}").add_parser(subparsers)
    return parser


def one_line(message: object) -> str:
    """``message`` as one line of plain text: no terminal escape codes, no line breaks, and
    command-line wording for library phrases such as ``overwrite=True``."""
    text = " ".join(_ANSI.sub("", str(message)).split())
    for library, cli in _CLI_WORDING:
        text = text.replace(library, cli)
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see :data:`EXIT_STATUS_HELP`)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # argparse: 0 after --help, 2 on a usage error (message printed)
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except A2QInputError as err:
        print(f"a2q {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"a2q {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug: never confused with "a check failed" (1)
        if os.environ.get("A2Q_NO_TRACEBACK") is None:
            traceback.print_exc()
        print(f"a2q {args.command}: internal error (exit {EXIT_INTERNAL}): "
              f"{type(err).__name__}: {one_line(err)[:500]}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
