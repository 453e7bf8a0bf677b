"""Implicit / phantom / JFB / unrolled gradients against plain-autograd references (float64)."""
import pytest
import torch

from fxwormhole.config import GradConfig, SolverConfig
from fxwormhole.runtime.fixed_point import FixedPoint, fixed_point

from helpers import ConvBody, Feedback, MLPBody, TupleBody, unrolled

TIGHT = dict(solver=SolverConfig(name="anderson", tol=1e-13, max_iter=300),
             grad=GradConfig(mode="implicit", tol=1e-13, max_iter=300))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _grads(out, wrt, g):
    outs = out if isinstance(out, tuple) else (out,)
    gs = g if isinstance(g, tuple) else (g,)
    return torch.autograd.grad(outs, wrt, gs, allow_unused=True)


def _compare(node, ref_fn, x, wrt):
    y = node(x)
    g = tuple(torch.randn_like(t) for t in y) if isinstance(y, tuple) else torch.randn_like(y)
    got = _grads(y, wrt, g)
    want = _grads(ref_fn(), wrt, g)
    for a, b in zip(got, want):
        assert a is not None and b is not None
        assert _rel(a, b) < 1e-6, _rel(a, b)
    return node


@pytest.mark.parametrize("batch", [5, 1])
def test_mlp_implicit_matches_unrolled(batch):
    body = MLPBody().double()
    x = torch.randn(batch, 6, dtype=torch.float64, requires_grad=True)
    node = FixedPoint(body, **TIGHT)
    _compare(node, lambda: unrolled(body, None, x, torch.zeros_like(x)), x, [x, *body.parameters()])
    assert node.stats.backward is not None and node.stats.backward.ok


def test_conv_body_feature_maps():
    body = ConvBody().double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    node = FixedPoint(body, **TIGHT)
    _compare(node, lambda: unrolled(body, None, x, torch.zeros_like(x)), x, [x, *body.parameters()])


def test_tuple_state():
    body = TupleBody().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z0 = (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 2, 3, dtype=torch.float64))
    node = FixedPoint(body, init=lambda x: z0, **TIGHT)
    _compare(node, lambda: unrolled(body, None, x, z0), x, [x, *body.parameters()])


def test_body_feedback_split_with_scale():
    body, fb = MLPBody().double(), Feedback().double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    node = FixedPoint(body, fb, **TIGHT)
    wrt = [x, *body.parameters(), *fb.parameters()]
    _compare(node, lambda: unrolled(body, fb, x, torch.zeros_like(x)), x, wrt)


def _phantom_reference(body, fb, x, y_star, k, tau):
    y = y_star.detach()
    for _ in range(k):
        z = y if fb is None else fb(y, x)[0]
        y = (1 - tau) * y + tau * body(z, x)
    return y


@pytest.mark.parametrize("mode,k,tau", [("phantom", 3, 0.6), ("jfb", 1, 1.0)])
def test_phantom_and_jfb_match_definition(mode, k, tau):
    body, fb = MLPBody().double(), Feedback().double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    solver = SolverConfig(name="picard", tol=1e-13, max_iter=300)
    y_star = FixedPoint(body, fb, solver=solver)(x).detach()
    node = FixedPoint(body, fb, solver=solver, grad=GradConfig(mode=mode, k=k, tau=tau))
    wrt = [x, *body.parameters(), *fb.parameters()]
    _compare(node, lambda: _phantom_reference(body, fb, x, y_star, k, tau), x, wrt)


def test_unrolled_mode_matches_reference_and_differs_from_phantom_memory_free_path():
    body = MLPBody().double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    node = FixedPoint(body, solver=SolverConfig(name="picard", tol=1e-13, max_iter=300), grad="unrolled")
    _compare(node, lambda: unrolled(body, None, x, torch.zeros_like(x)), x, [x, *body.parameters()])


def test_functional_fixed_point_and_no_grad_to_z0():
    W = torch.randn(5, 5, dtype=torch.float64)
    W = (0.5 * W / torch.linalg.matrix_norm(W, 2)).requires_grad_(True)
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    z0 = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    f = lambda z, x, W: torch.tanh(z @ W.T + x)
    z, st = fixed_point(f, z0, x, W, tol=1e-13, max_iter=300, return_stats=True,
                        grad=GradConfig(tol=1e-13, max_iter=300))
    g = torch.randn_like(z)
    got = torch.autograd.grad(z, [x, W], g)
    ref = z0.detach()
    for _ in range(200):
        ref = f(ref, x, W)
    want = torch.autograd.grad(ref, [x, W], g)
    assert all(_rel(a, b) < 1e-6 for a, b in zip(got, want))
    assert st.status_names() == ["converged"] * 2
    assert torch.autograd.grad(z.sum(), z0, allow_unused=True)[0] is None


def test_functional_refuses_hidden_closure_tensor():
    from fxwormhole.errors import ConfigError
    W = torch.eye(3, requires_grad=True)
    x = torch.randn(2, 3)
    with pytest.raises(ConfigError, match="neither an argument nor a parameter"):
        fixed_point(lambda z, x: torch.tanh(0.5 * z @ W + x), torch.zeros(2, 3), x)
