"""Find unrolled cell loops in a captured graph (read-only; used by :mod:`~fxwormhole.passes.cell_loops`).

Both front ends unroll a Python loop over ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` into one
``call_module`` node per call. A :class:`CellChain` is such a loop in a form the temporal runtime
computes exactly:

* one cell module per layer (``L >= 1`` distinct modules of one kind and hidden size), each called
  ``T`` times, in step order;
* the state threaded: call ``t`` of a cell takes call ``t-1``'s ``h`` (``(h, c)`` for an LSTM cell, as
  a tuple of the two ``getitem`` nodes or the call's own tuple); call 0 takes none or values computed
  without the chain;
* layer ``l+1``'s input at step ``t`` is layer ``l``'s new ``h`` at step ``t``, unchanged; the bottom
  layer's per-step inputs are computed without the chain (no output fed back as an input);
* outside the chain, only the top layer's ``h`` (any step) and the final ``h`` / ``c`` of each layer
  are read, and never updated in place.

:func:`find_cell_chains` returns the chains and, for the cells that form none, why (the pass logs it).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx

from ..runtime.cell_loop import cell_mode
from ._mutation import alias_roots, mutated_inputs

__all__ = ["CellChain", "find_cell_chains"]


@dataclass(frozen=True)
class CellChain:
    """One unrolled cell loop (see the module docstring); lists are indexed ``[layer][step]``."""

    paths: Tuple[str, ...]  # the cells' module paths, bottom first
    mode: str  # LSTM, GRU, RNN_TANH, RNN_RELU
    calls: Tuple[Tuple[fx.Node, ...], ...]
    inputs: Tuple[fx.Node, ...]  # the bottom layer's input at each step
    initial: Tuple[Tuple[Optional[fx.Node], Optional[fx.Node]], ...]  # per layer (h0, c0); None: zeros
    h_nodes: Tuple[Tuple[Tuple[fx.Node, ...], ...], ...]  # nodes whose value is layer l's h at step t
    c_nodes: Tuple[Tuple[Tuple[fx.Node, ...], ...], ...]  # LSTM: nodes whose value is c (else empty)

    @property
    def num_layers(self) -> int:
        return len(self.paths)

    @property
    def steps(self) -> int:
        return len(self.inputs)

    @property
    def nodes(self) -> List[fx.Node]:
        """Every node of the chain (calls and the getitems that unpack them)."""
        out: List[fx.Node] = []
        for l in range(self.num_layers):
            for t in range(self.steps):
                out.append(self.calls[l][t])
                out.extend(n for n in (*self.h_nodes[l][t], *self.c_nodes[l][t]) if n is not self.calls[l][t])
        return out


def _state_arg(node: fx.Node):
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")


def _items(call: fx.Node, index: int) -> Tuple[fx.Node, ...]:
    return tuple(u for u in call.users if u.op == "call_function" and u.target is operator.getitem
                 and u.args[0] is call and u.args[1] == index)


def _is_item(node, call: fx.Node, index: int) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[0] is call and node.args[1] == index)


def _h_of(node, is_lstm: bool) -> Optional[fx.Node]:
    """The cell call whose new ``h`` ``node`` is (None if it is not one)."""
    if is_lstm:
        if (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
                and node.args[1] == 0 and isinstance(node.args[0], fx.Node)):
            return node.args[0]
        return None
    return node if isinstance(node, fx.Node) else None


def _threads(state, prev: fx.Node, is_lstm: bool) -> bool:
    if not is_lstm:
        return state is prev
    if state is prev:
        return True
    return (isinstance(state, (tuple, list)) and len(state) == 2 and _is_item(state[0], prev, 0)
            and _is_item(state[1], prev, 1))


def _initial(state, is_lstm: bool) -> Optional[Tuple[Optional[fx.Node], Optional[fx.Node]]]:
    """Call 0's state as (h0, c0) nodes (None entries: zeros); None if it is not of that form."""
    if state is None:
        return (None, None)
    if not is_lstm:
        return (state, None) if isinstance(state, fx.Node) else None
    if isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(s, fx.Node) for s in state):
        return (state[0], state[1])
    return None


def find_cell_chains(gm: fx.GraphModule) -> Tuple[List[CellChain], Dict[str, str]]:
    """The cell loops of ``gm`` (see the module docstring) and ``{cell path: why it forms no chain}``."""
    calls: Dict[str, List[fx.Node]] = {}
    modes: Dict[str, str] = {}
    why: Dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mode = cell_mode(gm.get_submodule(str(node.target)))
        if mode is not None:
            calls.setdefault(str(node.target), []).append(node)
            modes[str(node.target)] = mode
    if not calls:
        return [], why
    owner = {n: (p, t) for p, ns in calls.items() for t, n in enumerate(ns)}

    # each cell: its state threaded step to step, and which cell (if any) feeds its input
    below: Dict[str, Optional[str]] = {}
    for path, ns in calls.items():
        is_lstm = modes[path] == "LSTM"
        bad = next((n for n in ns if set(n.kwargs) - {"hx"} or not 1 <= len(n.args) + len(n.kwargs) <= 2), None)
        if bad is not None:
            why[path] = f"call {bad.name} has arguments other than (input, hx)"
            continue
        if not all(_threads(_state_arg(ns[t]), ns[t - 1], is_lstm) for t in range(1, len(ns))):
            why[path] = "the state of one call is not the previous call's"
            continue
        if _initial(_state_arg(ns[0]), is_lstm) is None:
            why[path] = f"the initial state of {ns[0].name} is not a tensor (or an (h, c) pair of tensors)"
            continue
        feeders = []
        for t, n in enumerate(ns):
            src = _h_of(n.args[0], is_lstm)
            feeders.append(owner.get(src) if src is not None else None)
        kinds = {f is None for f in feeders}
        if kinds == {True}:
            below[path] = None
        elif kinds == {False} and len({p for p, _ in feeders}) == 1 and all(s == t for t, (_, s) in enumerate(feeders)):
            below[path] = feeders[0][0]
        else:
            why[path] = "its inputs are not all the same lower cell's h at the same step"

    chains: List[CellChain] = []
    above: Dict[str, List[str]] = {}
    for path, lower in below.items():
        if lower is not None:
            above.setdefault(lower, []).append(path)
    for bottom in [p for p, lower in below.items() if lower is None]:
        paths = [bottom]
        while len(above.get(paths[-1], [])) == 1 and above[paths[-1]][0] in below:
            paths.append(above[paths[-1]][0])
        if len(above.get(paths[-1], [])) > 1:
            for p in paths:
                why[p] = "two cells read the same cell's h"
            continue
        chain, reason = _chain(gm, paths, calls, modes)
        if chain is None:
            for p in paths:
                why[p] = reason
        else:
            chains.append(chain)
    for path in calls:
        if path not in why and not any(path in c.paths for c in chains):
            why[path] = "its input comes from a cell that forms no chain"
    return chains, why


def _chain(gm: fx.GraphModule, paths: Sequence[str], calls, modes) -> Tuple[Optional[CellChain], str]:
    mods = [gm.get_submodule(p) for p in paths]
    if len({modes[p] for p in paths}) != 1:
        return None, "the cells are of different kinds"
    if len({id(m) for m in mods}) != len(mods):
        return None, "one cell module is registered at two paths of the stack"
    if len({m.hidden_size for m in mods}) != 1 or len({len(calls[p]) for p in paths}) != 1:
        return None, "the cells differ in hidden size or number of calls"
    if len({(p.dtype, p.device) for m in mods for p in m.parameters()}) > 1:
        return None, "the cells' parameters differ in dtype or device"
    mode, L, T = modes[paths[0]], len(paths), len(calls[paths[0]])
    is_lstm = mode == "LSTM"
    grid = [calls[p] for p in paths]
    h_nodes = [[_items(n, 0) if is_lstm else (n,) for n in row] for row in grid]
    c_nodes = [[_items(n, 1) if is_lstm else () for n in row] for row in grid]
    inputs = [n.args[0] for n in grid[0]]
    initial = [_initial(_state_arg(row[0]), is_lstm) for row in grid]
    chain = CellChain(tuple(paths), mode, tuple(tuple(r) for r in grid), tuple(inputs), tuple(initial),  # type: ignore[arg-type]
                      tuple(tuple(r) for r in h_nodes), tuple(tuple(r) for r in c_nodes))
    inside = set(chain.nodes)
    if not all(isinstance(x, fx.Node) for x in inputs):
        return None, "a per-step input is not a tensor node"
    # users of the chain outside it: the top layer's h (any step), final states; nothing else
    for l in range(L):
        for t in range(T):
            call = grid[l][t]
            for u in call.users:
                if u not in inside:
                    if not (not is_lstm and (l == L - 1 or t == T - 1)):
                        return None, f"{u.name} reads {call.name} (only the top cell's h and the last states may leave the loop)"
            for n in h_nodes[l][t]:
                if any(u not in inside for u in n.users) and not (l == L - 1 or t == T - 1):
                    return None, f"{n.name} (a lower cell's h at step {t}) is read outside the loop"
            for n in c_nodes[l][t]:
                if any(u not in inside for u in n.users) and t != T - 1:
                    return None, f"{n.name} (the cell state c at step {t}) is read outside the loop"
    roots = alias_roots(gm)
    for node in gm.graph.nodes:
        if any(roots.get(m, m) in inside for m in mutated_inputs(gm, node)):
            return None, f"{node.name} updates a value of the loop in place"
    # nothing the chain reads may depend on the chain (an output fed back as the next input)
    tainted: set = set()
    for node in gm.graph.nodes:
        if node in inside or any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
    starts = [x for x in inputs] + [s for pair in initial for s in pair if s is not None]  # type: ignore[union-attr]
    if any(s in tainted for s in starts):
        return None, "a per-step input or an initial state depends on the loop's outputs"
    return chain, ""
