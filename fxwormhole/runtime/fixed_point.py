"""The fixed-point runtime node.

``FixedPoint(body, feedback)`` solves ``z* = feedback(body(z*, *inputs), *inputs)`` per sample and
returns ``y* = body(z*, *inputs)``, the values the rest of the network consumes. Without feedback
this is the usual ``z* = body(z*, *inputs)``. See ``docs/fixed_point.md`` for the maths.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..config import GRAD_MODES, ON_FAIL, GradConfig, SolverConfig, coerce_grad, coerce_solver
from ..errors import ConfigError, FxWormholeError
from . import _tree as T
from ._problem import Problem
from .gradients import GradStrategy, make_grad
from .stats import FixedPointStats

__all__ = ["FixedPoint", "fixed_point"]


class FixedPoint(nn.Module):
    """Fixed-point node ``z = feedback(body(z, *inputs), *inputs)``; forward returns ``y*``.

    Args:
        body: ``body(z, *inputs) -> y`` (a tensor or tuple of tensors, batch dim 0).
        feedback: ``feedback(y, *inputs) -> z_next`` or ``(z_next, scale)`` with ``scale`` a ``[B]``
            reference norm added to the residual's denominator; ``None`` means ``z_next = y``.
        solver: solver name or :class:`SolverConfig` (``halting``, ``check_every``, ...).
        grad: ``implicit`` | ``phantom`` | ``jfb`` | ``unrolled``, a :class:`GradConfig`, or a
            :class:`~fxwormhole.runtime.gradients.GradStrategy` instance.
        tol, max_iter: override the solver config's.
        on_fail: ``warn`` | ``raise`` | ``ignore`` when a sample does not converge.
        name: used in warnings and errors (the fx node name when a pass builds the node).
        init: ``init(*inputs) -> z0`` when no ``z0=`` is given (default: ``zeros_like(inputs[0])``).
        batched: per input, whether it carries the batch dim (default: ``shape[0] == B``).

    After each call ``self.stats`` holds a :class:`FixedPointStats` (its backward part is filled
    in when the backward runs, eager mode).
    """

    #: what a call leaves behind besides buffers (the last call's stats): restored by the passes'
    #: side-effect-free runs (:func:`fxwormhole.passes._common.state_preserved`)
    RUN_STATE = ("_stats", "_cstats")

    def __init__(self, body: nn.Module, feedback: Optional[nn.Module] = None, *,
                 solver: Union[str, SolverConfig] = "anderson", grad: Union[str, GradConfig, GradStrategy] = "implicit",
                 tol: Optional[float] = None, max_iter: Optional[int] = None, on_fail: str = "warn",
                 name: str = "fixed_point", init: Optional[Callable[..., Any]] = None,
                 batched: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if not callable(body):
            raise ConfigError(f"FixedPoint {name!r}: body={body!r} is not callable")
        if feedback is not None and not callable(feedback):
            raise ConfigError(f"FixedPoint {name!r}: feedback={feedback!r} is not callable")
        if on_fail not in ON_FAIL:
            raise ConfigError(f"FixedPoint {name!r}: on_fail={on_fail!r} is invalid: expected one of {ON_FAIL}")
        self.body = body
        self.feedback = feedback
        self.solver_config = coerce_solver(solver, tol=tol, max_iter=max_iter)
        self.grad_strategy = make_grad(grad)
        if isinstance(grad, GradStrategy):
            grad = grad.mode if grad.mode in GRAD_MODES else None
        self.grad_config = coerce_grad(grad)
        self.on_fail, self.name, self.init = on_fail, name, init
        self.batched = tuple(batched) if batched is not None else None
        self._stats: Optional[FixedPointStats] = None
        self._cstats: dict = {}  # tensors written by the compiled path
        self._meta: Optional[dict] = None  # shapes/dtypes of the last eager call (for prepare())
        self._graphs: Optional[dict] = None  # make_fx VJP graphs for the compiled backward

    # ------------------------------------------------------------------ public
    @property
    def stats(self) -> Optional[FixedPointStats]:
        """Stats of the last call (compiled calls: iterations, residual and status tensors)."""
        if self._cstats:
            c = self._cstats
            return FixedPointStats(c["iterations"], c["residual"], c["status"], name=self.name,
                                   tol=float(self.solver_config.tol), grad_mode=self.grad_config.mode)
        return self._stats

    def extra_repr(self) -> str:
        c = self.solver_config
        return (f"name={self.name!r}, solver={c.name!r}, tol={c.tol:g}, max_iter={c.max_iter}, "
                f"halting={c.halting!r}, grad={self.grad_config.mode!r}, on_fail={self.on_fail!r}")

    def check(self) -> None:
        """Apply ``on_fail`` to the last call's stats (useful after compiled calls, which cannot warn)."""
        st = self.stats
        if st is not None:
            from ._loop import report
            report(st.forward, name=self.name, on_fail=self.on_fail, phase="forward")

    def forward(self, *inputs: Any, z0: Any = None) -> Any:
        z0 = self._initial(inputs, z0)
        zspec = T.spec_of(z0)
        batched = T.batched_mask(inputs, T.batch_size(z0), self.batched)
        if torch.compiler.is_compiling():
            from ._compiled import compiled_forward
            return compiled_forward(self, inputs, z0, zspec, batched)
        self._cstats.clear()
        self._record(inputs, z0)
        p = self._problem(inputs, batched, zspec)
        y, stats = self.grad_strategy(p, T.flatten(z0, zspec).detach())
        self._stats = stats
        return y

    def prepare(self, *example_inputs: Any, z0: Any = None) -> "FixedPoint":
        """Build, eagerly, the ``make_fx`` VJP graphs the compiled backward loops over.

        Without arguments, uses the shapes/dtypes recorded at the last eager forward call.
        """
        from ._compiled import build_graphs
        if not example_inputs and z0 is None:
            if self._meta is None:
                raise FxWormholeError(
                    f"FixedPoint {self.name!r}.prepare(): no example inputs given and no eager call recorded; "
                    "run one eager forward or call prepare(*example_inputs)")
            example_inputs, z0 = self._examples_from_meta()
        self._graphs = build_graphs(self, example_inputs, self._initial(example_inputs, z0))
        return self

    # ------------------------------------------------------------------ internals
    def _initial(self, inputs: Sequence[Any], z0: Any) -> Any:
        if z0 is None:
            if self.init is not None:
                z0 = self.init(*inputs)
            elif inputs and isinstance(inputs[0], Tensor):
                z0 = torch.zeros_like(inputs[0])
            else:
                raise ConfigError(f"FixedPoint {self.name!r}: no z0 given, no init, and inputs[0] is not a tensor; "
                                  "pass z0= or init=")
        if isinstance(z0, (tuple, list)):
            return tuple(t.detach() for t in z0)
        return z0.detach()

    def _problem(self, inputs, batched, zspec) -> Problem:
        return Problem(self.body, self.feedback, inputs, batched, zspec, self.solver_config, self.grad_config,
                       self.name, self.on_fail)

    def _record(self, inputs: Sequence[Any], z0: Any) -> None:
        def meta(t):
            return (tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor) else t
        self._meta = {"inputs": tuple(meta(x) for x in inputs),
                      "z0": tuple(meta(t) for t in T.leaves(z0)), "z_tuple": isinstance(z0, tuple)}

    def _examples_from_meta(self):
        def make(m):
            if isinstance(m, tuple) and len(m) == 3 and isinstance(m[1], torch.dtype):
                shape, dtype, device = m
                if dtype.is_floating_point:
                    return torch.randn(shape, dtype=dtype, device=device)
                return torch.zeros(shape, dtype=dtype, device=device)
            return m
        ins = tuple(make(m) for m in self._meta["inputs"])
        zs = tuple(make(m) for m in self._meta["z0"])
        return ins, (zs if self._meta["z_tuple"] else zs[0])


class _FunctionBody(nn.Module):
    """Adapts ``f(z, *args)`` to a body; keeps an nn.Module's parameters visible."""

    def __init__(self, f: Callable) -> None:
        super().__init__()
        self.f = f

    def forward(self, z, *args):
        return self.f(z, *args)


def fixed_point(f: Callable, z0: Any, *args: Any, solver: Union[str, SolverConfig] = "anderson",
                grad: Union[str, GradConfig] = "implicit", tol: float = 1e-5, max_iter: int = 50,
                return_stats: bool = False, on_fail: str = "warn", **solver_options: Any):
    """Solve ``z* = f(z*, *args)`` from ``z0``; differentiable w.r.t. ``args`` and, when ``f`` is an
    ``nn.Module``, its parameters (``grad`` picks the gradient mode).

    ``solver_options`` are :class:`SolverConfig` fields (``damping``, ``memory``, ``halting``, ...).
    Returns ``z*`` or ``(z*, FixedPointStats)``.
    """
    if isinstance(solver, SolverConfig):
        cfg = coerce_solver(solver, tol=tol, max_iter=max_iter, **solver_options)
    else:
        known = set(SolverConfig.__dataclass_fields__)
        bad = sorted(set(solver_options) - known)
        if bad:
            raise ConfigError(f"fixed_point: unknown solver options {bad}; expected SolverConfig fields {sorted(known)}")
        cfg = SolverConfig(name=solver, tol=tol, max_iter=max_iter, **solver_options)
    node = FixedPoint(_FunctionBody(f), None, solver=cfg, grad=grad, on_fail=on_fail, name=getattr(f, "__name__", "fixed_point"))
    zspec = T.spec_of(z0)
    z0 = node._initial(args, z0)
    p = node._problem(args, T.batched_mask(args, T.batch_size(z0), None), zspec)
    p.strict_targets = True  # f may close over tensors: refuse rather than drop their gradient
    y, stats = node.grad_strategy(p, T.flatten(z0, zspec))
    return (y, stats) if return_stats else y
