"""Issue 19: one owner per gradient mode, halting that saves work in the backward and compiled.

* every gradient mode (implicit, phantom(k, tau), jfb, unrolled, a registered one) gives the eager
  gradients when compiled (float64, 1e-8), with its own settings (PhantomGrad(3, 0.9) runs k=3,
  tau=0.9 compiled too: checked against the definition);
* the adjoint drops converged samples: the gradient equals solving every sample alone (1e-10,
  float64), with and without re-linearising on the remaining rows, eagerly and compiled;
* the stats report the work really done, and the loops read the host once per check (eager) or
  once per block (compiled).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxwormhole
from fxwormhole.config import GradConfig, SolverConfig
from fxwormhole.runtime import gradients
from fxwormhole.runtime.stats import HostReads
from fxwormhole.runtime.fixed_point import FixedPoint
from fxwormhole.runtime.gradients import GradStrategy, JFBGrad, PhantomGrad, UnrolledGrad, register_grad

from helpers import Feedback, MLPBody

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = SolverConfig(name="anderson", tol=1e-12, max_iter=300)


class HalfStep(GradStrategy):
    """A user's mode: one half-damped step of the output map from the detached solution."""

    mode = "halfstep"

    def attach(self, p, y_star):
        return torch.lerp(y_star, p.output_map(y_star), 0.5)


register_grad("halfstep_test", HalfStep, overwrite=True)


def _definition(body, fb, x, y_star, k, tau):
    """``k`` damped steps ``y <- (1 - tau) y + tau B(F(y))`` from the detached solution."""
    y = y_star.detach()
    for _ in range(k):
        y = (1 - tau) * y + tau * body(fb(y, x)[0], x)
    return y


MODES = {
    "implicit": lambda: GradConfig(tol=1e-12, max_iter=300),
    "phantom(3, 0.9)": lambda: PhantomGrad(k=3, tau=0.9),
    "jfb": JFBGrad,
    "unrolled": UnrolledGrad,
    "registered": lambda: "halfstep_test",
}


def _compiled(node, how, x):
    torch._dynamo.reset()
    if how == "torch.compile":
        if node.grad_strategy.mode == "implicit":
            node.prepare()
        return torch.compile(node, fullgraph=True, backend="aot_eager")
    return fxwormhole.compile(node, backend="aot_eager", example_inputs=(x,))  # compiled blocks


@pytest.mark.parametrize("how", ["torch.compile", "fxwormhole.compile"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_compiled_equals_eager(mode, how):
    torch.manual_seed(0)
    body, fb = MLPBody().double(), Feedback().double()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    node = FixedPoint(body, fb, solver=TIGHT, grad=MODES[mode]())
    wrt = [x, *node.parameters()]
    y = node(x)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, wrt, g)
    eager_mode = node.stats.grad_mode
    compiled = _compiled(node, how, x)
    snap = {k: v.clone() for k, v in node.state_dict().items()}
    yc = compiled(x)
    got = torch.autograd.grad(yc, wrt, g)
    torch.testing.assert_close(yc, y, rtol=1e-8, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert node.stats.grad_mode == eager_mode == node.grad_strategy.mode
    assert all(torch.equal(v, snap[k]) for k, v in node.state_dict().items())
    if mode in ("phantom(3, 0.9)", "registered"):  # the compiled gradient is the configured one
        k, tau = (3, 0.9) if mode.startswith("phantom") else (1, 0.5)
        ref = _definition(body, fb, x, y, k, tau)
        for a, b in zip(got, torch.autograd.grad(ref, wrt, g)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    if mode.startswith("phantom"):
        assert (node.grad_config.k, node.grad_config.tau) == (3, 0.9)


def test_registered_mode_by_name_and_its_errors():
    from fxwormhole.errors import ConfigError

    node = FixedPoint(MLPBody(), grad="halfstep_test")
    assert isinstance(node.grad_strategy, HalfStep) and node.grad_config is None
    assert "halfstep_test" in gradients.available_grads()
    with pytest.raises(ConfigError, match="already exists"):
        register_grad("implicit", HalfStep)
    with pytest.raises(ConfigError, match="register_grad"):
        FixedPoint(MLPBody(), grad="no_such_mode")


class ScaledBody(nn.Module):
    """``s * tanh(z W^T) + U x`` with W orthogonal: the per-sample ``s`` sets the contraction."""

    def __init__(self, d=8):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        self.W = nn.Parameter(q)
        self.U = nn.Linear(d, d).double()

    def forward(self, z, x, s):
        return s * torch.tanh(z @ self.W.T) + self.U(x)


def _easy_hard(n=16, d=8):
    x = torch.randn(n, d, dtype=torch.float64)
    s = torch.full((n, 1), 1e-3, dtype=torch.float64)
    s[::5] = 0.9  # hard samples: many more forward and adjoint iterations
    return x, s


def _implicit_grads(node, x, s, g):
    xr = x.clone().requires_grad_()
    y = node(xr, s)
    return torch.autograd.grad(y, [xr, *node.parameters()], g)


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_adjoint_compaction_changes_no_gradient(solver, monkeypatch):
    torch.manual_seed(1)
    body = ScaledBody()
    x, s = _easy_hard()
    node = FixedPoint(body, solver=SolverConfig(name=solver, tol=1e-12, max_iter=400),
                      grad=GradConfig(tol=1e-12, max_iter=400))
    g = torch.randn_like(x)
    gx, *gp = _implicit_grads(node, x, s, g)
    it = node.stats.backward_iterations
    assert int(it.max()) > 3 * int(it.min()), "easy and hard samples must differ in adjoint iterations"
    assert node.stats.backward_work.linearised > 0, "the adjoint must have re-linearised on the hard rows"
    # every sample alone: its input gradient and its share of the parameter gradient
    alone_p = [torch.zeros_like(t) for t in gp]
    for b in range(x.shape[0]):
        gxb, *gpb = _implicit_grads(node, x[b:b + 1], s[b:b + 1], g[b:b + 1])
        torch.testing.assert_close(gx[b:b + 1], gxb, rtol=1e-10, atol=1e-12)
        assert int(node.stats.backward_iterations[0]) == int(it[b])
        alone_p = [a + c for a, c in zip(alone_p, gpb)]
    for a, b in zip(gp, alone_p):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # without re-linearising (converged rows scattered through the full tape): the same gradient
    monkeypatch.setattr(gradients.AdjointMap, "linearise_when", staticmethod(lambda n_live, n_lin: False))
    for a, b in zip(_implicit_grads(node, x, s, g), (gx, *gp)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert node.stats.backward_work.linearised == 0


def test_compiled_adjoint_compaction_changes_no_gradient():
    torch.manual_seed(2)
    body = ScaledBody()
    x, s = _easy_hard()
    node = FixedPoint(body, solver=SolverConfig(name="picard", tol=1e-12, max_iter=400),
                      grad=GradConfig(tol=1e-12, max_iter=400))
    g = torch.randn_like(x)
    want = _implicit_grads(node, x, s, g)
    eager = (node.stats.iterations.clone(), node.stats.backward_iterations.clone())
    torch._dynamo.reset()
    compiled = fxwormhole.compile(node, backend="aot_eager", example_inputs=(x, s))
    xr = x.clone().requires_grad_()
    got = torch.autograd.grad(compiled(xr, s), [xr, *node.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    st = node.stats
    assert torch.equal(st.iterations, eager[0]) and torch.equal(st.backward_iterations, eager[1])
    fwd, bwd = st.forward_work, st.backward_work
    # blocks, not iterations, read the host: far fewer reads than evaluations of the slowest sample
    assert fwd.host_reads == fwd.checks < int(st.iterations.max()) // 2
    assert bwd.host_reads == bwd.checks < int(st.backward_iterations.max()) // 2
    assert bwd.linearised > 0


def test_stats_report_the_work_really_done_and_the_host_reads():
    torch.manual_seed(3)
    body = ScaledBody()
    x, s = _easy_hard(n=40)
    node = FixedPoint(body, solver=SolverConfig(name="picard", tol=1e-10, max_iter=400),
                      grad=GradConfig(tol=1e-10, max_iter=400))
    HostReads.reset()
    _implicit_grads(node, x, s, torch.randn_like(x))
    reads = HostReads.reset()
    st = node.stats
    fwd, bwd = st.forward_work, st.backward_work
    B, it, bit = x.shape[0], st.iterations, st.backward_iterations
    assert fwd.evaluations == int(it.sum()), "the forward evaluates only the samples still running"
    assert int(bit.sum()) <= bwd.evaluations <= 2 * int(bit.sum())
    assert bwd.evaluations < 0.5 * B * int(bit.max()), "the adjoint no longer runs the batch to the slowest sample"
    assert st.summary()["backward"]["rows_evaluated"] == bwd.evaluations
    # eager: one read per residual check, the on_fail verdicts included
    assert fwd.host_reads == fwd.checks and bwd.host_reads == bwd.checks
    assert reads == fwd.checks + bwd.checks


def test_closed_node_reads_the_host_once_per_solve():
    from test_runtime_closed import ClosedFeedback, Counting

    body, fb = Counting(MLPBody().double()), Counting(ClosedFeedback().double())
    node = FixedPoint(body, fb, solver="anderson")
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    HostReads.reset()
    y = node(x)
    torch.autograd.grad(y, [x, *node.parameters()], torch.randn_like(y))
    assert HostReads.reset() == 2  # one check forward, one backward, and both verdicts came with them
    assert (body.calls, fb.calls) == (1, 1)


@pytest.mark.parametrize("contraction,accelerates", [(0.05, False), (0.95, True)])
def test_anderson_falls_back_to_plain_steps_only_where_it_saves_nothing(contraction, accelerates, monkeypatch):
    from fxwormhole.runtime import solvers

    calls = []
    step = solvers.Anderson.step
    monkeypatch.setattr(solvers.Anderson, "step", lambda self, *a: calls.append(1) or step(self, *a))
    torch.manual_seed(4)
    body = ScaledBody()
    x, _ = _easy_hard(n=6)
    s = torch.full((6, 1), contraction, dtype=torch.float64)
    with torch.no_grad():
        y = FixedPoint(body, solver=SolverConfig(name="anderson", tol=1e-10, max_iter=400))(x, s)
        ref = FixedPoint(body, solver=SolverConfig(name="picard", tol=1e-13, max_iter=2000))(x, s)
    assert bool(calls) == accelerates
    torch.testing.assert_close(y, ref, rtol=1e-8, atol=1e-9)


@pytest.mark.slow
def test_inductor_blocks_match_eager():
    torch.manual_seed(5)
    body, fb = MLPBody().double(), Feedback().double()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    node = FixedPoint(body, fb, solver=TIGHT, grad=GradConfig(tol=1e-12, max_iter=300))
    wrt = [x, *node.parameters()]
    y = node(x)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, wrt, g)
    torch._dynamo.reset()
    compiled = fxwormhole.compile(node, example_inputs=(x,))
    got = torch.autograd.grad(compiled(x), wrt, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_a_copy_or_a_loaded_node_solves_with_its_own_parameters(tmp_path):
    """A node's solve set-ups are registered for the compiled op under ids of this process that
    point back to that node: a deepcopy (or a model saved and loaded) must build its own, or its
    compiled calls would run the original's body."""
    import copy

    torch.manual_seed(4)
    node = FixedPoint(MLPBody().double(), Feedback().double(), solver=TIGHT, grad=GradConfig(tol=1e-12, max_iter=300))
    x = torch.randn(5, 6, dtype=torch.float64)
    node(x)  # set-ups and compiled-op entries built for `node`
    twin = copy.deepcopy(node)
    with torch.no_grad():
        for t in twin.parameters():
            t.mul_(0.5)
    torch.save(twin, tmp_path / "twin.pt")
    loaded = torch.load(tmp_path / "twin.pt", weights_only=False)
    for other in (twin, loaded):
        want = other(x)
        torch._dynamo.reset()
        compiled = fxwormhole.compile(other, backend="aot_eager", example_inputs=(x,))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), want, rtol=1e-8, atol=1e-10)
        assert not torch.allclose(want, node(x))


class CountingScaledBody(ScaledBody):
    """A body that keeps a statistic in training mode (as SAL probes and BatchNorm do)."""

    def __init__(self, d=8):
        super().__init__(d)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, z, x, s):
        if self.training:
            self.count += 1
        return super().forward(z, x, s)


def test_adjoint_evaluates_no_stateful_body_again():
    """Linearising again on the hard rows would run the body in the backward: a body that keeps
    statistics in training mode must see only the forward's evaluations (the adjoint then works on
    the full tape), and the gradient is the same as with a pure body."""
    torch.manual_seed(1)
    body = CountingScaledBody()
    x, s = _easy_hard()
    node = FixedPoint(body, solver=SolverConfig(name="picard", tol=1e-12, max_iter=400),
                      grad=GradConfig(tol=1e-12, max_iter=400))
    g = torch.randn_like(x)
    xr = x.clone().requires_grad_()
    y = node(xr, s)
    after_forward = int(body.count)
    got = torch.autograd.grad(y, [xr, *node.parameters()], g)
    assert int(body.count) == after_forward
    assert node.stats.backward_work.linearised == 0
    body.eval()  # no statistic kept: the adjoint linearises again on the hard rows
    want = _implicit_grads(node, x, s, g)
    assert node.stats.backward_work.linearised > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
