"""The two solve loops (eager with per-sample halting; compiled with ``torch.while_loop``) and the
``on_fail`` policy.

Both loops solve ``x = f(x)`` for a flat ``[B, D]`` iterate given a map
``fmap(x, rows) -> (aux, fx, scale)`` where ``aux`` is a tuple of per-sample tensors computed on the
way (the body output ``y`` in the forward solve, ``zbar`` in the adjoint solve) and ``scale`` an
optional ``[b]`` reference norm. They share one schedule so that they produce the same numbers:

* evaluation ``k = 1`` is always checked (this is what makes a closed feedback cost one step);
  afterwards every ``check_every``-th evaluation and the ``max_iter``-th are checked;
* a sample finishes at the evaluation where its residual ``r <= tol`` (converged), ``r`` is not
  finite (non_finite), ``r > divergence_factor * min(r so far)`` (diverged) or ``k = max_iter``;
* the returned point is the iterate ``x_k`` at which ``f`` was evaluated, with its ``aux`` and ``r``.
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..config import SolverConfig
from ..errors import ConvergenceError
from .solvers import FixedPointSolver
from .stats import CONVERGED, DIVERGED, MAX_ITER, NON_FINITE, SolveStats, failure_advice
from ._tree import residual

FMap = Callable[[Tensor, Optional[Tensor]], Tuple[Tuple[Tensor, ...], Tensor, Optional[Tensor]]]

_HINT = ("raise max_iter, use damping (solver='damped' or SolverConfig(damping=0.5)) or Anderson, "
         "lower the wormhole gate_init / projection scale so that the map is contractive, "
         "or spectral-normalise the feedback")


def is_check(k: int, every: int, max_iter: int) -> bool:
    return (k - 1) % every == 0 or k >= max_iter


def _codes(r: Tensor, best: Tensor, factor: float, tol) -> Tensor:
    """Status code per sample for residual ``r`` (tol: float or 0-d tensor)."""
    status = torch.full_like(r, MAX_ITER, dtype=torch.int8)
    status = torch.where(r > factor * best, torch.full_like(status, DIVERGED), status)
    status = torch.where(r <= tol, torch.full_like(status, CONVERGED), status)
    return torch.where(torch.isfinite(r), status, torch.full_like(status, NON_FINITE))


def solve_eager(fmap: FMap, x0: Tensor, solver: FixedPointSolver, cfg: SolverConfig, *,
                tol: float, max_iter: int, compact: bool,
                first: Optional[Tuple[Tuple[Tensor, ...], Tensor, Optional[Tensor]]] = None,
                keep_aux: bool = True) -> Tuple[Tensor, Optional[Tuple[Tensor, ...]], SolveStats]:
    """Eager solve. ``compact=True`` (per-sample halting) indexes finished samples out of the
    active set, so later evaluations only cost the hard samples; otherwise finished samples are
    frozen by a mask (``halting="batch"`` keeps iterating until every sample converged)."""
    B, dev = x0.shape[0], x0.device
    if first is None:
        first = fmap(x0, None)
    r1 = residual(x0, first[1], first[2])
    if bool((r1 <= tol).all()):
        # Every sample settled at the first evaluation (closed wormholes): no bookkeeping, no
        # solver state; this is what keeps a closed node at the cost of one body evaluation.
        ones = torch.ones(B, dtype=torch.int64, device=dev)
        return x0, (first[0] if keep_aux else None), SolveStats(ones, r1, torch.full((B,), CONVERGED, dtype=torch.int8, device=dev))
    batch_halt = cfg.halting == "batch"
    compact = compact and not batch_halt
    factor = float(cfg.divergence_factor)
    out_x = x0.detach().clone()
    out_aux: Optional[list] = None
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    rdt = torch.promote_types(x0.dtype, torch.float32)
    res = torch.full((B,), float("inf"), dtype=rdt, device=dev)
    status = torch.full((B,), MAX_ITER, dtype=torch.int8, device=dev)
    rows = torch.arange(B, device=dev)
    live = torch.ones(B, dtype=torch.bool, device=dev)
    all_live = True
    best = torch.full((B,), float("inf"), dtype=rdt, device=dev)
    x, state = x0, solver.init(x0)
    k = 0
    while True:
        if k == 0 and first is not None:
            aux, fx, scale = first
        else:
            aux, fx, scale = fmap(x, None if rows.numel() == B else rows)
        k += 1
        if is_check(k, cfg.check_every, max_iter):
            r = residual(x, fx, scale)
            best = torch.fmin(best, r)
            # fast path, one host sync: every live sample still pending (NaN compares False)
            pending = (r > tol).logical_and_(r <= best * factor)
            if not all_live:
                pending.logical_or_(~live)
            if k < max_iter and bool(pending.all()):
                x, state = _advance(solver, state, x, fx, live, all_live or compact)
                continue
            codes = _codes(r, best, factor, tol)
            if batch_halt:
                done_now = (codes != MAX_ITER) & live  # failed or converged this check
                failed = done_now & (codes != CONVERGED)
                all_done = k >= max_iter or bool(((codes == CONVERGED) | failed | ~live).all())
                fin = live if all_done else failed
            else:
                fin = live & (codes != MAX_ITER) if k < max_iter else live
            if bool(fin.any()):
                g = rows[fin]
                out_x[g] = x[fin]
                iters[g] = k
                res[g] = r[fin]
                status[g] = codes[fin]
                if keep_aux:
                    if out_aux is None:
                        out_aux = [a.new_zeros((B,) + a.shape[1:]) for a in aux]
                    for buf, a in zip(out_aux, aux):
                        buf[g] = a[fin]
                if compact:
                    keep = ~fin
                    rows, x, fx, best, live = rows[keep], x[keep], fx[keep], best[keep], live[keep]
                    state = tuple(s[keep] for s in state)
                else:
                    live = live & ~fin
                    all_live = False
                if rows.numel() == 0 or not bool(live.any()):
                    break
        x, state = _advance(solver, state, x, fx, live, all_live or compact)
    return out_x, (tuple(out_aux) if out_aux is not None else None), SolveStats(iters, res, status)


def _advance(solver: FixedPointSolver, state, x: Tensor, fx: Tensor, live: Tensor, unmasked: bool):
    """One solver step; rows that are not live keep their iterate and state."""
    x_new, state_new = solver.step(state, x, fx)
    if unmasked:
        return x_new, state_new
    x_new = torch.where(live.unsqueeze(1), x_new, x)
    return x_new, tuple(torch.where(live.view((-1,) + (1,) * (s.dim() - 1)), n, s) for n, s in zip(state_new, state))


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


def solve_compiled(fmap: Callable, x0: Tensor, solver: FixedPointSolver, cfg: SolverConfig, *,
                   tol: float, max_iter: int, first: Tuple[Tuple[Tensor, ...], Tensor, Optional[Tensor]]):
    """Fixed-shape solve for ``torch.compile``: ``torch.while_loop`` with early exit on the
    active mask; finished samples are frozen with ``torch.where``. ``fmap(x) -> (aux, fx, scale)``
    (full batch). ``first`` is the evaluation at ``x0`` (done outside the loop, checked as k=1).
    Returns ``(x*, aux*, iterations, residual, status)``."""
    from torch._higher_order_ops.while_loop import while_loop

    B, dev = x0.shape[0], x0.device
    factor = float(cfg.divergence_factor)
    every = int(cfg.check_every)
    batch_halt = cfg.halting == "batch"
    aux0, fx0, scale0 = first
    r0 = residual(x0, fx0, scale0)
    rdt = r0.dtype
    # tol as a 0-d tensor: a python float becomes a SymFloat under dynamic shapes that dynamo
    # cannot lift into a while_loop nested in an autograd.Function (research note 3.2.4).
    tol_t = torch.full((), tol, dtype=rdt, device=dev)

    def classify(r, best, live, k_done):
        codes = _codes(r, best, factor, tol_t)
        if batch_halt:
            failed = live & (codes != CONVERGED) & (codes != MAX_ITER)
            all_done = (((codes == CONVERGED) | failed | ~live).all()) | k_done
            fin = torch.where(all_done, live, failed)
        else:
            fin = live & ((codes != MAX_ITER) | k_done)
        return codes, fin

    best0 = r0
    k0 = torch.ones((), dtype=torch.int64, device=dev)
    codes0, fin0 = classify(r0, best0, torch.ones(B, dtype=torch.bool, device=dev), k0 >= max_iter)
    status0 = torch.where(fin0, codes0, torch.full_like(codes0, MAX_ITER))
    # while_loop rejects carries that alias each other or the closed-over inputs: clone them all
    # (fx0 is often a view of aux0, e.g. when there is no feedback).
    carry = (k0, x0.clone(), fx0.clone(), tuple(a.clone() for a in aux0), ~fin0,
             torch.ones(B, dtype=torch.int64, device=dev), r0.clone(), status0, best0.clone(),
             tuple(s.clone() for s in solver.init(x0)))

    def cond(k, x, fx, aux, live, iters, res, status, best, state):
        return (k < max_iter) & live.any()

    def body(k, x, fx, aux, live, iters, res, status, best, state):
        scale = None
        r = res
        for _ in range(every):
            step_on = live & (k < max_iter)
            m = step_on.unsqueeze(1)
            x_new, state_new = solver.step(state, x, fx)
            aux_new, fx_new, scale = fmap(x_new)
            x = torch.where(m, x_new, x)
            fx = torch.where(m, fx_new, fx)
            aux = tuple(torch.where(step_on.view((-1,) + (1,) * (a.dim() - 1)), an, a) for an, a in zip(aux_new, aux))
            state = tuple(torch.where(step_on.view((-1,) + (1,) * (s.dim() - 1)), sn, s) for sn, s in zip(state_new, state))
            iters = iters + step_on.to(iters.dtype)
            k = k + 1
        r = torch.where(live, residual(x, fx, scale).to(rdt), res)
        best = torch.where(live, torch.fmin(best, r), best)
        codes, fin = classify(r, best, live, k >= max_iter)
        status = torch.where(fin, codes, status)
        return k, x, fx, aux, live & ~fin, iters, r, status, best, state

    out = while_loop(cond, body, carry)
    _, x, _, aux, _, iters, res, status, _, _ = out
    return x, aux, iters, res, status
