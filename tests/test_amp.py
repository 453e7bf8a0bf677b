"""Mixed precision (issue 9): bf16 autocast training works; solver residuals and Anderson's small
linear solves stay in float32 (``torch.linalg.solve`` has no half-precision kernels and the bordered
least-squares system is badly conditioned)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxwormhole as fw
from fxwormhole.runtime import solvers

pytestmark = pytest.mark.usefixtures("one_thread")

NODE = "fixed_point_0"
# bf16 has an 8-bit mantissa: relative residuals bottom out near 1e-3, so ask for that, not 1e-5.
BF16_CONFIG = dict(gate_init=0.0, proj_init="normal", proj_std=0.1, solver="anderson", tol=2e-3, max_iter=60,
                   grad=fw.GradConfig(tol=2e-3, max_iter=60))


@pytest.fixture
def spy(monkeypatch):
    """Records the dtypes of every Anderson step's iterate and of every torch.linalg.solve call."""
    seen = {"state": [], "solve": []}
    step, solve = solvers.Anderson.step, torch.linalg.solve

    def spy_step(self, state, z, fz):
        seen["state"].append(z.dtype)
        return step(self, state, z, fz)

    def spy_solve(A, B, *args, **kwargs):
        seen["solve"].append((A.dtype, B.dtype))
        return solve(A, B, *args, **kwargs)

    monkeypatch.setattr(solvers.Anderson, "step", spy_step)
    monkeypatch.setattr(torch.linalg, "solve", spy_solve)
    return seen


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # a learnable 3-class rule
    return x, y


def test_bf16_autocast_training_with_sal_and_open_wormholes_learns(spy):
    x, y = _data()
    net = fw.transform(_mlp(), (x,), fw.WormholeConfig(wormholes=[("2", "0")], **BF16_CONFIG),
                       sal=fw.SALConfig(eta=1e-3))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses, iterations = [], []
    for _ in range(40):
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bf16 solve may stop a hair above tol: reported, not fatal
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)
                loss = F.cross_entropy(out, y)
            loss.backward()
        assert out.dtype == torch.bfloat16  # autocast really ran the layers in bf16
        for name, p in net.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(float(loss.detach()))
        stats = net.fixed_point_stats()[NODE]
        iterations.append(int(stats.iterations.max()))
        assert stats.residual.dtype == torch.float32
        assert stats.backward_residual.dtype == torch.float32
    assert max(iterations) > 1, "open wormholes: the fixed point must iterate"
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses
    assert spy["solve"], "Anderson solved no least-squares system"
    assert set(spy["solve"]) == {(torch.float32, torch.float32)}


def test_bf16_state_keeps_residuals_and_anderson_solves_in_float32(spy):
    """A model cast to bf16 (no autocast): the iterate is bf16, the solver's linear algebra is not.

    The wormhole is opened wider than BF16_CONFIG's (projection std 0.5): on a map that contracts
    tenfold per evaluation Anderson falls back to plain steps and would solve no system at all."""
    x, _ = _data(16)
    model = _mlp().to(torch.bfloat16)
    config = dict(BF16_CONFIG, proj_std=0.5)
    net = fw.transform(model, (x.bfloat16(),), fw.WormholeConfig(wormholes=[("2", "0")], **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = net(x.bfloat16())
    stats = net.fixed_point_stats()[NODE]
    assert out.dtype == torch.bfloat16
    assert torch.bfloat16 in spy["state"]
    assert spy["solve"] and set(spy["solve"]) == {(torch.float32, torch.float32)}
    assert stats.residual.dtype == torch.float32
    assert int(stats.iterations.max()) > 1
    # and the bf16 fixed point is the float32 one, to bf16 accuracy
    ref = fw.transform(model.float(), (x,), fw.WormholeConfig(wormholes=[("2", "0")], **config))
    ref.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    torch.testing.assert_close(out.float(), ref(x), rtol=0.05, atol=0.02)


def test_sal_probes_on_convolutions_back_propagate_under_autocast():
    """The SAL dense probe's custom backward runs outside autocast: it must accept bf16 gradients
    (regression: 'expected m1 and m2 to have the same dtype')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    x = torch.randn(4, 3, 6, 6)
    nets = [fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("2", "0")], **BF16_CONFIG),
                         sal=fw.SALConfig(eta=1e-2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    grads = []
    for net, amp in zip(nets, (True, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = net(x).float().square().mean()
            loss.backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name, g32 in grads[1].items():
        g16 = grads[0][name]
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all(), name
        # bf16 forward, float32 backward products: a few percent of the gradient's scale
        assert float((g16 - g32).norm()) <= 0.1 * float(g32.norm()) + 1e-6, name
