"""Alias pass: a fixed point's inputs never share storage.

Runs after :class:`~fxwormhole.passes.wrap_fixed_points.WrapFixedPoints`. Compiled and exported
fixed points solve in ``torch.while_loop``, which refuses inputs that alias each other ("Encountered
aliasing during higher order op tracing"): nn.Transformer's attention mask and its unsqueezed view,
Llama's rotary tables. For every fixed-point call whose tensor arguments share a storage root
(:func:`~fxwormhole.passes._mutation.alias_roots`), all but the first argument of each root are
passed as ``clone``\\ s. The values are the same, so eager results do not change; the copies cost
one pass over those (usually small) tensors per call.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.fixed_point import FixedPoint
from ._mutation import alias_roots

__all__ = ["SeparateAliasedInputs"]


def _separate(gm: fx.GraphModule) -> int:
    roots = alias_roots(gm)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FixedPoint):
            continue
        seen: set[fx.Node] = set()
        args = list(node.args)
        for i, arg in enumerate(args):
            if not isinstance(arg, fx.Node) or not isinstance(arg.meta.get("val"), torch.Tensor):
                continue
            if roots[arg] in seen:
                with gm.graph.inserting_before(node):
                    copy = gm.graph.call_function(torch.clone, (arg,))
                copy.meta = {k: v for k, v in arg.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
                args[i] = copy
                count += 1
            seen.add(roots[arg])
        node.args = tuple(args)
    return count


class SeparateAliasedInputs(PassBase):
    """Pass clones where a fixed point's tensor inputs share storage (see the module docstring)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = _separate(gm)
        if count:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(count))
