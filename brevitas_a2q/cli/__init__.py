"""The ``a2q`` command. Each subcommand lives in its own module with ``add_parser(subparsers)``;
the parser it adds sets ``func(args) -> int`` as its default.

The subcommand modules import nothing heavy at module level (torch, Brevitas, qonnx are imported
inside ``run``), so ``a2q --help`` and ``a2q COMMAND --help`` answer at once.

What every subcommand gets from :func:`main`: the exit status of :data:`EXIT_STATUS_HELP`
(130 for Ctrl-C at any point, parsing and imports included), one line on stderr for bad input
(``--verbose`` adds the traceback), a quiet exit when the reader of stdout goes away
(``a2q report M --json | head -1``), and a line-buffered stdout, so that piped output keeps its
order with what subprocesses (FINN) write to the same pipe.
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

SUBCOMMANDS = ("demo", "train", "finetune", "quantize", "report", "evaluate", "build")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe
VERBOSE_HELP = "show the traceback of an error that is otherwise one line"
EXIT_STATUS_HELP = """exit status (every command):
  0    success; every checked target holds (a2q report: and at least one was checked)
  1    a check failed (a target violated, a verification mismatch)
  2    bad input or usage (the message names the file, option or value at fault)
  3    internal error (a bug: please report it with the traceback that is printed)
  130  interrupted (Ctrl-C)
  141  stdout closed by its reader (e.g. | head): stopped quietly, as a Unix tool killed
       by SIGPIPE

--verbose (before or after COMMAND) adds the traceback to a one-line error."""

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
    parser.add_argument("--verbose", dest="verbose_errors", action="store_true",
                        help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"brevitas_a2q.cli.{name}").add_parser(subparsers)
    for sub in subparsers.choices.values():
        if "--verbose" not in sub._option_string_actions:  # a command's own --verbose counts too
            sub.add_argument("--verbose", dest="verbose_errors", action="store_true",
                             default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _verbose(args: argparse.Namespace | None) -> bool:
    """``--verbose`` given before or after the command (``a2q build`` has its own, which also
    shows FINN's step output)."""
    return bool(args is not None and (getattr(args, "verbose_errors", False)
                                      or getattr(args, "verbose", False) is True))


def _line_buffered_stdout() -> None:
    """Flush stdout at every line, also into a pipe: what we print then precedes what a
    subprocess writes to the same pipe afterwards (Python block-buffers a piped stdout)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):  # a closed or detached stream: nothing to order
            pass


def _silence_closed_pipe() -> None:
    """After the reader of stdout went away: point stdout and stderr at /dev/null so that
    nothing more is written, not even the interpreter's last flush (which would print
    'Exception ignored ... BrokenPipeError')."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # no file descriptor (e.g. captured)
            pass
    os.close(devnull)


def one_line(message: object) -> str:
    """``message`` as one line of plain text: no terminal escape codes, no line breaks, and
    command-line wording for library phrases such as ``overwrite=True``."""
    text = " ".join(_ANSI.sub("", str(message)).split())
    for library, cli in _CLI_WORDING:
        text = text.replace(library, cli)
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see :data:`EXIT_STATUS_HELP`)."""
    args = None
    try:
        _line_buffered_stdout()
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # argparse: 0 after --help, 2 on a usage error (printed)
            return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
        return _run(args)
    except BrokenPipeError:
        _silence_closed_pipe()
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt:  # while parsing, importing, or in an error handler
        if _verbose(args):
            traceback.print_exc()
        print(f"a2q{_command(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _command(args: argparse.Namespace | None) -> str:
    return f" {args.command}" if args is not None else ""


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; map what it raises to an exit status and one line on stderr."""
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except A2QInputError as err:
        if _verbose(args):
            traceback.print_exc()
        print(f"a2q {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if _verbose(args):
            traceback.print_exc()
        print(f"a2q {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as err:  # a bug: never confused with "a check failed" (1)
        if os.environ.get("A2Q_NO_TRACEBACK") is None or _verbose(args):
            traceback.print_exc()
        print(f"a2q {args.command}: internal error (exit {EXIT_INTERNAL}): "
              f"{type(err).__name__}: {one_line(err)[:500]}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
