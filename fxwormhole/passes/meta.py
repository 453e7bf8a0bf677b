"""Typed metadata: what capture and the passes record, as frozen dataclasses under one key.

As torchao's pt2e keeps one ``QuantizationAnnotation`` under one key of ``node.meta``, fxwormhole
keeps one :class:`NodeInfo` in ``node.meta["fxwormhole"]`` and one :class:`GraphRecord` in
``gm.meta["fxwormhole"]``. Records are immutable: a pass writes with :func:`update_node` /
:func:`update_graph` (``dataclasses.replace`` underneath), so a record shared by a node and its
copy in a fixed-point body (``Graph.node_copy`` copies ``meta`` shallowly) is never changed for both.

Who writes what:

=====================  ==========================================================================
capture                ``GraphRecord.front_end``, ``input_shapes``, ``attempts``, ``training``
NormaliseExport        ``NodeInfo.normalised_from``; ``GraphRecord.normalised`` (count)
DecomposeRecurrent     ``NodeInfo.recurrent`` (:class:`RecurrentInfo`); ``GraphRecord.recurrent``
TemporalWormholes      ``NodeInfo.recurrent.temporal_wormholes``; ``GraphRecord.temporal``
                       (:class:`TemporalPlacement`: pairs placed, config pairs consumed)
FuseCellLoops          ``NodeInfo.cell_loop`` (:class:`CellLoopInfo`); ``GraphRecord.cell_loops``
                       (loop path -> cells); adds to ``GraphRecord.temporal``
PlanWormholes          ``NodeInfo.wormhole_src`` / ``wormhole_dst``; ``GraphRecord.wormholes``
                       (:class:`WormholeSpec`)
InsertWormholes        ``NodeInfo.role`` (``read``, ``modulated``, ``write``) and ``wormhole``;
                       ``GraphRecord.back_edges`` (:class:`BackEdge`)
WrapFixedPoints        ``NodeInfo.role`` (``fixed_point``, ``fixed_point_output``, ``state``),
                       ``fixed_point`` (:class:`FixedPointInfo`), ``output_of``;
                       ``GraphRecord.fixed_points``
SensitivityAnnotate    ``NodeInfo.sensitivity`` (:class:`SensitivityAnnotation`)
SensitivityInsert      ``NodeInfo.sensitivity.probe``; ``GraphRecord.sensitivity``
the pipeline check     ``NodeInfo.origin`` (the node's name before the first pass)
=====================  ==========================================================================

Code written against the dictionaries these records replace keeps working for reading: a record
answers ``rec["front_end"]``, ``rec.get("role", "")`` and ``"sensitivity" in rec`` with the old keys
and value types (a field that is None reads as absent). New code reads attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import torch.fx as fx

__all__ = [
    "KEY", "NodeInfo", "GraphRecord", "RecurrentInfo", "CellLoopInfo", "TemporalPlacement", "WormholeSpec", "BackEdge",
    "FixedPointInfo", "SensitivityAnnotation", "SensitivityRecord", "node_info", "update_node",
    "graph_record", "update_graph",
]

#: the one key fxwormhole uses in ``node.meta`` and ``gm.meta``
KEY = "fxwormhole"

Span = tuple[str, str]


def _lists(value: Any) -> Any:
    """Tuples of the record as the lists the 0.1 dicts held (pairs and shapes stay tuples)."""
    return [tuple(v) if isinstance(v, tuple) else v for v in value]


class _Readable:
    """Read access by the 0.1 dictionary keys, for code written against the dicts (see the module doc)."""

    #: field -> conversion to the old value type
    _legacy: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}

    def _view(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = self._legacy.get(f.name, lambda v: v)(value)
        return out

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._view().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._view()

    def keys(self):
        return self._view().keys()


# --------------------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class RecurrentInfo(_Readable):
    """A recurrent module call: what DecomposeRecurrent did and what TemporalWormholes placed."""

    path: str
    decomposed: bool
    mode: str | None = None  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    explicit: str | None = None  # class of the explicit twin
    num_layers: int | None = None
    layers: tuple[str, ...] | None = None  # "layer0" (bottom) ... names used in wormhole pairs
    hidden_size: int | None = None
    input_size: int | None = None
    bidirectional: bool | None = None
    batch_first: bool | None = None
    gate_order: tuple[str, ...] | None = None  # from fxwormhole.runtime.gates.RECURRENT_LAYOUTS
    temporal_wormholes: tuple[Span, ...] | None = None
    temporal_skipped: str | None = None  # why no temporal wormhole was placed
    reason: str | None = None  # why the module was not decomposed

    _legacy = {"layers": list, "gate_order": list, "temporal_wormholes": _lists}


@dataclass(frozen=True)
class CellLoopInfo(_Readable):
    """A ``cell_loop_<k>`` node: the user's unrolled cell loop that FuseCellLoops put into one module."""

    path: str  # the CellLoop module's path
    cells: tuple[str, ...]  # the cells' module paths, bottom layer first
    mode: str  # "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
    steps: int  # T, the unrolled length
    input_size: int
    hidden_size: int
    temporal_wormholes: tuple[Span, ...]  # as named in the config: (src cell, dst cell)
    layer_pairs: tuple[tuple[int, int], ...]  # the same as (src layer, dst layer) of the module
    fused_nodes: tuple[str, ...]  # the chain's nodes before fusion

    _legacy = {"cells": list, "temporal_wormholes": _lists, "layer_pairs": _lists, "fused_nodes": list}


@dataclass(frozen=True)
class FixedPointInfo(_Readable):
    """A ``fixed_point_<k>`` node: the wormholes it closes, the nodes fused into it, what it returns."""

    wormholes: tuple[int, ...]
    fused_nodes: tuple[str, ...]
    outputs: tuple[str, ...]  # nodes whose values the node returns, in order

    _legacy = {"wormholes": list, "fused_nodes": list, "outputs": list}


@dataclass(frozen=True)
class SensitivityAnnotation(_Readable):
    """What a layer's sensitivity probe needs (written by SensitivityAnnotate, read by SensitivityInsert)."""

    layer: str  # module path from the root GraphModule
    target: str  # module path inside the graph being annotated
    kind: str  # "linear", "conv2d", "lstm", "gru_cell", ...
    activation: str  # registry name, "identity" for none, "sigmoid/sigmoid/tanh/sigmoid" for gates
    activation_params: Mapping[str, Any]
    source: str  # "sympy" or "autograd"
    neurons: int
    calls: int  # call sites of the module in its graph (for averaging over time)
    recurrent_only: bool
    derivatives: Any = None  # fxwormhole.passes.activations.Derivatives of a dense layer's activation
    gates: tuple[str, ...] | None = None  # activation of each gate block (recurrent kinds)
    probe: str | None = None  # the probe module's name, once inserted


@dataclass(frozen=True)
class NodeInfo(_Readable):
    """``node.meta["fxwormhole"]``: everything the toolkit records about one node."""

    origin: str | None = None
    normalised_from: str | None = None
    wormhole_src: tuple[int, ...] | None = None
    wormhole_dst: tuple[int, ...] | None = None
    role: str | None = None
    wormhole: int | None = None
    fixed_point: FixedPointInfo | None = None
    output_of: str | None = None
    recurrent: RecurrentInfo | None = None
    cell_loop: CellLoopInfo | None = None
    sensitivity: SensitivityAnnotation | None = None

    _legacy = {"wormhole_src": list, "wormhole_dst": list}

    def _view(self) -> dict[str, Any]:
        out = super()._view()
        if self.fixed_point is not None:  # 0.1 kept these at the top of the node's dict
            out.update(out.pop("fixed_point")._view())
        if self.output_of is not None:
            out["of"] = out.pop("output_of")
        return out


def node_info(node: fx.Node) -> NodeInfo:
    """The node's record (an empty one if nothing was recorded)."""
    return node.meta.get(KEY) or NodeInfo()


def update_node(node: fx.Node, **changes: Any) -> NodeInfo:
    """Record ``changes`` on ``node`` (a new record; the old one is not modified) and return it."""
    info = replace(node_info(node), **changes)
    node.meta[KEY] = info
    return info


# --------------------------------------------------------------------------------------- graphs
@dataclass(frozen=True)
class WormholeSpec:
    """One planned wormhole edge: ``dst_input += gate(src) * proj(src)`` for the ``dst_users``."""

    index: int
    src: str  # name as given (or chosen by the policy)
    dst: str
    src_node: str  # fx node whose value feeds back
    dst_input: str  # fx node whose value is modulated
    dst_users: tuple[str, ...]  # fx nodes whose use of dst_input gets the modulated value
    src_shape: tuple[int, ...]
    dst_shape: tuple[int, ...]

    @property
    def module_name(self) -> str:
        return f"wormhole_{self.index}"


class BackEdge(NamedTuple):
    """The edge a wormhole closes, kept out of the fx graph (which stays a DAG)."""

    write: str  # the node computing gate(h) * proj(h)
    read: str  # the node standing for the injected signal (zeros until the cycle is closed)
    wormhole: int


@dataclass(frozen=True)
class TemporalPlacement(_Readable):
    """What TemporalWormholes placed and which part of ``WormholeConfig.wormholes`` it consumed.

    ``placed`` maps a recurrent module's path to its ``(src, dst)`` layer pairs (for a fused cell
    loop, ``cell_loop_<k>``, the pairs of cell paths as the config names them). Under a policy
    (``"auto"``, ``"every:K"``) a graph with recurrent modules gets temporal wormholes only:
    ``policy_consumed`` is then True and PlanWormholes places nothing. Explicit pairs that name
    recurrent layers are listed in ``consumed_pairs``; PlanWormholes places the others.
    """

    placed: Mapping[str, tuple[Span, ...]] = field(default_factory=dict)
    consumed_pairs: tuple[Span, ...] = ()
    policy_consumed: bool = False


@dataclass(frozen=True)
class SensitivityRecord(_Readable):
    """The SAL rule the probes were built with and their module paths."""

    sal: Any  # fxwormhole.config.SALConfig
    probes: tuple[str, ...]

    _legacy = {"probes": list}


@dataclass(frozen=True)
class GraphRecord(_Readable):
    """``gm.meta["fxwormhole"]``: what capture and the passes recorded about the whole graph."""

    front_end: str | None = None  # "symbolic_trace" or "export"
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    attempts: Mapping[str, str] | None = None  # front end tried first -> why it failed
    training: bool | None = None  # the model's mode at capture
    normalised: int | None = None  # ATen layer ops turned into call_module (export graphs)
    recurrent: Mapping[str, str] | None = None  # path -> "decomposed" | "skipped: <why>"
    temporal: TemporalPlacement | None = None
    cell_loops: Mapping[str, tuple[str, ...]] | None = None  # CellLoop path -> its cells, bottom first
    wormholes: tuple[WormholeSpec, ...] | None = None
    back_edges: tuple[BackEdge, ...] | None = None
    fixed_points: tuple[str, ...] | None = None
    sensitivity: SensitivityRecord | None = None
    transform: Any = None  # fxwormhole.transform_record.TransformRecord: the call, for fxwormhole.save/load

    _legacy = {"input_shapes": list, "wormholes": list, "back_edges": list, "fixed_points": list}

    def _view(self) -> dict[str, Any]:
        out = super()._view()
        temporal = out.pop("temporal", None)
        if temporal is not None and temporal.placed:  # 0.1: path -> list of pairs
            out["temporal_wormholes"] = {p: list(pairs) for p, pairs in temporal.placed.items()}
        return out


def graph_record(gm: Any) -> GraphRecord:
    """The graph's record (an empty one if nothing was recorded). ``gm``: a GraphModule (or one
    ``fxwormhole.transform`` returned)."""
    return getattr(gm, "meta", {}).get(KEY) or GraphRecord()


def update_graph(gm: fx.GraphModule, **changes: Any) -> GraphRecord:
    """Record ``changes`` on the graph (a new record) and return it."""
    record = replace(graph_record(gm), **changes)
    gm.meta[KEY] = record
    return record
