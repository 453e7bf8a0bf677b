"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule`` that later passes can rewrite.

Two front ends, tried in this order by ``front_end="auto"``:

1. ``torch.fx.symbolic_trace`` with :class:`LayerTracer`, which keeps every layer
   (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.RNN/LSTM/GRU`` and their cells) as a ``call_module`` leaf
   and traces through everything that contains one (so the layers of a residual block or a
   transformer block stay visible).
2. ``torch.export.export(model, args, kwargs, strict=False).module()``, which follows any Python
   that does not branch on data (loops over ``x.shape[1]``, kwargs-editing decorators, ...).

Then FakeTensorProp writes ``meta["val"]`` on every node (:func:`propagate_shapes`). That is all
:func:`capture_graph` does; :func:`capture` also runs
:class:`~fxwormhole.passes.normalise_export.NormaliseExport` on export graphs, so that both front ends
hold the model's layers as ``call_module`` nodes (``fxwormhole.transform`` runs that pass as the first
of its pipeline instead).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ._text import capture_failure_message, describe_failure
from .analysis import LAYER_TYPES
from .errors import CaptureError, ConfigError
from .passes._common import run_passes
from .passes.meta import KEY, GraphRecord, graph_record
from .passes.pipeline import capture_passes

__all__ = ["capture", "capture_graph", "Captured", "LayerTracer", "LAYER_TYPES", "FRONT_ENDS", "propagate_shapes",
           "placeholder_values"]

log = logging.getLogger("fxwormhole")

FRONT_ENDS = ("auto", "symbolic_trace", "export")

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class LayerTracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are the layers, plus torch.nn modules that contain no layer.

    torch's default tracer keeps *every* ``torch.nn`` module opaque, which would hide the
    ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer``; this one traces into any module
    that holds a layer, so every layer is its own ``call_module`` node.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, LAYER_TYPES):
            return True
        if isinstance(m, _CONTAINERS):
            return False
        if any(isinstance(c, LAYER_TYPES) for c in m.modules() if c is not m):
            return False
        return super().is_leaf_module(m, module_qualified_name)


# ------------------------------------------------------------------------------------------------
# public entry points


@dataclass
class Captured:
    """What a front end produced: the graph (with shapes and its :class:`GraphRecord`) and the deep
    copy of the model it traced, whose modules the normalise pass installs into an export graph."""

    graph_module: fx.GraphModule
    source: nn.Module

    @property
    def front_end(self) -> str:
        return graph_record(self.graph_module).front_end  # type: ignore[return-value]


def capture(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    kwargs: dict | None = None,
    front_end: str = "auto",
) -> fx.GraphModule:
    """Capture ``model`` called as ``model(*example_inputs, **kwargs)`` as a GraphModule.

    The model is deep-copied first and never mutated. The returned GraphModule computes the same
    outputs, holds the model's layers as ``call_module`` nodes (``node.target`` is the module path
    in ``model.named_modules()``), has ``meta["val"]`` on every node and a
    :class:`~fxwormhole.passes.meta.GraphRecord` in ``gm.meta["fxwormhole"]`` (``front_end``,
    ``input_shapes``, ``attempts``, ``training``, ``normalised``). Its ``state_dict()`` loads into
    ``model`` (same keys for every parameter the forward uses).

    Args:
        model: the module to capture.
        example_inputs: one tensor or a tuple of positional arguments.
        kwargs: keyword arguments of the example call (tensors become graph inputs; other values
            are specialised).
        front_end: ``"auto"`` (symbolic_trace, then torch.export), ``"symbolic_trace"`` or ``"export"``.

    Raises:
        ConfigError: bad ``front_end`` or arguments.
        CaptureError: no front end could capture the model; the message names the failing line
            or op of each front end tried and what to change.
    """
    captured = capture_graph(model, example_inputs, kwargs=kwargs, front_end=front_end)
    return run_passes(captured.graph_module, capture_passes(captured))


def capture_graph(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    *,
    kwargs: dict | None = None,
    front_end: str = "auto",
) -> Captured:
    """The front end's graph, with ``meta["val"]`` on every node, not rewritten (see :func:`capture`)."""
    if front_end not in FRONT_ENDS:
        raise ConfigError(f"capture(front_end={front_end!r}) is invalid: expected one of {FRONT_ENDS}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"capture(model=...) expects an nn.Module, got {type(model).__name__}")
    refuse_rewritten(model)
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(kwargs or {})

    order = ("symbolic_trace", "export") if front_end == "auto" else (front_end,)
    attempts: dict[str, str] = {}
    for name in order:
        work = copy.deepcopy(model)  # a fresh copy per attempt: a failed trace must leave no trace
        try:
            gm = _FRONT_ENDS[name](work, args, kwargs)
        except Exception as exc:  # each front end fails in its own way; report them all
            if isinstance(exc, InPlaceUpdateError) and order == ("symbolic_trace",):
                # the generic advice (data-dependent control flow) would not fit this model
                raise CaptureError(
                    f"could not capture {type(model).__name__} with front_end='symbolic_trace': {exc}. What to do: "
                    f"pass front_end='export' (or 'auto'; CLI: --front-end), which records the update") from None
            attempts[name] = describe_failure(exc)
            log.debug("capture: %s failed: %s", name, attempts[name])
            continue
        gm.training = model.training
        for node in gm.graph.nodes:  # string annotations (PEP 563 sources) break GraphModule pickling
            if isinstance(node.type, str):
                node.type = None
        gm.recompile()
        try:
            # FakeTensor logs a traceback of a failing op at ERROR level; the CaptureError says it in one line
            with _quiet(("torch._subclasses.fake_tensor",), logging.CRITICAL):
                propagate_shapes(gm, args, kwargs)
        except Exception as exc:  # the trace is shape-agnostic: wrong shapes surface only here
            raise CaptureError(
                f"{type(model).__name__}: the example inputs do not fit the model: running the captured graph on "
                f"them failed with {describe_failure(exc)}; pass example_inputs that model(*example_inputs) "
                f"accepts (check their number, shapes and dtypes)") from exc
        gm.meta[KEY] = GraphRecord(front_end=name, input_shapes=tuple(tuple(t.shape) for t in _tensors(args, kwargs)),
                                   attempts=attempts, training=model.training, normalised=0)
        return Captured(gm, work)
    raise CaptureError(capture_failure_message(type(model).__name__, attempts))


def refuse_rewritten(model: nn.Module) -> None:
    """Refuse a model that is, or holds, what fxwormhole made: a transformed, instrumented or exported model.

    Neither front end can trace fxwormhole's own runtime: symbolic_trace hands a fixed point a Proxy,
    and export either fails inside the solve or inlines the probes and drops their SAL gradient.
    Rewriting a rewritten model is not supported; one transform with every wormhole (and ``sal=``)
    is. Raises :class:`ConfigError` saying what the model is, where, and what to do.
    """
    from .export import ExportedModel
    from .runtime.fixed_point import FixedPoint
    from .runtime.recurrent import ExplicitRecurrent
    from .runtime.sensitivity import NeuronProbe
    from .transformed import TransformedModule

    def where(path: str) -> str:
        return f"the model ({type(model).__name__})" if not path else f"submodule {path!r} of {type(model).__name__}"

    def cycles(module: nn.Module) -> list[str]:
        return [name for name, m in module.named_modules() if isinstance(m, FixedPoint)
                or (isinstance(m, ExplicitRecurrent) and m.temporal_pairs)]

    original = ("transform the original model once instead, with every wormhole you want in one "
                "WormholeConfig(wormholes=[...]) and sal=SALConfig(...) for sensitivity probes")
    for path, m in model.named_modules():
        if isinstance(m, ExportedModel):
            raise ConfigError(
                f"{where(path)} is an inference-only artifact loaded by fxwormhole.export.load from {str(m.path)!r}; "
                f"fxwormhole cannot rewrite it: run it as it is, or {original} and export that")
        if isinstance(m, TransformedModule) or (isinstance(m, ExplicitRecurrent) and m.temporal_pairs):
            holds = ", ".join(cycles(m)[:3]) or "wormholes"
            by = "fxwormhole.transform" if isinstance(m, TransformedModule) else "fxwormhole's add_temporal_wormhole"
            raise ConfigError(
                f"{where(path)} is already transformed by {by} (it holds {holds}); fxwormhole does not rewrite its "
                f"own output: {original}")
        if isinstance(m, FixedPoint):
            raise ConfigError(
                f"{where(path)} is an fxwormhole FixedPoint; neither front end can trace the solve loop of a fixed "
                f"point: transform the modules around it separately, or let fxwormhole.transform build the cycle "
                f"(a wormhole from the layer that feeds back to the layer it feeds)")
        if isinstance(m, NeuronProbe):
            owner = path.rpartition(".")[0]
            inside = f"{owner}." if owner else ""
            probes = [p for p, q in model.named_modules() if isinstance(q, NeuronProbe) and p.startswith(inside)]
            raise ConfigError(
                f"{where(owner)} is already instrumented by fxwormhole.instrument (sensitivity probes at "
                f"{', '.join(probes[:3])}{', ...' if len(probes) > 3 else ''}); to change the SAL settings use "
                f"fxwormhole.SAL(model).configure(...); to add wormholes as well, transform the original model "
                f"with sal=SALConfig(...)")


# ------------------------------------------------------------------------------------------------
# front ends


class InPlaceUpdateError(TypeError):
    """symbolic_trace ran an in-place update of a parameter or buffer that its graph cannot hold."""


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise TypeError("forward takes *args/**kwargs, which symbolic_trace cannot bind to placeholders")
    # Tensors become placeholders; everything else (None, flags, sizes) is specialised.
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    before = _state_versions(model)
    graph = LayerTracer().trace(model, concrete_args=concrete or None)
    mutated = [name for name, version in _state_versions(model).items() if before.get(name) != version]
    if mutated:
        # The tracer ran `self.calls.add_(1)` once on the real tensor and recorded nothing: the graph
        # would neither update the buffer nor (unused by any node) keep it in its state_dict.
        raise InPlaceUpdateError(f"forward mutates {', '.join(repr(n) for n in mutated[:5])} in place, which "
                                  f"symbolic_trace cannot record (it runs once at trace time)")
    for node in graph.nodes:  # fx renames specialised args `h` -> `h_1`; keep the user's names
        if node.op == "placeholder" and node.target.endswith("_1") and node.target[:-2] in concrete:
            node.target = node.target[:-2]
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    return gm


def _state_versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Identity and version counter of every parameter and buffer: in-place writes bump the version,
    rebinding (``self.n = self.n + 1``) changes the identity."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (id(t), t._version) for name, t in tensors}


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    # Failures are reported by CaptureError; export also prints its partial graph to stderr.
    with _quiet(_NOISY_LOGGERS), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        # RNN modules rebuild their _flat_weights list while traced; harmless, re-synced below
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
        ep = _export_program(model, args, kwargs)
    egm = ep.module()
    if isinstance(getattr(egm, "_guards_fn", None), nn.Module):
        # export's guard (refusing, e.g., a sequence length the export specialised) is a closure
        # that cannot be pickled: enforce the same contract with a module that can
        shapes = [_static_shape(n.meta.get("val")) for n in egm.graph.nodes if n.op == "placeholder"]
        egm._guards_fn = InputShapeGuard(type(model).__name__, shapes)
    egm.graph.lint()
    # GraphModule's unpickler re-traces with the recorded tracer class; export's needs arguments
    egm.graph._tracer_cls = None
    # Re-wrap as a plain GraphModule: ep.module() refuses .train()/.eval(), which passes need.
    gm = fx.GraphModule(egm, egm.graph, class_name=type(model).__name__)
    gm.meta.update(egm.meta)
    return gm


def _export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` with the batch symbolic, also for an example batch of 0 or 1.

    torch.export specialises a dimension whose example size is 0 or 1, so a batch-1 example would give
    a model that refuses every other batch size. Such examples are traced at batch 2 (the sample
    repeated, or zeros for an empty batch; export traces with fake values, so only shapes matter),
    as TensorRT-LLM does; a model that truly needs its example batch still gets it, specialised.
    """
    def export(a: tuple, k: dict) -> torch.export.ExportedProgram:
        return torch.export.export(model, a, k or None, strict=False, dynamic_shapes=_batch_dynamic(model, a, k))

    batches = {t.shape[0] for t in _tensors(args, kwargs) if t.dim() > 0}
    if len(batches) != 1 or batches.pop() > 1:
        return export(args, kwargs)

    def two(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        return v.expand(2, *v.shape[1:]).clone() if len(v) == 1 else v.new_zeros((2, *v.shape[1:]))

    try:
        return export(*torch.utils._pytree.tree_map(two, (args, kwargs)))
    except Exception:  # noqa: BLE001 - the model depends on its example batch: trace that one
        return export(args, kwargs)


def _static_shape(val: Any) -> tuple | None:
    """A fake value's shape with symbolic dims as None (None for non-tensors)."""
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else None for d in val.shape)


class InputShapeGuard(nn.Module):
    """Refuses inputs whose fixed dims differ from those torch.export specialised the graph to."""

    def __init__(self, model_name: str, shapes: Sequence[tuple | None]):
        super().__init__()
        self.model_name, self.shapes = model_name, [None if s is None else tuple(s) for s in shapes]

    def forward(self, *inputs: Any) -> None:
        for i, (x, want) in enumerate(zip(inputs, self.shapes)):
            if want is None or not isinstance(x, torch.Tensor):
                continue
            if x.dim() != len(want) or any(w is not None and w != d for w, d in zip(want, x.shape)):
                raise CaptureError(
                    f"{self.model_name}: input {i} has shape {tuple(x.shape)}, but torch.export captured this graph "
                    f"for shape {tuple('*' if w is None else w for w in want)} (* = any size); capture or transform "
                    f"again with example inputs of the new shape")


def _batch_dynamic(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """Let export keep dim 0 (the batch) symbolic where the model allows it (``Dim.AUTO``).

    Without this, export bakes the example batch size into the graph and the captured module
    refuses any other batch; AUTO never fails: a dimension the model fixes is specialised.
    """
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    auto = torch.export.Dim.AUTO

    def leaf(v: Any) -> Any:
        return {0: auto} if isinstance(v, torch.Tensor) and v.dim() > 0 else None

    return {k: torch.utils._pytree.tree_map(leaf, v) for k, v in bound.arguments.items()}


_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet(names: Sequence[str], level: int = logging.ERROR):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_FRONT_ENDS: dict[str, Callable[[nn.Module, tuple, dict], fx.GraphModule]] = {
    "symbolic_trace": _symbolic_trace,
    "export": _export,
}


# ------------------------------------------------------------------------------------------------
# shapes


def placeholder_values(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> list[Any]:
    """The value of each placeholder of ``gm`` (in graph order) for the call ``gm(*args, **kwargs)``."""
    kwargs = kwargs or {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    info = getattr(gm.graph._codegen, "pytree_info", None)  # export graphs take pytree inputs
    spec = getattr(info, "in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        flat = tree_flatten_spec((list(args), kwargs), spec)
        if len(flat) == len(placeholders):
            return list(flat)
    code_sig = inspect.signature(gm.forward)
    bound = code_sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())[: len(placeholders)]


def propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> None:
    """Write ``meta["val"]`` (a FakeTensor) on every node by running FakeTensorProp.

    Capture runs it once; the passes write ``meta["val"]`` on every node they add (the pipeline
    check verifies it), so nothing re-runs it. Buffers the fake run would touch are restored.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from .passes._common import state_preserved

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in placeholder_values(gm, args, kwargs)]
    # Real buffers enter the fake run: BatchNorm's ``num_batches_tracked += 1`` would really happen.
    with state_preserved(gm), mode:
        FakeTensorProp(gm, mode).run(*values, enable_io_processing=False)
    for node in gm.graph.nodes:  # nodes that return nothing (export's input guard) get no value
        if node.op != "output":
            node.meta.setdefault("val", None)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor)]
