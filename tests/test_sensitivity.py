"""Probes: outputs unchanged, user model untouched, statistics, state_dict, annotations, nesting."""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn


from fxwormhole.capture import capture
from fxwormhole.config import SALConfig
from fxwormhole.errors import ConfigError, PlacementError
from fxwormhole.instrument import instrument, instrument_graph, sensitivity_report
from fxwormhole.passes._common import run_passes
from fxwormhole.passes.sensitivity_annotate import SensitivityAnnotate
from fxwormhole import SAL
from fxwormhole.runtime.sensitivity import probes_of


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect")
        self.conv1 = nn.Conv1d(3, 3, 2)
        self.fc = nn.Linear(3 * 5, 6)
        self.cell = nn.RNNCell(6, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.gru = nn.GRU(5, 3, num_layers=2, bidirectional=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(-1)                     # [B, 3, 6]
        h = torch.sigmoid(self.conv1(h)).flatten(1)              # [B, 15]
        h = nn.functional.gelu(self.fc(h))
        z = None
        seq = []
        for _ in range(3):
            z = self.cell(h, z)
            seq.append(z)
        y, (hn, cn) = self.lstm(torch.stack(seq, 1))
        y2, _ = self.gru(y.transpose(0, 1))
        return self.head(y2[-1]) + hn.sum()


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    return Mixed(), torch.randn(4, 2, 6, 6)


@pytest.mark.parametrize("train", [True, False])
def test_outputs_unchanged(mixed, train):
    net, x = mixed
    net.train(train)
    g = instrument(net, (x,), SALConfig(eta=0.5)).train(train)
    torch.testing.assert_close(g(x), net(x), rtol=0, atol=0)
    assert {p.layer for p in probes_of(g).values()} == {"conv", "conv1", "fc", "cell", "lstm", "gru", "head"}


def test_user_model_not_mutated(mixed):
    net, x = mixed
    before = copy.deepcopy(net.state_dict())
    net.eval()
    g = instrument(net, (x,), SALConfig(eta=1.0)).train()
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    g(x).sum().backward()
    opt.step()
    assert not net.training
    assert not any("sal_probe" in n for n, _ in net.named_modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())


def test_state_dict_carries_buffers_and_original_keys(mixed):
    net, x = mixed
    g = instrument(net, (x,), SALConfig()).train()
    g(x)
    sd = g.state_dict()
    for name in ("sal_probe_fc.s_bar", "sal_probe_lstm.s_bar", "sal_probe_cell.log_rms", "sal_probe_gru.count"):
        assert name in sd
    assert sd["sal_probe_gru.s_bar"].numel() == 2 * 2 * 3 * 3  # layers x dirs x gates x H
    missing, unexpected = g.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all("sal_probe" in k for k in missing)
    fresh = instrument(net, (x,), SALConfig())
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.sal_probe_fc.s_bar, g.sal_probe_fc.s_bar)
    assert int(fresh.sal_probe_cell.count) == 3  # three call sites, one update each


def test_ema_and_training_mode_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
    x1, x2 = torch.randn(8, 5), torch.randn(8, 5)
    beta = 0.7
    g = instrument(net, (x1,), SALConfig(beta=beta, enabled=False)).train()
    w, b = net[0].weight, net[0].bias

    def s_of(x):
        return ((1 - torch.tanh(x @ w.T + b) ** 2) * w.norm(dim=1)).mean(0)

    def log_rms(x):
        s = (1 - torch.tanh(x @ w.T + b) ** 2) * w.norm(dim=1)
        return 0.5 * torch.log((s ** 2).mean())

    probe = g.sal_probe_0
    with torch.no_grad():
        g(x1)
        torch.testing.assert_close(probe.s_bar, s_of(x1))  # first update copies the batch value
        g(x2)
        torch.testing.assert_close(probe.s_bar, beta * s_of(x1) + (1 - beta) * s_of(x2))
        torch.testing.assert_close(probe.last_log_rms, log_rms(x2))
        torch.testing.assert_close(probe.log_rms, beta * log_rms(x1) + (1 - beta) * log_rms(x2))
        g.eval()
        g(torch.randn(8, 5) * 10)
        torch.testing.assert_close(probe.s_bar, beta * s_of(x1) + (1 - beta) * s_of(x2))
        assert int(probe.count) == 2
    SAL(g).zero_stats()
    assert int(probe.count) == 0 and float(probe.s_bar.abs().sum()) == 0


def test_conv_and_cell_sensitivity_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU())
    x = torch.randn(2, 2, 5, 5)
    g = instrument(net, (x,), SALConfig(enabled=False)).train()
    g(x)
    u = net[0](x)
    s = (u > 0).float() * net[0].weight.flatten(1).norm(dim=1).view(1, -1, 1, 1)
    torch.testing.assert_close(g.sal_probe_0.s_bar, s.mean((0, 2, 3)))


def test_annotations_without_insertion(mixed):
    net, x = mixed
    gm = capture(net, (x,))
    gm = run_passes(gm, [SensitivityAnnotate(SALConfig(recurrent_only=True))])
    anns = {a["layer"]: a for n in gm.graph.nodes if (a := n.meta.get("fxwormhole", {}).get("sensitivity"))}
    assert anns["conv"]["activation"] == "tanh" and anns["conv"]["neurons"] == 3
    assert anns["conv1"]["activation"] == "sigmoid"
    assert anns["fc"]["activation"] == "gelu" and anns["fc"]["source"] == "sympy"
    assert anns["head"]["activation"] == "identity"
    assert anns["cell"]["calls"] == 3 and anns["cell"]["recurrent_only"] is True
    assert anns["lstm"]["gates"] == ("sigmoid", "sigmoid", "tanh", "sigmoid")
    assert anns["gru"]["neurons"] == 36
    assert not probes_of(gm)


def test_activation_override_and_unknown_layer():
    net = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid())
    x = torch.randn(2, 3)
    g = instrument(net, (x,), activations={"0": "shifted_sigmoid"})
    assert g.sal_probe_0.activation == "shifted_sigmoid"
    g = instrument(net, (x,), activations={"0": lambda t: torch.special.bessel_j0(t)})
    assert g.sal_probe_0.source == "autograd"
    assert "autograd" in str(sensitivity_report(g))
    with pytest.raises(ConfigError, match="no neuron layer"):
        instrument(net, (x,), activations={"nope": "tanh"})


def test_errors():
    with pytest.raises(ConfigError, match="SALConfig"):
        instrument(nn.Sequential(nn.Linear(2, 2)), (torch.randn(1, 2),), sal={"eta": 1})
    with pytest.raises(PlacementError, match="no neuron layer"):
        instrument(nn.Sequential(nn.Tanh()), (torch.randn(1, 2),))
    with pytest.raises(ConfigError, match="no sensitivity probes"):
        sensitivity_report(nn.Linear(2, 2))


def test_nested_graph_modules_are_instrumented():
    """A fixed-point body is a GraphModule inside the graph: its neurons get probes too."""
    body = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.body = body

        def forward(self, x):
            return self.body(torch.relu(self.inp(x)))

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, fx.GraphModule) or super().is_leaf_module(m, name)

    outer = Outer()
    gm = fx.GraphModule(outer, Tracer().trace(outer))
    x = torch.randn(5, 3)
    ref = gm(x)
    gm = instrument_graph(gm, SALConfig())
    assert set(probes_of(gm)) == {"sal_probe_inp", "body.sal_probe_0"}
    gm.train()
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    rows = {r.layer: r for r in sensitivity_report(gm).rows}
    assert rows["body.0"].activation == "tanh" and rows["body.0"].updates == 1
    assert rows["inp"].activation == "relu"


def test_report_table(mixed):
    net, x = mixed
    g = instrument(net, (x,), SALConfig()).train()
    g(x)
    rep = sensitivity_report(g)
    text = str(rep)
    assert text.splitlines()[0].split()[:4] == ["layer", "kind", "activation", "source"]
    fc = next(r for r in rep.rows if r.layer == "fc")
    assert fc.neurons == 6 and fc.updates == 1
    torch.testing.assert_close(torch.tensor(fc.mean_s_bar), g.sal_probe_fc.s_bar.mean())
    assert fc.below_target == float((g.sal_probe_fc.s_bar < 1).float().mean())
