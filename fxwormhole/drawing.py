"""Pictures of a captured (or rewritten) graph that a person can read.

Two steps, so the layout can be tested without matplotlib:

* :func:`build_display_graph` folds the fx graph into display boxes: a layer and its activation
  become one box; a submodule call that holds no main-path node (an attention block, a dropout)
  becomes one box; chains of shape-only ops (view, transpose, getitem, ...) become one box. The
  main path is laid out top to bottom in column 0, branches in columns to its right, and
  candidate spans are kept as (src box, dst box, label).
* :func:`draw_graph` renders it with matplotlib (the ``plots`` extra): spans are curved arrows on
  the left, from the deep unit back to the earlier one.

``highlights`` maps fx node names to a category (``"wormhole"``, ``"fixed_point"``, ``"probe"``
or any string); highlighted nodes are never folded away and get that category's colour and a
legend entry, which is what an ``--after`` picture of a rewritten graph needs.
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

__all__ = ["DisplayNode", "DisplayGraph", "build_display_graph", "draw_graph", "HIGHLIGHT_COLORS"]

# ops that only move data around: chains of them fold into one box
_TRIVIAL = {
    "getitem", "view", "reshape", "transpose", "permute", "contiguous", "select", "slice", "unsqueeze",
    "squeeze", "clone", "expand", "dropout", "unflatten", "_unsafe_view", "alias", "t", "flatten",
    "size", "type_as", "to", "detach",
}

HIGHLIGHT_COLORS = {"wormhole": "#e67e22", "fixed_point": "#8e44ad", "probe": "#16a085"}
_FILL = {"input": "#fde9a9", "output": "#fde9a9", "layer": "#cfe2f3", "layer_off": "#d9ead3",
         "op": "#eeeeee", "chain": "#ffffff", "region": "#f4f4f4"}


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
    column: int = 0                # 0 = main path, 1.. = branches to the right


@dataclass
class DisplayGraph:
    """Boxes, edges between them and span arrows, ready to render."""

    nodes: dict[str, DisplayNode]
    edges: list[tuple[str, str]]
    spans: list[tuple[str, str, str]] = field(default_factory=list)  # (src box, dst box, label)

    def box_of(self, fx_node: str) -> str | None:
        """The id of the box holding fx node ``fx_node`` (None if it is not drawn)."""
        return next((d.id for d in self.nodes.values() if fx_node in d.members), None)


def _op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return str(t)
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
) -> DisplayGraph:
    """Fold ``gm`` into display boxes and lay them out (see the module docstring)."""
    highlights = dict(highlights or {})
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
        boxes[box_id] = DisplayNode(box_id, label, role, members, any(m in path for m in members), hl)
        for m in members:
            group[m] = box_id

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
        label = f"{rid}\n({region.module_type}, {len(region.nodes)} ops){extra}"
        add_box(f"region:{rid}", label, "region", members)
    # 2. layers (+ their activation) not folded into a call
    for l in layers:
        act = f" + {l.activation}" if l.activation else ""
        label = f"{l.name}\n{l.kind} {_fmt_shape(l.in_shape)} -> {_fmt_shape(l.out_shape)}{act}"
        members = [l.node] + ([l.activation_node] if l.activation_node and l.activation_node not in highlights else [])
        add_box(l.node, label, "layer", members)
    # 3. everything else on its own
    for name in g.nodes:
        if name in group:
            continue
        n = nodes[name]
        role = {"placeholder": "input", "output": "output"}.get(n.op, "op")
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
    """Rank = longest path from a source; main path in column 0, branches packed to the right."""
    for b in nx.topological_sort(bg):
        preds = list(bg.predecessors(b))
        boxes[b].rank = 1 + max(boxes[p].rank for p in preds) if preds else 0
    inputs = [b for b in boxes if boxes[b].role == "input"]
    main = [b for b in boxes if boxes[b].on_main_path or boxes[b].role == "output"]
    if len(inputs) == 1:
        main += inputs  # a single input heads the main column
    for b in main:
        boxes[b].column = 0
    off = bg.subgraph([b for b in boxes if b not in main]).to_undirected()
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
    if path.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"picture {str(path)!r}: expected a file name ending in .png or .svg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:  # the plots extra is optional
        raise ConfigError(f"drawing a picture needs matplotlib ({exc}); install it with: pip install fxwormhole[plots]") from None

    dg = build_display_graph(gm, layers=layers, spans=spans, highlights=highlights)
    n_rows = max((d.rank for d in dg.nodes.values()), default=0) + 1
    n_cols = max((d.column for d in dg.nodes.values()), default=0) + 1
    col_w, row_h = 3.0, 0.95
    fig_w = 1.8 + col_w * n_cols + (1.6 if dg.spans else 0)
    fig, ax = plt.subplots(figsize=(fig_w, 0.8 + row_h * n_rows))
    ax.set_xlim(-0.5 - (0.55 if dg.spans else 0), n_cols - 0.5)
    ax.set_ylim(-n_rows + 0.4, 0.6)
    ax.axis("off")

    texts = {}
    for d in dg.nodes.values():
        fill = _FILL["layer_off" if d.role == "layer" and not d.on_main_path else d.role]
        edge = HIGHLIGHT_COLORS.get(d.highlight, "#c0392b") if d.highlight else ("#1f4e79" if d.on_main_path else "#777777")
        style = "round,pad=0.35" if d.role != "chain" else "round4,pad=0.3"
        texts[d.id] = ax.text(
            d.column, -d.rank, d.label, ha="center", va="center", fontsize=7.5,
            family="monospace" if d.role in ("op", "chain") else "sans-serif",
            bbox=dict(boxstyle=style, fc=fill, ec=edge, lw=2.2 if d.highlight or d.on_main_path else 0.9,
                      ls="--" if d.role == "chain" else "-"),
            zorder=3,
        )
    fig.canvas.draw()  # text extents are needed to attach arrows to box borders
    for a, b in dg.edges:
        same_col = dg.nodes[a].column == dg.nodes[b].column
        ax.annotate("", xy=(0.5, 1.0), xycoords=texts[b], xytext=(0.5, 0.0), textcoords=texts[a],
                    arrowprops=dict(arrowstyle="-|>", color="#555555", lw=0.9, shrinkA=4, shrinkB=4,
                                    connectionstyle="arc3,rad=0.0" if same_col else "arc3,rad=-0.15"),
                    zorder=1)
    labels_at: dict[str, list[str]] = {}
    for i, (s, d, label) in enumerate(dg.spans):
        rad = -0.45 - 0.12 * i
        ax.annotate("", xy=(0.0, 0.5), xycoords=texts[d], xytext=(0.0, 0.5), textcoords=texts[s],
                    arrowprops=dict(arrowstyle="-|>", color="#c0392b", lw=1.6, ls="--", alpha=0.9 - 0.15 * min(i, 3),
                                    shrinkA=3, shrinkB=3, connectionstyle=f"arc3,rad={rad}"), zorder=2)
        labels_at.setdefault(d, []).append(label.replace("span ", ""))
    for d, nums in labels_at.items():  # label each arrow head: "span 1, 3 ->"
        ax.annotate(f"span {', '.join(nums)}", xy=(0.0, 0.5), xycoords=texts[d], xytext=(-14, 7),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="#c0392b")
    handles = [Patch(fc=_FILL["layer"], ec="#1f4e79", label="layer on the main path"),
               Patch(fc=_FILL["layer_off"], ec="#777777", label="layer off the main path"),
               Patch(fc=_FILL["region"], ec="#777777", label="submodule call (folded)"),
               Patch(fc="white", ec="#777777", ls="--", label="folded data-movement ops")]
    if dg.spans:
        handles.append(Patch(fc="white", ec="#c0392b", ls="--", label="candidate span (deep -> earlier)"))
    for cat in sorted({d.highlight for d in dg.nodes.values() if d.highlight}):
        handles.append(Patch(fc="white", ec=HIGHLIGHT_COLORS.get(cat, "#c0392b"), lw=2, label=cat))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
