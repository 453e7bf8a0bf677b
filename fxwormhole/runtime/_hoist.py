"""Loop-invariant code motion for traced VJP graphs.

The compiled adjoint loop calls ``B_z(z*)^T ybar`` once per iteration. A ``make_fx`` trace of that
VJP recomputes the body's forward at ``z*`` inside every call, and Inductor does not hoist work out
of a ``while_loop`` body, so each adjoint iteration would cost a forward plus a backward where eager
autograd (which keeps its tape) pays only the backward. :func:`hoist_invariants` splits the graph
into a *prelude* run once before the loop (everything that does not depend on the loop carry; it
returns the tensors the rest needs) and a *step* run per iteration.

Sizes are never passed between the two graphs: a size (``sym_size``, arithmetic on sizes) that the
step needs is recomputed there from a saved tensor, so both graphs take tensors only, which is what
``torch.while_loop`` and dynamo's ``autograd.Function`` handling accept under a dynamic batch.
Views are recomputed the same way (they cost nothing): ``torch.while_loop`` refuses closed-over
tensors that alias each other, which saving both a tensor and its ``detach`` would create.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx


def functionalize(gm: fx.GraphModule, example_args: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Re-trace ``gm`` without in-place ops (views stay views): an in-place update in the step that
    wrote into a hoisted tensor would corrupt it for the next iteration."""
    out = make_fx(torch.func.functionalize(gm, remove="mutations"), tracing_mode="symbolic")(*example_args)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out


def _is_tensor(node: fx.Node) -> bool:
    return node.op == "get_attr" or isinstance(node.meta.get("val"), torch.Tensor)


# Ops whose output shares storage with an input without saying so in the schema.
_HIDDEN_ALIASES = {torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default}


def _is_view(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and (
        target.is_view or target in _HIDDEN_ALIASES)


def hoist_invariants(gm: fx.GraphModule, varying: Sequence[int]) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """Split ``gm(*args)`` into ``prelude(*invariant_args) -> saved`` and
    ``step(*varying_args, *saved) -> gm's output``, where ``varying`` are the indices of the
    arguments that change between calls and ``invariant_args`` are the others, in order."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    varying_nodes = [placeholders[i] for i in varying]
    output = next(n for n in graph.nodes if n.op == "output")

    dependent: Set[fx.Node] = set(varying_nodes)
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)

    # What the step needs from the invariant part: tensors are saved, sizes are recomputed.
    saved: Dict[fx.Node, None] = {}
    recompute: Set[fx.Node] = set()

    def need(node: fx.Node) -> None:
        if node in dependent or node in saved or node in recompute:
            return
        if (_is_tensor(node) and not _is_view(node)) or node.op == "placeholder":
            saved[node] = None
        else:  # a size, or a view: recomputed in the step (free), so no two saved tensors alias
            recompute.add(node)
            for a in node.all_input_nodes:
                need(a)

    for node in [*dependent, output]:
        for a in node.all_input_nodes:
            need(a)

    step = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in varying_nodes:
        env[node] = step.placeholder(node.name)
    for node in saved:
        env[node] = step.placeholder(f"saved_{node.name}")
        env[node].meta = dict(node.meta)
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or node in saved:
            continue
        if node in dependent or node in recompute:
            env[node] = step.node_copy(node, env.__getitem__)
    step.node_copy(output, env.__getitem__)

    prelude = fx.Graph()
    penv: Dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output" or node in dependent:
            continue
        penv[node] = prelude.node_copy(node, penv.__getitem__)
    prelude.output(tuple(penv[n] for n in saved))
    prelude.eliminate_dead_code()

    step_gm = fx.GraphModule(gm, step, "HoistedStep")
    prelude_gm = fx.GraphModule(gm, prelude, "HoistedPrelude")
    return prelude_gm, step_gm


def restrict_outputs(gm: fx.GraphModule, keep: int) -> fx.GraphModule:
    """A copy of ``gm``, whose output is a tuple, returning only its first ``keep`` entries (and
    computing only what they need)."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(tuple(env[n] for n in node.args[0][:keep]))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph, type(gm).__name__)


class Hoisted:
    """``fn(*args)`` with ``args[varying]`` changing per call, split by :func:`hoist_invariants`.

    :meth:`bind` runs the prelude once on the other arguments and returns a :class:`Bound`: calling
    it runs the whole step; ``.loop(...)`` runs a step cut down to the first ``loop_outputs``
    outputs (e.g. only the primal's gradient inside an adjoint loop, the parameter gradients once
    after it)."""

    def __init__(self, gm: fx.GraphModule, varying: Sequence[int], loop_outputs: Optional[int] = None) -> None:
        self.varying = tuple(varying)
        self.prelude, self.step = hoist_invariants(gm, self.varying)
        self.loop_step = self.step if loop_outputs is None else restrict_outputs(self.step, loop_outputs)
        self.loop_outputs = loop_outputs

    def bind(self, *invariant_args: torch.Tensor) -> "Bound":
        return Bound(self, list(self.prelude(*invariant_args)))


class Bound:
    """A :class:`Hoisted` graph with its prelude evaluated."""

    def __init__(self, hoisted: Hoisted, saved: List[torch.Tensor]) -> None:
        self.hoisted, self.saved = hoisted, saved

    def __call__(self, *varying_args: torch.Tensor):
        return self.hoisted.step(*varying_args, *self.saved)

    def loop(self, *varying_args: torch.Tensor):
        out = self.hoisted.loop_step(*varying_args, *self.saved)
        return out[0] if self.hoisted.loop_outputs == 1 else out
