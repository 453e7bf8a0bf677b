"""capture(): both front ends, export normalisation, fidelity to the model, no mutation, errors."""
import collections
import dataclasses
import inspect
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxwormhole import zoo
from fxwormhole.capture import LAYER_TYPES, capture
from fxwormhole.errors import CaptureError, ConfigError

# zoo model -> front end "auto" must pick
AUTO = {
    "MLP": "symbolic_trace", "CNN": "symbolic_trace", "ResidualBlock": "symbolic_trace",
    "ResidualMLP": "symbolic_trace", "TransformerStack": "export", "LSTMClassifier": "symbolic_trace",
    "GRUClassifier": "symbolic_trace", "RNNClassifier": "symbolic_trace", "GRUCellLoop": "symbolic_trace",
    "SeqLenLoop": "export", "TwoInTwoOut": "symbolic_trace",
}


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.training,
            {n: m.training for n, m in model.named_modules()})


def _assert_unchanged(model, snap):
    state, training, flags = snap
    assert model.training == training
    assert {n: m.training for n, m in model.named_modules()} == flags
    now = model.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


@pytest.mark.parametrize("name,front_end", [(n, "auto") for n in sorted(AUTO)]
                         + [(n, "export") for n in sorted(AUTO) if AUTO[n] != "export"])
def test_capture_zoo_matches_model(name, front_end):
    model = zoo.build(name).eval()
    args = model.example_inputs(batch=3)
    hook = lambda *a: None  # noqa: E731
    handle = model.register_forward_hook(hook)
    snap = _snapshot(model)

    gm = capture(model, args, front_end=front_end)

    meta = gm.meta["fxwormhole"]
    assert meta["front_end"] == (AUTO[name] if front_end == "auto" else "export")
    assert meta["input_shapes"] == [tuple(a.shape) for a in args]
    # the user's model: same values, flags and hooks
    _assert_unchanged(model, snap)
    assert list(model._forward_hooks.values()) == [hook]
    assert all(not m._forward_hooks for m in model.modules() if m is not model)
    handle.remove()
    ref = model(*args)
    torch.testing.assert_close(gm(*args), ref, rtol=0, atol=0)
    # every layer is a call_module on the user's path, holding a copy (not the user's object)
    mods = dict(gm.named_modules())
    user_mods = dict(model.named_modules())
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], LAYER_TYPES)]
    expected = {n for n, m in user_mods.items() if isinstance(m, LAYER_TYPES)}
    assert {n.target for n in layer_nodes} == expected
    for n in layer_nodes:
        assert type(mods[n.target]) is type(user_mods[n.target])
        assert mods[n.target] is not user_mods[n.target]
        assert mods[n.target].weight_ih.data_ptr() != user_mods[n.target].weight_ih.data_ptr() if hasattr(
            mods[n.target], "weight_ih") else True
    # no ATen op on a layer module's weights survives normalisation (MHA's in_proj is no module)
    weights = {f"{p}.weight" for p in expected}
    aten_layers = [n for n in gm.graph.nodes if n.op == "call_function"
                   and any(getattr(a, "target", None) in weights for a in n.args)]
    assert aten_layers == []
    # shapes everywhere
    for n in gm.graph.nodes:
        if n.op not in ("output",) and n.target != "_guards_fn":
            assert "val" in n.meta, n.name
    # state_dict: same keys, loads into the model strictly
    assert set(gm.state_dict()) == set(model.state_dict())
    fresh = zoo.build(name)
    fresh.load_state_dict(gm.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(*args), ref)


def test_capture_never_aliases_parameters():
    model = zoo.MLP()
    gm = capture(model, model.example_inputs())
    before = model.layers[0].weight.detach().clone()
    with torch.no_grad():
        gm.get_submodule("layers.0").weight.add_(1.0)
    assert torch.equal(model.layers[0].weight, before)


def test_training_flag_is_kept():
    model = zoo.MLP().train()
    gm = capture(model, model.example_inputs())
    assert gm.training and gm.meta["fxwormhole"]["training"] is True
    assert model.training
    gm.eval()  # export graphs are re-wrapped so .eval() works on them too
    gm2 = capture(zoo.SeqLenLoop().train(), zoo.example_inputs("SeqLenLoop"))
    gm2.eval()
    assert not gm2.training


def test_seq_len_loop_goes_through_export_and_is_normalised():
    model = zoo.SeqLenLoop(steps=4).eval()
    (x,) = model.example_inputs()
    gm = capture(model, (x,))
    assert gm.meta["fxwormhole"]["front_end"] == "export"
    assert "symbolic_trace" in gm.meta["fxwormhole"]["attempts"]
    assert "Proxy" in gm.meta["fxwormhole"]["attempts"]["symbolic_trace"]
    cells = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "cell"]
    assert len(cells) == 4 and gm.meta["fxwormhole"]["normalised"] == 5
    assert not any("gru_cell" in str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)
    # the first step starts from a fresh zero state: called as cell(x_t) like the module would
    assert len(cells[0].args) == 1 and all(len(c.args) == 2 for c in cells[1:])
    assert cells[1].args[1] is cells[0]
    # shared weights: one module, one set of parameters
    assert sum(1 for _ in gm.get_submodule("cell").parameters()) == 4
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # the export front end specialised the loop to T=4: another T is refused, not silently wrong
    with pytest.raises(Exception):
        gm(torch.randn(4, 5, 6))


class _Exotic(nn.Module):
    """ATen forms normalisation must get right, or leave alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.same = nn.Conv1d(6, 6, 3, padding="same", bias=False)
        self.circ = nn.Conv1d(6, 6, 3, padding=1, padding_mode="circular")  # pads itself: stays ATen
        self.lstm = nn.LSTM(6, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(10, 4)  # seq-first
        self.cell = nn.LSTMCell(4, 3)
        self.shared = nn.Linear(3, 3)

    def forward(self, x, h0, c0):
        y = self.conv(x).flatten(2)                     # [B, 6, 16]
        y = self.circ(self.same(y)).transpose(1, 2)     # [B, 16, 6]
        out, (h, c) = self.lstm(y, (h0, c0))            # explicit initial state
        g, hn = self.gru(out.transpose(0, 1))           # [16, B, 4]
        hc = None
        for t in range(3):
            hc = self.cell(g[t], hc)
        z = self.shared(self.shared(hc[0]) * hc[1])     # one module called twice
        return z + hn.sum() + h.mean() + c.mean()


def _exotic_inputs():
    return (torch.randn(2, 4, 8, 8), torch.randn(4, 2, 5), torch.randn(4, 2, 5))


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_exotic_layers_match_and_normalise(front_end):
    model = _Exotic().eval()
    args = _exotic_inputs()
    gm = capture(model, args, front_end=front_end)
    torch.testing.assert_close(gm(*args), model(*args), rtol=0, atol=0)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert targets.count("shared") == 2 and targets.count("cell") == 3
    assert {"conv", "same", "lstm", "gru"} <= set(targets)
    if front_end == "export":
        assert "circ" not in targets  # circular padding is F.pad + conv(padding=0), not the module's op
        lstm = next(n for n in gm.graph.nodes if n.target == "lstm")
        assert isinstance(lstm.args[1], tuple) and len(lstm.args[1]) == 2  # (h0, c0) kept
        # aten.lstm's (out, h, c) is re-read from nn.LSTM's (out, (h, c))
        h_reads = [u for u in lstm.users if u.target is operator.getitem and u.args[1] == 1]
        assert len(h_reads) == 1 and all(u.target is operator.getitem for u in h_reads[0].users)
    sd = gm.state_dict()
    assert set(sd) <= set(model.state_dict())
    missing = set(model.state_dict()) - set(sd)
    assert missing <= {k for k in model.state_dict() if k.startswith("circ.")}


class _Kw(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x, h=None, *, scale=1.0, mask=None):
        if mask is not None:
            x = x * mask
        y = self.lin(x) * scale
        return y if h is None else y + h


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_kwargs_tensor_and_constant(front_end):
    model = _Kw()
    x, mask = torch.randn(2, 3), (torch.rand(2, 3) > 0.5).float()
    gm = capture(model, (x,), kwargs={"mask": mask, "scale": 2.0}, front_end=front_end)
    torch.testing.assert_close(gm(x, mask=mask, scale=2.0), model(x, mask=mask, scale=2.0))
    mask2 = torch.ones(2, 3)
    torch.testing.assert_close(gm(x, mask=mask2, scale=2.0), model(x, mask=mask2, scale=2.0))


def test_data_dependent_break_names_both_front_ends():
    model = zoo.DataDependentBreak()
    with pytest.raises(CaptureError) as info:
        capture(model, model.example_inputs())
    msg = str(info.value)
    assert "\n" not in msg
    assert "symbolic_trace failed" in msg and "export failed" in msg
    assert msg.count("zoo.py:") == 2 and "h.norm() < 1e-3" in msg   # the user's line, from each front end
    assert "torch.cond" in msg and "front_end=" in msg


def test_forced_front_end_reports_only_that_one():
    model = zoo.SeqLenLoop()
    with pytest.raises(CaptureError) as info:
        capture(model, model.example_inputs(), front_end="symbolic_trace")
    msg = str(info.value)
    assert "symbolic_trace failed" in msg and "export failed" not in msg
    assert "range(x.shape[1])" in msg


def test_bad_arguments():
    with pytest.raises(ConfigError, match="front_end"):
        capture(zoo.MLP(), torch.randn(2, 8), front_end="dynamo")
    with pytest.raises(ConfigError, match="nn.Module"):
        capture(lambda x: x, torch.randn(2, 8))


def test_single_tensor_example_and_functional_layer_call():
    class Functional(nn.Module):  # F.linear on a module's own weights becomes a call of that module
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(torch.tanh(self.a(x)), self.a.weight, self.a.bias)

    m = Functional()
    x = torch.randn(2, 4)
    gm = capture(m, x, front_end="export")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"] == ["a", "a"]
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["SeqLenLoop", "TransformerStack", "LSTMClassifier"])
def test_export_graph_accepts_another_batch(name):
    model = zoo.build(name).eval()
    gm = capture(model, model.example_inputs(batch=3), front_end="export")
    for batch in (5, 2):
        args = model.example_inputs(batch=batch)
        torch.testing.assert_close(gm(*args), model(*args))


def test_package_level_capture_is_callable_after_submodule_import():
    import fxwormhole
    import fxwormhole.capture  # noqa: F401  binds the package attribute to the module

    model = zoo.MLP()
    gm = fxwormhole.capture(model, model.example_inputs())
    assert gm.meta["fxwormhole"]["front_end"] == "symbolic_trace"


# ------------------------------------------------------------------------------------------------
# structured inputs, fixed keyword arguments, nn.Transformer masks (issue 16 classes 3 and 4)

Pair = collections.namedtuple("Pair", ["image", "features"])


@dataclasses.dataclass
class Batch:
    image: torch.Tensor
    features: torch.Tensor


class _TupleState(nn.Module):
    """word_language_model's pattern: forward(ids, (h0, c0))."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, ids, hidden):
        out, (h, c) = self.rnn(self.emb(ids), hidden)
        return self.out(out), (h, c)


class _Structured(nn.Module):
    """One argument that holds two tensors (a namedtuple, a dict, a list or a dataclass)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, batch):
        if isinstance(batch, dict):
            x, y = batch["image"], batch["features"]
        elif isinstance(batch, list):
            x, y = batch[0], batch[1]
        else:
            x, y = batch.image, batch.features
        return torch.tanh(self.a(x)) * self.b(y)


def _structured(kind, x, y):
    return {"namedtuple": Pair(x, y), "dict": {"image": x, "features": y}, "list": [x, y],
            "dataclass": Batch(x, y)}[kind]


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_tuple_state_argument_is_an_input_not_a_constant(front_end):
    model = _TupleState().eval()
    ids = torch.randint(0, 10, (6, 3))
    state = (torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    gm = capture(model, (ids, state), front_end=front_end)
    torch.testing.assert_close(gm(ids, state), model(ids, state), rtol=0, atol=0)
    other = (torch.randn(1, 3, 5), torch.randn(1, 3, 5))  # new values flow through the graph
    torch.testing.assert_close(gm(ids, other), model(ids, other), rtol=0, atol=0)


@pytest.mark.parametrize("kind,front_ends", [("namedtuple", ["symbolic_trace", "export"]),
                                             ("dict", ["symbolic_trace", "export"]),
                                             ("list", ["symbolic_trace", "export"]),
                                             ("dataclass", ["symbolic_trace"])])
def test_structured_argument_follows_the_graph_input_spec(kind, front_ends):
    model = _Structured()
    x, y = torch.randn(2, 6), torch.randn(2, 3)
    for front_end in front_ends:
        gm = capture(model, (_structured(kind, x, y),), front_end=front_end)
        torch.testing.assert_close(gm(_structured(kind, x, y)), model(_structured(kind, x, y)), rtol=0, atol=0)
        x2, y2 = torch.randn(2, 6), torch.randn(2, 3)
        torch.testing.assert_close(gm(_structured(kind, x2, y2)), model(_structured(kind, x2, y2)), rtol=0, atol=0)
    assert capture(model, (_structured(kind, x, y),)).meta["fxwormhole"]["front_end"] == "symbolic_trace"


def test_a_namedtuple_passed_as_example_inputs_is_one_argument():
    model = _Structured()
    batch = Pair(torch.randn(2, 6), torch.randn(2, 3))
    torch.testing.assert_close(capture(model, batch)(batch), model(batch), rtol=0, atol=0)


def test_a_graph_that_does_not_run_is_its_front_ends_failure(monkeypatch):
    """symbolic_trace's graph failing shape propagation: export is tried next, the inputs are not blamed."""
    import sys

    cap = sys.modules["fxwormhole.capture"]  # the package attribute is the function
    real = cap._FRONT_ENDS["symbolic_trace"]

    def broken(model, args, kwargs):
        gm, dropped = real(model, args, kwargs)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                with gm.graph.inserting_before(node):
                    cut = gm.graph.call_function(operator.getitem, (node.args[0], (slice(None), slice(0, 1))))
                node.args = (cut,)
                break
        gm.recompile()
        return gm, dropped

    monkeypatch.setitem(cap._FRONT_ENDS, "symbolic_trace", broken)
    model = zoo.MLP()
    x = model.example_inputs()[0]
    gm = capture(model, (x,))
    assert gm.meta["fxwormhole"]["front_end"] == "export"
    assert "symbolic_trace" in gm.meta["fxwormhole"]["attempts"]
    torch.testing.assert_close(gm(x), model(x))


def test_inputs_are_blamed_only_when_the_model_refuses_them():
    model = zoo.MLP()
    with pytest.raises(CaptureError, match=r"the example inputs do not fit the model: calling it on them failed "
                                           r"with RuntimeError: mat1 and mat2"):
        capture(model, (torch.randn(2, 3),))


class _CausalEncoder(nn.Module):
    def __init__(self, mask_from_input=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mask_from_input = mask_from_input

    def forward(self, src, mask=None):
        if mask is None:
            mask = nn.Transformer.generate_square_subsequent_mask(src.shape[1], device=src.device)
        return self.encoder(src, mask=mask)


@pytest.mark.parametrize("front_end", ["auto", "export"])
def test_transformer_encoder_with_a_mask_is_captured(front_end):
    """nn.TransformerEncoder compares the mask with a causal one (a data-dependent bool); capture
    leaves the is_causal hint off, so the mask is applied: the same numbers, for any mask."""
    model = _CausalEncoder().eval()
    x = torch.randn(2, 5, 8)
    gm = capture(model, (x,), front_end=front_end)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    from torch.nn.modules import transformer

    assert transformer._detect_is_causal_mask.__module__ == "torch.nn.modules.transformer"  # restored
    # a mask given as an input (not causal) is applied as given
    mask = torch.zeros(5, 5).masked_fill(torch.rand(5, 5) > 0.7, float("-inf")).fill_diagonal_(0.0)
    gm = capture(model, (x,), kwargs={"mask": mask}, front_end="export")
    torch.testing.assert_close(gm(x, mask=mask), model(x, mask=mask), rtol=1e-5, atol=1e-6)


class _KVCache:
    """Stands for transformers' DynamicCache: an object torch.export cannot return."""

    def __init__(self, keys):
        self.keys = keys


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, use_cache=True, **kwargs):
        h = torch.relu(self.a(x))
        return {"logits": self.b(h), "past_key_values": _KVCache(h) if use_cache else None}


def test_a_cache_output_is_captured_with_use_cache_false():
    model = _Decoder()
    x = torch.randn(2, 3, 4)
    gm = capture(model, (x,))
    record = gm.meta["fxwormhole"]
    assert record["front_end"] == "export" and record.fixed_kwargs == {"use_cache": False}
    out = gm(x)  # called as the user calls the model: use_cache is not an input of the graph
    assert out["past_key_values"] is None
    torch.testing.assert_close(out["logits"], model(x, use_cache=False)["logits"], rtol=0, atol=0)
    assert "use_cache" not in inspect.signature(gm.forward).parameters


def test_a_cache_the_user_asked_for_is_not_dropped():
    model = _Decoder()
    with pytest.raises(CaptureError, match="not a known type"):
        capture(model, (torch.randn(2, 3, 4),), kwargs={"use_cache": True})


class _KwMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x, *, mask=None, scale=1.0):
        h = torch.tanh(self.fc1(x * mask if mask is not None else x))
        return self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(h))))) * scale


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
def test_transform_and_instrument_take_kwargs(front_end):
    import fxwormhole as fw

    model = _KwMLP()
    x, mask = torch.randn(2, 3), (torch.rand(2, 3) > 0.5).float()
    kwargs = {"mask": mask, "scale": 2.0}
    net = fw.transform(model, (x,), kwargs=kwargs, front_end=front_end)
    assert len(net.wormholes) == 1
    torch.testing.assert_close(net(x, **kwargs), model(x, **kwargs), rtol=1e-5, atol=1e-6)
    mask2 = torch.ones(2, 3)
    torch.testing.assert_close(net(x, mask=mask2, scale=2.0), model(x, mask=mask2, scale=2.0), rtol=1e-5, atol=1e-6)
    probed = fw.instrument(model, (x,), kwargs=kwargs, front_end=front_end)
    torch.testing.assert_close(probed(x, **kwargs), model(x, **kwargs), rtol=0, atol=0)
