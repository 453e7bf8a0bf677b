"""Solvers, halting, stats and the on_fail policy of the fixed-point runtime."""
import math
import warnings

import pytest
import torch
from torch import nn

from fxwormhole.config import SolverConfig
from fxwormhole.errors import ConfigError, ConvergenceError
from fxwormhole.runtime.fixed_point import FixedPoint, fixed_point
from fxwormhole.runtime.solvers import FixedPointSolver, get_solver, make_solver, register_solver

from helpers import MLPBody


class ScaledBody(nn.Module):
    """``z <- s * tanh(W z) + x`` with a per-sample contraction factor ``s`` (a batched input)."""

    def __init__(self, d=8):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        self.register_buffer("W", q)  # orthogonal: the contraction is exactly s near 0

    def forward(self, z, x, s):
        return s * torch.tanh(z @ self.W.T) + x


def _easy_hard(n=10):
    x = torch.randn(n, 8, dtype=torch.float64)
    s = torch.full((n, 1), 0.2, dtype=torch.float64)
    s[::4] = 0.9  # hard samples
    return x, s


@pytest.mark.parametrize("solver", ["picard", "damped", "anderson"])
def test_per_sample_iterations_equal_solving_each_sample_alone(solver):
    body = ScaledBody()
    x, s = _easy_hard()
    cfg = SolverConfig(name=solver, tol=1e-9, max_iter=400, damping=0.8)
    node = FixedPoint(body, solver=cfg)
    y = node(x, s)
    it = node.stats.iterations.clone()
    for b in range(x.shape[0]):
        yb = node(x[b:b + 1], s[b:b + 1])
        assert int(node.stats.iterations[0]) == int(it[b])
        torch.testing.assert_close(y[b:b + 1], yb, atol=1e-12, rtol=0)
    hard = torch.zeros_like(it, dtype=torch.bool)
    hard[::4] = True
    assert int(it[hard].min()) > int(it[~hard].max()), it  # hard samples really took longer


def test_sample_halting_matches_batch_halting():
    body = ScaledBody()
    x, s = _easy_hard()
    tol = 1e-8
    ys = FixedPoint(body, solver=SolverConfig(name="anderson", tol=tol, max_iter=400, halting="sample"))(x, s)
    nb = FixedPoint(body, solver=SolverConfig(name="anderson", tol=tol, max_iter=400, halting="batch"))
    yb = nb(x, s)
    assert nb.stats.forward.ok
    assert bool((nb.stats.iterations == nb.stats.iterations.max()).all())  # everyone ran to the end
    err = (ys - yb).norm(dim=1) / yb.norm(dim=1)
    assert float(err.max()) < 10 * tol


def test_non_contractive_warns_then_raises():
    def osc(z, x):  # oscillates forever: the residual never falls
        return -1.0 * z + x

    f = osc
    x, z0 = torch.randn(3, 4), torch.ones(3, 4)
    with pytest.warns(RuntimeWarning, match=r"'osc'.*max_iter"):
        z, st = fixed_point(f, z0, x, solver="picard", max_iter=7, return_stats=True)
    assert st.status_names() == ["max_iter"] * 3 and st.iterations.tolist() == [7] * 3
    with pytest.raises(ConvergenceError, match="max_iter"):
        fixed_point(f, z0, x, solver="picard", max_iter=7, on_fail="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_point(f, z0, x, solver="picard", max_iter=7, on_fail="ignore")


def test_nan_body_marks_non_finite_and_divergence_is_detected():
    x = torch.tensor([[4.0], [-1.0]])
    with pytest.warns(RuntimeWarning, match="non_finite"):
        z, st = fixed_point(lambda z, x: torch.sqrt(x + 0.1 * z), torch.zeros(2, 1), x,
                            solver="picard", tol=1e-10, max_iter=100, return_stats=True)
    assert st.status_names() == ["converged", "non_finite"]
    assert math.isclose(float(z[0]), (0.1 + math.sqrt(0.01 + 16)) / 2, rel_tol=1e-6)
    # an unstable fixed point (z = 1 for z <- 2z - 1): the residual first is 1e-9, then doubles
    z0 = torch.full((1, 2), 1 + 1e-9, dtype=torch.float64)
    with pytest.raises(ConvergenceError, match="diverged"):
        fixed_point(lambda z, x: 2.0 * z - x, z0, torch.ones(1, 2, dtype=torch.float64), solver="picard",
                    tol=1e-14, max_iter=100, on_fail="raise")


def test_user_registered_solver_is_used():
    calls = []

    class HalfStep(FixedPointSolver):
        def step(self, state, z, fz):
            calls.append(z.shape[0])
            return 0.5 * (z + fz), state

    register_solver("half_step_test", HalfStep, overwrite=True)
    assert get_solver("half_step_test") is HalfStep
    body = MLPBody().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = FixedPoint(body, solver="half_step_test", tol=1e-12, max_iter=400)(x)
    ref = FixedPoint(body, solver="picard", tol=1e-12, max_iter=400)(x)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
    assert calls
    with pytest.raises(ConfigError, match="already exists"):
        register_solver("picard", HalfStep)
    with pytest.raises(ConfigError, match="unknown solver"):
        make_solver("nope")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_anderson_half_precision_state(dtype):
    body = MLPBody(c=0.5).to(dtype)
    x = torch.randn(4, 6).to(dtype)
    node = FixedPoint(body, solver="anderson", tol=1e-2, max_iter=50)
    y = node(x)
    assert y.dtype == dtype and node.stats.forward.ok and bool(torch.isfinite(y).all())
    ref = FixedPoint(MLPBody().float(), solver="picard", tol=1e-7, max_iter=200)
    ref.body.load_state_dict({k: v.float() for k, v in body.state_dict().items()})
    torch.testing.assert_close(y.float(), ref(x.float()), atol=0.05, rtol=0)


def test_batched_flags_and_stats_helpers():
    body = ScaledBody()
    x, _ = _easy_hard(4)
    s = torch.tensor([[0.5]], dtype=torch.float64)  # shared (not batched) contraction
    node = FixedPoint(body, solver="picard", tol=1e-10, max_iter=200, batched=[True, False])
    node(x, s)
    summ = node.stats.summary()
    assert summ["forward"]["status"] == {"converged": 4}
    assert node.stats.worst_residual <= 1e-10 and node.stats.mean_iterations > 1
    with pytest.raises(ConfigError, match="one bool per positional input"):
        FixedPoint(body, batched=[True])(x, s)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_unrolled_spd_solve_equals_lapack_and_stays_finite_when_singular(m):
    from fxwormhole.runtime.solvers import spd_solve_unrolled

    torch.manual_seed(m)
    G = torch.randn(6, m, 3 * m, dtype=torch.float64)
    A = G @ G.transpose(1, 2) + 1e-6 * torch.eye(m, dtype=torch.float64)
    b = torch.randn(6, m, dtype=torch.float64)
    torch.testing.assert_close(spd_solve_unrolled(A, b), torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)
    singular = G[:, :1].transpose(1, 2) @ G[:, :1] if m > 1 else torch.zeros(6, 1, 1, dtype=torch.float64)
    assert torch.isfinite(spd_solve_unrolled(singular[:, :m, :m], b)).all()


def test_anderson_step_under_compile_equals_the_eager_step():
    """The compiled Anderson solves its system by the unrolled Cholesky: the iterates must agree."""
    torch.manual_seed(0)
    solver = make_solver(SolverConfig(name="anderson", memory=4))
    f = lambda z: torch.tanh(z @ W + 0.1)
    W = 0.9 * torch.randn(5, 5, dtype=torch.float64) / 5 ** 0.5

    def run(z):
        state = solver.init(z)
        for _ in range(6):
            z, state = solver.step(state, z, f(z))
        return z

    z0 = torch.randn(3, 5, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(z0), run(z0), rtol=1e-10, atol=1e-12)
