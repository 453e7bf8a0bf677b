r"""The fast runtime of temporal wormholes: a whole sequence in one autograd node, hand-written VJPs.

Semantics are those of ``docs/recurrent.md`` (and of the generic path, which runs one
:class:`~fxwormhole.runtime.fixed_point.FixedPoint` per step): at step ``t`` the injection ``u``
into the wormholes' destination layers solves ``u* = F(B(u*; x_t, s_{t-1}))`` per sample, the step's
output is ``y* = B(u*)`` (every layer's new state), its gradient is implicit,

.. math::  \bar y = g + F_y^\top \bar u,\qquad \bar u = B_u^\top \bar y,

solved from ``ybar = g`` with the adjoint solver, and between steps the gradient is ordinary
back-propagation through time. What makes it cost what its arithmetic costs:

* one :class:`torch.autograd.Function` over the sequence: the forward time loop runs without a
  tape; the reverse loop uses the cells' hand-written VJPs (``temporal_cells.py``), so no
  ``torch.autograd.grad`` call and no tape is ever built or thrown away;
* the bottom layer's input projection ``W_ih x_t`` is one matmul over all ``T`` steps; each step's
  recurrent matmuls ``W_hh h_{t-1}`` (and biases) are computed once, outside its iterations;
  layers below the lowest wormhole destination and above the highest source run once per step,
  not once per iteration;
* weight gradients are formed after the reverse loop, one matmul per weight over ``T*B`` rows;
* the per-step solves (``temporal_solve.py``) halt per sample and read the device one or two
  times per step; statistics are ``[T, B]`` tensors and ``on_fail`` is applied once per sequence.

Entry points: :class:`TemporalRuntime` (built per module from a :class:`StackPlan`), whose
:meth:`TemporalRuntime.run` takes plain tensors, so that any code that recognises a stacked cell
loop (``nn.LSTMCell`` calls in a Python loop) can route it here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..config import GradConfig, SolverConfig
from ..errors import ConfigError, ConvergenceError
from .temporal_cells import LayerWeights, cell_math
from .temporal_maps import Feedback, gate_adjoint_factors
from .temporal_plan import StackPlan, TemporalStats
from .temporal_sequence import SequenceFn, SequenceJob
from .stats import failure_advice
from .temporal_solve import CONVERGED, LoopSpec

__all__ = ["StackPlan", "TemporalRuntime", "TemporalStats", "fast_path_refusal"]

_HINT = ("raise max_iter, use damping (solver='damped') or Anderson, lower the wormhole gate_init / "
         "projection scale so that the map is contractive, or set spectral_norm=True")


def fast_path_refusal(solver: SolverConfig, grad: GradConfig) -> Optional[str]:
    """Why a configuration cannot take the fast runtime (None: it can)."""
    if grad.mode != "implicit":
        return f"grad mode {grad.mode!r} (the fast runtime implements the implicit gradient)"
    for name in (solver.name, grad.solver):
        if name not in ("picard", "damped"):
            try:
                from .solvers import get_solver
                get_solver(name)
            except ConfigError:
                return f"unknown solver {name!r}"
    return None


def _loop_spec(cfg: SolverConfig, compact: bool) -> LoopSpec:
    solver = None
    if cfg.name not in ("picard", "damped"):
        from .solvers import make_solver
        solver = make_solver(cfg)
    return LoopSpec(tol=float(cfg.tol), max_iter=int(cfg.max_iter), check_every=int(cfg.check_every),
                    factor=float(cfg.divergence_factor), batch_halt=cfg.halting == "batch",
                    compact=compact and cfg.halting == "sample",
                    damping=float(cfg.damping) if cfg.name == "damped" else 1.0, solver=solver)


@dataclass(frozen=True)
class _Kernels:
    """The bulk functions the backward calls (eager or compiled)."""

    factors: Any
    gate_factors: Any


class TemporalRuntime:
    """Runs a stacked recurrent module with temporal wormholes (see the module docstring).

    Args:
        plan: the stack's shape and wormholes.
        solver, grad: the forward solve and the adjoint (``grad.mode`` must be ``implicit``;
            :func:`fast_path_refusal` says which configurations fit).
        on_fail: ``warn`` | ``raise`` | ``ignore``, applied once per sequence and per backward.
        name: used in warnings and errors.
    """

    def __init__(self, plan: StackPlan, solver: SolverConfig, grad: GradConfig, on_fail: str = "warn",
                 name: str = "temporal") -> None:
        why = fast_path_refusal(solver, grad)
        if why is not None:
            raise ConfigError(f"TemporalRuntime {name!r}: {why}; use the generic FixedPoint path")
        self.plan, self.on_fail, self.name = plan, on_fail, name
        self.cell = cell_math(plan.mode, plan.hidden_size, plan.proj_size)
        self.fwd_spec = _loop_spec(solver, compact=True)
        acfg = replace(solver, name=grad.solver, tol=grad.tol, max_iter=grad.max_iter, check_every=1)
        self.adj_spec = _loop_spec(acfg, compact=False)
        self.kernels = _Kernels(self.cell.factors, None)

    def compile(self, **compile_kwargs: Any) -> "TemporalRuntime":
        """Compile the per-sequence bulk work of the backward (the pointwise Jacobian factors of all
        T steps, and of the input gates) with ``torch.compile``, ``dynamic=True`` by default: one
        graph for every sequence length and batch size, so compile time does not grow with T.

        The per-iteration work stays eager: on a CPU a compiled call costs more than the few small
        kernels of one iteration (see docs/recurrent.md)."""
        kw = {"dynamic": True, **compile_kwargs}
        self.kernels = _Kernels(torch.compile(self.cell.factors, **kw), torch.compile(gate_adjoint_factors, **kw))
        return self

    def uncompile(self) -> "TemporalRuntime":
        self.kernels = _Kernels(self.cell.factors, None)
        return self

    # ---- tensors of a module -------------------------------------------------------------------
    def run(self, x: Tensor, h0: Tensor, c0: Optional[Tensor], layers: Sequence[Sequence[Optional[Tensor]]],
            wormholes: Sequence[Sequence[Optional[Tensor]]], masks: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor], TemporalStats]:
        """Run the stack over a time-major sequence.

        Args:
            x: ``[T, B, input_size]``.
            h0, c0: initial states ``[L, B, .]`` (``c0`` only for LSTM).
            layers: per layer ``(w_ih, w_hh, b_ih, b_hh, w_hr)`` (None where absent).
            wormholes: per pair ``(P, gate_logit, gate_weight)`` (``gate_weight`` only for input gates).
            masks: dropout masks ``[T, B, h]`` between layers (empty when dropout is off).

        Returns ``(output [T, B, h], h_n [L, B, h], c_n or None, stats)``; differentiable with
        respect to ``x``, the initial states and every tensor of ``layers`` and ``wormholes``.
        """
        flat = [t for layer in layers for t in layer] + [t for wh in wormholes for t in wh]
        stats = TemporalStats()
        projections = torch.cat([wh[0].detach().reshape(-1) for wh in wormholes])
        zero_feedback = not bool(projections.count_nonzero())  # one host read per sequence
        job = SequenceJob(self, stats, list(masks), zero_feedback)
        tensors = [x, h0, c0, *flat]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            outs = SequenceFn.apply(job, *tensors)
        else:
            with torch.no_grad():
                outs = job.forward(tensors, keep=False)
        out, hn = outs[0], outs[1]
        cn = outs[2] if c0 is not None else None
        return out, hn, cn, stats

    # ---- preparation ---------------------------------------------------------------------------
    def prepare(self, flat: Sequence[Optional[Tensor]]) -> Tuple[List[LayerWeights], List[Feedback]]:
        L = self.plan.num_layers
        W = [self.cell.prepare(*flat[5 * l: 5 * l + 5]) for l in range(L)]
        fbs = []
        off = 5 * L
        for k, ((a, b), size, kind, cap) in enumerate(zip(self.plan.pairs, self.plan.dst_sizes, self.plan.gates, self.plan.caps)):
            P, logit, wg = flat[off + 3 * k: off + 3 * k + 3]
            fbs.append(Feedback(a, b, size, kind, cap, P, logit, wg))
        return W, fbs

    def report(self, status: Tensor, residual: Tensor, phase: str, iterations: Optional[Tensor] = None) -> None:
        """Apply ``on_fail`` to a whole sequence's ``[T, B]`` statuses (one host sync; ``iterations``
        ``[T, B]`` tells non-finite inputs from failed iterations)."""
        if self.on_fail == "ignore" or not bool((status != CONVERGED).any()):
            return
        names = ("converged", "max_iter", "diverged", "non_finite")
        counts = torch.bincount(status.long().flatten(), minlength=4).tolist()
        worst = float(residual.detach().float().nan_to_num(nan=float("inf")).max())
        msg = (f"temporal fixed point {self.name!r}: {phase} solve did not converge for {status.numel() - counts[0]} "
               f"of {status.numel()} (step, sample) pairs (status counts "
               f"{ {n: c for n, c in zip(names, counts) if c} }, worst residual {worst:.3g}); "
               f"{failure_advice(status, iterations, phase, _HINT)}")
        if self.on_fail == "raise":
            raise ConvergenceError(msg)
        from ._warnings import warn_nonconvergence  # first failure in full, later ones summed up
        warn_nonconvergence(self.name, phase, msg, dict(zip(names, counts)), status.numel(), worst, "(step, sample) pairs")
