"""Non-convergence warnings, aggregated per fixed point.

A fixed point that fails at one training step usually fails at the next one too, forward and in the
adjoint solve: one warning per solve buried a training log (582 warnings in 400 steps) and broke the
progress bars. The runtime hands every failed solve to :func:`warn_nonconvergence`, which

* warns in full at a fixed point's first failure (what failed, the status counts, what to do);
* counts the later ones and sums them up in one line per fixed point after 10, 100, 1000, ... more
  failed solves (or every ``every`` solves, see :func:`set_convergence_warnings`), and once more for
  the rest at interpreter exit (:func:`flush_convergence_warnings` does it now).

Every line is a :class:`NonConvergenceWarning` (a ``RuntimeWarning``) issued through :mod:`warnings`,
pointing at the user's code that ran the solve: filter it like any warning. An ``"always"`` filter
for it (``warnings.simplefilter("always")``) brings back one full warning per failed solve.
The count starts afresh wherever warnings start being recorded somewhere new
(``warnings.catch_warnings(record=True)``, ``pytest.warns``, ``logging.captureWarnings``), so every
recorder sees the first failure in full, and a recorder that is gone gets no exit summary.
"""
from __future__ import annotations

import atexit
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = [
    "NonConvergenceWarning",
    "set_convergence_warnings",
    "flush_convergence_warnings",
    "convergence_failures",
    "warn_nonconvergence",
]

_MODES = ("aggregate", "always")
_FIRST_SUMMARY = 10  # with every=None: summaries after 10, 100, 1000, ... failed solves


class NonConvergenceWarning(RuntimeWarning):
    """A fixed point did not converge for some samples (first failure in full, later ones summed up)."""


@dataclass
class _Policy:
    mode: str = "aggregate"
    every: Optional[int] = None


@dataclass
class _Tally:
    """Failed solves of one fixed point."""

    unit: str
    since_first: int = 0  # failed solves after the full warning (the summary schedule counts these)
    # since the last line:
    solves: Counter = field(default_factory=Counter)  # per phase
    failed: int = 0
    items: int = 0
    status: Counter = field(default_factory=Counter)
    worst: float = 0.0
    where: Tuple[str, int, str] = ("<unknown>", 0, "<unknown>")  # the latest failure's user code

    def add(self, phase: str, counts: Mapping[str, int], items: int, worst: float, where: Tuple[str, int, str]) -> None:
        self.solves[phase] += 1
        self.items += items
        self.failed += items - counts.get("converged", 0)
        self.status.update({k: v for k, v in counts.items() if k != "converged" and v})
        self.worst = max(self.worst, worst)  # NaN-free: the callers map NaN to inf
        self.where = where

    def pending(self) -> int:
        return sum(self.solves.values())

    def line(self, name: str, next_after: Optional[int]) -> str:
        phases = ", ".join(f"{phase} {n}" for phase, n in self.solves.items())
        status = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items()))
        tail = f"; next summary after {next_after} more" if next_after else ""
        return (f"fixed point {name!r}: {self.pending()} more solves did not converge ({phases}; "
                f"{self.failed} of {self.items} {self.unit}: {status}; worst residual {self.worst:.3g}); "
                f"{self.since_first} since the first warning{tail}")

    def clear_window(self) -> None:
        self.solves, self.failed, self.items, self.status, self.worst = Counter(), 0, 0, Counter(), 0.0


def _sink() -> Tuple[Any, Any]:
    """Where warnings are written now; catch_warnings(record=True) and captureWarnings change it."""
    return warnings.showwarning, getattr(warnings, "_showwarnmsg_impl", None)


class _State:
    """The tallies of one recorder (see the module docstring)."""

    def __init__(self) -> None:
        self.sink: Tuple[Any, Any] = _sink()
        self.tallies: Dict[str, _Tally] = {}


_policy = _Policy()
_state = _State()


def _current_state() -> _State:
    global _state
    if _state.sink != _sink():
        _state = _State()
    return _state


def set_convergence_warnings(mode: str = "aggregate", every: Optional[int] = None) -> None:
    """How a fixed point that does not converge is reported (``on_fail="warn"``).

    Args:
        mode: ``"aggregate"`` (default): the first failure of each fixed point warns in full, later
            ones are counted and summed up; ``"always"``: one full warning per failed solve.
        every: failed solves per summary line; ``None`` (default) summarises after 10, 100, 1000, ...
            failed solves, so a long run prints a handful of lines.

    Silence them altogether with ``warnings.filterwarnings("ignore", category=fxwormhole.NonConvergenceWarning)``.
    """
    from ..errors import ConfigError

    if mode not in _MODES:
        raise ConfigError(f"set_convergence_warnings: mode={mode!r} is invalid; expected one of {_MODES}")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ConfigError(f"set_convergence_warnings: every={every!r} must be a positive int or None")
    _policy.mode, _policy.every = mode, every


def convergence_failures() -> Dict[str, int]:
    """Failed solves per fixed point name, shown or counted (since the current recorder started)."""
    return {name: t.since_first + 1 for name, t in _current_state().tallies.items()}


def flush_convergence_warnings() -> None:
    """Sum up now every failed solve not yet reported (one line per fixed point)."""
    for name, tally in _current_state().tallies.items():
        if tally.pending():
            _emit(tally.line(name, None), tally.where)
            tally.clear_window()


def _flush_at_exit() -> None:
    if _state.sink == _sink():  # the recorder the tallies were written for is still there
        flush_convergence_warnings()


atexit.register(_flush_at_exit)


def _next_summary(since_first: int) -> int:
    """Failed solves (after the first) at which the next summary is due."""
    if _policy.every is not None:
        return (since_first // _policy.every + 1) * _policy.every
    due = _FIRST_SUMMARY
    while due <= since_first:
        due *= 10
    return due


def _internal(frame: FrameType) -> bool:
    """fxwormhole, torch, or the code torch.fx generates for a transformed model's forward."""
    return (frame.f_globals.get("__name__", "").split(".")[0] in ("fxwormhole", "torch")
            or frame.f_code.co_filename.startswith("<eval_with_key>"))


def _where() -> Tuple[str, int, str]:
    """File, line and module of the user's code that ran the solve (the first frame outside)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _internal(frame):
        frame = frame.f_back
    filename = frame.f_code.co_filename
    # never None: warn_explicit drops a warning whose module is None (what it sees at shutdown)
    module = frame.f_globals.get("__name__") or (filename[:-3] if filename.endswith(".py") else filename)
    return filename, frame.f_lineno, module


def _action(text: str, where: Tuple[str, int, str]) -> str:
    """The action of the first warning filter that matches (what :mod:`warnings` would do)."""
    _, lineno, module = where
    for action, msg, category, mod, line in warnings.filters:
        if msg is not None and not msg.match(text):
            continue
        if not issubclass(NonConvergenceWarning, category):
            continue
        if mod is not None and not (mod == module if isinstance(mod, str) else mod.match(module)):
            continue
        if line and line != lineno:
            continue
        return action
    return warnings.defaultaction


def _emit(text: str, where: Tuple[str, int, str]) -> None:
    filename, lineno, module = where
    # a throwaway registry: the texts carry residuals, and warnings.warn would remember every distinct
    # one for ever; no module_globals: a caller run as `python -m pkg` has a loader that cannot give its source
    warnings.warn_explicit(text, NonConvergenceWarning, filename, lineno, module=module, registry={})


def warn_nonconvergence(name: str, phase: str, message: str, counts: Mapping[str, int], items: int,
                        worst: float, unit: str = "samples") -> None:
    """Report one failed solve of fixed point ``name`` (the runtime's ``on_fail="warn"``).

    Args:
        name: the fixed point (node) name.
        phase: ``"forward"``, ``"backward (adjoint)"``, ...
        message: the full warning, shown at the first failure (or every time, see the module docstring).
        counts: status name -> number of ``unit`` (``"converged"`` included or not).
        items: number of ``unit`` the solve had.
        worst: worst residual (inf for NaN).
    """
    where = _where()
    state = _current_state()
    if _policy.mode == "always" or _action(message, where) == "always":
        _emit(message, where)
        return
    tally = state.tallies.get(name)
    if tally is None:
        state.tallies[name] = _Tally(unit, where=where)
        _emit(f"{message} (later failures of {name!r} are counted and summed up: see "
              "fxwormhole.set_convergence_warnings)", where)
        return
    tally.add(phase, counts, items, worst, where)
    tally.since_first += 1
    if tally.since_first == _next_summary(tally.since_first - 1):
        _emit(tally.line(name, _next_summary(tally.since_first) - tally.since_first), where)
        tally.clear_window()
