"""Cycle-penalties pass: every fixed point adds its training terms to the backward.

Runs after :class:`~fxwormhole.passes.wrap_fixed_points.WrapFixedPoints` (and after the
cycle-layers pass, whose BatchNorm commit must run before the penalties' extra evaluations) when
``WormholeConfig.contraction`` or ``WormholeConfig.compute_cost`` is positive. It stores the weights
(a :class:`~fxwormhole.runtime.cycle_penalties.PenaltyWeights`) on each :class:`~fxwormhole.runtime.fixed_point.FixedPoint` node and registers
:func:`~fxwormhole.runtime.cycle_penalties.add_cycle_penalties` as its forward hook: the graph is
unchanged, eval mode and exported graphs are unaffected, and the user's loss needs no extra term
(see :mod:`fxwormhole.runtime.cycle_penalties`).
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.cycle_penalties import PenaltyWeights, add_cycle_penalties
from ..runtime.fixed_point import FixedPoint

__all__ = ["CyclePenalties"]


class CyclePenalties(PassBase):
    """Attach the contraction regulariser and the compute cost, at their weights, to every
    fixed-point node of the graph (temporal steps of recurrent modules are not covered)."""

    def __init__(self, contraction: float = 0.0, compute_cost: float = 0.0) -> None:
        super().__init__()
        self.weights = PenaltyWeights(float(contraction), float(compute_cost))

    def call(self, gm: fx.GraphModule) -> PassResult:
        nodes = [m for m in gm.modules() if isinstance(m, FixedPoint)]
        if not self.weights.active or not nodes:
            return PassResult(gm, False)
        for fp in nodes:
            fp.penalty_weights = self.weights
            if add_cycle_penalties not in fp._forward_hooks.values():
                fp.register_forward_hook(add_cycle_penalties)
        return PassResult(gm, True)
