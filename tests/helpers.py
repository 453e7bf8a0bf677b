"""Helpers shared by the tests (no tests here): comparisons, the "model untouched" check, small
contractive fixed-point bodies and their unrolled reference, tiny models for the pass tests."""
from __future__ import annotations

import torch
from torch import nn


# ----------------------------------------------------------------------------------- comparisons
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- the user's model untouched
def snapshot(model: nn.Module):
    """Values of every parameter and buffer, and every ``training`` flag, of ``model``."""
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            [m.training for m in model.modules()])


def assert_unchanged(model: nn.Module, snap) -> None:
    """``model`` still has exactly the values and flags of ``snap`` (:func:`snapshot`)."""
    state, flags = snap
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state), "the model gained or lost parameters or buffers"
    for k, v in now.items():
        assert torch.equal(v.detach(), state[k]), f"the model's {k} changed"
    assert [m.training for m in model.modules()] == flags, "the model's training flags changed"


# ------------------------------------------------- small contractive bodies/feedbacks (float64 by default)
def _shrink(w: torch.Tensor, to: float) -> None:
    with torch.no_grad():
        w.mul_(to / torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2))


class MLPBody(nn.Module):
    """``y = tanh(W z + U x + b)`` with ``||W||_2 = c``."""

    def __init__(self, d: int = 6, c: float = 0.5) -> None:
        super().__init__()
        self.W, self.U = nn.Linear(d, d, bias=False), nn.Linear(d, d)
        _shrink(self.W.weight, c)

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


class ConvBody(nn.Module):
    """Feature-map state ``[B, C, H, W]``."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.A, self.Bx = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            self.A.weight.mul_(0.3 / self.A.weight.abs().sum(dim=(1, 2, 3), keepdim=True))

    def forward(self, z, x):
        return torch.tanh(self.A(z) + self.Bx(x))


class TupleBody(nn.Module):
    """State ``(a [B, 4], b [B, 2, 3])``; returns a tuple of the same structure."""

    def __init__(self) -> None:
        super().__init__()
        self.Wa, self.Ma, self.Wb = nn.Linear(4, 4), nn.Linear(6, 4, bias=False), nn.Linear(4, 6)
        _shrink(self.Wa.weight, 0.4)
        _shrink(self.Ma.weight, 0.3)

    def forward(self, z, x):
        a, b = z
        a2 = torch.tanh(self.Wa(a) + self.Ma(b.flatten(1)) + x)
        b2 = torch.tanh(0.3 * b + 0.2 * self.Wb(a).view(-1, 2, 3))
        return a2, b2


class Feedback(nn.Module):
    """``z_next = s * tanh(P y) + Q x`` with its own parameters; returns ``(z_next, scale)``."""

    def __init__(self, d: int = 6, c: float = 0.6) -> None:
        super().__init__()
        self.P, self.Q = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.s = nn.Parameter(torch.tensor(0.8))
        _shrink(self.P.weight, c)

    def forward(self, y, x):
        return self.s * torch.tanh(self.P(y)) + self.Q(x), x.norm(dim=1)


def unrolled(body, feedback, x, z0, n: int = 150):
    """Reference: plain autograd through ``n`` iterations of ``z <- F(B(z))``; returns ``B(z_n)``."""
    z = z0
    for _ in range(n):
        y = body(z, x)
        z = y if feedback is None else feedback(y, x)
        z = z[0] if feedback is not None and isinstance(z, tuple) and not isinstance(z[0], tuple) else z
    return body(z, x)


# --------------------------------------------------------------------------------- tiny pass-test models
class TinyMLP(nn.Module):
    """``fc1 -> tanh -> fc2 -> tanh -> fc3 -> tanh -> head``: the smallest model with a wormhole span."""

    def __init__(self, d_in: int = 5, hidden: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        h = torch.tanh(self.fc3(h))
        return self.head(h)


class TinyLSTM(nn.Module):
    """A two-layer LSTM tagger: ``rnn -> head`` on every step."""

    def __init__(self, d_in: int = 3, hidden: int = 5, layers: int = 2) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(d_in, hidden, num_layers=layers, batch_first=True), nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


# ------------------------------------------------------------------------- the unfused cell-loop path
def always_accelerating(config):
    """``config`` with the library's ``anderson`` replaced by ``anderson_always``: Anderson without the
    generic loops' per-sample fall-back to plain steps, which is what the temporal fast runtime runs
    for ``anderson`` (see docs/recurrent.md). The generic reference of a fast-runtime test uses it."""
    import dataclasses

    from fxwormhole.runtime.solvers import Anderson, available_solvers, register_solver

    if "anderson_always" not in available_solvers():
        register_solver("anderson_always", type("AlwaysAnderson", (Anderson,), {"fallback_rate": None}))
    solver, grad = config.solver, config.grad
    if solver.name == "anderson":
        solver = dataclasses.replace(solver, name="anderson_always")
    if grad.solver == "anderson":
        grad = dataclasses.replace(grad, solver="anderson_always")
    return dataclasses.replace(config, solver=solver, grad=grad)


def transform_unfused(model: nn.Module, inputs: tuple, config, front_end: str = "auto"):
    """``fxwormhole.transform`` without the cell-loop pass: a Python loop over a cell keeps one
    generic FixedPoint per step (the path ``FuseCellLoops`` must match, with the solver the fast
    runtime runs: :func:`always_accelerating`)."""
    config = always_accelerating(config)
    from fxwormhole.capture import capture_graph
    from fxwormhole.passes._common import run_passes
    from fxwormhole.passes.cell_loops import FuseCellLoops
    from fxwormhole.passes.pipeline import transform_passes
    from fxwormhole.passes.verify import PipelineCheck
    from fxwormhole.transformed import TransformedModule

    captured = capture_graph(model, inputs, front_end=front_end)
    passes = [p for p in transform_passes(captured, config, inputs) if not isinstance(p, FuseCellLoops)]
    gm = run_passes(captured.graph_module, passes, check=PipelineCheck(inputs))
    net = TransformedModule(gm, gm.graph)
    net.meta = dict(gm.meta)
    return net
