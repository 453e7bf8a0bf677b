"""Fault injection on models and calls (issue 13, rows 9-11 and item 3): what a user gets for each
fault a model or its inputs can carry.

* state dicts: every ``load_state_dict`` error names the public keys ``state_dict()`` shows;
* rewritten models: transform / instrument / capture of a model fxwormhole already transformed,
  instrumented or exported is refused with a ``ConfigError`` that says so, where, and what to do;
* dead cycles: a wormhole nothing the model returns depends on is refused (``PlacementError``);
* inputs: NaN/Inf at the input and inside a fixed-point body (per-sample isolation), int / half /
  double inputs, zero-size and size-1 batches;
* buffers mutated in forward, on both front ends.

Each case: a typed :class:`FxWormholeError` subclass whose message says what, where and what to do,
or the documented correct behaviour (docs/reliability.md, "Faults in models and inputs"); the
user's model is unchanged (``helpers.snapshot`` / ``helpers.assert_unchanged``).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn

import fxwormhole as fw
from fxwormhole.errors import CaptureError, ConfigError, FxWormholeError, PlacementError
from fxwormhole.passes.temporal_wormhole import add_temporal_wormhole
from fxwormhole.runtime.fixed_point import FixedPoint
from fxwormhole.runtime.stats import CONVERGED, MAX_ITER, NON_FINITE, failure_advice
from helpers import TinyLSTM, TinyMLP, assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

EXPORT = importlib.import_module("fxwormhole.export")  # the module (fxwormhole.export is the function)
X = torch.randn(6, 5)
SEQ = torch.randn(3, 4, 3)
#: an open wormhole fc3 -> fc1 that iterates (5-7 evaluations per sample)
OPEN = fw.WormholeConfig(wormholes=[("fc3", "fc1")], gate_init=0.0, proj_init="normal", proj_std=0.3, tol=1e-6,
                         max_iter=60)
INTERNAL = re.compile(r"fixed_point_\d+\.|\.body\.|\.feedback\.")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ============================================================================ state dicts (row 9)
def _mlp_net() -> nn.Module:
    return fw.transform(TinyMLP(), (X,), OPEN)


def _sal_net() -> nn.Module:
    return fw.transform(TinyMLP(), (X,), OPEN, sal=fw.SALConfig())


def _lstm_net() -> nn.Module:
    return fw.transform(TinyLSTM(), (SEQ,))


# (id, factory, a public key of a parameter inside a cycle)
NETS = [("fixed point", _mlp_net, "fc2.weight"), ("fixed point with SAL probes", _sal_net, "fc2.weight"),
        ("temporal wormholes", _lstm_net, "rnn.weight_hh_l1")]


def _load_error(net: nn.Module, state: dict, strict: bool = True) -> str:
    with pytest.raises(RuntimeError) as info:
        net.load_state_dict(state, strict=strict)
    return str(info.value)


@pytest.mark.parametrize("name, factory, key", NETS, ids=[n[0] for n in NETS])
def test_load_state_dict_errors_name_the_public_keys(name, factory, key):
    net = factory()
    good = net.state_dict()
    assert key in good and not any(INTERNAL.search(k) for k in good), list(good)
    cases = {
        "size mismatch": ({**good, key: torch.zeros(2, 2)}, [f"size mismatch for {key}:"]),
        "missing": ({k: v for k, v in good.items() if k != key}, [f'Missing key(s) in state_dict: "{key}"']),
        "unexpected": ({**good, "nope.weight": torch.zeros(1)}, ['Unexpected key(s) in state_dict: "nope.weight"']),
        "not a tensor": ({**good, key: [1.0, 2.0]}, [f'While copying the parameter named "{key}"']),
    }
    for case, (state, phrases) in cases.items():
        message = _load_error(net, state)
        for phrase in phrases:
            assert phrase in message, f"{case}: {phrase!r} not in {message!r}"
        assert not INTERNAL.search(message), f"{case}: an internal path in {message!r}"
    net.load_state_dict(good)  # and the public keys still load


def test_load_state_dict_errors_of_a_transformed_submodule_keep_the_parent_prefix():
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.net, self.extra = inner, nn.Linear(3, 3)

        def forward(self, x):
            return self.extra(self.net(x))

    wrapper = Wrapper(_mlp_net())
    good = wrapper.state_dict()
    assert "net.fc2.weight" in good
    message = _load_error(wrapper, {**good, "net.fc2.weight": torch.zeros(2, 2), "net.fc1.bias": torch.zeros(9)})
    assert "size mismatch for net.fc2.weight:" in message and "size mismatch for net.fc1.bias:" in message, message
    assert not INTERNAL.search(message), message
    result = wrapper.load_state_dict({k: v for k, v in good.items() if k != "net.fc3.bias"}, strict=False)
    assert result.missing_keys == ["net.fc3.bias"] and result.unexpected_keys == []


def test_a_layer_shared_inside_and_outside_a_cycle_is_reported_once():
    class Shared(nn.Module):
        """fc2 is called inside the cycle fc3 -> fc1 and again after it."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            h = torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))
            return self.fc2(h)

    net = fw.transform(Shared(), (X,), fw.WormholeConfig(wormholes=[("fc3", "fc1")]))
    internal = [n for n, _ in net.named_parameters(remove_duplicate=False) if n.endswith("fc2.weight")]
    assert len(internal) == 2, internal  # the case this test is about: two internal names, one public
    message = _load_error(net, {**net.state_dict(), "fc2.weight": torch.zeros(2, 2)})
    assert message.count("size mismatch for fc2.weight:") == 1, message


# ==================================================================== rewritten models (row 10)
@pytest.fixture(scope="module")
def exported_artifact(tmp_path_factory) -> nn.Module:
    """A transformed model exported and loaded back (once: export takes seconds)."""
    net = fw.transform(TinyMLP(), (X,)).eval()
    path = tmp_path_factory.mktemp("exported") / "net.pt2"
    fw.export(net, (X,), path)
    return EXPORT.load(path)


def _exported(fixture):
    return fixture("exported_artifact")


class Around(nn.Module):
    """A user model that holds a transformed one as a submodule."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.head = inner, nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.inner(x))


class HandBuiltDEQ(nn.Module):
    """A user model with an fxwormhole FixedPoint written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.deq = FixedPoint(nn.Sequential(nn.Linear(6, 6), nn.Tanh()))  # z = tanh(W z): its own body
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.deq(h) + h)


def _with_temporal_wormholes() -> nn.Module:
    """A user model whose LSTM was given temporal wormholes by hand (not by ``transform``)."""
    model = TinyLSTM()
    model.rnn = add_temporal_wormhole(model.rnn, fw.WormholeConfig(wormholes="auto"))
    return model


# (id, build the model (fixture getter) -> model, call(model, front_end), phrases: what, where, what to do)
REWRITTEN = [
    ("transform of a transformed model", lambda t: fw.transform(TinyMLP(), (X,)),
     lambda m, fe: fw.transform(m, (X,), front_end=fe),
     ["the model (TransformedModule) is already transformed by fxwormhole.transform", "fixed_point_0",
      "transform the original model"]),
    ("transform of a transformed recurrent model", lambda t: _lstm_net(),
     lambda m, fe: fw.transform(m, (SEQ,), front_end=fe),
     ["already transformed by fxwormhole.transform", "rnn", "transform the original model"]),
    ("transform of a model whose LSTM has temporal wormholes", lambda t: _with_temporal_wormholes(),
     lambda m, fe: fw.transform(m, (SEQ,), front_end=fe),
     ["submodule 'rnn' of TinyLSTM is already transformed by fxwormhole's add_temporal_wormhole",
      "transform the original model"]),
    ("transform of a model that holds a transformed one", lambda t: Around(fw.transform(TinyMLP(), (X,))),
     lambda m, fe: fw.transform(m, (X,), front_end=fe),
     ["submodule 'inner' of Around is already transformed", "transform the original model"]),
    ("instrument of a transformed model", lambda t: fw.transform(TinyMLP(), (X,)),
     lambda m, fe: fw.instrument(m, (X,), fw.SALConfig(), front_end=fe),
     ["already transformed by fxwormhole.transform", "sal=SALConfig(...)"]),
    ("capture of a transformed model", lambda t: fw.transform(TinyMLP(), (X,)),
     lambda m, fe: fw.capture(m, (X,), front_end=fe),
     ["already transformed by fxwormhole.transform", "transform the original model"]),
    ("instrument of an instrumented model", lambda t: fw.instrument(TinyMLP(), (X,), fw.SALConfig()),
     lambda m, fe: fw.instrument(m, (X,), fw.SALConfig(), front_end=fe),
     ["already instrumented by fxwormhole.instrument", "sal_probe_fc1", "fxwormhole.SAL(model).configure"]),
    ("transform of an instrumented model", lambda t: fw.instrument(TinyMLP(), (X,), fw.SALConfig()),
     lambda m, fe: fw.transform(m, (X,), front_end=fe),
     ["already instrumented by fxwormhole.instrument", "transform the original model with sal=SALConfig"]),
    ("transform of an exported artifact", _exported, lambda m, fe: fw.transform(m, (X,), front_end=fe),
     ["an inference-only artifact loaded by fxwormhole.export.load", "net.pt2", "transform the original model"]),
    ("instrument of an exported artifact", _exported, lambda m, fe: fw.instrument(m, (X,), front_end=fe),
     ["an inference-only artifact", "net.pt2", "the original model"]),
    ("transform of a model with a hand-built FixedPoint", lambda t: HandBuiltDEQ(),
     lambda m, fe: fw.transform(m, (X,), front_end=fe),
     ["submodule 'deq' of HandBuiltDEQ is an fxwormhole FixedPoint", "neither front end can trace", "transform the modules around it"]),
]


@pytest.mark.parametrize("front_end", ["auto", "symbolic_trace", "export"])
@pytest.mark.parametrize("case", REWRITTEN, ids=[c[0] for c in REWRITTEN])
def test_rewritten_models_are_refused_with_what_to_do(case, front_end, request):
    _, build, call, phrases = case
    model = _quiet(build, request.getfixturevalue)
    snap = snapshot(model)
    with pytest.raises(ConfigError) as info:
        call(model, front_end)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert "Proxy" not in message and "could not capture" not in message, message
    assert_unchanged(model, snap)


def test_transform_with_sal_is_the_supported_way_to_get_both():
    """What the refusals point to: one transform with ``sal=`` gives wormholes and probes."""
    net = fw.transform(TinyMLP(), (X,), OPEN, sal=fw.SALConfig())
    assert net.fixed_point_modules() and fw.SAL(net).probes


# ========================================================================= dead cycles (row 11)
class ReturnsNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))))
        return None


class DiscardsItsTrunk(ReturnsNone):
    """Computes fc1..head and throws the result away; returns a side branch of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(5, 2)

    def forward(self, x):
        super().forward(x)
        return self.side(x)


class DiscardsItsRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.side = nn.GRU(3, 5, num_layers=2, batch_first=True), nn.Linear(3, 2)

    def forward(self, x):
        self.rnn(x)
        return self.side(x[:, -1])


DEAD = [
    ("forward returns None, explicit pair", ReturnsNone, X, [("fc3", "fc1")],
     ["wormhole_0 (fc3 -> fc1)", "forward returns no tensor", "return a value computed"]),
    ("forward returns None, auto", ReturnsNone, X, "auto",
     ["wormhole_0 (", "chosen by wormholes='auto'", "forward returns no tensor"]),
    ("the trunk is discarded", DiscardsItsTrunk, X, [("fc3", "fc1")],
     ["wormhole_0 (fc3 -> fc1)", "nothing the model returns depends on it", "place the wormhole between layers"]),
    ("a recurrent module is discarded", DiscardsItsRNN, SEQ, "auto",
     ["temporal wormhole", "'rnn'", "layer1 -> layer0", "nothing the model returns depends on it"]),
]


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
@pytest.mark.parametrize("case", DEAD, ids=[c[0] for c in DEAD])
def test_a_cycle_nothing_depends_on_is_refused(case, front_end):
    _, cls, x, wormholes, phrases = case
    model = cls()
    snap = snapshot(model)
    with pytest.raises(PlacementError) as info:
        fw.transform(model, (x,), fw.WormholeConfig(wormholes=wormholes), front_end=front_end)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert_unchanged(model, snap)


def test_a_live_cycle_next_to_dead_code_is_kept():
    """Only the dead cycle is refused: a wormhole on the returned path of the same model is fine."""
    class DeadBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.aux, self.head = nn.Linear(6, 4), nn.Linear(6, 2)

        def forward(self, x):
            h = torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))
            self.aux(h)  # an auxiliary head whose output is thrown away
            return self.head(h)

    model = DeadBranch()
    net = _quiet(fw.transform, model, (X,), OPEN)
    assert list(net.fixed_point_modules()) == ["fixed_point_0"]
    out = _quiet(net, X)
    assert out.shape == (6, 2) and int(net.fixed_point_stats()["fixed_point_0"].iterations.max()) > 1


# ================================================================================ inputs (item 3)
def _with_nonfinite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 2], x[4, 0], x[5, 1] = float("nan"), float("inf"), -float("inf")
    return x


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
@pytest.mark.parametrize("config", [None, OPEN], ids=["closed", "open"])
def test_nan_and_inf_inputs_stay_in_their_own_samples(config, front_end):
    """Each sample gets exactly what it gets alone in the batch; a NaN sample's output is NaN, its
    status ``non_finite``, and one RuntimeWarning names the node. (An Inf saturated by tanh gives a
    finite output in the original too, and converges.) Closed gates: exactly the original's numbers."""
    model = TinyMLP()
    net = fw.transform(model, (X,), config, front_end=front_end)
    x = _with_nonfinite(X)
    with torch.no_grad():
        alone = torch.cat([_quiet(net, x[i:i + 1]) for i in range(len(x))])
        with pytest.warns(RuntimeWarning, match="'fixed_point_0'.*1 of 6 samples"):
            y = net(x)
        want = model(x)
    stats = net.fixed_point_stats()["fixed_point_0"]
    torch.testing.assert_close(y, alone, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3, 4, 5]]).all()
    assert stats.status.tolist() == [CONVERGED, NON_FINITE] + [CONVERGED] * 4
    if config is None:
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7, equal_nan=True)


SOLVER_ADVICE = "raise max_iter"  # the start of the solver hint (_loop._HINT, temporal._HINT)
#: the open temporal config of the warning tests (iterates 3 times a step on TinyLSTM)
OPEN_LSTM = fw.WormholeConfig(gate_init=0.0, proj_init="normal", proj_std=0.5)


def _warnings_of(fn, *args) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    return [w for w in caught if "did not converge" in str(w.message)]


def _forward_and_backward(net: nn.Module, x: torch.Tensor) -> None:
    net(x).nan_to_num().sum().backward()


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
@pytest.mark.parametrize("model, x, config", [
    (TinyMLP, X, fw.WormholeConfig()), (TinyMLP, X, OPEN), (TinyLSTM, SEQ, OPEN_LSTM)],
    ids=["closed gate", "open gate", "temporal"])
def test_a_nan_input_is_reported_as_a_non_finite_input_not_as_a_solver_problem(model, x, config, front_end):
    """Issue 13 row 7: a NaN sample fails at the first evaluation, before any solver step, so the
    forward message names the sample and says its input or activations were non-finite, and the
    adjoint's says its incoming gradient or forward values were; neither advises max_iter or damping
    (which cannot help), with the gate closed or open, for fixed points and temporal wormholes. The
    forward text is read from on_fail='raise' (the same text the warning carries), the adjoint's
    from the warning of a backward pass recorded on its own."""
    bad = x.clone()
    bad[1].view(-1)[2] = float("nan")
    strict = fw.transform(model(), (x,), dataclasses.replace(config, on_fail="raise"), front_end=front_end)
    with pytest.raises(fw.ConvergenceError) as info:
        strict(bad)
    forward = str(info.value)
    net = fw.transform(model(), (x,), config, front_end=front_end)
    y = _quiet(net, bad)
    (backward,) = (str(w.message) for w in _warnings_of(lambda: y.nan_to_num().sum().backward()))
    assert "forward solve" in forward and "backward (adjoint) solve" in backward
    assert "sample 1 was non-finite (NaN/Inf) at the first evaluation" in forward, forward
    assert "the input of that sample" in forward and "torch.isfinite(x)" in forward, forward
    assert "sample 1 was non-finite" in backward and "the gradient arriving from the loss" in backward, backward
    for message in (forward, backward):
        assert SOLVER_ADVICE not in message, f"solver advice for a non-finite input: {message}"


def test_a_solve_that_does_not_converge_still_gets_the_solver_advice():
    """The other side of row 7: samples that fail while iterating are told what to change."""
    net = fw.transform(TinyMLP(), (X,), dataclasses.replace(OPEN, max_iter=3))
    (message,) = (str(w.message) for w in _warnings_of(net, X))
    assert "to fix: " + SOLVER_ADVICE in message and "non-finite" not in message, message


def test_a_nan_sample_among_samples_that_do_not_converge_gets_both_causes():
    net = fw.transform(TinyMLP(), (X,), dataclasses.replace(OPEN, max_iter=3))
    (message,) = (str(w.message) for w in _warnings_of(net, _with_nonfinite(X)))
    status = net.fixed_point_stats()["fixed_point_0"].status
    assert status[1] == NON_FINITE and int((status == MAX_ITER).sum()) > 0  # both causes in one batch
    others = int((status != CONVERGED).sum()) - 1
    assert "sample 1 was non-finite (NaN/Inf) at the first evaluation" in message, message
    assert f"to fix the other failures ({others} samples): " + SOLVER_ADVICE in message, message


def test_a_temporal_step_that_blows_up_is_a_solver_problem_not_an_input_one():
    """NaN born while iterating (iterations > 1 at that step) is carried into the later steps, where
    it is present at their first evaluation: the sample is still the solver's, not its input's."""
    status = torch.tensor([[0, 0], [NON_FINITE, 0], [NON_FINITE, 0]], dtype=torch.int8)  # [T, B]: sample 0 blew up at step 1
    iterations = torch.tensor([[3, 3], [9, 3], [1, 3]])
    assert failure_advice(status, iterations, "forward", "HINT") == "to fix: HINT"
    iterations[1, 0] = 1  # non-finite from the first evaluation of step 1 on: the input
    assert failure_advice(status, iterations, "forward", "HINT").startswith("sample 0 was non-finite")


class LogInBody(nn.Module):
    """``log`` inside the cycle: a sample whose activation turns negative goes NaN inside the body."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.log(self.fc2(h).abs() + x[:, :1])  # x[:, 0] < -|fc2| -> NaN for that sample only
        return self.head(torch.tanh(self.fc3(h)))


def test_nan_inside_the_body_stays_in_its_sample():
    model = LogInBody()
    x = X.abs() + 1.0
    x[3, 0] = -50.0  # only sample 3 takes the log of a negative number
    with torch.no_grad():
        want = model(x)
    assert torch.isnan(want[3]).all() and torch.isfinite(want[[0, 1, 2, 4, 5]]).all()
    net = fw.transform(model, (X.abs() + 1.0,), fw.WormholeConfig(wormholes=[("fc3", "fc1")]))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="fixed_point_0"):
        y = net(x)
    ok = [0, 1, 2, 4, 5]
    assert torch.isnan(y[3]).all()
    torch.testing.assert_close(y[ok], want[ok], rtol=1e-6, atol=1e-7)
    assert net.fixed_point_stats()["fixed_point_0"].status.tolist() == [CONVERGED] * 3 + [NON_FINITE] + [CONVERGED] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_a_float32_model_called_with_another_float_dtype_raises_what_the_original_raises(dtype):
    model = TinyMLP()
    net = fw.transform(model, (X,), OPEN)
    with pytest.raises(RuntimeError) as original:
        model(X.to(dtype))
    with pytest.raises(RuntimeError) as transformed:
        _quiet(net, X.to(dtype))
    assert str(transformed.value) == str(original.value)


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
@pytest.mark.parametrize("grad", ["implicit", "phantom", "jfb", "unrolled"])
@pytest.mark.parametrize("config", [None, OPEN], ids=["closed", "open"])
def test_a_float32_model_called_with_int64_raises_torchs_dtype_error(config, grad, front_end):
    """Issue 13 row 8: the original's error (torch's dtype mismatch at fc1), with and without
    autograd, not 'only Tensors of floating point dtype can require gradients' from the runtime
    (which made the integer state of the fixed point a leaf requiring grad)."""
    model = TinyMLP()
    config = dataclasses.replace(config or fw.WormholeConfig(), grad=fw.GradConfig(mode=grad))
    net = fw.transform(model, (X,), config, front_end=front_end)
    ids = torch.randint(0, 3, (6, 5))
    with pytest.raises(RuntimeError) as original:
        model(ids)
    for autograd in (True, False):
        with torch.set_grad_enabled(autograd), pytest.raises(RuntimeError) as transformed:
            net(ids)
        assert str(transformed.value) == str(original.value), (autograd, str(transformed.value))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("config", [None, OPEN_LSTM], ids=["closed", "open"])
def test_a_transformed_lstm_called_with_another_dtype_raises_what_nn_lstm_raises(config, dtype):
    """Row 8 for recurrent models: nn.LSTM refuses the dtype with a ValueError saying what to
    convert; the explicit LSTM that replaces it said 'mat1 and mat2 must have the same dtype' (a
    RuntimeError, which code catching the original's ValueError would miss)."""
    model = TinyLSTM()
    net = fw.transform(model, (SEQ,), config)
    x = (SEQ * 3).to(dtype)
    with pytest.raises(ValueError) as original:
        model(x)
    with pytest.raises(ValueError) as transformed:
        net(x)
    assert isinstance(transformed.value, FxWormholeError)
    assert str(transformed.value).endswith(": " + str(original.value)), str(transformed.value)


def test_a_float64_model_transforms_and_equals_the_original():
    model = TinyMLP().double()
    x = X.double()
    net = fw.transform(model, (x,), OPEN)
    with torch.no_grad():
        closed = fw.transform(model, (x,))(x)
        torch.testing.assert_close(closed, model(x), rtol=1e-12, atol=1e-14)
        assert _quiet(net, x).dtype == torch.float64


def test_integer_inputs_that_feed_an_embedding_are_fine():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc1, self.fc2, self.fc3 = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, ids):
            h = torch.tanh(self.fc1(self.emb(ids).mean(1)))
            return self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(h)))))

    model, ids = Tokens(), torch.randint(0, 10, (4, 3))
    net = fw.transform(model, (ids,), fw.WormholeConfig(wormholes=[("fc3", "fc1")]))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), model(ids), rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError) as original:
        model(ids.float())
    with pytest.raises(RuntimeError) as transformed:
        net(ids.float())
    assert str(transformed.value) == str(original.value)


@pytest.mark.parametrize("front_end", ["symbolic_trace", "export"])
@pytest.mark.parametrize("batch", [0, 1])
def test_zero_size_and_size_one_batches(batch, front_end):
    """Calls: the output and the gradients of the original (zeros for an empty batch). Example inputs:
    a batch of 0 or 1 must not fix the batch size of the result (torch.export specialises 0 and 1)."""
    model = TinyMLP()
    snap = snapshot(model)
    net = fw.transform(model, (torch.randn(batch, 5),), front_end=front_end)
    assert_unchanged(model, snap)
    for b in (0, 1, 4):
        x = torch.randn(b, 5, requires_grad=True)
        y, want = net(x), model(x)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-7)
        grads = torch.autograd.grad(y.square().sum(), [x, *net.parameters()], allow_unused=True)
        ref = torch.autograd.grad(want.square().sum(), [x, *model.parameters()])
        torch.testing.assert_close(grads[0], ref[0], rtol=1e-5, atol=1e-7)
        named = dict(zip([n for n, _ in net.named_parameters()], grads[1:]))
        for (name, _), g in zip(model.named_parameters(), ref[1:]):
            internal = next(n for n in named if fw.transformed.public_name(n) == name)
            torch.testing.assert_close(named[internal], g, rtol=1e-5, atol=1e-7)
        assert net.fixed_point_stats()["fixed_point_0"].iterations.shape == (b,)


# ================================================================= buffers mutated in forward (item 3)
class Counted(nn.Module):
    """A layer that counts its calls in a buffer, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.lin = nn.Linear(6, 6)

    def forward(self, h):
        self.calls.add_(1)
        return self.lin(h)


class CounterInTheCycle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc3, self.head = nn.Linear(5, 6), Counted(), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc3(torch.tanh(self.mid(torch.tanh(self.fc1(x)))))))


def test_a_counter_inside_the_cycle_counts_calls_not_iterations_with_export():
    model = CounterInTheCycle()
    snap = snapshot(model)
    net = fw.transform(model, (X,), OPEN, front_end="export")
    assert_unchanged(model, snap)
    assert int(net.state_dict()["mid.calls"]) == 0
    for calls in (1, 2):
        y = _quiet(net, X)
        assert int(net.fixed_point_stats()["fixed_point_0"].iterations.min()) > 1
        assert int(net.state_dict()["mid.calls"]) == calls
    assert y.shape == (6, 2)


def test_symbolic_trace_refuses_a_mutated_buffer_and_says_to_use_export():
    model = CounterInTheCycle()
    snap = snapshot(model)
    with pytest.raises(CaptureError) as info:
        fw.transform(model, (X,), OPEN, front_end="symbolic_trace")
    message = str(info.value)
    assert "'mid.calls' in place" in message and "front_end='export'" in message, message
    assert "data-dependent" not in message, f"advice that does not fit this model: {message}"
    assert_unchanged(model, snap)


class BNInTheCycle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x)))
        return self.head(torch.tanh(self.fc3(torch.tanh(self.fc2(h)))))


def _bn_step(front_end: str, before_call=None) -> nn.Module:
    model = BNInTheCycle().train()
    snap = snapshot(model)
    net = fw.transform(model, (X,), OPEN, front_end=front_end)
    assert_unchanged(model, snap)
    if before_call is not None:
        before_call(net)
    _quiet(net, X)
    assert int(net.fixed_point_stats()["fixed_point_0"].iterations.min()) > 1
    return net


def test_batchnorm_inside_the_cycle_updates_its_statistics_once_per_call_with_export():
    net = _bn_step("export")
    assert int(net.state_dict()["bn.num_batches_tracked"]) == 1


def test_batchnorm_inside_the_cycle_updates_its_statistics_once_per_call_with_symbolic_trace():
    seen = []  # the batch-norm inputs of every body evaluation; the last one is at the fixed point

    def record(net):
        net.get_submodule("fixed_point_0.body.bn").register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))

    net = _bn_step("symbolic_trace", record)
    state = net.state_dict()
    assert int(state["bn.num_batches_tracked"]) == 1
    momentum = net.get_submodule("fixed_point_0.body.bn").momentum
    torch.testing.assert_close(state["bn.running_mean"], momentum * seen[-1].mean(0), rtol=1e-5, atol=1e-7)


# ============================================================================ reports (row 12)
# (the other half of row 12, repr of the solver statistics, is on branch ux2: tests/test_report.py)
def test_probes_never_updated_report_n_a_not_zero():
    """Row 12: a probe that has not measured anything reported log-sensitivity +0.0000 (the edge of
    chaos, a plausible and good-looking value), s_bar 0 and 100 % below target; its figures are NaN
    and the tables print n/a until the first training-mode update, after which they are the buffers'."""
    net = fw.transform(TinyMLP(), (X,), OPEN, sal=fw.SALConfig())
    sal = fw.SAL(net)
    rows = fw.sensitivity_report(net).rows
    assert rows and all(r.updates == 0 for r in rows)
    assert all(math.isnan(v) for r in rows for v in (r.mean_s_bar, r.log_rms_s, r.below_target))
    assert math.isnan(sal.mean_s_bar()) and all(math.isnan(v) for v in sal.log_sensitivity().values())
    assert math.isnan(fw.sensitivity_report(net).mean_log_rms())
    for table in (str(fw.sensitivity_report(net)), str(fw.report(net))):
        probe_lines = [ln for ln in table.splitlines() if ln.startswith(("fc1 ", "fc2 "))]
        assert probe_lines and all(ln.split().count("n/a") == 3 and "+0.0000" not in ln for ln in probe_lines), table
    assert not [k for k in fw.report(net).metrics() if k.startswith("sensitivity/")]
    net.train()
    _quiet(_forward_and_backward, net, X)
    rows = {r.layer: r for r in fw.sensitivity_report(net).rows}
    probe = next(p for p in fw.SAL(net).probes.values() if fw.transformed.public_name(p.layer) == "fc2")
    assert rows["fc2"].updates >= 1 and rows["fc2"].log_rms_s == float(probe.log_rms)
    assert sal.log_sensitivity()[probe.layer] == float(probe.log_rms) and not math.isnan(sal.mean_s_bar())
    assert "n/a" not in str(fw.sensitivity_report(net))
    assert fw.report(net).metrics()["sensitivity/fc2/log_rms"] == float(probe.log_rms)


# ================================================================================ export (item 3)
@pytest.mark.parametrize("config", [fw.WormholeConfig(), OPEN_LSTM], ids=["closed", "open"])
def test_export_of_temporal_wormholes_is_refused_with_what_is_true(config, tmp_path):
    """torch.export cannot trace the temporal runtime (open or closed gates): fxwormhole.export used
    to fail after tracing with 'rewrite the named op/line so torch.export can trace it', pointing at
    fxwormhole's runtime/temporal.py; it now refuses before tracing, names the module and says what
    works, and writes nothing."""
    net = fw.transform(TinyLSTM(), (SEQ,), config)
    snap = snapshot(net)
    with pytest.raises(fw.ExportError) as info:
        fw.export(net, (SEQ,), tmp_path / "net.pt2")
    message = str(info.value)
    assert "'rnn' has temporal wormholes" in message and "fxwormhole.save" in message, message
    assert "rewrite the named" not in message and "temporal.py" not in message, message
    assert list(tmp_path.iterdir()) == []
    assert_unchanged(net, snap)
