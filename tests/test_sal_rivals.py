"""The methods SAL is compared with: each one's defining property against a closed form or autograd."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxwormhole.errors import ConfigError, PlacementError
from fxwormhole.init import (delta_orthogonal_, lsuv_, orthogonal_init_, scale_spectral_radius_,
                             spectral_radius)
from fxwormhole.lyapunov import (chain_lyapunov_exponents, floss_, flossing_loss, lyapunov_exponents,
                                 rnn_lyapunov_exponents)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread is faster and immune to contention


def eye(n):
    return torch.eye(n, dtype=torch.float64)


def test_orthogonal_init_gives_orthonormal_weights_and_zero_biases():
    torch.manual_seed(0)
    net = nn.ModuleDict({"sq": nn.Linear(8, 8), "wide": nn.Linear(3, 8), "rnn": nn.RNN(3, 5),
                         "lstm": nn.LSTMCell(4, 6), "conv": nn.Conv2d(3, 5, 3)}).double()
    orthogonal_init_(net, gain=1.0)
    W = net["sq"].weight
    torch.testing.assert_close(W.T @ W, eye(8))
    torch.testing.assert_close(net["wide"].weight.T @ net["wide"].weight, eye(3))  # orthonormal columns
    torch.testing.assert_close(net["rnn"].weight_hh_l0 @ net["rnn"].weight_hh_l0.T, eye(5))
    for block in net["lstm"].weight_hh.chunk(4, 0):  # each gate's recurrent block
        torch.testing.assert_close(block @ block.T, eye(6))
    for name, p in net.named_parameters():
        if "bias" in name:
            assert float(p.detach().abs().max()) == 0.0, name
    with pytest.raises(PlacementError, match="no Linear"):
        orthogonal_init_(nn.Tanh())


def test_delta_orthogonal_conv_preserves_norm():
    """Centre tap orthogonal, zeros elsewhere: a stride-1 circular convolution is an isometry."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", bias=False).double()
    delta_orthogonal_(conv.weight, gain=1.0)
    k = conv.weight
    centre = k[:, :, 1, 1]
    torch.testing.assert_close(centre.T @ centre, eye(4))
    assert float((k.abs().sum() - centre.abs().sum()).detach()) == 0.0
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(conv(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    with pytest.raises(ConfigError, match="2-D"):
        delta_orthogonal_(torch.zeros(3))


def test_lsuv_gives_unit_output_variance_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Conv1d(1, 4, 3),
                        nn.Flatten(), nn.Linear(4 * 30, 5)).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x):
            h = self.body[3](self.body[2](self.body[1](self.body[0](x))))
            return self.body[6](self.body[5](self.body[4](h.unsqueeze(1))))

    model = Net()
    x = torch.randn(256, 10, dtype=torch.float64) * 3
    report = lsuv_(model, (x,), tol=0.01, max_iters=20)
    assert [r.layer for r in report] == ["body.0", "body.2", "body.4", "body.6"]
    outs = {}
    hooks = [model.body[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in (0, 2, 4, 6)]
    model(x)
    for h in hooks:
        h.remove()
    for r, i in zip(report, (0, 2, 4, 6)):
        var = float(outs[i].var(unbiased=False))
        assert abs(var - 1.0) < 0.01, (r, var)
        assert var == pytest.approx(r.variance_after, rel=1e-12)


def test_spectral_radius_scaling_hits_the_target():
    torch.manual_seed(0)
    W = torch.randn(20, 20, dtype=torch.float64)
    scale_spectral_radius_(W, 0.9)
    assert float(torch.linalg.eigvals(W).abs().max()) == pytest.approx(0.9, rel=1e-12)
    assert spectral_radius(W) == pytest.approx(0.9, rel=1e-12)
    with pytest.raises(ConfigError, match="radius"):
        scale_spectral_radius_(W, -1.0)
    with pytest.raises(ConfigError, match="spectral radius 0"):
        scale_spectral_radius_(torch.zeros(3, 3), 1.0)


# ----------------------------------------------------------------------------- Lyapunov exponents
def test_lyapunov_exponents_of_a_constant_map_are_log_eigenvalue_moduli():
    A = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    R = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    A = R @ A @ R.T  # same spectrum, not diagonal
    q0 = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0]
    lams = lyapunov_exponents((lambda q: A @ q for _ in range(100)), q0, transient=20)
    torch.testing.assert_close(lams, torch.log(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)), atol=1e-3, rtol=0)


def _rnn_reference(rnn, x, k):
    """Exponents from explicit autograd Jacobians of the step map (float64)."""
    W_ih, W_hh, b = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0
    h = torch.zeros(x.shape[1], W_hh.shape[0], dtype=x.dtype)
    q = torch.linalg.qr(torch.randn(x.shape[1], W_hh.shape[0], k, dtype=x.dtype, generator=torch.Generator().manual_seed(5)))[0]
    total = 0
    for t in range(x.shape[0]):
        J = torch.stack([torch.autograd.functional.jacobian(lambda hh: torch.tanh(x[t, i] @ W_ih.T + hh @ W_hh.T + b), h[i])
                         for i in range(x.shape[1])])
        h = torch.tanh(x[t] @ W_ih.T + h @ W_hh.T + b)
        q, r = torch.linalg.qr(J @ q)
        total = total + torch.diagonal(r, dim1=-2, dim2=-1).abs().log()
    return total / x.shape[0]


def test_rnn_exponents_match_explicit_jacobians_and_are_differentiable():
    torch.manual_seed(0)
    rnn = nn.RNN(2, 6).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(3.0)
    x = torch.randn(30, 3, 2, dtype=torch.float64)
    lams = rnn_lyapunov_exponents(rnn, x, k=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(lams, _rnn_reference(rnn, x, 4), rtol=1e-9, atol=1e-10)
    # the flossing gradient: autograd through QR, checked against finite differences

    class Exponents(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.RNN(2, 3).double()

        def forward(self, x):
            return flossing_loss(rnn_lyapunov_exponents(self.rnn, x, k=2, generator=torch.Generator().manual_seed(3)))

    m = Exponents()
    xs = torch.randn(6, 1, 2, dtype=torch.float64)
    w = (m.rnn.weight_hh_l0.detach() * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(m, {"rnn.weight_hh_l0": w}, (xs,)), (w,),
                                    eps=1e-6, atol=1e-6)


def test_chain_exponents_of_an_orthogonal_linear_chain_are_zero():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8).double() for _ in range(20)]
    for lin in layers:
        orthogonal_init_(lin)
    x = torch.randn(4, 8, dtype=torch.float64)
    lams = chain_lyapunov_exponents(layers, x, k=8, activation=lambda u: u)  # linear: J = W, orthogonal
    torch.testing.assert_close(lams, torch.zeros_like(lams), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="k=9"):
        chain_lyapunov_exponents(layers, x, k=9)


def test_flossing_moves_the_largest_exponent_of_a_chaotic_rnn_toward_zero():
    torch.manual_seed(0)
    rnn = nn.RNN(1, 24)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(24, 24) * 4.0 / 24 ** 0.5)  # gain 4, no bias: chaotic
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    gen = torch.Generator().manual_seed(1)

    def exponents():  # 50 steps settle onto the attractor, 50 more are averaged
        x = torch.randn(100, 4, 1, generator=gen)
        return rnn_lyapunov_exponents(rnn, x, k=8, transient=50, generator=gen)

    x_eval = torch.randn(200, 8, 1, generator=torch.Generator().manual_seed(2))

    def largest():
        with torch.no_grad():
            return float(rnn_lyapunov_exponents(rnn, x_eval, k=1, transient=50, generator=gen).mean())

    before = largest()
    floss_(rnn.parameters(), exponents, steps=50, lr=0.02)
    after = largest()
    assert before > 0.2
    assert abs(after) < 0.5 * abs(before), (before, after)
