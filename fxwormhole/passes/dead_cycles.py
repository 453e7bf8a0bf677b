"""Check pass: refuse a wormhole cycle that nothing the model returns depends on.

A forward that returns None, or throws away the branch a wormhole spans, would still run the
cycle's fixed-point solve (or the per-step solves of a recurrent module) at every call and discard
the result: fx keeps ``call_module`` nodes without users, since a module may have side effects.
The wrapped graph makes the question exact: a cycle is one ``fixed_point_<k>`` node (or one
recurrent module with temporal wormholes), and it is dead when no path of data edges, or of the
orderings in-place updates impose (:func:`~fxwormhole.passes._mutation.ordering_edges`), leads from
it to the output. Such a cycle raises :class:`PlacementError` naming its wormholes; the graph is
not changed.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import analysis
from ..config import WormholeConfig
from ..errors import PlacementError
from ..runtime.fixed_point import FixedPoint
from ..runtime.recurrent import ExplicitRecurrent
from ._mutation import ordering_edges
from .meta import graph_record, node_info

__all__ = ["RefuseDeadCycles"]


def _pairs(pairs) -> str:
    return ", ".join(f"{src} -> {dst}" for src, dst in pairs)


class RefuseDeadCycles(PassBase):
    """Raise :class:`PlacementError` for a cycle whose values never reach the graph's output.

    Args:
        config: the wormhole config (its policy is named when the policy chose the wormhole).
    """

    def __init__(self, config: WormholeConfig):
        super().__init__()
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        cycles = {node: what for node in gm.graph.nodes if (what := self._describe(gm, node))}
        if not cycles:
            return PassResult(gm, False)
        graph = analysis.to_networkx(gm)
        graph.add_edges_from(ordering_edges(gm))
        output = next(n for n in gm.graph.nodes if n.op == "output")
        live = nx.ancestors(graph, output.name)
        for node, (what, todo) in cycles.items():
            if node.name in live:
                continue
            why = ("forward returns no tensor (None or constants)" if not output.all_input_nodes
                   else "nothing the model returns depends on it")
            raise PlacementError(
                f"{what}: {why}, so every call would run the solve and throw its result away. "
                f"What to do: {todo}")
        return PassResult(gm, False)

    def _describe(self, gm: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
        """(the cycle named for the user, what to do) for a node that runs a cycle, else None."""
        if node.op != "call_module":
            return None
        module = gm.get_submodule(node.target)
        chosen = f", chosen by wormholes={self.config.wormholes!r}" if isinstance(self.config.wormholes, str) else ""
        if isinstance(module, FixedPoint):
            specs = {s.index: s for s in graph_record(gm).wormholes or ()}
            info = node_info(node).fixed_point
            names = ", ".join(f"wormhole_{i} ({specs[i].src} -> {specs[i].dst})" for i in (info.wormholes if info else ())
                              if i in specs) or "its wormholes"
            return (f"{names}{chosen}, fused into {node.name!r}",
                    "return a value computed from these layers, or place the wormhole between layers the output "
                    "depends on")
        if isinstance(module, ExplicitRecurrent) and module.temporal_pairs:
            return (f"the temporal wormholes of {node.target!r} ({_pairs(module.temporal_pairs)}{chosen})",
                    f"return the output of {node.target!r} (or a value computed from it), or place the wormholes "
                    f"in a recurrent module the output depends on")
        return None
