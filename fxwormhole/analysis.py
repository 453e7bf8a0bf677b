"""Read-only analysis of a captured GraphModule: layers, the main path, module regions, spans.

Everything here works on graphs from both front ends of :func:`fxwormhole.capture.capture`
(layers are ``call_module`` nodes in both) and never changes the graph.

Vocabulary:

* **layer**: a ``call_module`` node whose module is one of :data:`LAYER_TYPES`.
  A module called several times (weight sharing, an unrolled time loop) gives one layer per call,
  all with the same ``name``.
* **main path**: the nodes every input->output path passes through: the dominators of the output
  node in the data-flow DAG, seen from a virtual source joined to every placeholder.
* **region**: the nodes one call of a submodule produced (from ``meta["nn_module_stack"]``).
* **unit**: a main-path layer, or a region whose output is on the main path while all its layers
  sit on branches off it (a residual block, an ``nn.TransformerEncoderLayer``). Candidate spans
  connect units, so a span end is a layer name or a region path.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from ._text import text_table
# activations are recognised from the one table in fxwormhole.passes.activations (re-exported here)
from .passes.activations import ACTIVATIONS, ActivationForm, activation_params, classify_activation  # noqa: F401

__all__ = [
    "LAYER_TYPES", "ACTIVATIONS", "ActivationForm", "Layer", "Region", "to_networkx", "is_shape_node", "classify_activation", "activation_params", "layer_kind",
    "layer_table", "main_path", "output_layers", "candidate_spans", "module_regions",
    "format_layer_table",
]

#: modules the toolkit treats as one layer (a "neuron layer" with weights).
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase, nn.RNNCellBase,
)

# ------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Layer:
    """One call of a layer module in the graph (see the module docstring)."""

    name: str                        # module path as in model.named_modules()
    node: str                        # fx node name of the call_module
    kind: str                        # "linear", "conv2d", "lstm", "gru_cell", ...
    module_type: str                 # class name, e.g. "Linear"
    activation: str | None           # canonical elementwise activation right after it, or None
    activation_node: str | None
    output_node: str                 # activation node if any, else the layer node
    in_shape: tuple | None
    out_shape: tuple | None
    depth: int | None                # index among main-path layers (0 = first); None off the path
    on_main_path: bool
    activation_params: tuple = field(default=())  # e.g. (("negative_slope", 0.2),)
    is_output_layer: bool = False    # the graph output is reached from it through no other layer


@dataclass(frozen=True)
class Region:
    """The nodes one call of a submodule produced.

    ``inputs`` are the external (non-parameter) nodes the region consumes, in order of first
    use, so the first is the module's main input; ``output`` is the single node whose value
    leaves the region, or None when several do.
    """

    path: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    output: str | None
    module_type: str = ""
    call_index: int = 0


# ------------------------------------------------------------------------------------------------
# graph view


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """Data-flow DiGraph of ``gm``: nodes are fx node names, an edge ``a -> b`` when ``b`` reads ``a``.

    Node attributes: ``op``, ``target`` (a string), ``kind`` (the layer kind, the activation
    name, or None) and ``shape_only``. Shape nodes (``aten.sym_size`` of an export graph with a
    dynamic batch) read a tensor but carry no data: they get no out-edges, so they never join
    two branches. A graph that already has back edges (after a wormhole pass) may be cyclic.
    """
    g = nx.DiGraph()
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=_target_str(node), kind=_node_kind(node, mods),
                   shape_only=is_shape_node(node))
        for inp in node.all_input_nodes:
            if not is_shape_node(inp):
                g.add_edge(inp.name, node.name)
    return g


_SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def is_shape_node(node: fx.Node) -> bool:
    """True for a node computing a size/scalar (``aten.sym_size.int``, arithmetic on sizes)."""
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten.sym_size.int:
        return True
    return "val" in node.meta and isinstance(node.meta["val"], _SCALARS)


def _target_str(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _node_kind(node: fx.Node, mods: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module" and isinstance(mods.get(node.target), LAYER_TYPES):
        return layer_kind(mods[node.target])
    return classify_activation(None, node, mods=mods)


# ------------------------------------------------------------------------------------------------
# layers

_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"),
    (nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.RNN, "rnn"),
    (nn.LSTMCell, "lstm_cell"), (nn.GRUCell, "gru_cell"), (nn.RNNCell, "rnn_cell"),
)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"lstm"``, ``"gru_cell"``, ... for a layer module, else None."""
    return next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)


def _shape(val: Any) -> tuple | None:
    if isinstance(val, (tuple, list)) and val:
        val = val[0]
    shape = getattr(val, "shape", None)
    return None if shape is None else tuple(s if isinstance(s, int) else str(s) for s in shape)  # SymInt -> "s0"


def _main_output(node: fx.Node) -> fx.Node:
    """The node carrying the layer's main tensor: itself, or ``getitem(node, 0)`` for RNNs."""
    if isinstance(node.meta.get("val"), (tuple, list)):
        firsts = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
        if len(firsts) == 1:
            return firsts[0]
    return node


def _layer_nodes(gm: fx.GraphModule, mods: dict) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods.get(n.target), LAYER_TYPES)]


def layer_table(gm: fx.GraphModule) -> list[Layer]:
    """Every layer call in ``gm``, in topological order, with activation, shapes and main-path depth."""
    mods = dict(gm.named_modules())
    on_path = set(main_path(gm))
    outs = output_layers(gm)
    rows, depth = [], 0
    for node in _layer_nodes(gm, mods):
        mod = mods[node.target]
        main = _main_output(node)
        act_node = None
        if len(main.users) == 1:
            (user,) = main.users
            if classify_activation(gm, user, mods=mods) is not None:
                act_node = user
        output = act_node or node
        is_main = node.name in on_path or output.name in on_path
        arg0 = node.args[0] if node.args else None
        params = activation_params(gm, act_node, mods=mods) if act_node is not None else {}
        rows.append(Layer(
            name=node.target, node=node.name, kind=layer_kind(mod), module_type=type(mod).__name__,
            activation=classify_activation(gm, act_node, mods=mods) if act_node is not None else None,
            activation_node=act_node.name if act_node is not None else None,
            output_node=output.name,
            in_shape=_shape(arg0.meta.get("val")) if isinstance(arg0, fx.Node) else None,
            out_shape=_shape(main.meta.get("val")),
            depth=depth if is_main else None, on_main_path=is_main,
            activation_params=tuple(sorted(params.items())), is_output_layer=node.name in outs,
        ))
        depth += is_main
    return rows


def output_layers(gm: fx.GraphModule) -> set[str]:
    """Node names of layers from which the graph output is reached through no other layer."""
    mods = dict(gm.named_modules())
    layers = {n.name for n in _layer_nodes(gm, mods)}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    seen, stack, found = set(), [out], set()
    while stack:
        n = stack.pop()
        for i in n.all_input_nodes:
            if i.name in seen:
                continue
            seen.add(i.name)
            if i.name in layers:
                found.add(i.name)
            else:
                stack.append(i)
    return found


# ------------------------------------------------------------------------------------------------
# main path

_SOURCE = "__fxwormhole_source__"


def main_path(gm: fx.GraphModule) -> list[str]:
    """Nodes every input->output path passes through, in topological order.

    Computed as the dominators of the output node in the data-flow DAG seen from a virtual source
    joined to all placeholders (constants and parameters, which do not depend on an input, play
    no part). Placeholders and the output node itself are not listed.
    """
    g = to_networkx(gm)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    out = next(n.name for n in gm.graph.nodes if n.op == "output")
    g.add_node(_SOURCE)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            g.add_edge(_SOURCE, n.name)
    reach = nx.descendants(g, _SOURCE) | {_SOURCE}
    if out not in reach:
        return []
    sub = g.subgraph(reach & (nx.ancestors(g, out) | {out}))
    idom = nx.immediate_dominators(sub, _SOURCE)
    path, n = [], idom[out]
    while n != _SOURCE:
        path.append(n)
        n = idom[n]
    keep = [p for p in path if g.nodes[p]["op"] != "placeholder"]
    return sorted(keep, key=order.__getitem__)


# ------------------------------------------------------------------------------------------------
# regions


def _stack_entries(node: fx.Node) -> list[tuple[str, str, str]]:
    """(key, path, type name) of each module on the node's nn_module_stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = []
    for key, value in stack.items():
        path, typ = value[0], value[1]
        typ = typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1]
        entries.append((str(key), str(path), typ))
    return entries


def module_regions(gm: fx.GraphModule) -> dict[str, Region]:
    """Regions of every submodule call recorded in ``meta["nn_module_stack"]`` (the root excluded).

    Keys are the module path for the first call and ``"path@k"`` for the k-th repeated call
    (torch's own convention). Both front ends record the stack; a module called functionally
    (e.g. ``out_proj`` inside ``nn.MultiheadAttention``) has no region of its own.
    """
    members: dict[str, list[fx.Node]] = {}
    info: dict[str, tuple[str, str, int]] = {}
    for node in gm.graph.nodes:
        for key, path, typ in _stack_entries(node):
            if not path:
                continue
            k = int(key.rsplit("@", 1)[1]) if "@" in key and key.rsplit("@", 1)[1].isdigit() else 0
            rid = path if k == 0 else f"{path}@{k}"
            members.setdefault(rid, []).append(node)
            info[rid] = (path, typ, k)
    regions = {}
    for rid, nodes in members.items():
        names = {n.name for n in nodes}
        inputs: list[str] = []
        leaving: list[str] = []
        for n in nodes:
            for i in n.all_input_nodes:
                if i.name not in names and i.op != "get_attr" and not is_shape_node(i) and i.name not in inputs:
                    inputs.append(i.name)
            if not is_shape_node(n) and any(u.name not in names for u in n.users):
                leaving.append(n.name)
        path, typ, k = info[rid]
        regions[rid] = Region(path=path, nodes=tuple(n.name for n in nodes), inputs=tuple(inputs),
                              output=leaving[0] if len(leaving) == 1 else None, module_type=typ, call_index=k)
    return regions


# ------------------------------------------------------------------------------------------------
# candidate spans


def _units(gm: fx.GraphModule, layers: Sequence[Layer], path: list[str]) -> list[tuple[str, int, bool]]:
    """Main-path units as (name, position of the output on the main path, is_hidden)."""
    pos = {n: i for i, n in enumerate(path)}
    units = []
    for layer in layers:
        if layer.on_main_path:
            p = pos.get(layer.output_node, pos.get(layer.node))
            units.append((layer.name, p, not layer.is_output_layer))
    layer_nodes = {layer.node: layer for layer in layers}
    for rid, region in module_regions(gm).items():
        if region.output not in pos or region.path in {layer.name for layer in layers}:
            continue
        inside = [layer_nodes[n] for n in region.nodes if n in layer_nodes]
        if not inside or any(layer.on_main_path for layer in inside):
            continue  # no layer, or its layers are units themselves
        units.append((rid, pos[region.output], not all(layer.is_output_layer for layer in inside)))
    # a region whose output is also a bigger region's output: keep the innermost
    units.sort(key=lambda u: (u[1], -u[0].count(".")))
    dedup, seen = [], set()
    for u in units:
        if u[1] not in seen:
            dedup.append(u)
            seen.add(u[1])
    return dedup


def candidate_spans(gm: fx.GraphModule, layers: Sequence[Layer] | None = None) -> list[tuple[str, str]]:
    """Candidate wormhole spans ``(src, dst)``, from a deep unit back to an earlier one, best first.

    First the deepest hidden main-path unit back to the first one; then the other pairs of hidden
    main-path units (deeper sources first, longer spans first); then any other pair of hidden
    layers where ``dst`` is an ancestor of ``src`` (layers on branches: encoders of a two-input
    model, the feed-forward of a transformer block), later sources first.
    A unit is a main-path layer or a region (``"layers.1"``) whose output is on the main path and
    whose layers all sit on residual branches. Output layers (heads) are never a span end, nor
    is a span from a module to itself (an unrolled cell loop has none); a model with fewer than
    two hidden units has no main-path span.
    """
    layers = list(layers) if layers is not None else layer_table(gm)
    path = main_path(gm)
    hidden = [u[0] for u in _units(gm, layers, path) if u[2]]
    spans: list[tuple[str, str]] = []
    for i in range(len(hidden) - 1, 0, -1):
        for j in range(0, i):
            spans.append((hidden[i], hidden[j]))
    g = to_networkx(gm)
    rest = [l for l in layers if not l.is_output_layer]
    for i in range(len(rest) - 1, 0, -1):
        for j in range(0, i):
            src, dst = rest[i], rest[j]
            if src.name != dst.name and nx.has_path(g, dst.node, src.node):
                spans.append((src.name, dst.name))
    seen, out = set(), []
    for s in spans:
        if s not in seen and s[0] != s[1]:
            seen.add(s)
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------
# printing


def _fmt_shape(shape: tuple | None) -> str:
    return "-" if shape is None else "x".join(str(s) for s in shape)


def format_layer_table(layers: Iterable[Layer]) -> str:
    """A fixed-width text table of layers (what ``fxwormhole inspect`` prints)."""
    header = ("#", "layer", "node", "kind", "activation", "in", "out", "depth")
    rows = [header]
    for i, l in enumerate(layers):
        act = l.activation or "-"
        if l.activation_params:
            act += "(" + ",".join(f"{k}={v}" for k, v in l.activation_params) + ")"
        depth = "-" if l.depth is None else str(l.depth)
        if l.is_output_layer:
            depth += " (out)"
        rows.append((str(i), l.name, l.node, l.kind, act, _fmt_shape(l.in_shape), _fmt_shape(l.out_shape), depth))
    return text_table(header, rows[1:], left=len(header))
