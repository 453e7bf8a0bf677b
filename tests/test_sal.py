"""SAL gradients against autograd's gradient of the local sensitivity (float64), gating, compile."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxwormhole
from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument
from fxwormhole import SAL
from fxwormhole.runtime.sensitivity import probes_of

ACTS = {  # torch activation of each registered name the probes may see after a dense layer
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softsign": F.softsign, "gelu": F.gelu, "silu": F.silu,
    "elu": F.elu, "relu": F.relu, "leaky_relu": F.leaky_relu, "hardtanh": F.hardtanh, "softplus": F.softplus,
}
POSITIVE_SLOPE = ("tanh", "sigmoid", "softsign", "elu", "leaky_relu", "softplus", "gelu", "silu")  # f' != 0 a.e.


def fprime(act, u):
    """f'(u) by autograd (create_graph: it is differentiated again)."""
    return torch.autograd.grad(act(u).sum(), u, create_graph=True)[0] if act is not None else torch.ones_like(u)


def local_objective(pre, norm, act, gate, log_form, chan_dim=-1):
    """-sum_j gate_j mean_b s_bj (or log |s|), s = f'(U) ||w||: what SAL ascends (sign: it is added to .grad)."""
    s = fprime(act, pre) * norm.view([-1 if i == chan_dim % pre.dim() else 1 for i in range(pre.dim())])
    v = torch.log(s.abs()) if log_form else s
    dims = [i for i in range(pre.dim()) if i != chan_dim % pre.dim()]
    return -(gate * v.mean(dims)).sum()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


class Dense(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.out, self.act = nn.Linear(6, 5), nn.Linear(5, 2), act

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


@pytest.mark.parametrize("log_form", [False, True])
@pytest.mark.parametrize("name", sorted(ACTS))
def test_dense_sal_gradient_equals_autograd(name, log_form):
    if log_form and name not in POSITIVE_SLOPE:
        pytest.skip("log s is -inf where f' = 0")
    act, eta = ACTS[name], 0.3
    net = Dense(act).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    g = instrument(net, (x,), SALConfig(eta=eta, log_form=log_form)).train()
    (g(x) ** 2).sum().backward()
    got = grads(g)

    ref = copy.deepcopy(net)
    task = (ref(x) ** 2).sum()
    W, b, Wo, bo = ref.fc.weight, ref.fc.bias, ref.out.weight, ref.out.bias
    h = act(x @ W.T + b)
    obj = eta * local_objective(x @ W.T + b, W.norm(dim=1), act, torch.ones(5, dtype=x.dtype), log_form)
    obj = obj + eta * local_objective(h.detach() @ Wo.T + bo, Wo.norm(dim=1), None, torch.ones(2, dtype=x.dtype), log_form)
    (task + obj).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=f"{name} {n}")


@pytest.mark.parametrize("log_form", [False, True])
def test_conv_sal_gradient_equals_autograd(log_form):
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh()).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    g = instrument(conv, (x,), SALConfig(eta=0.5, log_form=log_form)).train()
    g(x).sum().backward()
    ref = copy.deepcopy(conv)
    c = ref[0]
    u = F.conv2d(x, c.weight, c.bias, 2, 1)
    obj = 0.5 * local_objective(u, c.weight.flatten(1).norm(dim=1), torch.tanh, torch.ones(4, dtype=x.dtype), log_form, 1)
    (torch.tanh(u).sum() + obj).backward()
    torch.testing.assert_close(g.get_submodule("0").weight.grad, c.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g.get_submodule("0").bias.grad, c.bias.grad, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- recurrent
GATE_ACTS = {"rnn": [torch.tanh], "lstm": [torch.sigmoid, torch.sigmoid, torch.tanh, torch.sigmoid],
             "gru": [torch.sigmoid, torch.sigmoid, torch.tanh]}


def recurrent_local_objective(base, w_ih, w_hh, b_ih, b_hh, xs, hs, gate, recurrent_only, log_form, weight):
    """Objective for one (layer, direction): all gate neurons, inputs xs/hs detached."""
    H = w_hh.shape[1]
    a_i, a_h = xs @ w_ih.T + b_ih, hs @ w_hh.T + b_hh
    if base == "gru":
        r = torch.sigmoid(a_i[:, :H] + a_h[:, :H])
        pre = torch.cat([a_i[:, :2 * H] + a_h[:, :2 * H], a_i[:, 2 * H:] + r.detach() * a_h[:, 2 * H:]], 1)
    else:
        pre = a_i + a_h
    sq = (w_hh ** 2).sum(1) + (0 if recurrent_only else (w_ih ** 2).sum(1))
    norm = sq.sqrt()
    total = 0
    for k, act in enumerate(GATE_ACTS[base]):
        sl = slice(k * H, (k + 1) * H)
        total = total + local_objective(pre[:, sl], norm[sl], act, gate[sl], log_form)
    return weight * total


class CellLoop(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = None
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
        return h


@pytest.mark.parametrize("recurrent_only", [False, True])
@pytest.mark.parametrize("cls", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
def test_cell_sal_gradient_equals_autograd(cls, recurrent_only):
    base = {nn.RNNCell: "rnn", nn.LSTMCell: "lstm", nn.GRUCell: "gru"}[cls]
    net = CellLoop(cls(3, 4)).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    eta = 0.2
    g = instrument(net, (x,), SALConfig(eta=eta, recurrent_only=recurrent_only)).train()
    y = g(x)
    (y[0] if isinstance(y, tuple) else y).sum().backward()
    ref = copy.deepcopy(net)
    c = ref.cell
    h, obj = None, 0
    states = []
    for t in range(3):
        prev = torch.zeros(5, 4, dtype=x.dtype) if h is None else (h[0] if isinstance(h, tuple) else h)
        states.append(prev.detach())
        h = c(x[t], h)
    for t in range(3):
        obj = obj + recurrent_local_objective(base, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh, x[t], states[t],
                                              torch.ones(c.weight_ih.shape[0], dtype=x.dtype), recurrent_only,
                                              False, eta / 3)
    ((h[0] if isinstance(h, tuple) else h).sum() + obj).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g.get_parameter(n).grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)


class Wrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_sequence_module_sal_gradient_equals_autograd(cls):
    """Two layers, bidirectional, batch_first: every gate neuron of every layer/direction."""
    base = cls.__name__.lower()
    net = cls(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    eta = 0.2
    g = instrument(Wrap(net), (x,), SALConfig(eta=eta, log_form=True)).train()
    g(x)[0].sum().backward()
    assert len(probes_of(g)) == 1
    ref = copy.deepcopy(net)
    out = ref(x)[0]
    # layer-0 outputs from a one-layer twin with the same weights
    one = cls(3, 4, num_layers=1, bidirectional=True, batch_first=True).double()
    one.load_state_dict({k: v for k, v in ref.state_dict().items() if "_l0" in k})
    seqs = [one(x)[0].detach(), out.detach()]
    obj = 0
    inp = x.transpose(0, 1)
    for l in range(2):
        for d, sfx in enumerate(["", "_reverse"]):
            s = f"_l{l}{sfx}"
            y = seqs[l].transpose(0, 1)[..., d * 4:(d + 1) * 4]
            first = torch.zeros(1, 2, 4, dtype=x.dtype)
            prev = torch.cat([first, y[:-1]]) if d == 0 else torch.cat([y[1:], first])
            p = {k: getattr(ref, k + s) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            obj = obj + recurrent_local_objective(base, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"],
                                                  inp.reshape(10, -1), prev.reshape(10, 4),
                                                  torch.ones(p["weight_ih"].shape[0], dtype=x.dtype), False, True, eta)
        inp = seqs[l].transpose(0, 1)
    (out.sum() + obj).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g.get_parameter("m." + n).grad, p.grad, rtol=1e-9, atol=1e-12, msg=n)


# ----------------------------------------------------------------------------- gating
@pytest.mark.parametrize("two_sided", [False, True])
def test_gate_one_sided_and_two_sided(two_sided):
    net = Dense(torch.tanh).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    g = instrument(net, (x,), SALConfig(eta=0.3, two_sided=two_sided, target=1.0)).train()
    probe = probes_of(g)["sal_probe_fc"]
    sbar = torch.tensor([0.5, 1.5, 0.9, 2.0, 0.1], dtype=torch.float64)
    probe.s_bar.copy_(sbar)
    probe.count.fill_(1)
    gate = torch.sign(1.0 - sbar) if two_sided else (sbar < 1.0).double()
    g.zero_grad()
    g(x).sum().backward()
    ref = copy.deepcopy(net)
    W, b = ref.fc.weight, ref.fc.bias
    obj = 0.3 * local_objective(x @ W.T + b, W.norm(dim=1), torch.tanh, gate, False)
    (ref(x).sum() + obj).backward()
    torch.testing.assert_close(g.get_parameter("fc.weight").grad, W.grad, rtol=1e-10, atol=1e-12)
    if not two_sided:  # closed rows (s_bar >= target) carry the task gradient only
        ref.zero_grad()
        ref(x).sum().backward()
        closed = sbar >= 1.0
        torch.testing.assert_close(g.get_parameter("fc.weight").grad[closed], W.grad[closed])


def test_disabled_sal_and_eval_leave_gradients_alone():
    net = Dense(torch.tanh)
    x = torch.randn(8, 6)
    for model, train in [(instrument(net, (x,), SALConfig(enabled=False)), True),
                         (instrument(net, (x,), SALConfig(eta=1.0)), False)]:
        model.train(train)
        model(x).sum().backward()
        ref = copy.deepcopy(net)
        ref(x).sum().backward()
        for n, p in ref.named_parameters():
            torch.testing.assert_close(model.get_parameter(n).grad, p.grad)


# ----------------------------------------------------------------------------- training
def test_short_sal_run_raises_sensitivity_toward_one():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, std=0.1 / 4)  # ||w_j|| ~ 0.1: s ~ 0.1
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Tanh()]
    net = nn.Sequential(*layers)
    x = torch.randn(64, 16)
    # beta 0.9: a short average lags little behind the growing s, so one-sided SAL stops near 1.
    g = instrument(net, (x,), SALConfig(eta=1.0, beta=0.9)).train()
    opt = torch.optim.SGD(g.parameters(), lr=0.05)
    sal = SAL(g)
    g(x)
    start = sal.mean_s_bar()
    for _ in range(200):
        opt.zero_grad()
        (0.0 * g(torch.randn(64, 16)).sum()).backward()  # no task: SAL alone
        opt.step()
    end = sal.mean_s_bar()
    assert start < 0.2
    assert 0.9 < end < 1.1, (start, end)
    assert all(abs(r.log_rms_s) < 0.2 for r in fxwormhole.sensitivity_report(g).rows)


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 4), nn.GELU(),
                        nn.Linear(4, 2))
    x = torch.randn(4, 2, 5, 5)
    eager = instrument(net, (x,), SALConfig(eta=0.5)).train()
    compiled_model = copy.deepcopy(eager)
    step = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # second step: gates come from the updated s_bar
        for m, f in ((eager, eager), (compiled_model, step)):
            m.zero_grad()
            (f(x) ** 2).sum().backward()
        for n, p in eager.named_parameters():
            torch.testing.assert_close(compiled_model.get_parameter(n).grad, p.grad, rtol=1e-5, atol=1e-6)
        for n, b in eager.named_buffers():
            torch.testing.assert_close(compiled_model.get_buffer(n), b, rtol=1e-5, atol=1e-6)
    assert int(compiled_model.get_buffer("sal_probe_0.count")) == 2


@pytest.mark.slow
def test_inductor_training_step_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 2))
    x = torch.randn(32, 8)
    eager = instrument(net, (x,), SALConfig(eta=0.5, log_form=True)).train()
    compiled_model = copy.deepcopy(eager)
    step = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        for m, f in ((eager, eager), (compiled_model, step)):
            m.zero_grad()
            (f(x) ** 2).sum().backward()
        for n, p in eager.named_parameters():
            torch.testing.assert_close(compiled_model.get_parameter(n).grad, p.grad, rtol=1e-4, atol=1e-5)
