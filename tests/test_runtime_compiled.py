"""Compiled path: torch.compile(fullgraph, inductor) matches eager under a random upstream gradient
and leaves parameters untouched (regression guard for Inductor's in-place trap)."""
import pytest
import torch
from torch import nn

from fxwormhole.errors import FxWormholeError
from fxwormhole.runtime.fixed_point import FixedPoint

from helpers import Feedback, MLPBody


class Net(nn.Module):
    def __init__(self, feedback=False):
        super().__init__()
        self.fp = FixedPoint(MLPBody(), Feedback() if feedback else None, solver="anderson", tol=1e-6,
                             max_iter=60, grad="implicit")
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.fp(x))


def test_compiled_requires_prepare():
    torch._dynamo.reset()
    net = Net()
    c = torch.compile(net, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="prepare"):
        c(torch.randn(3, 6))
    with pytest.raises(FxWormholeError, match="eager forward"):
        Net().fp.prepare()


@pytest.mark.parametrize("feedback", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_inductor_matches_eager_and_mutates_nothing(feedback):
    """Anderson runs compiled (unrolled Cholesky for its small system) with eager's iteration counts."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Net(feedback)
    x = torch.randn(5, 6, requires_grad=True)
    params = [x, *net.parameters()]
    y = net(x)
    eager_iters = net.fp.stats.iterations.clone()
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, params, g)
    net.fp.prepare()  # from the shapes recorded by the eager call
    snap = {k: v.detach().clone() for k, v in net.state_dict().items()}
    c = torch.compile(net, fullgraph=True, options={"inplace_buffers": False})
    yc = c(x)
    got = torch.autograd.grad(yc, params, g)
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed during compiled forward+backward"
    assert torch.equal(net.fp.stats.iterations, eager_iters), "the compiled Anderson must follow the eager one"
    assert net.fp.stats.residual.max() <= 1e-6


class MixedInputsBody(nn.Module):
    """Float inputs, an integer input (token ids) and a per-sample scale: gradients must reach the
    float inputs and every parameter, and the integer input must simply be carried along."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.emb = nn.Embedding(10, 6)

    def forward(self, z, x, ids, scale):
        return torch.tanh(0.5 * self.lin(z) + x + scale * self.emb(ids))


def test_compiled_gradients_reach_float_inputs_and_parameters_with_an_integer_input():
    torch._dynamo.reset()
    torch.manual_seed(1)
    fp = FixedPoint(MixedInputsBody(), solver="picard", tol=1e-10, max_iter=200).double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(5, 1, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 10, (5,))
    wrt = [x, scale, *fp.parameters()]
    y = fp(x, ids, scale)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, wrt, g)
    fp.prepare()
    compiled = torch.compile(fp, fullgraph=True, backend="aot_eager")
    yc = compiled(x, ids, scale)
    got = torch.autograd.grad(yc, wrt, g)
    torch.testing.assert_close(yc, y, atol=1e-9, rtol=1e-9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
