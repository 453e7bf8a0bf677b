"""``transform`` and ``capture`` leave no trace in state the user can see (issue 13, rows 1 and 2).

Passes that run the model (example values, the coupling check, shape propagation, the self-check)
must not move BatchNorm statistics or any buffer a forward mutates; and a
buffer the forward mutates in place must survive capture with either front end.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxwormhole as fw

pytestmark = pytest.mark.usefixtures("one_thread")


class BNConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        return self.fc(x.flatten(1))


def _buffers(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_transform_in_training_mode_moves_no_batchnorm_statistic(front_end):
    model = BNConvNet().train()
    x = torch.randn(4, 3, 6, 6)
    before = _buffers(model)
    net = fw.transform(model, (x,), front_end=front_end)
    assert _buffers(model).keys() == before.keys()
    for k, v in _buffers(model).items():
        assert torch.equal(v, before[k]), f"the user's {k} changed"
    state = net.state_dict()
    for k, v in before.items():
        assert torch.equal(state[k], v), f"transform moved {k}: {state[k]} vs the original's {v}"
    # one training step of each: same outputs and the same statistics afterwards
    assert torch.allclose(net(x), model(x), rtol=1e-5, atol=1e-6)
    state = net.state_dict()
    for k, v in model.named_buffers():
        assert torch.allclose(state[k].float(), v.float(), rtol=1e-5, atol=1e-7), k
    if front_end == "symbolic_trace":  # export bakes the capture-time mode (docs/limitations.md)
        model.eval(), net.eval()
        assert torch.equal(net(x), model(x)), "eval-mode outputs differ: the running statistics drifted"


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_capture_in_training_mode_moves_no_batchnorm_statistic(front_end):
    model = BNConvNet().train()
    gm = fw.capture(model, (torch.randn(4, 3, 6, 6),), front_end=front_end)
    for k, v in gm.named_buffers():
        assert torch.equal(v, dict(model.named_buffers())[k]), k


class CallCounter(nn.Module):
    """Counts its calls in a 0-d buffer mutated in place (symbolic_trace runs it once, records nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        self.calls.add_(1)
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_a_buffer_mutated_in_forward_survives_capture_and_keeps_counting():
    model, x = CallCounter(), torch.randn(3, 4)
    gm = fw.capture(model, (x,))
    assert "calls" in dict(gm.named_buffers()) and "calls" in gm.state_dict()
    assert "symbolic_trace" in gm.meta["fxwormhole"]["attempts"]  # refused, export took over
    net = fw.transform(model, (x,))
    assert "calls" in dict(net.named_buffers()) and "calls" in net.state_dict()
    assert int(net.state_dict()["calls"]) == 0 == int(model.calls), "transform ran the model visibly"
    torch.testing.assert_close(net(x), model(x))
    net(x)
    assert int(net.state_dict()["calls"]) == 2 and int(model.calls) == 1


def test_symbolic_trace_names_the_buffer_it_cannot_record():
    with pytest.raises(fw.CaptureError, match="'calls' in place"):
        fw.capture(CallCounter(), (torch.randn(3, 4),), front_end="symbolic_trace")
