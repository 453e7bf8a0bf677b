"""Divergence guard (issue 9): forced-open wormholes are reported, and the guard restores convergence.

The guard's guarantee, stated honestly (docs/reliability.md): with ``spectral_norm=True`` the
projection's spectral norm is at most 1 and with ``gate_cap=c`` every gate is at most ``c``, so a
scalar/channel wormhole's feedback ``h -> g * P(h)`` is ``c``-Lipschitz. The whole cycle
``z -> g * P(span(x + z))`` contracts when ``c * Lip(span) < 1``; the cap alone cannot make an
expansive span contract (the last test shows it).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxwormhole as fw
from fxwormhole.runtime.contraction import SpectralCap
from fxwormhole.runtime.stats import CONVERGED
from fxwormhole.runtime.wormhole import Gate, Wormhole

pytestmark = pytest.mark.usefixtures("one_thread")

NODE = "fixed_point_0"


def _model(act=nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 4))


def _span_lipschitz(model: nn.Sequential) -> float:
    """Upper bound of the span ``input of '0' -> output of '3'`` (tanh is 1-Lipschitz)."""
    with torch.no_grad():
        return float(torch.linalg.matrix_norm(model[0].weight, 2) * torch.linalg.matrix_norm(model[2].weight, 2))


def _forced_open(model, solver="picard", **guard) -> fw.TransformedModule:
    """Gates open (sigmoid(6) ~ 0.998) and a large random projection (spectral norm ~ 7)."""
    torch.manual_seed(1)
    cfg = fw.WormholeConfig(wormholes=[("2", "0")], gate_init=6.0, proj_init="normal", proj_std=1.0,
                            solver=solver, max_iter=60, **guard)
    return fw.transform(model, (torch.randn(32, 8),), cfg)


def _wormhole(net) -> Wormhole:
    (w,) = [m for m in net.modules() if isinstance(m, Wormhole)]
    return w


def _run(net, x, *, backward=False):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = net(x)
        if backward:
            y.square().mean().backward()
    return y, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def _copy_wormhole(src: Wormhole, dst: Wormhole) -> None:
    """Give the guarded model the forced-open model's gate and (unguarded) projection weights."""
    with torch.no_grad():
        dst.gate.logit.copy_(src.gate.logit)
        target = dst.proj.map.parametrizations.weight.original if hasattr(dst.proj.map, "parametrizations") \
            else dst.proj.map.weight
        target.copy_(src.proj.map.weight)


def test_forced_open_gates_stop_contracting_and_the_user_is_told_which_node():
    model = _model()
    net = _forced_open(model)
    with torch.no_grad():
        assert float(torch.linalg.matrix_norm(_wormhole(net).proj.map.weight, 2)) > 3
    x = torch.randn(32, 8)
    y, warned = _run(net.train(), x, backward=True)
    stats = net.fixed_point_stats()[NODE]
    names = set(stats.forward.status_names())
    assert names - {"converged"}, "a non-contractive cycle cannot converge for every sample"
    assert names <= {"converged", "max_iter", "diverged", "non_finite"}
    failed = stats.forward.status != CONVERGED
    assert int(stats.forward.iterations[failed].min()) >= 1
    assert float(stats.forward.residual[failed].min()) > stats.tol
    forward = [str(w.message) for w in warned if "forward solve" in str(w.message)]
    assert len(forward) == 1
    assert f"'{NODE}'" in forward[0] and "did not converge" in forward[0]
    assert "gate_init" in forward[0] and "spectral" in forward[0]  # says what to do
    assert torch.isfinite(y).all()  # tanh keeps the output bounded: a bad fixed point, not a NaN

    with pytest.raises(fw.ConvergenceError, match=NODE):
        _forced_open(model, on_fail="raise")(x)
    quiet = _forced_open(model, on_fail="ignore")
    _, warned = _run(quiet, x)
    assert warned == []
    assert not quiet.fixed_point_stats()[NODE].forward.ok  # ignored, but still reported in the stats


def test_unbounded_activations_blow_up_and_are_reported_not_silent():
    net = _forced_open(_model(nn.ReLU), on_fail="warn")
    with torch.no_grad():
        _wormhole(net).proj.map.weight.mul_(3)
    y, warned = _run(net.eval(), torch.randn(32, 8))
    stats = net.fixed_point_stats()[NODE].forward
    assert not stats.ok
    assert any(NODE in str(w.message) for w in warned)
    bad = stats.status != CONVERGED
    assert bool(bad.any())


def test_the_guard_restores_convergence_on_the_same_forced_open_model():
    model = _model()
    lip = _span_lipschitz(model)
    cap = 0.9 / lip  # the cycle is then (0.9)-Lipschitz: Banach's theorem guarantees convergence
    x = torch.randn(32, 8)
    open_net = _forced_open(model)
    _, warned = _run(open_net, x)
    assert not open_net.fixed_point_stats()[NODE].forward.ok and warned

    guarded = _forced_open(model, gate_cap=cap, spectral_norm=True)
    _copy_wormhole(_wormhole(open_net), _wormhole(guarded))
    w = _wormhole(guarded)
    with torch.no_grad():
        assert float(torch.linalg.matrix_norm(w.proj.map.weight, 2)) <= 1 + 1e-5
    assert float(w.gate.value().max()) <= cap
    y, warned = _run(guarded.train(), x, backward=True)
    stats = guarded.fixed_point_stats()[NODE]
    assert warned == []
    assert stats.forward.ok and stats.backward.ok
    # linear convergence at rate <= 0.9 from z0 = 0: relative residual 1e-5 within ~log(1e-5)/log(0.9)
    assert int(stats.forward.iterations.max()) <= 120
    # the unique fixed point: Anderson from the same start finds the same outputs
    anderson = _forced_open(model, gate_cap=cap, spectral_norm=True, solver="anderson")
    anderson.load_state_dict(guarded.state_dict())
    torch.testing.assert_close(anderson(x), y, rtol=1e-4, atol=1e-5)


def test_the_guard_keeps_contraction_while_training_pushes_gates_open():
    """Adam trains the wormhole (gate and projection) to maximise the output. The span's layers are
    frozen: the guarantee is relative to the span's Lipschitz constant, which training the layers
    would change."""
    model = _model()
    cap = 0.9 / _span_lipschitz(model)
    x = torch.randn(32, 8)
    results = {}
    for name, guard in {"open": {}, "guarded": dict(gate_cap=cap, spectral_norm=True)}.items():
        torch.manual_seed(2)
        net = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("2", "0")], gate_init=0.0, proj_init="normal",
                                                         proj_std=0.3, solver="picard", max_iter=60, **guard))
        opt = torch.optim.Adam([p for n, p in net.named_parameters() if "wormhole" in n], lr=0.2)
        ok = []
        for _ in range(25):
            opt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (-net(x).square().mean()).backward()  # reward a large output: opens the feedback
            opt.step()
            ok.append(net.fixed_point_stats()[NODE].forward.ok)
        results[name] = ok
    assert not all(results["open"]), "without the guard this loss drives the cycle out of contraction"
    assert all(results["guarded"])


def test_the_cap_bounds_the_feedback_gain_not_the_span():
    """spectral_norm=True alone on an expansive span (Lipschitz 3) still diverges; a gate cap below
    1/3 makes the same cycle contract."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Identity(), nn.Linear(6, 6, bias=False), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight.copy_(3 * torch.eye(6))
        model[2].weight.copy_(torch.eye(6))
    x = torch.randn(16, 6)

    def net(**guard):
        cfg = fw.WormholeConfig(wormholes=[("2", "0")], gate_init=6.0, proj_init="normal", solver="picard",
                                max_iter=60, on_fail="ignore", spectral_norm=True, **guard)
        out = fw.transform(model, (x,), cfg)
        with torch.no_grad():  # projection = identity (spectral norm exactly 1)
            _wormhole(out).proj.map.parametrizations.weight.original.copy_(torch.eye(6))
        return out

    expansive = net()
    expansive(x)
    assert not expansive.fixed_point_stats()[NODE].forward.ok
    capped = net(gate_cap=0.2)  # gain <= 0.2 * 3 = 0.6 < 1
    y = capped(x)
    assert capped.fixed_point_stats()[NODE].forward.ok
    # closed form with g = 0.2 sigmoid(6): z = 3 g (x + z), so layer '2' outputs 3 (x + z) = 3 x / (1 - 3 g)
    g = 0.2 * torch.sigmoid(torch.tensor(6.0))
    expected = model[3](3 * x / (1 - 3 * g))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_spectral_cap_leaves_small_weights_alone_and_is_identity_at_zero_init():
    cap = SpectralCap(1.0)
    small = torch.randn(5, 4) * 0.01
    torch.testing.assert_close(cap(small), small)
    big = torch.randn(5, 4) * 10
    assert float(torch.linalg.matrix_norm(cap(big), 2)) == pytest.approx(1.0, rel=1e-5)
    conv = torch.randn(3, 2, 1, 1) * 10  # 1x1 convolution weights are capped as [out, in]
    assert float(torch.linalg.matrix_norm(cap(conv).flatten(1), 2)) == pytest.approx(1.0, rel=1e-5)

    model = _model()
    x = torch.randn(8, 8, requires_grad=True)
    net = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("2", "0")], spectral_norm=True, gate_cap=0.5))
    torch.testing.assert_close(net(x), model(x))
    net(x).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the capped projection, still at zero, receives a non-zero gradient (training can open it)
    assert float(_wormhole(net).proj.map.parametrizations.weight.original.grad.abs().max()) > 0


@pytest.mark.parametrize("kind", ["scalar", "channel", "input"])
def test_gate_cap_bounds_every_gate_kind(kind):
    gate = Gate(kind, (4, 6), (4, 5), init=20.0, cap=0.25)
    if kind == "input":
        with torch.no_grad():
            gate.map.map.weight.normal_(0, 10)
    g = gate(torch.randn(4, 6) * 100).detach()
    assert float(g.max()) <= 0.25 and float(g.max()) > 0.24
