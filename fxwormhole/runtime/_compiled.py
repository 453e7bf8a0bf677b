"""The compiled path of :class:`~fxwormhole.runtime.fixed_point.FixedPoint` (``torch.compile``).

What runs (facts from shared/research/torch-tooling.md section 3, torch 2.13):

* forward: ``torch.while_loop`` with early exit once no sample is active; converged samples are
  frozen by ``torch.where`` (shapes are fixed); ``tol`` is a 0-d tensor; ``check_every=k``
  unrolls k evaluations per loop trip (one residual check, i.e. one host sync on GPU, per trip).
  The solver is the configured one, except Anderson, which falls back to the damped iteration
  (see :func:`compiled_config`): iteration counts then differ from eager, the fixed point does not.
* backward (implicit mode): an ``autograd.Function`` whose backward runs a second ``while_loop``
  over VJP graphs of body and feedback built ONCE, eagerly, by ``make_fx`` in ``prepare()``
  (autodiff calls inside a while_loop body do not trace), then one ``torch.func.vjp`` per
  module for parameter and input gradients. Adjoint stats are not recorded (a compiled backward
  cannot write Python state).
* phantom / jfb: no-grad while_loop solve, then the differentiable steps (plain autograd).
* unrolled: not supported under compile (native while_loop autograd is BPTT and is silently
  wrong when the initial carry does not require grad); use it eagerly.

Compile with ``torch.compile(model, fullgraph=True, options={"inplace_buffers": False})``: Inductor's
in-place buffer reuse overwrites loop-invariant inputs of the backward while_loop (it mutated a
Parameter in the research repro).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError, FxWormholeError
from . import _tree as T
from ._loop import solve_compiled
from ._problem import Problem
from .solvers import make_solver


def _tensors(module: Any) -> Tuple[List[str], List[Tensor]]:
    """Floating-point parameters and buffers, passed explicitly so gradients and updates flow."""
    if not isinstance(module, nn.Module):
        return [], []
    named = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    return [n for n, _ in named], [t for _, t in named]


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


def compiled_config(cfg):
    """The solver that runs under compile: Anderson's ``linalg.solve`` inside a while_loop body
    fails to lower in Inductor 2.13 ("Unexpected fake buffer"), so it falls back to the damped
    iteration with the same damping (plain Picard at damping 1); other solvers run as configured."""
    return replace(cfg, name="damped") if cfg.name == "anderson" else cfg


def _solve(p: Problem, z0: Tensor, cfg=None):
    cfg = compiled_config(cfg or p.solver_cfg)
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
        out = _CompiledImplicit.apply(node, z0f, len(inputs), len(tb), tuple(batched), zspec, *inputs, *tb, *tf)
        ny = len(out) - 3
        aux, (iters, res, status) = out[:ny], out[ny:]
        is_tuple = node._graphs["yspec"].is_tuple
    elif need_grad and mode == "unrolled":
        raise ConfigError(f"FixedPoint {node.name!r}: grad='unrolled' is eager-only; use 'implicit' under torch.compile")
    else:
        p = _problem(node, inputs, batched, zspec, tb, tf)
        with torch.no_grad():
            _, aux, iters, res, status = _solve(p, z0f)
        is_tuple = p.yspec.is_tuple
        if need_grad:  # phantom / jfb: k differentiable steps from the detached solution
            y = T.flatten(tuple(aux), p.yspec)
            k, tau = (1, 1.0) if mode == "jfb" else (node.grad_config.k, node.grad_config.tau)
            for _ in range(k):
                y = torch.lerp(y, p.output_map(y), tau)
            aux = T.leaves(T.unflatten(y, p.yspec))
    node._cstats.update(iterations=iters, residual=res, status=status)
    return tuple(aux) if is_tuple else aux[0]


class _CompiledImplicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, node, z0, n_in, n_b, batched, zspec, *rest):
        ins, tb, tf = rest[:n_in], rest[n_in:n_in + n_b], rest[n_in + n_b:]
        p = _problem(node, ins, batched, zspec, tb, tf)
        x, aux, iters, res, status = _solve(p, z0)
        ctx.node, ctx.n_in, ctx.n_b, ctx.n_y, ctx.batched, ctx.zspec = node, n_in, n_b, len(aux), batched, zspec
        ctx.save_for_backward(x, *aux, *rest)
        ctx.mark_non_differentiable(iters, res, status)
        return (*aux, iters, res, status)

    @staticmethod
    def backward(ctx, *grads):
        node, n_in, n_b, n_y, zspec = ctx.node, ctx.n_in, ctx.n_b, ctx.n_y, ctx.zspec
        saved = ctx.saved_tensors
        x, aux, rest = saved[0], saved[1:1 + n_y], saved[1 + n_y:]
        ins, tb, tf = rest[:n_in], rest[n_in:n_in + n_b], rest[n_in + n_b:]
        graphs = node._graphs
        yspec = graphs["yspec"]
        gy = tuple(torch.zeros_like(a) if g is None else g for g, a in zip(grads[:n_y], aux))
        g = T.flatten(gy, yspec).clone()  # HOP inputs must not alias saved tensors
        yflat = T.flatten(tuple(aux), yspec)
        vb, vf = graphs["body"], graphs.get("feedback")

        def adj(ybar):
            zbar = vb(x, ybar, *ins, *tb, *tf)
            ynext = g + (vf(yflat, zbar, *ins, *tb, *tf) if vf is not None else zbar)
            return (zbar,), ynext, None

        gcfg = node.grad_config
        acfg = compiled_config(replace(node.solver_config, name=gcfg.solver, tol=gcfg.tol, max_iter=gcfg.max_iter))
        y0 = torch.zeros_like(g) + g  # a fresh carry, distinct from the closed-over g
        ybar, (zbar,), _, _, _ = solve_compiled(adj, y0, make_solver(acfg), acfg, tol=acfg.tol,
                                                max_iter=acfg.max_iter, first=adj(y0))
        p = _problem(node, ins, ctx.batched, zspec, tb, tf)
        p.yspec = yspec

        def body_flat(ins_, tb_):
            q = _problem(node, ins_, ctx.batched, zspec, tb_, tf)
            return T.flatten(q.body(T.unflatten(x, zspec), *ins_), yspec)

        _, pull = torch.func.vjp(body_flat, tuple(ins), tuple(tb))
        g_in, g_tb = pull(ybar.to(yflat.dtype))
        g_tf: Tuple[Any, ...] = tuple(None for _ in tf)
        if node.feedback is not None:
            def fb_flat(ins_, tf_):
                q = _problem(node, ins_, ctx.batched, zspec, tb, tf_)
                return q.run_feedback(T.unflatten(yflat, yspec), ins_)[0]

            _, pull = torch.func.vjp(fb_flat, tuple(ins), tuple(tf))
            g_in_f, g_tf = pull(zbar)
            g_in = tuple(a + b for a, b in zip(g_in, g_in_f))
        return (None, None, None, None, None, None, *g_in, *g_tb, *g_tf)


def build_graphs(node, example_inputs: Sequence[Any], z0: Any) -> dict:
    """Trace the VJP graphs ``B_z^T ybar`` and ``F_y^T zbar`` with ``make_fx`` (symbolic batch)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    zspec = T.spec_of(z0)
    batched = T.batched_mask(example_inputs, T.batch_size(z0), node.batched)
    nb, tb = _tensors(node.body)
    nf, tf = _tensors(node.feedback)
    n_in, n_b = len(example_inputs), len(tb)
    with torch.no_grad():
        y = node.body(z0, *example_inputs)
    yspec = T.spec_of(y, "body output")

    def split(rest):
        return rest[:n_in], rest[n_in:n_in + n_b], rest[n_in + n_b:]

    def vjp_body(zf, ybar, *rest):
        ins, tb_, tf_ = split(rest)
        p = _problem(node, ins, batched, zspec, tb_, tf_)
        f = lambda zz: T.flatten(p.body(T.unflatten(zz, zspec), *ins), yspec)
        return torch.func.vjp(f, zf)[1](ybar)[0]

    def vjp_feedback(yf, zbar, *rest):
        ins, tb_, tf_ = split(rest)
        p = _problem(node, ins, batched, zspec, tb_, tf_)
        f = lambda yy: p.run_feedback(T.unflatten(yy, yspec), ins)[0]
        return torch.func.vjp(f, yf)[1](zbar)[0]

    # make_fx keys proxies by tensor identity: every example must be a distinct tensor object.
    def fresh(t):
        return t.detach().clone() if isinstance(t, Tensor) else t

    zf = torch.randn_like(T.flatten(z0, zspec))
    yf = torch.randn_like(T.flatten(y, yspec))
    rest = [fresh(t) for t in (*example_inputs, *tb, *tf)]
    graphs = {"yspec": yspec, "zspec": zspec,
              "body": make_fx(vjp_body, tracing_mode="symbolic")(zf, yf.clone(), *rest)}
    if node.feedback is not None:
        graphs["feedback"] = make_fx(vjp_feedback, tracing_mode="symbolic")(yf, zf.clone(), *rest)
    return graphs
