"""One call of a fixed-point node: body, feedback, inputs and the flat maps the solvers iterate."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..config import GradConfig, SolverConfig
from ..errors import ConfigError
from . import _tree as T
from ._loop import report, solve_eager
from .solvers import make_solver
from .stats import FixedPointStats, SolveStats


class Problem:
    """Binds ``body(z, *inputs) -> y`` and ``feedback(y, *inputs) -> z_next | (z_next, scale)`` to
    one set of inputs. ``fmap(z_flat, rows)`` evaluates both on the samples ``rows`` (None = all)."""

    def __init__(self, body: Callable, feedback: Optional[Callable], inputs: Sequence[Any],
                 batched: Sequence[bool], zspec: T.Spec, solver: SolverConfig, grad: GradConfig,
                 name: str, on_fail: str, extra_targets: Sequence[Tensor] = ()) -> None:
        self.body, self.feedback = body, feedback
        self.inputs, self.batched = tuple(inputs), tuple(batched)
        self.zspec, self.yspec = zspec, (zspec if feedback is None else None)
        self.solver_cfg, self.grad_cfg = solver, grad
        self.name, self.on_fail = name, on_fail
        self._extra_targets = tuple(extra_targets)
        self.strict_targets = False  # check the tape for tensors requiring grad that are not targets
        self._rows_key: Optional[Tensor] = None
        self._rows_inputs: Tuple[Any, ...] = self.inputs

    # ------------------------------------------------------------------ evaluation
    def inputs_for(self, rows: Optional[Tensor]) -> Tuple[Any, ...]:
        if rows is None:
            return self.inputs
        if rows is not self._rows_key:  # the active set changed: slice batched inputs once
            self._rows_key, self._rows_inputs = rows, T.take_rows(self.inputs, self.batched, rows)
        return self._rows_inputs

    def split_feedback(self, out: Any) -> Tuple[Any, Optional[Tensor]]:
        """``feedback`` returns ``z_next`` or ``(z_next, scale)``; tell them apart by the state's structure."""
        if isinstance(out, (tuple, list)) and len(out) == 2:
            first, second = out
            nested = isinstance(first, (tuple, list))
            if (self.zspec.is_tuple and nested) or (not self.zspec.is_tuple and isinstance(first, Tensor)):
                return first, second
        return out, None

    def run_body(self, z_flat: Tensor, ins: Sequence[Any]) -> Any:
        y = self.body(T.unflatten(z_flat, self.zspec), *ins)
        if self.yspec is None:
            self.yspec = T.spec_of(y, "body output")
        return y

    def run_feedback(self, y: Any, ins: Sequence[Any]) -> Tuple[Tensor, Optional[Tensor]]:
        if self.feedback is None:
            return T.flatten(y, self.zspec), None
        z_next, scale = self.split_feedback(self.feedback(y, *ins))
        if scale is not None:
            scale = scale.detach().reshape(-1)
        return T.flatten(z_next, self.zspec), scale

    def fmap(self, z_flat: Tensor, rows: Optional[Tensor]):
        ins = self.inputs_for(rows)
        y = self.run_body(z_flat, ins)
        fz, scale = self.run_feedback(y, ins)
        return T.leaves(y), fz, scale

    def output_map(self, y_flat: Tensor) -> Tensor:
        """``h = body o feedback`` on the flat body output (phantom / JFB gradients)."""
        y = T.unflatten(y_flat, self.yspec)
        z = y if self.feedback is None else self.split_feedback(self.feedback(y, *self.inputs))[0]
        return T.flatten(self.body(z, *self.inputs), self.yspec)

    # ------------------------------------------------------------------ solving
    def solve(self, z0: Tensor, *, first=None, keep_aux: bool = True, compact: Optional[bool] = None):
        cfg = self.solver_cfg
        compact = (cfg.halting == "sample") if compact is None else compact
        return solve_eager(self.fmap, z0, make_solver(cfg), cfg, tol=cfg.tol, max_iter=cfg.max_iter,
                           compact=compact, first=first, keep_aux=keep_aux)

    def y_from_aux(self, aux: Tuple[Tensor, ...]) -> Any:
        return aux if self.yspec.is_tuple else aux[0]

    def make_stats(self, st: SolveStats) -> FixedPointStats:
        return FixedPointStats(st.iterations, st.residual, st.status, name=self.name,
                               tol=float(self.solver_cfg.tol), grad_mode=self.grad_cfg.mode)

    def report(self, st: SolveStats, phase: str) -> None:
        report(st, name=self.name, on_fail=self.on_fail, phase=phase)

    # ------------------------------------------------------------------ gradient targets
    def targets(self) -> List[Tensor]:
        """Tensors the gradient must reach: parameters of body/feedback and inputs requiring grad."""
        seen, out = set(), []
        mods = [m for m in (self.body, self.feedback) if isinstance(m, nn.Module)]
        cands = [p for m in mods for p in m.parameters()] + [x for x in self.inputs if isinstance(x, Tensor)]
        for t in cands + list(self._extra_targets):
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out


def check_no_hidden_leaves(outputs: Sequence[Tensor], known: Sequence[Tensor]) -> None:
    """Raise if ``outputs`` depend on a tensor requiring grad that is not in ``known`` (e.g. a
    parameter a plain function closes over): the implicit gradient would silently miss it."""
    known_nodes = {id(t.grad_fn) for t in known if t.grad_fn is not None}
    known_leaves = {id(t) for t in known if t.grad_fn is None}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or id(node) in known_nodes:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in known_leaves:
            raise ConfigError(
                f"fixed_point: f depends on a tensor of shape {tuple(var.shape)} that requires grad but is "
                "neither an argument nor a parameter of f; pass it through *args (or make f an nn.Module) "
                "so that the implicit gradient reaches it")
        stack.extend(n for n, _ in node.next_functions)
