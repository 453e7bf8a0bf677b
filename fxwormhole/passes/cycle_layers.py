"""Cycle-layers pass: BatchNorm inside a fixed point updates its statistics once per forward.

Runs after :class:`~fxwormhole.passes.wrap_fixed_points.WrapFixedPoints`. In every fixed-point body
each BatchNorm that tracks running statistics becomes a
:class:`~fxwormhole.runtime.cycle_layers.CycleBatchNorm` sharing its parameters and buffers, and the
fixed-point node gets the :func:`~fxwormhole.runtime.cycle_layers.commit_batch_norms` forward hook:
the running statistics move once per forward, from the last evaluation (``y* = body(z*)``). Eval
mode is the original model. (Dropout inside a cycle: :mod:`fxwormhole.passes.solve_dropout`.)
"""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.nn.modules.batchnorm import _BatchNorm

from ..runtime.cycle_layers import CycleBatchNorm, commit_batch_norms
from ..runtime.fixed_point import FixedPoint

__all__ = ["CycleLayers"]


class CycleLayers(PassBase):
    """Make BatchNorm inside every fixed point update its statistics once per forward, as in the original model."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        for fp_node in [n for n in gm.graph.nodes if n.op == "call_module"]:
            fp = gm.get_submodule(fp_node.target)
            if isinstance(fp, FixedPoint) and isinstance(fp.body, fx.GraphModule):
                changed |= self._batch_norms(fp)
        if changed:
            gm.recompile()
        return PassResult(gm, changed)

    @staticmethod
    def _batch_norms(fp: FixedPoint) -> bool:
        body: fx.GraphModule = fp.body
        replaced = False
        for node in body.graph.nodes:
            if node.op != "call_module":
                continue
            mod = body.get_submodule(node.target)
            if isinstance(mod, _BatchNorm) and not isinstance(mod, CycleBatchNorm) and mod.track_running_stats:
                parent, _, leaf = node.target.rpartition(".")
                setattr(body.get_submodule(parent) if parent else body, leaf, CycleBatchNorm.replacing(mod))
                replaced = True
        if replaced:
            fp.register_forward_hook(commit_batch_norms)
        return replaced
