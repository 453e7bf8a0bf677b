"""Insert pass: materialise planned wormholes as modules and a (still acyclic) back edge.

For each :class:`~fxwormhole.passes.plan_wormholes.WormholeSpec` this pass adds a
:class:`~fxwormhole.runtime.wormhole.Wormhole` module ``wormhole_<i>`` and three nodes::

    read_i  = wormhole_read(x)          # the injected signal; zeros until the cycle is closed
    x_mod_i = x + read_i                # what the destination now consumes
    write_i = wormhole_<i>(h_src)       # gate(h) * proj(h): the value that flows back

The back edge ``write_i -> read_i`` is recorded in ``GraphRecord.back_edges`` instead
of being drawn as a data edge, so the fx graph stays a DAG (fx cannot represent a cycle) and still
runs: with ``read_i = 0`` it computes exactly the original network. The wrap pass turns each cycle
into one fixed-point node.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import WormholeConfig
from ..errors import PlacementError
from ._common import build_wormhole
from .meta import BackEdge, graph_record, update_graph, update_node

__all__ = ["InsertWormholes", "wormhole_read"]


def wormhole_read(x: torch.Tensor) -> torch.Tensor:
    """Placeholder op for the signal a wormhole injects into ``x`` (zero before the cycle closes)."""
    return torch.zeros_like(x)


def _after_placeholders(gm: fx.GraphModule) -> fx.Node:
    """The node after the last placeholder (export graphs put get_attr nodes before them)."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    return last.next


class InsertWormholes(PassBase):
    """Add gate + projection modules and the read/write ends of every planned wormhole."""

    def __init__(self, config: WormholeConfig):
        super().__init__()
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        if graph_record(gm).wormholes is None:
            raise PlacementError("InsertWormholes runs after PlanWormholes: no wormhole plan in gm.meta")

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        specs = graph_record(gm).wormholes
        nodes = {n.name: n for n in gm.graph.nodes}
        back_edges = list(graph_record(gm).back_edges or ())
        modules: dict[tuple[str, str], str] = {}
        modulated: dict[tuple[str, fx.Node], fx.Node] = {}
        for spec in specs:
            # Call sites of the same (src, dst) pair share one set of parameters (cell loops).
            name = modules.get((spec.src, spec.dst))
            if name is None:
                name = spec.module_name
                modules[(spec.src, spec.dst)] = name
                gm.add_submodule(name, build_wormhole(spec.src_shape, spec.dst_shape, cfg, src=spec.src, dst=spec.dst,
                                                      like=nodes[spec.dst_input].meta["val"]))

            x, src = nodes[spec.dst_input], nodes[spec.src_node]
            with gm.graph.inserting_before(_after_placeholders(gm) if x.op == "placeholder" else x.next):
                read = gm.graph.call_function(wormhole_read, (x,))
            read.meta["val"] = x.meta["val"]
            update_node(read, role="read", wormhole=spec.index)
            # Several wormholes may modulate the same input of the same user: chain the additions.
            groups: dict[fx.Node, list[fx.Node]] = {}
            for user in spec.dst_users:
                groups.setdefault(modulated.get((user, x), x), []).append(nodes[user])
            for current, users in groups.items():
                with gm.graph.inserting_after(read if current is x else current):
                    x_mod = gm.graph.call_function(operator.add, (current, read))
                x_mod.meta["val"] = x.meta["val"]
                update_node(x_mod, role="modulated", wormhole=spec.index)
                for user in users:
                    user.replace_input_with(current, x_mod)
                    modulated[(user.name, x)] = x_mod
            with gm.graph.inserting_after(src):
                write = gm.graph.call_module(name, (src,))
            write.meta["val"] = x.meta["val"]
            update_node(write, role="write", wormhole=spec.index)
            back_edges.append(BackEdge(write.name, read.name, spec.index))
        update_graph(gm, back_edges=tuple(back_edges))
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, bool(specs))
