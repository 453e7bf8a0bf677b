"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule`` that later passes can rewrite.

Two front ends, tried in this order by ``front_end="auto"``:

1. ``torch.fx.symbolic_trace`` with :class:`LayerTracer`, which keeps every layer
   (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.RNN/LSTM/GRU`` and their cells) as a ``call_module`` leaf
   and traces through everything that contains one (so the layers of a residual block or a
   transformer block stay visible).
2. ``torch.export.export(model, args, kwargs, strict=False).module()``, which follows any Python
   that does not branch on data (loops over ``x.shape[1]``, kwargs-editing decorators, ...).

Export graphs are ATen-level: a layer is ``aten.linear(x, get_attr weight, get_attr bias)``. They
are *normalised* so both front ends look alike to the passes: every ATen layer op whose weights
are exactly the parameters of an ``nn.Linear``/``ConvNd``/RNN module of the model becomes one
``call_module`` node targeting that module's path, with the (deep-copied) module installed there,
so state_dict keys do not change. Finally FakeTensorProp writes ``meta["val"]`` on every node.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ._text import describe_failure
from .errors import CaptureError, ConfigError

__all__ = ["capture", "LayerTracer", "LAYER_TYPES", "FRONT_ENDS", "propagate_shapes", "placeholder_values"]

log = logging.getLogger("fxwormhole")

FRONT_ENDS = ("auto", "symbolic_trace", "export")

#: modules the toolkit treats as one layer (a "neuron layer" with weights).
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.RNNBase, nn.RNNCellBase,
)
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
# public entry point


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
    in ``model.named_modules()``), has ``meta["val"]`` on every node and
    ``gm.meta["fxwormhole"] = {"front_end", "input_shapes", "attempts", "training", "normalised"}``.
    Its ``state_dict()`` loads into ``model`` (same keys for every parameter the forward uses).

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
    if front_end not in FRONT_ENDS:
        raise ConfigError(f"capture(front_end={front_end!r}) is invalid: expected one of {FRONT_ENDS}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"capture(model=...) expects an nn.Module, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(kwargs or {})

    order = ("symbolic_trace", "export") if front_end == "auto" else (front_end,)
    attempts: dict[str, str] = {}
    for name in order:
        work = copy.deepcopy(model)  # a fresh copy per attempt: a failed trace must leave no trace
        try:
            gm = _FRONT_ENDS[name](work, args, kwargs)
        except Exception as exc:  # each front end fails in its own way; report them all
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
        gm.meta["fxwormhole"] = {
            "front_end": name,
            "input_shapes": [tuple(t.shape) for t in _tensors(args, kwargs)],
            "attempts": attempts,
            "training": model.training,
            "normalised": gm.meta.get("_fxw_normalised", 0),
        }
        gm.meta.pop("_fxw_normalised", None)
        return gm
    raise CaptureError(_capture_error_message(type(model).__name__, attempts))


# ------------------------------------------------------------------------------------------------
# front ends


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
        raise TypeError(f"forward mutates {', '.join(repr(n) for n in mutated[:5])} in place, which symbolic_trace "
                        f"cannot record (it runs once at trace time)")
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
        ep = torch.export.export(model, args, kwargs or None, strict=False,
                                 dynamic_shapes=_batch_dynamic(model, args, kwargs))
    egm = ep.module()
    n = _normalise_export_layers(egm, model)
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
    gm.meta["_fxw_normalised"] = n
    return gm


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

    Passes call this again after every rewrite (``subgraph_rewriter`` leaves empty meta).
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


# ------------------------------------------------------------------------------------------------
# normalising export graphs: ATen layer ops -> call_module


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _attr(node: Any) -> str | None:
    """The attribute path of a ``get_attr`` node (None for anything else)."""
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _owner(path: str | None) -> str | None:
    return None if path is None or "." not in path else path.rsplit(".", 1)[0]


def _tuple(v: Any, n: int) -> tuple:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        return v * n if len(v) == 1 else v
    return (int(v),) * n


def _match_linear(node: fx.Node, model: nn.Module) -> str | None:
    w, b = _attr(_arg(node, 1, "weight", None)), _arg(node, 2, "bias", None)
    return _match_weight_bias(model, w, b, nn.Linear)


def _match_weight_bias(model: nn.Module, w: str | None, b: Any, cls: type) -> str | None:
    path = _owner(w)
    mod = _get(model, path)
    if not isinstance(mod, cls) or w != f"{path}.weight":
        return None
    if (mod.bias is None) != (b is None):
        return None
    if b is not None and _attr(b) != f"{path}.bias":
        return None
    return path


def _match_conv(node: fx.Node, model: nn.Module) -> str | None:
    target = node.target
    name = getattr(target, "_schema", None) and target._schema.name  # e.g. "aten::conv2d"
    w, b = _attr(_arg(node, 1, "weight", None)), _arg(node, 2, "bias", None)
    nd = {"aten::conv1d": 1, "aten::conv2d": 2, "aten::conv3d": 3}.get(name)
    if name == "aten::convolution":
        if _arg(node, 6, "transposed", False):
            return None
        wval = node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
        nd = None if wval is None else wval.dim() - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(nd)
    path = _match_weight_bias(model, w, b, cls) if cls else None
    if path is None:
        return None
    mod = _get(model, path)
    if mod.padding_mode != "zeros":
        return None  # the module pads by itself, then calls conv with padding 0: not one op
    stride = _tuple(_arg(node, 3, "stride", 1), nd)
    padding = _arg(node, 4, "padding", 0)
    if name == "aten::convolution":
        dilation, groups = _tuple(_arg(node, 5, "dilation", 1), nd), int(_arg(node, 8, "groups", 1))
    else:
        dilation, groups = _tuple(_arg(node, 5, "dilation", 1), nd), int(_arg(node, 6, "groups", 1))
    pad_ok = padding == mod.padding if isinstance(padding, str) or isinstance(mod.padding, str) else _tuple(padding, nd) == tuple(mod.padding)
    if stride != tuple(mod.stride) or dilation != tuple(mod.dilation) or groups != mod.groups or not pad_ok:
        return None
    return path


_RNN_OPS = {"aten::lstm": (nn.LSTM, None), "aten::gru": (nn.GRU, None),
            "aten::rnn_tanh": (nn.RNN, "tanh"), "aten::rnn_relu": (nn.RNN, "relu")}
_CELL_OPS = {"aten::lstm_cell": (nn.LSTMCell, None), "aten::gru_cell": (nn.GRUCell, None),
             "aten::rnn_tanh_cell": (nn.RNNCell, "tanh"), "aten::rnn_relu_cell": (nn.RNNCell, "relu")}


def _match_rnn(node: fx.Node, model: nn.Module) -> str | None:
    if node.target._overloadname != "input":
        return None  # the "data" overload is the PackedSequence path
    cls, nonlin = _RNN_OPS[node.target._schema.name]
    params = node.args[2]
    paths = [_attr(p) for p in params]
    path = _owner(paths[0]) if paths else None
    mod = _get(model, path)
    if not isinstance(mod, cls) or (nonlin and mod.nonlinearity != nonlin):
        return None
    has_biases, num_layers, dropout, _train, bidirectional, batch_first = node.args[3:9]
    ok = (paths == [f"{path}.{n}" for n in mod._flat_weights_names] and has_biases == mod.bias
          and num_layers == mod.num_layers and float(dropout) == float(mod.dropout)
          and bidirectional == mod.bidirectional and batch_first == mod.batch_first)
    return path if ok else None


def _match_cell(node: fx.Node, model: nn.Module) -> str | None:
    cls, nonlin = _CELL_OPS[node.target._schema.name]
    w_ih, w_hh = _attr(node.args[2]), _attr(node.args[3])
    b_ih, b_hh = _arg(node, 4, "b_ih", None), _arg(node, 5, "b_hh", None)
    path = _owner(w_ih)
    mod = _get(model, path)
    if not isinstance(mod, cls) or (nonlin and mod.nonlinearity != nonlin):
        return None
    ok = w_ih == f"{path}.weight_ih" and w_hh == f"{path}.weight_hh" and (b_ih is None) == (not mod.bias)
    if ok and mod.bias:
        ok = _attr(b_ih) == f"{path}.bias_ih" and _attr(b_hh) == f"{path}.bias_hh"
    return path if ok else None


def _get(model: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


_ZEROS = {"aten::zeros", "aten::new_zeros", "aten::zeros_like"}


def _is_fresh_zeros(n: Any, user: fx.Node) -> bool:
    """A zero initial state created only for this op (the module would create it for hx=None)."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or set(n.users) != {user}:
        return False
    return getattr(getattr(n.target, "_schema", None), "name", None) in _ZEROS


def _normalise_export_layers(gm: fx.GraphModule, model: nn.Module) -> int:
    """Replace ATen layer ops that are exactly a module call by ``call_module`` nodes. Returns the count."""
    count, dead = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        op = node.target._schema.name
        try:
            if op == "aten::linear":
                path, call_args = _match_linear(node, model), (node.args[0],)
            elif op in ("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution"):
                path, call_args = _match_conv(node, model), (node.args[0],)
            elif op in _RNN_OPS:
                path, call_args = _match_rnn(node, model), _rnn_call_args(node)
            elif op in _CELL_OPS:
                path, call_args = _match_cell(node, model), _cell_call_args(node)
            else:
                continue
        except (AttributeError, IndexError, TypeError, ValueError) as exc:  # unusual op form: leave it as ATen
            log.debug("capture: not normalising %s (%s): %s", node.name, op, exc)
            continue
        if path is None:
            continue
        _install(gm, path, model.get_submodule(path))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, call_args)
        new.meta = {k: v for k, v in node.meta.items() if k != "val"}
        new.meta["fxwormhole"] = {"normalised_from": str(node.target)}
        if op == "aten::lstm":  # aten returns (out, h, c); nn.LSTM returns (out, (h, c))
            _rewire_lstm_outputs(gm, node, new)
        else:
            node.replace_all_uses_with(new)
        dead.append(node)
        count += 1
    for node in dead:
        inputs = list(node.all_input_nodes)
        gm.graph.erase_node(node)
        for i in inputs:
            if not i.users and (i.op == "get_attr" or _schema_name(i) in _ZEROS):
                gm.graph.erase_node(i)
    for node in list(gm.graph.nodes):  # weights now read by the modules themselves
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return count


def _schema_name(n: fx.Node) -> str | None:
    return getattr(getattr(n.target, "_schema", None), "name", None)


def _rnn_call_args(node: fx.Node) -> tuple:
    x, hx = node.args[0], node.args[1]
    hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    if all(_is_fresh_zeros(h, node) for h in hx):
        return (x,)
    return (x, tuple(hx)) if node.target._schema.name == "aten::lstm" else (x, hx[0])


def _cell_call_args(node: fx.Node) -> tuple:
    x, hx = node.args[0], node.args[1]
    hx_list = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    if all(_is_fresh_zeros(h, node) for h in hx_list):
        return (x,)
    return (x, tuple(hx_list)) if isinstance(hx, (list, tuple)) else (x, hx)


def _rewire_lstm_outputs(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    import operator

    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
        raise ValueError("aten.lstm result used other than through getitem")
    state = None
    for u in users:
        i = u.args[1]
        if i == 0:
            u.args = (new, 0)
            continue
        if state is None:
            with gm.graph.inserting_after(new):
                state = gm.graph.call_function(operator.getitem, (new, 1))
            state.meta = {k: v for k, v in new.meta.items() if k != "fxwormhole"}
        u.args = (state, i - 1)


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put the user's (copied) module at ``path`` of ``gm``, replacing export's plain holder."""
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    current = getattr(parent, name, None)
    if current is module:
        return
    if isinstance(current, nn.Module) and not isinstance(current, LAYER_TYPES):
        # keep anything export hung below the holder that the module does not own
        for child_name, child in current.named_children():
            if not hasattr(module, child_name):
                module.add_module(child_name, child)
    setattr(parent, name, module)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()  # point the cached weight list at the module's own parameters


# ------------------------------------------------------------------------------------------------
# error reporting


_ARITY = ("missing a required argument", "too many positional arguments", "got an unexpected keyword argument")


def _capture_error_message(model_name: str, attempts: dict[str, str]) -> str:
    tried = "; ".join(f"{name} failed with {why}" for name, why in attempts.items())
    if attempts and all(any(a in why for a in _ARITY) for why in attempts.values()):
        return (f"could not capture {model_name}: {tried}. What to do: example_inputs must hold one tensor per "
                f"positional argument of {model_name}.forward, in order (a single tensor or a tuple).")
    return (
        f"could not capture {model_name}: {tried}. "
        "What to do: remove data-dependent Python control flow from forward (an `if`/`break` on a "
        "tensor value), e.g. use torch.where or torch.cond instead of `if`, a fixed number of loop "
        "steps instead of `break`; or pass front_end='symbolic_trace' / front_end='export' "
        "(CLI: --front-end) to see one front end's error alone."
    )
