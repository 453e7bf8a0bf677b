"""Helpers shared by the passes: metadata access, running passes with typed errors, legalising."""
from __future__ import annotations

import heapq
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_manager import PassManager

from ..errors import FxWormholeError

__all__ = ["META_KEY", "node_meta", "graph_meta", "run_passes", "legalize", "value_shape"]

META_KEY = "fxwormhole"


def node_meta(node: fx.Node) -> dict[str, Any]:
    """The toolkit's metadata dict on ``node`` (created on first use)."""
    return node.meta.setdefault(META_KEY, {})


def graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The toolkit's metadata dict on the GraphModule (created on first use)."""
    return gm.meta.setdefault(META_KEY, {})


def run_passes(gm: fx.GraphModule, passes: Sequence[Any]) -> fx.GraphModule:
    """Run ``passes`` with torch.fx's PassManager, re-raising our own errors unwrapped.

    PassManager wraps every failure in a bare ``Exception``; users should see the typed
    :class:`FxWormholeError` that says what to do.
    """
    manager = PassManager(passes=list(passes), run_checks_after_each_pass=True)
    try:
        result = manager(gm)
    except Exception as exc:  # noqa: BLE001 - unwrap and re-raise below
        cause = exc
        while cause is not None and not isinstance(cause, FxWormholeError):
            cause = cause.__cause__
        if cause is not None:
            raise cause.with_traceback(None) from None
        # Anything else: still a typed error (the cause stays chained), saying where it happened.
        root = exc.__cause__ or exc
        first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")[:300]
        raise FxWormholeError(
            f"{_pass_name(exc)} failed with {type(root).__name__}: {first}; check that example_inputs are a valid "
            "call of the model (number, shapes, dtypes and devices of the tensors, matching the model's parameters); "
            "if they are, please report this model to fxwormhole") from root
    return result.graph_module


def _pass_name(exc: BaseException) -> str:
    """``"pass 'InsertWormholes'"`` from PassManager's wrapper message (or a generic phrase)."""
    import re

    found = re.search(r"running the '(\w+)' pass", str(exc))
    return f"pass {found.group(1)!r}" if found else "a graph pass"


def legalize(gm: fx.GraphModule, order: Iterable[tuple[str, str]] = ()) -> fx.GraphModule:
    """Re-order nodes topologically, keeping the original order where dependencies allow; lint; recompile.

    Dependencies are the data edges plus ``order``: ``(before, after)`` node names that must stay in
    that order although no data edge says so (in-place updates, see ``_mutation.ordering_edges``).
    torch's ``stable_topological_sort`` knows only data edges and would move a read of a buffer
    across the update that fills it.
    """
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    preds = {n: set(n.all_input_nodes) for n in nodes}
    for before, after in order:
        if before in by_name and after in by_name and before != after:
            preds[by_name[after]].add(by_name[before])
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in nodes}
    for n, ps in preds.items():
        for p in ps:
            users[p].append(n)
    waiting = {n: len(ps) for n, ps in preds.items()}
    ready = [(position[n], n) for n in nodes if not waiting[n]]
    heapq.heapify(ready)
    ordered: list[fx.Node] = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (position[user], user))
    if len(ordered) != len(nodes):
        stuck = [n.name for n in nodes if waiting[n]][:5]
        raise FxWormholeError(f"legalize: the graph has a dependency cycle through {stuck}; please report this model")
    for prev, node in zip(ordered, ordered[1:]):
        if prev.next is not node:
            prev.append(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def value_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Static shape of a node's tensor value, from its fake value (None if unknown / not a tensor)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None
