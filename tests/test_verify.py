"""The self-check: ``transform``/``instrument`` verify after every pass that the rewritten graph, with the
wormhole injection forced to zero, still computes the original model, and name the first diverging node.

A deliberately broken pass (test-only) must be caught, named, and located at the node it perturbed,
both on the flat graph and inside a fused fixed-point body; legitimate configurations (a random
projection, temporal wormholes, dropout in training mode, both front ends) must pass.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import fxwormhole as fw
from fxwormhole.errors import VerificationError
from fxwormhole.passes._common import run_passes
from fxwormhole.passes.insert_wormholes import InsertWormholes
from fxwormhole.passes.plan_wormholes import PlanWormholes
from fxwormhole.passes.verify import PipelineCheck, injection_closed
from fxwormhole.passes.wrap_fixed_points import WrapFixedPoints

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(5, 6)


class TanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h))
        h = torch.tanh(self.fc3(h))
        return self.head(h)


def _tanh_off(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 1.01  # 1% off: far beyond the tolerance, small enough to look plausible


class PerturbNode(PassBase):
    """Test-only broken pass: node ``name`` (in the graph or inside a fixed-point body) computes tanh 1% off."""

    def __init__(self, name: str, inside: str | None = None) -> None:
        super().__init__()
        self.name, self.inside = name, inside

    def call(self, gm: fx.GraphModule) -> PassResult:
        g = gm.get_submodule(self.inside) if self.inside else gm
        node = next(n for n in g.graph.nodes if n.name == self.name)
        assert node.target is torch.tanh
        node.target = _tanh_off
        g.recompile()
        return PassResult(gm, True)


def _passes(config: fw.WormholeConfig):
    return [PlanWormholes(config), InsertWormholes(config), WrapFixedPoints(config, (X,))]


def test_a_broken_pass_is_caught_and_the_perturbed_node_named():
    config = fw.WormholeConfig(wormholes=[("fc3", "fc1")])
    gm = fw.capture(TanhMLP(), (X,))
    passes = _passes(config)
    passes.insert(2, PerturbNode("tanh_1"))  # between insert and wrap: the graph is still flat
    with pytest.raises(VerificationError) as info:
        run_passes(gm, passes, check=PipelineCheck((X,)))
    err = info.value
    assert err.pass_name == "PerturbNode" and err.node == "tanh_1"
    assert "'tanh_1'" in str(err) and "PerturbNode" in str(err) and "verify=False" in str(err)
    assert err.error == pytest.approx(0.01 * err.scale, rel=0.2)  # the 1% the pass introduced


def test_a_node_broken_inside_a_fused_body_is_named():
    config = fw.WormholeConfig(wormholes=[("fc3", "fc1")], proj_init="normal", proj_std=0.3, gate_init=0.0)
    gm = fw.capture(TanhMLP(), (X,))
    with pytest.raises(VerificationError) as info:
        run_passes(gm, [*_passes(config), PerturbNode("tanh_2", inside="fixed_point_0.body")], check=PipelineCheck((X,)))
    assert info.value.node == "tanh_2" and info.value.pass_name == "PerturbNode"


def _break(monkeypatch, pass_class: type, node: str) -> None:
    """Make a real pass perturb ``node`` after doing its work."""
    original = pass_class.call

    def broken(self, gm):
        result = original(self, gm)
        PerturbNode(node).call(gm)
        return result

    monkeypatch.setattr(pass_class, "call", broken)


def test_transform_catches_a_broken_real_pass_and_verify_false_skips_the_check(monkeypatch):
    model = TanhMLP()
    _break(monkeypatch, InsertWormholes, "tanh")
    config = fw.WormholeConfig(wormholes=[("fc3", "fc1")])
    with pytest.raises(VerificationError) as info:
        fw.transform(model, (X,), config)
    assert info.value.pass_name == "InsertWormholes" and info.value.node == "tanh"
    net = fw.transform(model, (X,), config, verify=False)  # the user can skip the check ...
    assert not torch.allclose(net(X), model(X))  # ... and then gets the (broken) result


def test_a_pass_that_leaves_a_node_without_shape_is_caught():
    class AddsBareNode(PassBase):
        def call(self, gm):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                gm.graph.call_function(torch.neg, (out.args[0],))
            return PassResult(gm, True)

    gm = fw.capture(TanhMLP(), (X,))
    with pytest.raises(VerificationError, match="meta\\['val'\\]"):
        run_passes(gm, [AddsBareNode()], check=PipelineCheck((X,)))


def test_closed_injection_restores_the_projections():
    net = fw.transform(TanhMLP(), (X,), fw.WormholeConfig(wormholes=[("fc3", "fc1")], proj_init="normal"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with injection_closed(net):
        assert all(float(p.detach().abs().max()) == 0 for n, p in net.named_parameters() if ".proj." in n)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


class DropoutCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.drop, self.fc = nn.Dropout(0.3), nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = self.drop(torch.relu(self.c1(x)))
        x = self.drop(torch.relu(self.c2(x)))
        x = torch.relu(self.c3(x))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
@pytest.mark.parametrize("proj_init", ["zero", "normal"])
def test_legitimate_rewrites_pass_the_check_in_training_mode(front_end, proj_init):
    """Random projections (open wormholes) and dropout in training mode are no false alarms."""
    config = fw.WormholeConfig(proj_init=proj_init, proj_std=0.5, gate_init=0.0)
    fw.transform(DropoutCNN().train(), (torch.randn(4, 2, 5, 5),), config, front_end=front_end)


def test_temporal_wormholes_with_a_random_projection_pass_the_check():
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 6, num_layers=2, batch_first=True, dropout=0.2), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    config = fw.WormholeConfig(proj_init="normal", proj_std=0.5, gate_init=0.0, solver="picard")
    for mode in ("train", "eval"):
        getattr(fw.transform(getattr(Tagger(), mode)(), (torch.randn(4, 5, 3),), config), mode)()


def test_instrument_verifies_too(monkeypatch):
    from fxwormhole.passes.sensitivity_insert import SensitivityInsert

    _break(monkeypatch, SensitivityInsert, "tanh_2")
    with pytest.raises(VerificationError, match="instrument self-check") as info:
        fw.instrument(TanhMLP(), (X,), fw.SALConfig())
    assert info.value.node == "tanh_2"


class InPlaceScan(nn.Module):
    """The RWKV pattern in miniature: an output buffer filled step by step in place (``out[:, t] = s``,
    ``aten.copy_`` in the export graph), read after the loop, inside a wormhole span (post -> inp)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp, self.key, self.recept = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.post, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        k, r = self.key(h), torch.sigmoid(self.recept(h))
        out = torch.zeros_like(k)
        state = torch.zeros_like(k[:, 0])
        for t in range(x.shape[1]):  # symbolic_trace cannot loop over a size: export captures it
            state = 0.5 * state + k[:, t]
            out[:, t] = state
        return self.head(torch.tanh(self.post(r * out)))


def test_a_buffer_filled_in_place_inside_a_span_is_never_silently_wrong():
    """The defect class of the transformers RWKV model: the in-place writes are no data edges, so a
    fusion can leave them outside the fixed point. transform must equal the original or say so."""
    model, x = InPlaceScan().eval(), torch.randn(2, 4, 6)
    try:
        net = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("post", "inp")]))
    except VerificationError as err:
        assert err.node == "mul_4" and err.pass_name == "WrapFixedPoints"  # r * out reads the buffer
    else:
        torch.testing.assert_close(net(x), model(x))
