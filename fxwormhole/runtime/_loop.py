"""The solve loops, their one halting classifier, and the ``on_fail`` policy.

Every loop solves ``x = f(x)`` for a flat ``[B, D]`` iterate, given a map
``fmap(x, rows) -> (aux, fx, scale)`` where ``aux`` is a tuple of per-sample tensors computed on the
way (the body output ``y`` in the forward solve, ``zbar`` in the adjoint solve), ``scale`` an
optional ``[b]`` reference norm and ``rows`` the indices (into the full batch) of the samples the
call is for (None: all). They share one schedule and one classifier, so they give the same numbers:

* evaluation ``k = 1`` is always checked (this is what makes a closed feedback cost one step);
  afterwards every ``check_every``-th evaluation and the ``max_iter``-th are checked;
* :func:`pending_of` / :func:`codes_of` (the classifier): a sample finishes at the check where its
  residual ``r <= tol`` (converged), ``r`` is not finite (non_finite), ``r > divergence_factor *
  min(r so far)`` (diverged) or ``k = max_iter``;
* the returned point is the iterate ``x_k`` at which ``f`` was evaluated, with its ``aux`` and ``r``;
* a solver with a ``fallback_rate`` (Anderson) takes plain (damped) steps for a sample while its
  residual falls by at least that factor per evaluation, tested at the 2nd, 4th, 8th, ... check;
  once a sample's residual falls more slowly it is accelerated from a fresh history for good.
  Everything is per sample, so a sample's trajectory never depends on the rest of its batch.

The loops:

* :func:`solve_eager`: per-sample halting that saves work: finished samples are indexed out of
  the active set. One host read per check (a count), nothing else per evaluation; the
  bookkeeping (scatter of the finished rows) only runs at checks where a sample finished.
* :func:`solve_blocks`: the compiled driver. A *step* function (compiled, no host reads) does one
  evaluation, check and solver step on a fixed-size batch, freezing finished rows; the driver
  calls it for a block of evaluations, then reads one count, moves finished rows out and pads the
  rest to a power-of-two bucket (so a handful of sizes, never 1, reach the compiled code).
* :func:`solve_while` (``torch.export``): one ``torch.while_loop`` over the full batch, finished
  rows frozen; what an exported program carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..config import SolverConfig
from ..errors import ConvergenceError
from ._tree import residual
from .solvers import FixedPointSolver
from .stats import CONVERGED, DIVERGED, MAX_ITER, NON_FINITE, HostReads, SolveStats, failure_advice, host_read

FMap = Callable[[Tensor, Optional[Tensor]], Tuple[Tuple[Tensor, ...], Tensor, Optional[Tensor]]]

_HINT = ("raise max_iter, use damping (solver='damped' or SolverConfig(damping=0.5)) or Anderson, "
         "lower the wormhole gate_init / projection scale so that the map is contractive, "
         "or spectral-normalise the feedback")


# ------------------------------------------------------------------------------------------------
# the schedule and the classifier (shared by every loop)
def is_check(k: int, every: int, max_iter: int) -> bool:
    return (k - 1) % every == 0 or k >= max_iter


def tests_contraction(c: int) -> bool:
    """Whether check number ``c`` (1-based) tests the contraction for the solver's fall-back."""
    return c >= 2 and (c & (c - 1)) == 0


def pending_of(r: Tensor, best: Tensor, tol: Any, factor: float) -> Tensor:
    """Samples that keep iterating after a check: not converged, not diverged, finite."""
    return (r > tol) & (r <= best * factor) & (r < float("inf"))


def check(x: Tensor, fx: Tensor, scale: Optional[Tensor], best: Optional[Tensor], tol: Any, factor: float):
    """The residual at a check, the best residual so far and :func:`pending_of`'s verdict."""
    r = residual(x, fx, scale)
    best = r if best is None else torch.fmin(best, r)
    return r, best, pending_of(r, best, tol, factor)


def codes_of(r: Tensor, pending: Tensor, tol: Any) -> Tensor:
    """Status codes for :func:`pending_of`'s verdict: MAX_ITER (still running), or why not."""
    code = torch.where(r <= tol, CONVERGED, torch.where(torch.isfinite(r), DIVERGED, NON_FINITE))
    return torch.where(pending, MAX_ITER, code).to(torch.int8)


_CODES: Dict[torch.device, Tuple[Tensor, Tensor]] = {}


def _status_at_first(conv: Tensor) -> Tensor:
    """Status codes at evaluation 1 for finished samples: converged, else non-finite (nothing can
    have diverged from its own best residual yet)."""
    codes = _CODES.get(conv.device)
    if codes is None:
        codes = _CODES[conv.device] = (torch.tensor(CONVERGED, dtype=torch.int8, device=conv.device),
                                       torch.tensor(NON_FINITE, dtype=torch.int8, device=conv.device))
    return torch.where(conv, *codes)


def slow_of(r: Tensor, r_prev: Tensor, rate: float) -> Tensor:
    """Samples whose residual fell by less than ``rate`` since the previous check."""
    return r > r_prev * rate


@dataclass
class Work:
    """Host-side account of one solve: what it cost."""

    evaluations: int = 0  # rows x evaluations actually computed (padding and frozen rows included)
    linearised: int = 0  # rows of forward evaluations made to linearise again (adjoint compaction)
    checks: int = 0
    host_reads: int = 0
    settled_first: bool = False  # every sample finished at evaluation 1
    last: int = 0  # evaluations of the longest-running sample
    ok: Optional[bool] = None  # every sample converged, when known without another host read


class _Steps:
    """The solver's steps with its per-sample fall-back (eager): no history is kept and no
    acceleration computed while no active sample needs it."""

    def __init__(self, solver: FixedPointSolver, x: Tensor, every: int) -> None:
        self.solver = solver
        rate = getattr(solver, "fallback_rate", None)
        self.rate = None if rate is None else float(rate) ** every
        self.accel: Optional[Tensor] = None  # per-sample switch (None: nobody accelerates yet)
        self.all_accel = self.rate is None
        self.state = solver.init(x) if self.all_accel else None

    def wants_test(self, c: int) -> bool:
        return not self.all_accel and tests_contraction(c)

    def update(self, slow: Tensor, pending: Tensor) -> None:
        """Switch on the slow pending samples."""
        now = slow & pending
        self.accel = now if self.accel is None else self.accel | now

    def set_count(self, n_accel: int, n_rows: int, x: Tensor) -> None:
        if n_accel == 0:
            self.accel = None
        elif self.state is None:
            self.state = self.solver.init(x)
        # (an empty batch has no sample to accelerate: plain steps, no history to keep)
        self.all_accel = self.rate is None or 0 < n_accel == n_rows

    def select(self, idx: Tensor) -> None:
        if self.state is not None:
            self.state = tuple(s.index_select(0, idx) for s in self.state)
        if self.accel is not None:
            self.accel = self.accel.index_select(0, idx)

    def __call__(self, x: Tensor, fx: Tensor) -> Tensor:
        if self.all_accel:
            x_new, self.state = self.solver.step(self.state, x, fx)
            return x_new
        if self.accel is None:
            return self.solver.fallback_step(x, fx)
        x_acc, state = self.solver.step(self.state, x, fx)
        # rows not (yet) accelerated keep a fresh history (the step may have written in place)
        fresh = self.solver.init(x)
        self.state = tuple(torch.where(self.accel.view((-1,) + (1,) * (n.dim() - 1)), n, s)
                           for n, s in zip(state, fresh))
        return torch.where(self.accel.unsqueeze(1), x_acc, self.solver.fallback_step(x, fx))


# ------------------------------------------------------------------------------------------------
# eager
class _Outputs:
    """Per-sample results, scattered in only at checks where some sample finished."""

    def __init__(self, B: int, x: Tensor, rdtype: torch.dtype, keep_aux: bool) -> None:
        dev = x.device
        self.x = x.new_empty(x.shape)
        self.aux: Optional[List[Tensor]] = None
        self.keep_aux = keep_aux
        self.iterations = torch.empty(B, dtype=torch.int64, device=dev)
        self.residual = torch.empty(B, dtype=rdtype, device=dev)
        self.status = torch.empty(B, dtype=torch.int8, device=dev)

    @classmethod
    def adopt(cls, k: int, x: Tensor, aux, r: Tensor, codes: Tensor, keep_aux: bool) -> "_Outputs":
        """The full-batch tensors of this check become the buffers: the samples finishing now are
        already in place (usually most of them), the others are written when they finish."""
        out = cls.__new__(cls)
        out.x, out.residual, out.status, out.keep_aux = x, r, codes, keep_aux
        out.aux = list(aux) if keep_aux else None
        out.iterations = torch.full((x.shape[0],), k, dtype=torch.int64, device=x.device)
        return out

    def put(self, g: Tensor, pos: Optional[Tensor], k: int, x: Tensor, aux, r: Tensor, codes: Tensor) -> None:
        take = (lambda t: t) if pos is None else (lambda t: t.index_select(0, pos))
        self.x.index_copy_(0, g, take(x))
        if self.keep_aux:
            if self.aux is None:
                self.aux = [a.new_empty((self.x.shape[0],) + a.shape[1:]) for a in aux]
            for buf, a in zip(self.aux, aux):
                buf.index_copy_(0, g, take(a))
        self.iterations.index_fill_(0, g, k)
        self.residual.index_copy_(0, g, take(r))
        self.status.index_copy_(0, g, take(codes))


class AdjointMap:
    """The adjoint map ``ybar -> (zbar, g + F_y^T B_z^T ybar)`` on an active set of samples.

    ``linearise(rows)`` (None: never linearise again) gives the linearisation at the solution on ``rows`` with
    ``.adjoint(cot) -> (zbar, F_y^T zbar, ...)``. The current one serves any subset of its rows
    (the cotangent is scattered into its rows, the result gathered back); once the active set is
    at most half of its rows, the map linearises again on the active rows only, so the adjoint's
    cost follows the samples still iterating."""

    def __init__(self, linearise: Optional[Callable[[Tensor], Any]], first: Any, g: Tensor) -> None:
        self.linearise, self.g = linearise, g
        self.lin, self.lin_rows, self.lin_n = first, None, g.shape[0]
        self.computed = 0  # rows the map really evaluated (a cotangent scattered into a larger linearisation costs all its rows)
        self.linearised = 0  # rows evaluated to linearise again
        self._key: Optional[Tensor] = None
        self._pos: Optional[Tensor] = None
        self._g: Tensor = g

    @staticmethod
    def linearise_when(n_live: int, n_lin: int) -> bool:
        """Linearise again once the active samples are at most half the linearised rows."""
        return n_live * 2 <= n_lin

    def account(self, work: Work) -> Work:
        """Put the rows really computed into a solve's ``work`` (the first evaluation is its own)."""
        work.evaluations = self.g.shape[0] + self.computed
        work.linearised = self.linearised
        return work

    def __call__(self, ybar: Tensor, rows: Optional[Tensor]):
        if rows is not self._key:
            self._key = rows
            if rows is not None and self.linearise is not None and self.linearise_when(rows.shape[0], self.lin_n):
                self.lin, self.lin_rows, self.lin_n = self.linearise(rows), rows, rows.shape[0]
                self.linearised += self.lin_n
            self._g = self.g if rows is None else self.g.index_select(0, rows)
            if rows is None or (self.lin_rows is not None and rows.shape[0] == self.lin_n):
                self._pos = None
            else:
                self._pos = rows if self.lin_rows is None else torch.searchsorted(self.lin_rows, rows)
        self.computed += self.lin_n
        if self._pos is None:
            zbar, yb = self.lin.adjoint(ybar)[:2]
        else:
            cot = ybar.new_zeros((self.lin_n, ybar.shape[1])).index_copy_(0, self._pos, ybar)
            zbar, yb = (t.index_select(0, self._pos) for t in self.lin.adjoint(cot)[:2])
        return (zbar,), self._g + yb.to(self._g.dtype), None


def solve_eager(fmap: FMap, x0: Tensor, solver: FixedPointSolver, cfg: SolverConfig, *,
                tol: Optional[float] = None, max_iter: Optional[int] = None,
                first: Optional[Tuple[Tuple[Tensor, ...], Tensor, Optional[Tensor]]] = None,
                keep_aux: bool = True) -> Tuple[Tensor, Optional[Tuple[Tensor, ...]], SolveStats, Work]:
    """Eager solve; ``cfg.halting="sample"`` drops finished samples from the active set (later
    evaluations cost only the samples still running), ``"batch"`` iterates the whole batch until
    every sample converged. ``first`` is the evaluation at ``x0`` if already made.
    Returns ``(x*, aux*, stats, work)``."""
    tol = cfg.tol if tol is None else tol
    max_iter = cfg.max_iter if max_iter is None else max_iter
    if cfg.halting == "batch":
        return _solve_batch(fmap, x0, solver, cfg, tol, max_iter, first, keep_aux)
    B = x0.shape[0]
    every, factor = int(cfg.check_every), float(cfg.divergence_factor)
    work = Work()
    reads0 = HostReads.count
    aux, fx, scale = first if first is not None else fmap(x0, None)
    x, rows, n = x0, None, B  # rows: indices of the active samples (None: all B, in order)
    steps = _Steps(solver, x0, every)
    out: Optional[_Outputs] = None
    r_prev: Optional[Tensor] = None
    bound: Optional[Tensor] = None  # divergence_factor x the best residual so far, per sample
    k = c = failed = 0
    while True:
        k += 1
        work.evaluations += n
        if every == 1 or is_check(k, every, max_iter):
            c += 1
            r = residual(x, fx, scale)
            if bound is None:  # check 1: nothing can have diverged from its own best yet
                bound = (r * factor).clamp_(max=torch.finfo(r.dtype).max)
                pending = (r > tol) & (r <= bound)
            else:
                # bound = factor * (best residual so far), finite: r > bound is pending_of's
                # "diverged", and an infinite r exceeds it (fmin keeps a NaN out of the bound)
                bound = torch.fmin(bound, r * factor)
                pending = (r > tol) & (r <= bound)
            conv = r <= tol
            # one read: pending, converged (the on_fail verdict) and accelerated counts together
            counted = [pending, conv]
            if steps.wants_test(c):
                steps.update(slow_of(r, r_prev, steps.rate), pending)
                counted.append(steps.accel & pending)
            vals = [int(v) for v in host_read(torch.stack(counted).sum(1))]
            n_pend, n_conv = vals[0], vals[1]
            n_accel = vals[2] if len(vals) > 2 else None
            failed += (n if k >= max_iter else n - n_pend) - n_conv
            if n_pend < n or k >= max_iter:
                done = k >= max_iter
                n_fin = n if done else n - n_pend
                if n_fin == B:  # everyone at once (closed nodes): no bookkeeping at all
                    work.checks, work.last, work.settled_first = c, k, k == 1
                    work.host_reads, work.ok = HostReads.count - reads0, failed == 0
                    codes = _status_at_first(conv) if c == 1 and not done and factor >= 1.0 else codes_of(r, pending, tol)
                    it = torch.full((B,), k, dtype=torch.int64, device=x.device)
                    return x, (aux if keep_aux else None), SolveStats(it, r, codes), work
                codes = codes_of(r, pending, tol)
                if out is None and rows is None and not x.requires_grad:
                    out = _Outputs.adopt(k, x, aux, r, codes, keep_aux)  # nothing to copy now
                    fin = None
                elif out is None:
                    out = _Outputs(B, x0, r.dtype, keep_aux)
                if done or n_fin == n:
                    out.put(rows, None, k, x, aux, r, codes)
                    break
                order = torch.argsort(pending.to(torch.uint8), stable=True)  # finished first, order kept
                keep = order[n_fin:]
                if out.x is not x:  # (adopted buffers hold the finishing rows already)
                    fin = order[:n_fin]
                    out.put(fin if rows is None else rows.index_select(0, fin), fin, k, x, aux, r, codes)
                rows = keep if rows is None else rows.index_select(0, keep)
                x, fx, bound, r = (t.index_select(0, keep) for t in (x, fx, bound, r))
                steps.select(keep)
                n = n_pend
            if n_accel is not None:
                steps.set_count(n_accel, n, x)
            r_prev = r
        x = steps(x, fx)
        aux, fx, scale = fmap(x, rows)
    work.checks, work.last = c, k
    work.host_reads, work.ok = HostReads.count - reads0, failed == 0
    stats = SolveStats(out.iterations, out.residual, out.status)
    return out.x, (tuple(out.aux) if out.aux is not None else None), stats, work


def _solve_batch(fmap, x0, solver, cfg, tol, max_iter, first, keep_aux):
    """``halting="batch"``: the whole batch iterates until every sample converged (bodies that
    couple samples). Failed samples are frozen; the others return their last iterate."""
    B = x0.shape[0]
    every, factor = int(cfg.check_every), float(cfg.divergence_factor)
    work = Work()
    reads0 = HostReads.count
    aux, fx, scale = first if first is not None else fmap(x0, None)
    x = x0
    steps = _Steps(solver, x0, every)
    out = _Outputs(B, x0, torch.promote_types(x0.dtype, torch.float32), keep_aux)
    live: Optional[Tensor] = None  # None: all live
    n_live = B
    best = r_prev = None
    k = c = n_failed = 0
    while True:
        k += 1
        work.evaluations += B
        if is_check(k, every, max_iter):
            c += 1
            r, best, pending = check(x, fx, scale, best, tol, factor)
            codes = codes_of(r, pending, tol)
            live_now = torch.ones_like(pending) if live is None else live
            failed = live_now & ~pending & (codes != CONVERGED)
            reads = [(live_now & pending).sum(), failed.sum()]
            if steps.wants_test(c):
                steps.update(slow_of(r, r_prev, steps.rate), pending & live_now)
                reads.append(steps.accel.sum())
            vals = [int(v) for v in host_read(torch.stack(reads))]
            n_failed += vals[1] + (vals[0] if k >= max_iter else 0)
            if vals[0] == 0 or k >= max_iter:
                g = live_now.nonzero_static(size=n_live).view(-1)
                out.put(g, g, k, x, aux, r, codes)
                break
            if vals[1]:
                g = failed.nonzero_static(size=vals[1]).view(-1)
                out.put(g, g, k, x, aux, r, codes)
                live = live_now & ~failed
                n_live -= vals[1]
            if len(vals) > 2:
                steps.set_count(vals[2], B, x)
            r_prev = r
        x_new = steps(x, fx)
        x = x_new if live is None else torch.where(live.unsqueeze(1), x_new, x)
        aux, fx, scale = fmap(x, None)
    work.checks, work.last, work.settled_first = c, k, k == 1  # (the closed guess of the next call)
    work.host_reads, work.ok = HostReads.count - reads0, n_failed == 0
    return out.x, (tuple(out.aux) if out.aux is not None else None), SolveStats(out.iterations, out.residual, out.status), work


# ------------------------------------------------------------------------------------------------
# compiled: blocks of a compiled step, compaction between blocks
@dataclass
class Carry:
    """The loop state of :func:`solve_blocks` (every tensor has batch dim 0)."""

    x: Tensor  # the point to evaluate next (frozen for finished rows)
    live: Tensor  # bool: still iterating
    best: Tensor
    r: Tensor  # residual at the last check (for finished rows: at their stop)
    iterations: Tensor  # int64: evaluations spent per row
    status: Tensor  # int8
    accel: Tensor  # bool: the solver accelerates this row
    state: Tuple[Tensor, ...]

    def tensors(self) -> Tuple[Tensor, ...]:
        return (self.x, self.live, self.best, self.r, self.iterations, self.status, self.accel, *self.state)

    @staticmethod
    def of(tensors: Sequence[Tensor]) -> "Carry":
        return Carry(*tensors[:7], tuple(tensors[7:]))

    @staticmethod
    def start(x: Tensor, state: Sequence[Tensor], n_live: Optional[int] = None) -> "Carry":
        """A fresh carry at ``x``: the first ``n_live`` rows live (all when None), nothing measured."""
        size, dev = x.shape[0], x.device
        inf = torch.full((size,), float("inf"), dtype=torch.promote_types(x.dtype, torch.float32), device=dev)
        live = torch.ones(size, dtype=torch.bool, device=dev) if n_live is None else torch.arange(size, device=dev) < n_live
        return Carry(x, live, inf, inf.clone(), torch.zeros(size, dtype=torch.int64, device=dev),
                     torch.full((size,), MAX_ITER, dtype=torch.int8, device=dev),
                     torch.zeros(size, dtype=torch.bool, device=dev), tuple(state))


def step_body(fmap: Callable, carry: Carry, k: Tensor, solver: FixedPointSolver, cfg: SolverConfig, tol: Tensor,
              max_iter: int, variant: str = "full"):
    """One evaluation + check + solver step of the compiled loops (traceable, no host reads).

    ``k`` (0-d int64) is the evaluation number of this call (1-based). Finished rows are frozen:
    their point stays, so evaluating it again gives their output again. Returns the new carry and
    the evaluation's ``aux``."""
    every, factor = int(cfg.check_every), float(cfg.divergence_factor)
    rate = getattr(solver, "fallback_rate", None)
    x = carry.x
    aux, fx, scale = fmap(x)
    live = carry.live
    iterations = carry.iterations + live.to(torch.int64)
    checking = ((k - 1) % every == 0) | (k >= max_iter)
    on = live & checking
    r_new, best_new, pending = check(x, fx, scale, carry.best, tol, factor)
    r_new = r_new.to(carry.r.dtype)
    best = torch.where(on, best_new, carry.best)
    codes = codes_of(r_new, pending, tol)
    if cfg.halting == "batch":  # the whole batch runs until every live row is done; failures freeze
        failed = on & ~pending & (codes != CONVERGED)
        everyone = checking & ~(live & pending).any()
        fin = torch.where(everyone | (k >= max_iter), on, failed)
    else:
        fin = on & (~pending | (k >= max_iter))
    status = torch.where(fin, codes, carry.status)
    r = torch.where(on, r_new, carry.r)
    accel = carry.accel
    if rate is not None:
        # contraction test at the checks number 2, 4, 8, ... (check number c = (k-1)//every + 1)
        cnum = (k - 1) // every + 1
        testing = checking & (cnum >= 2) & ((cnum & (cnum - 1)) == 0)
        accel = accel | (testing & on & pending & slow_of(r_new, carry.r, float(rate) ** every))
    live_next = live & ~fin
    if variant != "full" and rate is not None:
        # no row was accelerated before this evaluation: the fall-back step for all, and a row the
        # contraction test just switched on takes its first accelerated step (the same value)
        x_next = torch.where(live_next.unsqueeze(1), solver.fallback_step(x, fx), x)
        state = carry.state
        if variant == "test":
            newly = accel & ~carry.accel & live_next
            _, first = solver.first_step(carry.state, x, fx)
            state = tuple(torch.where(newly.view((-1,) + (1,) * (n.dim() - 1)), n, s) for n, s in zip(first, state))
        return Carry(x_next, live_next, best, r, iterations, status, accel, state), aux
    x_acc, state = solver.step(carry.state, x, fx)
    if rate is not None:  # rows not accelerated take the plain step and keep a fresh history
        x_next = torch.where(accel.unsqueeze(1), x_acc, solver.fallback_step(x, fx))
        moves = accel & live_next
    else:
        x_next, moves = x_acc, live_next
    x_next = torch.where(live_next.unsqueeze(1), x_next, x)  # finished rows stay where they stopped
    state = tuple(torch.where(moves.view((-1,) + (1,) * (n.dim() - 1)), n, s) for n, s in zip(state, carry.state))
    return Carry(x_next, live_next, best, r, iterations, status, accel, state), aux


def pow2_bucket(n: int, low: int = 2) -> int:
    b = low
    while b < n:
        b *= 2
    return b


def pad_rows(t: Tensor, rows: Optional[Tensor], size: int) -> Tensor:
    """``t[rows]`` (all rows when None) padded with zero rows to ``size``."""
    if rows is not None:
        t = t.index_select(0, rows)
    if t.shape[0] == size:
        return t
    return torch.cat([t, t.new_zeros((size - t.shape[0],) + t.shape[1:])])


def solve_blocks(step: Callable, x0: Tensor, solver: FixedPointSolver, *,
                 max_iter: int, schedule: Sequence[int], take_inputs: Callable[[Optional[Tensor], int], Any],
                 keep_aux: bool = True, compact: bool = True, every: int = 1):
    """Drive ``step(carry, k, inputs, variant) -> (carry, aux)`` (compiled, fixed size; ``k`` the
    evaluation number, an int; ``variant`` what :func:`step_body` may skip: a solver with a
    fall-back keeps no state while no row is accelerated) in blocks whose
    lengths ``schedule`` gives (the last one repeats). After each block, one host read (the number
    of live rows); with ``compact`` the finished rows are moved to the outputs and the rest
    compacted and padded to a power-of-two bucket (padding rows start dead; ``take_inputs(rows,
    size)`` gives the step's other inputs for those rows). Without it (``halting="batch"``: the
    samples are coupled) the batch stays whole. Returns ``(x*, aux*, stats, work)``."""
    B, dev = x0.shape[0], x0.device
    rdtype = torch.promote_types(x0.dtype, torch.float32)
    work = Work()
    reads0 = HostReads.count
    rows: Optional[Tensor] = None  # the carry's real rows (None: 0..B-1, in order)
    size = pow2_bucket(B) if compact else B
    n = B
    fallback = getattr(solver, "fallback_rate", None) is not None and every == 1
    x_start = pad_rows(x0, None, size)
    carry = Carry.start(x_start, () if fallback else solver.init(x_start), B)
    outs: Optional[List[Tensor]] = None  # x, iterations, residual, status, *aux
    inputs = take_inputs(None, size)
    k = b = 0
    any_accel = False
    while True:
        length = min(schedule[min(b, len(schedule) - 1)], max_iter - k)
        b += 1
        aux: Sequence[Tensor] = ()
        for _ in range(length):
            k += 1
            variant = "full" if not fallback or any_accel else ("test" if tests_contraction(k) else "plain")
            if variant == "plain" and carry.state:
                carry.state = ()  # no row is accelerated: their histories are fresh, keep none
            elif variant != "plain" and not carry.state:
                carry.state = tuple(solver.init(carry.x))
            carry, aux = step(carry, k, inputs, variant)
            work.evaluations += size
            # a test may have switched rows on: the rest of the block steps them
            any_accel = any_accel or variant == "test"
        n_live, n_accel = (int(v) for v in host_read(torch.stack([carry.live.sum(), (carry.live & carry.accel).sum()])))
        any_accel = n_accel > 0
        work.checks += 1
        done = n_live == 0 or k >= max_iter
        if done and outs is None:  # all finished without a compaction: the carry is the result
            work.last, work.settled_first = k, k == 1
            work.host_reads = HostReads.count - reads0
            return (carry.x[:B], (tuple(a[:B] for a in aux) if keep_aux else None),
                    SolveStats(carry.iterations[:B], carry.r[:B], carry.status[:B]), work)
        if not done and (not compact or n_live == n):
            continue
        if outs is None:
            outs = [x0.new_empty(x0.shape), torch.empty(B, dtype=torch.int64, device=dev),
                    torch.empty(B, dtype=rdtype, device=dev), torch.empty(B, dtype=torch.int8, device=dev),
                    *([a.new_empty((B,) + a.shape[1:]) for a in aux] if keep_aux else [])]
        if done:
            fin, keep = torch.arange(n, device=dev), None
        else:
            order = torch.argsort(carry.live[:n].to(torch.uint8), stable=True)  # finished first, order kept
            fin, keep = order[: n - n_live], order[n - n_live:]
        g = fin if rows is None else rows.index_select(0, fin)
        for buf, t in zip(outs, (carry.x, carry.iterations, carry.r, carry.status, *(aux if keep_aux else ()))):
            buf.index_copy_(0, g, t.index_select(0, fin))
        if done:
            break
        rows = keep if rows is None else rows.index_select(0, keep)
        n, size = n_live, pow2_bucket(n_live)
        carry = Carry.of([pad_rows(t, keep, size) for t in carry.tensors()])  # padding rows are dead
        inputs = take_inputs(rows, size)
    work.last = k
    work.host_reads = HostReads.count - reads0
    x, it, r, st, *aux_out = outs
    return x, (tuple(aux_out) if keep_aux else None), SolveStats(it, r, st), work


# ------------------------------------------------------------------------------------------------
# torch.export: one while_loop
def solve_while(fmap: Callable, x0: Tensor, solver: FixedPointSolver, cfg: SolverConfig, *,
                tol: float, max_iter: int):
    """Fixed-shape solve for ``torch.export``: ``torch.while_loop`` over :func:`step_body` with an
    early exit once no sample is live. ``fmap(x) -> (aux, fx, scale)`` on the full batch.
    Returns ``(x*, aux*, iterations, residual, status)``."""
    from torch._higher_order_ops.while_loop import while_loop

    dev = x0.device
    aux0, fx0, scale0 = fmap(x0)
    rdt = torch.promote_types(x0.dtype, torch.float32)
    # tol as a 0-d tensor: a python float becomes a SymFloat under dynamic shapes that dynamo
    # cannot lift into a while_loop (research note 3.2.4).
    tol_t = torch.full((), tol, dtype=rdt, device=dev)
    carry0 = Carry.start(x0.clone(), [s.clone() for s in solver.init(x0)])
    # while_loop rejects carries that alias each other or the closed-over inputs: clone them all
    aux_init = tuple(torch.zeros_like(a) for a in aux0)

    def cond(k, aux, *t):
        return (k < max_iter) & t[1].any()

    def body(k, aux, *t):
        k1 = k + 1
        carry, aux_new = step_body(fmap, Carry.of(t), k1, solver, cfg, tol_t, max_iter)
        # a row that froze at this evaluation keeps this evaluation's aux; frozen rows keep theirs
        keep = Carry.of(t).live
        aux = tuple(torch.where(keep.view((-1,) + (1,) * (a.dim() - 1)), an, a) for an, a in zip(aux_new, aux))
        # no output may be an input or another output (a carry the step passes through unchanged, e.g.
        # the fall-back's switch of a solver without one): while_loop refuses aliasing
        seen = {id(v) for v in (k, *t)}
        outs = []
        for v in (*aux, *carry.tensors()):
            outs.append(v.clone() if id(v) in seen else v)
            seen.add(id(v))
        return (k1, tuple(outs[:len(aux)]), *outs[len(aux):])

    k0 = torch.zeros((), dtype=torch.int64, device=dev)
    out = while_loop(cond, body, (k0, aux_init, *carry0.tensors()))
    _, aux, *t = out
    carry = Carry.of(t)
    return carry.x, aux, carry.iterations, carry.r, carry.status


# ------------------------------------------------------------------------------------------------
# failure policy
def report(stats: SolveStats, *, name: str, on_fail: str, phase: str) -> None:
    """Apply the ``on_fail`` policy to a finished solve."""
    if on_fail == "ignore" or stats.ok:
        return
    counts = stats.counts()
    worst = stats.worst_residual
    msg = (f"fixed point {name!r}: {phase} solve did not converge for "
           f"{stats.status.numel() - counts.get('converged', 0)} of {stats.status.numel()} samples "
           f"(status counts {counts}, worst residual {worst:.3g}); "
           f"{failure_advice(stats.status, stats.iterations, phase, _HINT)}")
    if on_fail == "raise":
        raise ConvergenceError(msg)
    from ._warnings import warn_nonconvergence  # first failure in full, later ones summed up
    warn_nonconvergence(name, phase, msg, counts, stats.status.numel(), worst)

