"""Sympy-derived activation derivatives against autograd (float64)."""
import pytest
import torch

from fxwormhole.errors import ConfigError
from fxwormhole.passes.activations import (
    Sigmoid, derivatives, derivatives_of_callable, register_activation, registered_activations,
)

U = torch.cat([torch.linspace(-6, 6, 121, dtype=torch.float64), torch.tensor([-0.37, 0.81], dtype=torch.float64)])
U = U[U.abs() > 1e-9]  # stay off the kinks of relu & co (their derivatives hold almost everywhere)
U = U[(U + 1).abs() > 1e-9]
U = U[(U - 1).abs() > 1e-9]


def autograd_derivs(f, u):
    u = u.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(u).sum(), u, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), u)[0] if d1.requires_grad else torch.zeros_like(u)
    return d1.detach(), d2


TORCH_F = {
    "identity": lambda u: u, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "shifted_sigmoid": lambda u: torch.sigmoid(u) - 0.5, "softsign": torch.nn.functional.softsign,
    "gelu": torch.nn.functional.gelu, "gelu_tanh": lambda u: torch.nn.functional.gelu(u, approximate="tanh"),
    "silu": torch.nn.functional.silu, "softplus": torch.nn.functional.softplus, "elu": torch.nn.functional.elu,
    "relu": torch.relu, "leaky_relu": torch.nn.functional.leaky_relu, "hardtanh": torch.nn.functional.hardtanh,
}


def test_every_builtin_is_checked():
    assert set(TORCH_F) == set(registered_activations())


@pytest.mark.parametrize("name", sorted(TORCH_F))
def test_builtin_derivatives_match_autograd(name):
    d = derivatives(name)
    assert d.source == "sympy"
    torch.testing.assert_close(d.f(U), TORCH_F[name](U), rtol=1e-12, atol=1e-12)
    d1, d2 = autograd_derivs(TORCH_F[name], U)
    torch.testing.assert_close(d.d1(U), d1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.d2(U), d2, rtol=1e-10, atol=1e-12)
    nz = d1.abs() > 1e-4  # below, d1 itself carries cancellation error (1 - tanh^2 near -1), so does d2/d1
    torch.testing.assert_close(d.ratio(U)[nz], (d2 / d1)[nz], rtol=1e-9, atol=1e-12)
    assert (d.ratio(U)[d1 == 0] == 0).all()


@pytest.mark.parametrize("name", sorted(TORCH_F))
def test_derivatives_finite_far_out(name):
    far = torch.tensor([-200.0, -40.0, -13.5, 13.5, 40.0, 200.0])
    d = derivatives(name)
    for fn in (d.d1, d.d2, d.ratio):
        assert torch.isfinite(fn(far)).all()


def test_parameters_are_used():
    d = derivatives("leaky_relu", negative_slope=0.2)
    torch.testing.assert_close(d.d1(torch.tensor([-1.0, 2.0])), torch.tensor([0.2, 1.0]))
    d = derivatives("elu", alpha=0.5)
    torch.testing.assert_close(d.d1(torch.tensor([-1.0])), 0.5 * torch.exp(torch.tensor([-1.0])))


def test_user_function_translated_to_sympy():
    mish = lambda x: x * torch.tanh(torch.nn.functional.softplus(x))  # noqa: E731
    d = derivatives_of_callable(mish, "mish")
    assert d.source == "sympy"
    d1, d2 = autograd_derivs(mish, U)
    torch.testing.assert_close(d.d1(U), d1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.d2(U), d2, rtol=1e-10, atol=1e-12)


def test_activation_modules_translated():
    for mod, ref in [(torch.nn.LeakyReLU(0.3), None), (torch.nn.Tanh(), None), (torch.nn.ELU(0.7), None)]:
        d = derivatives_of_callable(mod)
        assert d.source == "sympy"
        d1, d2 = autograd_derivs(mod, U)
        torch.testing.assert_close(d.d1(U), d1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d.d2(U), d2, rtol=1e-10, atol=1e-12)


def test_untranslatable_function_falls_back_to_autograd():
    f = lambda x: torch.special.bessel_j0(x) + torch.atan(x)  # noqa: E731 - bessel has no mapping
    d = derivatives_of_callable(f, "odd")
    assert d.source == "autograd"
    d1, d2 = autograd_derivs(f, U)
    torch.testing.assert_close(d.d1(U), d1)
    torch.testing.assert_close(d.d2(U), d2)
    with torch.no_grad():  # probes call it under no_grad
        torch.testing.assert_close(d.d1(U), d1)


def test_register_activation_and_errors():
    register_activation("swish2_test", lambda u, beta=2.0: u * Sigmoid(beta * u), overwrite=True)
    d = derivatives("swish2_test")
    f = lambda x: x * torch.sigmoid(2 * x)  # noqa: E731
    d1, d2 = autograd_derivs(f, U)
    torch.testing.assert_close(d.d2(U), d2, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="already registered"):
        register_activation("swish2_test", lambda u: u)
    with pytest.raises(ConfigError, match="no registered derivative"):
        derivatives("no_such_activation")
