"""In-place updates in an fx graph: the orderings they imply beyond the data edges.

fx graphs are not always pure data flow. ``torch.export`` (training IR) keeps in-place ATen ops:
``out[:, t] = v`` becomes ``aten.copy_(aten.select(aten.slice(out, ...), ...), v)``, a node with no
users; a later ``r * out`` reads the updated buffer through ``out`` and has no data edge to the
``copy_``. ``symbolic_trace`` records ``acc.add_(h)`` as a ``call_method`` the same way. Only the
node order says that the read comes after the write. A pass that moves nodes (fusing a component
into a fixed-point body, re-sorting the graph) must keep that order: :func:`ordering_edges` returns
it as extra ``(before, after)`` edges.

Aliasing is tracked by the "root" of a value: the node that allocated the storage a view or an
in-place result shares (exact for ATen ops, from their schemas; a list of common view methods and
functions for ``symbolic_trace`` graphs).
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from .. import analysis

__all__ = ["mutated_inputs", "alias_roots", "ordering_edges"]

_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "select", "narrow", "expand", "expand_as", "transpose",
    "permute", "squeeze", "unsqueeze", "flatten", "unflatten", "t", "diagonal", "unbind", "split", "chunk",
    "movedim", "swapaxes", "as_strided", "detach", "contiguous", "type_as", "to", "float", "unfold", "__getitem__",
})
_VIEW_FUNCTIONS = frozenset({
    torch.select, torch.narrow, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.t, torch.diagonal, torch.unbind, torch.split, torch.chunk, torch.movedim,
    torch.swapaxes, torch.as_strided, torch.detach, getattr, operator.getitem,
})
_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
})


def _is_inplace_name(name: str) -> bool:
    """torch's naming convention: ``add_``, ``copy_``, ``relu_`` update their first argument."""
    return name.endswith("_") and not name.endswith("__")


def _first_node(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _schema_arg(node: fx.Node, i: int, name: str):
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


def mutated_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The input nodes whose storage ``node`` writes in place."""
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:  # ATen: the schema marks written arguments ``Tensor(a!)``
            written = [_schema_arg(node, i, a.name) for i, a in enumerate(schema.arguments)
                       if a.alias_info is not None and a.alias_info.is_write]
            return [v for v in tree_leaves(written) if isinstance(v, fx.Node)]
        inplace = (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                   or _is_inplace_name(getattr(node.target, "__name__", "")))
    elif node.op == "call_method":
        inplace = _is_inplace_name(node.target)
    elif node.op == "call_module":
        inplace = getattr(gm.get_submodule(node.target), "inplace", False) is True
    else:
        inplace = False
    first = _first_node(node)
    return [first] if inplace and first is not None else []


def _alias_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input whose storage ``node``'s value may share (a view, or an in-place op's result)."""
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            for ret in schema.returns:
                if ret.alias_info is None:
                    continue
                for i, a in enumerate(schema.arguments):
                    if a.alias_info is not None and a.alias_info.before_set & ret.alias_info.before_set:
                        v = _schema_arg(node, i, a.name)
                        return v if isinstance(v, fx.Node) else None
            return None
        if node.target in _VIEW_FUNCTIONS:
            return _first_node(node)
    elif node.op == "call_method" and node.target in _VIEW_METHODS:
        return _first_node(node)
    return _first_node(node) if mutated_inputs(gm, node) else None


def alias_roots(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """For every node, the node that allocated the storage its value may share (itself if fresh)."""
    roots: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        source = _alias_source(gm, node)
        roots[node] = roots.get(source, node) if source is not None else node
    return roots


def ordering_edges(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(before, after)`` node names that the graph's order imposes because of in-place updates.

    For each storage that some node updates in place: every update comes after the reads and the
    update that precede it, and every read after the update that precedes it. Node order is the
    only record of these, and a data-flow analysis does not see them. Shape nodes are not reads: an
    in-place update does not change a size. Empty when the graph updates nothing in place.
    """
    roots = alias_roots(gm)
    writes = {node: {roots[a] for a in mutated_inputs(gm, node)} for node in gm.graph.nodes}
    updated = set().union(*writes.values())
    if not updated:
        return []
    edges: list[tuple[str, str]] = []
    last_write: dict[fx.Node, fx.Node] = {}
    reads_since: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        written = writes[node]
        source = _alias_source(gm, node)
        is_view = source is not None and not written  # taking a view reads no data
        read = set() if is_view or analysis.is_shape_node(node) else {roots[a] for a in node.all_input_nodes} & updated
        for root in read | written:
            if root in last_write:
                edges.append((last_write[root].name, node.name))
        for root in written:
            edges.extend((r.name, node.name) for r in reads_since.pop(root, []) if r is not node)
            last_write[root] = node
        for root in read - written:
            reads_since[root].append(node)
    return edges
