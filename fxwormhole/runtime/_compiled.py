"""The compiled path of :class:`~fxwormhole.runtime.fixed_point.FixedPoint` (``torch.compile``,
``torch.export``).

Under ``torch.compile`` a node's solve is ONE opaque custom op, ``fxwormhole::fixed_point``, in the
model's graph (so ``fullgraph=True`` holds). Its implementation is a Python driver that can halt
per sample: a data-dependent loop cannot be traced into a graph, and a ``torch.while_loop`` that
freezes finished samples still computes them (research: compiled-halting-prototype.md). The
driver runs

* eagerly (the eager loop with per-sample compaction) when the node was not given compiled loops,
* or, after ``fxwormhole.compile`` (``FixedPoint.compiled_loops``), in blocks of a compiled step:
  one evaluation + check + solver step traced by ``make_fx`` and compiled by Inductor, called
  several times per block with no host read, then one read and compaction of the finished
  samples, the rest padded to a power-of-two bucket (:func:`~fxwormhole.runtime._loop.solve_blocks`).

Gradients belong to the node's strategy (:mod:`.gradients`):

* implicit: the op's registered autograd formula is a second opaque op,
  ``fxwormhole::fixed_point_backward``, whose implementation solves the adjoint
  ``ybar = g + F_y^T B_z^T ybar`` per sample (compacting as the forward does) over VJP graphs of
  body and feedback built ONCE, eagerly, by ``make_fx`` in ``prepare()``, with the forward at
  ``z*`` hoisted out of the loop (``_hoist.py``);
* phantom / jfb / registered modes: the op without gradient, then the strategy's ``attach``
  steps, traced into the graph (the same code as eagerly, with the same ``k`` and ``tau``);
* unrolled: eager only.

Under ``torch.export`` the solve is one ``torch.while_loop`` (:func:`~._loop.solve_while`), which
exported programs and ONNX ``Loop`` carry (inference only).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError, FxWormholeError
from . import _tree as T
from ._hoist import Hoisted, functionalize
from ._loop import AdjointMap, pad_rows, solve_eager, solve_while
from ._problem import Problem


# ------------------------------------------------------------------------------------------------
# module tensors
def _tensors(module: Any) -> Tuple[List[str], List[Tensor]]:
    """Floating-point parameters and buffers, passed explicitly so gradients and updates flow."""
    if not isinstance(module, nn.Module):
        return [], []
    named = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    return [n for n, _ in named], [t for _, t in named]


def _n_buffers(module: Any) -> int:
    """How many of :func:`_tensors`' tensors (the last ones) are buffers."""
    return len(_tensors(module)[1]) - (len(list(module.parameters())) if isinstance(module, nn.Module) else 0)


def _bind(module: Any, names: Sequence[str], tensors: Sequence[Tensor]) -> Optional[Callable]:
    if module is None:
        return None
    if not isinstance(module, nn.Module) or not names:
        return module
    d = dict(zip(names, tensors))
    return lambda *a: functional_call(module, d, a)


def _functional(node, base: Problem, tb: Sequence[Tensor], tf: Sequence[Tensor]) -> Problem:
    """A copy of ``base`` whose body and feedback read the given tensors instead of their own."""
    nb, _ = _tensors(node.body)
    nf, _ = _tensors(node.feedback)
    p = Problem(_bind(node.body, nb, tb), _bind(node.feedback, nf, tf), base.batched, base.zspec,
                base.solver_cfg, base.grad_mode, base.name, base.on_fail)
    p.solver = base.solver
    return p


# ------------------------------------------------------------------------------------------------
# the custom ops
_ENTRIES: Dict[int, Tuple[Any, Any, int, T.Spec]] = {}  # id -> (weakref to node, problem key, inputs, yspec)


def _entry(entry_id: int):
    node_ref, key, n_in, yspec = _ENTRIES[entry_id]
    node = node_ref()
    if node is None:
        raise FxWormholeError("fxwormhole::fixed_point: the FixedPoint this compiled graph was traced from is gone")
    return node, node._problems[key], n_in, yspec


@torch.library.custom_op("fxwormhole::fixed_point", mutates_args=())
def fixed_point_op(entry_id: int, tensors: List[Tensor]) -> List[Tensor]:
    """``[z0, *inputs, *params] -> [y*, z*, iterations, residual, status]`` (flat y and z)."""
    return _forward_impl(entry_id, tensors)


# The ops' Python runs while a compiled graph executes: dynamo must not trace into it.
@torch.compiler.disable
def _forward_impl(entry_id: int, tensors: List[Tensor]) -> List[Tensor]:
    node, base, n_in, _ = _entry(entry_id)
    z0, inputs = tensors[0], tensors[1:1 + n_in]
    p = base.bind(inputs)
    p.yspec = base.shared.yspec
    loops = node._compiled_solver(base)
    if loops is not None:
        x, aux, st, work = loops.forward(p, z0)
    else:
        x, aux, st, work = solve_eager(p.fmap, z0, p.solver, p.solver_cfg)
    y = T.flatten(p.y_from_aux(aux), p.yspec)
    outs = _no_alias([y, x, st.iterations, st.residual, st.status], tensors)
    node._cstats.clear()
    node._cstats.update(iterations=outs[2], residual=outs[3], status=outs[4], forward_work=work)
    return outs


@fixed_point_op.register_fake
def _(entry_id, tensors):
    _, _, _, yspec = _ENTRIES[entry_id]
    z0 = tensors[0]
    B = z0.shape[0]
    rdt = torch.promote_types(z0.dtype, torch.float32)
    return [z0.new_empty((B, sum(yspec.sizes)), dtype=yspec.dtype), torch.empty_like(z0),
            z0.new_empty((B,), dtype=torch.int64), z0.new_empty((B,), dtype=rdt), z0.new_empty((B,), dtype=torch.int8)]


@torch.library.custom_op("fxwormhole::fixed_point_backward", mutates_args=())
def fixed_point_backward_op(entry_id: int, tensors: List[Tensor]) -> List[Tensor]:
    """``[g, z*, y*, z0, *inputs, *params] -> [grad per input and param]`` (zeros where none)."""
    return _backward_impl(entry_id, tensors)


@torch.compiler.disable
def _backward_impl(entry_id: int, tensors: List[Tensor]) -> List[Tensor]:
    node, base, n_in, _ = _entry(entry_id)
    g, z_star, y_star, z0, rest = tensors[0], tensors[1], tensors[2], tensors[3], tensors[4:]
    grads = node.grad_strategy.op_backward(node, base, g, (z0, z_star, y_star), rest[:n_in], rest[n_in:])
    return _no_alias([torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, rest)], tensors)


@fixed_point_backward_op.register_fake
def _(entry_id, tensors):
    return [torch.empty_like(t) for t in tensors[4:]]


def _no_alias(outs: List[Tensor], ins: Sequence[Tensor]) -> List[Tensor]:
    """Custom-op outputs may not share memory with its inputs (a closed solve returns ``z0``)."""
    ptrs = {t.untyped_storage().data_ptr() for t in ins if t.numel()}
    return [o.clone() if o.numel() and o.untyped_storage().data_ptr() in ptrs else o for o in outs]


def _setup_context(ctx, inputs, output):
    entry_id, tensors = inputs
    ctx.entry_id = entry_id
    ctx.save_for_backward(output[1], output[0], *tensors)
    ctx.float_mask = [t.is_floating_point() for t in tensors[1:]]


def _backward(ctx, grads):
    z_star, y_star, *rest = ctx.saved_tensors
    g = grads[0] if grads[0] is not None else torch.zeros_like(y_star)
    out = torch.ops.fxwormhole.fixed_point_backward(ctx.entry_id, [g, z_star, y_star, *rest])
    return None, [None] + [o if f else None for o, f in zip(out, ctx.float_mask)]  # no gradient to z0


fixed_point_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# the traced forward
def compiled_forward(node, p: Problem, inputs: Sequence[Any], z0f: Tensor):
    """What ``FixedPoint.forward`` traces under ``torch.compile`` / ``torch.export``."""
    strategy = node.grad_strategy
    tensors_only = all(isinstance(x, Tensor) for x in inputs)
    need_grad = torch.is_grad_enabled() and (
        any(t.requires_grad for t in p._params) or any(isinstance(x, Tensor) and x.requires_grad for x in inputs))
    entry = p.shared.entry
    if torch.compiler.is_exporting() or not tensors_only or entry is None:
        if need_grad and strategy.mode in ("implicit", "unrolled"):
            if not tensors_only:
                raise ConfigError(f"FixedPoint {node.name!r}: compiled training needs tensor inputs only")
            raise FxWormholeError(
                f"FixedPoint {node.name!r}: the compiled {strategy.mode} gradient needs the node prepared eagerly; "
                "run one eager forward and call .prepare(), or call .prepare(*example_inputs) before torch.compile")
        y, stats = _while_forward(p, z0f)
        if need_grad:
            y = strategy.attach(p, y)
        iters, res, status = stats
        node._cstats.update(iterations=iters, residual=res, status=status)
    else:
        if need_grad and strategy.mode == "implicit" and node._graphs is None:
            raise FxWormholeError(
                f"FixedPoint {node.name!r}: the compiled implicit backward needs VJP graphs built eagerly; "
                "run one eager forward and call .prepare(), or call .prepare(*example_inputs) before torch.compile")
        p.yspec = p.shared.yspec
        # the op writes its stats at run time: a dict mutated in traced code is guarded on its
        # contents, and eager calls that clear it would make every compiled call recompile
        y, _ = strategy.compiled(node, p, z0f, need_grad)
    out = T.leaves(T.unflatten(y, p.yspec))
    return tuple(out) if p.yspec.is_tuple else out[0]


def solve_op(node, p: Problem, z0f: Tensor, differentiable: bool):
    """Call the solve op: ``(flat y*, flat z*, (iterations, residual, status))``."""
    tensors = [z0f, *p.inputs, *p._params]
    if differentiable:
        out = torch.ops.fxwormhole.fixed_point(p.shared.entry, tensors)
    else:
        with torch.no_grad():
            out = torch.ops.fxwormhole.fixed_point(p.shared.entry, [t.detach() for t in tensors])
    y, z, iters, res, status = out
    return y, z, (iters, res, status)


def _while_forward(p: Problem, z0f: Tensor):
    """The export path: one while_loop over the full batch (no gradient)."""
    cfg = p.solver_cfg
    with torch.no_grad():
        z, aux, iters, res, status = solve_while(lambda x: p.fmap(x, None), z0f, p.solver, cfg, tol=cfg.tol,
                                                 max_iter=cfg.max_iter)
    return T.flatten(tuple(aux) if p.yspec.is_tuple else aux[0], p.yspec), (iters, res, status)


def register_entry(node, p: Problem, n_inputs: int) -> None:
    """Make ``p`` callable through the custom op (done eagerly, outside any trace)."""
    if p.shared.entry is None and p.shared.yspec is not None:
        entry_id = len(_ENTRIES)
        _ENTRIES[entry_id] = (weakref.ref(node), p.shared.key, n_inputs, p.shared.yspec)
        p.shared.entry = entry_id


# ------------------------------------------------------------------------------------------------
# the implicit backward op
class _Linearised:
    """The hoisted VJP graphs bound at the solution on some rows: ``adjoint(cot) -> (zbar, F_y^T zbar)``."""

    def __init__(self, graphs: dict, z: Tensor, y: Tensor, rest: Sequence[Tensor]) -> None:
        self.vb = graphs["body"].bind(z, *rest)
        self.vf = graphs["feedback"].bind(y, *rest) if "feedback" in graphs else None

    def adjoint(self, cot: Tensor):
        zbar = self.vb.loop(cot)
        return zbar, (self.vf.loop(zbar) if self.vf is not None else zbar)


def implicit_op_backward(strategy, node, base: Problem, g: Tensor, z_star: Tensor, y_star: Tensor,
                         inputs: Sequence[Tensor], params: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """The compiled implicit gradient: per-sample adjoint solve over the prepared VJP graphs."""
    graphs = node._graphs
    _, tb = _tensors(node.body)
    _, tf = _tensors(node.feedback)
    rest = (*inputs, *tb, *tf)
    n_in = len(inputs)
    batched = base.batched
    g = g.to(torch.promote_types(g.dtype, torch.float32)) if g.dtype in (torch.float16, torch.bfloat16) else g

    def linearise(rows):
        take = [x.index_select(0, rows) if i < n_in and batched[i] else x for i, x in enumerate(rest)]
        return _Linearised(graphs, z_star.index_select(0, rows), y_star.index_select(0, rows), take)

    def linearise_padded(rows, size):
        take = [pad_rows(x, rows, size) if i < n_in and batched[i] else x for i, x in enumerate(rest)]
        return _Linearised(graphs, pad_rows(z_star, rows, size), pad_rows(y_star, rows, size), take)

    full = _Linearised(graphs, z_star, y_star, rest)
    acfg, solver = strategy.adjoint(base)
    loops = node._compiled_solver(base)
    if loops is not None:
        ybar, _, st, work = loops.adjoint(full, g, acfg, solver, linearise_padded)
    else:
        zbar0, yb0 = full.adjoint(g)
        first = ((zbar0,), g + yb0.to(g.dtype), None)
        adj = AdjointMap(linearise, full, g)
        ybar, _, st, work = solve_eager(adj, g, solver, acfg, first=first, keep_aux=False)
        adj.account(work)
    node._cstats.update(backward_iterations=st.iterations, backward_residual=st.residual,
                        backward_status=st.status, backward_work=work)
    base.adjoint_closed = work.settled_first
    ybar = ybar.to(y_star.dtype)
    diff = graphs["diff_inputs"]
    zbar, *g_rest = full.vb(ybar)
    g_in: List[Optional[Tensor]] = [None] * n_in
    for i, gi in zip(diff, g_rest):
        g_in[i] = gi
    g_tb = list(g_rest[len(diff):])
    g_tf: List[Optional[Tensor]] = [None] * len(tf)
    if full.vf is not None:
        _, *g_rest = full.vf(zbar)
        for i, gi in zip(diff, g_rest):
            g_in[i] = gi if g_in[i] is None else g_in[i] + gi
        g_tf = list(g_rest[len(diff):])
    # the op's parameter list is body parameters then feedback parameters (buffers get none)
    n_pb = len(list(node.body.parameters())) if isinstance(node.body, nn.Module) else 0
    g_params = g_tb[:n_pb] + g_tf[:len(params) - n_pb]
    return [*g_in, *g_params]


def unrolled_op_backward(node, base: Problem, g: Tensor, z0: Tensor, inputs: Sequence[Tensor],
                         params: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """The compiled unrolled gradient: the forward solve replayed under ``torch.func.vjp`` (inside
    the op there is no autograd tape to keep), then pulled back through its iterations."""
    nb, tb = _tensors(node.body)
    nf, tf = _tensors(node.feedback)
    n_pb = len(list(node.body.parameters())) if isinstance(node.body, nn.Module) else 0
    diff = [i for i, x in enumerate(inputs) if x.is_floating_point()]

    def solve(z_init, d_inputs, d_params):
        ins = list(inputs)
        for i, x in zip(diff, d_inputs):
            ins[i] = x
        wb = list(d_params[:n_pb]) + tb[n_pb:]  # parameters, then the body's floating buffers
        wf = list(d_params[n_pb:]) + tf[len(params) - n_pb:]
        p = _functional(node, base, wb, wf).bind(ins)
        _, aux, _, _ = solve_eager(p.fmap, z_init, p.solver, p.solver_cfg)
        return T.flatten(p.y_from_aux(aux), p.yspec)

    _, pull = torch.func.vjp(solve, z0, tuple(inputs[i] for i in diff), tuple(params))
    _, g_diff, g_params = pull(g.to(z0.dtype) if g.dtype != z0.dtype else g)
    g_in: List[Optional[Tensor]] = [None] * len(inputs)
    for i, gi in zip(diff, g_diff):
        g_in[i] = gi
    return [*g_in, *g_params]


# ------------------------------------------------------------------------------------------------
# prepare(): the VJP graphs
def _vjp(f: Callable[..., Tensor], primals: Sequence[Tensor], cotangent: Tensor,
         constants: int = 0) -> Tuple[Tensor, ...]:
    """``J_f(primals)^T cotangent`` (one tensor per primal) through ``torch.autograd.grad``, for
    tracing by ``make_fx``. The last ``constants`` primals (buffers) get zeros without being
    differentiated: BatchNorm in eval mode has no derivative for its running statistics.

    Not ``torch.func.vjp``: under symbolic ``make_fx`` (torch 2.13) its decomposition of a linear
    layer on a 3-d input bakes the example shape into a ``view`` (e.g. ``[B*T, d]``), so the graph
    only runs at the example batch. Plain autograd keeps every size symbolic."""
    n_diff = len(primals) - constants
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(i < n_diff) for i, t in enumerate(primals)]
        out = f(*leaves)
        grads = (torch.autograd.grad(out, leaves[:n_diff], cotangent, allow_unused=True) if out.requires_grad
                 else (None,) * n_diff)  # the map depends on none of its arguments
    grads = (*grads, *(None,) * constants)
    return tuple(torch.zeros_like(t) if gr is None else gr for t, gr in zip(primals, grads))


@contextmanager
def _refuse_buffer_updates(node) -> Iterator[None]:
    """Raise if the body or feedback updates a buffer in place (BatchNorm's running stats in
    training mode): the traced VJP graphs would replay no update. The buffers are restored first,
    so preparing never changes the model."""
    named = [(f"{part}.{n}", b) for part in ("body", "feedback") if isinstance(getattr(node, part), nn.Module)
             for n, b in getattr(node, part).named_buffers()]
    before = [(n, b, b._version, b.detach().clone()) for n, b in named]
    changed: List[Tuple[str, Tensor, Tensor]] = []
    try:
        yield
    finally:
        changed = [(n, b, old) for n, b, v, old in before if b._version != v]
        with torch.no_grad():
            for _, b, old in changed:
                b.copy_(old)
    if changed:
        name = changed[0][0]
        owner = node.get_submodule(name.rpartition(".")[0])
        what = ("its sensitivity statistics (a SAL probe inside the cycle)" if hasattr(owner, "update_stats")
                else f"its buffer {name.rpartition('.')[2]!r}")
        raise FxWormholeError(
            f"FixedPoint {node.name!r}: {type(owner).__name__} at {name.rpartition('.')[0]!r} updates {what} in "
            "place at every evaluation in training mode, which a compiled fixed point cannot replay; call "
            "model.eval() before compiling (inference), or train this model eagerly")


def build_graphs(node, example_inputs: Sequence[Any], z0: Any) -> dict:
    """Trace the VJP graphs ``B_z^T ybar`` and ``F_y^T zbar`` with ``make_fx`` (symbolic batch),
    and register the node's solve for the compiled op."""
    p = node._problem(example_inputs, z0)
    zspec, batched = p.zspec, p.batched
    _, tb = _tensors(node.body)
    _, tf = _tensors(node.feedback)
    n_in, n_b = len(example_inputs), len(tb)
    buffers_b, buffers_f = _n_buffers(node.body), _n_buffers(node.feedback)
    with torch.no_grad(), _refuse_buffer_updates(node):
        y = node.body(z0, *example_inputs)
        if node.feedback is not None:
            node.feedback(y, *example_inputs)
    yspec = T.spec_of(y, "body output")
    p.shared.yspec = yspec
    base = node._problems[p.shared.key]
    register_entry(node, base, n_in)

    # Gradients flow to the floating-point inputs (not to integer ones such as token ids).
    diff = tuple(i for i, x in enumerate(example_inputs) if isinstance(x, Tensor) and x.is_floating_point())

    def split(rest):
        return list(rest[:n_in]), rest[n_in:n_in + n_b], rest[n_in + n_b:]

    def with_inputs(ins, diff_ins):
        for i, x in zip(diff, diff_ins):
            ins[i] = x
        return ins

    def vjp_body(zf, ybar, *rest):
        """``B^T ybar`` for (z, float inputs, body parameters)."""
        ins, tb_, tf_ = split(rest)

        def body(zz, *d):
            x, w = with_inputs(ins, d[:len(diff)]), d[len(diff):]
            return T.flatten(_functional(node, base, w, tf_).body(T.unflatten(zz, zspec), *x), yspec)
        return _vjp(body, (zf, *(ins[i] for i in diff), *tb_), ybar, buffers_b)

    def vjp_feedback(yf, zbar, *rest):
        """``F^T zbar`` for (y, float inputs, feedback parameters)."""
        ins, tb_, tf_ = split(rest)

        def feedback(yy, *d):
            x, w = with_inputs(ins, d[:len(diff)]), d[len(diff):]
            return _functional(node, base, tb_, w).run_feedback(T.unflatten(yy, yspec), x)[0]
        return _vjp(feedback, (yf, *(ins[i] for i in diff), *tf_), zbar, buffers_f)

    # make_fx keys proxies by tensor identity: every example must be a distinct tensor object.
    def fresh(t):
        return t.detach().clone() if isinstance(t, Tensor) else t

    zf = torch.randn_like(T.flatten(z0, zspec))
    yf = torch.randn_like(T.flatten(y, yspec))
    rest = [fresh(t) for t in (*example_inputs, *tb, *tf)]
    graphs = {"yspec": yspec, "zspec": zspec, "diff_inputs": diff, "batched": batched,
              "body": _loop_graph(vjp_body, (zf, yf.clone(), *rest))}
    if node.feedback is not None:
        graphs["feedback"] = _loop_graph(vjp_feedback, (yf, zf.clone(), *rest))
    return graphs


def _loop_graph(vjp: Callable, example_args: Sequence[Tensor]) -> Hoisted:
    """Trace ``vjp(primal, cotangent, *rest) -> (primal grad, *other grads)`` with a symbolic batch
    and hoist everything that does not depend on the cotangent out of the adjoint loop, which needs
    the primal's gradient only."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(vjp, tracing_mode="symbolic")(*example_args)
    return Hoisted(functionalize(gm, example_args), varying=[1], loop_outputs=1)
