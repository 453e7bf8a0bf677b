"""Temporal wormholes: per-step fixed points inside explicit recurrent stacks.

References: torch's own nn.LSTM/GRU/RNN (gates closed at init), and an unrolled re-implementation
that iterates each step's fixed point many times with autograd through every iteration (float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from fxwormhole.config import GradConfig, SolverConfig, WormholeConfig
from fxwormhole.errors import PlacementError
from fxwormhole.passes._common import run_passes
from fxwormhole.passes.recurrent import DecomposeRecurrent
from fxwormhole.passes.temporal_wormhole import TemporalWormholes
from fxwormhole.runtime.recurrent import ExplicitRecurrent, add_temporal_wormhole, resolve_temporal_pairs
from helpers import rel

pytestmark = pytest.mark.usefixtures("one_thread")

I, H, T, B = 4, 6, 6, 3


# ---- closed gates: the original model, one evaluation per step -------------------------------
@pytest.mark.parametrize("make", [lambda: nn.LSTM(I, H, 2, batch_first=True), lambda: nn.GRU(I, H, 3),
                                  lambda: nn.RNN(I, H, 1, nonlinearity="relu"), lambda: nn.LSTM(I, H, 2, proj_size=3)],
                         ids=["lstm2", "gru3", "rnn1", "lstm_proj"])
def test_closed_gates_equal_original_and_settle_in_one_step(make):
    m = make()
    e = add_temporal_wormhole(m, WormholeConfig())
    assert type(m) is not type(e) and e.temporal_pairs == ((f"layer{m.num_layers - 1}", "layer0"),)
    x = torch.randn(B, T, I) if m.batch_first else torch.randn(T, B, I)
    ref, got = tree_leaves(m(x)), tree_leaves(e(x))
    for r, g in zip(ref, got):
        assert g.shape == r.shape and rel(g, r) < 1e-5
    it = e.stats.iterations
    assert it.shape == (T, B) and bool((it == 1).all())
    assert e.stats.backward_iterations is None  # no backward yet
    sum(g.sum() for g in got).backward()
    assert e.stats.backward_iterations.shape == (T, B)
    assert bool((e.stats.backward_iterations <= 2).all())


def test_closed_gates_gradients_equal_original_float64():
    torch.manual_seed(3)
    m = nn.LSTM(I, H, 2).double()
    e = add_temporal_wormhole(m, WormholeConfig())
    x = torch.randn(T, B, I, dtype=torch.float64)
    w = torch.randn(T, B, H, dtype=torch.float64)
    g_ref = torch.autograd.grad((m(x)[0] * w).sum(), list(m.parameters()))
    lstm_params = [p for n, p in e.named_parameters() if not n.startswith("temporal_wormholes")]
    g_got = torch.autograd.grad((e(x)[0] * w).sum(), lstm_params)
    for a, b in zip(g_got, g_ref):
        assert rel(a, b) < 1e-10


def test_train_mode_dropout_matches_torch_under_same_seed():
    m = nn.LSTM(I, H, 3, dropout=0.4).train()
    e = add_temporal_wormhole(m, WormholeConfig()).train()
    x = torch.randn(T, B, I)
    torch.manual_seed(11)
    ref = m(x)[0]
    torch.manual_seed(11)
    got = e(x)[0]
    assert rel(got, ref) < 1e-5
    assert not torch.allclose(got, e.eval()(x)[0])


# ---- open gates: implicit per-step gradient + BPTT vs an unrolled reference ---------------------
def _unrolled_reference(e: ExplicitRecurrent, x: torch.Tensor, state0, iters: int):
    """Iterate every step's fixed point ``iters`` times, autograd through every iteration."""
    cells = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell, "RNN_TANH": nn.RNNCell}
    L = e.num_layers
    pairs = [(int(a[5:]), int(b[5:])) for a, b in e.temporal_pairs]
    whs = list(e.temporal_wormholes.values())

    def cell(layer, inp, st):
        c = cells[e.mode](inp.shape[-1], e.hidden_size, bias=e.bias).to(x.dtype)
        p = {k: getattr(e, f"{k}_l{layer}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if e.bias or k.startswith("w")}
        return functional_call(c, p, (inp, st))

    h_of = (lambda s: s[0]) if e.mode == "LSTM" else (lambda s: s)
    states, outs = list(state0), []
    for t in range(x.shape[0]):
        u = [None] * len(pairs)
        for _ in range(iters):
            inp, new = x[t], []
            for layer in range(L):
                for (src, dst), uk in zip(pairs, u):
                    if dst == layer and uk is not None:
                        inp = inp + uk
                new.append(cell(layer, inp, states[layer]))
                inp = h_of(new[-1])
            u = [wh(h_of(new[src])) for (src, _), wh in zip(pairs, whs)]
        states = new
        outs.append(h_of(new[-1]))
    return torch.stack(outs), states


OPEN = [
    ("lstm", lambda: nn.LSTM(I, H, 2), "auto", "scalar"),
    ("gru", lambda: nn.GRU(I, H, 2), (("layer1", "layer0"), ("layer0", "layer0")), "channel"),
    ("rnn", lambda: nn.RNN(I, H, 1), "auto", "input"),
]


@pytest.mark.parametrize("name,make,wormholes,gate", OPEN, ids=[o[0] for o in OPEN])
def test_open_wormhole_gradients_match_unrolled_reference_float64(name, make, wormholes, gate):
    torch.manual_seed(7)
    m = make().double()
    cfg = WormholeConfig(wormholes=wormholes, gate=gate, gate_init=2.0, proj_init="normal", proj_std=0.25,
                         solver=SolverConfig(name="anderson", tol=1e-13, max_iter=300),
                         grad=GradConfig(tol=1e-13, max_iter=300), on_fail="raise")
    e = add_temporal_wormhole(m, cfg)
    if gate == "input":  # make the input-dependent part of the gate non-trivial
        with torch.no_grad():
            for wh in e.temporal_wormholes.values():
                wh.gate.map.map.weight.normal_(0, 0.5)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(e.num_layers, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(e.num_layers, B, H, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if name == "lstm" else h0
    w_out = torch.randn(T, B, H, dtype=torch.float64)

    out, hn = e(x, hx)
    assert int(e.stats.iterations.max()) > 3  # the wormholes are really open
    loss = (out * w_out).sum() + sum(t.sum() for t in tree_leaves(hn))
    wrt = [x, h0, *([c0] if name == "lstm" else []), *e.parameters()]
    got = torch.autograd.grad(loss, wrt)
    if cfg.grad.mode == "implicit":
        assert bool((e.stats.backward_iterations > 1).all())

    state0 = [(h0[k], c0[k]) for k in range(e.num_layers)] if name == "lstm" else [h0[k] for k in range(e.num_layers)]
    r_out, r_states = _unrolled_reference(e, x, state0, iters=80)
    assert rel(out, r_out) < 1e-10
    r_loss = (r_out * w_out).sum() + sum(t.sum() for s in r_states for t in (s if isinstance(s, tuple) else (s,)))
    ref = torch.autograd.grad(r_loss, wrt)
    names = ["x", "h0", *(["c0"] if name == "lstm" else []), *[n for n, _ in e.named_parameters()]]
    for n, a, b in zip(names, got, ref):
        assert rel(a, b) < 1e-6, (n, rel(a, b))


# ---- the passes on a GraphModule --------------------------------------------------------------
class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(I, H, 2, batch_first=True)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def _capture(model, x):
    try:
        from fxwormhole.capture import capture
    except ImportError:
        return fx.symbolic_trace(model)
    return capture(model, (x,))


def test_passes_on_graph_module_closed_then_trainable():
    model = Tagger().eval()
    x = torch.randn(B, T, I)
    gm = run_passes(_capture(model, x), [DecomposeRecurrent(), TemporalWormholes(WormholeConfig())])
    rnn = gm.get_submodule("rnn")
    assert isinstance(rnn, ExplicitRecurrent) and rnn.temporal_pairs == (("layer1", "layer0"),)
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "rnn")
    info = node.meta["fxwormhole"]["recurrent"]
    assert info["decomposed"] and info["temporal_wormholes"] == [("layer1", "layer0")]
    assert gm.meta["fxwormhole"]["temporal_wormholes"] == {"rnn": [("layer1", "layer0")]}
    assert rel(gm(x), model(x)) < 1e-5 and bool((rnn.stats.iterations == 1).all())
    # the original state_dict loads; only the wormhole parameters are new
    res = gm.load_state_dict(model.state_dict(), strict=False)
    assert not res.unexpected_keys and all(k.startswith("rnn.temporal_wormholes.") for k in res.missing_keys)
    assert type(model.rnn) is nn.LSTM  # the user's model is untouched
    # a training step moves the wormhole parameters
    gm.train()
    before = rnn.temporal_wormholes.layer1_to_layer0.proj.map.weight.clone()
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm(x).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, rnn.temporal_wormholes.layer1_to_layer0.proj.map.weight)


def test_pair_resolution_and_errors():
    e = ExplicitRecurrent.from_module(nn.LSTM(I, H, 3))
    assert resolve_temporal_pairs(e, "auto") == ((2, 0),)
    assert resolve_temporal_pairs(e, "every:2") == ((1, 0), (2, 2))
    assert resolve_temporal_pairs(e, (("enc.rnn.layer2", "enc.rnn.layer1"), ("fc", "conv")), "enc.rnn") == ((2, 1),)
    with pytest.raises(PlacementError, match="swap"):
        resolve_temporal_pairs(e, (("layer0", "layer2"),))
    with pytest.raises(PlacementError, match="same recurrent module"):
        resolve_temporal_pairs(e, (("layer2", "fc"),))
    with pytest.raises(PlacementError, match="layer0'..'layer2"):
        resolve_temporal_pairs(e, (("layer5", "layer0"),))
    with pytest.raises(PlacementError, match="bidirectional"):
        add_temporal_wormhole(nn.GRU(I, H, bidirectional=True))
    with pytest.raises(PlacementError, match="names no layer"):
        add_temporal_wormhole(e, WormholeConfig(wormholes=(("fc", "conv"),)))
    once = add_temporal_wormhole(e)
    assert e.temporal_pairs == ()  # not in place by default
    with pytest.raises(PlacementError, match="already"):
        add_temporal_wormhole(once)


def test_spectral_norm_caps_temporal_projections_and_zero_init_stays_exact():
    torch.manual_seed(5)
    m = nn.GRU(I, H, 2).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    e = add_temporal_wormhole(m, WormholeConfig(spectral_norm=True, gate_init=0.0))
    # zero projection: the model is the original and its gradients are finite
    assert rel(e(x)[0], m(x)[0]) < 1e-12
    e(x)[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in e.parameters() if p.grad is not None)
    proj = e.temporal_wormholes["layer1_to_layer0"].proj.map
    with torch.no_grad():
        proj.parametrizations.weight.original.copy_(20 * torch.randn_like(proj.weight))
    assert float(torch.linalg.matrix_norm(proj.weight, 2)) <= 1 + 1e-9
    # the capped weight is what the step evaluates: same as a plain wormhole given that weight
    plain = add_temporal_wormhole(m, WormholeConfig(gate_init=0.0))
    plain.load_state_dict({k: v for k, v in e.state_dict().items() if "parametrizations" not in k}, strict=False)
    with torch.no_grad():
        plain.temporal_wormholes["layer1_to_layer0"].proj.map.weight.copy_(proj.weight)
    assert rel(e(x)[0], plain(x)[0]) < 1e-9


def test_bidirectional_skipped_under_auto_in_pass():
    model = nn.Sequential()
    model.rnn = nn.GRU(I, H, bidirectional=True)
    gm = run_passes(fx.symbolic_trace(model), [DecomposeRecurrent(), TemporalWormholes(WormholeConfig())])
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert node.meta["fxwormhole"]["recurrent"]["temporal_skipped"] == "bidirectional"
    assert gm.get_submodule("rnn").temporal_pairs == ()


def test_temporal_wormhole_unbatched_input_and_initial_state():
    m = nn.GRU(I, H, 2)
    e = add_temporal_wormhole(m)
    x, h0 = torch.randn(T, I), torch.randn(2, H)
    for r, g in zip(m(x, h0), e(x, h0)):
        assert g.shape == r.shape and rel(g, r) < 1e-5
    assert e.stats.iterations.shape == (T, 1)


# ---- adding problem ---------------------------------------------------------------------------
def adding_problem(n: int, length: int, generator: torch.Generator):
    """Two channels: values U(0,1) and markers at two positions; target = sum of the marked values."""
    values = torch.rand(n, length, generator=generator)
    markers = torch.zeros(n, length)
    half = length // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, length, (n,), generator=generator)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], -1)
    return x, (values * markers).sum(1, keepdim=True)


class AddingNet(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.rnn = nn.LSTM(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _train_adding(length: int, steps: int, hidden: int = 32, batch: int = 64, lr: float = 1e-2) -> tuple[float, object]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = AddingNet(hidden)
    x0, _ = adding_problem(4, length, g)
    gm = run_passes(_capture(model, x0), [DecomposeRecurrent(), TemporalWormholes(WormholeConfig(solver="anderson", tol=1e-4))])
    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=lr)
    for _ in range(steps):
        x, y = adding_problem(batch, length, g)
        loss = nn.functional.mse_loss(gm(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(gm.parameters(), 1.0)
        opt.step()
    gm.eval()
    xt, yt = adding_problem(512, length, g)
    with torch.no_grad():
        return float(nn.functional.mse_loss(gm(xt), yt)), gm.get_submodule("rnn").stats


def test_adding_problem_short_fast():
    mse, stats = _train_adding(length=10, steps=150)
    assert mse < 0.1, mse  # trivial baseline: 1/6 = 0.167
    assert stats.iterations.shape == (10, 512)


@pytest.mark.slow
def test_adding_problem_t50():
    mse, stats = _train_adding(length=50, steps=600)
    assert mse < 0.1, mse
    assert stats.iterations.shape == (50, 512)
