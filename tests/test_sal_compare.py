"""The comparison harness: packed seeds train exactly like separate networks (SAL included)."""
import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from fxwormhole.config import SALConfig
from fxwormhole.instrument import instrument
from fxwormhole.lyapunov import lyapunov_exponents
from fxwormhole.runtime.sensitivity import probes_of

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


cmp = load("sal_compare")


@pytest.mark.parametrize("separate", [False, True])
def test_packed_seeds_get_exactly_their_own_sal_and_task_gradients(separate):
    nets = [cmp.small_mlp(6, s).double() for s in (0, 1, 2)]
    for net in nets:  # a non-trivial state: SAL's x-term and gate matter
        for p in net.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    packed = cmp.Packed(nets)
    cfg = SALConfig(eta=0.7, separate_step=separate)
    model = instrument(packed.net, (torch.zeros(2, 6, dtype=torch.float64),), cfg).train()
    singles = [instrument(net, (torch.zeros(2, 2, dtype=torch.float64),), cfg).train() for net in nets]
    gen = torch.Generator().manual_seed(0)
    for step in range(2):  # step 2: the gates come from the updated s_bar
        xs = [torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in nets]
        ys = [torch.rand(8, generator=gen, dtype=torch.float64).round() for _ in nets]
        model.zero_grad()
        F.binary_cross_entropy_with_logits(model(torch.cat(xs, 1)), torch.stack(ys, 1), reduction="sum").div(8).backward()
        packed.mask_grads(model)
        for s, single in enumerate(singles):
            single.zero_grad()
            F.binary_cross_entropy_with_logits(single(xs[s]).squeeze(1), ys[s]).backward()
        if separate:  # SAL's update is in the probes' buffers: fold it into .grad to compare
            for m in [model, *singles]:
                for p, update in (pu for probe in probes_of(m).values() for pu in probe.sal_updates()):
                    p.grad.add_(update)
                    update.zero_()
        for k, lin in enumerate(packed._linears(model)):
            o, i = lin.weight.shape[0] // 3, lin.weight.shape[1] // 3
            for s, single in enumerate(singles):
                ref = single.get_submodule(str(2 * k))
                torch.testing.assert_close(lin.weight.grad[s * o:(s + 1) * o, s * i:(s + 1) * i], ref.weight.grad,
                                           rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(lin.bias.grad[s * o:(s + 1) * o], ref.bias.grad, rtol=1e-10, atol=1e-12)
            assert float(lin.weight.grad.abs().sum()) == pytest.approx(
                sum(float(single.get_submodule(str(2 * k)).weight.grad.abs().sum()) for single in singles), rel=1e-10)


def test_packed_rnn_seeds_get_exactly_their_own_sal_and_task_gradients():
    nets = [cmp.init_rnn("sal", s).double() for s in (0, 1)]
    packed = cmp.PackedRNN(nets)
    cfg = SALConfig(eta=0.5)
    x0 = torch.zeros(6, 2, 4, dtype=torch.float64)
    model = instrument(packed.net, (x0,), cfg).train()
    singles = [instrument(net, (x0[..., :2],), cfg).train() for net in nets]
    gen = torch.Generator().manual_seed(0)
    xs = [cmp.lag_data(5, 8, gen)[0].double() + 0.3 * torch.randn(6, 8, 2, generator=gen, dtype=torch.float64)
          for _ in nets]
    ys = [torch.rand(8, generator=gen, dtype=torch.float64).round() for _ in nets]
    F.binary_cross_entropy_with_logits(model(torch.cat(xs, 2)), torch.stack(ys, 1), reduction="sum").div(8).backward()
    packed.mask_grads(model)
    H = cmp.HIDDEN
    for s, single in enumerate(singles):
        F.binary_cross_entropy_with_logits(single(xs[s]).squeeze(1), ys[s]).backward()
        for name, p in single.named_parameters():
            g = model.get_parameter(name).grad
            if name == "head.weight":
                block = g[s:s + 1, s * H:(s + 1) * H]
            elif name == "head.bias":
                block = g[s:s + 1]
            elif p.dim() == 2:
                block = g[s * H:(s + 1) * H, s * p.shape[1]:(s + 1) * p.shape[1]]
            else:
                block = g[s * H:(s + 1) * H]
            torch.testing.assert_close(block, p.grad, rtol=1e-10, atol=1e-12, msg=name)
    lams = packed.exponents(model, torch.cat(xs, 2), k=3, transient=1, gen=torch.Generator().manual_seed(1))
    q0 = torch.linalg.qr(torch.randn(8, 2, H, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    for s, net in enumerate(nets):  # each block's exponents are its own seed's (same initial frame)
        W, Wi, b = net.rnn.weight_hh_l0, net.rnn.weight_ih_l0, net.rnn.bias_ih_l0 + net.rnn.bias_hh_l0
        h = torch.zeros(8, H, dtype=torch.float64)
        steps = []
        for t in range(6):
            h = torch.tanh(xs[s][t] @ Wi.T + h @ W.T + b)
            steps.append(lambda q, d=(1 - h ** 2).unsqueeze(-1): d * (W @ q))
        torch.testing.assert_close(lams[:, s], lyapunov_exponents(steps, q0[:, s], transient=1), rtol=1e-10, atol=1e-12)


def test_grouped_groups_train_exactly_like_separate_networks():
    """Grouped (the plain methods' batched network): each group's gradient, per-group clipping and
    layer-chain exponent are those of its own network trained alone."""
    nets = [cmp.small_mlp(5, s).double() for s in (0, 1, 2)]
    for net in nets:
        for p in net.parameters():
            p.data.add_(0.3 * torch.randn_like(p))
    grouped = cmp.Grouped(nets)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in nets]
    ys = [torch.rand(8, generator=gen, dtype=torch.float64).round() for _ in nets]
    out = grouped(torch.cat(xs, 1))
    F.binary_cross_entropy_with_logits(out, torch.stack(ys, 1), reduction="sum").div(8).backward()
    grouped.clip_per_seed(grouped, 0.05)
    for g, net in enumerate(nets):
        torch.testing.assert_close(out[:, g], net(xs[g]).squeeze(1), rtol=1e-12, atol=1e-12)
        F.binary_cross_entropy_with_logits(net(xs[g]).squeeze(1), ys[g]).backward()
        norm = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
        for p in net.parameters():  # clip_grad_norm_ without its 1e-6 in the denominator
            p.grad.mul_(min(1.0, 0.05 / float(norm)))
        lins = cmp.hidden_linears(net) + [net[-1]]
        for k, lin in enumerate(lins):
            torch.testing.assert_close(grouped.weights[k].grad[g], lin.weight.grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(grouped.biases[k].grad[g], lin.bias.grad, rtol=1e-10, atol=1e-12)
    # the growth diagnostic of a Grouped and of a Packed model with the same weights agree
    packed = cmp.Packed(nets)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    a = grouped.growth(x, torch.Generator().manual_seed(3))
    b = cmp.forward_growth(packed.net, packed, x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # ... and equal the mean log growth of a tangent pushed through one network by hand
    v = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lins = cmp.hidden_linears(nets[0])
    h = torch.tanh(lins[0](x[:, :2]))
    v = v / v.norm(dim=1, keepdim=True)
    logs = []
    for lin in lins[1:]:
        h = torch.tanh(lin(h))
        v = (1 - h * h) * (v @ lin.weight.T)
        logs.append(v.norm(dim=1).log().mean())
        v = v / v.norm(dim=1, keepdim=True)
    assert float(a[0]) == pytest.approx(float(torch.stack(logs).mean()), rel=1e-10)


def test_one_grouped_run_of_every_plain_method_equals_separate_runs():
    """run_plain_mlp (tuning grid, all seeds and all plain methods in one network) reports the same
    curves as tuning first and training each method alone."""
    task = cmp.Task("depth 4", "mlp", 4, 6, 0.05, 16, 3, 1e-3, rhos=(0.8, 1.2), floss_steps=2, clip=1.0)
    curves, rho = cmp.run_plain_mlp(task, ["bp", "spectral", "orthogonal"], [0, 1], tune_seed=5, log=lambda s: None)
    assert rho == cmp.tune_rho(task, 5, log=lambda s: None)
    for method in ("bp", "spectral", "orthogonal"):
        alone = cmp.run_method(task, method, [0, 1], rho=rho, log=lambda s: None)
        for a, b in zip(curves[method], alone):
            assert a.seed == b.seed and a.steps == b.steps
            assert a.acc == pytest.approx(b.acc, abs=2e-3)
            assert a.extra["lyapunov"] == pytest.approx(b.extra["lyapunov"], abs=1e-5)
