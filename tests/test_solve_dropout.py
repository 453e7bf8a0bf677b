"""Dropout inside a fixed point keeps one mask per forward call (passes/solve_dropout.py, issue 16).

A training-mode solve with ordinary dropout chases a new mask at every iteration; with the pass the
body is a function of its arguments within one call, the solve converges, the next call draws new
masks, and at initialisation the result still equals the original model under the same seed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole as fw
from fxwormhole.runtime.fixed_point import FixedPoint
from fxwormhole.runtime.gradients import make_grad
from fxwormhole.runtime.solve_dropout import SolveAttention, SolveDropout
from fxwormhole.runtime.stats import CONVERGED

pytestmark = pytest.mark.usefixtures("one_thread")


class DropMLP(nn.Module):
    """Dropout between every pair of layers, as a module, a functional call and a channel dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(16, 16) for _ in range(4))
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = self.drop(torch.tanh(self.fc1(x)))
        h = F.dropout(torch.tanh(self.fc2(h)), 0.2, self.training)
        h = F.dropout1d(torch.tanh(self.fc3(h)).unsqueeze(-1), 0.25, self.training).squeeze(-1)
        return self.fc4(h)


def _net(front_end: str, *, closed: bool = False):
    torch.manual_seed(0)
    model = DropMLP().train()
    x = torch.randn(6, 16)
    opened = {} if closed else dict(gate_init=0.0, proj_init="normal", proj_std=0.1)
    cfg = fw.WormholeConfig(wormholes=[("fc4", "fc1")], solver=fw.SolverConfig(tol=1e-6, max_iter=100), **opened)
    return model, x, fw.transform(model, (x,), cfg, front_end=front_end)


def _assert_equal_under_one_seed(model, net, x, seed: int = 5):
    """Training mode, one seed: the same dropout draws give the original's outputs."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        want = model(x)
        torch.manual_seed(seed)
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_every_dropout_in_the_body_becomes_a_solve_dropout(front_end):
    _, _, net = _net(front_end)
    (fp,) = net.fixed_point_modules().values()
    found = [m for m in fp.body.modules() if isinstance(m, SolveDropout)]
    assert sorted((m.p, m.feature) for m in found) == [(0.2, False), (0.25, True), (0.3, False)]
    assert all(n.target not in (torch.ops.aten.dropout.default, F.dropout) for n in fp.body.graph.nodes)


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_a_training_solve_converges_with_one_mask_and_the_next_call_draws_new_ones(front_end):
    _, x, net = _net(front_end)
    net.train()
    (fp,) = net.fixed_point_modules().values()
    seen = []
    fp.body.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    torch.manual_seed(1)
    out1 = net(x)
    stats = fp.stats
    assert bool((stats.status == CONVERGED).all()) and int(stats.iterations.max()) > 2
    # the body is a function of its arguments within the call: its last evaluation, repeated
    args, last = seen[-1]
    with torch.no_grad():
        again = fp.body(*args)
    assert all(torch.equal(a, b) for a, b in zip(again, last))
    out1.pow(2).mean().backward()
    assert bool((fp.stats.backward_status == CONVERGED).all())
    # the next call draws new masks (and, under the same seed, the same ones again)
    torch.manual_seed(2)
    out2 = net(x)
    torch.manual_seed(1)
    out3 = net(x)
    assert not torch.allclose(out1, out2)
    torch.testing.assert_close(out3, out1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_closed_gates_in_training_mode_equal_the_original_under_one_seed(front_end):
    model, x, net = _net(front_end, closed=True)
    net.train()
    _assert_equal_under_one_seed(model, net, x)


def test_eval_mode_is_the_identity_and_the_original_model_is_untouched():
    model, x, net = _net("symbolic_trace")
    assert model.drop.__class__ is nn.Dropout
    net.eval()
    with torch.no_grad():
        y1, y2 = net(x), net(x)
    assert torch.equal(y1, y2)
    layer = SolveDropout(0.5).eval()
    assert layer(x) is x


def test_the_implicit_gradient_is_the_gradient_of_the_map_with_the_masks_it_solved():
    """Float64: implicit gradients of a training-mode call equal those of back-propagation through
    the unrolled solve of the same call (same seed, so the same masks)."""
    model, x, net = _net("symbolic_trace")
    net = net.double().train()
    x = x.double()
    (fp,) = net.fixed_point_modules().values()

    def grads(mode):
        fp.grad_strategy = make_grad(fw.GradConfig(mode=mode, tol=1e-12, max_iter=500))
        fp.solver_config = fw.SolverConfig(name="picard", tol=1e-12, max_iter=500, halting="batch")
        net.zero_grad()
        torch.manual_seed(3)
        net(x).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    implicit, unrolled = grads("implicit"), grads("unrolled")
    assert set(implicit) == set(unrolled)
    # each within 1e-5 of its largest entry (eval mode, without dropout, agrees to 4e-7 at this tol)
    worst = max(float((implicit[k] - unrolled[k]).abs().max() / unrolled[k].abs().max()) for k in unrolled)
    assert worst < 1e-5
    assert isinstance(fp, FixedPoint)


class DropAttention(nn.Module):
    """Attention with dropout on its weights, and a dropout on a permuted (non-contiguous) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.qkv, self.out, self.head = nn.Linear(8, 16), nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):  # x: [B, T, 8]
        h = self.inp(x)
        qkv = self.qkv(h).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # [3, B, heads, T, 8]
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2 if self.training else 0.0, is_causal=True)
        a = a.transpose(1, 2).flatten(2)
        h = h + F.dropout(self.out(a).transpose(0, 1), 0.3, self.training).transpose(0, 1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_attention_dropout_and_permuted_layouts_match_the_original_and_hold_within_a_call(front_end):
    torch.manual_seed(0)
    model, x = DropAttention().train(), torch.randn(3, 5, 8)
    closed = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("head", "qkv")]), front_end=front_end).train()
    (fp,) = closed.fixed_point_modules().values()
    assert any(isinstance(m, SolveAttention) for m in fp.body.modules())
    _assert_equal_under_one_seed(model, closed, x)
    opened = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("head", "qkv")], gate_init=0.0, proj_init="normal",
                                                         proj_std=0.1), front_end=front_end).train()
    (fp,) = opened.fixed_point_modules().values()
    opened(x)
    assert bool((fp.stats.status == CONVERGED).all()) and int(fp.stats.iterations.max()) > 2
