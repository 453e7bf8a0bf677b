"""One call of the temporal runtime: the forward time loop and the reverse loop of its backward.

:class:`SequenceJob` holds what one forward leaves for its backward; :class:`SequenceFn` makes the
whole sequence one autograd node. Two schedules compute the same values:

* **open wormholes** (time-major): at each step the layers below the lowest wormhole destination
  run once, the looped layers are solved with :class:`~fxwormhole.runtime.temporal_maps.ForwardMap`,
  the layers above the highest source run once; the reverse loop mirrors it with the adjoint map.
* **zero feedback** (every projection exactly zero, as at initialisation with ``proj_init="zero"``):
  the feedback is identically zero, so every step settles at its first evaluation with residual 0
  and the adjoint is plain back-propagation (``F_y = 0``). The stack then runs layer by layer, each
  layer's input projection one matmul over all T steps, as ATen does; the wormholes' gradients
  (only the projection's is non-zero) come from the layers' input cotangents.

Weight gradients are formed after the loops, one matmul per weight over the ``T*B`` rows.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor

from .temporal_cells import CellMath, LayerWeights
from .temporal_maps import EPS, AdjointMap, Feedback, ForwardMap, norm_rows
from .temporal_plan import StackPlan, TemporalStats
from .temporal_solve import LoopSpec, limits, solve_step, status_codes

__all__ = ["SequenceJob", "SequenceFn"]


def _step_stats(iters: List[Any], T: int, B: int, device) -> Tensor:
    """``[T, B]`` iteration counts from per-step ints (uniform steps) or ``[B]`` tensors."""
    uniform = torch.tensor([i if isinstance(i, int) else 0 for i in iters], dtype=torch.int64)
    out = uniform.to(device).unsqueeze(1).expand(T, B).clone()
    for t, i in enumerate(iters):
        if not isinstance(i, int):
            out[t] = i
    return out


def _stack_steps(steps: List[tuple]) -> Tuple[Tensor, ...]:
    """Per-step tuples of tensors -> one ``[T, ...]`` tensor per component."""
    return tuple(torch.stack(c) for c in zip(*steps)) if steps and steps[0] else ()


def _zero_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


class RuntimeParts(Protocol):
    """What a job reads of its :class:`~fxwormhole.runtime.temporal.TemporalRuntime` (a protocol, so that
    this module does not import the runtime that imports it)."""

    plan: StackPlan
    cell: CellMath
    fwd_spec: LoopSpec
    adj_spec: LoopSpec
    kernels: Any

    def prepare(self, flat: Sequence[Optional[Tensor]]) -> Tuple[List[LayerWeights], List[Feedback]]: ...

    def report(self, status: Tensor, residual: Tensor, phase: str, iterations: Optional[Tensor] = None) -> None: ...


class SequenceJob:
    """One call of a :class:`~fxwormhole.runtime.temporal.TemporalRuntime` (see the module docstring)."""

    def __init__(self, rt: RuntimeParts, stats: TemporalStats, masks: List[Tensor], zero_feedback: bool) -> None:
        self.rt, self.stats, self.masks, self.zero = rt, stats, masks, zero_feedback
        self.saved: Optional[dict] = None

    def _mask_steps(self, T: int) -> List[List[Optional[Tensor]]]:
        """``[layer][t]``: the dropout mask on layer ``l``'s output (None: none)."""
        L = self.rt.plan.num_layers
        if not self.masks:
            return [[None] * T for _ in range(L)]
        return [list(m.unbind(0)) for m in self.masks] + [[None] * T]

    def _mask(self, l: int) -> Optional[Tensor]:
        return self.masks[l] if self.masks and l < len(self.masks) else None

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, tensors: List[Optional[Tensor]], keep: bool) -> Tuple[Tensor, ...]:
        rt, cell = self.rt, self.rt.cell
        x, h0, c0 = tensors[0], tensors[1], tensors[2]
        L = rt.plan.num_layers
        W, fbs = rt.prepare(tensors[3:])
        init = [((h0[l], c0[l]) if cell.has_c else (h0[l],)) for l in range(L)]
        states, auxes, Qs, U = (self._forward_zero if self.zero else self._forward_open)(x, W, fbs, init)
        out = states[L - 1][0]
        outs = (out, torch.stack([s[0][-1] for s in states]))
        if cell.has_c:
            outs += (torch.stack([s[1][-1] for s in states]),)
        if keep:
            # the top layer's h is the output: the backward gets it from save_for_backward (no cycle)
            states[L - 1] = (None,) + states[L - 1][1:]
            self.saved = {"states": states, "aux": auxes, "Q": Qs, "U": U}
        return outs

    def _forward_zero(self, x: Tensor, W, fbs, init):
        """Zero feedback: layer by layer, input projections batched over T; one evaluation per step."""
        cell, T, B = self.rt.cell, x.shape[0], x.shape[1]
        states, auxes = [], []
        inp = x
        for l, w in enumerate(W):
            bias = cell.input_bias(w)
            flat_in = inp.reshape(T * B, -1)
            gx = (torch.mm(flat_in, w.w_ihT) if bias is None else torch.addmm(bias, flat_in, w.w_ihT)).view(T, B, -1)
            st, sts, exs = init[l], [], []
            for gx_t in gx.unbind(0):
                st, ex = cell.evaluate(w, cell.hoist(w, st, gx_t), None)
                sts.append(st)
                exs.append(ex)
            states.append(_stack_steps(sts))
            auxes.append(_stack_steps(exs))
            m = self._mask(l)
            inp = states[-1][0] if m is None else states[-1][0] * m
        ones = torch.ones(T, B, dtype=torch.int64, device=x.device)
        zeros = x.new_zeros(T, B, dtype=torch.promote_types(x.dtype, torch.float32))  # residual dtype
        self.stats._fwd = (ones, zeros, torch.zeros(T, B, dtype=torch.int8, device=x.device))
        return states, auxes, [None] * len(fbs), None

    def _forward_open(self, x: Tensor, W, fbs, init):
        """Time-major: per step, the looped layers solved per sample; the others once."""
        rt, plan, cell = self.rt, self.rt.plan, self.rt.cell
        T, B = x.shape[0], x.shape[1]
        L, lo, hi = plan.num_layers, plan.lo, plan.hi
        bias0 = cell.input_bias(W[0])
        x2 = x.reshape(T * B, -1)
        GX0 = (torch.mm(x2, W[0].w_ihT) if bias0 is None else torch.addmm(bias0, x2, W[0].w_ihT)).view(T, B, -1).unbind(0)
        # ||x_t|| + eps per sample (else the norm of the lowest destination's input, per step below)
        scale = (norm_rows(x) + EPS).unbind(0) if not (plan.region_only and plan.lo) else None
        ms = self._mask_steps(T)
        ms_t = list(zip(*ms))
        fmap = ForwardMap(plan, cell, W, fbs)
        lims = limits(rt.fwd_spec, x)
        ns, ne = (2 if cell.has_c else 1), cell.n_aux
        prev = list(init)
        states: List[List[tuple]] = [[] for _ in range(L)]
        auxes: List[List[tuple]] = [[] for _ in range(L)]
        Qs: List[List[Tensor]] = [[] for _ in fbs]
        U: List[Optional[Tensor]] = []
        iters, res, best = [], [], []
        # evaluations the previous step needed (its checks before that are deferred: one host read);
        # per call, so that no call's rounding depends on earlier calls (a resumed run is bit for bit)
        hint = 1

        def once(l: int, consts, inp):
            st, ex = cell.evaluate(W[l], consts, inp)
            states[l].append(st)
            auxes[l].append(ex)
            m = ms[l][t]
            return st[0] if m is None else st[0] * m

        for t in range(T):
            consts = [cell.hoist(W[l], prev[l], GX0[t] if l == 0 else None) for l in range(L)]
            inp = None
            for l in range(lo):  # below the wormholes: once per step
                inp = once(l, consts[l], inp)
            if inp is not None:
                consts[lo] = cell.fold_input(W[lo], consts[lo], inp)
            fmap.reset(consts[lo:hi + 1], ms_t[t][lo:hi + 1], scale[t] if scale is not None else norm_rows(inp).add_(EPS))
            r = solve_step(fmap, None, B, rt.fwd_spec, lims, max(1, hint - 1))
            hint = r.evaluations
            aux = fmap.evaluate(r.x)[0] if r.stale else r.aux  # (rare) the answer was not the last evaluation
            pos = 0
            for l in range(lo, hi + 1):
                states[l].append(tuple(aux[pos:pos + ns]))
                auxes[l].append(tuple(aux[pos + ns:pos + ns + ne]))
                pos += ns + ne
            for k, fb in enumerate(fbs):
                if fb.kind == "input":
                    Qs[k].append(aux[pos])
                    pos += 1
            U.append(r.x)
            iters.append(r.iterations)
            res.append(r.residual)
            best.append(r.best)
            if hi < L - 1:  # above the wormholes: once per step
                h, m = states[hi][-1][0], ms[hi][t]
                inp = h if m is None else h * m
                for l in range(hi + 1, L):
                    inp = once(l, consts[l], inp)
            prev = [states[l][-1] for l in range(L)]
        R, BEST = torch.stack(res), torch.stack(best)
        status = status_codes(R, BEST, rt.fwd_spec.factor, rt.fwd_spec.tol)
        self.stats._fwd = (_step_stats(iters, T, B, x.device), R, status)
        rt.report(status, R, "forward", self.stats._fwd[0])
        zero_u = x.new_zeros(B, sum(plan.dst_sizes))
        return ([_stack_steps(s) for s in states], [_stack_steps(a) for a in auxes],
                [torch.stack(q) if q else None for q in Qs], torch.stack([zero_u if u is None else u for u in U]))

    # ---- backward ------------------------------------------------------------------------------
    def backward(self, tensors: List[Optional[Tensor]], out: Tensor, dout: Optional[Tensor], dhn: Optional[Tensor],
                 dcn: Optional[Tensor], needs: Sequence[bool]) -> List[Optional[Tensor]]:
        rt, plan, cell = self.rt, self.rt.plan, self.rt.cell
        saved = self.saved
        assert saved is not None, "backward without a recorded forward"
        x, h0, c0 = tensors[0], tensors[1], tensors[2]
        L = plan.num_layers
        W, fbs = rt.prepare(tensors[3:])
        S, A = list(saved["states"]), saved["aux"]
        S[L - 1] = (out,) + S[L - 1][1:]  # the output itself is held by save_for_backward, not here (no cycle)
        saved = dict(saved, states=S)
        # pointwise Jacobian factors of every step: a few large ops per layer
        fac = [rt.kernels.factors(A[l], S[l], (h0[l], c0[l]) if cell.has_c else (h0[l],)) for l in range(L)]
        QS = []
        for k, fb in enumerate(fbs):
            Q = saved["Q"][k]
            if fb.kind == "input" and Q is None:  # zero feedback: the gate values were not needed forward
                Q = fb.forward(S[fb.src][0].reshape(-1, S[fb.src][0].shape[-1]))[1].view(S[fb.src][0].shape[:2] + (-1,))
            QS.append(None if Q is None else fb.adjoint_factors(Q, rt.kernels.gate_factors))
        run = self._backward_zero if self.zero else self._backward_open
        cot = run(x, W, fbs, fac, QS, out, dout, dhn, dcn, needs)
        return self._grads(tensors, saved, W, fbs, fac, QS, cot, needs)

    def _backward_zero(self, x, W, fbs, fac, QS, out, dout, dhn, dcn, needs) -> dict:
        """Zero feedback: plain back-propagation, layer by layer; input cotangents batched over T."""
        plan, cell = self.rt.plan, self.rt.cell
        T, B, L = x.shape[0], x.shape[1], plan.num_layers
        dA_all: List[Optional[Tensor]] = [None] * L
        dh_all: List[Optional[Tensor]] = [None] * L
        d_in_all: Dict[int, Tensor] = {}
        dh0: List[Tensor] = [None] * L  # type: ignore[list-item]
        dc0: List[Optional[Tensor]] = [None] * L
        d_above: Optional[Tensor] = None
        for l in range(L - 1, -1, -1):
            ft = list(zip(*[f.unbind(0) for f in fac[l]]))
            extra_in = dout if l == L - 1 else d_above
            ins = extra_in.unbind(0) if extra_in is not None else None
            dh_next = None if dhn is None else dhn[l]
            dc_next = None if dcn is None else dcn[l]
            dA_buf = out.new_empty(T, B, cell.gates * plan.hidden_size)
            dhs = [None] * T
            for t in range(T - 1, -1, -1):
                parts = [d for d in (dh_next, None if ins is None else ins[t]) if d is not None]
                dh = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else torch.zeros_like(out[0]))
                dA, extra = cell.vjp(W[l], ft[t], dh, dc_next, dA_buf[t])
                dhs[t] = dh
                prev = cell.to_prev(W[l], ft[t], dA, extra, dh)
                dh_next = prev[0]
                dc_next = prev[1] if cell.has_c else None
            dh0[l], dc0[l] = dh_next, dc_next
            dA_all[l] = dA_buf
            dh_all[l] = torch.stack(dhs) if plan.proj_size else None
            if l > 0 or l in plan.dsts or needs[0]:
                d_in = dA_all[l].view(T * B, -1).mm(W[l].w_ih).view(T, B, -1)
                if l in plan.dsts:
                    d_in_all[l] = d_in
                m = self._mask(l - 1) if l > 0 else None
                d_above = d_in if m is None else d_in * m
        if needs[0] and 0 not in d_in_all:
            d_in_all[0] = d_above  # type: ignore[assignment]
        dQ_all = [None if q is None else (d_in_all[fb.dst].unsqueeze(-2) * q).flatten(-2) for fb, q in zip(fbs, QS)]
        ones = torch.ones(T, B, dtype=torch.int64, device=x.device)
        self.stats.set_backward(ones, x.new_zeros(T, B, dtype=torch.promote_types(x.dtype, torch.float32)),
                                torch.zeros(T, B, dtype=torch.int8, device=x.device))
        return dict(dA=dA_all, dh=dh_all, d_in=d_in_all, dQ=dQ_all, dh0=dh0, dc0=dc0)

    def _backward_open(self, x, W, fbs, fac, QS, out, dout, dhn, dcn, needs) -> dict:
        """Time-major reverse loop: per step, the adjoint of the looped layers solved per sample."""
        rt, plan, cell = self.rt, self.rt.plan, self.rt.cell
        T, B = x.shape[0], x.shape[1]
        L, lo, hi = plan.num_layers, plan.lo, plan.hi
        fac_t = [list(zip(*[f.unbind(0) for f in fl])) for fl in fac]
        QS_t = [None if q is None else q.unbind(0) for q in QS]
        ms = self._mask_steps(T)
        douts = dout.unbind(0) if dout is not None else None
        dh_next = [None if dhn is None else dhn[l] for l in range(L)]
        dc_next = [None if dcn is None else dcn[l] for l in range(L)]
        # sequence buffers the reverse loop writes in place (each step's last evaluation wins)
        dA_buf = [out.new_empty(T, B, cell.gates * plan.hidden_size) for _ in range(L)]
        d_in_buf = {b: out.new_empty(T, B, plan.in_size(b)) for b in plan.dsts}
        dQ_buf = [out.new_empty(T, B, 2 * fb.D) if fb.kind == "input" else None for fb in fbs]
        keep_dh = plan.proj_size > 0  # the cotangent of h is needed after the loop only for d W_hr
        dh_buf = [out.new_empty(T, B, plan.h_size) for _ in range(L)] if keep_dh else None
        # per-step views, made once: indexing a buffer per step is an op each time
        dA_t = [b.unbind(0) for b in dA_buf]
        d_in_t = {b: buf.unbind(0) for b, buf in d_in_buf.items()}
        dQ_t = [None if q is None else q.view(T, B, 2, -1).unbind(0) for q in dQ_buf]
        ms_t = list(zip(*ms))
        iters, res, best = [], [], []
        amap = AdjointMap(plan, cell, W, fbs)
        lims = limits(rt.adj_spec, out)
        srcs, has_c = plan.srcs, cell.has_c
        region = range(hi, lo - 1, -1)
        counted = range(lo, hi + 1) if plan.region_only else range(L)  # layers in the adjoint residual
        zero_h = torch.zeros_like(out[0])
        hint = 1
        for t in range(T - 1, -1, -1):
            g_h = [zero_h if d is None else d for d in dh_next]
            if douts is not None:
                g_h[L - 1] = g_h[L - 1] + douts[t]
            g_c = dc_next if has_c else [None] * L
            ft = [fac_t[l][t] for l in range(L)]
            extras: Dict[int, Any] = {}
            dAs: Dict[int, Tensor] = {}
            dhs: Dict[int, Tensor] = {}
            d_above = None
            for l in range(L - 1, hi, -1):  # above the wormholes: once per step
                dh = g_h[l] if d_above is None else g_h[l] + d_above
                dAs[l], extras[l] = cell.vjp(W[l], ft[l], dh, g_c[l], dA_t[l][t])
                dhs[l] = dh
                di = torch.mm(dAs[l], W[l].w_ih)
                m = ms[l - 1][t]
                d_above = di if m is None else di * m
            # the residual's denominator: every component of ybar but the sources' h is constant (= g)
            others = [g_h[l] for l in counted if l not in srcs] + [g_c[l] for l in counted if g_c[l] is not None]
            const_norm = norm_rows(torch.cat(others, 1)).add_(EPS) if others else lims[0].new_full((B,), EPS)
            amap.reset(ft, ms_t[t], g_h, g_c, d_above, const_norm, [None if q is None else q[t] for q in QS_t],
                       [b[t] for b in dA_t], {b: v[t] for b, v in d_in_t.items()}, [None if q is None else q[t] for q in dQ_t])
            y0 = g_h[srcs[0]] if len(srcs) == 1 else torch.cat([g_h[a] for a in srcs], 1)
            r = solve_step(amap, y0, B, rt.adj_spec, lims, max(1, hint - 1))
            hint = r.evaluations
            iters.append(r.iterations)
            res.append(r.residual)
            best.append(r.best)
            aux = r.aux
            if r.stale:  # some sample's answer was not the last evaluation: evaluate once more at the
                aux, _ = amap.evaluate(r.x)  # answers, so that the in-place buffers hold their cotangents
            pos = 0
            d_in: Dict[int, Tensor] = {}
            for l in region:
                dAs[l], dhs[l] = aux[pos], aux[pos + 1]
                extras[l] = aux[pos + 2] if has_c else None
                pos += 3 if has_c else 2
                if l in plan.dsts:
                    d_in[l] = aux[pos]
                    pos += 1
            if lo > 0:  # below the wormholes: once per step
                m = ms[lo - 1][t]
                d_above = d_in[lo] if m is None else d_in[lo] * m
                for l in range(lo - 1, -1, -1):
                    dh = g_h[l] + d_above
                    dAs[l], extras[l] = cell.vjp(W[l], ft[l], dh, g_c[l], dA_t[l][t])
                    dhs[l] = dh
                    if l > 0:
                        di = torch.mm(dAs[l], W[l].w_ih)
                        m = ms[l - 1][t]
                        d_above = di if m is None else di * m
            for l in range(L):
                if keep_dh:
                    dh_buf[l][t] = dhs[l]
                prev = cell.to_prev(W[l], ft[l], dAs[l], extras[l], dhs[l])
                dh_next[l] = prev[0]
                if has_c:
                    dc_next[l] = prev[1]
        R, BEST = torch.stack(res[::-1]), torch.stack(best[::-1])
        status = status_codes(R, BEST, rt.adj_spec.factor, rt.adj_spec.tol)
        bwd_iters = _step_stats(iters[::-1], T, B, x.device)
        self.stats.set_backward(bwd_iters, R, status)
        rt.report(status, R, "backward (adjoint)", bwd_iters)
        if needs[0] and 0 not in d_in_buf:
            d_in_buf[0] = dA_buf[0].view(T * B, -1).mm(W[0].w_ih).view(T, B, -1)
        return dict(dA=dA_buf, dh=dh_buf or [None] * L, d_in=d_in_buf, dQ=dQ_buf, dh0=dh_next, dc0=dc_next)

    def _grads(self, tensors, saved, W, fbs, fac, QS, cot: dict, needs) -> List[Optional[Tensor]]:
        """Every input's gradient from the time-ordered cotangents ``cot`` (one matmul per weight)."""
        plan, cell = self.rt.plan, self.rt.cell
        x = tensors[0]
        T, B = x.shape[0], x.shape[1]
        TB, L = T * B, plan.num_layers
        S, A, U = saved["states"], saved["aux"], saved["U"]
        grads: List[Optional[Tensor]] = [None] * len(tensors)
        inj: Dict[int, Tensor] = {}
        if U is not None:
            start = 0
            for (_, b), size in zip(plan.pairs, plan.dst_sizes):
                part = U[..., start:start + size]
                inj[b] = part if b not in inj else inj[b] + part
                start += size
        for l in range(L):
            need = tuple(needs[3 + 5 * l + i] for i in range(5))
            if not any(need):
                continue
            if l == 0:
                inp = x
            else:
                m = self._mask(l - 1)
                inp = S[l - 1][0] if m is None else S[l - 1][0] * m
            if l in inj:
                inp = inp + inj[l]
            dh = cot["dh"][l] if need[4] else None
            hp = A[l][2] if need[4] else None
            h0 = tensors[1][l]
            grads[3 + 5 * l: 3 + 5 * l + 5] = cell.weight_grads(W[l], fac[l], cot["dA"][l], inp, S[l][0], h0, dh, hp, need)
        if needs[0]:
            grads[0] = cot["d_in"][0]
        off = 3 + 5 * L
        for k, fb in enumerate(fbs):
            need = tuple(needs[off + 3 * k + i] for i in range(3))
            if any(need):
                c = cot["dQ"][k] if fb.kind == "input" else cot["d_in"][fb.dst]
                grads[off + 3 * k: off + 3 * k + 3] = fb.grads(c.reshape(TB, -1), S[fb.src][0].reshape(TB, -1), need)
        if needs[1]:
            grads[1] = torch.stack([_zero_if_none(d, S[0][0][0]) for d in cot["dh0"]])
        if needs[2] and cell.has_c:
            grads[2] = torch.stack([_zero_if_none(d, S[0][1][0]) for d in cot["dc0"]])
        return grads


class SequenceFn(torch.autograd.Function):
    """The whole sequence as one autograd node (forward: the time loop; backward: the reverse loop)."""

    @staticmethod
    def forward(ctx, job: SequenceJob, *tensors: Optional[Tensor]):
        outs = job.forward(list(tensors), keep=True)
        ctx.job = job
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(outs[0], *tensors)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dhn, *rest):
        out, *tensors = ctx.saved_tensors
        job = ctx.job  # kept: a second backward (retain_graph=True) runs the reverse loop again
        grads = job.backward(list(tensors), out, dout, dhn, rest[0] if rest else None, ctx.needs_input_grad[1:])
        return (None, *grads)
