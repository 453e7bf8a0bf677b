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

import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..config import GradConfig, SolverConfig
from ..errors import ConfigError, ConvergenceError
from .temporal_cells import CellMath, LayerWeights, cell_math
from .temporal_solve import CONVERGED, LoopSpec, StepMap, solve_step, status_codes

__all__ = ["StackPlan", "TemporalRuntime", "TemporalStats", "fast_path_refusal"]

_EPS = 1e-12  # the residual's epsilon (as in the generic runtime)
_HINT = ("raise max_iter, use damping (solver='damped') or Anderson, lower the wormhole gate_init / "
         "projection scale so that the map is contractive, or set spectral_norm=True")


@dataclass(frozen=True)
class StackPlan:
    """Shape of a stacked recurrent module with temporal wormholes.

    ``pairs[k] = (src, dst)``: wormhole ``k`` feeds layer ``src``'s new hidden state into layer
    ``dst``'s input at the same step; ``gates[k]`` is its gate kind (``scalar``, ``channel``,
    ``input``) and ``caps[k]`` the gate's cap (1.0 for none).
    """

    mode: str
    num_layers: int
    input_size: int
    hidden_size: int
    proj_size: int
    pairs: Tuple[Tuple[int, int], ...]
    gates: Tuple[str, ...]
    caps: Tuple[float, ...]

    @property
    def h_size(self) -> int:
        return self.proj_size or self.hidden_size

    def in_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.h_size

    @property
    def dst_sizes(self) -> Tuple[int, ...]:
        return tuple(self.in_size(b) for _, b in self.pairs)

    @property
    def lo(self) -> int:
        """Lowest layer that depends on the injection (the lowest destination)."""
        return min(b for _, b in self.pairs)

    @property
    def hi(self) -> int:
        """Highest layer the feedback reads (the highest source)."""
        return max(a for a, _ in self.pairs)

    @property
    def srcs(self) -> Tuple[int, ...]:
        return tuple(sorted({a for a, _ in self.pairs}))

    @property
    def dsts(self) -> Tuple[int, ...]:
        return tuple(sorted({b for _, b in self.pairs}))


class TemporalStats:
    """Solver statistics of every step of the last forward; tensors are ``[T, B]``.

    ``backward_iterations`` (and ``backward_residual`` / ``backward_status``) are ``None`` until a
    backward pass has run through every step.
    """

    def __init__(self, iterations: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 status: Optional[Tensor] = None, *, steps: Optional[List[Any]] = None) -> None:
        self._steps = steps  # generic path: one FixedPointStats per step, filled in by its backward
        self._fwd = (iterations, residual, status)
        self._bwd: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    @classmethod
    def from_steps(cls, steps: List[Any]) -> "TemporalStats":
        return cls(steps=steps)

    @property
    def steps(self) -> int:
        return len(self._steps) if self._steps is not None else int(self._fwd[0].shape[0])

    def _stack(self, field: str) -> Optional[Tensor]:
        vals = [getattr(s, field) for s in self._steps]
        return None if any(v is None for v in vals) else torch.stack([v.detach() for v in vals])

    def _get(self, field: str, index: int, backward: bool) -> Optional[Tensor]:
        if self._steps is not None:
            return self._stack(("backward_" if backward else "") + field)
        if backward:
            return None if self._bwd is None else self._bwd[index]
        return self._fwd[index]

    @property
    def iterations(self) -> Tensor:
        return self._get("iterations", 0, False)  # type: ignore[return-value]

    @property
    def residual(self) -> Tensor:
        return self._get("residual", 1, False)  # type: ignore[return-value]

    @property
    def status(self) -> Tensor:
        return self._get("status", 2, False)  # type: ignore[return-value]

    @property
    def backward_iterations(self) -> Optional[Tensor]:
        return self._get("iterations", 0, True)

    @property
    def backward_residual(self) -> Optional[Tensor]:
        return self._get("residual", 1, True)

    @property
    def backward_status(self) -> Optional[Tensor]:
        return self._get("status", 2, True)

    def set_backward(self, iterations: Tensor, residual: Tensor, status: Tensor) -> None:
        self._bwd = (iterations, residual, status)

    def summary(self) -> dict:
        it = self.iterations.float()
        out = {"steps": self.steps, "mean_iterations": float(it.mean()), "max_iterations": int(it.max())}
        bwd = self.backward_iterations
        if bwd is not None:
            out["mean_backward_iterations"] = float(bwd.float().mean())
        return out


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


class _Feedback:
    """One wormhole's tensors for a sequence: ``u = cap*σ(gate) ⊙ P h_src``.

    Scalar and channel gates do not depend on ``h``: their value is folded into ``P`` once per
    sequence (``P_eff = s ⊙ P``), so the feedback costs one matmul per iteration.
    """

    def __init__(self, src: int, dst: int, size: int, kind: str, cap: float, P: Tensor, logit: Tensor,
                 w_gate: Optional[Tensor]) -> None:
        self.src, self.dst, self.D, self.kind, self.cap = src, dst, size, kind, cap
        self.P, self.logit = P, logit
        if kind == "input":
            self.WF = torch.cat((w_gate, P), 0)  # [2D, H]: gate pre-activation and projection in one matmul
            self.WFT = self.WF.t()
            self.bF = torch.cat((logit, torch.zeros_like(logit)))
        else:
            self.s = torch.sigmoid(logit) * cap
            self.Peff = P * (self.s if kind == "scalar" else self.s.unsqueeze(1))
            self.PeffT = self.Peff.t()

    def forward(self, h: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self.kind != "input":
            return torch.mm(h, self.PeffT), None
        Q = torch.addmm(self.bF, h, self.WFT)
        s = torch.sigmoid(Q[:, :self.D])
        if self.cap != 1.0:
            s.mul_(self.cap)
        return s * Q[:, self.D:], Q

    def grads(self, cot: Tensor, hs: Tensor, need: Tuple[bool, bool, bool]) -> Tuple[Optional[Tensor], ...]:
        """``(dP, dlogit, dW_gate)`` from the flat cotangents of all steps: ``dQ`` [TB, 2D] (input
        gate) or ``zbar`` [TB, D], and the source states ``hs`` [TB, H]."""
        D = self.D
        if self.kind == "input":
            dWF = cot.t().mm(hs)
            return dWF[D:], cot[:, :D].sum(0) if need[1] else None, dWF[:D]
        dPeff = cot.t().mm(hs)
        sig = torch.sigmoid(self.logit)
        ds = (dPeff * self.P).sum(1)
        dlogit = None
        if need[1]:
            dlogit = (ds.sum() if self.kind == "scalar" else ds) * (self.cap * sig * (1 - sig))
        dP = dPeff * (self.s if self.kind == "scalar" else self.s.unsqueeze(1)) if need[0] else None
        return dP, dlogit, None


class _ForwardMap(StepMap):
    """One step's forward map ``u -> (states and intermediates of the looped layers, F(B(u)))``."""

    def __init__(self, plan: StackPlan, cell: CellMath, W: Sequence[LayerWeights], fbs: Sequence[_Feedback]) -> None:
        self.plan, self.cell, self.W, self.fbs = plan, cell, W, fbs
        self.layers = list(range(plan.lo, plan.hi + 1))
        self.n_state = 2 if cell.has_c else 1
        self.inject: List[Tuple[int, int, int]] = []  # (dst, start, stop) slices of u
        start = 0
        for (_, b), size in zip(plan.pairs, plan.dst_sizes):
            self.inject.append((b, start, start + size))
            start += size
        self.single = len(plan.pairs) == 1

    def reset(self, consts: List[tuple], masks: List[Optional[Tensor]], scale: Tensor) -> None:
        self.consts, self.masks, self.scale = consts, masks, scale

    def injections(self, u: Tensor) -> Dict[int, Tensor]:
        if self.single:
            return {self.inject[0][0]: u}
        out: Dict[int, Tensor] = {}
        for b, i, j in self.inject:
            out[b] = u[:, i:j] if b not in out else out[b] + u[:, i:j]
        return out

    def evaluate(self, u: Optional[Tensor]):
        inj = None if u is None else self.injections(u)
        aux: List[Tensor] = []
        hs: Dict[int, Tensor] = {}
        inp: Optional[Tensor] = None
        cell, W = self.cell, self.W
        for j, l in enumerate(self.layers):
            if inj is not None and l in inj:
                inp = inj[l] if inp is None else inp + inj[l]
            state, extra = cell.evaluate(W[l], self.consts[j], inp)
            aux.extend(state)
            aux.extend(extra)
            h = hs[l] = state[0]
            if l < self.plan.hi:
                m = self.masks[j]
                inp = h if m is None else h * m
        parts = []
        for fb in self.fbs:
            part, Q = fb.forward(hs[fb.src])
            parts.append(part)
            if Q is not None:
                aux.append(Q)
        return tuple(aux), (parts[0] if len(parts) == 1 else torch.cat(parts, 1))

    def residual(self, u: Optional[Tensor], fu: Tensor) -> Tensor:
        ref = torch.linalg.vector_norm(fu, dim=1)
        diff = ref if u is None else torch.linalg.vector_norm(fu - u, dim=1)
        return diff / (ref + self.scale)

    def compact(self, keep: Tensor) -> None:
        self.consts = [tuple(t[keep] for t in c) for c in self.consts]
        self.masks = [None if m is None else m[keep] for m in self.masks]
        self.scale = self.scale[keep]


class _AdjointMap(StepMap):
    """One step's adjoint map ``ybar_src -> (gate cotangents, g_src + F_y^T B_u^T ybar)``.

    The iterate is the cotangent of the source layers' hidden states: every other component of
    ``ybar`` is the constant ``g``, which enters the residual only through its norm.
    """

    def __init__(self, plan: StackPlan, cell: CellMath, W: Sequence[LayerWeights], fbs: Sequence[_Feedback]) -> None:
        self.plan, self.cell, self.W, self.fbs = plan, cell, W, fbs
        self.layers = list(range(plan.hi, plan.lo - 1, -1))
        self.srcs = plan.srcs
        self.src_slices = []
        start = 0
        for a in self.srcs:
            self.src_slices.append((a, start, start + plan.h_size))
            start += plan.h_size
        self.dsts = set(plan.dsts)

    def reset(self, fac: List[tuple], masks: List[Optional[Tensor]], g_h: List[Tensor], g_c: List[Optional[Tensor]],
              upper: Optional[Tensor], const_norm: Optional[Tensor], QS: List[Optional[Tensor]]) -> None:
        self.fac, self.masks, self.g_h, self.g_c = fac, masks, g_h, g_c
        self.upper, self.const_norm, self.QS = upper, const_norm, QS

    def evaluate(self, y: Optional[Tensor]):
        assert y is not None
        ys = {a: y[:, i:j] for a, i, j in self.src_slices} if len(self.srcs) > 1 else {self.srcs[0]: y}
        cell, W, lo = self.cell, self.W, self.plan.lo
        aux: List[Tensor] = []
        d_in: Dict[int, Tensor] = {}
        d_above = self.upper
        for l in self.layers:
            dh = ys[l] if l in ys else self.g_h[l]
            if d_above is not None:
                dh = dh + d_above
            dA, extra = cell.vjp(W[l], self.fac[l], dh, self.g_c[l])
            aux.append(dA)
            aux.append(dh)
            if extra is not None:
                aux.append(extra)
            if l > lo or l in self.dsts:
                di = torch.mm(dA, W[l].w_ih)
                if l in self.dsts:
                    d_in[l] = di
                    aux.append(di)
                if l > lo:
                    m = self.masks[l - 1]
                    d_above = di if m is None else di * m
        contrib: Dict[int, Tensor] = {}
        for fb, QS in zip(self.fbs, self.QS):
            zb = d_in[fb.dst]
            base = contrib.get(fb.src, self.g_h[fb.src])  # ynext = g + sum of the feedback VJPs
            if fb.kind == "input":
                dQ = (zb.unsqueeze(1) * QS).view(zb.shape[0], 2 * fb.D)
                aux.append(dQ)
                contrib[fb.src] = torch.addmm(base, dQ, fb.WF)
            else:
                contrib[fb.src] = torch.addmm(base, zb, fb.Peff)
        ynext = contrib[self.srcs[0]] if len(self.srcs) == 1 else torch.cat([contrib[a] for a in self.srcs], 1)
        return tuple(aux), ynext

    def residual(self, y: Optional[Tensor], yn: Tensor) -> Tensor:
        ref = torch.linalg.vector_norm(yn, dim=1)
        if self.const_norm is not None:
            ref = torch.hypot(ref, self.const_norm)
        return torch.linalg.vector_norm(yn - y, dim=1).div_(ref.add_(_EPS))

    def compact(self, keep: Tensor) -> None:  # the adjoint freezes finished samples instead
        raise NotImplementedError


def _zeros_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


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
        self.hint_fwd, self.hint_adj = 1, 1  # evaluations of the last step solved (sync schedule)

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
        job = _Job(self, stats, list(masks), c0 is not None)
        tensors = [x, h0, c0, *flat]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            outs = _SequenceFn.apply(job, *tensors)
        else:
            with torch.no_grad():
                outs = job.forward(tensors, keep=False)
        out, hn = outs[0], outs[1]
        cn = outs[2] if c0 is not None else None
        return out, hn, cn, stats

    # ---- preparation ---------------------------------------------------------------------------
    def prepare(self, flat: Sequence[Optional[Tensor]]) -> Tuple[List[LayerWeights], List[_Feedback]]:
        L = self.plan.num_layers
        W = [self.cell.prepare(*flat[5 * l: 5 * l + 5]) for l in range(L)]
        fbs = []
        off = 5 * L
        for k, ((a, b), size, kind, cap) in enumerate(zip(self.plan.pairs, self.plan.dst_sizes, self.plan.gates, self.plan.caps)):
            P, logit, wg = flat[off + 3 * k: off + 3 * k + 3]
            fbs.append(_Feedback(a, b, size, kind, cap, P, logit, wg))
        return W, fbs

    def report(self, status: Tensor, residual: Tensor, phase: str) -> None:
        """Apply ``on_fail`` to a whole sequence's statuses (one host sync)."""
        if self.on_fail == "ignore" or not bool((status != CONVERGED).any()):
            return
        names = ("converged", "max_iter", "diverged", "non_finite")
        counts = torch.bincount(status.long().flatten(), minlength=4).tolist()
        worst = float(residual.detach().float().nan_to_num(nan=float("inf")).max())
        msg = (f"temporal fixed point {self.name!r}: {phase} solve did not converge for {status.numel() - counts[0]} "
               f"of {status.numel()} (step, sample) pairs (status counts "
               f"{ {n: c for n, c in zip(names, counts) if c} }, worst residual {worst:.3g}); to fix: {_HINT}")
        if self.on_fail == "raise":
            raise ConvergenceError(msg)
        # warn_explicit with a throwaway registry: the texts carry residuals, and warnings.warn would
        # remember every distinct one; the warning points at the first frame outside fxwormhole/torch.
        caller = sys._getframe(1)
        while caller.f_back is not None and caller.f_globals.get("__name__", "").split(".")[0] in ("fxwormhole", "torch"):
            caller = caller.f_back
        warnings.warn_explicit(msg, RuntimeWarning, caller.f_code.co_filename, caller.f_lineno,
                               module=caller.f_globals.get("__name__"), registry={}, module_globals=caller.f_globals)


def _step_stats(iters: List[Any], T: int, B: int, device) -> Tensor:
    """``[T, B]`` iteration counts from per-step ints (uniform steps) or ``[B]`` tensors."""
    uniform = torch.tensor([i if isinstance(i, int) else 0 for i in iters], dtype=torch.int64)
    out = uniform.to(device).unsqueeze(1).expand(T, B).clone()
    for t, i in enumerate(iters):
        if not isinstance(i, int):
            out[t] = i
    return out


class _Job:
    """One call of the runtime: the forward time loop, and the reverse loop its backward runs."""

    def __init__(self, rt: TemporalRuntime, stats: TemporalStats, masks: List[Tensor], lstm: bool) -> None:
        self.rt, self.stats, self.masks, self.lstm = rt, stats, masks, lstm
        self.saved: Optional[dict] = None

    def _mask_steps(self, T: int) -> List[List[Optional[Tensor]]]:
        """``[layer boundary][t]``: the mask on layer ``l``'s output (None: no dropout)."""
        L = self.rt.plan.num_layers
        if not self.masks:
            return [[None] * T for _ in range(L)]
        return [list(m.unbind(0)) for m in self.masks] + [[None] * T]

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, tensors: List[Optional[Tensor]], keep: bool):
        rt, plan, cell = self.rt, self.rt.plan, self.rt.cell
        x, h0, c0, flat = tensors[0], tensors[1], tensors[2], tensors[3:]
        T, B = x.shape[0], x.shape[1]
        L, lo, hi = plan.num_layers, plan.lo, plan.hi
        W, fbs = rt.prepare(flat)
        bias0 = cell.input_bias(W[0])
        x2 = x.reshape(T * B, -1)
        GX0 = (torch.mm(x2, W[0].w_ihT) if bias0 is None else torch.addmm(bias0, x2, W[0].w_ihT)).view(T, B, -1).unbind(0)
        scale = (torch.linalg.vector_norm(x, dim=2) + _EPS).unbind(0)  # ||x_t|| + eps per sample
        ms = self._mask_steps(T)
        fmap = _ForwardMap(plan, cell, W, fbs)
        ns = 2 if cell.has_c else 1
        prev = [((h0[l], c0[l]) if cell.has_c else (h0[l],)) for l in range(L)]
        states: List[List[tuple]] = [[] for _ in range(L)]
        auxes: List[List[tuple]] = [[] for _ in range(L)]
        Qs: List[List[Tensor]] = [[] for _ in fbs]
        U: List[Optional[Tensor]] = []
        iters, res, best = [], [], []
        hint = rt.hint_fwd
        for t in range(T):
            consts = [cell.hoist(W[l], prev[l], GX0[t] if l == 0 else None) for l in range(L)]
            inp = None
            for l in range(lo):  # below the wormholes: once per step
                st, ex = cell.evaluate(W[l], consts[l], inp)
                states[l].append(st)
                auxes[l].append(ex)
                inp = st[0] if ms[l][t] is None else st[0] * ms[l][t]
            if inp is not None:
                consts[lo] = cell.fold_input(W[lo], consts[lo], inp)
            fmap.reset(consts[lo:hi + 1], [ms[l][t] for l in range(lo, hi + 1)], scale[t])
            r = solve_step(fmap, None, B, rt.fwd_spec, max(1, hint - 1))
            hint = r.evaluations
            pos = 0
            for l in range(lo, hi + 1):
                st = tuple(r.aux[pos:pos + ns])
                ne = self._n_extra
                ex = tuple(r.aux[pos + ns:pos + ns + ne])
                pos += ns + ne
                states[l].append(st)
                auxes[l].append(ex)
            for k, fb in enumerate(fbs):
                if fb.kind == "input":
                    Qs[k].append(r.aux[pos])
                    pos += 1
            U.append(r.x)
            iters.append(r.iterations)
            res.append(r.residual)
            best.append(r.best)
            h = states[hi][-1][0]
            inp = h if ms[hi][t] is None else h * ms[hi][t]
            for l in range(hi + 1, L):  # above the wormholes: once per step
                st, ex = cell.evaluate(W[l], consts[l], inp)
                states[l].append(st)
                auxes[l].append(ex)
                inp = st[0] if ms[l][t] is None else st[0] * ms[l][t]
            prev = [states[l][-1] for l in range(L)]
        rt.hint_fwd = hint
        # statistics and the on_fail policy: once per sequence
        R, BEST = torch.stack(res), torch.stack(best)
        status = status_codes(R, BEST, rt.fwd_spec.factor, rt.fwd_spec.tol)
        self.stats._fwd = (_step_stats(iters, T, B, x.device), R, status)
        rt.report(status, R, "forward")
        out = torch.stack([s[0] for s in states[L - 1]])
        hn = torch.stack([states[l][-1][0] for l in range(L)])
        outs = (out, hn) + ((torch.stack([states[l][-1][1] for l in range(L)]),) if cell.has_c else ())
        if keep:
            zero_u = x.new_zeros(B, sum(plan.dst_sizes))
            # the top layer's h is the output: the backward takes it from save_for_backward (no cycle)
            top = (None,) + tuple(torch.stack(c) for c in list(zip(*states[L - 1]))[1:])
            self.saved = {
                "states": [tuple(torch.stack(c) for c in zip(*states[l])) for l in range(L - 1)] + [top],
                "aux": [tuple(torch.stack(c) for c in zip(*auxes[l])) if auxes[l][0] else () for l in range(L)],
                "Q": [torch.stack(q) if q else None for q in Qs],
                "U": torch.stack([zero_u if u is None else u for u in U]),
            }
        return outs

    @property
    def _n_extra(self) -> int:
        return {"LSTM": 4 if self.rt.plan.proj_size else 3, "GRU": 3}.get(self.rt.plan.mode, 0)

    # ---- backward ------------------------------------------------------------------------------
    def backward(self, tensors: List[Optional[Tensor]], out: Tensor, dout: Optional[Tensor], dhn: Optional[Tensor],
                 dcn: Optional[Tensor], needs: Sequence[bool]) -> List[Optional[Tensor]]:
        rt, plan, cell = self.rt, self.rt.plan, self.rt.cell
        saved, self.saved = self.saved, None
        assert saved is not None, "backward ran twice through a temporal runtime node"
        x, h0, c0, flat = tensors[0], tensors[1], tensors[2], tensors[3:]
        T, B = x.shape[0], x.shape[1]
        L, lo, hi = plan.num_layers, plan.lo, plan.hi
        W, fbs = rt.prepare(flat)
        saved["states"][L - 1] = (out,) + saved["states"][L - 1][1:]
        S, A = saved["states"], saved["aux"]
        ns = 2 if cell.has_c else 1
        # pointwise Jacobian factors of every step, a few large ops per layer
        fac, prevs = [], []
        for l in range(L):
            init = (h0[l], c0[l]) if cell.has_c else (h0[l],)
            prev = tuple(torch.cat((i.unsqueeze(0), s[:-1])) for i, s in zip(init, S[l]))
            prevs.append(prev)
            fac.append(cell.factors(A[l], S[l], prev))
        fac_t = [list(zip(*[f.unbind(0) for f in fl])) for fl in fac]
        QS = []
        for k, fb in enumerate(fbs):
            Q = saved["Q"][k]
            if Q is None:
                QS.append([None] * T)
                continue
            s = torch.sigmoid(Q[..., :fb.D])
            QS.append(list(torch.stack((fb.cap * s * (1 - s) * Q[..., fb.D:], fb.cap * s), -2).unbind(0)))
        ms = self._mask_steps(T)
        douts = dout.unbind(0) if dout is not None else None
        dh_next = [None if dhn is None else dhn[l] for l in range(L)]
        dc_next = [None if dcn is None else dcn[l] for l in range(L)]
        like_h = out[0]
        dA_all: List[List[Tensor]] = [[] for _ in range(L)]
        dh_all: List[List[Tensor]] = [[] for _ in range(L)]
        d_in_all: Dict[int, List[Tensor]] = {b: [] for b in plan.dsts}
        dQ_all: List[List[Tensor]] = [[] for _ in fbs]
        iters, res, best = [], [], []
        amap = _AdjointMap(plan, cell, W, fbs)
        srcs = plan.srcs
        hint = rt.hint_adj
        for t in range(T - 1, -1, -1):
            g_h = [_zeros_if_none(dh_next[l], like_h) for l in range(L)]
            if douts is not None:
                g_h[L - 1] = g_h[L - 1] + douts[t]
            g_c = dc_next if cell.has_c else [None] * L
            ft = [fac_t[l][t] for l in range(L)]
            extras: Dict[int, Any] = {}
            dAs: Dict[int, Tensor] = {}
            dhs: Dict[int, Tensor] = {}
            d_above = None
            for l in range(L - 1, hi, -1):  # above the wormholes: once per step
                dh = g_h[l] if d_above is None else g_h[l] + d_above
                dA, extras[l] = cell.vjp(W[l], ft[l], dh, g_c[l])
                dAs[l], dhs[l] = dA, dh
                di = torch.mm(dA, W[l].w_ih)
                m = ms[l - 1][t]
                d_above = di if m is None else di * m
            others = [g_h[l] for l in range(L) if l not in srcs] + [c for c in g_c if c is not None]
            const_norm = torch.linalg.vector_norm(torch.cat(others, 1), dim=1) if others else None
            amap.reset(ft, [ms[l][t] for l in range(L)], g_h, g_c, d_above, const_norm, [q[t] for q in QS])
            y0 = g_h[srcs[0]] if len(srcs) == 1 else torch.cat([g_h[a] for a in srcs], 1)
            r = solve_step(amap, y0, B, rt.adj_spec, max(1, hint - 1))
            hint = r.evaluations
            iters.append(r.iterations)
            res.append(r.residual)
            best.append(r.best)
            pos = 0
            d_in: Dict[int, Tensor] = {}
            for l in range(hi, lo - 1, -1):
                dAs[l], dhs[l] = r.aux[pos], r.aux[pos + 1]
                pos += 2
                if cell.has_c:
                    extras[l] = r.aux[pos]
                    pos += 1
                else:
                    extras[l] = None
                if l in plan.dsts:
                    d_in[l] = r.aux[pos]
                    pos += 1
            for k, fb in enumerate(fbs):
                if fb.kind == "input":
                    dQ_all[k].append(r.aux[pos])
                    pos += 1
            for b in plan.dsts:
                d_in_all[b].append(d_in[b])
            if lo > 0:  # below the wormholes: once per step
                m = ms[lo - 1][t]
                d_above = d_in[lo] if m is None else d_in[lo] * m
                for l in range(lo - 1, -1, -1):
                    dh = g_h[l] + d_above
                    dA, extras[l] = cell.vjp(W[l], ft[l], dh, g_c[l])
                    dAs[l], dhs[l] = dA, dh
                    if l > 0:
                        di = torch.mm(dA, W[l].w_ih)
                        m = ms[l - 1][t]
                        d_above = di if m is None else di * m
            for l in range(L):
                dA_all[l].append(dAs[l])
                dh_all[l].append(dhs[l])
                prev_c = cell.to_prev(W[l], ft[l], dAs[l], extras[l], dhs[l])
                dh_next[l] = prev_c[0]
                if cell.has_c:
                    dc_next[l] = prev_c[1]
        rt.hint_adj = hint
        iters.reverse()
        res.reverse()
        best.reverse()
        R, BEST = torch.stack(res), torch.stack(best)
        status = status_codes(R, BEST, rt.adj_spec.factor, rt.adj_spec.tol)
        self.stats.set_backward(_step_stats(iters, T, B, x.device), R, status)
        rt.report(status, R, "backward (adjoint)")
        return self._grads(tensors, saved, W, fbs, fac, prevs, dA_all, dh_all, d_in_all, dQ_all, dh_next, dc_next, ms, needs)

    def _grads(self, tensors, saved, W, fbs, fac, prevs, dA_all, dh_all, d_in_all, dQ_all, dh_next, dc_next, ms, needs):
        rt, plan, cell = self.rt, self.rt.plan, self.rt.cell
        x, h0, c0, flat = tensors[0], tensors[1], tensors[2], tensors[3:]
        T, B = x.shape[0], x.shape[1]
        TB, L = T * B, plan.num_layers
        S, A, U = saved["states"], saved["aux"], saved["U"]
        grads: List[Optional[Tensor]] = [None] * len(tensors)
        inj: Dict[int, Tensor] = {}
        start = 0
        for (_, b), size in zip(plan.pairs, plan.dst_sizes):
            part = U[..., start:start + size]
            inj[b] = part if b not in inj else inj[b] + part
            start += size
        for l in range(L):
            need = tuple(needs[3 + 5 * l + i] for i in range(5))
            dA = torch.stack(dA_all[l][::-1]).view(TB, -1)
            if not any(need) and not (l == 0 and needs[0] and 0 not in plan.dsts):
                dA_all[l] = dA  # type: ignore[assignment]
                continue
            if l == 0:
                inp = x if 0 not in inj else x + inj[0]
            else:
                h = S[l - 1][0]
                m = self.masks[l - 1] if self.masks else None
                inp = h if m is None else h * m
                if l in inj:
                    inp = inp + inj[l]
            dh = torch.stack(dh_all[l][::-1]).view(TB, -1) if need[4] else None
            hp = A[l][3].reshape(TB, -1) if need[4] else None
            g = cell.weight_grads(W[l], fac[l], dA, inp.reshape(TB, -1), prevs[l][0].reshape(TB, -1), dh, hp, need)
            grads[3 + 5 * l: 3 + 5 * l + 5] = g
            dA_all[l] = dA  # type: ignore[assignment]
        if needs[0]:
            if 0 in plan.dsts:
                grads[0] = torch.stack(d_in_all[0][::-1])
            else:
                grads[0] = dA_all[0].mm(W[0].w_ih).view(T, B, -1)  # type: ignore[union-attr]
        off = 3 + 5 * L
        for k, fb in enumerate(fbs):
            need = tuple(needs[off + 3 * k + i] for i in range(3))
            if not any(need):
                continue
            hs = S[fb.src][0].reshape(TB, -1)
            cot = torch.stack(dQ_all[k][::-1]) if fb.kind == "input" else torch.stack(d_in_all[fb.dst][::-1])
            grads[off + 3 * k: off + 3 * k + 3] = fb.grads(cot.reshape(TB, -1), hs, need)
        if needs[1]:
            grads[1] = torch.stack(dh_next)
        if needs[2] and cell.has_c:
            grads[2] = torch.stack(dc_next)
        return grads


class _SequenceFn(torch.autograd.Function):
    """The whole sequence as one autograd node (forward: time loop; backward: reverse loop)."""

    @staticmethod
    def forward(ctx, job: _Job, *tensors: Optional[Tensor]):
        outs = job.forward(list(tensors), keep=True)
        ctx.job = job
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(outs[0], *tensors)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhn, *rest):
        out, *tensors = ctx.saved_tensors
        dcn = rest[0] if rest else None
        job = ctx.job
        ctx.job = None
        grads = job.backward(list(tensors), out, dout, dhn, dcn, ctx.needs_input_grad[1:])
        return (None, *grads)
