"""Compiling explicit recurrent modules: the per-step cell is compiled once, never T copies of it.

References: the eager module (outputs, gradients), and dynamo's own op count (which must not grow
with the sequence length).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from fxwormhole.config import WormholeConfig
from fxwormhole.runtime.recurrent import ExplicitGRU, add_temporal_wormhole, explicit_from_module
from helpers import rel

pytestmark = pytest.mark.usefixtures("one_thread")


def _fwd_bwd(mod: nn.Module, x: torch.Tensor, w: torch.Tensor):
    out = mod(x)[0]
    grads = torch.autograd.grad((out * w).sum(), list(mod.parameters()))
    return out, grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [lambda: nn.LSTM(5, 8, 2, batch_first=True), lambda: nn.GRU(5, 8, 1, bidirectional=True)],
                         ids=["lstm", "gru_bidir"])
def test_compiled_step_matches_eager(make):
    m = make()
    eager = explicit_from_module(m)
    compiled = explicit_from_module(m).compile_step(backend="aot_eager")
    x = torch.randn(3, 9, 5) if m.batch_first else torch.randn(9, 3, 5)
    w = torch.randn_like(eager(x)[0])
    out_e, g_e = _fwd_bwd(eager, x, w)
    out_c, g_c = _fwd_bwd(compiled, x, w)
    assert rel(out_c, out_e) < 1e-6
    for a, b in zip(g_c, g_e):
        assert rel(a, b) < 1e-5
    # another length reuses the same compiled cell
    x2 = torch.randn(3, 4, 5) if m.batch_first else torch.randn(4, 3, 5)
    assert rel(compiled(x2)[0], eager(x2)[0]) < 1e-6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = ExplicitGRU(4, 8, 2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).sum(1)


def test_compiling_a_model_does_not_unroll_the_time_loop():
    net = Net()
    counts = {}
    for T in (5, 40):
        torch._dynamo.reset()
        counter = CompileCounter()
        x = torch.randn(2, T, 4)
        y = torch.compile(net, backend=counter)(x)
        assert rel(y, net(x)) < 1e-6
        counts[T] = (counter.frame_count, counter.op_count)
    assert counts[5] == counts[40]  # graph size independent of T: the loop runs outside the graph


def test_compiled_step_inside_temporal_wormholes():
    cfg = WormholeConfig(gate_init=1.0, proj_init="normal", proj_std=0.3)
    eager = add_temporal_wormhole(nn.LSTM(4, 8, 2), cfg)
    compiled = add_temporal_wormhole(nn.LSTM(4, 8, 2), cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_step(backend="aot_eager")
    x = torch.randn(5, 3, 4)
    w = torch.randn(5, 3, 8)
    out_e, g_e = _fwd_bwd(eager, x, w)
    out_c, g_c = _fwd_bwd(compiled, x, w)
    assert int(compiled.stats.iterations.max()) > 1
    assert rel(out_c, out_e) < 1e-5
    for a, b in zip(g_c, g_e):
        assert rel(a, b) < 1e-4


@pytest.mark.slow
def test_inductor_compile_time_at_t300_and_no_parameter_mutation():
    """torch.compile (inductor) of the cell: compile + first fwd/bwd at T=300 well under 60 s."""
    torch.manual_seed(0)
    m = nn.LSTM(32, 128)
    eager = explicit_from_module(m)
    compiled = explicit_from_module(m).compile_step()
    before = {k: v.clone() for k, v in compiled.state_dict().items()}
    x, w = torch.randn(300, 32, 32), torch.randn(300, 32, 128)
    start = time.perf_counter()
    out_c, g_c = _fwd_bwd(compiled, x, w)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    out_e, g_e = _fwd_bwd(eager, x, w)
    assert rel(out_c, out_e) < 1e-5
    for a, b in zip(g_c, g_e):
        assert rel(a, b) < 1e-4
    assert all(torch.equal(v, compiled.state_dict()[k]) for k, v in before.items())
