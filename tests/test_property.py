"""Property-based tests of ``fxwormhole.transform`` on random architectures (issue 9).

Hypothesis draws MLPs, CNNs, residual MLPs and recurrent classifiers (depth, widths, activations),
wormhole spans (valid and invalid names, policies), gate kinds and SAL settings. Every property
runs a bounded, derandomised number of examples (``max_examples`` below) so CI is stable.

Properties:

1. *Works or says why.* ``transform`` either returns a model or raises an
   :class:`~fxwormhole.errors.FxWormholeError` subclass, never another exception type, and never
   mutates the user's model (parameters, buffers, training flag).
2. *Identity at initialisation.* With the default closed wormholes the transformed model's outputs
   equal the original's (1e-5 relative) and, when SAL adds nothing (``sal=None``, ``enabled=False``
   or ``eta=0``), so do its parameter gradients.
3. *Implicit gradients are right.* With open gates (``gate_init`` near 0, ``proj_init="normal"``,
   small ``proj_std``), in float64, the implicit gradients (parameters, wormhole parameters and the
   input) agree with a reference:

   * feedforward models: a **plain autograd loop** on the *original* model, written here with module
     hooks: ``z <- wormhole(h_src)`` where ``h_src`` is the source module's output of a forward pass
     whose destination module input is ``x + z``, iterated to convergence and back-propagated
     through every iteration (no fxwormhole code on the reference path except the wormhole's own
     gate/projection module);
   * recurrent models: the transformed model itself with ``grad="unrolled"`` (back-propagation
     through the actual forward iterations) at a tight tolerance.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxwormhole as fw
from fxwormhole.errors import FxWormholeError
from fxwormhole.runtime.wormhole import Wormhole
from fxwormhole.transformed import public_name
from helpers import assert_unchanged as _assert_unchanged, snapshot as _snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Counter()  # property -> examples run (printed after the module with -v; see docs/reliability.md)


@pytest.fixture(autouse=True, scope="module")
def _report_examples(request):
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    # only on request (-v): a quiet run prints nothing between the progress dots
    if reporter is not None and capture is not None and EXAMPLES and request.config.getoption("verbose") > 0:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nproperty examples: {dict(sorted(EXAMPLES.items()))}")

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GRADIENT = settings(PROPERTY, max_examples=12)

ACTIVATIONS = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU,
    "elu": nn.ELU, "softplus": nn.Softplus, "leaky_relu": lambda: nn.LeakyReLU(0.1), "identity": nn.Identity,
}
SMOOTH = ["tanh", "sigmoid", "gelu", "silu", "softplus", "identity"]  # gradients well defined everywhere


# ------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return x + self.act(self.fc(x))


class ResidualNet(nn.Module):
    def __init__(self, d_in: int, width: int, acts: list[str], d_out: int):
        super().__init__()
        self.stem = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(Block(width, a) for a in acts)
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CNN(nn.Module):
    def __init__(self, c_in: int, channels: list[int], acts: list[str], pool: bool, side: int, d_out: int):
        super().__init__()
        layers, c = [], c_in
        for i, (ch, a) in enumerate(zip(channels, acts)):
            layers += [nn.Conv2d(c, ch, 3, padding=1), ACTIVATIONS[a]()]
            c = ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2) if pool else nn.Identity()
        side = side // 2 if pool else side
        self.fc = nn.Linear(c * side * side, d_out)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class RecurrentNet(nn.Module):
    def __init__(self, kind: str, d_in: int, hidden: int, layers: int, d_out: int):
        super().__init__()
        self.rnn = getattr(nn, kind)(d_in, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _layer_names(model: nn.Module) -> list[str]:
    """Module paths a user would type: parametrised layers and residual blocks."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, Block))]
    if isinstance(model, RecurrentNet):
        names += [f"rnn.layer{i}" for i in range(model.rnn.num_layers + 1)]  # one past the top: invalid
    return names


@st.composite
def architectures(draw, kinds=("mlp", "cnn", "residual", "rnn"), acts=tuple(ACTIVATIONS)):
    """``(model, example_input, kind)`` for a random architecture, float32, random weights."""
    kind = draw(st.sampled_from(kinds))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    batch = draw(st.integers(2, 5))
    act = st.sampled_from(acts)
    if kind == "mlp":
        widths = draw(st.lists(st.integers(2, 12), min_size=3, max_size=6))
        layers, d = [], draw(st.integers(1, 8))
        x = torch.randn(batch, d)
        for w in widths[:-1]:
            layers += [nn.Linear(d, w), ACTIVATIONS[draw(act)]()]
            d = w
        model = nn.Sequential(*layers, nn.Linear(d, widths[-1]))
    elif kind == "residual":
        d_in = draw(st.integers(1, 8))
        model = ResidualNet(d_in, draw(st.integers(2, 12)), draw(st.lists(act, min_size=1, max_size=4)),
                            draw(st.integers(1, 4)))
        x = torch.randn(batch, d_in)
    elif kind == "cnn":
        n = draw(st.integers(1, 3))
        c_in, side = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8]))
        model = CNN(c_in, draw(st.lists(st.integers(1, 6), min_size=n, max_size=n)),
                    draw(st.lists(act, min_size=n, max_size=n)), draw(st.booleans()), side, draw(st.integers(1, 4)))
        x = torch.randn(batch, c_in, side, side)
    else:
        d_in = draw(st.integers(1, 6))
        model = RecurrentNet(draw(st.sampled_from(["RNN", "GRU", "LSTM"])), d_in, draw(st.integers(2, 8)),
                             draw(st.integers(1, 3)), draw(st.integers(1, 4)))
        x = torch.randn(batch, draw(st.integers(1, 5)), d_in)
    return model, x, kind


@st.composite
def spans(draw, model):
    """A ``WormholeConfig.wormholes`` value: a policy, or pairs of names (valid, reversed, unknown)."""
    names = _layer_names(model)
    choice = draw(st.sampled_from(["auto", "every", "pairs", "pairs", "pairs", "pairs"]))
    if choice == "auto":
        return "auto"
    if choice == "every":
        return f"every:{draw(st.integers(1, 2))}"
    # mostly real names (either order: a reversed pair is invalid), sometimes a name that is not there
    name = st.sampled_from(names * 6 + ["nope", "0.weight", "head.bias", "rnn.layer9"])
    return draw(st.lists(st.tuples(name, name), min_size=1, max_size=2))


@st.composite
def sal_configs(draw):
    if draw(st.booleans()):
        return None
    return fw.SALConfig(eta=draw(st.sampled_from([0.0, 1e-3, 0.05])), beta=draw(st.sampled_from([0.0, 0.9, 0.99])),
                        target=draw(st.sampled_from([0.5, 1.0, 2.0])), two_sided=draw(st.booleans()),
                        log_form=draw(st.booleans()), recurrent_only=draw(st.booleans()), enabled=draw(st.booleans()))


# ------------------------------------------------------------------------------------------ helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _sal_is_silent(sal) -> bool:
    return sal is None or not sal.enabled or sal.eta == 0


def _transform_or_typed_error(model, x, config, sal):
    """transform() must return a model or raise a FxWormholeError; anything else fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fw.transform(model, (x,), config, sal=sal)
    except FxWormholeError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return exc


# --------------------------------------------------------------------------------------- property 1+2
@pytest.mark.parametrize("kind", ["mlp", "cnn", "residual", "rnn"])
@PROPERTY
@given(data=st.data(), gate=st.sampled_from(["scalar", "channel", "input"]), sal=sal_configs(), train=st.booleans())
def test_transform_works_or_raises_typed_error_and_equals_original_at_init(kind, data, gate, sal, train):
    model, x, _ = data.draw(architectures(kinds=(kind,)))
    model.train(train)
    wormholes = data.draw(spans(model))
    snap = _snapshot(model)
    net = _transform_or_typed_error(model, x, fw.WormholeConfig(wormholes=wormholes, gate=gate), sal)
    _assert_unchanged(model, snap)
    EXAMPLES["works_or_typed_error"] += 1
    if isinstance(net, FxWormholeError):
        EXAMPLES[f"typed_error:{type(net).__name__}"] += 1
        return
    EXAMPLES[f"transformed:{kind}"] += 1
    assert net.training == train

    ref_x = x.clone().requires_grad_(True)
    net_x = x.clone().requires_grad_(True)
    expected = model(ref_x)
    got = net(net_x)
    assert got.shape == expected.shape
    assert _rel(got.detach(), expected.detach()) < 1e-5
    for stats in net.fixed_point_stats().values():  # closed wormholes settle at the first evaluation
        if stats is not None and hasattr(stats, "iterations"):
            assert int(stats.iterations.max()) == 1
    _assert_unchanged(model, snap)
    if not _sal_is_silent(sal) and train:
        return  # SAL adds its own term to .grad (tested against autograd in tests/test_sal.py)
    w = torch.randn_like(expected)
    (expected * w).sum().backward()
    (got * w).sum().backward()
    assert _rel(net_x.grad, ref_x.grad) < 1e-5
    theirs = {n: p.grad for n, p in model.named_parameters()}
    for name, p in net.named_parameters():
        pub = public_name(name)
        if pub in theirs and theirs[pub] is not None:
            assert p.grad is not None, pub
            assert _rel(p.grad, theirs[pub]) < 1e-5, pub
    EXAMPLES["identity_at_init_with_gradients"] += 1


# ------------------------------------------------------------------------------------------ property 3
def _plain_loop_reference(model, wormhole: Wormhole, src: str, dst: str, x: torch.Tensor, w: torch.Tensor,
                          tol: float = 1e-13, max_iter: int = 400):
    """Unrolled autograd through ``z <- wormhole(h_src(x_dst + z))`` on the original model."""
    state = {"z": None, "h": None}
    src_mod, dst_mod = _output_module(model, src), model.get_submodule(dst)

    def pre(module, args):
        if state["z"] is None:
            return None
        return (args[0] + state["z"], *args[1:])

    def post(module, args, out):
        state["h"] = out

    handles = [dst_mod.register_forward_pre_hook(pre), src_mod.register_forward_hook(post)]
    try:
        for k in range(max_iter):
            y = model(x)
            z_new = wormhole(state["h"])
            with torch.no_grad():
                delta = float((z_new - state["z"]).norm()) if state["z"] is not None else math.inf
                small = delta <= tol * (float(z_new.norm()) + float(x.norm()))
            state["z"] = z_new
            if small:
                break
        y = model(x)  # output at the converged injection (graph through every iteration)
    finally:
        for h in handles:
            h.remove()
    assert k < max_iter - 1, "the reference loop did not converge: the drawn cycle is not contractive"
    return (y * w).sum()


def _output_module(model: nn.Module, name: str) -> nn.Module:
    """The module whose output is the value a source name feeds back: a layer's output is taken
    after the elementwise activation that follows it (as the layer table groups them)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.Sequential):
        nxt = str(int(child) + 1)
        if nxt in parent._modules and not isinstance(parent._modules[nxt], (nn.Linear, nn.Conv2d)):
            return parent._modules[nxt]
    if isinstance(parent, Block) and child == "fc":
        return parent.act
    return model.get_submodule(name)


def _gradients(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@st.composite
def open_feedforward(draw, kind):
    model, x, kind = draw(architectures(kinds=(kind,), acts=tuple(SMOOTH)))
    names = _layer_names(model)
    # a valid span: src at or after dst in module order (module order is execution order here)
    i = draw(st.integers(0, len(names) - 1))
    j = draw(st.integers(0, i))
    return model, x, kind, names[i], names[j]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "residual"])
@GRADIENT
@given(data=st.data(), gate=st.sampled_from(["scalar", "channel", "input"]),
       gate_init=st.floats(-1.0, 0.5), solver=st.sampled_from(["picard", "anderson", "damped"]),
       sal=st.sampled_from([None, fw.SALConfig(enabled=False), fw.SALConfig(eta=0.0, log_form=True)]))
def test_implicit_gradients_match_a_plain_autograd_loop_float64(kind, data, gate, gate_init, solver, sal):
    model, x, kind, src, dst = data.draw(open_feedforward(kind))
    model = model.double()
    x = x.double()
    cfg = fw.WormholeConfig(
        wormholes=[(src, dst)], gate=gate, gate_init=gate_init, proj_init="normal", proj_std=0.05,
        solver=fw.SolverConfig(name=solver, damping=0.7 if solver == "damped" else 1.0), tol=1e-12, max_iter=400,
        grad=fw.GradConfig(mode="implicit", tol=1e-12, max_iter=400), on_fail="raise")
    net = _transform_or_typed_error(model, x, cfg, sal)
    if isinstance(net, FxWormholeError):
        # a valid-looking pair may still be refused (e.g. the source does not depend on the destination)
        assert isinstance(net, fw.PlacementError), net
        EXAMPLES["gradient:refused"] += 1
        return
    (wormhole,) = [m for m in net.modules() if isinstance(m, Wormhole)]
    assume(_contracts(net, x))
    net.train()
    w = torch.randn(model(x).shape, dtype=torch.float64)

    xi = x.clone().requires_grad_(True)
    loss = (net(xi) * w).sum()
    params = dict(net.named_parameters())
    grads = dict(zip(["input", *params], _gradients(loss, [xi, *params.values()])))
    iters = [int(s.iterations.max()) for s in net.fixed_point_stats().values()]
    assert max(iters) > 1, "the wormhole is open: the fixed point must iterate"

    xr = x.clone().requires_grad_(True)
    ref_params = {public_name(n): p for n, p in net.named_parameters() if "wormhole" in n}
    ref_params.update(dict(model.named_parameters()))
    ref_loss = _plain_loop_reference(model, wormhole, src, dst, xr, w)
    ref = dict(zip(["input", *ref_params], _gradients(ref_loss, [xr, *ref_params.values()])))

    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    assert _rel(grads["input"], ref["input"]) < 1e-7
    for name, g in grads.items():
        if name == "input":
            continue
        pub = public_name(name)
        r = ref[pub]
        if r is None:
            assert g is None or float(g.abs().max()) == 0.0, pub
            continue
        assert g is not None, f"{pub}: no implicit gradient"
        assert float((g - r).norm()) <= 1e-7 * float(r.norm()) + 1e-12, f"{pub}: {_rel(g, r):.2e}"
    EXAMPLES[f"gradient:{kind}"] += 1


def _contracts(net, x) -> bool:
    """Whether the drawn cycle is contractive enough to converge (a few models are not)."""
    try:
        with torch.no_grad():
            net.eval()(x)
    except fw.ConvergenceError:
        return False
    return True


@settings(GRADIENT, max_examples=15)
@given(arch=architectures(kinds=("rnn",)), gate=st.sampled_from(["scalar", "channel", "input"]),
       policy=st.sampled_from(["auto", "every:1"]), solver=st.sampled_from(["picard", "anderson"]))
def test_recurrent_implicit_gradients_match_unrolled_float64(arch, gate, policy, solver):
    model, x, _ = arch
    model, x = model.double(), x.double()
    common = dict(wormholes=policy, gate=gate, gate_init=0.0, proj_init="normal", proj_std=0.05, tol=1e-12,
                  max_iter=400, on_fail="raise")
    torch.manual_seed(1)
    net = fw.transform(model, (x,), fw.WormholeConfig(
        solver=solver, grad=fw.GradConfig(mode="implicit", tol=1e-12, max_iter=400), **common))
    torch.manual_seed(1)
    ref_net = fw.transform(model, (x,), fw.WormholeConfig(solver="picard", grad="unrolled", **common))
    ref_net.load_state_dict(net.state_dict())
    w = torch.randn(model(x).shape, dtype=torch.float64)
    grads = []
    for m in (net, ref_net):
        xi = x.clone().requires_grad_(True)
        loss = (m.train()(xi) * w).sum()
        ps = [p for _, p in sorted(m.named_parameters(), key=lambda kv: public_name(kv[0]))]
        grads.append((loss, _gradients(loss, [xi, *ps])))
    (loss, g), (ref_loss, r) = grads
    stats = [s for s in net.fixed_point_stats().values() if s is not None]
    assert stats and max(int(s.iterations.max()) for s in stats) > 1, "open wormholes must iterate"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    assert len(g) == len(r)
    for a, b in zip(g, r):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).norm()) <= 1e-7 * float(b.norm()) + 1e-12
    EXAMPLES["gradient:rnn"] += 1
