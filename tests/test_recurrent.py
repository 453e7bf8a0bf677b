"""Explicit recurrent twins and the DecomposeRecurrent pass: equal to torch's modules.

References: the torch module itself (outputs, final states, autograd gradients), its state_dict,
and the outputs of models whose time loops the front ends unroll.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager
from torch.utils._pytree import tree_leaves

from fxwormhole.errors import ConfigError, PlacementError
from fxwormhole.passes.recurrent import DecomposeRecurrent
from fxwormhole.runtime.recurrent import (
    GATE_ORDER,
    ExplicitGRU,
    ExplicitLSTM,
    ExplicitRecurrent,
    ExplicitRNN,
    explicit_from_module,
)
from helpers import rel

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {
    "lstm": lambda **kw: nn.LSTM(**kw),
    "lstm_proj": lambda **kw: nn.LSTM(proj_size=3, **kw),
    "gru": lambda **kw: nn.GRU(**kw),
    "rnn_tanh": lambda **kw: nn.RNN(**kw),
    "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
}
I, H, T, B = 5, 6, 7, 3


def _initial_state(m: nn.RNNBase, batched: bool, dtype: torch.dtype):
    n = m.num_layers * (2 if m.bidirectional else 1)
    lead = (n, B) if batched else (n,)
    h = torch.randn(*lead, m.proj_size or m.hidden_size, dtype=dtype)
    if isinstance(m, nn.LSTM):
        return h, torch.randn(*lead, m.hidden_size, dtype=dtype)
    return h


def _input(batch_first: bool, batched: bool, dtype: torch.dtype) -> torch.Tensor:
    if not batched:
        return torch.randn(T, I, dtype=dtype)
    return torch.randn(B, T, I, dtype=dtype) if batch_first else torch.randn(T, B, I, dtype=dtype)


GRID = list(itertools.product(KINDS, (1, 3), (False, True), (True, False), (False, True)))
GRID += [("lstm", 2, bf, True, bi) for bf in (False, True) for bi in (False, True)]


@pytest.mark.parametrize("kind,layers,batch_first,bias,bidirectional", GRID)
def test_equivalence_grid(kind, layers, batch_first, bias, bidirectional):
    """Outputs and final states match torch (float32 1e-5, float64 1e-12), every input form."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        m = KINDS[kind](input_size=I, hidden_size=H, num_layers=layers, batch_first=batch_first, bias=bias,
                        bidirectional=bidirectional, dropout=0.3 if layers > 1 else 0.0).to(dtype).eval()
        e = explicit_from_module(m).eval()
        for batched, given in ((True, False), (True, True), (False, False), (False, True)):
            x = _input(batch_first, batched, dtype)
            hx = _initial_state(m, batched, dtype) if given else None
            ref, got = tree_leaves(m(x, hx)), tree_leaves(e(x, hx))
            assert len(ref) == len(got)
            for r, g in zip(ref, got):
                assert g.shape == r.shape and g.dtype == r.dtype
                assert rel(g, r) < tol, (kind, dtype, batched, given, rel(g, r))


@pytest.mark.parametrize("kind", list(KINDS))
def test_parameter_names_and_strict_state_dict(kind):
    m = KINDS[kind](input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    e = explicit_from_module(m)
    assert [n for n, _ in e.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert list(e.state_dict()) == list(m.state_dict())
    for (n, p), (_, q) in zip(e.named_parameters(), m.named_parameters()):
        assert torch.equal(p, q) and p is not q, n  # copied, not shared
    # round trip: a fresh twin loads the original's state_dict strictly, and back
    fresh = type(e)(**({"nonlinearity": m.nonlinearity} if isinstance(m, nn.RNN) else {}),
                    input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                    **({"proj_size": m.proj_size} if isinstance(m, nn.LSTM) else {}))
    fresh.load_state_dict(m.state_dict(), strict=True)
    m2 = copy.deepcopy(m)
    for p in m2.parameters():
        nn.init.zeros_(p)
    m2.load_state_dict(fresh.state_dict(), strict=True)
    x = torch.randn(T, B, I)
    for r, g in zip(tree_leaves(m2(x)), tree_leaves(fresh(x))):
        assert rel(g, r) < 1e-5


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_gradients_match_autograd_float64(kind):
    torch.manual_seed(1)
    m = KINDS[kind](input_size=I, hidden_size=H, num_layers=2, bidirectional=True, batch_first=True).double()
    e = explicit_from_module(m)
    x = torch.randn(B, T, I, dtype=torch.float64)
    hx = _initial_state(m, True, torch.float64)

    def grads(mod):
        xs = x.clone().requires_grad_()
        h0 = tuple(t.clone().requires_grad_() for t in (hx if isinstance(hx, tuple) else (hx,)))
        out = tree_leaves(mod(xs, h0 if isinstance(hx, tuple) else h0[0]))
        torch.manual_seed(2)
        loss = sum((o * torch.randn_like(o)).sum() for o in out)
        return torch.autograd.grad(loss, [xs, *h0, *mod.parameters()])

    for g, r in zip(grads(e), grads(m)):
        assert rel(g, r) < 1e-10


def test_train_mode_dropout_matches_torch_under_same_seed():
    """Dropout between layers (not after the last): the same masks as nn.LSTM draws."""
    m = nn.LSTM(I, H, 3, dropout=0.5).train()
    e = explicit_from_module(m).train()
    x = torch.randn(T, B, I)
    torch.manual_seed(5)
    ref = tree_leaves(m(x))
    torch.manual_seed(5)
    got = tree_leaves(e(x))
    for r, g in zip(ref, got):
        assert rel(g, r) < 1e-5
    torch.manual_seed(6)
    other = e(x)[0]
    assert not torch.allclose(other, got[0])  # dropout is active in training mode


def test_step_and_gate_preactivations_reproduce_forward():
    m = nn.LSTM(I, H, 2)
    e = explicit_from_module(m)
    x = torch.randn(T, B, I)
    out, (h_n, c_n) = m(x)
    states = [(torch.zeros(B, H), torch.zeros(B, H)) for _ in range(2)]
    for t in range(T):
        inp = x[t]
        for layer in range(2):
            gates = e.gate_preactivations(layer, inp, states[layer])
            assert list(gates) == list(GATE_ORDER["LSTM"])
            # closed form of the LSTM cell from the documented gate order
            c = torch.sigmoid(gates["f"]) * states[layer][1] + torch.sigmoid(gates["i"]) * torch.tanh(gates["g"])
            h = torch.sigmoid(gates["o"]) * torch.tanh(c)
            states[layer] = e.step(layer, inp, states[layer])
            assert torch.allclose(states[layer][0], h, atol=1e-6) and torch.allclose(states[layer][1], c, atol=1e-6)
            inp = states[layer][0]
        assert torch.allclose(inp, out[t], atol=1e-6)
    assert torch.allclose(states[1][1], c_n[1], atol=1e-6)


def test_gru_gate_preactivations_closed_form():
    m = nn.GRU(I, H)
    e = explicit_from_module(m)
    x, h = torch.randn(B, I), torch.randn(B, H)
    g = e.gate_preactivations(0, x, h)
    new = torch.sigmoid(g["z"]) * h + (1 - torch.sigmoid(g["z"])) * torch.tanh(g["n"])
    assert torch.allclose(e.step(0, x, h), new, atol=1e-6)
    assert torch.allclose(m(x.unsqueeze(0), h.unsqueeze(0))[1][0], new, atol=1e-6)


def test_constructors_and_errors():
    assert isinstance(ExplicitLSTM.from_module(nn.LSTM(2, 3)), ExplicitLSTM)
    assert isinstance(ExplicitRecurrent.from_module(nn.GRU(2, 3)), ExplicitGRU)
    assert ExplicitRecurrent.from_module(nn.RNN(2, 3, nonlinearity="relu")).mode == "RNN_RELU"
    with pytest.raises(PlacementError, match="ExplicitGRU"):
        ExplicitLSTM.from_module(nn.GRU(2, 3))
    with pytest.raises(PlacementError, match="Linear"):
        explicit_from_module(nn.Linear(2, 3))
    with pytest.raises(ConfigError, match="nonlinearity"):
        ExplicitRNN(2, 3, nonlinearity="gelu")
    with pytest.raises(ConfigError, match="proj_size"):
        ExplicitLSTM(2, 3, proj_size=3)
    e = ExplicitLSTM(2, 3, 2)
    with pytest.raises(ConfigError, match="input_size=2"):
        e(torch.randn(4, 1, 5))
    with pytest.raises(ConfigError, match=r"h_0 has shape"):
        e(torch.randn(4, 1, 2), (torch.zeros(1, 1, 3), torch.zeros(2, 1, 3)))
    with pytest.raises(ConfigError, match="PackedSequence"):
        e(nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, 2), [4, 3]))
    shared = ExplicitLSTM.from_module(m := nn.LSTM(2, 3), share_parameters=True)
    assert shared.weight_ih_l0 is m.weight_ih_l0


# ---- the pass -------------------------------------------------------------------------------
class Seq2One(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, I))
        self.block = nn.Module()
        self.block.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 2)

    def forward(self, x):
        out, _ = self.block.rnn(self.enc(x))
        return self.head(out[:, -1])


def _capture(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    try:
        from fxwormhole.capture import capture
    except ImportError:  # capture not landed yet: symbolic_trace keeps nn.RNN modules as leaves
        return fx.symbolic_trace(model)
    return capture(model, (x,))


@pytest.mark.parametrize("rnn", [nn.LSTM(I, H, 2, batch_first=True), nn.GRU(I, H, batch_first=True, bidirectional=True),
                                 nn.RNN(I, H, 3, batch_first=True, nonlinearity="relu")], ids=["lstm", "gru", "rnn"])
def test_decompose_pass_keeps_outputs_and_state_dict(rnn):
    model = Seq2One(rnn).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(B, T, 4)
    gm = _capture(model, x)
    res = PassManager([DecomposeRecurrent()])(gm)
    gm = res.graph_module
    gm.graph.lint()
    assert res.modified
    assert isinstance(gm.get_submodule("block.rnn"), ExplicitRecurrent)
    assert type(model.block.rnn) is type(rnn)  # the user's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    assert rel(gm(x), model(x)) < 1e-5
    x_long = torch.randn(B, 3 * T, 4)  # call_module leaf: any sequence length
    assert rel(gm(x_long), model(x_long)) < 1e-5
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "block.rnn"]
    info = nodes[0].meta["fxwormhole"]["recurrent"]
    assert info["decomposed"] and info["num_layers"] == rnn.num_layers and info["mode"] == rnn.mode
    assert gm.meta["fxwormhole"]["recurrent"]["block.rnn"] == "decomposed"
    # running the pass again changes nothing
    assert not PassManager([DecomposeRecurrent()])(gm).modified


def test_decompose_skips_subclass_with_own_forward():
    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            out, st = super().forward(x, hx)
            return out * 2, st

    from fxwormhole.capture import LayerTracer

    model = Seq2One(MyLSTM(I, H, batch_first=True)).eval()
    gm = fx.GraphModule(model, LayerTracer().trace(model))
    res = DecomposeRecurrent()(gm)
    assert not res.modified and type(gm.get_submodule("block.rnn")) is MyLSTM
    assert "overrides forward" in gm.meta["fxwormhole"]["recurrent"]["block.rnn"]


class CellLoop(nn.Module):
    """A user-written loop over a cell, fixed length (symbolic_trace unrolls it)."""

    def __init__(self, cell: nn.Module, steps: int):
        super().__init__()
        self.cell, self.steps, self.head = cell, steps, nn.Linear(H, 1)
        self.lstm = isinstance(cell, nn.LSTMCell)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        c = torch.zeros_like(h)
        for t in range(self.steps):
            if self.lstm:
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


class ShapeLoop(nn.Module):
    """A plain recurrent loop over x.shape[1] (torch.export unrolls it, symbolic_trace cannot)."""

    def __init__(self):
        super().__init__()
        self.wx, self.wh, self.head = nn.Linear(I, H), nn.Linear(H, H), nn.Linear(H, 1)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], H)
        for t in range(x.shape[1]):
            h = torch.tanh(self.wx(x[:, t]) + self.wh(h))
        return self.head(h)


@pytest.mark.parametrize("model", [CellLoop(nn.LSTMCell(I, H), T), CellLoop(nn.GRUCell(I, H), T),
                                   CellLoop(nn.RNNCell(I, H), T), ShapeLoop()], ids=["lstmcell", "grucell", "rnncell", "shape_loop"])
def test_user_cell_loops_are_left_intact(model):
    from fxwormhole.config import WormholeConfig
    from fxwormhole.passes.temporal_wormhole import TemporalWormholes

    x = torch.randn(B, T, I)
    if isinstance(model, ShapeLoop):
        gm = torch.export.export(model, (x,), strict=False).module()
    else:
        gm = fx.symbolic_trace(model)
        assert sum(n.op == "call_module" and n.target == "cell" for n in gm.graph.nodes) == T  # unrolled
    n_nodes = len(gm.graph.nodes)
    res = PassManager([DecomposeRecurrent(), TemporalWormholes(WormholeConfig())])(gm)
    assert not res.modified and len(res.graph_module.graph.nodes) == n_nodes
    assert rel(res.graph_module(x), model(x)) < 1e-6
