"""Non-batch sizes at call time (issue 16 class 7): a transformed model accepts the sizes the
original accepts (image size of a fully convolutional model, sequence length of a transformer),
and where the capture fixed a size, the call is refused with a typed error that says so."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxwormhole as fw
from fxwormhole import zoo
from fxwormhole.errors import CaptureError

pytestmark = pytest.mark.usefixtures("one_thread")

OPEN = fw.WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.1, tol=1e-7, max_iter=80)


class AnySize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_a_convolutional_model_runs_at_another_image_size(front_end):
    """The wormhole's projection onto a feature map takes the destination's size at call time: the
    model transformed at 12x12 and called at 16x16 computes what the model transformed at 16x16
    (same parameters) computes, with open gates, and the original with closed ones."""
    torch.manual_seed(0)
    model = AnySize().eval()
    small, big = torch.randn(2, 3, 12, 12), torch.randn(2, 3, 16, 16)
    net = fw.transform(model, (small,), OPEN, front_end=front_end).eval()
    from fxwormhole.runtime.wormhole import Wormhole

    assert [m.proj.kind for m in net.modules() if isinstance(m, Wormhole)] == ["map"]
    torch.manual_seed(1)
    reference = fw.transform(model, (big,), OPEN, front_end=front_end).eval()
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        got, expected = net(big), reference(big)
    assert int(net.fixed_point_stats()["fixed_point_0"].iterations.max()) > 2  # the wormhole is open
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    closed = fw.transform(model, (small,), front_end=front_end)
    torch.testing.assert_close(closed(big), model(big), rtol=1e-5, atol=1e-6)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(torch.tanh(self.inp(x))))


def test_an_export_captured_transformer_runs_at_another_sequence_length():
    torch.manual_seed(0)
    model = Encoder().eval()
    net = fw.transform(model, (torch.randn(2, 5, 4),), OPEN, front_end="export").eval()
    for length in (3, 9):
        x = torch.randn(2, length, 4)
        with torch.no_grad():
            got = net(x)
        assert got.shape == (2, length, 3) and torch.isfinite(got).all()
    closed = fw.transform(model, (torch.randn(2, 5, 4),), front_end="export")
    x = torch.randn(3, 7, 4)
    torch.testing.assert_close(closed(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_size_the_capture_fixed_is_refused_with_a_typed_error():
    """A Python loop over x.shape[1] unrolls at capture: that length is part of the graph."""
    model = zoo.SeqLenLoop().eval()
    net = fw.transform(model, model.example_inputs(batch=3))
    x = model.example_inputs(batch=3)[0]
    longer = torch.randn(3, x.shape[1] + 2, *x.shape[2:])
    with pytest.raises(CaptureError, match=r"captured this graph for shape .*capture or transform again"):
        net(longer)
