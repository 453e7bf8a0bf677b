"""The fast temporal runtime (runtime/temporal*.py) against an unrolled float64 reference and the generic path.

The reference re-implements the stack with plain differentiable torch ops, iterates every step's
fixed point many times from u = 0 and back-propagates through every iteration: its gradient is the
per-step implicit gradient plus BPTT between steps, computed without either runtime.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fxwormhole.config import GradConfig, SolverConfig, WormholeConfig
from fxwormhole.errors import ConvergenceError
from fxwormhole.runtime import temporal_solve
from fxwormhole.runtime.recurrent import ExplicitRecurrent, add_temporal_wormhole
from helpers import always_accelerating, rel

pytestmark = pytest.mark.usefixtures("one_thread")

I, H, T, B = 4, 5, 5, 3
DT = torch.float64


# ---- the reference ------------------------------------------------------------------------------
def _cell(e: ExplicitRecurrent, layer: int, inp, state):
    w_ih, w_hh, b_ih, b_hh, w_hr = e.weights(layer)
    gi = F.linear(inp, w_ih, b_ih)
    gh = F.linear(state[0], w_hh, b_hh)
    if e.mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else F.linear(h, w_hr), c)
    if e.mode == "GRU":
        (ir, iz, in_), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return ((1 - z) * n + z * state[0],)
    return ((torch.relu if e.mode == "RNN_RELU" else torch.tanh)(gi + gh),)


def unrolled(e: ExplicitRecurrent, x, states, masks, iters: int):
    """Time-major reference: ``iters`` Picard iterations per step from u = 0, autograd through all."""
    L = e.num_layers
    pairs = [(int(a[5:]), int(b[5:])) for a, b in e.temporal_pairs]
    whs = list(e.temporal_wormholes.values())
    outs = []
    for t in range(x.shape[0]):
        u = [None] * len(pairs)
        for _ in range(iters):
            inp, new = x[t], []
            for layer in range(L):
                for (src, dst), uk in zip(pairs, u):
                    if dst == layer and uk is not None:
                        inp = inp + uk
                new.append(_cell(e, layer, inp, states[layer]))
                inp = new[-1][0] * masks[layer][t] if masks and layer < L - 1 else new[-1][0]
            u = [wh(new[src][0]) for (src, _), wh in zip(pairs, whs)]
        states = new
        outs.append(new[-1][0])
    return torch.stack(outs), states


def _open_config(solver="picard", **kw) -> WormholeConfig:
    if isinstance(solver, str):
        solver = SolverConfig(name=solver, tol=1e-13, max_iter=400, damping=0.7)
    base = dict(gate_init=1.0, proj_init="normal", proj_std=0.3, on_fail="raise", solver=solver,
                grad=GradConfig(tol=1e-13, max_iter=400))
    base.update(kw)
    return WormholeConfig(**base)


def _open_input_gates(e):
    with torch.no_grad():
        for wh in e.temporal_wormholes.values():
            if wh.gate.kind == "input":
                wh.gate.map.map.weight.normal_(0, 0.5)


CASES = [
    # id, module, wormhole config overrides
    ("lstm2_auto_scalar", lambda: nn.LSTM(I, H, 2), dict(gate="scalar")),
    ("lstm3_batch_first_input_cap", lambda: nn.LSTM(I, H, 3, batch_first=True), dict(gate="input", gate_cap=0.8)),
    ("lstm2_proj_channel", lambda: nn.LSTM(I, H, 2, proj_size=3), dict(gate="channel")),
    ("lstm4_inner_pair", lambda: nn.LSTM(I, H, 4), dict(gate="input", wormholes=(("layer2", "layer1"),))),
    ("gru2_two_pairs", lambda: nn.GRU(I, H, 2), dict(gate="channel", wormholes=(("layer1", "layer0"), ("layer0", "layer0")))),
    ("gru3_every2_batch_first", lambda: nn.GRU(I, H, 3, batch_first=True), dict(gate="input", wormholes="every:2")),
    ("rnn_tanh1_input", lambda: nn.RNN(I, H, 1), dict(gate="input")),
    ("rnn_relu2_scalar_nobias", lambda: nn.RNN(I, H, 2, nonlinearity="relu", bias=False), dict(gate="scalar")),
    ("lstm2_spectral_anderson", lambda: nn.LSTM(I, H, 2), dict(gate="input", spectral_norm=True, solver="anderson")),
    ("gru2_damped", lambda: nn.GRU(I, H, 2), dict(gate="scalar", solver="damped")),
]


def _run_case(make, overrides, runtime: str, seed: int = 7, train_dropout: float = 0.0):
    torch.manual_seed(seed)
    m = make().to(DT)
    if train_dropout:
        m.dropout = train_dropout
    solver = overrides.pop("solver", "picard")
    e = add_temporal_wormhole(m, _open_config(solver, **overrides))
    _open_input_gates(e)
    e._temporal.runtime = runtime
    return m, e


@pytest.mark.parametrize("name,make,overrides", CASES, ids=[c[0] for c in CASES])
def test_fast_runtime_gradients_match_unrolled_reference_float64(name, make, overrides):
    m, e = _run_case(make, dict(overrides), "fast")
    L, lstm = e.num_layers, e.mode == "LSTM"
    torch.manual_seed(1)
    shape = (B, T, I) if e.batch_first else (T, B, I)
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    h0 = torch.randn(L, B, e.real_hidden_size, dtype=DT, requires_grad=True)
    c0 = torch.randn(L, B, H, dtype=DT, requires_grad=True)
    hx = (h0, c0) if lstm else h0
    out, hn = e(x, hx)
    assert e._temporal._fast is not None  # the fast runtime ran
    assert float(e.stats.iterations.float().mean()) > 4  # the wormholes are really open
    w_out = torch.randn_like(out)
    loss = (out * w_out).sum() + sum((t * (k + 1)).sum() for k, t in enumerate(tree_leaves(hn)))
    wrt = [x, h0, *([c0] if lstm else []), *e.parameters()]
    got = torch.autograd.grad(loss, wrt)
    assert e.stats.backward_iterations.shape == (T, B) and float(e.stats.backward_iterations.float().mean()) > 4

    x_tm = x.transpose(0, 1) if e.batch_first else x
    states = [(h0[k], c0[k]) if lstm else (h0[k],) for k in range(L)]
    r_out, r_states = unrolled(e, x_tm, states, [], iters=300)
    r_out = r_out.transpose(0, 1) if e.batch_first else r_out
    assert rel(out, r_out) < 1e-10
    r_hn = (torch.stack([s[0] for s in r_states]),) + ((torch.stack([s[1] for s in r_states]),) if lstm else ())
    r_loss = (r_out * w_out).sum() + sum((t * (k + 1)).sum() for k, t in enumerate(r_hn))
    ref = torch.autograd.grad(r_loss, wrt)
    names = ["x", "h0", *(["c0"] if lstm else []), *[n for n, _ in e.named_parameters()]]
    for n, a, b in zip(names, got, ref):
        assert rel(a, b) < 1e-8, (n, rel(a, b))


def test_dropout_masks_fixed_within_a_step_match_the_reference():
    """Training mode with dropout between layers: the same masks (one draw per sequence) in both."""
    m, e = _run_case(lambda: nn.LSTM(I, H, 3), dict(gate="input"), "fast", train_dropout=0.3)
    e.train()
    x = torch.randn(T, B, I, dtype=DT, requires_grad=True)
    torch.manual_seed(5)
    out, _ = e(x)
    wrt = [x, *e.parameters()]
    got = torch.autograd.grad(out.square().sum(), wrt)
    torch.manual_seed(5)
    ones = x.new_ones(T, B, H)
    masks = [F.dropout(ones, 0.3, True) for _ in range(2)]
    z = torch.zeros(B, H, dtype=DT)
    r_out, _ = unrolled(e, x, [(z, z)] * 3, masks, iters=300)
    assert rel(out, r_out) < 1e-10
    for a, b in zip(got, torch.autograd.grad(r_out.square().sum(), wrt)):
        assert rel(a, b) < 1e-8


@pytest.mark.parametrize("name,make,overrides", CASES[:8], ids=[c[0] for c in CASES[:8]])
def test_zero_projection_runs_layer_by_layer_and_matches_generic(name, make, overrides):
    """Every projection exactly zero: the fast runtime's layer-major schedule against the generic
    path, including the wormholes' gradients (the projection's is non-zero) and the statistics."""
    results = {}
    for runtime in ("fast", "generic"):
        m, e = _run_case(make, dict(overrides, proj_init="zero"), runtime, train_dropout=0.25)
        e.train()
        torch.manual_seed(1)
        shape = (B, T, I) if e.batch_first else (T, B, I)
        x = torch.randn(shape, dtype=DT, requires_grad=True)
        torch.manual_seed(9)  # dropout masks
        out, hn = e(x)
        wrt = [x, *e.parameters()]
        grads = torch.autograd.grad((out * out.detach().cos()).sum() + sum(t.sum() for t in tree_leaves(hn)), wrt)
        results[runtime] = (out, grads, e.stats.iterations, e.stats.backward_iterations, e.stats.residual)
        if runtime == "fast":
            assert e._temporal._fast is not None
    (o1, g1, *s1), (o2, g2, *s2) = results["fast"], results["generic"]
    assert rel(o1, o2) < 1e-12
    names = ["x", *[n for n, _ in e.named_parameters()]]
    for n, a, b in zip(names, g1, g2):
        assert rel(a, b) < 1e-10, (n, rel(a, b))
    assert any("proj" in n and float(g.abs().max()) > 0 for n, g in zip(names, g1))  # the projection learns
    assert bool((s1[0] == 1).all()) and bool((s1[1] == 1).all()) and float(s1[2].abs().max()) == 0
    for a, b in zip(s1, s2):
        assert torch.equal(a, b.to(a.dtype))


# ---- the fast runtime is the generic path's semantics, sample for sample ------------------------
SEMANTICS = [
    ("picard_sample", dict(solver=SolverConfig(name="picard", tol=1e-6, max_iter=60))),
    ("picard_check_every_2", dict(solver=SolverConfig(name="picard", tol=1e-6, max_iter=60, check_every=2))),
    ("picard_batch_halting", dict(solver=SolverConfig(name="picard", tol=1e-6, max_iter=60, halting="batch"))),
    ("anderson", dict(solver=SolverConfig(name="anderson", tol=1e-6, max_iter=60))),
    ("max_iter_hit", dict(solver=SolverConfig(name="picard", tol=1e-12, max_iter=3), on_fail="ignore",
                          grad=GradConfig(tol=1e-12, max_iter=3))),
]


@pytest.mark.parametrize("name,kw", SEMANTICS, ids=[s[0] for s in SEMANTICS])
def test_fast_and_generic_agree_per_sample(name, kw):
    """Outputs, gradients and per-(step, sample) iteration counts and statuses agree; the batch's
    samples settle after different numbers of iterations (per-sample halting)."""
    cfg = dict(gate="input", gate_init=0.5, proj_init="normal", proj_std=0.4, grad=GradConfig(tol=1e-6, max_iter=60))
    cfg.update(kw)
    results = {}
    for runtime in ("fast", "generic"):
        torch.manual_seed(3)
        config = WormholeConfig(**cfg)
        e = add_temporal_wormhole(nn.GRU(I, H, 2).to(DT), config if runtime == "fast" else always_accelerating(config))
        _open_input_gates(e)
        e._temporal.runtime = runtime
        torch.manual_seed(4)
        # samples of very different scale: their fixed points settle at different iterations
        x = (torch.randn(T, 8, I, dtype=DT) * torch.logspace(-2, 0.5, 8, dtype=DT).view(1, 8, 1)).requires_grad_()
        out, hn = e(x)
        grads = torch.autograd.grad((out.sin()).sum() + hn.sum(), [x, *e.parameters()])
        st = e.stats
        results[runtime] = (out, grads, st.iterations, st.status, st.backward_iterations, st.backward_status)
    (o1, g1, *s1), (o2, g2, *s2) = results["fast"], results["generic"]
    assert rel(o1, o2) < 1e-12
    for a, b in zip(g1, g2):
        assert rel(a, b) < 1e-10
    for a, b in zip(s1, s2):
        assert torch.equal(a.long(), b.long())
    if name != "max_iter_hit" and "batch" not in name:
        assert bool((s1[0] != s1[0][:, :1]).any())  # samples really halted at different iterations
    if name == "max_iter_hit":
        assert bool((s1[1] == 1).any())  # MAX_ITER status recorded


def test_on_fail_applies_once_per_sequence():
    e = add_temporal_wormhole(nn.LSTM(I, H, 2), _open_config(solver=SolverConfig(name="picard", tol=1e-12, max_iter=2),
                                                             on_fail="warn"))
    x = torch.randn(T, B, I)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e(x)
    msgs = [w for w in caught if "did not converge" in str(w.message)]
    assert len(msgs) == 1 and f"of {T * B} (step, sample)" in str(msgs[0].message)
    # a caller run as `python -m pkg` (its loader cannot give its source) gets the warning too
    class NoSource:
        def get_source(self, name):
            raise ImportError(f"loader for {name} cannot handle __main__")

    scope = {"__name__": "__main__", "__loader__": NoSource(), "e": e, "x": x}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("e(x)", "<python -m pkg>", "exec"), scope)
    assert any("did not converge" in str(w.message) for w in caught)
    e2 = add_temporal_wormhole(nn.LSTM(I, H, 2), _open_config(solver=SolverConfig(name="picard", tol=1e-12, max_iter=2),
                                                              on_fail="raise"))
    with pytest.raises(ConvergenceError, match="forward solve did not converge"):
        e2(x)


def test_syncs_per_step_are_one_or_two(monkeypatch):
    """Host reads per time step (forward and adjoint), counted where the solve loop reads the device."""
    reads = []
    real = temporal_solve._read_counts
    monkeypatch.setattr(temporal_solve, "_read_counts", lambda acc: reads.append(1) or real(acc))
    torch.manual_seed(0)
    e = add_temporal_wormhole(nn.LSTM(I, H, 2), WormholeConfig(gate="input", gate_init=-1.0, proj_init="normal",
                                                                proj_std=0.1, solver="picard", tol=1e-4))
    x = torch.randn(40, B, I)
    e(x)  # the first sequence sets the schedule
    reads.clear()
    out, _ = e(x)
    fwd = len(reads)
    out.sum().backward()
    bwd = len(reads) - fwd
    it = e.stats.iterations.float().mean()
    assert it > 1.5  # open: more than one evaluation per step
    assert fwd <= 2 * 40 and bwd <= 2 * 40, (fwd, bwd)


def test_closed_wormhole_takes_one_evaluation_and_equals_torch():
    torch.manual_seed(2)
    m = nn.GRU(I, H, 2)
    e = add_temporal_wormhole(m, WormholeConfig(solver="picard"))
    x = torch.randn(T, B, I, requires_grad=True)
    out, hn = e(x)
    r_out, r_hn = m(x)
    assert rel(out, r_out) < 1e-5 and rel(hn, r_hn) < 1e-5
    assert bool((e.stats.iterations == 1).all())
    g = torch.autograd.grad(out.sum(), [x, *[p for n, p in e.named_parameters() if "temporal" not in n]])
    g_ref = torch.autograd.grad(r_out.sum(), [x, *m.parameters()])
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-4
    assert bool((e.stats.backward_iterations == 1).all())


def test_inference_without_grad_builds_no_graph():
    e = add_temporal_wormhole(nn.LSTM(I, H, 2), _open_config())
    with torch.no_grad():
        out, (hn, cn) = e(torch.randn(T, B, I))
    assert out.grad_fn is None and e.stats.iterations.shape == (T, B)


def test_second_backward_with_retain_graph_gives_the_same_gradients():
    e = add_temporal_wormhole(nn.GRU(I, H, 2).to(DT), _open_config(gate="input"))
    _open_input_gates(e)
    x = torch.randn(T, B, I, dtype=DT)
    loss = e(x)[0].square().sum()
    first = torch.autograd.grad(loss, list(e.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(e.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bfloat16_module_runs_with_float32_residuals():
    e = add_temporal_wormhole(nn.LSTM(I, H, 2), WormholeConfig(gate="input", gate_init=0.0, proj_init="normal", proj_std=0.3,
                                                                solver="picard", tol=1e-2, on_fail="ignore")).to(torch.bfloat16)
    x = torch.randn(T, B, I, dtype=torch.bfloat16, requires_grad=True)
    out, _ = e(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and e.stats.residual.dtype == torch.float32
    assert x.grad is not None and bool(torch.isfinite(x.grad.float()).all())


def test_generic_fallback_for_other_gradient_modes():
    e = add_temporal_wormhole(nn.LSTM(I, H, 2), _open_config(grad="jfb"))
    assert e._temporal.refusal is not None and "jfb" in e._temporal.refusal
    out, _ = e(torch.randn(T, B, I))
    out.sum().backward()
    assert e._temporal._fast is None and e.stats.iterations.shape == (T, B)


# ---- SAL on a model whose LSTM has temporal wormholes ---------------------------------------------
def test_gradients_with_sal_match_the_unrolled_reference_float64():
    import fxwormhole
    from fxwormhole import SALConfig
    from fxwormhole.zoo import LSTMClassifier

    torch.manual_seed(0)
    model = LSTMClassifier(in_features=3, hidden=H, num_layers=2, seq=T).to(DT)
    x = torch.randn(B, T, 3, dtype=DT)
    cfg = _open_config(gate="input")
    net = fxwormhole.transform(model, (x,), cfg, sal=SALConfig(eta=0.05)).train()
    rnn = net.get_submodule("rnn")
    _open_input_gates(rnn)
    assert rnn.temporal_pairs and any("sal" in n or "probe" in n for n, _ in net.named_modules())
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}

    def grads():
        net.load_state_dict(snapshot)  # the probes' moving averages move at every training forward
        return torch.autograd.grad(net(x).square().sum(), list(net.parameters()))

    got = grads()
    assert rnn._temporal._fast is not None and float(rnn.stats.iterations.float().mean()) > 4

    def reference_forward(inp, hx=None):
        xs = inp.transpose(0, 1)
        z = xs.new_zeros(B, H)
        out, st = unrolled(rnn, xs, [(z, z)] * 2, [], iters=300)
        return out.transpose(0, 1), (torch.stack([s[0] for s in st]), torch.stack([s[1] for s in st]))

    rnn.forward = reference_forward  # the probe and the head see the reference's outputs
    ref = grads()
    del rnn.forward
    names = [n for n, _ in net.named_parameters()]
    for n, a, b in zip(names, got, ref):
        assert rel(a, b) < 1e-8, (n, rel(a, b))


# ---- the compiled path --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: nn.LSTM(I, H, 2), lambda: nn.GRU(I, H, 2), lambda: nn.RNN(I, H, 2)],
                         ids=["lstm", "gru", "rnn"])
def test_compile_step_on_the_fast_runtime_matches_eager_and_compiles_once_for_every_length(make):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cfg = WormholeConfig(gate="input", gate_init=0.5, proj_init="normal", proj_std=0.3, solver="picard", tol=1e-6)
    torch.manual_seed(0)
    eager = add_temporal_wormhole(make(), cfg)
    _open_input_gates(eager)
    compiled = add_temporal_wormhole(make(), cfg)
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    compiled.compile_step(backend=counter)
    frames = []
    for length in (7, 23):  # not H: equal sizes would let dynamo relate them
        x = torch.randn(length, B, I)
        w = torch.randn(length, B, H)
        got = torch.autograd.grad((compiled(x)[0] * w).sum(), list(compiled.parameters()))
        ref = torch.autograd.grad((eager(x)[0] * w).sum(), list(eager.parameters()))
        for a, b in zip(got, ref):
            assert rel(a, b) < 1e-5
        assert compiled._temporal._fast is not None and float(compiled.stats.iterations.float().mean()) > 1
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0]  # a longer sequence compiled nothing new
    compiled.uncompile_step()
    x = torch.randn(T, B, I)
    assert rel(compiled(x)[0], eager(x)[0]) < 1e-6
    torch._dynamo.reset()


def test_fxwormhole_compile_with_recurrent_step_trains_like_eager():
    import fxwormhole
    from fxwormhole.zoo import LSTMClassifier

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LSTMClassifier(in_features=3, hidden=H, num_layers=2, seq=T)
    x = torch.randn(B, T, 3)
    net = fxwormhole.transform(model, (x,), WormholeConfig(gate="input", gate_init=0.5, proj_init="normal",
                                                           proj_std=0.3, solver="picard", tol=1e-6))
    ref = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    fast = fxwormhole.compile(net, recurrent="step", backend="aot_eager")
    got = torch.autograd.grad(fast(x).square().sum(), list(net.parameters()))
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5
    assert net.rnn._temporal._fast is not None and net.rnn._temporal._fast.kernels.gate_factors is not None
    torch._dynamo.reset()
