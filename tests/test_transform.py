"""fxwormhole.transform on feedforward models: semantics of issue 4, each against a reference."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fxwormhole as fw
from fxwormhole import zoo
from fxwormhole.passes.plan_wormholes import WormholeSpec
from fxwormhole.transformed import TransformedModule
from helpers import transform_unfused


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def _assert_unchanged(model, snap):
    state, training = snap
    assert model.training == training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


FEEDFORWARD = [
    ("MLP", None),
    ("CNN", None),
    ("ResidualMLP", None),
    ("TransformerStack", None),
    ("TwoInTwoOut", None),
    ("MLP", [("layers.2", "layers.0"), ("layers.1", "layers.1")]),
    ("CNN", [("conv2", "conv1")]),
    ("CNN", [("fc", "conv2")]),
    ("TransformerStack", [("layers.1", "layers.0")]),
]


@pytest.mark.parametrize("name, wormholes", FEEDFORWARD)
def test_closed_wormholes_equal_original_and_settle_in_one_evaluation(name, wormholes):
    model = zoo.build(name).eval()
    inputs = model.example_inputs(batch=5)
    snap = _snapshot(model)
    config = fw.WormholeConfig() if wormholes is None else fw.WormholeConfig(wormholes=wormholes)
    net = fw.transform(model, inputs, config)
    _assert_unchanged(model, snap)
    assert isinstance(net, TransformedModule) and net.wormholes
    assert net.fixed_point_modules(), "no fixed-point node was created"

    with torch.no_grad():
        expected, got = model(*inputs), net(*inputs)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
        assert _max_rel(g, e) < 1e-5
    for stats in net.fixed_point_stats().values():
        assert stats.forward.iterations.tolist() == [1] * 5


def test_original_state_dict_loads_and_only_wormhole_params_are_missing():
    model = zoo.MLP()
    net = fw.transform(model, model.example_inputs(), fw.WormholeConfig(wormholes=[("layers.2", "layers.0")]))
    other = zoo.MLP()  # different random weights
    result = net.load_state_dict(other.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(net.wormhole_parameters())
    assert all(k.startswith("wormhole_0.") for k in result.missing_keys)
    x = torch.randn(3, 8)
    torch.testing.assert_close(net(x), other(x), rtol=1e-5, atol=1e-6)
    # public names are the original module paths
    assert set(other.state_dict()) <= set(net.state_dict())
    # and the transformed state_dict round-trips strictly
    twin = fw.transform(zoo.MLP(), model.example_inputs(), fw.WormholeConfig(wormholes=[("layers.2", "layers.0")]))
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin(x), net(x))


def test_transformed_model_is_an_ordinary_module(tmp_path):
    model = zoo.CNN()
    inputs = model.example_inputs()
    net = fw.transform(model, inputs)
    x = inputs[0]
    ref = net(x).detach()

    clone = copy.deepcopy(net)
    assert type(clone) is type(net) or isinstance(clone, TransformedModule)
    torch.testing.assert_close(clone(x), ref)

    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, TransformedModule)
    torch.testing.assert_close(loaded(x), ref)
    assert loaded.wormholes == net.wormholes and loaded.summary() == net.summary()
    assert set(loaded.state_dict()) == set(net.state_dict())

    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    fresh = fw.transform(zoo.CNN(), inputs)
    fresh.load_state_dict(torch.load(path))
    torch.testing.assert_close(fresh(x), ref)

    calls = []
    handle = net.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    net.eval()
    assert not net.training and all(not m.training for m in net.modules())
    net(x)
    handle.remove()
    assert calls == [ref.shape]

    double = copy.deepcopy(net).double()
    torch.testing.assert_close(double(x.double()).float(), ref, rtol=1e-4, atol=1e-5)

    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(x).square().mean().backward()
    opt.step()
    changed = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert any("conv1" in n for n in changed) and any("wormhole" in n for n in changed)


def _open_config(wormholes, **kw):
    return fw.WormholeConfig(wormholes=wormholes, gate_init=0.0, proj_init="normal", proj_std=0.3,
                             solver=fw.SolverConfig(name="anderson", tol=1e-12, max_iter=200),
                             grad=fw.GradConfig(tol=1e-12, max_iter=200), **kw)


def test_gradients_match_unrolled_reference_float64():
    torch.manual_seed(1)
    model = zoo.MLP().double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    net = fw.transform(model, (x.detach(),), _open_config([("layers.2", "layers.0")])).double()
    out = net(x)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(net.parameters()), upstream)

    # Reference: the same network iterated 300 times with plain autograd through the loop.
    params = dict(net.named_parameters())
    wormhole = net.get_submodule("fixed_point_0.feedback.wormhole_0")
    layers = [net.get_submodule(f"fixed_point_0.body.layers.{i}") for i in range(3)]
    head = net.get_submodule("head")
    z = torch.zeros_like(x)
    for _ in range(300):
        h = x + z
        for layer in layers:
            h = torch.tanh(layer(h))
        z = wormhole(h)
    ref_out = head(h)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    ref = torch.autograd.grad(ref_out, [x] + list(params.values()), upstream)
    for (name, _), g, r in zip([("x", None)] + list(params.items()), grads, ref):
        assert _max_rel(g, r) < 1e-6, name


def test_open_wormholes_take_more_iterations_than_closed():
    model = zoo.MLP()
    x = torch.randn(16, 8)
    closed = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("layers.2", "layers.0")], proj_init="normal", proj_std=0.3, solver="picard"))
    opened = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("layers.2", "layers.0")], proj_init="normal", proj_std=0.3, gate_init=3.0, solver="picard"))
    closed(x), opened(x)
    it_closed = closed.fixed_point_stats()["fixed_point_0"].forward.iterations.float().mean()
    it_open = opened.fixed_point_stats()["fixed_point_0"].forward.iterations.float().mean()
    assert it_open > it_closed + 2


def test_open_wormholes_train_on_a_toy_task():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, :4].sum(1, keepdim=True) > 0).float() * torch.ones(1, 4)
    model = zoo.MLP()
    cfg = fw.WormholeConfig(wormholes=[("layers.2", "layers.0")], gate_init=0.0, proj_init="normal", proj_std=0.1,
                            spectral_norm=True, gate_cap=0.5, solver="picard")
    net = fw.transform(model, (x[:8],), cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gate = net.get_submodule("fixed_point_0.feedback.wormhole_0.gate")
    gate_before = gate.logit.detach().clone()
    losses, iterations = [], []
    for _ in range(80):
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        iterations.append(net.fixed_point_stats()["fixed_point_0"].forward.mean_iterations)
    assert losses[-1] < 0.6 * losses[0]
    assert (gate.logit.detach() - gate_before).abs().max() > 1e-3
    assert min(iterations) > 1  # the wormhole is open: the network really iterates


def test_overlapping_spans_form_one_node_and_disjoint_spans_two():
    model = zoo.MLP(depth=4)
    x = torch.randn(4, 8)
    overlap = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("layers.2", "layers.0"), ("layers.3", "layers.1")]))
    assert list(overlap.fixed_point_modules()) == ["fixed_point_0"]
    disjoint = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("layers.1", "layers.0"), ("layers.3", "layers.2")]))
    assert list(disjoint.fixed_point_modules()) == ["fixed_point_0", "fixed_point_1"]
    for net in (overlap, disjoint):
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-6)


def test_overlapping_open_spans_match_unrolled_reference():
    torch.manual_seed(2)
    model = zoo.MLP(depth=4).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    cfg = _open_config([("layers.2", "layers.0"), ("layers.3", "layers.1")])
    cfg = fw.WormholeConfig(**{**cfg.__dict__, "proj_std": 0.2})
    net = fw.transform(model, (x,), cfg).double()
    out = net(x)
    w0 = net.get_submodule("fixed_point_0.feedback.wormhole_0")
    w1 = net.get_submodule("fixed_point_0.feedback.wormhole_1")
    layers = [net.get_submodule(f"fixed_point_0.body.layers.{i}") for i in range(4)]
    z0 = torch.zeros_like(x)
    z1 = torch.zeros(5, 16, dtype=torch.float64)
    for _ in range(300):
        a0 = torch.tanh(layers[0](x + z0))
        a1 = torch.tanh(layers[1](a0 + z1))
        a2 = torch.tanh(layers[2](a1))
        a3 = torch.tanh(layers[3](a2))
        z0, z1 = w0(a2), w1(a3)
    ref = net.get_submodule("head")(a3)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-9)


def test_skip_connection_across_span_and_two_outputs():
    model = zoo.TwoInTwoOut()
    a, b = model.example_inputs(batch=3)
    net = fw.transform(model, (a, b), _open_config([("trunk2", "trunk1")]))
    ya, yb = net(a, b)
    assert ya.shape == (3, 3) and yb.shape == (3, 2)
    (ya.sum() + yb.sum()).backward()
    assert net.get_submodule("fixed_point_0.body.trunk1").weight.grad is not None

    res = zoo.ResidualMLP()
    x = res.example_inputs()[0]
    net = fw.transform(res, (x,), fw.WormholeConfig(wormholes=[("blocks.1", "blocks.0")]))
    torch.testing.assert_close(net(x), res(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "wormholes, match",
    [
        ([("layers.0", "layers.2")], "does not depend"),
        ([("nonexistent", "layers.0")], "known layers"),
        ([("layers.2", "nope")], "known layers"),
    ],
)
def test_impossible_wormholes_raise_placement_error(wormholes, match):
    model = zoo.MLP()
    snap = _snapshot(model)
    with pytest.raises(fw.PlacementError, match=match):
        fw.transform(model, model.example_inputs(), fw.WormholeConfig(wormholes=wormholes))
    _assert_unchanged(model, snap)


def test_plan_is_recorded_in_metadata():
    model = zoo.MLP()
    net = fw.transform(model, model.example_inputs(), fw.WormholeConfig(wormholes="every:1"))
    specs = net.wormholes
    assert all(isinstance(s, WormholeSpec) for s in specs)
    assert [(s.src, s.dst) for s in specs] == [("layers.1", "layers.0"), ("layers.2", "layers.1")]
    assert specs[0].src_shape == (4, 16) and specs[0].dst_shape == (4, 8)


def test_auto_policy_goes_from_deepest_hidden_layer_to_first():
    model = zoo.MLP()
    net = fw.transform(model, model.example_inputs())
    assert [(s.src, s.dst) for s in net.wormholes] == [("layers.2", "layers.0")]


@pytest.mark.parametrize("gate", ["scalar", "channel", "input"])
def test_gate_kinds_start_closed_and_equal_original(gate):
    model = zoo.CNN()
    x = model.example_inputs()[0]
    net = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("conv2", "conv1")], gate=gate))
    torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-6)
    gate_module = net.get_submodule("fixed_point_0.feedback.wormhole_0.gate")
    assert float(gate_module.value().max()) < 0.003


def test_batchnorm_in_training_halts_per_batch():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(8, 8)
    net = fw.transform(model, (x,), fw.WormholeConfig(wormholes=[("3", "0")]))
    assert net.get_submodule("fixed_point_0").solver_config.halting == "batch"
    mlp = zoo.MLP()
    net = fw.transform(mlp, mlp.example_inputs(), fw.WormholeConfig(wormholes=[("layers.2", "layers.0")]))
    assert net.get_submodule("fixed_point_0").solver_config.halting == "sample"


def test_cell_loop_gets_a_wormhole_per_step_and_matches_unrolled_reference():
    """A Python loop over a GRUCell: one fixed point per step, parameters shared across steps.

    Regression: the implicit backward of step t must not follow its inputs into step t-1 (which
    shares the cell's weights), or gradients are double counted. (The unfused path: ``transform``
    runs this loop as one CellLoop, checked against this path in tests/test_recurrent_cell_loops.py.)
    """
    torch.manual_seed(0)
    model = zoo.GRUCellLoop().double()
    (x,) = (t.double() for t in model.example_inputs(batch=3))
    net = transform_unfused(model, (x,), _open_config("auto")).double()
    assert len(net.fixed_point_modules()) == model.steps
    out = net(x)
    upstream = torch.randn_like(out)
    params = list(net.parameters())
    grads = torch.autograd.grad(out, params, upstream)

    cell = net.get_submodule("fixed_point_0.body.cell")
    wormhole = net.get_submodule("fixed_point_0.feedback.wormhole_0")
    h = x.new_zeros(3, model.hidden)
    for t in range(model.steps):
        z = torch.zeros_like(x[:, t])
        for _ in range(300):
            h_next = cell(x[:, t] + z, h)
            z = wormhole(h_next)
        h = h_next
    ref_out = net.get_submodule("head")(h)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, torch.autograd.grad(ref_out, params, upstream)):
        assert _max_rel(g, r) < 1e-6


@pytest.mark.parametrize("name", ["MLP", "TransformerStack", "LSTMClassifier", "SeqLenLoop", "GRUCellLoop"])
def test_capture_transform_and_instrument_outputs_survive_torch_save(name):
    """Both front ends' graphs (export's included), fixed points and SAL probes pickle and reload."""
    model = zoo.build(name).eval()
    inputs = model.example_inputs()
    for built in (fw.capture(model, inputs), fw.transform(model, inputs), fw.instrument(model, inputs)):
        built.eval()
        buf = io.BytesIO()
        torch.save(built, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(*inputs), built(*inputs))
