"""The two maps a time step iterates in the temporal runtime, and the wormholes' feedback.

:class:`ForwardMap` is ``u -> (layer states and intermediates, F(B(u)))`` over the layers the
injection reaches (the lowest wormhole destination to the highest source); :class:`AdjointMap` is
its adjoint ``ybar_src -> (gate cotangents, g_src + F_y^T B_u^T ybar)``. Both are reset per step
with that step's constants (hoisted recurrent matmuls; pointwise Jacobian factors) and evaluated
by :func:`~fxwormhole.runtime.temporal_solve.solve_step`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .temporal_cells import CellMath, LayerWeights
from .temporal_plan import StackPlan
from .temporal_solve import StepMap

__all__ = ["Feedback", "ForwardMap", "AdjointMap", "EPS", "gate_adjoint_factors", "norm_rows"]

EPS = 1e-12  # the residual's epsilon (as in the generic runtime)


def norm_rows(t: Tensor) -> Tensor:
    """Per-sample norm over the last dim, accumulated in float32 at least (as the generic residual)."""
    if t.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(t, dim=-1)
    return torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)


def gate_adjoint_factors(Q: Tensor, D: int, cap: float) -> Tensor:
    """The VJP factors of ``u = cap σ(Q_g) ⊙ Q_p`` for ``Q = [Q_g, Q_p]`` of every step: ``[..., 2, D]``."""
    s = torch.sigmoid(Q[..., :D])
    return torch.stack((cap * s * (1 - s) * Q[..., D:], cap * s), -2)


class Feedback:
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

    def adjoint_factors(self, Q: Tensor, kernel=None) -> Tensor:
        """Input gate: ``[..., 2, D]`` factors with ``dQ = zbar ⊙ factors`` (``kernel``: a compiled
        :func:`gate_adjoint_factors`)."""
        return (kernel or gate_adjoint_factors)(Q, self.D, self.cap)

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


class ForwardMap(StepMap):
    """One step's forward map ``u -> (states and intermediates of the looped layers, F(B(u)))``."""

    def __init__(self, plan: StackPlan, cell: CellMath, W: Sequence[LayerWeights], fbs: Sequence[Feedback]) -> None:
        self.plan, self.cell, self.W, self.fbs = plan, cell, W, fbs
        self.layers, self.hi = list(range(plan.lo, plan.hi + 1)), plan.hi
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
            if l < self.hi:
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
        ref = norm_rows(fu)
        diff = ref if u is None else norm_rows(fu - u)
        return diff / (ref + self.scale)

    def compact(self, keep: Tensor) -> None:
        self.consts = [tuple(t[keep] for t in c) for c in self.consts]
        self.masks = [None if m is None else m[keep] for m in self.masks]
        self.scale = self.scale[keep]


class AdjointMap(StepMap):
    """One step's adjoint map ``ybar_src -> (gate cotangents, g_src + F_y^T B_u^T ybar)``.

    The iterate is the cotangent of the source layers' hidden states: every other component of
    ``ybar`` is the constant ``g``, which enters the residual only through its norm.
    """

    def __init__(self, plan: StackPlan, cell: CellMath, W: Sequence[LayerWeights], fbs: Sequence[Feedback]) -> None:
        self.plan, self.cell, self.W, self.fbs = plan, cell, W, fbs
        self.srcs = plan.srcs
        self.src_slices = []
        start = 0
        for a in self.srcs:
            self.src_slices.append((a, start, start + plan.h_size))
            start += plan.h_size
        dsts = set(plan.dsts)
        # per looped layer, top down: (layer, weights, below is looped, is a destination)
        self.steps = [(l, W[l], l > plan.lo, l in dsts) for l in range(plan.hi, plan.lo - 1, -1)]
        self.top = plan.hi

    def reset(self, fac: List[tuple], masks: List[Optional[Tensor]], g_h: List[Tensor], g_c: List[Optional[Tensor]],
              upper: Optional[Tensor], const_norm: Tensor, QS: List[Optional[Tensor]], out_dA: List[Optional[Tensor]],
              out_d_in: Dict[int, Tensor], out_dQ: List[Optional[Tensor]]) -> None:
        """Per-step constants, and the step's slices of the sequence buffers that every evaluation
        overwrites (so the last evaluation's gate cotangents need no copy; ``out_dQ``: ``[B, 2, D]``)."""
        self.fac, self.masks, self.g_h, self.g_c = fac, masks, g_h, g_c
        self.upper, self.const_norm, self.QS = upper, const_norm, QS
        self.out_dA, self.out_d_in, self.out_dQ = out_dA, out_d_in, out_dQ

    def evaluate(self, y: Optional[Tensor]):
        assert y is not None
        g_h, g_c, fac, masks, out_dA, out_d_in = self.g_h, self.g_c, self.fac, self.masks, self.out_dA, self.out_d_in
        ys = {a: y[:, i:j] for a, i, j in self.src_slices} if len(self.src_slices) > 1 else {self.top: y}
        vjp = self.cell.vjp
        aux: List[Tensor] = []
        d_in: Dict[int, Tensor] = {}
        dh = ys.get(self.top, g_h[self.top])
        if self.upper is not None:
            dh = dh + self.upper
        for l, w, below, is_dst in self.steps:
            dA, extra = vjp(w, fac[l], dh, g_c[l], out_dA[l])
            aux.append(dA)
            aux.append(dh)
            if extra is not None:
                aux.append(extra)
            if below:  # the cotangent of layer l-1's h: its own plus what layer l's input sends down
                base, m = ys.get(l - 1, g_h[l - 1]), masks[l - 1]
                if m is None and not is_dst:
                    dh = torch.addmm(base, dA, w.w_ih)
                    continue
                di = torch.mm(dA, w.w_ih, out=out_d_in.get(l))
                dh = base + di if m is None else torch.addcmul(base, di, m)
            elif is_dst:
                di = torch.mm(dA, w.w_ih, out=out_d_in.get(l))
            else:
                continue
            if is_dst:
                d_in[l] = di
                aux.append(di)
        if len(self.fbs) == 1 and len(self.src_slices) == 1:  # the usual single wormhole
            fb = self.fbs[0]
            zb = d_in[fb.dst]
            if fb.kind == "input":
                dQ = torch.mul(zb.unsqueeze(1), self.QS[0], out=self.out_dQ[0]).view(zb.shape[0], -1)
                aux.append(dQ)
                return tuple(aux), torch.addmm(g_h[fb.src], dQ, fb.WF)
            return tuple(aux), torch.addmm(g_h[fb.src], zb, fb.Peff)
        contrib: Dict[int, Tensor] = {}
        for fb, QS, out in zip(self.fbs, self.QS, self.out_dQ):
            zb = d_in[fb.dst]
            base = contrib.get(fb.src, g_h[fb.src])  # ynext = g + sum of the feedback VJPs
            if fb.kind == "input":
                dQ = torch.mul(zb.unsqueeze(1), QS, out=out).view(zb.shape[0], -1)
                aux.append(dQ)
                contrib[fb.src] = torch.addmm(base, dQ, fb.WF)
            else:
                contrib[fb.src] = torch.addmm(base, zb, fb.Peff)
        ynext = torch.cat([contrib[a] for a in self.srcs], 1) if len(self.srcs) > 1 else contrib[self.srcs[0]]
        return tuple(aux), ynext

    def residual(self, y: Optional[Tensor], yn: Tensor) -> Tensor:
        # ||ybar_next|| over every component, from the sources' part and the constant rest; the
        # epsilon rides on the constant part (const_norm = ||g_rest|| + eps), computed once per step
        ref = torch.hypot(norm_rows(yn), self.const_norm)
        return norm_rows(yn - y).div_(ref)

    def compact(self, keep: Tensor) -> None:  # the adjoint freezes finished samples instead
        raise NotImplementedError
