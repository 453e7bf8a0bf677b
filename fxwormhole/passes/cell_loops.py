"""Cell-loop pass: a user's unrolled loop over recurrent cells -> one module on the fast temporal runtime.

Both front ends unroll a Python loop over ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` into ``T``
calls per cell. Without this pass the plan gives each step's calls a wormhole and the wrap pass one
generic ``FixedPoint`` per step. This pass finds such loops (:func:`~fxwormhole.passes._cell_chains.
find_cell_chains`: one cell per layer, the state threaded step to step, per-step inputs computed
without the loop) and, for each loop that gets a temporal wormhole, replaces the chain by one
``call_module`` node of a :class:`~fxwormhole.runtime.cell_loop.CellLoop`::

    xs = torch.stack([x_0, ..., x_{T-1}])            # the per-step inputs, time-major
    cell_loop_0 = self.cell_loop_0(xs, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    out, h_n = cell_loop_0[0], cell_loop_0[1]         # users of h_t read out[t]; of the last states, h_n[l]

with the wormhole the policy would have placed on the unrolled loop, so the semantics are those of
the per-step fixed points (same residual scale, same per-sample halting; checked in float64 against
them). The cells keep their parameters at their paths; the node reads them as ``get_attr`` values.

Which wormhole: under ``"auto"`` the pair the plan's policy picks (:func:`~fxwormhole.passes.
plan_wormholes.policy_pairs`: the last cell back to the first, ``(layer L-1, layer 0)``); with explicit
pairs, one pair whose ends are both cells of the loop (``("cells.1", "cells.0")``). The loop keeps the
unrolled path (the plan places per-step wormholes as before) when its pattern does not match, when a
pair has one end in it and one outside, or names one of its nodes, when several pairs name it (their
residual scales differ from the runtime's), under ``"every:K"``, when the gradient or solver takes no
fast runtime (``fast_path_refusal``), and with SAL probes (they wrap each cell call).

Recorded: ``NodeInfo.cell_loop`` (:class:`~fxwormhole.passes.meta.CellLoopInfo`) on the new node,
``GraphRecord.cell_loops``, and in ``GraphRecord.temporal`` the pair placed and what of the config it
consumed (so the plan does not place it again).
"""
from __future__ import annotations

import contextlib
import logging
import operator
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import WormholeConfig
from ..policy import parse_policy
from ..runtime.cell_loop import CellLoop, stack_states
from ..runtime.recurrent import attach_temporal_runtime
from ..runtime.temporal import fast_path_refusal
from ._cell_chains import CellChain, find_cell_chains
from ._common import build_wormhole, fake_value, legalize
from ._mutation import ordering_edges
from .meta import CellLoopInfo, TemporalPlacement, graph_record, update_graph, update_node
from .plan_wormholes import policy_pairs

__all__ = ["FuseCellLoops"]

log = logging.getLogger("fxwormhole")

Span = Tuple[str, str]


class FuseCellLoops(PassBase):
    """Run each unrolled cell loop that gets a temporal wormhole as one :class:`CellLoop` node.

    Args:
        config: the wormhole config (pairs or policy, gate, init, solver, gradient).

    The transform pipeline leaves this pass out under SAL: the sensitivity probes wrap each cell call.
    """

    def __init__(self, config: WormholeConfig = WormholeConfig()) -> None:
        super().__init__()
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        chains, why = find_cell_chains(gm)
        for path, reason in why.items():
            log.info("FuseCellLoops: calls of %s stay unrolled: %s", path, reason)
        if not chains:
            return PassResult(gm, False)
        refusal = fast_path_refusal(self.config.solver, self.config.grad)
        if refusal is not None:
            log.info("FuseCellLoops: cell loops stay unrolled: %s", refusal)
            return PassResult(gm, False)
        policy = parse_policy(self.config.wormholes)
        temporal = graph_record(gm).temporal or TemporalPlacement()
        if policy.kind == "every" or (policy.automatic and temporal.policy_consumed):
            return PassResult(gm, False)
        pairs = policy_pairs(gm, policy) if policy.automatic else [p for p in policy.pairs if p not in temporal.consumed_pairs]
        chosen = _assign(gm, chains, pairs)
        if not chosen:
            return PassResult(gm, False)
        placed: Dict[str, Tuple[Span, ...]] = {}
        loops: Dict[str, Tuple[str, ...]] = {}
        for chain, span, layers in chosen:
            name = _free_name(gm)
            self._fuse(gm, chain, span, layers, name)
            placed[name], loops[name] = (span,), chain.paths
        legalize(gm, ordering_edges(gm))
        gm.recompile()
        update_graph(gm, cell_loops={**(graph_record(gm).cell_loops or {}), **loops}, temporal=TemporalPlacement(
            placed={**temporal.placed, **placed},
            consumed_pairs=tuple(dict.fromkeys((*temporal.consumed_pairs, *(() if policy.automatic else
                                                                             [p for ps in placed.values() for p in ps])))),
            policy_consumed=temporal.policy_consumed or policy.automatic))
        return PassResult(gm, True)

    # ---- the rewrite ---------------------------------------------------------------------------
    def _fuse(self, gm: fx.GraphModule, chain: CellChain, span: Span, layers: Tuple[int, int], name: str) -> None:
        graph, L, T = gm.graph, chain.num_layers, chain.steps
        cells = [gm.get_submodule(p) for p in chain.paths]
        ref = cells[0].weight_ih
        loop = CellLoop(chain.mode, cells[0].input_size, cells[0].hidden_size, chain.paths,
                        [c.bias_ih is not None for c in cells], device=ref.device, dtype=ref.dtype)
        a, b = layers
        in_b = cells[b].input_size
        wormhole = build_wormhole((1, loop.hidden_size), (1, in_b), self.config, src=span[0], dst=span[1], like=ref)
        attach_temporal_runtime(loop, [layers], [wormhole], self.config, where=name, region_only=True)
        gm.add_submodule(name, loop)

        order = {n: i for i, n in enumerate(graph.nodes)}
        inside = chain.nodes
        vals = _Vals(gm)
        with graph.inserting_before(max(inside, key=order.__getitem__).next):
            xs = vals.node(graph.call_function(torch.stack, (list(chain.inputs),)))
            hx = self._initial_state(graph, chain, vals)
            weights: List[fx.Node] = []
            for path, cell in zip(chain.paths, cells):
                for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if getattr(cell, attr) is not None:
                        w = graph.get_attr(f"{path}.{attr}")
                        w.meta["val"] = fake_value(gm, getattr(cell, attr))
                        weights.append(w)
            call = graph.call_module(name, (xs, hx, *weights))
            top = [_h_val(c, chain.mode) for c in chain.calls[L - 1]]
            finals_h = [_h_val(row[-1], chain.mode) for row in chain.calls]
            out_val, hn_val = vals.stack(top), vals.stack(finals_h)
            cn_val = vals.stack([row[-1].meta["val"][1] for row in chain.calls]) if chain.mode == "LSTM" else None
            call.meta["val"] = (out_val, (hn_val, cn_val) if cn_val is not None else hn_val)
            update_node(call, cell_loop=CellLoopInfo(
                path=name, cells=chain.paths, mode=chain.mode, steps=T, input_size=loop.input_size,
                hidden_size=loop.hidden_size, temporal_wormholes=(span,), layer_pairs=(layers,),
                fused_nodes=tuple(n.name for n in inside)))
            out = _item(graph, call, 0, out_val)
            states = _item(graph, call, 1, call.meta["val"][1])
            hn = _item(graph, states, 0, hn_val) if cn_val is not None else states
            cn = _item(graph, states, 1, cn_val) if cn_val is not None else None

        # every use outside the loop reads the module's outputs instead
        made: Dict[Tuple[str, int, int], fx.Node] = {}

        def value(kind: str, l: int, t: int) -> fx.Node:
            key = (kind, l, t)
            if key not in made:
                if kind == "h" and l == L - 1:
                    src, i, val = out, t, out_val
                else:
                    src, i, val = (hn, l, hn_val) if kind == "h" else (cn, l, cn_val)
                with graph.inserting_after(src):
                    made[key] = _item(graph, src, i, None)
                made[key].meta["val"] = vals.index(val, i)
            return made[key]

        inside_set = set(inside)
        for l in range(L):
            for t in range(T):
                for kind, group in (("h", chain.h_nodes[l][t]), ("c", chain.c_nodes[l][t])):
                    for node in group:
                        for user in [u for u in node.users if u not in inside_set]:
                            user.replace_input_with(node, value(kind, l, t))
        feeding = {a for n in inside for a in n.all_input_nodes if a not in inside_set} | {out, states, hn, cn} - {None}
        for node in sorted(inside, key=order.__getitem__, reverse=True):
            graph.erase_node(node)
        _drop_unused(graph, feeding)

    @staticmethod
    def _initial_state(graph: fx.Graph, chain: CellChain, vals: "_Vals") -> Any:
        """``None``, ``h0 [L, B, H]`` or ``(h0, c0)``: the layers' initial states, zeros where a cell had none."""
        if all(h is None and c is None for h, c in chain.initial):
            return None
        given = next(s for pair in chain.initial for s in pair if s is not None)
        parts = []
        for k in range(2 if chain.mode == "LSTM" else 1):
            states = []
            for pair in chain.initial:
                s = pair[k]
                if s is None:
                    s = vals.node(graph.call_function(torch.zeros_like, (given,)))
                states.append(s)
            parts.append(vals.node(graph.call_function(stack_states, tuple(states))))
        return tuple(parts) if len(parts) == 2 else parts[0]


# ---- helpers ------------------------------------------------------------------------------------
def _assign(gm: fx.GraphModule, chains: Sequence[CellChain], pairs: Sequence[Span]) -> List[Tuple[CellChain, Span, Tuple[int, int]]]:
    """The chains that get exactly one wormhole between two of their own cells, with it."""
    where = {p: (k, l) for k, c in enumerate(chains) for l, p in enumerate(c.paths)}
    node_names = {n.name: k for k, c in enumerate(chains) for n in c.nodes}
    blocked: set = set()
    found: Dict[int, List[Tuple[Span, Tuple[int, int]]]] = {}

    def touched(end: str) -> set:
        hit = {where[end][0]} if end in where else set()
        hit |= {node_names[end]} if end in node_names else set()
        hit |= {k for p, (k, _) in where.items() if p.startswith(end + ".")}  # a module holding cells
        return hit

    for src, dst in pairs:
        a, b = where.get(src), where.get(dst)
        if a is not None and b is not None and a[0] == b[0]:
            found.setdefault(a[0], []).append(((src, dst), (a[1], b[1])))
        else:
            blocked |= touched(src) | touched(dst)
    chosen = []
    for k, items in found.items():
        chain = chains[k]
        if k in blocked:
            log.info("FuseCellLoops: %s stays unrolled: a wormhole joins it to another part of the model", chain.paths)
        elif len(items) > 1:
            log.info("FuseCellLoops: %s stays unrolled: several wormholes name it", chain.paths)
        elif items[0][1][0] < items[0][1][1]:
            log.info("FuseCellLoops: %s stays unrolled: wormhole %s goes up the stack", chain.paths, items[0][0])
        else:
            chosen.append((chain, items[0][0], items[0][1]))
    return chosen


def _free_name(gm: fx.GraphModule) -> str:
    k = 0
    while hasattr(gm, f"cell_loop_{k}"):
        k += 1
    return f"cell_loop_{k}"


def _h_val(call: fx.Node, mode: str) -> Any:
    val = call.meta["val"]
    return val[0] if mode == "LSTM" else val


def _item(graph: fx.Graph, node: fx.Node, index: int, val: Any) -> fx.Node:
    item = graph.call_function(operator.getitem, (node, index))
    if val is not None:
        item.meta["val"] = val
    return item


def _drop_unused(graph: fx.Graph, candidates: set) -> None:
    """Erase the nodes only the fused chain read (per-step slices of the input, zero states)."""
    stack = list(candidates)
    while stack:
        node = stack.pop()
        if node._erased or node.users or node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        stack.extend(inputs)


class _Vals:
    """``meta["val"]`` of new nodes, computed from the old nodes' fake values in the graph's fake mode
    (so a symbolic batch size stays symbolic)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        from torch._guards import detect_fake_mode

        self.mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])

    def _ctx(self):
        return self.mode if self.mode is not None else contextlib.nullcontext()

    def stack(self, vals: Sequence[Any]) -> Any:
        with self._ctx():
            return torch.stack(list(vals))

    def index(self, val: Any, i: int) -> Any:
        with self._ctx():
            return val[i]

    def node(self, node: fx.Node) -> fx.Node:
        """Fill ``node.meta["val"]`` by running its op on its inputs' values."""
        def v(a):
            return a.meta["val"] if isinstance(a, fx.Node) else a
        args = fx.node.map_aggregate(node.args, v)
        with self._ctx():
            node.meta["val"] = node.target(*args)
        return node
