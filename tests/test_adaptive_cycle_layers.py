"""Dropout and BatchNorm inside a wormhole cycle behave like the original model (issue 17, item 2).

References: the original model run with the same dropout mask; the unrolled gradient (float64) with
the same mask; ``nn.BatchNorm``'s own running update applied once per forward to the converged
iterate's input.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxwormhole
from fxwormhole import WormholeConfig
from fxwormhole.runtime.cycle_layers import CycleBatchNorm
from fxwormhole.runtime.solve_dropout import SolveDropout

from helpers import rel

pytestmark = pytest.mark.usefixtures("one_thread")


class DropNet(nn.Module):
    """fc1 -> relu -> dropout -> fc2 -> relu -> head; the wormhole fc2 -> fc1 spans the dropout."""

    def __init__(self, functional: bool = False, d: int = 12) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.drop = nn.Dropout(0.3)
        self.functional = functional

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = F.dropout(h, 0.3, self.training) if self.functional else self.drop(h)
        return self.head(F.relu(self.fc2(h)))


class MaskedDropNet(DropNet):
    """The original model with its dropout replaced by a given mask (the reference)."""

    def __init__(self, net: DropNet, mask: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.fc1, self.fc2, self.head, self.mask = net.fc1, net.fc2, net.head, mask

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)) * self.mask)))


OPEN = dict(wormholes=[("fc2", "fc1")], gate="input", gate_init=0.0, proj_init="normal", proj_std=0.3,
            solver="picard", tol=1e-9, max_iter=200)


def _masks(net: nn.Module) -> list:
    """Record every mask the net draws: a SolveDropout's noise each time it is drawn afresh (the
    solve's later evaluations reuse it, so they add nothing)."""
    drawn: list = []
    seen: list = []

    def record(mod, args, out):
        if mod._noise is not None and not any(mod._noise is t for t in seen):
            seen.append(mod._noise)
            drawn.append(mod._noise.detach().clone())

    for m in net.modules():
        if isinstance(m, SolveDropout):
            m.register_forward_hook(record)
    return drawn


@pytest.mark.parametrize("functional", [False, True])
def test_closed_wormhole_in_training_equals_the_original_with_the_same_mask(functional):
    torch.manual_seed(0)
    model, x = DropNet(functional).double(), torch.randn(16, 12, dtype=torch.float64)
    net = fxwormhole.transform(model, (x,), WormholeConfig(wormholes=[("fc2", "fc1")]))
    net.train()
    drawn = _masks(net)
    out = net(x)
    assert len(drawn) == 1 and drawn[0].shape == (16, 12)
    keep = (drawn[0] != 0).double()
    # the mask is a dropout mask: zeros, or 1 / (1 - p) where kept, about 70 % kept
    assert torch.allclose(drawn[0], keep / 0.7)
    assert 0.5 < float(keep.mean()) < 0.9
    ref = MaskedDropNet(model, drawn[0])(x)
    assert rel(out, ref) < 1e-12
    net(x)
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])  # a new mask per forward
    net.eval()
    model.eval()
    assert rel(net(x), model(x)) < 1e-12  # eval: no dropout, the original model


def test_open_wormhole_converges_in_training_mode_and_its_gradient_matches_the_unrolled_one():
    torch.manual_seed(0)
    model, x = DropNet().double(), torch.randn(16, 12, dtype=torch.float64)
    grads, outs = [], []
    for mode in ("implicit", "unrolled"):
        torch.manual_seed(2)  # the same random projection in both models
        net = fxwormhole.transform(model, (x,), WormholeConfig(**OPEN, grad=mode))
        net.train()
        torch.manual_seed(1)  # the same mask in both runs
        out = net(x)
        st = net.fixed_point_stats()["fixed_point_0"]
        assert bool((st.status == 0).all()), "a sample did not converge in training mode"
        assert int(st.iterations.max()) < OPEN["max_iter"]
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
    assert rel(outs[0], outs[1]) < 1e-8
    for k in grads[1]:
        assert rel(grads[0][k], grads[1][k]) < 1e-6, k


def test_channel_dropout_draws_one_mask_per_channel():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.drop = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1), nn.Dropout2d(0.5)

        def forward(self, x):
            return self.c2(self.drop(torch.relu(self.c1(x))))

    torch.manual_seed(0)
    model, x = Conv(), torch.randn(8, 2, 5, 5)
    net = fxwormhole.transform(model, (x,), WormholeConfig(wormholes=[("c2", "c1")]))
    net.train()
    drawn = _masks(net)
    out = net(x)
    assert drawn[0].shape == (8, 4, 1, 1)
    ref = model.c2(torch.relu(model.c1(x)) * drawn[0])
    assert rel(out, ref) < 1e-6


class BNNet(nn.Module):
    """fc1 -> BatchNorm1d -> relu -> fc2 -> relu -> head; the wormhole fc2 -> fc1 spans the BatchNorm."""

    def __init__(self, momentum: float | None = 0.1, d: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.bn = nn.BatchNorm1d(d, momentum=momentum)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.bn(self.fc1(x))))))


def test_batch_norm_updates_its_statistics_once_per_forward_from_the_converged_iterate():
    torch.manual_seed(0)
    model = BNNet().double()
    x = torch.randn(32, 10, dtype=torch.float64)
    net = fxwormhole.transform(model, (x,), WormholeConfig(**OPEN))
    bns = [m for m in net.modules() if isinstance(m, CycleBatchNorm)]
    assert len(bns) == 1
    seen: list = []
    bns[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    reference = copy.deepcopy(model.bn).train()  # nn.BatchNorm1d, the original's statistics
    net.train()
    for k in range(3):
        xk = x + 0.1 * k
        seen.clear()
        net(xk)
        its = int(net.fixed_point_stats()["fixed_point_0"].iterations.max())
        assert its > 3 and len(seen) >= its  # the body ran many times in this forward ...
        reference(seen[-1])                   # ... the reference updates once, from the last iterate
    assert int(bns[0].num_batches_tracked) == 3
    assert rel(bns[0].running_mean, reference.running_mean) < 1e-12
    assert rel(bns[0].running_var, reference.running_var) < 1e-12
    # eval mode: the running statistics, as the original BatchNorm in eval mode
    net.eval()
    ref_model = copy.deepcopy(model).eval()
    ref_model.bn.load_state_dict(reference.state_dict())
    closed = fxwormhole.transform(ref_model, (x,), WormholeConfig(wormholes=[("fc2", "fc1")])).eval()
    assert rel(closed(x), ref_model(x)) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cycle_batch_norm_commits_as_batch_norm_would_once(momentum):
    """Unit reference: several evaluations then one commit == nn.BatchNorm2d on the last input, once.
    (momentum=None, the cumulative average, cannot be captured by transform: torch's BatchNorm
    reads num_batches_tracked as a Python number.)"""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, momentum=momentum).double()
    reference = copy.deepcopy(bn)
    cycle = CycleBatchNorm.replacing(copy.deepcopy(bn))
    for k in range(3):
        iterates = [torch.randn(4, 3, 5, 5, dtype=torch.float64) * (1 + k) + j for j in range(4)]
        for x in iterates:
            out = cycle(x)
        cycle.commit()
        cycle.commit()  # a second commit without a new evaluation changes nothing
        expected = reference(iterates[-1])
        assert rel(out, expected) < 1e-12  # normalised with the batch's statistics, as BatchNorm
    assert int(cycle.num_batches_tracked) == 3
    assert rel(cycle.running_mean, reference.running_mean) < 1e-12
    assert rel(cycle.running_var, reference.running_var) < 1e-12
    cycle.eval(), reference.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert rel(cycle(x), reference(x)) < 1e-12


def test_batch_norm_parameters_are_shared_and_the_state_dict_keys_kept():
    model = BNNet()
    x = torch.randn(8, 10)
    net = fxwormhole.transform(model, (x,), WormholeConfig(wormholes=[("fc2", "fc1")]))
    keys = set(net.state_dict())
    assert any(k.endswith("bn.running_mean") for k in keys) and any(k.endswith("bn.weight") for k in keys)
    bn = next(m for m in net.modules() if isinstance(m, CycleBatchNorm))
    assert isinstance(bn, nn.BatchNorm1d)  # user code that checks the kind still finds it
    with pytest.raises(ValueError, match="2D or 3D"):
        bn.eval()(torch.randn(2, 10, 3, 3))  # BatchNorm1d's input check is kept
