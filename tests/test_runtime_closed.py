"""Cheap when closed: a zero feedback costs one body + one feedback call, also when training."""
import torch
from torch import nn

from fxwormhole.runtime.fixed_point import FixedPoint

from helpers import MLPBody


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *a):
        self.calls += 1
        return self.inner(*a)


class ClosedFeedback(nn.Module):
    """Wormhole-like feedback ``z = sigmoid(gate) * P(y)`` with ``P = 0`` (closed at init)."""

    def __init__(self, d=6):
        super().__init__()
        self.P = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.tensor(-6.0))
        nn.init.zeros_(self.P.weight)
        nn.init.zeros_(self.P.bias)

    def forward(self, y, x):
        return torch.sigmoid(self.gate) * self.P(y)


def test_closed_feedback_costs_one_call_each_and_gradient_is_plain_autograd():
    torch.manual_seed(1)
    body, fb = Counting(MLPBody().double()), Counting(ClosedFeedback().double())
    node = FixedPoint(body, fb, solver="anderson")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = node(x)
    assert (body.calls, fb.calls) == (1, 1)
    assert node.stats.iterations.tolist() == [1] * 5 and node.stats.residual.max() == 0
    g = torch.randn_like(y)
    params = [x, *body.parameters(), *fb.parameters()]
    got = torch.autograd.grad(y, params, g)
    assert (body.calls, fb.calls) == (1, 1)  # the backward used VJPs of the forward tape only
    assert node.stats.backward.iterations.tolist() == [1] * 5
    # plain autograd through the (nilpotent) iteration z1 = F(B(0)), y = B(z1)
    z0 = torch.zeros_like(x)
    ref = body.inner(fb.inner(body.inner(z0, x), x), x)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    names = ["x"] + [f"body.{n}" for n, _ in body.named_parameters()] + [f"fb.{n}" for n, _ in fb.named_parameters()]
    assert float(got[names.index("fb.inner.P.weight")].abs().sum()) > 0  # P learns although it is zero


def test_open_feedback_tapes_once_more_and_shrinks_batch():
    torch.manual_seed(2)
    inner = MLPBody().double()
    seen = []

    class Spy(nn.Module):
        def forward(self, z, x):
            seen.append(z.shape[0])
            return inner(z, x)

    node = FixedPoint(Spy(), solver="picard", tol=1e-10, max_iter=200)
    x = torch.randn(6, 6, dtype=torch.float64)
    x[0] *= 30  # saturated tanh: converges much faster than the rest? no matter, sizes must shrink
    node(x.requires_grad_())
    total = int(node.stats.iterations.sum())
    # per-sample halting: evaluated rows = sum of per-sample iterations, + one full taped evaluation at z*
    assert sum(seen) == total + 6
    assert min(seen) < 6 or len(set(node.stats.iterations.tolist())) == 1
