"""Pictures of a captured (or rewritten) graph that a person can read.

Two steps, so the layout can be tested without matplotlib:

* :func:`build_display_graph` folds the fx graph into display boxes: a layer and its activation
  become one box; a submodule call that holds no main-path node (an attention block, a dropout)
  becomes one box; chains of shape-only ops (view, transpose, getitem, ...) become one box. The
  main path is laid out top to bottom in column 0, branches in columns to its right, and
  candidate spans are kept as (src box, dst box, label).
* :func:`draw_graph` renders it with matplotlib (the ``plots`` extra): spans are arrows routed in
  lanes left of every box (so they stay inside the canvas, however long), from the deep unit back
  to the earlier one.
* :func:`draw_transformed` draws a model returned by :func:`fxwormhole.transform`: every fixed
  point's body is drawn in place, inside a frame; each wormhole is an arrow from its source layer
  to its projection box, which feeds the destination's input; probed layers have their own colour.

``highlights`` maps fx node names to a category (``"wormhole"``, ``"fixed_point"``, ``"probe"``
or any string); highlighted nodes are never folded away and get that category's colour and a
legend entry.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import networkx as nx
import torch
import torch.fx as fx

from .analysis import Layer, _fmt_shape, is_shape_node, layer_table, main_path, module_regions
from .errors import ConfigError

__all__ = ["check_picture_suffix", "DisplayNode", "DisplayGraph", "Frame", "build_display_graph", "draw_graph", "draw_transformed",
           "transformed_display", "HIGHLIGHT_COLORS"]

# ops that only move data around: chains of them fold into one box
_TRIVIAL = {
    "getitem", "view", "reshape", "transpose", "permute", "contiguous", "select", "slice", "unsqueeze",
    "squeeze", "clone", "expand", "dropout", "unflatten", "_unsafe_view", "alias", "t", "flatten",
    "size", "type_as", "to", "detach",
}

# one colour per kind of thing a transform adds, used for borders, arrows and the legend
HIGHLIGHT_COLORS = {"wormhole": "#d35400", "projection": "#b9770e", "fixed_point": "#8e44ad", "probe": "#16a085"}
SPAN_COLOR = "#c0392b"
_FILL = {"input": "#fde9a9", "output": "#fde9a9", "layer": "#cfe2f3", "layer_off": "#d9ead3",
         "op": "#eeeeee", "chain": "#ffffff", "region": "#f4f4f4", "projection": "#fdebd0", "probe": "#d1f2eb"}


@dataclass
class DisplayNode:
    """One box of the picture."""

    id: str
    label: str
    role: str                      # input, output, layer, op, chain, region
    members: tuple[str, ...]       # fx node names folded into the box
    on_main_path: bool
    highlight: str | None = None
    rank: int = 0                  # row (0 = top)
    column: int = 0                # 0 = main path, 1.. = branches to the right, -1 = projections


@dataclass
class Frame:
    """A labelled rectangle around boxes (a fixed point's body, its projections and wormholes)."""

    label: str
    boxes: set[str]
    kind: str = "fixed_point"


@dataclass
class DisplayGraph:
    """Boxes, edges between them, span and wormhole arrows and frames, ready to render."""

    nodes: dict[str, DisplayNode]
    edges: list[tuple[str, str]]
    spans: list[tuple[str, str, str]] = field(default_factory=list)  # (src box, dst box, label)
    wormholes: list[tuple[str, str, str]] = field(default_factory=list)  # (src box, projection box, label)
    frames: list[Frame] = field(default_factory=list)

    def box_of(self, fx_node: str) -> str | None:
        """The id of the box holding fx node ``fx_node`` (None if it is not drawn)."""
        return next((d.id for d in self.nodes.values() if fx_node in d.members), None)


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        from .transformed import public_name

        return public_name(str(t))
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def _val_shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val:
        val = val[0]
    shape = getattr(val, "shape", None)
    return "" if shape is None else _fmt_shape(tuple(shape))


def build_display_graph(
    gm: fx.GraphModule,
    *,
    layers: Sequence[Layer] | None = None,
    spans: Sequence[tuple[str, str]] = (),
    highlights: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    side: Sequence[str] = (),
    wormholes: Sequence[tuple[str, str, str]] = (),
    frames: Sequence[tuple[str, Sequence[str]]] = (),
    groups: Sequence[Sequence[str]] = (),
) -> DisplayGraph:
    """Fold ``gm`` into display boxes and lay them out (see the module docstring).

    ``labels`` overrides the text of the boxes of the given fx nodes; ``side`` names nodes drawn
    left of the main path, on the row of the box they feed (a wormhole's projection);
    ``wormholes`` are arrows ``(src node, side node, label)``; ``frames`` are ``(label, nodes)``;
    each of ``groups`` is drawn as one box (labelled as its first node).
    """
    from .transformed import public_name

    highlights = dict(highlights or {})
    labels = dict(labels or {})
    layers = list(layers) if layers is not None else layer_table(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    path = set(main_path(gm))

    # nodes worth drawing: they feed the output and carry data
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or is_shape_node(n):
            continue
        g.add_node(n.name)
        for i in n.all_input_nodes:
            if i.op != "get_attr" and not is_shape_node(i):
                g.add_edge(i.name, n.name)
    keep = nx.ancestors(g, out.name) | {out.name}
    g = g.subgraph(keep).copy()

    group: dict[str, str] = {}
    boxes: dict[str, DisplayNode] = {}

    def add_box(box_id: str, label: str, role: str, members: Sequence[str]) -> None:
        members = tuple(m for m in members if m in keep and m not in group)
        if not members:
            return
        hl = next((highlights[m] for m in members if m in highlights), None)
        label = next((labels[m] for m in members if m in labels), label)
        boxes[box_id] = DisplayNode(box_id, label, role, members, any(m in path for m in members), hl)
        for m in members:
            group[m] = box_id

    # 0. groups asked for
    for members in groups:
        first = nodes[members[0]]
        add_box(first.name, labels.get(first.name, _op_name(first)), "op", members)
    # 1. submodule calls with nothing on the main path and nothing highlighted: one box each
    layer_names = {l.name for l in layers}
    for rid, region in sorted(module_regions(gm).items(), key=lambda kv: kv[0].count(".")):
        if region.path in layer_names:
            continue
        members = [m for m in region.nodes if m in keep and m not in group]
        if len(members) < 2 or any(m in path or m in highlights for m in region.nodes):
            continue
        if not _foldable(g, set(members)):
            continue  # data leaves the call and comes back: one box would make a cycle
        inner = [l for l in layers if l.node in region.nodes]
        extra = "".join(f"\n  {l.name.rsplit('.', 1)[-1]}: {l.kind}" for l in inner)
        label = f"{public_name(rid)}\n({region.module_type}, {len(region.nodes)} ops){extra}"
        add_box(f"region:{rid}", label, "region", members)
    # 2. layers (+ their activation) not folded into a call
    for l in layers:
        act = f" + {l.activation}" if l.activation else ""
        label = f"{public_name(l.name)}\n{l.kind} {_fmt_shape(l.in_shape)} -> {_fmt_shape(l.out_shape)}{act}"
        members = [l.node] + ([l.activation_node] if l.activation_node and l.activation_node not in highlights else [])
        add_box(l.node, label, "layer", members)
    # 3. everything else on its own
    for name in g.nodes:
        if name in group:
            continue
        n = nodes[name]
        role = "projection" if name in side else {"placeholder": "input", "output": "output"}.get(n.op, "op")
        shape = _val_shape(n)
        label = n.name if n.op in ("placeholder", "output") else _op_name(n)
        add_box(name, f"{label}\n{shape}" if shape else label, role, [name])

    bg = nx.DiGraph()
    bg.add_nodes_from(boxes)
    for a, b in g.edges:
        if group[a] != group[b]:
            bg.add_edge(group[a], group[b])
    _fold_chains(bg, boxes, nodes)

    _layout(bg, boxes)
    dg = DisplayGraph(boxes, sorted(bg.edges, key=lambda e: (boxes[e[0]].rank, boxes[e[1]].rank)))
    regions = module_regions(gm)
    for i, (src, dst) in enumerate(spans, 1):
        s, d = _span_end(src, layers, regions, dg, last=True), _span_end(dst, layers, regions, dg, last=False)
        if s and d:
            dg.spans.append((s, d, f"span {i}"))
    for src, dst, label in wormholes:
        s, d = dg.box_of(src), dg.box_of(dst)
        if s and d:
            dg.wormholes.append((s, d, label))
    for label, members in frames:
        inside = {b for b in (dg.box_of(m) for m in members) if b}
        if inside:
            dg.frames.append(Frame(label, inside))
    return dg


def _foldable(g: nx.DiGraph, members: set[str]) -> bool:
    below = set().union(*(nx.descendants(g, m) for m in members)) - members
    above = set().union(*(nx.ancestors(g, m) for m in members)) - members
    return not (below & above)


def _fold_chains(bg: nx.DiGraph, boxes: dict[str, DisplayNode], nodes: dict[str, fx.Node]) -> None:
    """Merge runs of trivial single-in single-out op boxes (on one side of the main path)."""

    def trivial(b: str) -> bool:
        d = boxes[b]
        return (d.role == "op" and d.highlight is None and bg.in_degree(b) == 1 and bg.out_degree(b) == 1
                and _op_name(nodes[d.members[0]]) in _TRIVIAL)

    for b in list(nx.topological_sort(bg)):
        if b not in bg or not trivial(b):
            continue
        (nxt,) = bg.successors(b)
        while nxt in bg and trivial(nxt) and boxes[nxt].on_main_path == boxes[b].on_main_path:
            (after,) = bg.successors(nxt)
            d, e = boxes[b], boxes.pop(nxt)
            d.members += e.members
            d.role = "chain"
            bg.remove_node(nxt)
            bg.add_edge(b, after)
            nxt = after
        d = boxes[b]
        if d.role == "chain":
            ops = [_op_name(nodes[m]) for m in d.members]
            shown = ", ".join(dict.fromkeys(ops))
            d.label = f"{len(ops)} ops\n{shown}\n{_val_shape(nodes[d.members[-1]])}"


def _layout(bg: nx.DiGraph, boxes: dict[str, DisplayNode]) -> None:
    """Rank = longest path from a source; main path in column 0, branches packed to the right;
    projections (role ``projection``) in column -1, on the row of the box they feed."""
    side = {b for b in boxes if boxes[b].role == "projection"}
    for b in nx.topological_sort(bg):
        preds = [p for p in bg.predecessors(b) if p not in side]
        boxes[b].rank = 1 + max(boxes[p].rank for p in preds) if preds else 0
    for b in side:
        after = [boxes[s].rank for s in bg.successors(b)]
        boxes[b].rank, boxes[b].column = (min(after) if after else 0), -1
    inputs = [b for b in boxes if boxes[b].role == "input"]
    main = [b for b in boxes if (boxes[b].on_main_path or boxes[b].role == "output") and b not in side]
    if len(inputs) == 1:
        main += inputs  # a single input heads the main column
    for b in main:
        boxes[b].column = 0
    off = bg.subgraph([b for b in boxes if b not in main and b not in side]).to_undirected()
    taken: dict[int, list[tuple[int, int]]] = {}
    comps = sorted(nx.connected_components(off), key=lambda c: min(boxes[b].rank for b in c))
    for comp in comps:
        # within a branch, one column per rank-overlapping run
        for b in sorted(comp, key=lambda b: boxes[b].rank):
            r = boxes[b].rank
            col = 1
            while any(lo <= r <= hi for lo, hi in taken.get(col, [])):
                col += 1
            taken.setdefault(col, []).append((r, r))
            boxes[b].column = col


def _span_end(name: str, layers: Sequence[Layer], regions, dg: DisplayGraph, *, last: bool) -> str | None:
    calls = [l for l in layers if l.name == name]
    if calls:
        return dg.box_of((calls[-1] if last else calls[0]).node)
    region = regions.get(name)
    if region is None:
        return None
    members = [m for m in region.nodes if dg.box_of(m)]
    if not members:
        return None
    # src: where the block's value leaves it; dst: the block's entry (the first box reading its input)
    return dg.box_of(region.output or members[-1]) if last else dg.box_of(members[0])


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # the plots extra is optional
        raise ConfigError(f"drawing a picture needs matplotlib ({exc}); install it with: pip install fxwormhole[plots]") from None
    return plt


def check_picture_suffix(path: Path) -> None:
    """Refuse a picture path that matplotlib would not write as PNG or SVG (a ConfigError naming it)."""
    if path.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"picture {str(path)!r}: expected a file name ending in .png or .svg")


def draw_graph(
    gm: fx.GraphModule,
    path: str | Path,
    *,
    spans: Sequence[tuple[str, str]] = (),
    highlights: Mapping[str, str] | None = None,
    title: str | None = None,
    layers: Sequence[Layer] | None = None,
) -> Path:
    """Draw ``gm`` to ``path`` (``.png`` or ``.svg``) and return the path.

    Raises:
        ConfigError: matplotlib is missing (``pip install fxwormhole[plots]``) or the suffix is
            not ``.png``/``.svg``.
    """
    path = Path(path)
    check_picture_suffix(path)
    plt = _pyplot()
    dg = build_display_graph(gm, layers=layers, spans=spans, highlights=highlights)
    return _render(plt, dg, path, title)


# ------------------------------------------------------------------------------------------------
# a transformed model: fixed-point bodies drawn in place


def _projection_box(*_args):  # a display-only node: never called
    raise RuntimeError("display-only node")


def _is_state(node: fx.Node, n_states: int, placeholders: list[fx.Node]) -> bool:
    """True for a body's state input ``z`` (a leading placeholder) or a ``getitem`` of it."""
    if node.op == "placeholder":
        return placeholders.index(node) < n_states
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and _is_state(node.args[0], n_states, placeholders))


def _probe_label(node: fx.Node, public_name) -> str | None:
    ann = node.meta.get("fxwormhole", {}).get("sensitivity")
    if not ann or not ann.get("probe"):
        return None
    shape = _val_shape(node)
    return (f"{public_name(str(ann.get('layer', node.name)))}\n{ann.get('kind', 'layer')} -> {shape} + probe"
            f"\n(activation {ann.get('activation', '?')})")


def transformed_display(net: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A flat graph of ``net`` for drawing, and the drawing options that go with it.

    Every fixed-point node is replaced by its body's nodes (their modules are reached through
    ``fixed_point_<k>.body.``); the body's state input ``z`` becomes one display-only projection
    node per wormhole, feeding the destination's input. Returns ``(gm, options)`` where ``options``
    holds ``highlights``, ``labels``, ``side``, ``wormholes`` and ``frames`` for
    :func:`build_display_graph`.
    """
    from .runtime.fixed_point import FixedPoint
    from .runtime.recurrent import ExplicitRecurrent
    from .runtime.sensitivity import NeuronProbe
    from .transformed import public_name

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    opts: dict = {"highlights": {}, "labels": {}, "side": [], "wormholes": [], "frames": [], "groups": []}
    modules = dict(net.named_modules())

    def note_probe(old: fx.Node, new: fx.Node, module_path: str) -> None:
        if isinstance(modules.get(module_path), NeuronProbe):
            opts["highlights"][new.name] = "probe"
            label = _probe_label(old, public_name)
            if label:
                opts["labels"][new.name] = label

    for node in net.graph.nodes:
        if node in env:  # a fixed point's getitem, resolved while inlining it
            continue
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        body = getattr(module, "body", None)
        if isinstance(module, FixedPoint) and isinstance(body, fx.GraphModule):
            _inline_fixed_point(graph, env, node, module, opts, note_probe, modules)
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = dict(node.meta)
        env[node] = new
        if node.op == "call_module":
            note_probe(node, new, str(node.target))
        if isinstance(module, ExplicitRecurrent) and getattr(module, "temporal_pairs", None):
            _mark_temporal(node, new, module, opts)
    for probe, rnn, label in opts.pop("_temporal", []):
        copy = env[probe]
        opts["groups"].append([copy.name, rnn.name])
        opts["labels"][copy.name] = label
        opts["frames"].append((f"{rnn.target}: recurrent, fixed points inside", [copy.name]))
    display = fx.GraphModule(net, graph, class_name="Display")
    return display, opts


def _mark_temporal(node: fx.Node, new: fx.Node, module, opts: dict) -> None:
    """Label a recurrent module with temporal wormholes; a probe reading its output shares its box."""
    pairs = ", ".join(f"{a} -> {b}" for a, b in _temporal_names(module))
    kind = type(module).__name__.removeprefix("Explicit")
    text = f"temporal wormhole {pairs}\n(a fixed point at every time step)"
    probe = next((u for u in node.users if u.op == "call_module" and "sensitivity" in u.meta.get("fxwormhole", {})), None)
    if probe is None:
        opts["highlights"][new.name] = "fixed_point"
        opts["labels"][new.name] = f"{node.target}\n{kind} -> {_val_shape(node)}\n{text}"
        opts["frames"].append((f"{node.target}: recurrent, fixed points inside", [new.name]))
        return
    # the probe node is copied later under its own name: group by the original names' copies then
    opts.setdefault("_temporal", []).append((probe, new, f"{node.target}\n{kind} + probe\n{text}"))


def _temporal_names(module) -> list[tuple[str, str]]:
    from .runtime.recurrent import layer_name

    return [(layer_name(a) if isinstance(a, int) else str(a), layer_name(b) if isinstance(b, int) else str(b))
            for a, b in module.temporal_pairs]


def _inline_fixed_point(graph: fx.Graph, env: dict, node: fx.Node, module, opts: dict, note_probe, modules: dict) -> None:
    """Copy the body's nodes of the fixed-point ``node`` in its place (see :func:`transformed_display`)."""
    from .describe import bridge_text, gate_text
    from .runtime.wormhole import Wormhole

    body = module.body
    prefix = f"{node.target}.body."
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    n_states = len(placeholders) - len(node.args)
    inner: dict[fx.Node, fx.Node] = {}
    members: list[str] = []
    projections: dict[int, fx.Node] = {}
    wormholes = {int(name.rsplit("_", 1)[-1]): m for name, m in modules.items()
                 if name.startswith(f"{node.target}.feedback.") and isinstance(m, Wormhole)}

    def projection(k: int) -> fx.Node:
        if k not in projections:
            proj = graph.call_function(_projection_box, ())
            w = wormholes.get(k)
            if w is not None:
                proj.meta["val"] = torch.empty(tuple(w.dst_shape), device="meta")
                opts["labels"][proj.name] = f"wormhole_{k}: projection\n{bridge_text(w).replace(' -> ', chr(10) + '-> ', 1)}"
            opts["highlights"][proj.name] = "projection"
            opts["side"].append(proj.name)
            members.append(proj.name)
            projections[k] = proj
        return projections[k]

    for i, ph in enumerate(placeholders):
        if i >= n_states:
            inner[ph] = env[node.args[i - n_states]]
    outputs = None
    for bn in body.graph.nodes:
        if bn.op == "placeholder":
            continue
        if bn.op == "output":
            outputs = bn.args[0]
            break
        if _is_state(bn, n_states, placeholders):
            continue
        meta = bn.meta.get("fxwormhole", {})
        k = meta.get("wormhole", 0) if meta.get("role") == "modulated" else 0

        def arg(n: fx.Node, k=k) -> fx.Node:
            return projection(k) if _is_state(n, n_states, placeholders) else inner[n]

        new = graph.node_copy(bn, arg)
        new.meta = dict(bn.meta)
        if bn.op in ("call_module", "get_attr"):
            new.target = prefix + str(bn.target)
        inner[bn] = new
        members.append(new.name)
        if bn.op == "call_module":
            note_probe(bn, new, prefix + str(bn.target))
        for src in meta.get("wormhole_src", []):
            w = wormholes.get(src)
            gate = gate_text(w.gate) if w is not None else ""
            opts["wormholes"].append((new.name, projection(src).name, f"wormhole_{src}: {gate}"))
    outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    # the fixed point's callers read ``getitem(node, i)``: they now read the body's i-th output
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            env[user] = inner[outs[user.args[1]]]
    env[node] = inner[outs[0]]  # any other reader (none today) sees the first output
    cfg = getattr(module, "solver_config", None)
    solver = f"; {cfg.name}, tol {cfg.tol:g}" if cfg is not None else ""
    opts["frames"].append((f"{node.target}: z* = body(z*, inputs){solver}", members))


def draw_transformed(net: fx.GraphModule, path: str | Path, *, title: str | None = None) -> Path:
    """Draw a model returned by :func:`fxwormhole.transform` (see :func:`transformed_display`):
    fixed points as frames around their bodies, wormholes as arrows from the source layer to the
    projection feeding the destination, probed layers in their own colour.

    Raises:
        ConfigError: as :func:`draw_graph`.
    """
    path = Path(path)
    check_picture_suffix(path)
    plt = _pyplot()
    display, opts = transformed_display(net)
    dg = build_display_graph(display, **opts)
    return _render(plt, dg, path, title)


# ------------------------------------------------------------------------------------------------
# rendering

_LANE_GAP = 0.16  # data units between the lanes the long arrows run in, left of every box


def _data_box(ax, text) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of a box (text with its frame) in data coordinates."""
    bbox = text.get_bbox_patch().get_window_extent() if text.get_bbox_patch() else text.get_window_extent()
    (x0, y0), (x1, y1) = ax.transData.inverted().transform([[bbox.x0, bbox.y0], [bbox.x1, bbox.y1]])
    return x0, y0, x1, y1


def _lane_arrow(ax, start, end, lane: float, color: str, label: str, *, dashed: bool, zorder: float = 2) -> None:
    """An arrow from ``start`` left to the vertical ``lane``, along it, then right into ``end``."""
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath

    verts = [start, (lane, start[1]), (lane, end[1]), end]
    arrow = FancyArrowPatch(path=MplPath(verts, [MplPath.MOVETO] + [MplPath.LINETO] * 3), arrowstyle="-|>",
                            mutation_scale=11, color=color, lw=1.6, ls="--" if dashed else "-", zorder=zorder)
    ax.add_patch(arrow)
    ax.text(lane, (start[1] + end[1]) / 2, label, rotation=90, ha="center", va="center", fontsize=7, color=color,
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none"), zorder=zorder + 0.5)


def _render(plt, dg: DisplayGraph, path: Path, title: str | None) -> Path:
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch, Patch

    ranks = [d.rank for d in dg.nodes.values()] or [0]
    cols = [d.column for d in dg.nodes.values()] or [0]
    top, n_rows = min(ranks), max(ranks) - min(ranks) + 1
    first_col, n_cols = min(cols), max(cols) - min(cols) + 1
    arrows = [(s, d, label, "span") for s, d, label in dg.spans] + [(s, d, label, "wormhole") for s, d, label in dg.wormholes]
    lanes_left = first_col - 0.62 - _LANE_GAP * max(len(arrows) - 1, 0)
    col_w, row_h = 3.0, 0.95
    left = lanes_left - 0.3 if arrows else first_col - 0.6
    fig_w = 1.0 + col_w * (n_cols - 1 + 1) + (col_w * (first_col - left - 0.5) if arrows else 0)
    fig, ax = plt.subplots(figsize=(max(fig_w, 4.0), 1.2 + row_h * n_rows))
    ax.set_xlim(left, first_col + n_cols - 0.5 + 0.3 * bool(dg.frames))
    ax.set_ylim(-(top + n_rows) + 0.35, -top + 0.75 + 0.3 * bool(dg.frames))
    ax.axis("off")

    texts = {}
    for d in dg.nodes.values():
        role_fill = d.highlight if d.highlight in ("projection", "probe") else d.role
        fill = _FILL.get("layer_off" if d.role == "layer" and not d.on_main_path else role_fill, _FILL["op"])
        edge = HIGHLIGHT_COLORS.get(d.highlight, SPAN_COLOR) if d.highlight else ("#1f4e79" if d.on_main_path else "#777777")
        style = "round,pad=0.35" if d.role != "chain" else "round4,pad=0.3"
        texts[d.id] = ax.text(
            d.column, -d.rank, d.label, ha="center", va="center", fontsize=7.5,
            family="monospace" if d.role in ("op", "chain") and d.highlight != "probe" else "sans-serif",
            bbox=dict(boxstyle=style, fc=fill, ec=edge, lw=2.2 if d.highlight or d.on_main_path else 0.9,
                      ls="--" if d.role == "chain" else "-"),
            zorder=3,
        )
    fig.canvas.draw()  # text extents are needed to attach arrows to box borders
    for a, b in dg.edges:
        same_col = dg.nodes[a].column == dg.nodes[b].column
        from_side = dg.nodes[a].role == "projection"
        ax.annotate("", xy=(0.5, 1.0) if not from_side else (0.0, 0.5), xycoords=texts[b],
                    xytext=(0.5, 0.0) if not from_side else (1.0, 0.5), textcoords=texts[a],
                    arrowprops=dict(arrowstyle="-|>", color=HIGHLIGHT_COLORS["wormhole"] if from_side else "#555555",
                                    lw=1.4 if from_side else 0.9, shrinkA=4, shrinkB=4,
                                    connectionstyle="arc3,rad=0.0" if same_col or from_side else "arc3,rad=-0.15"),
                    zorder=1)
    for i, (s, d, label, kind) in enumerate(arrows):
        lane = first_col - 0.62 - _LANE_GAP * i
        sx0, sy0, _, sy1 = _data_box(ax, texts[s])
        dx0, dy0, _, dy1 = _data_box(ax, texts[d])
        color = SPAN_COLOR if kind == "span" else HIGHLIGHT_COLORS["wormhole"]
        _lane_arrow(ax, (sx0, (sy0 + sy1) / 2), (dx0, (dy0 + dy1) / 2), lane, color, label, dashed=kind == "span")
    for frame in dg.frames:
        boxes = [_data_box(ax, texts[b]) for b in frame.boxes]
        lanes = [first_col - 0.62 - _LANE_GAP * i for i, (s, d, _, kind) in enumerate(arrows)
                 if kind == "wormhole" and s in frame.boxes]
        x0 = min([b[0] for b in boxes] + lanes) - 0.1
        x1 = max(b[2] for b in boxes) + 0.1
        y0, y1 = min(b[1] for b in boxes) - 0.12, max(b[3] for b in boxes) + 0.28
        color = HIGHLIGHT_COLORS.get(frame.kind, "#8e44ad")
        ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0.02", fc=color, alpha=0.06,
                                    ec="none", zorder=0, clip_on=False))
        ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0.02", fc="none", ec=color,
                                    lw=1.8, zorder=0.5, clip_on=False))
        ax.text(x0 + 0.05, y1 - 0.05, frame.label, ha="left", va="top", fontsize=7.5, color=color, zorder=4)
    roles = {("layer_off" if d.role == "layer" and not d.on_main_path else d.role) for d in dg.nodes.values()}
    handles = [h for role, h in (
        ("layer", Patch(fc=_FILL["layer"], ec="#1f4e79", label="layer on the main path")),
        ("layer_off", Patch(fc=_FILL["layer_off"], ec="#777777", label="layer off the main path")),
        ("region", Patch(fc=_FILL["region"], ec="#777777", label="submodule call (folded)")),
        ("chain", Patch(fc="white", ec="#777777", ls="--", label="folded data-movement ops"))) if role in roles]
    if dg.spans:
        handles.append(Line2D([], [], color=SPAN_COLOR, ls="--", lw=1.6, label="candidate span (deep -> earlier)"))
    kinds = {d.highlight for d in dg.nodes.values() if d.highlight}
    if dg.frames:
        handles.append(Patch(fc=HIGHLIGHT_COLORS["fixed_point"], alpha=0.3, ec=HIGHLIGHT_COLORS["fixed_point"],
                             label="fixed point (solved by iteration)"))
    if dg.wormholes:
        handles.append(Line2D([], [], color=HIGHLIGHT_COLORS["wormhole"], lw=1.6, label="wormhole (gated feedback)"))
    if "projection" in kinds:
        handles.append(Patch(fc=_FILL["projection"], ec=HIGHLIGHT_COLORS["projection"], lw=2,
                             label="wormhole projection (src shape -> dst shape)"))
    if "probe" in kinds:
        handles.append(Patch(fc=_FILL["probe"], ec=HIGHLIGHT_COLORS["probe"], lw=2, label="layer with a sensitivity probe"))
    for cat in sorted(kinds - {"projection", "probe"} - ({"fixed_point"} if dg.frames else set())):
        handles.append(Patch(fc="white", ec=HIGHLIGHT_COLORS.get(cat, SPAN_COLOR), lw=2, label=cat))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2 if fig_w < 7 else 3,
              fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
