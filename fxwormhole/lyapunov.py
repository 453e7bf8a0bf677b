"""Lyapunov exponents of recurrent and deep networks, differentiable, and gradient flossing.

The ``k`` largest Lyapunov exponents of a product of Jacobians ``J_T ... J_1`` come from the
standard QR (Benettin) iteration: ``Q_t, R_t = qr(J_t Q_{t-1})`` and
``lambda_i = mean_t log |R_t[i, i]|`` (after ``transient`` steps). Every step is a torch op, so the
exponents are differentiable in the network's weights.

Gradient flossing (Engelken, NeurIPS 2023, arXiv 2312.17306) minimises
``mean_i (lambda_i - target)^2`` by backpropagating through those QR steps, which keeps the
long-term Jacobian well conditioned (exponents near 0: neither exploding nor vanishing gradients).
The reference implementation is in Julia (RainerEngelken/GradientFlossing); this is a PyTorch
implementation from the paper's description: flossing before training (``floss_`` for some
steps) and optionally interleaved with training.

For a tanh RNN ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)`` the Jacobian is
``J_t = diag(1 - h_t^2) W_hh`` (:func:`rnn_lyapunov_exponents`); for a deep MLP it is the layer
Jacobian ``diag(f'(U_l)) W_l`` and the exponents are per layer (:func:`chain_lyapunov_exponents`).

Example::

    lams = rnn_lyapunov_exponents(model.rnn, x, k=16)          # [batch, 16]
    flossing_loss(lams).backward()
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = [
    "lyapunov_exponents",
    "rnn_lyapunov_exponents",
    "chain_lyapunov_exponents",
    "flossing_loss",
    "floss_",
]

JacobianStep = Callable[[Tensor], Tensor]  # Q [..., N, k] -> J_t Q


def lyapunov_exponents(steps: Iterable[JacobianStep], q0: Tensor, transient: int = 0) -> Tensor:
    """The ``k`` largest Lyapunov exponents of the product of the steps' Jacobians.

    Args:
        steps: callables ``Q -> J_t Q`` (``Q`` of shape ``[..., N, k]``), in time order.
        q0: the initial orthonormal frame ``[..., N, k]`` (e.g. ``torch.linalg.qr(randn)[0]``).
        transient: steps propagated but not averaged (the frame aligns with the dominant
            directions first).

    Returns:
        ``[..., k]``: ``mean_t log |R_t[i, i]|`` over the steps after the transient (per step, or
        per layer for a deep network), largest first up to QR ordering.
    """
    q, total, count = q0, None, 0
    for t, apply in enumerate(steps):
        q, r = torch.linalg.qr(apply(q))
        if t >= transient:
            logs = torch.diagonal(r, dim1=-2, dim2=-1).abs().log()
            total = logs if total is None else total + logs
            count += 1
    if total is None:
        raise ConfigError(f"lyapunov_exponents: no step after transient={transient}: give more steps")
    return total / count


def _frame(n: int, k: int, batch: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if not 1 <= k <= n:
        raise ConfigError(f"lyapunov exponents: k={k} is invalid: expected 1 <= k <= {n} (the state size)")
    g = torch.randn(batch, n, k, generator=generator, dtype=like.dtype, device="cpu").to(like.device)
    return torch.linalg.qr(g)[0]


def _slope(act: Callable[[Tensor], Tensor], u: Tensor, out: Tensor) -> Tensor:
    """``f'(u)``: closed form for tanh, else autograd (with a graph, so it is differentiable)."""
    if act is torch.tanh or isinstance(act, nn.Tanh):
        return 1 - out * out
    if not u.requires_grad:
        u = u.detach().requires_grad_(True)
        out = act(u)
    return torch.autograd.grad(out.sum(), u, create_graph=True)[0]


def rnn_lyapunov_exponents(rnn: nn.Module, inputs: Tensor, k: int, h0: Optional[Tensor] = None,
                           transient: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Lyapunov exponents of a one-layer Elman ``nn.RNN`` / ``nn.RNNCell`` driven by ``inputs``.

    The trajectory is recomputed with the module's parameters (so the exponents are
    differentiable in them); the Jacobian of step ``t`` is ``diag(f'(U_t)) W_hh``.

    Args:
        rnn: ``nn.RNN`` (one layer, one direction) or ``nn.RNNCell``, tanh or relu.
        inputs: ``[T, B, input_size]``, or ``[B, T, input_size]`` for a ``batch_first`` module.
        k: how many exponents (at most ``hidden_size``).
        h0: initial state ``[B, H]`` (zeros if None).
        transient: leading steps not averaged.

    Returns:
        ``[B, k]`` exponents per time step.
    """
    cell = isinstance(rnn, nn.RNNCell)
    if not (cell or (isinstance(rnn, nn.RNN) and rnn.num_layers == 1 and not rnn.bidirectional)):
        raise ConfigError(f"rnn_lyapunov_exponents: {type(rnn).__name__} is not supported: expected an nn.RNNCell "
                          "or a one-layer, one-direction nn.RNN")
    sfx = "" if cell else "_l0"
    w_ih, w_hh = getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx)
    b = 0.0
    if getattr(rnn, "bias", True) is not False and getattr(rnn, "bias_ih" + sfx, None) is not None:
        b = getattr(rnn, "bias_ih" + sfx) + getattr(rnn, "bias_hh" + sfx)
    act = torch.tanh if rnn.nonlinearity == "tanh" else torch.relu
    x = inputs.transpose(0, 1) if (not cell and rnn.batch_first) else inputs
    T, B, H = x.shape[0], x.shape[1], w_hh.shape[0]
    drive = x @ w_ih.T + b  # [T, B, H]: the input projection of every step at once
    h = torch.zeros(B, H, dtype=w_hh.dtype, device=w_hh.device) if h0 is None else h0

    def steps():
        nonlocal h
        for t in range(T):
            u = drive[t] + h @ w_hh.T
            h = act(u)
            d = _slope(act, u, h)
            yield lambda q, d=d: d.unsqueeze(-1) * (w_hh @ q)

    return lyapunov_exponents(steps(), _frame(H, k, B, w_hh, generator), transient)


def chain_lyapunov_exponents(layers: Sequence[nn.Linear], x: Tensor, k: int,
                             activation: Callable[[Tensor], Tensor] = torch.tanh,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-layer Lyapunov exponents of a deep MLP ``h_l = f(W_l h_{l-1} + b_l)`` at inputs ``x``.

    The frame starts at the output of ``layers[0]`` and is carried through ``layers[1:]`` (all
    square), so the exponents describe how the hidden layers stretch or shrink perturbations.

    Returns:
        ``[B, k]``: mean over layers of ``log |R_ii|``.
    """
    if len(layers) < 2:
        raise ConfigError("chain_lyapunov_exponents: need at least two layers (the first sets the state)")
    h = activation(layers[0](x))

    def steps():
        nonlocal h
        for lin in layers[1:]:
            if lin.weight.shape[0] != lin.weight.shape[1]:
                raise ConfigError(f"chain_lyapunov_exponents: layer with weight {tuple(lin.weight.shape)} is not square")
            u = lin(h)
            h = activation(u)
            d = _slope(activation, u, h)
            yield lambda q, d=d, w=lin.weight: d.unsqueeze(-1) * (w @ q)

    return lyapunov_exponents(steps(), _frame(h.shape[-1], k, x.shape[0], layers[0].weight, generator))


def flossing_loss(exponents: Tensor, target: float = 0.0) -> Tensor:
    """``mean (lambda_i - target)^2``: the gradient-flossing objective."""
    return (exponents - target).square().mean()


def floss_(params: Iterable[nn.Parameter], exponents: Callable[[], Tensor], steps: int, lr: float = 1e-3,
           target: float = 0.0) -> List[float]:
    """Gradient flossing on its own: ``steps`` Adam steps on :func:`flossing_loss` of ``exponents()``.

    ``exponents`` is called every step (draw fresh inputs inside it). Changes ``params`` in place
    and returns the mean largest exponent before each step.
    """
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    history: List[float] = []
    for _ in range(steps):
        lams = exponents()
        history.append(float(lams[..., 0].detach().mean()))
        opt.zero_grad(set_to_none=True)
        flossing_loss(lams, target).backward()
        opt.step()
    return history
