"""``fxwormhole.compile(model)``: ``torch.compile`` with the settings fixed-point models need.

What it does, in order (see ``docs/pipeline.md``):

1. **Prepare.** The compiled implicit backward of every
   :class:`~fxwormhole.runtime.fixed_point.FixedPoint` loops over VJP graphs that must be built
   eagerly (``FixedPoint.prepare()``), from the shapes of one eager call. If a node has never run,
   one eager forward is made under ``no_grad`` with inputs synthesised from the example shapes
   :func:`fxwormhole.transform` recorded (or ``example_inputs=``); buffers (BatchNorm statistics)
   are restored afterwards, so the model's state is unchanged.
2. **Inductor workaround.** ``options={"inplace_buffers": False}`` is merged into the Inductor
   options: in torch 2.13 Inductor re-uses loop-invariant inputs of the backward ``while_loop`` as
   in-place buffers and can overwrite a Parameter (shared/research/torch-tooling.md section 3.3).
   ``allow_inplace_buffers=True`` opts out; it is unsafe.
3. **Dynamic batch.** Dimension 0 of every tensor input is marked dynamic (a forward pre-hook on
   the compiled wrapper, not on ``model``), so batch sizes 4, 7, 9, 13 share one compiled graph.
4. **Full graph where possible.** ``fullgraph=True``, except when the model holds explicit
   recurrent modules (:class:`~fxwormhole.runtime.recurrent.ExplicitRecurrent`): their Python
   time loop with one fixed-point solve per step runs eagerly between compiled graphs (their
   per-step cell can be compiled with ``recurrent="step"``).
"""
from __future__ import annotations

import copy

import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .errors import ConfigError, FxWormholeError

__all__ = ["compile", "prepare", "example_inputs_from_meta", "INDUCTOR_WORKAROUND"]

#: Inductor options merged into every compile of a fixed-point model (see module docstring).
INDUCTOR_WORKAROUND: dict[str, Any] = {"inplace_buffers": False}

_RECURRENT_MODES = ("eager", "step")


# ------------------------------------------------------------------------------------------------
# preparation
def _fixed_points(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from .runtime.fixed_point import FixedPoint

    return ((name, m) for name, m in model.named_modules() if isinstance(m, FixedPoint))


def _recurrent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from .runtime.recurrent import ExplicitRecurrent
    except ImportError:  # recurrent support absent from this build
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExplicitRecurrent)]


def example_inputs_from_meta(model: nn.Module) -> tuple[Tensor, ...] | None:
    """Inputs with the shapes and dtypes :func:`fxwormhole.transform` recorded, or None.

    Floating inputs are ``randn``; integer inputs are zeros (a valid index for embeddings).
    """
    if not isinstance(model, fx.GraphModule):
        return None
    vals = [n.meta.get("val") for n in model.graph.nodes if n.op == "placeholder"]
    if vals and all(isinstance(v, Tensor) for v in vals):
        specs = [(tuple(int(s) for s in v.shape), v.dtype) for v in vals]
    else:  # node meta is not pickled; the graph-level record survives torch.save
        shapes = getattr(model, "meta", {}).get("fxwormhole", {}).get("input_shapes")
        if not shapes:
            return None
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        specs = [(tuple(s), dtype) for s in shapes]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def make(shape, dtype):
        if dtype.is_floating_point:
            return torch.randn(shape, dtype=dtype, device=device)
        return torch.zeros(shape, dtype=dtype, device=device)

    return tuple(make(s, d) for s, d in specs)


def _needs_graphs(fp: nn.Module) -> bool:
    return getattr(fp, "_graphs", None) is None and fp.grad_config.mode == "implicit"


def prepare(model: nn.Module, example_inputs: Sequence[Any] | Tensor | None = None) -> nn.Module:
    """Build the compiled backward's VJP graphs of every fixed point in ``model``; returns ``model``.

    Uses, in order: ``example_inputs`` (one eager forward under ``no_grad``), the shapes each node
    recorded at its last eager call, or the example shapes ``transform`` stored. Buffers are
    restored, so running statistics do not move. Graphs are traced in the current train/eval mode.

    Raises:
        FxWormholeError: nothing says which shapes the fixed points see.
    """
    todo = [(name, fp) for name, fp in _fixed_points(model) if _needs_graphs(fp) or example_inputs is not None]
    if not todo:
        return model
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        unknown = [name for name, fp in todo if fp._meta is None]
        if unknown or example_inputs is not None:
            inputs = tuple(example_inputs) if example_inputs is not None else example_inputs_from_meta(model)
            if inputs is None:
                raise FxWormholeError(
                    f"fxwormhole.compile: fixed point(s) {unknown} have never run and the model records no "
                    "example input shapes; run one eager forward (model(*inputs)) first or pass "
                    "example_inputs=(...) to fxwormhole.compile")
            with torch.no_grad():
                model(*inputs)
        for name, fp in todo:
            if fp._meta is None:
                raise FxWormholeError(
                    f"fxwormhole.compile: fixed point {name!r} did not run in the eager forward (is it on a "
                    "branch the example inputs do not take?); call model.get_submodule(name).prepare(*inputs) "
                    "with the inputs it sees")
            try:
                fp.prepare()
            except FxWormholeError:
                raise
            except Exception as exc:  # noqa: BLE001 - make_fx fails in many ways; say where and why
                why = " ".join(str(exc).split())[:240]
                raise FxWormholeError(
                    f"fxwormhole.compile: building the compiled backward of fixed point {name!r} failed "
                    f"({type(exc).__name__}: {why}); a body that mutates state (BatchNorm in training mode) "
                    "cannot be compiled for training: call model.eval(), or train this model eagerly") from exc
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
    return model


# ------------------------------------------------------------------------------------------------
# compile
class _EagerRegion(nn.Module):
    """Runs ``inner`` outside dynamo (a graph break): for modules with Python loops and per-step
    fixed points, whose eager path is the tested one."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _with_eager_regions(model: fx.GraphModule, paths: Sequence[str]) -> fx.GraphModule:
    """A new GraphModule over the same submodules (parameters shared, nothing copied) whose calls
    of ``paths`` go through :class:`_EagerRegion`. ``model`` itself is not modified."""
    wrapped = {p: f"_eager_region_{i}" for i, p in enumerate(paths)}
    env: dict[fx.Node, fx.Node] = {}
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(model.graph._codegen)  # export graphs: the pytree in/out spec (else a tuple comes back)
    for node in model.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_module" and node.target in wrapped:
            new.target = wrapped[node.target]
        env[node] = new
    root = nn.Module()
    for name, mod in model.named_children():
        root.add_module(name, mod)
    for name, buf in model.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for name, par in model.named_parameters(recurse=False):
        root.register_parameter(name, par)
    for path, alias in wrapped.items():
        root.add_module(alias, _EagerRegion(model.get_submodule(path)))
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.meta = dict(getattr(model, "meta", {}))
    gm.train(model.training)
    return gm


def _inductor_options(kwargs: dict, allow_inplace_buffers: bool) -> None:
    options = dict(kwargs.pop("options", None) or {})
    mode = kwargs.pop("mode", None)
    if mode is not None:  # torch.compile refuses mode together with options: expand the mode
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    if not allow_inplace_buffers:
        if options.get("inplace_buffers", False):
            raise ConfigError(
                "fxwormhole.compile: options={'inplace_buffers': True} would let Inductor overwrite "
                "loop-invariant inputs (even Parameters) of the fixed-point backward (torch 2.13); pass "
                "allow_inplace_buffers=True as well to accept that risk")
        options.update(INDUCTOR_WORKAROUND)
    if options:
        kwargs["options"] = options


def _warn_non_tensor_inputs(model: nn.Module) -> None:
    for name, fp in _fixed_points(model):
        meta = getattr(fp, "_meta", None) or {}
        if fp.grad_config.mode == "implicit" and any(not isinstance(m, tuple) for m in meta.get("inputs", ())):
            warnings.warn(
                f"fxwormhole.compile: fixed point {name!r} takes non-tensor inputs (sizes); the runtime's compiled "
                "implicit backward does not support them yet: compiled inference works, train this model eagerly "
                "or with grad='phantom'", stacklevel=3)


def _mark_batch_dynamic(module: nn.Module, args: tuple, kwargs: dict) -> None:
    for t in [*args, *kwargs.values()]:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)


def compile(model: nn.Module, *, example_inputs: Sequence[Any] | Tensor | None = None,
            dynamic_batch: bool = True, allow_inplace_buffers: bool = False, recurrent: str = "eager",
            **torch_compile_kwargs: Any) -> nn.Module:
    """Compile a transformed model for training and inference.

    Args:
        model: usually a :class:`~fxwormhole.transformed.TransformedModule`; any ``nn.Module``
            with :class:`~fxwormhole.runtime.fixed_point.FixedPoint` submodules works.
        example_inputs: inputs for the eager preparation forward (default: what the fixed points
            saw at their last eager call, else the shapes ``transform`` recorded).
        dynamic_batch: mark dim 0 of every tensor input dynamic (one graph for all batch sizes).
        allow_inplace_buffers: do NOT force ``inplace_buffers=False``. Unsafe: in torch 2.13 it
            lets Inductor overwrite parameters during the fixed-point backward.
        recurrent: ``"eager"`` runs explicit recurrent modules eagerly between compiled graphs;
            ``"step"`` also compiles their per-step cell (``ExplicitRecurrent.compile_step``, which
            changes those modules in place).
        **torch_compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``options``,
            ``dynamic``, ``fullgraph``, ...). ``fullgraph`` defaults to True (False with recurrent
            modules); Inductor ``options`` are merged with the workaround.

    Returns:
        The compiled module (``torch.compile``'s wrapper). It shares parameters with ``model``:
        training one trains the other.

    Example::

        net = fxwormhole.transform(mlp, (x,), fxwormhole.WormholeConfig())
        fast = fxwormhole.compile(net)
        loss = fast(x).sum(); loss.backward()
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"fxwormhole.compile: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ConfigError("fxwormhole.compile: model is already compiled (a torch.compile wrapper); "
                          "pass the uncompiled module (compiled._orig_mod)")
    if recurrent not in _RECURRENT_MODES:
        raise ConfigError(f"fxwormhole.compile: recurrent={recurrent!r} is invalid: expected one of {_RECURRENT_MODES}")
    kwargs = dict(torch_compile_kwargs)
    backend = kwargs.setdefault("backend", "inductor")
    if backend == "inductor":
        _inductor_options(kwargs, allow_inplace_buffers)

    prepare(model, example_inputs)
    _warn_non_tensor_inputs(model)
    target = model
    rnns = _recurrent_modules(model)
    if rnns:
        kwargs.setdefault("fullgraph", False)
        if kwargs["fullgraph"]:
            raise ConfigError(
                f"fxwormhole.compile: fullgraph=True is impossible with explicit recurrent modules "
                f"{[n for n, _ in rnns]} (their time loop runs eagerly); leave fullgraph unset")
        if recurrent == "step":
            step_kwargs = {k: v for k, v in kwargs.items() if k in ("backend", "options", "dynamic")}
            for _, rnn in rnns:
                rnn.compile_step(**step_kwargs)
        if isinstance(model, fx.GraphModule):
            called = {str(n.target) for n in model.graph.nodes if n.op == "call_module"}
            target = _with_eager_regions(model, [n for n, _ in rnns if n in called])
    else:
        kwargs.setdefault("fullgraph", True)
    try:
        compiled = torch.compile(target, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"fxwormhole.compile: torch.compile rejected the arguments {sorted(kwargs)}: {exc}") from None
    if dynamic_batch and kwargs.get("dynamic") is not False:
        compiled.register_forward_pre_hook(_mark_batch_dynamic, with_kwargs=True)
    return compiled


compile.prepare = prepare  # type: ignore[attr-defined]  # reachable as fxwormhole.compile.prepare
