"""Cycle-layers pass: dropout draws one mask per forward, BatchNorm updates its statistics once.

Runs after :class:`~fxwormhole.passes.wrap_fixed_points.WrapFixedPoints`. In every fixed-point
body (the runtime pieces are in :mod:`fxwormhole.runtime.cycle_layers`):

* each dropout (``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``F.dropout`` with training not baked to
  False, ``aten.dropout``) becomes ``x * mask``, the mask a new input of the body, drawn by a
  :class:`CycleDropoutMask` node placed in the outer graph just before the fixed point: one mask per
  forward, reused by every iteration (so the map has a fixed point in training mode) and sliced with
  the other inputs under per-sample halting;
* each BatchNorm that tracks running statistics becomes a :class:`CycleBatchNorm` sharing its
  parameters and buffers, and the fixed-point node gets the :func:`commit_batch_norms` forward hook:
  the running statistics move once per forward, from the last evaluation (``y* = body(z*)``).

Eval mode is the original model in both cases (masks of ones; running statistics).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import PlacementError
from ..runtime.cycle_layers import CycleBatchNorm, CycleDropoutMask, apply_dropout_mask, commit_batch_norms
from ..runtime.fixed_point import FixedPoint
from ._common import fake_value

__all__ = ["CycleLayers"]

_ELEMENTWISE_DROPOUT = (nn.Dropout,)
_CHANNEL_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_FUNCTIONAL_DROPOUT = {F.dropout: ("input", "p", "training"), torch.dropout: ("input", "p", "train"),
                       torch.ops.aten.dropout.default: ("input", "p", "train")}


def _argument(node: fx.Node, names: tuple[str, str, str], i: int, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(names[i], default)


def _dropout_of(body: fx.GraphModule, node: fx.Node) -> tuple[float, bool] | None:
    """``(p, per_channel)`` when ``node`` is a dropout that is active in training mode, else None."""
    if node.op == "call_module":
        mod = body.get_submodule(node.target)
        if isinstance(mod, _CHANNEL_DROPOUT):
            return float(mod.p), True
        if type(mod) in _ELEMENTWISE_DROPOUT:
            return float(mod.p), False
    elif node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUT:
        names = _FUNCTIONAL_DROPOUT[node.target]
        training = _argument(node, names, 2, node.target is F.dropout)
        if training is False:  # traced in eval mode or written as training=False: not a dropout
            return None
        return float(_argument(node, names, 1, 0.5)), False
    return None


class CycleLayers(PassBase):
    """Make dropout and BatchNorm inside every fixed point behave as in the original model."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = False
        for fp_node in [n for n in gm.graph.nodes if n.op == "call_module"]:
            fp = gm.get_submodule(fp_node.target)
            if isinstance(fp, FixedPoint) and isinstance(fp.body, fx.GraphModule):
                changed |= self._masks(gm, fp_node, fp)
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

    def _masks(self, gm: fx.GraphModule, fp_node: fx.Node, fp: FixedPoint) -> bool:
        body: fx.GraphModule = fp.body
        drops = [(n, d) for n in body.graph.nodes if (d := _dropout_of(body, n)) is not None]
        if not drops:
            return False
        batched = list(fp.batched) if fp.batched is not None else [True] * len(fp_node.args)
        ref = next((a for a, b in zip(fp_node.args, batched) if b and isinstance(a, fx.Node)), None)
        if ref is None:
            raise PlacementError(f"{fp.name}: a dropout inside the cycle needs a batched input of the fixed point "
                                 "to size its mask; none was found")
        last_body = [n for n in body.graph.nodes if n.op == "placeholder"][-1]
        last_feedback = [n for n in fp.feedback.graph.nodes if n.op == "placeholder"][-1] if isinstance(fp.feedback, fx.GraphModule) else None
        new_args = list(fp_node.args)
        for k, (node, (p, per_channel)) in enumerate(drops):
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            if not isinstance(val, torch.Tensor):
                raise PlacementError(f"{fp.name}: dropout {node.name!r} inside the cycle has no recorded input shape; "
                                     "pass example inputs to transform()")
            tail = tuple(val.shape[1:])
            if per_channel:  # Dropout1d/2d/3d zero whole channels
                tail = (tail[0], *([1] * (len(tail) - 1)))
            name = f"{fp_node.target}_dropout_mask_{k}"
            gm.add_submodule(name, CycleDropoutMask(p, tail, dtype=val.dtype, where=node.name))
            with gm.graph.inserting_before(fp_node):
                mask = gm.graph.call_module(name, (ref,))
            mask.meta["val"] = fake_value(gm, torch.ones((int(ref.meta["val"].shape[0]), *tail), dtype=val.dtype))
            new_args.append(mask)
            with body.graph.inserting_after(last_body):
                last_body = body.graph.placeholder(name)
            last_body.meta["val"] = mask.meta["val"]
            with body.graph.inserting_before(node):
                product = body.graph.call_function(apply_dropout_mask, (node.args[0], last_body))
            product.meta = dict(node.meta)
            node.replace_all_uses_with(product)
            body.graph.erase_node(node)
            if last_feedback is not None:  # the feedback receives the same inputs; it ignores the masks
                with fp.feedback.graph.inserting_after(last_feedback):
                    last_feedback = fp.feedback.graph.placeholder(name)
                last_feedback.meta["val"] = mask.meta["val"]
            batched.append(True)
        fp_node.args = tuple(new_args)
        fp.batched = tuple(batched)
        body.delete_all_unused_submodules()
        body.recompile()
        if last_feedback is not None:
            fp.feedback.recompile()
        return True
