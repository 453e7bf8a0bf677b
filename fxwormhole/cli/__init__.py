"""The ``fxwormhole`` command line.

Each command lives in its own module of this package exposing ``register(subparsers)``, which adds
a sub-parser and sets ``func`` (``func(namespace) -> int``) as its default. Adding a command is one
module, one line in :data:`COMMANDS` and one in :data:`SUMMARIES`. Every
:class:`~fxwormhole.errors.FxWormholeError` and every bad argument ends as one line
``fxwormhole: error: ...`` on stderr and exit code 2, without a traceback. So does anything else
that escapes a command (a file the system refuses, memory, a bug): one line that names the
exception; ``FXWORMHOLE_TRACEBACK=1`` shows the traceback instead.

Speed: ``fxwormhole --help`` imports no command module (and so not torch); ``fxwormhole CMD ...``
imports only CMD's module, which imports torch only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from ..errors import FxWormholeError

__all__ = ["COMMANDS", "SUMMARIES", "build_parser", "main"]

#: command modules (in fxwormhole.cli), in the order ``--help`` lists them
COMMANDS: list[str] = ["inspect_cmd", "demo_cmd", "rewrite_cmd", "compile_cmd", "export_cmd", "bench_cmd", "zoo_cmd"]

#: the one-line help of every command, so that ``fxwormhole --help`` needs no command module
SUMMARIES: dict[str, str] = {
    "inspect": "show how fxwormhole sees a model: front end, layers, main path, candidate spans",
    "demo": "train an LSTM with temporal wormholes + SAL on digit rows; write plots and a report",
    "rewrite": "insert wormholes into a model and save the transformed module",
    "compile": "torch.compile a transformed model and check it against eager",
    "export": "export a transformed model for inference (.pt2 or ONNX)",
    "bench": "time original vs transformed (eager) vs transformed (compiled) training steps",
    "zoo": "list the bundled models (fxwormhole.zoo) with their arguments and example inputs",
}

_EPILOG = """examples:
  fxwormhole zoo                                              the bundled models and their --input
  fxwormhole inspect fxwormhole.zoo:CNN --input 2x1x12x12     layers and candidate wormhole spans
  fxwormhole rewrite fxwormhole.zoo:MLP --input 4x8 --open --out mlp.pt
  fxwormhole compile mlp.pt --input 16x8                      compile and check against eager
  fxwormhole export mlp.pt --input 4x8 --format onnx --out mlp.onnx
  fxwormhole demo --quick --out /tmp/demo
'fxwormhole COMMAND --help' shows a command's options and examples."""


#: examples for the commands whose module gives none (shown at the end of ``fxwormhole CMD --help``)
_EXAMPLES = {
    "demo": "examples:\n  fxwormhole demo --out demo_out          the full run (see docs/cli.md for its time)\n"
            "  fxwormhole demo --quick --out /tmp/d    seconds: a tiny model, a few steps",
}


class UsageError(Exception):
    """A command-line argument is wrong (raised instead of argparse's print-and-exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line
        raise UsageError(f"{self.prog}: {message}")


def command_name(module: str) -> str:
    """``"inspect_cmd"`` -> ``"inspect"``."""
    return module.removesuffix("_cmd")


def _selected(argv: Sequence[str] | None) -> str | None:
    """The command module ``argv`` runs (its first word that is not an option), if any."""
    if argv is None:
        return None
    word = next((a for a in argv if not a.startswith("-")), None)
    return next((m for m in COMMANDS if command_name(m) == word), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per module in :data:`COMMANDS`.

    With ``argv``, only the command it selects is imported and registered in full; the others get
    a placeholder carrying their :data:`SUMMARIES` line (enough for ``--help``).
    """
    from .. import __version__

    parser = _Parser(prog="fxwormhole", description="torch.fx passes: wormholes, fixed points, sensitivity probes.",
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fxwormhole {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    selected = _selected(argv)
    for module in COMMANDS:
        if argv is None or module == selected:
            importlib.import_module(f"{__name__}.{module}").register(sub)
            command = sub.choices[command_name(module)]
            if not command.epilog and command_name(module) in _EXAMPLES:
                command.epilog = _EXAMPLES[command_name(module)]
                command.formatter_class = argparse.RawDescriptionHelpFormatter
        else:
            sub.add_parser(command_name(module), help=SUMMARIES[command_name(module)])
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


def _flush_warnings() -> None:
    """The non-convergence counts not summed up yet, at the end of the command rather than at exit."""
    aggregated = sys.modules.get("fxwormhole.runtime._warnings")  # imported only if a fixed point ran
    if aggregated is not None:
        aggregated.flush_convergence_warnings()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 error)."""
    from ._quiet import quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with quiet_third_party():
            args = build_parser(argv).parse_args(argv)
            code = int(args.func(args) or 0)
            _flush_warnings()
            return code
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
