"""The check the pass pipeline runs after every pass, and the self-check of ``transform``.

:class:`PipelineCheck` is handed to torch.fx's ``PassManager`` (``add_checks``), which calls it once
before the first pass and after each pass. Every call checks that

1. the graph (and every fixed-point body) passes ``Graph.lint()``;
2. every node of the graph (and of every fixed-point body) carries ``meta["val"]``;
3. the graph still computes the original model at initialisation: with every wormhole's injection
   forced to zero, its outputs on the example inputs equal those of the graph as it was before the
   first pass (relative tolerance 1e-5, wider for half precision; integers exactly).

Forcing the injection to zero (:func:`injection_closed` zeroes every wormhole projection for the
duration of the run) makes the check meaningful for every config: with ``proj_init="normal"`` the
result legitimately differs from the original, but the rewrite itself (the graph without feedback)
must not. Step 3 runs only when the graph or its modules changed since the previous call; all runs
go through :func:`~fxwormhole.passes._common.state_preserved` (buffers restored, the same random
draws for both graphs), so the check changes nothing the user can see.

When outputs differ, :func:`first_divergence` runs both graphs node by node, descending into
fixed-point bodies, and names the first node (in the original's execution order) whose value
differs. Nodes are matched by their *origin*: the node's name in the graph before the first pass,
stamped into its metadata by the first call and kept by every copy (fusion into a body, a probe or
a normalised layer that takes over the node's metadata): ``NodeInfo.origin``.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from .._text import EXAMPLE_INPUTS_HINT, describe_failure
from ..errors import FxWormholeError, VerificationError
from ._common import state_preserved
from .meta import node_info, update_node

__all__ = ["PipelineCheck", "injection_closed", "first_divergence", "tolerance"]

_SEED = 0


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the at-init comparison: 1e-5, or 8 ulps of a coarser float; 0 for integers."""
    if dtype.is_floating_point or dtype.is_complex:
        return max(1e-5, 8 * torch.finfo(dtype).eps)
    return 0.0


@contextlib.contextmanager
def injection_closed(module: nn.Module) -> Iterator[None]:
    """Every wormhole (feed-forward and temporal) injects exactly zero inside the block.

    The projections' parameters are zeroed in place and restored on exit, so any runtime that
    evaluates ``gate(h) * proj(h)`` from its parameters (eager, per-step, fused) sees a closed
    wormhole and settles at its first evaluation.
    """
    from ..runtime.wormhole import Wormhole

    params = {id(p): p for m in module.modules() if isinstance(m, Wormhole) for p in m.proj.parameters()}
    saved = [(p, p.detach().clone()) for p in params.values()]
    with torch.no_grad():
        for p, _ in saved:
            p.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _difference(ref: Any, out: Any) -> tuple[float, float, float] | None:
    """``(max abs error, scale, rtol)`` of the worst leaf where ``out`` differs from ``ref``, else None.

    Raises ``TypeError`` when the two values do not have the same structure (not comparable).
    """
    ref_leaves, ref_spec = tree_flatten(ref)
    out_leaves, out_spec = tree_flatten(out)
    if ref_spec != out_spec:
        raise TypeError(f"structure {out_spec} vs {ref_spec}")
    worst = None
    for a, b in zip(out_leaves, ref_leaves):
        d = _leaf_difference(b, a)
        if d is not None and (worst is None or not d[0] <= worst[0]):
            worst = d
    return worst


def _leaf_difference(ref: Any, out: Any) -> tuple[float, float, float] | None:
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
        if isinstance(ref, (bool, int, float, str)) and type(ref) is type(out) and ref != out:
            if isinstance(ref, float) and math.isnan(ref) and math.isnan(out):
                return None
            return (math.inf, math.nan, 0.0)
        return None
    if ref.shape != out.shape:
        return (math.inf, math.nan, 0.0)
    rtol = tolerance(ref.dtype)
    if rtol == 0.0:
        return None if torch.equal(ref, out.to(ref.dtype)) else (math.inf, math.nan, 0.0)
    wide = torch.complex128 if ref.dtype.is_complex else torch.float64
    a, b = ref.detach().to(wide), out.detach().to(wide)
    finite = torch.isfinite(a) & torch.isfinite(b)
    # non-finite entries must agree exactly (NaN where the original has NaN, the same infinities)
    same_special = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if bool((~finite & ~same_special).any()):
        return (math.nan, math.nan, rtol)
    err = float((a - b).abs()[finite].max()) if bool(finite.any()) else 0.0
    scale = float(a.abs()[finite].max()) if bool(finite.any()) else 0.0
    return (err, scale, rtol) if err > rtol * scale else None


def _origin(node: fx.Node) -> str | None:
    return node_info(node).origin


def _fixed_point_bodies(gm: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    from ..runtime.fixed_point import FixedPoint

    return [(f"{name}.body", m.body) for name, m in gm.named_modules()
            if isinstance(m, FixedPoint) and isinstance(m.body, fx.GraphModule)]


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value under its origin, descending into fixed-point bodies
    (evaluated once at the zero state, which is what the node returns while the injection is zero)."""

    def __init__(self, gm: fx.GraphModule, values: dict[str, Any]):
        super().__init__(gm)
        self.values = values

    def run_node(self, n: fx.Node) -> Any:
        from ..runtime.fixed_point import FixedPoint

        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            if isinstance(module, FixedPoint) and isinstance(module.body, fx.GraphModule):
                args, _ = self.fetch_args_kwargs_from_env(n)
                z0 = module.init(*args) if module.init is not None else torch.zeros_like(args[0])
                return _Recorder(module.body, self.values).run(z0, *args, enable_io_processing=False)
        value = super().run_node(n)
        origin = _origin(n)
        if origin is not None and n.op not in ("placeholder", "get_attr", "output"):
            self.values[origin] = torch.utils._pytree.tree_map(
                lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)
        return value


def _record(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    with state_preserved(gm, seed=_SEED), injection_closed(gm), torch.no_grad():
        _Recorder(gm, values).run(*inputs)
    return values


def first_divergence(reference: fx.GraphModule, candidate: fx.GraphModule,
                     inputs: Sequence[Any]) -> tuple[str, tuple[float, float, float]] | None:
    """The origin of the first node (in ``reference``'s execution order) whose value differs in
    ``candidate``, with ``(error, scale, rtol)``; None if every comparable node agrees."""
    ref_values = _record(reference, inputs)
    values = _record(candidate, inputs)
    for origin, ref in ref_values.items():
        if origin not in values:
            continue
        try:
            d = _difference(ref, values[origin])
        except TypeError:  # a node that changed form (aten.lstm's (out, h, c) -> nn.LSTM's (out, (h, c)))
            continue
        if d is not None:
            return origin, d
    return None


def _module_path(node: fx.Node | None) -> str | None:
    stack = (node.meta.get("nn_module_stack") or {}) if node is not None else {}
    paths = [str(v[0]) for v in stack.values() if v and v[0]]
    return paths[-1] if paths else None


def _describe(node: fx.Node | None) -> str:
    if node is None:
        return "?"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _fingerprint(gm: fx.GraphModule) -> tuple:
    """Changes when a pass changes the code of the graph or of a nested graph, or the module tree."""
    return tuple((id(m), m.code if isinstance(m, fx.GraphModule) else None) for m in gm.modules())


class PipelineCheck:
    """Checks a graph between passes (see the module docstring); give it to ``run_passes(check=...)``.

    Args:
        example_inputs: positional example inputs of the model (the same the passes see).
        verify: also check that the graph equals the original at initialisation (step 3). Lint and
            the ``meta["val"]`` check always run.
        what: how the error message names the operation (``"transform"``, ``"instrument"``).
    """

    def __init__(self, example_inputs: Sequence[Any], *, verify: bool = True, what: str = "transform"):
        self.inputs = tuple(example_inputs)
        self.verify, self.what = verify, what
        self.reference: fx.GraphModule | None = None
        self._ref_outputs: Any = None
        self._fingerprint: Any = None

    def watching(self, pass_names: Sequence[str]) -> Callable[[nn.Module], None]:
        """The one-argument check for a PassManager running ``pass_names``: PassManager calls it
        before the first pass and after each pass, so the k-th call follows pass k."""
        after = iter([None, *pass_names])

        def check(gm: nn.Module) -> None:
            self(gm, after=next(after, None))

        return check

    # ------------------------------------------------------------------------------------------
    def __call__(self, gm: nn.Module, after: str | None = None) -> None:
        if not isinstance(gm, fx.GraphModule):
            return
        graphs = [("", gm), *_fixed_point_bodies(gm)]
        for _, g in graphs:
            g.graph.lint()
        for where, g in graphs:
            missing = [n.name for n in g.graph.nodes if n.op != "output" and "val" not in n.meta]
            if missing:
                raise VerificationError(
                    f"{self.what}: after pass {after!r}, nodes {missing[:5]} of {where or 'the graph'} have no "
                    f"meta['val'] (every pass must keep shapes on the nodes it adds); this is a defect of "
                    f"fxwormhole: please report it", pass_name=after, node=missing[0])
        if not self.verify:
            return
        if self.reference is None:
            self._take_reference(gm)
            return
        fingerprint = _fingerprint(gm)
        if fingerprint == self._fingerprint:
            return
        self._fingerprint = fingerprint
        self._compare(gm, after)

    def _take_reference(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node_info(node).origin is None:
                update_node(node, origin=node.name)
        # A structural copy sharing the modules: later passes swap modules in gm, not in this copy.
        self.reference = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
        self._fingerprint = _fingerprint(gm)

    def _run(self, gm: fx.GraphModule) -> Any:
        with state_preserved(gm, seed=_SEED), injection_closed(gm), torch.no_grad():
            return gm(*self.inputs)

    def _compare(self, gm: fx.GraphModule, after: str | None) -> None:
        if self._ref_outputs is None:
            # Run late, not before the first pass: a pass refusing bad inputs says more (PlacementError).
            try:
                self._ref_outputs = (self._run(self.reference),)
            except Exception as exc:  # noqa: BLE001 - the inputs do not fit the model: say so, typed
                raise FxWormholeError(
                    f"{self.what}: running the captured model on example_inputs failed with {describe_failure(exc)}; "
                    f"{EXAMPLE_INPUTS_HINT}") from exc
        try:
            d = _difference(self._ref_outputs[0], self._run(gm))
        except TypeError as exc:
            raise VerificationError(
                f"{self.what} self-check: after pass {after!r} the model returns a different structure than the "
                f"original ({exc}); this is a defect of fxwormhole: please report it with the model, or pass "
                f"verify=False to skip the check", pass_name=after) from None
        if d is None:
            return
        found = first_divergence(self.reference, gm, self.inputs)
        origin, (err, scale, rtol) = found if found is not None else ("output", d)
        ref_node = next((n for n in self.reference.graph.nodes if n.name == origin), None)
        path = _module_path(ref_node)
        where = f"node {origin!r} ({_describe(ref_node)}" + (f", module {path!r})" if path else ")")
        raise VerificationError(
            f"{self.what} self-check: after pass {after!r}, the rewritten model does not compute the original at "
            f"initialisation (wormhole injection forced to zero): the first diverging value is {where}, off by up "
            f"to {err:.3g} where the original's values reach {scale:.3g} (allowed: {rtol:g} relative). This is a "
            f"defect of fxwormhole, not of the model: please report it with the model; verify=False skips the "
            f"check", pass_name=after, node=origin, module_path=path, error=err, scale=scale)
