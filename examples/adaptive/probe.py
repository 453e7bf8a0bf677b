"""Read a transformed model's fixed points from outside, through the public API plus hooks.

:class:`CycleProbe` hooks every fixed-point node of a model made by :func:`fxwormhole.transform`
(graph nodes, and the per-step node of recurrent modules with temporal wormholes) and records each
call of the last forward: the node, its inputs (the values entering the cycle from outside) and its
outputs ``y* = body(z*, inputs)``, which carry the library's implicit gradient. From a call it
evaluates, outside the solve (a hook inside the solve would see a detached tape):

* ``z_star(call)``: the injected signal at the fixed point, ``feedback(y*)``, differentiable through
  ``y*`` and the wormholes' parameters;
* ``cycle_map(call, z)``: ``T(z) = feedback(body(z, inputs), inputs)``, the map the solver iterates;
* ``jacobian_norm()``: per sample ``sum over calls ||J_T(z*) v||^2`` for one random unit ``v`` per
  call (forward-mode AD): a Hutchinson estimate of the cycle Jacobian's squared Frobenius norm over
  its size, the contraction regulariser of DEQ training (Bai et al. 2021), here per sample;
* ``contraction_rate()``: the local contraction rate at ``z*`` (power iteration, no grad).

These are the runtime hooks the design note asks the library to expose on the node itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fxwormhole.runtime.cycle_penalties import cycle_jvp, quiet  # the library's own (also BatchNorm-quiet)
from fxwormhole.runtime.fixed_point import FixedPoint


@dataclass
class Call:
    node: FixedPoint
    inputs: Tuple[Any, ...]
    y_star: Any


def fixed_point_nodes(net: nn.Module) -> List[FixedPoint]:
    """Graph fixed-point nodes and the per-step nodes of recurrent modules with temporal wormholes."""
    nodes = [m for m in net.modules() if isinstance(m, FixedPoint)]
    for m in net.modules():
        temporal = getattr(m, "_temporal", None)  # private today: see the design note's hook list
        if temporal is not None and isinstance(getattr(temporal, "fp", None), FixedPoint):
            nodes.append(temporal.fp)
    return nodes


def _unit(v: Tensor) -> Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


class CycleProbe:
    """Hooks on every fixed-point node of ``net``; see the module docstring."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.nodes = fixed_point_nodes(net)
        if not self.nodes:
            raise ValueError("CycleProbe: the model has no fixed-point node (no wormhole was inserted)")
        self.calls: List[Call] = []
        self._pending: dict = {}
        net.register_forward_pre_hook(lambda m, a: self.calls.clear())
        for node in self.nodes:
            node.register_forward_pre_hook(self._pre)
            node.register_forward_hook(self._post)

    def _pre(self, module: nn.Module, inputs: Tuple[Any, ...]) -> None:
        self._pending[id(module)] = tuple(inputs)

    def _post(self, module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        self.calls.append(Call(module, self._pending.pop(id(module)), output))

    # ------------------------------------------------------------------ per-sample reads
    @property
    def iterations(self) -> Tensor:
        """Body evaluations per sample in the last forward, summed over the calls."""
        return sum(c.node.stats.iterations.float() for c in self.calls)

    @property
    def converged(self) -> Tensor:
        """Per sample: every call of the last forward converged."""
        return torch.stack([c.node.stats.status == 0 for c in self.calls]).all(0)

    @property
    def backward_converged(self) -> Tensor:
        """Per sample: every adjoint solve of the last backward converged (True before a backward)."""
        ok = [c.node.stats.backward_status == 0 for c in self.calls if c.node.stats.backward_status is not None]
        return torch.stack(ok).all(0) if ok else torch.ones(len(self.calls[0].node.stats.status), dtype=torch.bool)

    @staticmethod
    def feedback(call: Call, y: Any) -> Tuple[Tensor, Optional[Tensor]]:
        """``(z, scale)`` from the node's feedback (one state tensor; ``scale`` may be None)."""
        out = call.node.feedback(y, *call.inputs)
        if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Tensor) and out[1].dim() == 1:
            z, scale = out
        else:
            z, scale = out, None
        if isinstance(z, (tuple, list)):
            if len(z) != 1:
                raise NotImplementedError("CycleProbe handles cycles with one wormhole state")
            z = z[0]
        return z, scale

    def z_star(self, call: Call) -> Tensor:
        return self.feedback(call, call.y_star)[0]

    def input_scale(self, call: Call) -> Tensor:
        scale = self.feedback(call, call.y_star)[1]
        return scale if scale is not None else call.inputs[0].detach().flatten(1).norm(dim=1)

    def cycle_map(self, call: Call, z: Tensor) -> Tensor:
        with quiet(call.node):
            return self.feedback(call, call.node.body(z, *call.inputs))[0]

    def relative_feedback(self, first: bool = False) -> Tensor:
        """Per sample ``sum over calls ||z|| / scale`` with ``z = z*`` (or ``T(0)``, the injection after
        the first evaluation, when ``first``): the feedback in the residual's units."""
        total = 0.0
        for c in self.calls:
            z = self.cycle_map(c, torch.zeros_like(self.z_star(c))) if first else self.z_star(c)
            total = total + z.flatten(1).norm(dim=1) / self.input_scale(c).clamp_min(1e-6)
        return total

    def jvp(self, call: Call, z: Tensor, v: Tensor) -> Tensor:
        """``J_T(z) v`` (forward-mode AD, or a finite difference for ops without a forward rule)."""
        return cycle_jvp(call.node, z, v, call.inputs)

    def jacobian_norm(self) -> Tensor:
        """Per sample ``sum over calls ||J_T(z*) v||^2`` (``z*`` detached, ``v`` random unit)."""
        total = 0.0
        for c in self.calls:
            z = self.z_star(c).detach()
            total = total + self.jvp(c, z, _unit(torch.randn_like(z))).flatten(1).pow(2).sum(1)
        return total

    def contraction_rate(self, steps: int = 8) -> Tensor:
        """Per sample, the largest over calls of the local contraction rate at ``z*`` (no grad)."""
        rates = []
        with torch.no_grad():
            for c in self.calls:
                z = self.z_star(c).detach()
                v = torch.randn_like(z)
                for _ in range(steps):
                    v = self.jvp(c, z, _unit(v))
                rates.append(v.flatten(1).norm(dim=1))
        return torch.stack(rates).max(0).values


#: Per-sample compute costs and regularisers (weight name -> per-sample term).
TERMS = {
    "fb": lambda p: p.relative_feedback(),                          # ||z*|| / ||x||
    "first": lambda p: p.relative_feedback(first=True),             # ||T(0)|| / ||x||: the first injection
    "ponder": lambda p: p.iterations * p.relative_feedback(),       # iterations spent x ||z*|| / ||x||
    "jac": lambda p: p.jacobian_norm(),                             # ||J_T(z*) v||^2
}


def penalty(probe: CycleProbe, weights: dict) -> Tensor:
    """``sum_name weights[name] * mean_b TERMS[name](probe)_b`` over the non-zero weights."""
    total = torch.zeros(())
    for name, w in weights.items():
        if w:
            total = total + w * TERMS[name](probe).mean()
    return total
