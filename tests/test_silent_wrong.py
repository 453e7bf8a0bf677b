"""In-place updates must keep their order through the wrap pass (issue 16, the RWKV defect).

RWKV's WKV recurrence fills a buffer in a time loop, ``out = zeros_like(k); out[:, t] = ...``,
and then reads it (``r * out``). torch.export records each ``out[:, t] = v`` as
``aten.copy_(select(slice(out)), v)``: a node without users, whose only link to the read is the node
order. The wrap pass fused the data-flow cycle (the allocation and the read) and left the updates
outside, to run after the fixed point: the body read an all-zero buffer. ``transform`` returned a
model off by O(1) while the fixed point reported converging in one iteration.

Each model here is the smallest plain-PyTorch form of one way this happens; every test compares
the transformed model with the original at init (closed gates, zero projections: they must agree).
"""
import pytest
import torch
import torch.nn as nn

import fxwormhole
from fxwormhole.errors import PlacementError

pytestmark = pytest.mark.usefixtures("one_thread")

SPAN = fxwormhole.WormholeConfig(wormholes=[("fc2", "fc1")])


class _ThreeLayers(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class ScanIntoBuffer(_ThreeLayers):
    """RWKV's pattern: a time loop writes its steps into a preallocated buffer, read afterwards."""

    def forward(self, x):  # x: (B, T, d)
        h = torch.tanh(self.fc1(x))
        out = torch.zeros_like(h)
        for t in range(h.shape[1]):
            out[:, t] = torch.tanh(h[:, t]) * 2  # export: aten.copy_ into a view of `out`
        return self.fc3(torch.tanh(self.fc2(out)))


class AccumulateInPlace(_ThreeLayers):
    """The same with a tensor method: symbolic_trace records ``add_`` as a node without users."""

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        acc = torch.zeros_like(h)
        acc.add_(h * 3)
        return self.fc3(torch.tanh(self.fc2(acc)))


class UpdateOutsideSpan(_ThreeLayers):
    """An update outside the span, read inside it: the fused node must run after the update.

    The update does not depend on the span, so it stays outside; only the node order puts it
    before the read, and re-sorting the graph after fusion must keep that order. (symbolic_trace
    only: export rewires the read to the ``add_`` node's result, a data edge.)
    """

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        bias = x * 0.5
        bias.add_(torch.sin(x))  # in place, after fc1, before the read below
        return self.fc3(torch.tanh(self.fc2(h + bias)))


class UpdateOutsideTensorInsideSpan(_ThreeLayers):
    """The span updates in place a tensor allocated before it: the body would repeat the update."""

    def forward(self, x):
        scale = x * 0 + 1  # computed from the unmodulated input: outside the span
        h = torch.tanh(self.fc1(x))
        scale.mul_(h)
        return self.fc3(torch.tanh(self.fc2(h + scale)))


def _assert_equals_original(model: nn.Module, x: torch.Tensor, front_end: str):
    model.eval()
    with torch.no_grad():
        expected = model(x)
        net = fxwormhole.transform(model, (x,), SPAN, front_end=front_end)
        got = net(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    return net


def _fused_ops(net) -> list[str]:
    return [str(n.target) for n in net.fixed_point_0.body.graph.nodes if n.op == "call_function"]


def test_buffer_filled_in_a_loop_equals_original_and_its_updates_are_in_the_body():
    net = _assert_equals_original(ScanIntoBuffer(), torch.randn(4, 3, 8), "export")
    # the three step updates belong to the fixed point, not to the graph after it
    assert _fused_ops(net).count("aten.copy_.default") == 3
    assert not any(str(n.target) == "aten.copy_.default" for n in net.graph.nodes)


def test_in_place_method_equals_original():
    net = _assert_equals_original(AccumulateInPlace(), torch.randn(4, 8), "symbolic_trace")
    assert any(n.op == "call_method" and n.target == "add_" for n in net.fixed_point_0.body.graph.nodes)


def test_update_outside_the_span_runs_before_the_fixed_point():
    _assert_equals_original(UpdateOutsideSpan(), torch.randn(4, 8), "symbolic_trace")


def test_span_updating_an_outside_tensor_is_refused_with_the_node_names():
    model = UpdateOutsideTensorInsideSpan().eval()
    with pytest.raises(PlacementError, match=r"'mul_' updates 'add' in place"):
        fxwormhole.transform(model, (torch.randn(4, 8),), SPAN, front_end="symbolic_trace")


@pytest.mark.slow  # about 8 s, mostly torch.export; the models above catch the same defect fast
def test_transformers_rwkv_equals_original_at_init():
    transformers = pytest.importorskip("transformers")
    config = transformers.RwkvConfig(vocab_size=50, context_length=16, hidden_size=16, num_hidden_layers=2,
                                     attention_hidden_size=16, intermediate_size=32, use_cache=False)
    model = transformers.RwkvModel(config).eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        net = fxwormhole.transform(model, (ids,))  # the default config: "auto" span, closed gates
        got = net(ids)
    got = got[0] if isinstance(got, (tuple, list)) else getattr(got, "last_hidden_state", got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
