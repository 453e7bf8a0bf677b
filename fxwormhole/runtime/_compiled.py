"""The compiled path of :class:`~fxwormhole.runtime.fixed_point.FixedPoint` (``torch.compile``).

What runs (facts from shared/research/torch-tooling.md section 3, torch 2.13):

* forward: ``torch.while_loop`` with early exit once no sample is active; converged samples are
  frozen by ``torch.where`` (shapes are fixed); ``tol`` is a 0-d tensor; ``check_every=k``
  unrolls k evaluations per loop trip (one residual check, i.e. one host sync on GPU, per trip).
  The solver is the configured one; Anderson solves its small system by an unrolled Cholesky
  (``solvers.spd_solve_unrolled``), because ``linalg.solve`` inside a while_loop body does not
  lower in Inductor 2.13.
* gradients (implicit mode): the solve runs under ``no_grad``, outside any ``autograd.Function``.
  An identity Function on ``y*`` turns the incoming cotangent ``g`` into the adjoint solution
  ``ybar = g + F_y^T B_z^T ybar`` with a second ``while_loop``, then returns the input and
  parameter gradients. Both use VJP graphs of body and feedback built ONCE, eagerly, by
  ``make_fx`` in ``prepare()`` (autodiff calls inside a while_loop body do not trace), with the
  forward at ``z*`` hoisted out of the loop (``_hoist.py``). Dynamo sees no solver state and no
  symbolic sizes crossing the Function (a solve inside it made dynamo return every body
  intermediate from the Function and specialise the batch size). Adjoint stats are not recorded
  (a compiled backward cannot write Python state).
* phantom / jfb: the same no-grad solve, then k damped differentiable steps.
* unrolled: not supported under compile (native while_loop autograd is BPTT and is silently
  wrong when the initial carry does not require grad); use it eagerly.

Compile with ``torch.compile(model, fullgraph=True, options={"inplace_buffers": False})``: Inductor's
in-place buffer reuse overwrites loop-invariant inputs of the backward while_loop (it mutated a
Parameter in the research repro).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError, FxWormholeError
from . import _tree as T
from ._hoist import Hoisted, functionalize
from ._loop import solve_compiled
from ._problem import Problem
from .solvers import make_solver


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


def _problem(node, inputs, batched, zspec, tb, tf) -> Problem:
    nb, _ = _tensors(node.body)
    nf, _ = _tensors(node.feedback)
    return Problem(_bind(node.body, nb, tb), _bind(node.feedback, nf, tf), inputs, batched, zspec,
                   node.solver_config, node.grad_config, node.name, node.on_fail)


def _solve(p: Problem, z0: Tensor):
    cfg = p.solver_cfg
    full = lambda x: p.fmap(x, None)
    return solve_compiled(full, z0, make_solver(cfg), cfg, tol=cfg.tol, max_iter=cfg.max_iter, first=full(z0))


def compiled_forward(node, inputs: Sequence[Any], z0: Any, zspec: T.Spec, batched: Sequence[bool]):
    _, tb = _tensors(node.body)
    _, tf = _tensors(node.feedback)
    z0f = T.flatten(z0, zspec)
    mode = node.grad_config.mode
    need_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in [*tb, *tf, *(x for x in inputs if isinstance(x, Tensor))])
    if need_grad and mode == "implicit":
        if node._graphs is None:
            raise FxWormholeError(
                f"FixedPoint {node.name!r}: the compiled implicit backward needs VJP graphs built eagerly; "
                "run one eager forward and call .prepare(), or call .prepare(*example_inputs) before torch.compile")
        if not all(isinstance(x, Tensor) for x in inputs):
            raise ConfigError(f"FixedPoint {node.name!r}: compiled training needs tensor inputs only")
    if need_grad and mode == "unrolled":
        raise ConfigError(f"FixedPoint {node.name!r}: grad='unrolled' is eager-only; use 'implicit' under torch.compile")
    p = _problem(node, inputs, batched, zspec, tb, tf)
    with torch.no_grad():
        z_star, aux, iters, res, status = _solve(p, z0f)
    if need_grad:
        y_star = T.flatten(tuple(aux), p.yspec)
        if mode == "implicit":
            # The solve stays outside the autograd.Function, whose forward is the identity: dynamo
            # then sees no solver state and no symbolic sizes crossing it.
            y = _ImplicitAdjoint.apply(node, y_star, z_star, len(inputs), len(tb), *inputs, *tb, *tf)
        else:  # phantom / jfb: k damped differentiable steps from the detached solution
            y = y_star
            k, tau = (1, 1.0) if mode == "jfb" else (node.grad_config.k, node.grad_config.tau)
            for _ in range(k):
                y = torch.lerp(y, p.output_map(y), tau)
        aux = T.leaves(T.unflatten(y, p.yspec))
    is_tuple = p.yspec.is_tuple
    node._cstats.update(iterations=iters, residual=res, status=status)
    return tuple(aux) if is_tuple else aux[0]


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on the flat solution ``y*``. Its backward solves the adjoint fixed point
    ``ybar = g + F_y^T B_z^T ybar`` in a ``while_loop`` over the hoisted VJP graphs, then returns
    ``B_(x,theta)^T ybar + F_(x,phi)^T zbar`` for the inputs and parameters."""

    @staticmethod
    def forward(ctx, node, y_star, z_star, n_in, n_b, *rest):
        ctx.node, ctx.n_in, ctx.n_b = node, n_in, n_b
        ctx.save_for_backward(z_star, y_star, *rest)
        return y_star.view_as(y_star)

    @staticmethod
    def backward(ctx, g):
        node, n_in, n_b = ctx.node, ctx.n_in, ctx.n_b
        z_star, y_star, *rest = ctx.saved_tensors
        graphs = node._graphs
        # The linearisations at z* and y* are computed once; the loop runs only the transposes.
        vb = graphs["body"].bind(z_star, *rest)
        vf = graphs["feedback"].bind(y_star, *rest) if "feedback" in graphs else None
        g = g.clone()  # HOP inputs must not alias saved tensors

        def adj(ybar):
            zbar = vb.loop(ybar)
            ynext = g + (vf.loop(zbar) if vf is not None else zbar)
            return (), ynext, None

        gcfg = node.grad_config
        acfg = replace(node.solver_config, name=gcfg.solver, tol=gcfg.tol, max_iter=gcfg.max_iter)
        y0 = torch.zeros_like(g) + g  # a fresh carry, distinct from the closed-over g
        ybar = solve_compiled(adj, y0, make_solver(acfg), acfg, tol=acfg.tol, max_iter=acfg.max_iter,
                              first=adj(y0))[0].to(g.dtype)

        diff = graphs["diff_inputs"]
        g_in: List[Optional[Tensor]] = [None] * n_in
        zbar, *g_rest = vb(ybar)
        for i, gi in zip(diff, g_rest):
            g_in[i] = gi
        g_tb, g_tf = g_rest[len(diff):], [None] * (len(rest) - n_in - n_b)
        if vf is not None:
            _, *g_rest = vf(zbar)
            for i, gi in zip(diff, g_rest):
                g_in[i] = g_in[i] + gi
            g_tf = g_rest[len(diff):]
        return (None, None, None, None, None, *g_in, *g_tb, *g_tf)


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
    training mode): the traced VJP graphs would replay no update and the while_loop cannot make
    one. The buffers are restored first, so preparing never changes the model."""
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
    """Trace the VJP graphs ``B_z^T ybar`` and ``F_y^T zbar`` with ``make_fx`` (symbolic batch)."""
    zspec = T.spec_of(z0)
    batched = T.batched_mask(example_inputs, T.batch_size(z0), node.batched)
    _, tb = _tensors(node.body)
    _, tf = _tensors(node.feedback)
    n_in, n_b = len(example_inputs), len(tb)
    buffers_b, buffers_f = _n_buffers(node.body), _n_buffers(node.feedback)
    with torch.no_grad(), _refuse_buffer_updates(node):
        y = node.body(z0, *example_inputs)
        if node.feedback is not None:
            node.feedback(y, *example_inputs)
    yspec = T.spec_of(y, "body output")

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
            return T.flatten(_problem(node, x, batched, zspec, w, tf_).body(T.unflatten(zz, zspec), *x), yspec)
        return _vjp(body, (zf, *(ins[i] for i in diff), *tb_), ybar, buffers_b)

    def vjp_feedback(yf, zbar, *rest):
        """``F^T zbar`` for (y, float inputs, feedback parameters)."""
        ins, tb_, tf_ = split(rest)

        def feedback(yy, *d):
            x, w = with_inputs(ins, d[:len(diff)]), d[len(diff):]
            return _problem(node, x, batched, zspec, tb_, w).run_feedback(T.unflatten(yy, yspec), x)[0]
        return _vjp(feedback, (yf, *(ins[i] for i in diff), *tf_), zbar, buffers_f)

    # make_fx keys proxies by tensor identity: every example must be a distinct tensor object.
    def fresh(t):
        return t.detach().clone() if isinstance(t, Tensor) else t

    zf = torch.randn_like(T.flatten(z0, zspec))
    yf = torch.randn_like(T.flatten(y, yspec))
    rest = [fresh(t) for t in (*example_inputs, *tb, *tf)]
    graphs = {"yspec": yspec, "zspec": zspec, "diff_inputs": diff,
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
