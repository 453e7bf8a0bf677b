"""A fixed point's inputs never share storage (passes/separate_aliases.py, issue 16): torch.while_loop
refuses aliasing inputs, which stopped compile and export of nn.Transformer with a mask and Llama."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxwormhole as fw
from fxwormhole.passes._mutation import alias_roots
from fxwormhole.runtime.fixed_point import FixedPoint

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoViews(nn.Module):
    """The body reads a mask and a view of it (as nn.Transformer's attention reads its mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, m):
        row = m.unsqueeze(0)
        h = torch.tanh(self.fc1(x) + m)
        h = torch.tanh(self.fc2(h) * row[0])
        return self.fc4(torch.tanh(self.fc3(h)))


def _net(front_end: str):
    torch.manual_seed(0)
    model, x, m = TwoViews().eval(), torch.randn(4, 8), torch.randn(4, 8)
    cfg = fw.WormholeConfig(wormholes=[("fc3", "fc1")], gate_init=0.0, proj_init="normal", proj_std=0.1)
    return model, (x, m), fw.transform(model, (x, m), cfg, front_end=front_end).eval()


def _fixed_point_args(net):
    (node,) = [n for n in net.graph.nodes if n.op == "call_module" and isinstance(net.get_submodule(n.target), FixedPoint)]
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_aliased_inputs_of_a_fixed_point_are_passed_as_copies(front_end):
    model, inputs, net = _net(front_end)
    roots = alias_roots(net)
    args = _fixed_point_args(net)
    assert len(args) >= 3  # x, m and the view of m
    assert len({roots[a] for a in args}) == len(args)
    assert any(a.target is torch.clone for a in args)
    closed = fw.transform(model, inputs, front_end=front_end).eval()
    with torch.no_grad():
        torch.testing.assert_close(closed(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_fixed_point_with_aliased_inputs_exports(tmp_path):
    _, inputs, net = _net("export")
    with torch.no_grad():
        want = net(*inputs)
    path = fw.export(net, inputs, tmp_path / "two_views.pt2")
    with torch.no_grad():
        torch.testing.assert_close(fw.export.load(path)(*inputs), want, rtol=1e-4, atol=1e-6)
