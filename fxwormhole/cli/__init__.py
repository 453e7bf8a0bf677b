"""The ``fxwormhole`` command line.

Each command lives in its own module of this package exposing ``register(subparsers)``, which adds
a sub-parser and sets ``func`` (``func(namespace) -> int``) as its default. Adding a command is one
line in :data:`COMMANDS`. Every :class:`~fxwormhole.errors.FxWormholeError` and every bad argument
ends as one line ``fxwormhole: error: ...`` on stderr and exit code 2, without a traceback. So does
anything else that escapes a command (a file the system refuses, memory, a bug): one line that
names the exception; ``FXWORMHOLE_TRACEBACK=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from ..errors import FxWormholeError

__all__ = ["COMMANDS", "build_parser", "main"]

#: command modules (in fxwormhole.cli), in the order ``--help`` lists them
COMMANDS: list[str] = ["inspect_cmd", "demo_cmd", "rewrite_cmd", "compile_cmd", "export_cmd", "bench_cmd"]


class UsageError(Exception):
    """A command-line argument is wrong (raised instead of argparse's print-and-exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per module in :data:`COMMANDS`."""
    from .. import __version__

    parser = _Parser(prog="fxwormhole", description="torch.fx passes: wormholes, fixed points, sensitivity probes.")
    parser.add_argument("--version", action="version", version=f"fxwormhole {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


_TRACEBACK_ENV = "FXWORMHOLE_TRACEBACK"


def _unexpected(exc: BaseException) -> str:
    """One line for an exception no command turned into an FxWormholeError."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename is not None else ""
        return f"{exc.strerror}{where}; check the path and its permissions"
    if isinstance(exc, MemoryError):
        return "out of memory; use smaller --input tensors or a smaller model"
    return (f"unexpected {type(exc).__name__}: {_one_line(exc)[:300]} (probably a bug in fxwormhole: rerun with "
            f"{_TRACEBACK_ENV}=1 for the traceback and report it)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 error)."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (UsageError, FxWormholeError) as exc:
        print(f"fxwormhole: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fxwormhole inspect ... | head`
        sys.stderr.close()
        return 141
    except KeyboardInterrupt:
        print("fxwormhole: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the promise is one line, whatever escaped
        if os.environ.get(_TRACEBACK_ENV):
            raise
        print(f"fxwormhole: error: {_unexpected(exc)}", file=sys.stderr)
        return 2
