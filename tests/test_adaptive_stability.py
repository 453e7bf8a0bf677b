"""The contraction regulariser and the recommended configuration for active feedback (issue 17, item 1).

References: closed forms for a scalar fixed point (value and gradient of loss + penalty); the same
model without the regulariser (the forward is unchanged); the original model trained on the same
batches from the same weights (accuracy), on scikit-learn's digits.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole
from fxwormhole import GradConfig, WormholeConfig
from fxwormhole.errors import ConfigError
from fxwormhole.runtime.cycle_penalties import PenaltyWeights, add_cycle_penalties, contraction_term
from fxwormhole.runtime.fixed_point import FixedPoint

from helpers import rel

pytestmark = pytest.mark.usefixtures("one_thread")


class Scalar(nn.Module):
    """``T(z) = a z + b x``: ``z* = b x / (1 - a)``, ``J_T = a`` (one state entry: ``||J v||^2 = a^2``)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, x):
        return self.a * z + self.b * x


@pytest.mark.parametrize("forward_ad", [True, False])
@pytest.mark.parametrize("cost", [0.0, 0.4])
def test_penalties_and_their_gradients_match_the_closed_form(forward_ad, cost):
    """Loss ``sum(y*) + w a^2 + cost |b|``: the contraction term is ``||J v||^2 = a^2``; the compute
    cost ``||T(0)|| / ||x|| = |b x| / |x| = |b|``."""
    a, b, w = 0.6, 1.5, 0.7
    body = Scalar(a, b)
    fp = FixedPoint(body, None, solver="picard", tol=1e-13, max_iter=500, grad=GradConfig(tol=1e-13, max_iter=500))
    fp.penalty_weights = PenaltyWeights(contraction=w, compute_cost=cost)
    fp.register_forward_hook(add_cycle_penalties)
    if not forward_ad:
        fp._no_forward_ad = True  # the finite-difference fallback (exact for a linear map, up to rounding)
    x = torch.randn(5, 1, dtype=torch.float64)
    y = fp(x)
    assert rel(y, b * x / (1 - a)) < 1e-10  # the forward is the fixed point, unchanged by the hook
    assert torch.allclose(fp.penalties["contraction"], torch.full((5,), a * a, dtype=torch.float64), atol=1e-8)
    if cost:
        assert torch.allclose(fp.penalties["compute_cost"], torch.full((5,), b, dtype=torch.float64), atol=1e-10)
    y.sum().backward()
    s = float(x.sum())
    assert abs(float(body.a.grad) - (b * s / (1 - a) ** 2 + 2 * w * a)) < 1e-6
    assert abs(float(body.b.grad) - (s / (1 - a) + cost)) < 1e-6


def test_contraction_term_of_an_orthogonal_linear_cycle_is_its_gain_squared():
    """``T(z) = c Q z + x`` with Q orthogonal: ``||J v|| = c`` for every unit v, per sample."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    lin = nn.Linear(6, 6, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(0.4 * q)
    body = type("B", (nn.Module,), {"forward": lambda self, z, x: self.lin(z) + x})()
    body.lin = lin
    fp = FixedPoint(body, None, solver="picard", tol=1e-12, max_iter=200)
    x = torch.randn(7, 6, dtype=torch.float64)
    term = contraction_term(fp, (x,), fp(x))
    assert term.shape == (7,)
    assert torch.allclose(term, torch.full((7,), 0.16, dtype=torch.float64), atol=1e-12)


class UserCNN(nn.Module):
    """The issue's user-style 3-conv CNN for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.conv3, self.fc = nn.Conv2d(32, 32, 3, padding=1), nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(F.relu(self.conv3(x)).flatten(1))


def test_the_regulariser_leaves_the_forward_unchanged_and_only_trains():
    torch.manual_seed(0)
    model, x = UserCNN().double(), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    nets = []
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        nets.append(fxwormhole.transform(model, (x,), WormholeConfig.active(wormholes=[("conv3", "conv1")], contraction=weight)))
    plain, reg = nets
    assert rel(reg.train()(x), plain.train()(x)) == 0.0
    assert float(reg.fixed_point_0.penalties["contraction"].mean()) > 0
    reg.fixed_point_0.penalties = None
    with torch.no_grad():
        reg(x)
    reg.eval()(x)
    assert reg.fixed_point_0.penalties is None  # no extra work without a backward to feed


def test_active_config_fields_and_validation():
    cfg = WormholeConfig.active(wormholes=[("b", "a")])
    assert cfg.contraction == 1.0 and cfg.gate == "input" and cfg.proj_init == "normal"
    assert WormholeConfig().contraction == 0.0  # off unless asked: a closed wormhole still costs one evaluation
    assert cfg.compute_cost == 0.0
    for name in ("contraction", "compute_cost"):
        with pytest.raises(ConfigError, match=name):
            WormholeConfig(**{name: -1.0})


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _train(make_net, seed: int, steps: int, data) -> tuple[float, int]:
    """Test accuracy and the number of steps on which any sample's forward solve did not converge."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    net = make_net(UserCNN())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(100 + seed)
    failed = 0
    for _ in range(steps):
        idx = torch.randint(0, len(ytr), (32,), generator=batches)
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = getattr(net, "fixed_point_stats", dict)()
        failed += any(bool((s.status != 0).any()) for s in stats.values() if s is not None)
    net.eval()
    with torch.no_grad():
        return float((net(xte).argmax(-1) == yte).float().mean()), failed


def test_recommended_config_trains_the_user_cnn_as_well_as_the_original_without_losing_contraction():
    """A small version of docs/adaptive_depth.md's stability table: 2 seeds x 60 steps."""
    pytest.importorskip("sklearn")
    data = _digits()

    def wormholes(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about
            return fxwormhole.transform(model, (data[0][:4],), WormholeConfig.active(wormholes=[("conv3", "conv1")]))

    original = [_train(lambda m: m, seed, 60, data) for seed in (0, 1)]
    active = [_train(wormholes, seed, 60, data) for seed in (0, 1)]
    assert all(failed == 0 for _, failed in active), active
    mean = lambda runs: sum(acc for acc, _ in runs) / len(runs)  # noqa: E731
    assert mean(original) > 0.8  # the task is learnt in 60 steps ...
    assert mean(active) >= mean(original) - 0.01, (original, active)  # ... and as well with wormholes
