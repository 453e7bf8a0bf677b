"""The per-step solve loop of the temporal runtime: per-sample halting at one or two host syncs.

It follows the library's solve schedule (``docs/fixed_point.md``): evaluation ``k = 1`` is always
checked, then every ``check_every``-th and the ``max_iter``-th; a sample finishes at the first check
where its residual ``r <= tol`` (converged), ``r`` is not finite, ``r > divergence_factor *
min(r so far)`` (diverged) or ``k = max_iter``; its answer is the iterate at which the map was
evaluated, with that evaluation's intermediates. The status code of a finished sample is a
function of its last ``(r, min r)``, so the caller forms all codes of a sequence in one go.

What is lean about it:

* **No set-up per call.** The map is an object the caller resets per step (:class:`StepMap`).
* **Deferred checks.** A check computes the per-sample ``pending`` flags on the device but does not
  read them back. The loop reads them (one host sync) only from evaluation ``sync_from`` on, which
  the caller sets from the previous step's count, so a step that needs as many evaluations as the
  one before it costs one or two syncs. When a read shows that some samples finished at an
  earlier, deferred check, their answers are taken from that check, so deferring changes no result.
* **Nothing is copied when the whole batch finishes together** (the usual case): the answer is
  the finishing evaluation's own tensors.
* **Per-sample halting.** With ``compact=True`` (the forward solve under ``halting="sample"``),
  finished samples are indexed out of the active set and the map's per-step constants are
  compacted with them, so a hard sample's extra iterations cost only its rows; their answers go
  into full-batch holders. Otherwise (the adjoint; ``halting="batch"``) finished samples are
  frozen at their answer with ``torch.where``, so the last evaluation holds every sample's
  intermediates and nothing is copied (maps that write their intermediates in place rely on this).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["LoopSpec", "StepMap", "StepResult", "limits", "solve_step", "status_codes"]

# Same codes as fxwormhole.runtime.stats (a larger code is a worse outcome).
CONVERGED, MAX_ITER, DIVERGED, NON_FINITE = 0, 1, 2, 3


@dataclass(frozen=True)
class LoopSpec:
    """Stopping rule and solver of one kind of solve (forward or adjoint)."""

    tol: float
    max_iter: int
    check_every: int
    factor: float  # divergence_factor
    batch_halt: bool
    compact: bool
    damping: float = 1.0  # picard: 1.0; damped: the relaxation factor
    solver: Any = None  # a FixedPointSolver for anything but picard/damped, else None


class StepMap:
    """Interface of the map one step iterates (see ``temporal.py`` for the two implementations)."""

    def evaluate(self, x: Optional[Tensor]) -> Tuple[Tuple[Tensor, ...], Tensor]:
        """``(aux, f(x))``; ``x = None`` stands for the zero iterate."""
        raise NotImplementedError

    def residual(self, x: Optional[Tensor], fx: Tensor) -> Tensor:
        raise NotImplementedError

    def compact(self, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (indices into the current active set) of the constants."""
        raise NotImplementedError


@dataclass
class StepResult:
    """Answer of one step's solve, per sample (full batch)."""

    x: Optional[Tensor]  # the evaluated iterate (None: the zero iterate)
    aux: Tuple[Tensor, ...]
    iterations: Any  # int when every sample used the same count, else an int64 [B] tensor
    residual: Tensor
    best: Tensor  # min residual seen (for the status code)
    evaluations: int  # evaluations the slowest sample used (host int)
    stale: bool = False  # aux is the last evaluation's, which was not every sample's answer


def status_codes(r: Tensor, best: Tensor, factor: float, tol: float) -> Tensor:
    """Status code per sample from its last residual and the smallest residual it had."""
    status = torch.full_like(r, MAX_ITER, dtype=torch.int8)
    status = torch.where(r > factor * best, torch.full_like(status, DIVERGED), status)
    status = torch.where(r <= tol, torch.full_like(status, CONVERGED), status)
    return torch.where(torch.isfinite(r), status, torch.full_like(status, NON_FINITE))


class _Holder:
    """Full-batch answers, filled row by row when samples finish at different checks (``aux`` only
    when finished samples leave the active set)."""

    def __init__(self, B: int, fx: Tensor, aux: Tuple[Tensor, ...], r: Tensor) -> None:
        self.x = fx.new_zeros((B,) + fx.shape[1:])
        self.aux = tuple(a.new_empty((B,) + a.shape[1:]) for a in aux)
        self.iters = torch.zeros(B, dtype=torch.int64, device=r.device)
        self.res = r.new_empty(B)
        self.best = r.new_empty(B)

    def write(self, rows: Optional[Tensor], fin: Tensor, k: int, x: Optional[Tensor], aux, r: Tensor, best: Tensor) -> None:
        idx = fin.nonzero().squeeze(1)
        g = idx if rows is None else rows.index_select(0, idx)
        if x is not None:
            self.x.index_copy_(0, g, x.index_select(0, idx))
        for buf, a in zip(self.aux, aux):
            buf.index_copy_(0, g, a.index_select(0, idx))
        self.iters.index_fill_(0, g, k)
        self.res.index_copy_(0, g, r.index_select(0, idx))
        self.best.index_copy_(0, g, best.index_select(0, idx))


def _advance(spec: LoopSpec, state, x: Optional[Tensor], fx: Tensor, live: Optional[Tensor]):
    """One solver step; frozen rows (``live`` False) keep their iterate and state."""
    if spec.solver is not None:
        x0 = torch.zeros_like(fx) if x is None else x
        if state is None:
            state = spec.solver.init(x0)
        new, new_state = spec.solver.step(state, x0, fx)
        if live is not None:
            new_state = tuple(torch.where(live.view((-1,) + (1,) * (s.dim() - 1)), n, s) for n, s in zip(new_state, state))
    else:
        new_state = None
        if spec.damping == 1.0:
            new = fx
        else:
            new = fx * spec.damping if x is None else torch.lerp(x, fx, spec.damping)
    if live is not None:
        new = torch.where(live.unsqueeze(1), new, torch.zeros_like(new) if x is None else x)
    return new, new_state


def limits(spec: LoopSpec, like: Tensor) -> Tuple[Tensor, Tensor]:
    """``tol`` and ``divergence_factor`` as 0-d tensors (a Python scalar operand costs more per op)."""
    dtype = torch.promote_types(like.dtype, torch.float32)  # residuals are at least float32
    return (torch.tensor(spec.tol, dtype=dtype, device=like.device),
            torch.tensor(spec.factor, dtype=dtype, device=like.device))


def solve_step(m: StepMap, x0: Optional[Tensor], B: int, spec: LoopSpec, lims: Tuple[Tensor, Tensor],
               sync_from: int = 1) -> StepResult:
    """Solve one step's fixed point ``x = f(x)`` from ``x0`` (None: zero) for a batch of ``B``.

    ``lims``: :func:`limits` of ``spec``; ``sync_from``: the first evaluation whose check is read
    back (earlier checks are deferred).
    """
    tol, factor = lims
    x, state = x0, None
    best: Optional[Tensor] = None
    rows: Optional[Tensor] = None  # global row of each active row once compacted (None: identity)
    live: Optional[Tensor] = None  # masked mode: rows still iterating (None: all)
    hold: Optional[_Holder] = None
    entries: List[tuple] = []  # deferred checks: (k, x, aux, r, best, pending)
    k = 0
    max_iter, every, plain = spec.max_iter, spec.check_every, spec.solver is None and spec.damping == 1.0
    shortcut = spec.factor >= 1  # then r <= factor * min(best, r)  <=>  r <= factor * best
    evaluate, residual = m.evaluate, m.residual
    while True:
        aux, fx = evaluate(x)
        k += 1
        last = k >= max_iter
        if last or (k - 1) % every == 0:
            r = residual(x, fx)
            if best is None and shortcut:  # first check: r <= factor * r for every finite r
                pending, best = r > tol, r  # (and NaN fails r > tol)
            elif shortcut:
                pending = (r > tol).logical_and_(r <= best * factor)
                best = torch.fmin(best, r)
            else:
                best = r if best is None else torch.fmin(best, r)
                pending = (r > tol).logical_and_(r <= best * factor)
            if live is not None:
                pending.logical_or_(~live)
            if hold is None and live is None and not entries and (last or k >= sync_from):
                counts = _read_counts([pending])  # the usual case: this check is read at once
                if counts[0] == fx.shape[0] and not last:
                    x, state = (fx, None) if plain else _advance(spec, state, x, fx, live)
                    continue
                if counts[0] == 0 or last:  # every sample finished here (or must stop here)
                    return StepResult(x, aux, k, r, best, k)
                entries = [(k, x, aux, r, best, pending)]
            else:
                entries.append((k, x, aux, r, best, pending))
                if not (last or k >= sync_from):
                    x, state = (fx, None) if plain and live is None else _advance(spec, state, x, fx, live)
                    continue
                counts = _read_counts(_cumulative(entries) if len(entries) > 1 else [pending])
            outcome = _settle(entries, counts, last, spec, rows, live, hold, B, fx)
            entries = []
            if outcome is None:
                pass
            elif isinstance(outcome, tuple):  # every sample finished at one check, none before
                kf, xf, auxf, rf, bf, _ = outcome
                return StepResult(xf, auxf, kf, rf, bf, k, stale=kf != k)
            else:
                hold, alive = outcome.hold, outcome.alive
                if alive is None:  # every sample has finished
                    if spec.compact:
                        return StepResult(hold.x, hold.aux, hold.iters, hold.res, hold.best, k)
                    return StepResult(hold.x, aux, hold.iters, hold.res, hold.best, k, stale=outcome.earlier)
                if spec.compact:
                    keep = alive.nonzero().squeeze(1)
                    rows = keep if rows is None else rows[keep]
                    x = None if x is None else x[keep]
                    fx, best = fx[keep], best[keep]
                    state = None if state is None else tuple(s[keep] for s in state)
                    m.compact(keep)
                else:
                    # finished samples go back to their answer and stay there: the next
                    # evaluations (for the others) recompute their intermediates unchanged
                    live = alive
                    if hold is not None:  # (batch halting: converged samples iterate on until all have)
                        x = hold.x.clone() if x is None else torch.where(alive.unsqueeze(1), x, hold.x)
        x, state = (fx, None) if plain and live is None else _advance(spec, state, x, fx, live)


@dataclass
class _Partial:
    hold: _Holder
    alive: Optional[Tensor]  # active rows still iterating (None: none)
    earlier: bool  # some samples finished at a check before the last evaluation


def _read_counts(acc: List[Tensor]) -> List[int]:
    """Pending samples after each deferred check: the loop's one host sync."""
    return [int(acc[0].count_nonzero())] if len(acc) == 1 else torch.stack([a.count_nonzero() for a in acc]).tolist()


def _cumulative(entries: List[tuple]) -> List[Tensor]:
    """Samples pending at every check up to each deferred one."""
    acc = [entries[0][-1]]
    for e in entries[1:]:
        acc.append(acc[-1] & e[-1])
    return acc


def _settle(entries, counts: List[int], last: bool, spec: LoopSpec, rows, live, hold, B: int, fx: Tensor):
    """Record the samples that finished at the deferred checks, given the pending counts read back.

    Returns None (every active sample still pending), the finishing entry when every sample
    finished at one check and none before, or a :class:`_Partial`.
    """
    b = fx.shape[0]
    first = next((i for i, c in enumerate(counts) if c < b), None)
    if first is None:
        if not last:
            return None
        first = len(entries) - 1
    together = counts[first] == 0 or (last and first == len(entries) - 1)
    if together and hold is None and live is None:
        return entries[first]
    # Samples finish at different checks: write them row by row (rare; extra syncs are fine here).
    alive = torch.ones(b, dtype=torch.bool, device=fx.device) if live is None else live.clone()
    earlier = False
    for i in range(first, len(entries)):
        k, x, aux, r, best, pending = entries[i]
        final = last and i == len(entries) - 1
        if spec.batch_halt:
            codes = status_codes(r, best, spec.factor, spec.tol)
            failed = alive & (codes != CONVERGED) & (codes != MAX_ITER)
            all_done = final or bool(((codes == CONVERGED) | failed | ~alive).all())
            fin = alive.clone() if all_done else failed
        else:
            fin = alive.clone() if final else alive & ~pending
        if not bool(fin.any()):
            continue
        if hold is None:
            hold = _Holder(B, fx, aux if spec.compact else (), r)
        hold.write(rows, fin, k, x, aux if spec.compact else (), r, best)
        earlier = earlier or i < len(entries) - 1
        alive &= ~fin
        if not bool(alive.any()):
            return _Partial(hold, None, earlier)
    return _Partial(hold, alive, earlier)
