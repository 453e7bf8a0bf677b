"""The module ``fxwormhole.transform`` returns: an ordinary GraphModule with a few extras.

A fixed-point node owns the layers of its cycle (they live in ``fixed_point_<k>.body``), yet users
expect the original ``state_dict`` to load into the transformed model. So ``state_dict()`` shows
*public* names -- the internal name with every ``fixed_point_<k>.body.`` / ``.feedback.`` segment
removed, i.e. the original module paths -- and ``load_state_dict`` accepts public or internal names.
``named_parameters()`` keeps the internal names (where the tensors really live). Errors of
``load_state_dict`` (missing, unexpected, size mismatch, not a tensor) name public keys too.

The class survives ``copy.deepcopy`` and ``torch.save``/``torch.load`` (pickling re-creates this
class, hooks included), unlike a plain GraphModule subclass, which comes back as a GraphModule.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Optional, Tuple

import torch.fx as fx
import torch.nn as nn
from torch import Tensor
from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

from .passes.meta import graph_record

__all__ = ["TransformedModule", "public_name", "per_sample_iterations"]

_INTERNAL = re.compile(r"(?:^|(?<=\.))fixed_point_\d+\.(?:body|feedback)\.")
# the same segments in a message: a name starts after a space or a quote ('size mismatch for ...', '"...')
_INTERNAL_IN_TEXT = re.compile(r"(?:^|(?<=[.\s\"']))fixed_point_\d+\.(?:body|feedback)\.")


def public_name(name: str) -> str:
    """``"fixed_point_0.body.fc2.weight"`` -> ``"fc2.weight"`` (names elsewhere are unchanged)."""
    return _INTERNAL.sub("", name)


def _public_text(message: str) -> str:
    """Every internal name in ``message`` replaced by its public name."""
    return _INTERNAL_IN_TEXT.sub("", message)


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    renamed = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = prefix + public_name(key[len(prefix):])
        renamed.setdefault(key, value)  # a layer shared inside and outside a cycle appears once
    state_dict.clear()
    state_dict.update(renamed)


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """Public name -> every internal name of that tensor (a layer shared inside and outside a cycle has two)."""
    aliases: dict[str, list[str]] = {}
    for name, _ in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(public_name(name), []).append(name)
    return aliases


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    # torch appends "size mismatch for <internal name>" to error_msgs while the children load; the
    # post hook, which does not receive the list, renames them (see _load_post_hook)
    module.__dict__["_load_error_msgs"] = error_msgs
    aliases = _aliases(module)
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        names = aliases.get(key[len(prefix):])
        if names and names != [key[len(prefix):]]:  # a public name: store it under every internal one
            value = state_dict.pop(key)
            for name in names:
                state_dict[prefix + name] = value


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = list(dict.fromkeys(public_name(k) for k in keys))
    error_msgs = module.__dict__.pop("_load_error_msgs", None)
    if error_msgs is not None:  # a layer shared inside and outside a cycle fails under both names: once
        error_msgs[:] = list(dict.fromkeys(_public_text(m) for m in error_msgs))


def _rebuild(body: dict, import_block: str) -> "TransformedModule":
    fn_src = body.get("_code") or body["code"]
    forward = _forward_from_src(import_block + fn_src, {})
    gm = _deserialize_graph_module(forward, body, graph_module_cls=TransformedModule)
    gm.meta = body.get("meta", {})  # the plan (wormholes, back edges, ...): GraphModule starts empty
    return gm


class TransformedModule(fx.GraphModule):
    """A model rewritten by fxwormhole: wormholes, fixed-point nodes and (optionally) probes."""

    def __init__(self, root: nn.Module | dict, graph: fx.Graph, class_name: str = "TransformedModule"):
        super().__init__(root, graph, class_name)
        self._register_state_dict_hook(_state_dict_post_hook)
        self._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
        self.register_load_state_dict_post_hook(_load_post_hook)

    def __reduce__(self):
        _, (body, import_block) = super().__reduce__()
        return (_rebuild, (body, import_block))

    def _deepcopy_init(self):
        return TransformedModule.__init__

    # ------------------------------------------------------------------ reports
    def fixed_point_modules(self) -> dict[str, nn.Module]:
        """Every fixed-point runtime module, by module path (graph nodes and recurrent steps)."""
        from .runtime.fixed_point import FixedPoint

        return {name: m for name, m in self.named_modules() if isinstance(m, FixedPoint)}

    def fixed_point_stats(self) -> dict[str, Any]:
        """Stats of the last call of every fixed point, per node and per sample.

        Keys are module paths (``"fixed_point_0"``); values are
        :class:`~fxwormhole.runtime.stats.FixedPointStats` (None before the first call). Recurrent
        modules with temporal wormholes report a
        :class:`~fxwormhole.runtime.recurrent.TemporalStats` (``[T, B]`` tensors) under their path.
        """
        from .runtime.recurrent import ExplicitRecurrent

        stats: dict[str, Any] = {}
        for name, m in self.named_modules():
            if isinstance(m, ExplicitRecurrent) and m.temporal_pairs:
                stats[public_name(name)] = m.stats  # TemporalStats: [T, B] tensors
        # per-step FixedPoints of recurrent modules are reported through their module above
        inner = tuple(f"{n}." for n in stats)
        for name, m in self.fixed_point_modules().items():
            if not public_name(name).startswith(inner):
                stats[name] = m.stats
        return stats

    @property
    def wormholes(self) -> list:
        """The planned wormholes (:class:`~fxwormhole.passes.meta.WormholeSpec`)."""
        return list(graph_record(self).wormholes or ())

    def wormhole_parameters(self) -> list[str]:
        """Public names of the parameters the transform added (gates and projections)."""
        return [public_name(n) for n, _ in self.named_parameters() if "wormhole" in public_name(n)]

    def summary(self) -> str:
        """What the transform inserted: wormholes, gates, fixed-point nodes, new parameters."""
        lines = []
        for spec in self.wormholes:
            lines.append(f"wormhole_{spec.index}: {spec.src} ({spec.src_node} {list(spec.src_shape)}) -> "
                         f"{spec.dst} input ({spec.dst_input} {list(spec.dst_shape)})")
        for name, m in self.fixed_point_modules().items():
            cfg = m.solver_config if hasattr(m, "solver_config") else None
            extra = f" solver={cfg.name} tol={cfg.tol} max_iter={cfg.max_iter} halting={cfg.halting}" if cfg else ""
            lines.append(f"{name}: fixed point over wormholes {[s.index for s in getattr(m, 'wormholes', [])]}{extra}")
        temporal = graph_record(self).temporal
        for path, pairs in (temporal.placed if temporal is not None else {}).items():
            edges = ", ".join(f"{src} -> {dst}" for src, dst in pairs)
            lines.append(f"{path}: temporal wormholes {edges} (one fixed point per time step)")
        added = sum(p.numel() for n, p in self.named_parameters() if "wormhole" in public_name(n))
        lines.append(f"new parameters: {added}")
        return "\n".join(lines)


def per_sample_iterations(net: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Forward and backward fixed-point iterations per sample of the last call of ``net``.

    For a recurrent module with temporal wormholes the count is the mean over time steps; counts of
    several fixed-point nodes add up. Returns ``(forward [B], backward [B])``; an entry is ``None``
    when ``net`` has no fixed point (or, for backward, when no backward pass has run yet).
    """
    stats_of = getattr(net, "fixed_point_stats", None)
    if stats_of is None:
        return None, None
    fwd: Optional[Tensor] = None
    bwd: Optional[Tensor] = None
    for st in stats_of().values():
        if st is None:
            continue
        f, b = st.iterations, st.backward_iterations
        f = f.float().mean(0) if f.dim() == 2 else f.float()  # TemporalStats: [T, B]
        fwd = f if fwd is None else fwd + f
        if b is not None:
            b = b.float().mean(0) if b.dim() == 2 else b.float()
            bwd = b if bwd is None else bwd + b
    return fwd, bwd
