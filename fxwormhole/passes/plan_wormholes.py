"""Plan pass: decide where wormholes go and write the plan into node metadata.

Annotate, then materialise (as torchao's prepare_pt2e does): this pass only resolves names, checks
that each wormhole is possible, and records :class:`~fxwormhole.passes.meta.WormholeSpec` objects in
``GraphRecord.wormholes`` and the wormhole indices in ``NodeInfo.wormhole_src`` / ``wormhole_dst``.
:mod:`~fxwormhole.passes.insert_wormholes` then inserts the modules. Tests can check a plan without
running the model.

Names. ``src`` names the value that feeds back, ``dst`` the layer whose input is modulated. Each
may be a module path of a parametrised layer (``"fc3"``, ``"encoder.layers.1.linear2"``), a path of
any submodule whose forward was inlined into the graph (``"layers.1"`` of a transformer stack:
its output, resp. its main input), or an fx node name. A layer called several times (a cell in a
Python time loop) gets one wormhole per call site, paired in call order, sharing parameters.

Automatic policies (``WormholeConfig.wormholes``):

* ``"auto"``: the best candidate span of :func:`fxwormhole.analysis.candidate_spans`, i.e. the
  deepest hidden layer of the main path back to the first layer; for a Python loop over an RNN
  cell, a wormhole per time step from the cell's output back to its input (which
  :class:`~fxwormhole.passes.cell_loops.FuseCellLoops` usually takes first: it runs the loop as one
  module on the fast temporal runtime, and this pass then places nothing);
* ``"every:K"``: from every K-th hidden main-path layer back K layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import analysis
from ..config import WormholeConfig
from ..errors import PlacementError
from ..runtime.wormhole import bridge_kind
from ._common import value_shape
from ..policy import Policy, parse_policy
from .meta import TemporalPlacement, WormholeSpec, graph_record, node_info, update_graph, update_node

__all__ = ["WormholeSpec", "PlanWormholes", "resolve_pairs", "policy_pairs"]


@dataclass(frozen=True)
class _Endpoint:
    value: fx.Node
    users: tuple[fx.Node, ...]


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            return a
    return None


def _known_names(layers: Sequence[analysis.Layer], regions: dict) -> str:
    names = list(dict.fromkeys(l.name for l in layers)) + [p for p in regions if p not in {l.name for l in layers}]
    shown = ", ".join(repr(n) for n in names[:12])
    return shown + (", ..." if len(names) > 12 else "")


def _endpoints(gm: fx.GraphModule, name: str, role: str, layers, regions) -> list[_Endpoint]:
    """All graph places ``name`` refers to, as a source (``role="src"``) or destination."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = [l for l in layers if l.name == name]
    if sites:
        out = []
        for layer in sites:
            call = nodes[layer.node]
            if role == "src":
                out.append(_Endpoint(nodes[layer.output_node], ()))
            else:
                x = _first_tensor_arg(call)
                if x is None:
                    raise PlacementError(f"wormhole dst {name!r}: layer node {call.name!r} has no tensor input to modulate")
                out.append(_Endpoint(x, (call,)))
        return out
    region = regions.get(name)
    if region is not None:
        if role == "src":
            if region.output is None:
                raise PlacementError(
                    f"wormhole src {name!r}: module {name!r} produces several values that leave it; "
                    f"name one of its layers or an fx node instead"
                )
            return [_Endpoint(nodes[region.output], ())]
        if not region.inputs:
            raise PlacementError(f"wormhole dst {name!r}: module {name!r} consumes no value from outside")
        x = nodes[region.inputs[0]]
        inside = set(region.nodes)
        # Only data consumers: export graphs also feed inputs to their input-shape guard.
        return [_Endpoint(x, tuple(u for u in x.users if u.name in inside and _is_tensor(u)))]
    node = nodes.get(name)
    if node is not None and node.op not in ("placeholder", "output"):
        if role == "src":
            return [_Endpoint(node, ())]
        x = _first_tensor_arg(node)
        if x is None:
            raise PlacementError(f"wormhole dst {name!r}: node {name!r} has no tensor input to modulate")
        return [_Endpoint(x, (node,))]
    raise PlacementError(
        f"wormhole {role} {name!r} names no layer, module or fx node of the captured graph; "
        f"known layers and modules: {_known_names(layers, regions)}"
    )


def _policy_pairs(gm: fx.GraphModule, policy: Policy, layers) -> list[tuple[str, str]]:
    if policy.kind == "auto":
        spans = analysis.candidate_spans(gm, layers)
        cells = list(dict.fromkeys(l.name for l in layers if l.kind.endswith("_cell")))
        if not spans and cells:
            # A Python loop over a cell: each step's output feeds back into that step's input
            # (per-call wormholes, one fixed point per time step, shared parameters).
            return [(cells[-1], cells[0])]
        if not spans:
            raise PlacementError(
                "wormholes='auto' found no candidate span: the main path needs at least two layers before the "
                "output layer; name wormholes explicitly, e.g. WormholeConfig(wormholes=[('fc2', 'fc1')])"
            )
        return [tuple(spans[0])]
    k = policy.every
    main = sorted((l for l in layers if l.on_main_path and l.depth is not None), key=lambda l: l.depth)
    hidden = list(dict.fromkeys(l.name for l in main))[:-1]  # the output layer does not feed back
    pairs = [(hidden[j], hidden[j - k]) for j in range(k, len(hidden), k)]
    if not pairs:
        raise PlacementError(
            f"wormholes='every:{k}': the main path has {len(hidden)} hidden layers, too few for a span of {k}; "
            f"use a smaller K or name wormholes explicitly"
        )
    return pairs


def policy_pairs(gm: fx.GraphModule, policy: Policy) -> list[tuple[str, str]]:
    """The ``(src, dst)`` names an automatic policy picks on ``gm`` (the cell-loop pass asks first)."""
    return _policy_pairs(gm, policy, analysis.layer_table(gm))


def resolve_pairs(gm: fx.GraphModule, config: WormholeConfig) -> list[WormholeSpec]:
    """Resolve the config's wormholes to graph places and validate them.

    Only what the temporal pass left (its :class:`~fxwormhole.passes.meta.TemporalPlacement`): under a
    policy nothing if it placed temporal wormholes, else the explicit pairs it did not consume.
    """
    policy = parse_policy(config.wormholes)
    temporal = graph_record(gm).temporal or TemporalPlacement()
    if policy.automatic and temporal.policy_consumed:
        return []
    explicit = [pair for pair in policy.pairs if pair not in temporal.consumed_pairs]
    if not policy.automatic and not explicit:
        return []
    layers = analysis.layer_table(gm)
    regions = analysis.module_regions(gm)
    pairs = _policy_pairs(gm, policy, layers) if policy.automatic else explicit
    graph = analysis.to_networkx(gm)
    specs: list[WormholeSpec] = []
    for src, dst in pairs:
        sources = _endpoints(gm, src, "src", layers, regions)
        dests = _endpoints(gm, dst, "dst", layers, regions)
        if len(sources) != len(dests):
            if len(sources) == 1:
                sources = sources * len(dests)
            elif len(dests) == 1:
                dests = dests * len(sources)
            else:
                raise PlacementError(
                    f"wormhole ({src!r} -> {dst!r}): {src!r} is called {len(sources)} times and {dst!r} "
                    f"{len(dests)} times; name fx nodes to pair call sites explicitly"
                )
        for s, d in zip(sources, dests):
            specs.append(_validated(len(specs), src, dst, s, d, graph))
    return specs


def _validated(index: int, src: str, dst: str, s: _Endpoint, d: _Endpoint, graph: nx.DiGraph) -> WormholeSpec:
    src_shape, dst_shape = value_shape(s.value), value_shape(d.value)
    if src_shape is None or dst_shape is None:
        raise PlacementError(
            f"wormhole ({src!r} -> {dst!r}): node {s.value.name!r} or {d.value.name!r} is not a single tensor; "
            f"pick a layer whose output and input are tensors"
        )
    if not d.users:
        raise PlacementError(f"wormhole dst {dst!r}: its input {d.value.name!r} has no user inside it")
    for user in d.users:
        if user is not s.value and not nx.has_path(graph, user.name, s.value.name):
            raise PlacementError(
                f"wormhole ({src!r} -> {dst!r}): source node {s.value.name!r} does not depend on destination "
                f"node {user.name!r}; a wormhole must go from a deeper layer back to an earlier one (swap them?)"
            )
    dst_val = d.value.meta.get("val")
    if isinstance(dst_val, torch.Tensor) and not dst_val.dtype.is_floating_point:
        raise PlacementError(
            f"wormhole ({src!r} -> {dst!r}): destination input {d.value.name!r} is {dst_val.dtype} (e.g. token ids); "
            f"a wormhole adds a real-valued signal: pick a destination whose input is floating point "
            f"(a layer after the embedding), or check the dtype of example_inputs"
        )
    if src_shape[0] != dst_shape[0]:
        raise PlacementError(
            f"wormhole ({src!r} -> {dst!r}): batch sizes differ: {s.value.name!r} has shape {src_shape}, "
            f"{d.value.name!r} has shape {dst_shape}; both ends need the batch in dim 0"
        )
    try:
        bridge_kind(src_shape, dst_shape)
    except PlacementError as exc:
        raise PlacementError(
            f"wormhole ({src!r} -> {dst!r}): {exc} (source node {s.value.name!r} {src_shape}, destination "
            f"input {d.value.name!r} {dst_shape}); choose layers whose outputs are vectors or feature maps"
        ) from None
    return WormholeSpec(
        index=index,
        src=src,
        dst=dst,
        src_node=s.value.name,
        dst_input=d.value.name,
        dst_users=tuple(u.name for u in d.users),
        src_shape=src_shape,
        dst_shape=dst_shape,
    )


class PlanWormholes(PassBase):
    """Resolve ``config.wormholes`` and record the plan in metadata (no graph change)."""

    def __init__(self, config: WormholeConfig):
        super().__init__()
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "val" not in n.meta]
        if missing:
            raise PlacementError(
                f"PlanWormholes needs shapes on every node (missing on {missing[:5]}); capture the model with "
                f"fxwormhole.capture, which propagates them"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        specs = resolve_pairs(gm, self.config)
        nodes = {n.name: n for n in gm.graph.nodes}
        for spec in specs:
            src = nodes[spec.src_node]
            update_node(src, wormhole_src=(*(node_info(src).wormhole_src or ()), spec.index))
            for name in spec.dst_users:
                user = nodes[name]
                update_node(user, wormhole_dst=(*(node_info(user).wormhole_dst or ()), spec.index))
        update_graph(gm, wormholes=tuple(specs))
        return PassResult(gm, False)
