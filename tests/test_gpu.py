"""GPU checks (``make gpu-check``; skipped without CUDA): compiled equals eager on the device,
the compiled loops read the host once per block and never inside one, bf16 autocast trains.

The sync test uses ``torch.cuda.set_sync_debug_mode``: every device-to-host synchronisation in
the compiled solve is reported, so hidden ones (``.item()``, a LAPACK error check, boolean
indexing) would show up next to the driver's one read per block.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole
from fxwormhole import WormholeConfig, zoo
from fxwormhole.config import GradConfig, SolverConfig
from fxwormhole.runtime.fixed_point import FixedPoint

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


class ScaledBody(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(d, d))
        self.W = nn.Parameter(q)
        self.U = nn.Linear(d, d)

    def forward(self, z, x, s):
        return s * torch.tanh(z @ self.W.T) + self.U(x)


def _easy_hard(n=64, d=64, dtype=torch.float32):
    x = torch.randn(n, d, device=CUDA, dtype=dtype)
    s = torch.full((n, 1), 1e-4, device=CUDA, dtype=dtype)
    s[::8] = 0.9
    return x, s


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_compiled_gradients_equal_eager_on_cuda(solver):
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = ScaledBody().to(CUDA, torch.float64)
    x, s = _easy_hard(dtype=torch.float64)
    node = FixedPoint(body, solver=SolverConfig(name=solver, tol=1e-10, max_iter=300),
                      grad=GradConfig(tol=1e-10, max_iter=300))
    xr = x.clone().requires_grad_()
    wrt = [xr, *node.parameters()]
    y = node(xr, s)
    g = torch.randn_like(y)
    want = torch.autograd.grad(y, wrt, g)
    eager_iters = node.stats.iterations.clone()
    compiled = fxwormhole.compile(node, example_inputs=(x, s))
    snap = {k: v.clone() for k, v in node.state_dict().items()}
    got = torch.autograd.grad(compiled(xr, s), wrt, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert torch.equal(node.stats.iterations, eager_iters)
    assert all(torch.equal(v, snap[k]) for k, v in node.state_dict().items())


def test_compiled_halting_syncs_once_per_block_not_per_iteration():
    torch._dynamo.reset()
    torch.manual_seed(1)
    body = ScaledBody().to(CUDA)
    x, s = _easy_hard(n=256)
    node = FixedPoint(body, solver=SolverConfig(name="anderson", tol=1e-5, max_iter=200))
    compiled = fxwormhole.compile(node, example_inputs=(x, s))
    with torch.no_grad():
        compiled(x, s)  # compile
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                compiled(x, s)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    work = node.stats.forward_work
    iterations = int(node.stats.iterations.max())
    assert iterations > 10
    assert len(syncs) <= work.host_reads == work.checks, [str(w.message) for w in syncs][:5]
    assert work.checks < iterations / 2, "one read per block of evaluations, none per evaluation"


def test_bf16_autocast_training_on_cuda():
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = zoo.MLP(in_features=32, hidden=64, depth=3, out_features=4).to(CUDA)
    x = torch.randn(128, 32, device=CUDA)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    net = fxwormhole.transform(model, (x,), WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.2,
                                                           tol=2e-3, max_iter=60, grad=GradConfig(tol=2e-3)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    assert int(net.fixed_point_stats()["fixed_point_0"].iterations.max()) > 1
