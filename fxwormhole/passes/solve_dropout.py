"""Dropout pass: dropout inside a fixed point keeps one mask for the whole solve.

Runs after :class:`~fxwormhole.passes.wrap_fixed_points.WrapFixedPoints`. In every fixed point's
body and feedback, each dropout -- an ``nn.Dropout``/``Dropout1d/2d/3d`` module call,
``F.dropout``/``F.dropout1d/2d/3d``, ``torch.dropout``, or ATen's ``dropout``/``native_dropout``/
``feature_dropout`` of an export graph -- becomes a call of a
:class:`~fxwormhole.runtime.solve_dropout.SolveDropout` (an attention with ``dropout_p > 0``, a
:class:`~fxwormhole.runtime.solve_dropout.SolveAttention`), which draws its mask once per forward call
of the fixed point (see that module for why). Outside fixed points dropout is left alone.

An ATen dropout recorded with ``train=False`` (an export graph captured in eval mode) stays as it
was: it is the identity whatever the mode. One recorded with ``train=True`` now follows
``model.train()``/``model.eval()``, as the module it came from did.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.fixed_point import FixedPoint
from ..runtime.solve_dropout import SolveAttention, SolveDropout

__all__ = ["SolveDropoutMasks", "dropout_spec"]

aten = torch.ops.aten

_FEATURE_MODULES = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
#: callable -> (feature, returns_mask, argument index of ``p``, of ``training``, its default)
_FUNCTIONS: dict[Any, tuple[bool, bool, int, int, bool]] = {
    F.dropout: (False, False, 1, 2, True),
    F.dropout1d: (True, False, 1, 2, True),
    F.dropout2d: (True, False, 1, 2, True),
    F.dropout3d: (True, False, 1, 2, True),
    torch.dropout: (False, False, 1, 2, True),
    aten.dropout.default: (False, False, 1, 2, True),
    aten.feature_dropout.default: (True, False, 1, 2, True),
    aten.native_dropout.default: (False, True, 1, 2, True),
}
_KWARG_NAMES = {1: "p", 2: ("training", "train")}


def _arg(node: fx.Node, index: int, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    names = _KWARG_NAMES.get(index, ())
    for name in (names,) if isinstance(names, str) else names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def dropout_spec(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[float, bool, bool]]:
    """``(p, feature, returns_mask)`` when ``node`` is a dropout that draws masks in training mode."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Dropout or isinstance(mod, _FEATURE_MODULES):
            return float(mod.p), isinstance(mod, _FEATURE_MODULES), False
        return None
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    feature, returns_mask, p_at, train_at, train_default = _FUNCTIONS[node.target]
    p, train = _arg(node, p_at, 0.5), _arg(node, train_at, train_default)
    if not isinstance(p, (int, float)) or train is not True:
        return None  # a traced probability, or dropout recorded as off: leave it
    return float(p), feature, returns_mask


_SDPA = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _attention(node: fx.Node) -> Optional[tuple[SolveAttention, tuple]]:
    """A :class:`SolveAttention` and its arguments when ``node`` is an attention with dropout."""
    if node.op != "call_function" or node.target not in _SDPA:
        return None
    args = dict(zip(_SDPA_ARGS, node.args), **node.kwargs)
    p, causal = args.get("dropout_p", 0.0), args.get("is_causal", False)
    if not isinstance(p, (int, float)) or p == 0.0 or not isinstance(causal, bool):
        return None
    mod = SolveAttention(float(p), is_causal=causal, scale=args.get("scale"),
                         enable_gqa=bool(args.get("enable_gqa", False)))
    return mod, (args["query"], args["key"], args["value"], args.get("attn_mask"))


def _replacement(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[nn.Module, tuple]]:
    spec = dropout_spec(gm, node)
    if spec is None:
        return _attention(node)
    p, feature, returns_mask = spec
    return SolveDropout(p, feature=feature, returns_mask=returns_mask), (
        node.args[0] if node.args else node.kwargs["input"],)


def _rewrite(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        found = _replacement(gm, node)
        if found is None:
            continue
        mod, args = found
        name = f"solve_dropout_{count}"
        while hasattr(gm, name):
            name += "_"
        mod.train(gm.training)
        gm.add_submodule(name, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


class SolveDropoutMasks(PassBase):
    """Dropout in fixed-point bodies and feedbacks becomes :class:`SolveDropout` (module docstring)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = 0
        for fp in [m for m in gm.modules() if isinstance(m, FixedPoint)]:
            for part in (fp.body, fp.feedback):
                if isinstance(part, fx.GraphModule):
                    count += _rewrite(part)
        return PassResult(gm, bool(count))

