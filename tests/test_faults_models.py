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

import re
import warnings

import pytest
import torch
import torch.nn as nn

import fxwormhole as fw
from helpers import TinyLSTM, TinyMLP

pytestmark = pytest.mark.usefixtures("one_thread")

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
