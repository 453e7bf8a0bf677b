"""Compiled loops of a fixed-point node: one compiled step per solve, driven in blocks.

``fxwormhole.compile`` gives every :class:`~fxwormhole.runtime.fixed_point.FixedPoint` a
``compiled_loops`` setting; the node's solve op (:mod:`._compiled`) then runs its forward solve
and, for the implicit gradient, its adjoint solve through :class:`CompiledLoops`:

* the *step* (one evaluation, residual check, per-sample freeze and solver step,
  :func:`~._loop.step_body`) is traced once by ``make_fx`` with a symbolic batch (parameters
  and inputs as arguments, so nothing is baked in) and compiled by Inductor with
  ``torch._inductor.standalone_compile`` (other backends run the traced graph as is);
* :func:`~._loop.solve_blocks` calls it for a block of evaluations without reading anything on
  the host, then reads one count, moves the finished samples out and pads the rest to a
  power-of-two bucket (at least 2: no recompile for a batch of one; a handful of sizes in all,
  which is also what CUDA graphs per bucket would need). The block lengths follow ``schedule``
  (default 1, 1, 2, 4, 8, 8, ...): a closed node stops after one evaluation, easy samples leave
  early, and the long blocks run on the few hard ones.

One graph per node and solve (forward, adjoint), compiled at the first call with a batch size that
equals no other dimension (duck sizing would otherwise tie them together); counted in
:attr:`CompiledLoops.compiles`.
"""
from __future__ import annotations

import functools
import logging
import time
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _tree as T
from ._loop import Carry, pad_rows, solve_blocks, step_body
from ._problem import Problem

DEFAULT_SCHEDULE = (1, 1, 2, 4, 8)


def trace(fn: Callable, example: Sequence[Any], symbolic: bool = True):
    """``make_fx`` of ``fn`` at ``example``. With ``symbolic``, dim 0 of every tensor whose dim 0 is
    the example's batch (a size no other dimension has, see ``CompiledLoops._trace_batch``) is a
    symbol and every other size stays fixed, so the compiled code serves every batch size and keeps
    the loops over features static. (Not functionalised here: the solvers write nothing in place
    while traced, and Inductor's compile functionalises what a body does.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    if not symbolic:
        with torch.no_grad():
            gm = make_fx(fn, tracing_mode="fake")(*example)
    else:
        batch = example[0].shape[0]
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)

        def fake(t: Tensor) -> Tensor:
            dims = [DimDynamic.DYNAMIC if i == 0 and t.shape[0] == batch else DimDynamic.STATIC for i in range(t.dim())]
            return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

        args = [fake(t) for t in example]
        with mode, torch.no_grad():
            gm = make_fx(fn, tracing_mode="real")(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


class _Step:
    """A compiled step for every bucket size: one graph with a symbolic batch when Inductor keeps
    it symbolic, else (some lowerings, e.g. CPU convolutions, fix the batch they were compiled
    at; the compiled code then refuses other sizes) one graph per bucket size."""

    def __init__(self, loops: "CompiledLoops", fn: Callable, example: Callable[[], List[Tensor]]) -> None:
        self.loops, self.fn = loops, fn
        self.dynamic: Optional[Callable] = loops._compile(fn, [t.detach() for t in example()])
        self.static: dict = {}

    def __call__(self, *args: Tensor):
        if self.dynamic is not None:
            try:
                return self.dynamic(*args)
            except AssertionError:  # its size checks failed: the batch was specialised
                self.dynamic = None
        size = args[0].shape[0]
        step = self.static.get(size)
        if step is None:
            step = self.static[size] = self.loops._compile(self.fn, [t.detach() for t in args], static=True)
        return step(*args)


class CompiledLoops:
    """The compiled forward and adjoint solves of one node set-up (see the module docstring)."""

    def __init__(self, node, p: Problem, backend: str = "inductor", options: Optional[dict] = None,
                 schedule: Sequence[int] = DEFAULT_SCHEDULE) -> None:
        self.node, self.base = node, p
        self.backend, self.options = backend, dict(options or {})
        self.schedule = tuple(int(s) for s in schedule)
        self._fwd: Optional[Callable] = None
        self._adj: Optional[Callable] = None
        self.steps: List[_Step] = []  # every compiled step
        self.compiles = 0  # graphs compiled (one per solve, or one per bucket size where the batch cannot stay symbolic)
        self.compile_seconds = 0.0

    # ------------------------------------------------------------------ compiling
    def _compile(self, fn: Callable, example: List[Tensor], static: bool = False) -> Callable:
        """Trace ``fn`` at ``example`` and compile it; ``static`` specialises every size."""
        t0 = time.perf_counter()
        gm = trace(fn, example, symbolic=not static)
        if self.backend == "inductor":
            # standalone_compile also packs a cache artifact and warns when it cannot; we keep none
            quiet = logging.getLogger("torch._inductor.standalone_compile")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                with warnings.catch_warnings():  # torch-internal deprecation notes from lowerings
                    warnings.simplefilter("ignore", FutureWarning)
                    compiled = torch._inductor.standalone_compile(
                        gm, example, dynamic_shapes="from_example_inputs" if static else "from_graph",
                        options={"config_patches": dict(self.options)})
            finally:
                quiet.setLevel(level)
        else:  # eager / aot_eager / a test backend: the traced graph itself
            compiled = gm
        self.compiles += 1
        self.compile_seconds += time.perf_counter() - t0
        return compiled

    def _module_tensors(self) -> Tuple[List[Tensor], List[Tensor]]:
        from ._compiled import _tensors
        return _tensors(self.node.body)[1], _tensors(self.node.feedback)[1]

    @staticmethod
    def _trace_batch(tensors: Sequence[Tensor], low: int = 3) -> int:
        """A batch size equal to no other dimension of ``tensors`` (and not 0 or 1)."""
        dims = {d for t in tensors for d in t.shape[1:]}
        b = low
        while b in dims:
            b += 1
        return b

    def _stepper(self, step_fn: Callable, example: Callable, tail: Sequence[Tensor]):
        """``step(carry, k, inputs, variant) -> (carry, aux)``: evaluation 1 runs ``step_fn`` as is
        (a solve that stops there, as closed wormholes do, never compiles), later ones the compiled
        step of that variant (one graph each, built at first use)."""
        steps = {}

        def step(carry, k, inputs, variant):
            kt = torch.full((), k, dtype=torch.int64, device=carry.x.device)
            n_carry = 7 + len(carry.state)
            fn = functools.partial(step_fn, n_state=len(carry.state), variant=variant)
            compiled = steps.get(variant)
            if k == 1 and compiled is None:
                out = fn(*carry.tensors(), kt, *inputs, *tail)
            else:
                if compiled is None:
                    compiled = steps[variant] = _Step(self, fn, functools.partial(example, len(carry.state) > 0))
                    self.steps.append(compiled)
                out = compiled(*carry.tensors(), kt, *inputs, *tail)
            return Carry.of(out[:n_carry]), out[n_carry:]
        return step

    # ------------------------------------------------------------------ forward
    def forward(self, p: Problem, z0: Tensor):
        from ._compiled import _functional
        node, base = self.node, self.base
        cfg, solver = base.solver_cfg, base.solver
        tb, tf = self._module_tensors()
        ins = [x for x in p.inputs]
        n_in, n_b = len(ins), len(tb)
        batched = base.batched
        def step_fn(*args, n_state=0, variant="full"):
            carry = Carry.of(args[:7 + n_state])
            k = args[7 + n_state]
            rest = args[8 + n_state:]
            xs, wb, wf = list(rest[:n_in]), rest[n_in:n_in + n_b], rest[n_in + n_b:]
            fp = _functional(node, base, wb, wf)
            fp.yspec = p.yspec
            new, aux = step_body(lambda x: _fmap_with(fp, xs, x), carry, k, solver, cfg, cfg.tol, cfg.max_iter, variant)
            return (*new.tensors(), *aux)

        def take_inputs(rows, size):
            return [pad_rows(x, rows, size) if batched[i] else x for i, x in enumerate(ins)]

        def example(with_state: bool):
            B = self._trace_batch([*[x for x in ins if isinstance(x, Tensor)], z0])
            idx = torch.arange(B, device=z0.device) % z0.shape[0]
            ex_ins = [x.index_select(0, idx) if batched[i] else x for i, x in enumerate(ins)]
            return [*_example_carry(z0, solver, idx, with_state), *ex_ins, *tb, *tf]

        if self._fwd is None:
            self._fwd = self._stepper(step_fn, example, (*tb, *tf))
        step = self._fwd
        return solve_blocks(step, z0, solver, max_iter=cfg.max_iter, schedule=self.schedule,
                            take_inputs=take_inputs, compact=cfg.halting == "sample", every=int(cfg.check_every))

    # ------------------------------------------------------------------ adjoint
    def adjoint(self, full, g: Tensor, acfg, solver, linearise_padded: Callable):
        """Solve ``ybar = g + F_y^T B_z^T ybar`` from the linearisation ``full`` in blocks; after
        each compaction the linearisation is taken again on the (padded) remaining rows."""
        n_sb = len(full.vb.saved)
        has_f = full.vf is not None
        vb_step = full.vb.hoisted.loop_step
        vf_step = full.vf.hoisted.loop_step if has_f else None

        def adj_map(ybar, gg, sb, sf):
            zbar = vb_step(ybar, *sb)
            zbar = zbar[0] if isinstance(zbar, (tuple, list)) else zbar
            if vf_step is None:
                yb = zbar
            else:
                yb = vf_step(zbar, *sf)
                yb = yb[0] if isinstance(yb, (tuple, list)) else yb
            return (zbar,), gg + yb.to(gg.dtype), None

        def step_fn(*args, n_state=0, variant="full"):
            carry = Carry.of(args[:7 + n_state])
            k = args[7 + n_state]
            gg = args[8 + n_state]
            sb = args[9 + n_state:9 + n_state + n_sb]
            sf = args[9 + n_state + n_sb:]
            new, aux = step_body(lambda y: adj_map(y, gg, sb, sf), carry, k, solver, acfg, acfg.tol, acfg.max_iter, variant)
            return (*new.tensors(),)

        linearised = [0]

        def take_inputs(rows, size):
            if rows is None and size == g.shape[0]:
                lin = full
            else:
                lin = linearise_padded(rows, size)
                linearised[0] += size
            return [pad_rows(g, rows, size), *lin.vb.saved, *(lin.vf.saved if has_f else ())]

        def example(with_state: bool):
            B = self._trace_batch([g, *full.vb.saved, *(full.vf.saved if has_f else ())])
            idx = torch.arange(B, device=g.device) % g.shape[0]
            lin = linearise_padded(idx, B)
            return [*_example_carry(g, solver, idx, with_state), g.index_select(0, idx), *lin.vb.saved,
                    *(lin.vf.saved if has_f else ())]

        if self._adj is None:
            self._adj = self._stepper(step_fn, example, ())
        step = self._adj
        out = solve_blocks(step, g, solver, max_iter=acfg.max_iter, schedule=self.schedule,
                           take_inputs=take_inputs, keep_aux=False, compact=acfg.halting == "sample", every=1)
        out[3].linearised = linearised[0]
        return out


def _example_carry(x: Tensor, solver, idx: Tensor, with_state: bool) -> List[Tensor]:
    """A carry (with the solver's fresh state or none) and ``k`` for tracing, at the rows ``idx`` of ``x``."""
    xs = x.index_select(0, idx)
    carry = Carry.start(xs, solver.init(xs) if with_state else ())
    return [*carry.tensors(), torch.ones((), dtype=torch.int64, device=x.device)]


def _fmap_with(p: Problem, inputs: Sequence[Any], x: Tensor):
    y = p.run_body(x, inputs)
    fz, scale = p.run_feedback(y, inputs)
    return T.leaves(y), fz, scale
