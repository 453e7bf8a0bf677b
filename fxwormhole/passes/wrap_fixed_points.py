"""Wrap pass: fuse each cycle closed by wormhole back edges into one fixed-point node.

The graph plus its recorded back edges (``write_i -> read_i``) is viewed as a networkx DiGraph; each
strongly connected component that contains a back edge becomes one
:class:`~fxwormhole.runtime.fixed_point.FixedPoint` module, built from two GraphModules:

* ``body(z, *ext) -> y``: the component's nodes, with each ``read_i`` replaced by the state ``z_i``
  (the injected signal, starting at 0). ``y`` holds every value used outside the component (skip
  connections, several outputs), every wormhole source and any destination input computed inside.
* ``feedback(y, *ext) -> (z_next, scale)``: the wormhole modules, ``z_next_i = gate(h_i) proj(h_i)``,
  and ``scale = ||x_dst||`` per sample, so convergence is judged by the change of the injected
  signal relative to the signal it modulates. A closed wormhole (zero projection) gives
  ``z_1 = z_0``: one body evaluation, the cost of the original network.

Overlapping spans share nodes, hence one component; disjoint spans give several nodes. Values the
component computes are read back outside through ``getitem`` nodes, evaluated at the fixed point.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import analysis
from ..config import WormholeConfig
from ..errors import PlacementError
from ..runtime.fixed_point import FixedPoint
from ..runtime.wormhole import ZerosInit, per_sample_norm
from ._common import legalize, state_preserved
from ._mutation import alias_roots, mutated_inputs, ordering_edges
from .meta import FixedPointInfo, graph_record, node_info, update_graph, update_node

__all__ = ["WrapFixedPoints", "cyclic_components"]


def cyclic_components(gm: fx.GraphModule) -> list[set[str]]:
    """Node-name sets of the strongly connected components closed by recorded back edges."""
    graph = analysis.to_networkx(gm)
    for edge in graph_record(gm).back_edges or ():
        graph.add_edge(edge.write, edge.read)
    # In-place updates: a read of a buffer depends on the update that filled it (RWKV's WKV loop
    # writes ``out[:, t] = ...`` into a zeros buffer that a later node reads). Without these edges
    # the updates fall outside the component and run after the fixed point.
    graph.add_edges_from(ordering_edges(gm))
    comps = [c for c in nx.strongly_connected_components(graph) if len(c) > 1]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(comps, key=lambda c: min(order[n] for n in c))


def _unique(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    return list(dict.fromkeys(nodes))


def _shape_nodes_read(order: list[fx.Node], body_nodes: list[fx.Node], inside: set[fx.Node]) -> list[fx.Node]:
    """The outside shape-only nodes ``body_nodes`` read (transitively), in graph order."""
    pulled: set[fx.Node] = set()
    stack = [a for n in body_nodes for a in n.all_input_nodes]
    while stack:
        a = stack.pop()
        if a in inside or a in pulled or not analysis.is_shape_node(a):
            continue
        pulled.add(a)
        stack.extend(a.all_input_nodes)
    return [n for n in order if n in pulled]


class WrapFixedPoints(PassBase):
    """Replace every wormhole cycle by one ``fixed_point_<k>`` call_module node.

    Args:
        config: the wormhole config (solver, gradient, failure policy).
        example_inputs: the model's example inputs. When given, each body is checked for
            coupling between samples (BatchNorm in training, attention over dim 0, ...): if a
            sample's output depends on other samples, that node halts per batch, not per sample.
    """

    def __init__(self, config: WormholeConfig, example_inputs: Sequence[Any] | None = None):
        super().__init__()
        self.config = config
        self.example_inputs = example_inputs

    def call(self, gm: fx.GraphModule) -> PassResult:
        components = cyclic_components(gm)
        if not components:
            return PassResult(gm, False)
        order = ordering_edges(gm)  # in-place updates: node orders that data edges do not record
        fused_into: dict[str, str] = {}
        # The example values and the coupling check run the model: in training mode that would move
        # BatchNorm statistics (and any buffer a forward mutates) before the user sees the result.
        with state_preserved(gm):
            for k, comp in enumerate(components):
                # Values are re-computed per component: an earlier fusion may feed this one.
                self._fuse(gm, comp, f"fixed_point_{k}", self._example_values(gm))
                fused_into.update(dict.fromkeys(comp, f"fixed_point_{k}"))
                # The fused node was inserted before the component; restore topological order,
                # keeping the in-place orders (now to and from the fused node).
                legalize(gm, [(fused_into.get(a, a), fused_into.get(b, b)) for a, b in order])
        gm.delete_all_unused_submodules()
        gm.recompile()
        update_graph(gm, fixed_points=tuple(f"fixed_point_{k}" for k in range(len(components))))
        return PassResult(gm, True)

    def _example_values(self, gm: fx.GraphModule) -> dict[str, Any] | None:
        if self.example_inputs is None:
            return None
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        with torch.no_grad():
            interp.run(*self.example_inputs)
        return {n.name: v for n, v in interp.env.items()}

    def _fuse(self, gm: fx.GraphModule, comp: set[str], name: str, values: dict | None) -> None:
        graph = gm.graph
        order = list(graph.nodes)
        inside = [n for n in order if n.name in comp]
        inside_set = set(inside)
        reads = sorted((n for n in inside if node_info(n).role == "read"), key=lambda n: node_info(n).wormhole)
        writes = sorted((n for n in inside if node_info(n).role == "write"), key=lambda n: node_info(n).wormhole)
        if not reads or len(reads) != len(writes):
            raise PlacementError(f"{name}: malformed wormhole cycle (reads {reads}, writes {writes})")
        body_nodes = [n for n in inside if n not in reads and n not in writes]
        self._check_updates_stay_inside(gm, name, inside)
        # Sizes computed outside (dynamic-batch export graphs: sym_size of the input) are recomputed
        # in the body from tensors: ints cannot cross the node boundary of a compiled backward, and a
        # shrunk active set needs the shrunk batch size.
        shape_nodes = _shape_nodes_read(order, body_nodes, inside_set)
        copied = shape_nodes + body_nodes  # shape nodes are copied in, and stay outside for others
        dst_inputs = [r.args[0] for r in reads]

        # Inputs from outside the component (get_attr values are copied into the body instead).
        local = inside_set | set(shape_nodes)
        ext = _unique(
            [a for n in copied + writes for a in n.all_input_nodes if a not in local and a.op != "get_attr"]
            + [x for x in dst_inputs if x not in inside_set]
        )
        escaping = [n for n in body_nodes if any(u not in inside_set for u in n.users)]
        outputs = _unique(escaping + [w.args[0] for w in writes] + [x for x in dst_inputs if x in inside_set])

        body = self._body_module(gm, reads, ext, copied, outputs)
        feedback = self._feedback_module(gm, writes, outputs, ext, dst_inputs)
        solver = self.config.solver
        batch = self._batch_size(reads)
        batched = [self._is_batched(x, batch) for x in ext]
        init = ZerosInit([(ext.index(x) if x in ext else None, tuple(x.meta["val"].shape[1:]), x.meta["val"].dtype) for x in dst_inputs])
        if values is not None and solver.halting == "sample" and self._couples_samples(body, init, ext, batched, values):
            solver = replace(solver, halting="batch")
        fp = FixedPoint(
            body,
            feedback,
            solver=solver,
            grad=self.config.grad,
            on_fail=self.config.on_fail,
            name=name,
            init=init,
            batched=batched,
        )
        fp.wormholes = [graph_record(gm).wormholes[node_info(r).wormhole] for r in reads]
        gm.add_submodule(name, fp)

        with graph.inserting_before(inside[0]):
            fp_node = graph.call_module(name, tuple(ext))
        fp_node.meta["val"] = tuple(o.meta.get("val") for o in outputs)
        update_node(fp_node, role="fixed_point", fixed_point=FixedPointInfo(
            wormholes=tuple(node_info(r).wormhole for r in reads),
            fused_nodes=tuple(n.name for n in inside),
            outputs=tuple(o.name for o in outputs),
        ))
        for j, node in enumerate(outputs):
            if node not in escaping:
                continue
            with graph.inserting_after(fp_node):
                item = graph.call_function(operator.getitem, (fp_node, j))
            item.meta["val"] = node.meta.get("val")
            update_node(item, role="fixed_point_output", output_of=node.name)
            for user in [u for u in node.users if u not in inside_set]:
                user.replace_input_with(node, item)
        for node in reversed(inside):
            graph.erase_node(node)

    @staticmethod
    def _check_updates_stay_inside(gm: fx.GraphModule, name: str, inside: list[fx.Node]) -> None:
        """Refuse a body that updates in place a tensor it did not allocate.

        The body runs once per solver iteration (and on row subsets under per-sample halting): an
        update of an outside tensor would be applied several times, or to a copy.
        """
        roots, inside_set = alias_roots(gm), set(inside)
        for node in inside:  # graph order: the first offending update is named
            for target in mutated_inputs(gm, node):
                if roots[target] not in inside_set:
                    raise PlacementError(
                        f"{name}: node {node.name!r} updates {roots[target].name!r} in place, a tensor computed "
                        f"outside the wormhole span; the fixed point evaluates its body once per iteration, so the "
                        f"update would repeat. Choose a span that contains {roots[target].name!r} or none of its "
                        f"updates, or compute the value out of place (e.g. torch.stack instead of filling a buffer)"
                    )

    @staticmethod
    def _body_module(gm, reads, ext, body_nodes, outputs) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        z = g.placeholder("z")  # one tensor, or a tuple with one entry per wormhole
        vals = tuple(r.meta.get("val") for r in reads)
        z.meta["val"] = vals[0] if len(vals) == 1 else vals
        for x in ext:
            env[x] = g.placeholder(x.name)
            env[x].meta["val"] = x.meta.get("val")
        for i, r in enumerate(reads):
            env[r] = z if len(reads) == 1 else g.call_function(operator.getitem, (z, i))
            env[r].meta["val"] = r.meta.get("val")
            update_node(env[r], role="state", wormhole=node_info(r).wormhole)

        def lookup(a: fx.Node) -> fx.Node:
            if a not in env and a.op == "get_attr":
                env[a] = g.get_attr(a.target)
                env[a].meta = dict(a.meta)
            return env[a]

        for n in body_nodes:
            env[n] = g.node_copy(n, lookup)
        g.output(tuple(env[o] for o in outputs))
        return fx.GraphModule(gm, g, class_name="FixedPointBody")

    @staticmethod
    def _feedback_module(gm, writes, outputs, ext, dst_inputs) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        y = g.placeholder("y")
        ext_nodes = [g.placeholder(x.name) for x in ext]
        env.update(zip(ext, ext_nodes))
        for j, o in enumerate(outputs):
            env[o] = g.call_function(operator.getitem, (y, j))
        injected = [g.call_module(w.target, (env[w.args[0]],)) for w in writes]
        scale = g.call_function(per_sample_norm, tuple(env[x] for x in dst_inputs))
        state = injected[0] if len(injected) == 1 else tuple(injected)
        g.output((state, scale))
        return fx.GraphModule(gm, g, class_name="FixedPointFeedback")

    @staticmethod
    def _batch_size(reads) -> int:
        return int(reads[0].meta["val"].shape[0])

    @staticmethod
    def _is_batched(node: fx.Node, batch: int) -> bool:
        val = node.meta.get("val")
        return isinstance(val, torch.Tensor) and val.dim() > 0 and int(val.shape[0]) == batch

    @staticmethod
    def _couples_samples(body, init, ext, batched, values) -> bool:
        """True when a sample's body output depends on other samples of the batch."""
        inputs = [values[x.name] for x in ext]
        batch = next((v.shape[0] for v, b in zip(inputs, batched) if b), 0)
        if batch < 2:
            return False
        half = batch // 2
        with torch.no_grad():
            full = body(init(*inputs), *inputs)
            part_inputs = [v[:half] if b else v for v, b in zip(inputs, batched)]
            try:
                part = body(init(*part_inputs), *part_inputs)
            except Exception:  # noqa: BLE001 - e.g. a graph specialised to the example's batch size
                return True
        for a, b in zip(full, part):
            if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch:
                if not torch.allclose(a[:half], b, rtol=1e-4, atol=1e-5):
                    return True
        return False
