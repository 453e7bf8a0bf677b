"""The default scalar gate under FSDP2: its logit has shape [1] (fully_shard refuses 0-d parameters),
and state dicts written with the former 0-d logit still load.

References: the gradients of a one-process FSDP2 model equal plain autograd on an unsharded copy;
a loaded 0-d logit equals the value written.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import fxwormhole
from fxwormhole import WormholeConfig, zoo
from fxwormhole.runtime.wormhole import Gate

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = WormholeConfig(wormholes=[("layers.2", "layers.0")], gate_init=-1.0, proj_init="normal", proj_std=0.3)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return fxwormhole.transform(zoo.MLP(), (torch.randn(4, 8),), CONFIG)


def test_scalar_logit_is_one_element_and_broadcasts_as_before():
    gate = Gate("scalar", (4, 16), (4, 16), init=0.3)
    assert gate.logit.shape == (1,)
    h = torch.randn(4, 16)
    assert torch.equal(gate(h) * h, torch.sigmoid(torch.tensor(0.3)) * h)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_fully_shard_takes_the_default_scalar_gate_and_gives_autograd_gradients():
    from torch.distributed.fsdp import fully_shard

    net = _net()
    reference = copy.deepcopy(net)
    x = torch.randn(6, 8)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        fully_shard(net)
        net(x).square().mean().backward()
        grads = {n: p.grad.full_tensor() for n, p in net.named_parameters()}
    finally:
        dist.destroy_process_group()
    reference(x).square().mean().backward()
    want = dict(reference.named_parameters())
    assert grads.keys() == want.keys() and any("gate.logit" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_state_dict_with_a_0d_logit_still_loads():
    net = _net()
    old = net.state_dict()
    keys = [k for k in old if k.endswith("gate.logit")]
    assert keys
    for k in keys:
        old[k] = torch.tensor(0.25)  # what earlier versions wrote: a 0-d tensor
    fresh = _net()
    fresh.load_state_dict(old)
    for k in keys:
        assert fresh.state_dict()[k].shape == (1,) and float(fresh.state_dict()[k]) == 0.25
