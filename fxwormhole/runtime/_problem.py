"""A fixed-point node's solve set-up (built once per node) bound to one call's inputs."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ..config import SolverConfig
from ..errors import ConfigError
from . import _tree as T
from ._loop import Work, report, solve_eager
from .solvers import FixedPointSolver, make_solver
from .stats import FixedPointStats, SolveStats


class Problem:
    """Binds ``body(z, *inputs) -> y`` and ``feedback(y, *inputs) -> z_next | (z_next, scale)``.

    Built once per node and input structure (solver, parameter list, specs); :meth:`bind` returns
    a light copy holding one call's inputs (a tape outlives the call, and the node may be called
    again before the backward). ``fmap(z_flat, rows)`` evaluates both on the samples ``rows``
    (None = all). All copies share the node's two predictions, each one decision read from the
    last call: ``closed`` (every sample settled at evaluation 1: tape that evaluation) and
    ``adjoint_closed`` (the adjoint did too: take the gradient products with its first VJP).
    """

    def __init__(self, body: Callable, feedback: Optional[Callable], batched: Sequence[bool], zspec: T.Spec,
                 solver: SolverConfig, grad_mode: str, name: str, on_fail: str,
                 extra_targets: Sequence[Tensor] = ()) -> None:
        self.body, self.feedback = body, feedback
        self.batched = tuple(batched)
        self.zspec = zspec
        self.yspec: Optional[T.Spec] = zspec if feedback is None else None
        self.solver_cfg, self.grad_mode = solver, grad_mode
        self.solver: FixedPointSolver = make_solver(solver)
        self.name, self.on_fail = name, on_fail
        self._param_sources = ([m for m in (body, feedback) if isinstance(m, nn.Module)], tuple(extra_targets))
        self._params: List[Tensor] = []
        self._param_ids: frozenset = frozenset()
        self._read_params()
        self.strict_targets = False  # check the tape for tensors requiring grad that are not targets
        # the common case, evaluated without flattening: one [B, D] state and no feedback
        self.plain = feedback is None and not zspec.is_tuple and len(zspec.shapes) == 1 and len(zspec.shapes[0]) == 1
        self.shared = _Shared()
        self.inputs: Tuple[Any, ...] = ()
        self._rows_key: Optional[Tensor] = None
        self._rows_inputs: Tuple[Any, ...] = ()

    def bind(self, inputs: Sequence[Any]) -> "Problem":
        call = object.__new__(Problem)
        call.__dict__.update(self.__dict__)
        call.inputs = tuple(inputs)
        call._rows_key, call._rows_inputs = None, call.inputs
        if call.feedback is not None:
            call.yspec = None  # learned at the first evaluation (shapes may follow the inputs)
        return call

    @property
    def closed(self) -> bool:
        return self.shared.closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self.shared.closed = value

    @property
    def adjoint_closed(self) -> bool:
        return self.shared.adjoint_closed

    @adjoint_closed.setter
    def adjoint_closed(self, value: bool) -> None:
        self.shared.adjoint_closed = value

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

    def fmap(self, z_flat: Tensor, rows: Optional[Tensor] = None):
        ins = self.inputs if rows is None else self.inputs_for(rows)
        if self.plain:  # a [B, D] state without feedback: the body's output is the next state
            y = self.body(z_flat, *ins)
            if isinstance(y, Tensor) and y.dim() == 2 and y.dtype == z_flat.dtype:
                return (y,), y, None
            fz, scale = self.run_feedback(y, ins)
            return T.leaves(y), fz, scale
        y = self.run_body(z_flat, ins)
        fz, scale = self.run_feedback(y, ins)
        return T.leaves(y), fz, scale

    def output_map(self, y_flat: Tensor) -> Tensor:
        """``h = body o feedback`` on the flat body output (phantom / JFB gradients)."""
        y = T.unflatten(y_flat, self.yspec)
        z = y if self.feedback is None else self.split_feedback(self.feedback(y, *self.inputs))[0]
        return T.flatten(self.body(z, *self.inputs), self.yspec)

    # ------------------------------------------------------------------ solving
    def solve(self, z0: Tensor, *, first=None, keep_aux: bool = True) -> Tuple[Tensor, Any, SolveStats, Work]:
        return solve_eager(self.fmap, z0, self.solver, self.solver_cfg, first=first, keep_aux=keep_aux)

    def y_from_aux(self, aux: Tuple[Tensor, ...]) -> Any:
        return aux if self.yspec.is_tuple else aux[0]

    def make_stats(self, st: SolveStats, work: Optional[Work] = None) -> FixedPointStats:
        out = FixedPointStats(st.iterations, st.residual, st.status, name=self.name,
                              tol=float(self.solver_cfg.tol), grad_mode=self.grad_mode)
        if work is not None:
            out.extra["forward_work"] = work
        return out

    def report(self, st: SolveStats, phase: str, work: Optional[Work] = None) -> None:
        if work is not None and work.ok:
            return  # every sample converged: the loop read that along with its last check
        report(st, name=self.name, on_fail=self.on_fail, phase=phase)

    # ------------------------------------------------------------------ gradient targets
    def _read_params(self) -> None:
        mods, extra = self._param_sources
        params = {id(p): p for m in mods for p in m.parameters()}  # shared parameters once
        for t in extra:
            params.setdefault(id(t), t)
        if params.keys() != self._param_ids:
            self._params, self._param_ids = list(params.values()), frozenset(params)

    def targets(self) -> List[Tensor]:
        """Tensors the gradient must reach: parameters of body/feedback and inputs requiring grad.

        The parameters are read again at every differentiable call: a wrapper may have replaced them
        since the set-up was built (FSDP2's fully_shard swaps sharded and unsharded parameters at
        every forward), and a gradient sent to the old objects would train nothing."""
        self._read_params()
        out = [t for t in self._params if t.requires_grad]
        for t in self.inputs:
            if isinstance(t, Tensor) and t.requires_grad and id(t) not in self._param_ids and all(t is not o for o in out):
                out.append(t)
        return out


class _Shared:
    """What every call of a node shares: its predictions and lazily built helpers."""

    def __init__(self) -> None:
        self.closed = True  # transformed models start with closed wormholes
        self.adjoint_closed = True
        self.cache: dict = {}
        self.key: Any = None  # the node's key for this set-up
        self.yspec: Optional[T.Spec] = None  # the body output's structure, once seen
        self.entry: Optional[int] = None  # its id for the compiled op


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
