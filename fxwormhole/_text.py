"""Text the user reads: tables for reports and the command line, one-line failure summaries."""
from __future__ import annotations

import os
import traceback
from typing import Sequence

__all__ = ["text_table", "first_line", "describe_failure", "capture_failure_message", "EXAMPLE_INPUTS_HINT"]

#: what to check when running the model on its example inputs failed inside fxwormhole
EXAMPLE_INPUTS_HINT = ("check that example_inputs are a valid call of the model (number, shapes, dtypes and devices "
                       "of the tensors, matching the model's parameters); if they are, please report this model to "
                       "fxwormhole")


def text_table(head: Sequence[str], rows: Sequence[Sequence[object]], *, left: int = 1) -> str:
    """A fixed-width table: header, a rule, then rows; the first ``left`` columns are left-aligned,
    the others (numbers) right-aligned."""
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def first_line(text: object, limit: int = 240) -> str:
    """The first non-empty line of ``str(text)``, cut to ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).strip().splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_failure(exc: BaseException) -> str:
    """``ExcType: first line (at file:line in fn: `code`)``, naming the user's line if there is one."""
    msg = f"{type(exc).__name__}: {first_line(exc)}"
    where = _user_frame(exc)
    return f"{msg} (at {where})" if where else msg


_TORCH_DIR = os.path.dirname(os.path.abspath(__import__("torch").__file__))
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MODEL_CODE = {os.path.join(_PACKAGE_DIR, "zoo.py")}  # model code shipped with fxwormhole is the user's code


def _user_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame outside torch, site-packages and fxwormhole's own machinery."""
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        if fr.filename.startswith("<"):
            continue
        f = os.path.abspath(fr.filename)
        if f.startswith(_TORCH_DIR) or "site-packages" in f or (f.startswith(_PACKAGE_DIR) and f not in _MODEL_CODE):
            continue
        return f"{fr.filename}:{fr.lineno} in {fr.name}: `{(fr.line or '').strip()}`"
    return None


_ARITY = ("missing a required argument", "too many positional arguments", "got an unexpected keyword argument")


def capture_failure_message(model_name: str, attempts: dict[str, str]) -> str:
    """Why no front end captured the model (``attempts``: front end -> :func:`describe_failure`) and what to do."""
    tried = "; ".join(f"{name} failed with {why}" for name, why in attempts.items())
    if attempts and all(any(a in why for a in _ARITY) for why in attempts.values()):
        return (f"could not capture {model_name}: {tried}. What to do: example_inputs must hold one tensor per "
                f"positional argument of {model_name}.forward, in order (a single tensor or a tuple).")
    return (
        f"could not capture {model_name}: {tried}. "
        "What to do: remove data-dependent Python control flow from forward (an `if`/`break` on a "
        "tensor value), e.g. use torch.where or torch.cond instead of `if`, a fixed number of loop "
        "steps instead of `break`; or pass front_end='symbolic_trace' / front_end='export' "
        "(CLI: --front-end) to see one front end's error alone."
    )
