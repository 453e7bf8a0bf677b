"""The arithmetic of one recurrent layer for the temporal runtime: forward steps and hand-written VJPs.

No autograd here. Each cell kind (:class:`LSTMMath`, :class:`GRUMath`, :class:`RNNMath`) splits a
step into the part that is constant within a time step (:meth:`hoist`: the recurrent matmul
``W_hh h_{t-1}`` and the biases) and the part that depends on the layer's input
(:meth:`evaluate`: ``W_ih in`` plus the pointwise gates), so that the fixed-point iterations of a
step only pay for the latter. The backward is split the same way: :meth:`factors` turns the stored
forward values of all T steps into the pointwise Jacobian factors in a few large ops,
:meth:`vjp` maps a cotangent of the layer's outputs to the gate cotangent ``dA`` (a handful of
small ops per adjoint iteration), :meth:`to_prev` sends it to step ``t-1`` once the step's
adjoint has settled, and :meth:`weight_grads` forms every weight gradient of the sequence with
one matmul per weight over the ``T*B`` rows.

Gate layout and formulas follow ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` (see :data:`GATE_ORDER` in
``recurrent.py``).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["LayerWeights", "CellMath", "LSTMMath", "GRUMath", "RNNMath", "cell_math"]

Consts = Tuple[Tensor, ...]


class LayerWeights(NamedTuple):
    """One layer's tensors, prepared once per sequence (transposed views, summed biases)."""

    w_ih: Tensor
    w_hh: Tensor
    w_ihT: Tensor
    w_hhT: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    b_hoist: Optional[Tensor]  # bias added with W_hh h (LSTM/RNN: b_ih + b_hh; GRU: b_hh)
    w_hr: Optional[Tensor]
    w_hrT: Optional[Tensor]


def _previous(init: Tensor, seq: Tensor) -> Tensor:
    """``[T, B, .]`` values at ``t-1``: the initial state, then ``seq[:-1]``."""
    return torch.cat((init.unsqueeze(0), seq[:-1]))


def _addmm(bias: Optional[Tensor], a: Tensor, bT: Tensor) -> Tensor:
    return torch.mm(a, bT) if bias is None else torch.addmm(bias, a, bT)


class CellMath:
    """One cell kind's forward and backward arithmetic (see the module docstring)."""

    gates = 1
    has_c = False
    n_aux = 0  # tensors evaluate() returns besides the state

    def __init__(self, hidden: int, proj: int = 0) -> None:
        self.H, self.P = hidden, proj

    # ---- preparation --------------------------------------------------------------------------
    def prepare(self, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                w_hr: Optional[Tensor]) -> LayerWeights:
        b_hoist = b_hh if (self.split_hidden_bias or b_ih is None) else b_ih + b_hh
        return LayerWeights(w_ih, w_hh, w_ih.t(), w_hh.t(), b_ih, b_hh, b_hoist, w_hr,
                            None if w_hr is None else w_hr.t())

    split_hidden_bias = False  # GRU keeps W_hn h + b_hn apart (the reset gate multiplies it)

    def input_bias(self, w: LayerWeights) -> Optional[Tensor]:
        """Bias folded into the batched input projection of the bottom layer."""
        return w.b_hoist if not self.split_hidden_bias else w.b_ih

    # ---- forward ------------------------------------------------------------------------------
    def hoist(self, w: LayerWeights, state: Tuple[Tensor, ...], gx: Optional[Tensor]) -> Consts:
        """Constants of one step: ``gx`` is the layer's input projection when it is known up front
        (the bottom layer's ``W_ih x_t + b``), else None (the bias is added here)."""
        raise NotImplementedError

    def fold_input(self, w: LayerWeights, consts: Consts, inp: Tensor) -> Consts:
        """Add a constant input's projection ``W_ih inp`` to the step's constants."""
        return (torch.addmm(consts[0], inp, w.w_ihT),) + consts[1:]

    def evaluate(self, w: LayerWeights, consts: Consts, inp: Optional[Tensor]) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """``(new_state, aux)`` for the layer input ``inp`` (None: the input is all in ``consts``)."""
        raise NotImplementedError

    # ---- backward -----------------------------------------------------------------------------
    def factors(self, aux: Tuple[Tensor, ...], states: Tuple[Tensor, ...], init: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """Pointwise Jacobian factors for all T (``aux``/``states``: stacked ``[T, B, .]`` forward
        values; ``init``: the initial state)."""
        raise NotImplementedError

    def vjp(self, w: LayerWeights, fac: Tuple[Tensor, ...], dh: Tensor, dc: Optional[Tensor],
            out: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        """Gate cotangent from the cotangents of the layer's outputs at one step: ``(dA, extra)``;
        ``dA`` is written into ``out`` when given."""
        raise NotImplementedError

    def to_prev(self, w: LayerWeights, fac: Tuple[Tensor, ...], dA: Tensor, extra: Tensor, dh: Tensor) -> Tuple[Tensor, ...]:
        """Cotangents of the previous state ``(dh_prev[, dc_prev])``."""
        raise NotImplementedError

    def hidden_cotangent(self, fac_all: Tuple[Tensor, ...], dA_all: Tensor) -> Tensor:
        """Cotangent of ``W_hh h + b_hh`` (equal to ``dA`` except for the GRU)."""
        return dA_all

    def weight_grads(self, w: LayerWeights, fac_all: Tuple[Tensor, ...], dA: Tensor, inp: Tensor, h_seq: Tensor,
                     h0: Tensor, dh: Optional[Tensor], hp: Optional[Tensor], need: Tuple[bool, ...]) -> Tuple[Optional[Tensor], ...]:
        """``(d w_ih, d w_hh, d b_ih, d b_hh, d w_hr)`` from the time-ordered ``[T, B, .]`` gate
        cotangents ``dA``, layer inputs ``inp``, states ``h_seq`` and initial state ``h0``."""
        B = h0.shape[0]
        gi = dA.reshape(-1, dA.shape[-1])
        gh = self.hidden_cotangent(fac_all, gi)
        d_wih = gi.t().mm(inp.reshape(-1, inp.shape[-1])) if need[0] else None
        d_whh = None
        if need[1]:  # h_{t-1}: h0, then h_0 .. h_{T-2}
            d_whh = gh[:B].t().mm(h0)
            if gh.shape[0] > B:
                d_whh.addmm_(gh[B:].t(), h_seq.reshape(-1, h0.shape[-1])[:-B])
        d_bih = gi.sum(0) if need[2] else None
        d_bhh = gh.sum(0) if need[3] else None
        d_whr = dh.reshape(-1, dh.shape[-1]).t().mm(hp.reshape(-1, hp.shape[-1])) if (need[4] and dh is not None) else None
        return d_wih, d_whh, d_bih, d_bhh, d_whr


class LSTMMath(CellMath):
    """``c' = σ(f)c + σ(i)tanh(g)``, ``h' = σ(o)tanh(c')`` (then ``W_hr h'``)."""

    gates = 4
    has_c = True

    def __init__(self, hidden: int, proj: int = 0) -> None:
        super().__init__(hidden, proj)
        self.n_aux = 3 if proj else 2  # σ(i), σ(f), tanh(g), σ(o); tanh(c)[; o*tanh(c) before W_hr]

    def hoist(self, w, state, gx):
        return (_addmm(w.b_hoist if gx is None else gx, state[0], w.w_hhT), state[1])

    def evaluate(self, w, consts, inp):
        base, c_prev = consts
        H = self.H
        a = base if inp is None else torch.addmm(base, inp, w.w_ihT)
        s = torch.sigmoid(a)
        g = torch.tanh(a[:, 2 * H:3 * H], out=s[:, 2 * H:3 * H])  # s holds σ(i), σ(f), tanh(g), σ(o)
        c = s[:, H:2 * H] * c_prev
        c.addcmul_(s[:, :H], g)
        tc = torch.tanh(c)
        hp = s[:, 3 * H:] * tc
        if w.w_hrT is None:
            return (hp, c), (s, tc)
        return (torch.mm(hp, w.w_hrT), c), (s, tc, hp)

    def factors(self, aux, states, init):
        s, tc = aux[:2]
        H = self.H
        S4 = s.view(s.shape[:-1] + (4, H))
        i, f, g, o = S4.unbind(-2)
        D = S4 * (1 - S4)  # sigmoid' of i, f, o (the g slot is replaced below)
        D[..., 2, :] = 1 - g * g
        K = D.mul_(torch.stack((g, _previous(init[1], states[1]), i, tc), -2))  # dA = K * [dc, dc, dc, dh]
        return K.view(s.shape), o * (1 - tc * tc), f

    def vjp(self, w, fac, dh, dc, out=None):
        K, Mo = fac[0], fac[1]
        dhp = dh if w.w_hr is None else torch.mm(dh, w.w_hr)
        dct = dhp * Mo if dc is None else torch.addcmul(dc, dhp, Mo)
        return torch.mul(K, torch.cat((dct, dct, dct, dhp), 1), out=out), dct

    def to_prev(self, w, fac, dA, dct, dh):
        return torch.mm(dA, w.w_hh), dct * fac[2]


class GRUMath(CellMath):
    """``r, z = σ(.)``, ``n = tanh(W_in x + b_in + r(W_hn h + b_hn))``, ``h' = n + z(h - n)``."""

    gates = 3
    n_aux = 3  # sigmoid(r, z), n, W_hn h + b_hn
    split_hidden_bias = True

    def hoist(self, w, state, gx):
        h = state[0]
        H = self.H
        gh = _addmm(w.b_hh, h, w.w_hhT)
        if gx is None:
            gx = w.b_ih
        if gx is None:
            base = torch.cat((gh[:, :2 * H], torch.zeros_like(gh[:, 2 * H:])), 1)
        else:
            gx = gx.expand(h.shape[0], 3 * H)
            base = torch.cat((gx[:, :2 * H] + gh[:, :2 * H], gx[:, 2 * H:]), 1)
        return base, gh[:, 2 * H:], h

    def evaluate(self, w, consts, inp):
        base, gh_n, h_prev = consts
        H = self.H
        a = base if inp is None else torch.addmm(base, inp, w.w_ihT)
        rz = torch.sigmoid(a[:, :2 * H])
        n = torch.addcmul(a[:, 2 * H:], rz[:, :H], gh_n).tanh_()
        return (torch.lerp(n, h_prev, rz[:, H:]),), (rz, n, gh_n)

    def factors(self, aux, states, init):
        rz, n, gh_n = aux
        h_prev = _previous(init[0], states[0])
        H = self.H
        r, z = rz[..., :H], rz[..., H:]
        Kn = (1 - z) * (1 - n * n)
        K = torch.stack((Kn * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), Kn), -2)
        R3 = torch.stack((torch.ones_like(r), torch.ones_like(r), r), -2)
        return K, R3, z

    def vjp(self, w, fac, dh, dc, out=None):
        B = dh.shape[0]
        return torch.mul(fac[0], dh.unsqueeze(1), out=None if out is None else out.view(B, 3, self.H)).view(B, 3 * self.H), None

    def to_prev(self, w, fac, dA, extra, dh):
        dgh = (dA.view(fac[1].shape) * fac[1]).view(dA.shape)
        return (torch.addmm(dh * fac[2], dgh, w.w_hh),)

    def hidden_cotangent(self, fac_all, dA_all):
        R3 = fac_all[1]
        return (dA_all.view(R3.shape[0] * R3.shape[1], 3, self.H) * R3.reshape(-1, 3, self.H)).view(dA_all.shape)


class RNNMath(CellMath):
    """``h' = tanh`` or ``relu(W_ih x + b_ih + W_hh h + b_hh)``."""

    def __init__(self, hidden: int, proj: int = 0, relu: bool = False) -> None:
        super().__init__(hidden, proj)
        self.relu = relu

    def hoist(self, w, state, gx):
        return (_addmm(w.b_hoist if gx is None else gx, state[0], w.w_hhT),)

    def evaluate(self, w, consts, inp):
        a = consts[0] if inp is None else torch.addmm(consts[0], inp, w.w_ihT)
        return ((torch.relu(a) if self.relu else torch.tanh(a)),), ()

    def factors(self, aux, states, init):
        h = states[0]
        return ((h > 0).to(h.dtype) if self.relu else 1 - h * h,)

    def vjp(self, w, fac, dh, dc, out=None):
        return torch.mul(dh, fac[0], out=out), None

    def to_prev(self, w, fac, dA, extra, dh):
        return (torch.mm(dA, w.w_hh),)


def cell_math(mode: str, hidden: int, proj: int = 0) -> CellMath:
    """The :class:`CellMath` of a recurrent mode (``LSTM``, ``GRU``, ``RNN_TANH``, ``RNN_RELU``)."""
    table: Dict[str, CellMath] = {
        "LSTM": LSTMMath(hidden, proj),
        "GRU": GRUMath(hidden),
        "RNN_TANH": RNNMath(hidden),
        "RNN_RELU": RNNMath(hidden, relu=True),
    }
    return table[mode]
