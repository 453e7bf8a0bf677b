r"""Gradient strategies for fixed-point nodes (swappable, like optimistix's ``AbstractAdjoint``).

Each strategy is ONE object that owns a node's forward solve and its backward, eagerly and under
``torch.compile`` (:meth:`GradStrategy.eager`, :meth:`GradStrategy.compiled`), with the same
settings on both paths.

Notation: ``y = B(z, x)`` is the body, ``z' = F(y, x)`` the feedback (identity when absent), the
solution satisfies ``z* = F(B(z*, x), x)`` and the node outputs ``y* = B(z*, x)``. With
``g = dL/dy*``:

* :class:`ImplicitGrad` (default), the *output-cotangent* adjoint. Differentiating
  ``y* = B(z*)``, ``z* = F(y*)`` gives ``dy* = (I - B_z F_y)^{-1} (B_theta + B_z F_theta) dtheta``,
  so with ``ybar = (I - B_z F_y)^{-T} g`` and ``zbar = B_z^T ybar``::

      ybar = g + F_y^T zbar,    zbar = B_z^T ybar,
      dL/dtheta_B = B_theta^T ybar,   dL/dtheta_F = F_theta^T zbar,   dL/dx = B_x^T ybar + F_x^T zbar.

  It is solved by iterating ``ybar_0 = g``; ``zbar_k = B_z^T ybar_k`` (one VJP through the body);
  ``ybar_{k+1} = g + F_y^T zbar_k`` (one VJP through the feedback), until
  ``||ybar_{k+1} - ybar_k|| / (||ybar_{k+1}|| + eps) <= tol`` per sample; the gradients come from
  the VJPs at the solution. A zero feedback Jacobian converges at k = 0: exactly one VJP through
  body and one through feedback, i.e. ordinary backprop. Without feedback it is the usual adjoint
  ``w = J_f^T w + g``. Per-sample halting applies to the adjoint as to the forward: a sample
  leaves the active set when its adjoint converged, and once the active set is at most half the
  rows the linearisation is taken again on the remaining rows only.
* :class:`PhantomGrad` ``(k, tau)``: ``k`` damped steps ``y <- (1 - tau) y + tau h(y)`` of the output
  map ``h = B o F`` from the detached ``y*``, differentiated by autograd (TorchDEQ's ``grad=k``;
  without feedback ``h = f`` and ``y = z``).
* :class:`JFBGrad`: one undamped step, ``PhantomGrad(1, 1.0)`` (Jacobian-free backprop).
* :class:`UnrolledGrad`: backprop through the actual forward iterations (reference / fallback;
  memory grows with the iteration count).

Your own mode: subclass :class:`GradStrategy`, implement :meth:`~GradStrategy.attach` (a
differentiable function of the detached solution, run as is eagerly and traced under compile),
and optionally :func:`register_grad` it under a name for ``FixedPoint(grad="name")``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, fx, nn

from ..config import GRAD_MODES, GradConfig, SolverConfig, coerce_grad
from ..errors import ConfigError
from . import _tree as T
from ._loop import AdjointMap, solve_eager
from ._problem import Problem, check_no_hidden_leaves
from .solvers import FixedPointSolver, make_solver
from .stats import FixedPointStats

__all__ = ["GradStrategy", "ImplicitGrad", "PhantomGrad", "JFBGrad", "UnrolledGrad", "make_grad",
           "register_grad", "available_grads"]


class GradStrategy:
    """How a fixed-point node is solved and differentiated, eagerly and compiled.

    The default implementation solves without a tape and hands the detached flat solution
    ``y*`` to :meth:`attach`, whose result must be a differentiable function of it (and of the
    node's inputs and parameters through ``p.output_map`` / ``p.body``). Both paths call the same
    :meth:`attach`, so compiled and eager gradients agree by construction.
    """

    mode = "base"

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> Optional[GradConfig]:
        """The equivalent :class:`GradConfig` (None for a mode it cannot express)."""
        return GradConfig(mode=self.mode) if self.mode in GRAD_MODES else None

    def attach(self, p: Problem, y_star: Tensor) -> Tensor:
        """The node's differentiable output from the detached flat solution ``y_star``."""
        raise NotImplementedError(f"{type(self).__name__} defines no attach(problem, y_star)")

    # ------------------------------------------------------------------ eager
    def eager(self, p: Problem, z0: Tensor) -> Tuple[Any, FixedPointStats]:
        """Eager forward: ``(y, stats)``. Without a gradient to form it solves and returns."""
        targets = p.targets() if torch.is_grad_enabled() else []
        # strict_targets (functional API): f may close over tensors, so tape and check even then
        if not targets and not (p.strict_targets and torch.is_grad_enabled()):
            with torch.no_grad():
                _, aux, st, work = p.solve(z0, keep_aux=True)
            p.report(st, "forward", work)
            return p.y_from_aux(aux), p.make_stats(st, work)
        return self.train_forward(p, z0, targets)

    __call__ = eager

    def train_forward(self, p: Problem, z0: Tensor, targets: List[Tensor]) -> Tuple[Any, FixedPointStats]:
        with torch.no_grad():
            _, aux, st, work = p.solve(z0, keep_aux=True)
        p.report(st, "forward", work)
        y = self.attach(p, T.flatten(p.y_from_aux(aux), p.yspec))
        return T.unflatten(y, p.yspec), p.make_stats(st, work)

    # ------------------------------------------------------------------ compiled
    def compiled(self, node, p: Problem, z0: Tensor, need_grad: bool) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Traced forward under ``torch.compile``: ``(flat y, (iterations, residual, status))``."""
        from ._compiled import solve_op
        y, _, stats = solve_op(node, p, z0, differentiable=False)
        if need_grad:
            y = self.attach(p, y)
        return y, stats


class ImplicitGrad(GradStrategy):
    """Implicit (adjoint) gradient in the output-cotangent form; see the module docstring.

    Args:
        solver, tol, max_iter: the adjoint solve (``GradConfig.solver/tol/max_iter``).

    Forward when training: one evaluation is taped, where the gradient needs it. A node that
    settled at evaluation 1 last time (closed wormholes) tapes its first evaluation, which is
    then the gradient tape: forward and backward cost one body and one feedback call. Otherwise
    the solve runs untaped and one evaluation is taped at ``z*``. A wrong guess costs one
    evaluation, once.
    """

    mode = "implicit"

    def __init__(self, solver: str = "picard", tol: float = 1e-6, max_iter: int = 50) -> None:
        self.solver, self.tol, self.max_iter = solver, float(tol), int(max_iter)

    @property
    def config(self) -> GradConfig:
        return GradConfig(mode="implicit", solver=self.solver, tol=self.tol, max_iter=self.max_iter)

    def adjoint(self, p: Problem) -> Tuple[SolverConfig, FixedPointSolver]:
        """The adjoint solve's config and solver (built once per node)."""
        key = ("adjoint", self.solver, self.tol, self.max_iter)
        if key not in p.shared.cache:
            cfg = replace(p.solver_cfg, name=self.solver, tol=self.tol, max_iter=self.max_iter, check_every=1)
            p.shared.cache[key] = (cfg, make_solver(cfg))
        return p.shared.cache[key]

    def train_forward(self, p: Problem, z0: Tensor, targets: List[Tensor]):
        tape = _Tape(p, z0) if p.closed or p.strict_targets else None
        if p.strict_targets:
            check_no_hidden_leaves([*tape.y, tape.fz], [tape.z_leaf, *tape.y_leaf, *tape.bind(targets)])
        with torch.no_grad():
            z_star, _, st, work = p.solve(z0, first=tape.first() if tape is not None else None, keep_aux=False)
        p.closed = work.settled_first
        if not p.closed:
            tape = _Tape(p, z_star)  # the solve moved: tape one evaluation at z*
        elif tape is None:
            tape = _Tape(p, z0)  # it settled at once after all: that evaluation is the tape
        stats = p.make_stats(st, work)
        p.report(st, "forward", work)
        tape.bind(targets)
        ys = _ImplicitFn.apply(self, tape, stats, *targets)
        return (ys if tape.yspec.is_tuple else ys[0]), stats

    def compiled(self, node, p: Problem, z0: Tensor, need_grad: bool):
        from ._compiled import solve_op
        y, _, stats = solve_op(node, p, z0, differentiable=need_grad)
        return y, stats

    def op_backward(self, node, p: Problem, g: Tensor, points: Tuple[Tensor, Tensor, Tensor], inputs, params):
        """The compiled op's backward: the same adjoint over the prepared VJP graphs
        (``points = (z0, z*, y*)``)."""
        from ._compiled import implicit_op_backward
        return implicit_op_backward(self, node, p, g, points[1], points[2], inputs, params)


class PhantomGrad(GradStrategy):
    """``k`` damped steps of ``h = body o feedback`` from the detached ``y*`` (TorchDEQ ``grad=k``)."""

    mode = "phantom"

    def __init__(self, k: int = 5, tau: float = 0.6) -> None:
        self.k, self.tau = int(k), float(tau)

    @property
    def config(self) -> GradConfig:
        return GradConfig(mode=self.mode, k=self.k, tau=self.tau)

    def attach(self, p: Problem, y_star: Tensor) -> Tensor:
        y = y_star
        for _ in range(self.k):
            h = p.output_map(y)
            y = h if self.tau == 1.0 else torch.lerp(y, h, self.tau)
        return y


class JFBGrad(PhantomGrad):
    """One undamped step from the detached solution (Jacobian-free backprop)."""

    mode = "jfb"

    def __init__(self) -> None:
        super().__init__(k=1, tau=1.0)

    @property
    def config(self) -> GradConfig:
        return GradConfig(mode="jfb", k=1, tau=1.0)


class UnrolledGrad(GradStrategy):
    """Backprop through the actual forward iterations (memory grows with iterations)."""

    mode = "unrolled"

    def train_forward(self, p: Problem, z0: Tensor, targets: List[Tensor]):
        _, aux, st, work = p.solve(z0.detach(), keep_aux=True)
        p.report(st, "forward", work)
        return p.y_from_aux(aux), p.make_stats(st, work)

    def compiled(self, node, p: Problem, z0: Tensor, need_grad: bool):
        from ._compiled import solve_op
        y, _, stats = solve_op(node, p, z0, differentiable=need_grad)
        return y, stats

    def op_backward(self, node, p: Problem, g: Tensor, points: Tuple[Tensor, Tensor, Tensor], inputs, params):
        """The compiled op's backward: the forward iterations replayed and pulled back."""
        from ._compiled import unrolled_op_backward
        return unrolled_op_backward(node, p, g, points[0], inputs, params)



# ------------------------------------------------------------------------------------------------
# eager implicit machinery
class _Tape:
    """One taped evaluation at ``z`` (on the samples ``rows``; None = all): ``z_leaf -> y ->
    (y_leaf) -> fz``. The body is taped from a detached leaf and the feedback from a detached copy
    of ``y``, so VJPs give partial derivatives (``B_z``, ``B_theta``, ``F_y``, ``F_theta``), never
    total ones."""

    def __init__(self, p: Problem, z: Tensor, rows: Optional[Tensor] = None) -> None:
        self.p, self.rows = p, rows
        self.wrt: List[Tensor] = []  # what VJPs differentiate against: targets, inputs as leaves
        # An integer state (a float model called with integer input) cannot require grad; left as it is,
        # the body raises the dtype error the original model raises (issue 13 row 8).
        self.z_leaf = z.detach().requires_grad_(z.is_floating_point() or z.is_complex())
        ins = p.inputs_for(rows)
        if rows is None:
            # Inputs become detached leaves: differentiating the live inputs would follow them
            # upstream and add total derivatives (e.g. through an earlier node sharing parameters).
            self.inputs = tuple(x.detach().requires_grad_(True) if isinstance(x, Tensor) and x.requires_grad else x
                                for x in ins)
            self._leaf_of = {id(x): leaf for x, leaf in zip(ins, self.inputs) if leaf is not x}
        else:  # a re-linearisation for the adjoint iterations only: no input gradients wanted
            self.inputs = tuple(x.detach() if isinstance(x, Tensor) else x for x in ins)
            self._leaf_of = {}
        with torch.enable_grad():
            y = p.run_body(self.z_leaf, self.inputs)
            self.yspec = p.yspec
            self.y = T.leaves(y)
            if p.feedback is None:
                self.y_leaf: Tuple[Tensor, ...] = ()
                self.fz, self.scale = T.flatten(y, p.zspec), None
            else:
                self.y_leaf = tuple(t.detach().requires_grad_(True) for t in self.y)
                y_in = self.y_leaf if self.yspec.is_tuple else self.y_leaf[0]
                self.fz, self.scale = p.run_feedback(y_in, self.inputs)

    def bind(self, targets: Sequence[Tensor]) -> List[Tensor]:
        """Record the gradient targets; inputs among them are differentiated through their leaves."""
        self.wrt = [self._leaf_of.get(id(t), t) for t in targets]
        return self.wrt

    def first(self):
        return tuple(t.detach() for t in self.y), self.fz.detach(), self.scale

    def body_vjp(self, ybar: Tensor, wrt: Sequence[Tensor]) -> Tuple[Optional[Tensor], ...]:
        cot = [c.to(t.dtype) for c, t in zip(T.leaves(T.unflatten(ybar, self.yspec)), self.y)]
        pairs = [(t, c) for t, c in zip(self.y, cot) if t.requires_grad]
        if not pairs:
            return (None,) * len(wrt)
        return torch.autograd.grad([t for t, _ in pairs], list(wrt), [c for _, c in pairs],
                                   retain_graph=True, allow_unused=True)

    def feedback_vjp(self, zbar: Tensor, wrt: Sequence[Tensor]) -> Tuple[Optional[Tensor], ...]:
        if not self.fz.requires_grad:
            return (None,) * len(wrt)
        return torch.autograd.grad([self.fz], list(wrt), [zbar.to(self.fz.dtype)], retain_graph=True,
                                   allow_unused=True)

    def adjoint(self, ybar: Tensor, targets: Sequence[Tensor] = ()):
        """``(zbar, F_y^T zbar, body target grads, feedback target grads)`` for cotangent ``ybar``."""
        if not targets and self.p.plain and self.y[0].requires_grad and ybar.dtype == self.y[0].dtype:
            zbar = torch.autograd.grad(self.y[0], self.z_leaf, ybar, retain_graph=True, allow_unused=True)[0]
            zbar = torch.zeros_like(self.z_leaf) if zbar is None else zbar
            return zbar, zbar, [], []
        n = len(targets)
        zb, *tb = self.body_vjp(ybar, (self.z_leaf, *targets))
        zbar = torch.zeros_like(self.z_leaf) if zb is None else zb
        if self.p.feedback is None:
            return zbar, zbar, tb, [None] * n
        out = self.feedback_vjp(zbar, (*self.y_leaf, *targets))
        yb, tf = out[: len(self.y_leaf)], out[len(self.y_leaf):]
        yb = tuple(torch.zeros_like(l) if b is None else b for b, l in zip(yb, self.y_leaf))
        return zbar, T.flatten(yb if self.yspec.is_tuple else yb[0], self.yspec), tb, list(tf)


def _replayable(p: Problem) -> bool:
    """Whether the body and feedback can be evaluated again on fewer rows in the backward (to
    linearise on the samples still iterating) with the same linearisation and no side effect: not
    when a module in training mode keeps statistics (BatchNorm, SAL probes would count the extra
    evaluation) or draws random numbers (dropout would draw another mask)."""
    for f in (p.body, p.feedback):
        if not isinstance(f, nn.Module):
            continue
        for m in f.modules():
            if not m.training:
                continue
            if isinstance(m, nn.modules.dropout._DropoutNd) or any(b is not None for b in m._buffers.values()):
                return False
            if isinstance(m, fx.GraphModule) and any(
                    n.op == "call_function" and any(w in str(n.target) for w in _RANDOM) for n in m.graph.nodes):
                return False
    return True


_RANDOM = ("dropout", "bernoulli", "rand", "normal", "multinomial")


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    return a if b is None else a + b


def cotangent(gys: Sequence[Optional[Tensor]], like: Sequence[Tensor], yspec: T.Spec) -> Tensor:
    """The flat upstream gradient, at least float32 for half-precision outputs."""
    g = T.flatten(tuple(torch.zeros_like(y) if gy is None else gy for gy, y in zip(gys, like)), yspec)
    return g.to(torch.promote_types(g.dtype, torch.float32)) if g.dtype in (torch.float16, torch.bfloat16) else g


class _ImplicitFn(torch.autograd.Function):
    """Output node of the eager implicit mode: forward hands out the taped ``y*``; backward solves
    the output-cotangent adjoint on the tape and returns gradients for every target."""

    @staticmethod
    def forward(ctx, strategy: ImplicitGrad, tape: _Tape, stats: FixedPointStats, *targets: Tensor):
        ctx.strategy, ctx.tape, ctx.stats = strategy, tape, stats
        # copies: the caller may update y* in place (torchvision's Hardswish(inplace=True) after the
        # source layer), and the tape's VJPs need the values it saved (the feedback's input, y itself)
        return tuple(t.detach().clone() for t in tape.y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gys: Tensor):
        strategy, tape, stats = ctx.strategy, ctx.tape, ctx.stats
        ctx.tape = None  # free the taped evaluation after this backward
        p, targets = tape.p, tape.wrt
        g = cotangent(gys, tape.y, tape.yspec)
        acfg, solver = strategy.adjoint(p)
        one = p.adjoint_closed  # last time the adjoint settled at once: take the gradients with it
        with torch.enable_grad():
            zbar0, yb0, tb, tf = tape.adjoint(g, targets if one else ())
            relinearise = (lambda rows: _Tape(p, tape.z_leaf.detach().index_select(0, rows), rows)) if _replayable(p) else None
            adj = AdjointMap(relinearise, tape, g)
            ybar, aux, st, work = solve_eager(adj, g, solver, acfg, first=((zbar0,), g + yb0.to(g.dtype), None))
            adj.account(work)
            if not (one and work.settled_first):
                adj.lin = None  # drop a re-linearisation before the full-batch products
                zbar = aux[0]
                tb = list(tape.body_vjp(ybar, targets))
                tf = list(tape.feedback_vjp(zbar, targets)) if p.feedback is not None else [None] * len(targets)
        p.adjoint_closed = work.settled_first
        stats.set_backward(st)
        stats.extra["backward_work"] = work
        p.report(st, "backward (adjoint)", work)
        grads = [_add(a, b) for a, b in zip(tb, tf)]
        return (None, None, None, *grads)


# ------------------------------------------------------------------------------------------------
# registry
_GRADS: Dict[str, Callable[[], GradStrategy]] = {}


def register_grad(name: str, factory: Callable[[], GradStrategy], *, overwrite: bool = False) -> Callable[[], GradStrategy]:
    """Register a :class:`GradStrategy` class or factory under ``name`` for ``FixedPoint(grad=name)``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"register_grad: name={name!r} is invalid: expected a non-empty string")
    if not callable(factory):
        raise ConfigError(f"register_grad({name!r}): {factory!r} is not a class or factory")
    if (name in _GRADS or name in GRAD_MODES) and not overwrite:
        raise ConfigError(f"register_grad: a gradient mode named {name!r} already exists; pass overwrite=True")
    _GRADS[name] = factory
    return factory


def available_grads() -> Tuple[str, ...]:
    return tuple(sorted({*GRAD_MODES, *_GRADS}))


def make_grad(grad: Any) -> GradStrategy:
    """A :class:`GradStrategy` from a mode name (built-in or registered), a :class:`GradConfig`
    or a strategy instance."""
    if isinstance(grad, GradStrategy):
        return grad
    if isinstance(grad, str) and grad in _GRADS:
        made = _GRADS[grad]()
        if not isinstance(made, GradStrategy):
            raise ConfigError(f"gradient mode {grad!r} built {made!r}, which is not a GradStrategy")
        return made
    if isinstance(grad, str) and grad not in GRAD_MODES:
        raise ConfigError(f"grad={grad!r} is invalid: expected one of {available_grads()}, a GradConfig "
                          "or a GradStrategy (register your own with fxwormhole.runtime.gradients.register_grad)")
    cfg: GradConfig = coerce_grad(grad)
    if cfg.mode == "implicit":
        return ImplicitGrad(cfg.solver, cfg.tol, cfg.max_iter)
    if cfg.mode == "phantom":
        return PhantomGrad(cfg.k, cfg.tau)
    if cfg.mode == "jfb":
        return JFBGrad()
    return UnrolledGrad()
