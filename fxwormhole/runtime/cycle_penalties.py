"""Training terms of a fixed-point node, added to the loss without the user's help.

Two per-sample terms (``docs/adaptive_depth.md`` has the measurements):

* the contraction regulariser (``WormholeConfig.contraction``), below;
* the compute cost (``WormholeConfig.compute_cost``): ``||T(z0)|| / s``, the feedback injected
  after the first evaluation relative to the norm ``s`` of the input it modulates (the quantity
  the first halting test compares with ``tol``). It pushes each sample towards "stop after one
  evaluation"; the task loss resists only where the feedback helps, so training learns to keep the
  wormhole shut on easy inputs and open it on hard ones. A cost on ``||z*||`` or on the gate values
  lowers compute for all samples alike instead.

The contraction regulariser:

A fixed point ``z* = T(z*)``, ``T(z) = feedback(body(z, x), x)``, exists and is found by iteration
while ``T`` contracts. Training moves the gates and projections and nothing keeps it so: on the
issue-17 CNN the map stopped contracting mid-training. The regulariser of DEQ training (Bai et al.
2021, "Stabilizing Equilibrium Models by Jacobian Regularization") penalises, per sample,

    ||J_T(z*) v||^2,   v a random unit vector per sample,

a Hutchinson estimate of the squared Frobenius norm of the cycle's Jacobian over its size. Here it
is computed after each training forward, outside the solve (``z*`` detached; the term's gradient
reaches the body, feedback and gate parameters), by forward-mode AD, or a finite difference for
bodies with ops that have no forward-mode rule (CPU flash attention).

"Stable by default" must not require a change to the user's loss: :func:`add_cycle_penalties`,
a forward hook on the node, routes ``weight * mean_b term_b`` into the backward through an identity
on the node's outputs whose backward also sends gradient 1 to the penalty. The forward values are
unchanged; the last terms are kept in ``node.penalties`` (name -> per-sample tensor, detached) for
logging.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import _tree as T
from .cycle_layers import batch_norms_quiet

__all__ = ["PenaltyWeights", "cycle_map", "cycle_state", "cycle_jvp", "contraction_term", "compute_cost_term", "add_cycle_penalties",
           "quiet"]


@dataclass(frozen=True)
class PenaltyWeights:
    """The weights a fixed-point node's training terms carry (``node.penalty_weights``); 0 = off."""

    contraction: float = 0.0
    compute_cost: float = 0.0

    @property
    def active(self) -> bool:
        return self.contraction > 0 or self.compute_cost > 0


@contextlib.contextmanager
def quiet(node: nn.Module) -> Iterator[None]:
    """Extra evaluations of a node's body move no statistics: SAL probes are put in eval mode (their
    update is also an in-place write that ``torch.func.jvp`` refuses) and BatchNorm records nothing."""
    probes = [m for m in node.modules() if hasattr(m, "update_stats") and m.training]
    for m in probes:
        m.training = False
    try:
        with batch_norms_quiet(node):
            yield
    finally:
        for m in probes:
            m.training = True


def _split(out: Any) -> tuple[Any, Tensor | None]:
    """``(state, scale)`` from a feedback's output (``(z_next, scale)`` or ``z_next``)."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Tensor) and out[1].dim() == 1:
        return out[0], out[1]
    return out, None


def _state(out: Any) -> Any:
    return _split(out)[0]


def cycle_state(node: nn.Module, y: Any, inputs: tuple) -> Any:
    """``z = feedback(y, *inputs)`` (the state the solver iterates), or ``y`` without feedback."""
    return y if node.feedback is None else _state(node.feedback(y, *inputs))


def cycle_map(node: nn.Module, z: Any, inputs: tuple) -> Any:
    """``T(z) = feedback(body(z, *inputs), *inputs)``: the map the node's solver iterates."""
    return cycle_state(node, node.body(z, *inputs), inputs)


def _unit(v: Any) -> Any:
    """``v`` scaled to norm 1 per sample (a tensor or a tuple, the norm taken over all its parts)."""
    vs = T.leaves(v)
    norm = torch.sqrt(sum(p.flatten(1).pow(2).sum(1) for p in vs)).clamp_min(1e-12)
    vs = [p / norm.view(-1, *([1] * (p.dim() - 1))) for p in vs]
    return tuple(vs) if isinstance(v, (tuple, list)) else vs[0]


def cycle_jvp(node: nn.Module, z: Any, v: Any, inputs: tuple) -> Any:
    """``J_T(z) v`` by forward-mode AD, else (an op without a forward rule) a finite difference;
    differentiable in the parameters either way. The fallback is remembered on the node."""
    f = lambda s: cycle_map(node, s, inputs)  # noqa: E731
    if not getattr(node, "_no_forward_ad", False):
        try:
            return torch.func.jvp(f, (z,), (v,))[1]
        except (NotImplementedError, RuntimeError):
            node._no_forward_ad = True
    zl, vl = T.leaves(z), T.leaves(v)
    size = torch.sqrt(sum(p.detach().flatten(1).pow(2).sum(1) for p in zl))
    eps = 1e-3 * (1.0 + size)
    shifted = [p + eps.view(-1, *([1] * (p.dim() - 1))).to(p.dtype) * d for p, d in zip(zl, vl)]
    hi, lo = T.leaves(f(tuple(shifted) if isinstance(z, (tuple, list)) else shifted[0])), T.leaves(f(z))
    out = [(a - b) / eps.view(-1, *([1] * (a.dim() - 1))).to(a.dtype) for a, b in zip(hi, lo)]
    return tuple(out) if isinstance(z, (tuple, list)) else out[0]


#: power steps that turn the random direction towards the dominant one (see contraction_term)
POWER_STEPS = 4


def contraction_term(node: nn.Module, inputs: tuple, y_star: Any, power_steps: int = POWER_STEPS) -> Tensor:
    """Per sample ``||J_T(z*) v||^2`` at the node's fixed point (``z*`` from ``y*``, detached).

    ``v`` is a random unit vector turned by ``power_steps`` power iterations (``v <- J v / ||J v||``,
    no grad) towards the dominant direction, so the term tracks the local contraction rate, which
    decides whether the iteration converges. With ``power_steps=0`` it is the Hutchinson estimate of
    ``||J||_F^2 / dim`` (Bai et al.), an average over directions that stayed small on the zoo MLP
    while its rate passed 1 (docs/adaptive_depth.md)."""
    with quiet(node):
        with torch.no_grad():
            z = cycle_state(node, y_star, inputs)
            z = tuple(p.detach() for p in z) if isinstance(z, (tuple, list)) else z.detach()
            v = _unit(tuple(torch.randn_like(p) for p in z) if isinstance(z, tuple) else torch.randn_like(z))
            for _ in range(power_steps):
                v = _unit(cycle_jvp(node, z, v, inputs))
        jv = cycle_jvp(node, z, v, inputs)
    return sum(p.flatten(1).pow(2).sum(1) for p in T.leaves(jv))


def compute_cost_term(node: nn.Module, inputs: tuple, y_star: Any) -> Tensor:
    """Per sample ``||T(z0)|| / s``: the feedback injected after the first evaluation from the
    node's initial state, relative to the norm of the input it modulates (the feedback's ``scale``;
    without one, the norm of the first input). Differentiable in the body and feedback parameters."""
    with quiet(node):
        z0 = node._initial(inputs, None)
        with torch.no_grad():
            scale = _split(node.feedback(y_star, *inputs))[1] if node.feedback is not None else None
        z1 = cycle_map(node, z0, inputs)
    if scale is None:
        scale = inputs[0].detach().flatten(1).norm(dim=1)
    norm = torch.sqrt(sum(p.flatten(1).pow(2).sum(1) for p in T.leaves(z1)) + 1e-12)
    return norm / scale.to(norm.dtype).clamp_min(1e-6)


#: PenaltyWeights field -> per-sample term
TERMS = {"contraction": contraction_term, "compute_cost": compute_cost_term}


class _AddToLoss(torch.autograd.Function):
    """Identity on ``ys``; its backward also sends gradient 1 into ``penalty``, so the penalty is
    added to whatever loss back-propagates through the node's outputs."""

    @staticmethod
    def forward(ctx, penalty: Tensor, *ys: Tensor):
        ctx.penalty_shape = penalty.shape
        return tuple(y.view_as(y) for y in ys)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (torch.ones(ctx.penalty_shape, dtype=grads[0].dtype, device=grads[0].device), *grads)


def add_cycle_penalties(node: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook on a fixed-point node: in training mode, with grad enabled and eager, adds
    ``sum over terms weight * mean_b term_b`` to the backward (``node.penalty_weights``, a
    :class:`PenaltyWeights`; a zero weight costs nothing)."""
    config = getattr(node, "penalty_weights", None)
    if config is None or not config.active or not node.training or not torch.is_grad_enabled() \
            or torch.compiler.is_compiling():
        return None
    weights = {name: float(getattr(config, name)) for name in TERMS}
    ys = T.leaves(output)
    slots = [i for i, y in enumerate(ys) if isinstance(y, Tensor) and y.requires_grad]
    if not slots:
        return None
    terms = {name: TERMS[name](node, tuple(args), output) for name, w in weights.items() if w > 0}
    node.penalties = {name: t.detach() for name, t in terms.items()}
    penalty = sum(weights[name] * t.mean() for name, t in terms.items())
    routed = _AddToLoss.apply(penalty, *(ys[i] for i in slots))
    out = list(ys)
    for i, y in zip(slots, routed):
        out[i] = y
    return tuple(out) if isinstance(output, (tuple, list)) else out[0]
