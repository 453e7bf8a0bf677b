"""Normalise pass: ATen layer ops of an export graph become ``call_module`` nodes of the user's layers.

``torch.export`` graphs are ATen-level: a layer is ``aten.linear(x, get_attr weight, get_attr bias)``.
This pass makes them look like ``symbolic_trace`` graphs to every later pass: each ATen layer op
whose weights are *exactly* the parameters of an ``nn.Linear``/``ConvNd``/RNN/cell module of the
model (same tensors in the same slots; for convolutions the same stride/padding/dilation/groups; for
RNNs the same layers/bidirectional/batch_first/dropout) becomes one ``call_module`` node targeting that
module's path, and the module (the front end's deep copy) is installed there, so ``state_dict`` keys
do not change. The check is semantic, so it also holds for a module called functionally
(``F.linear(x, self.a.weight, self.a.bias)``) and for weight sharing (one module, several nodes).

Handled ops: ``aten.linear``, ``aten.conv1d/2d/3d`` (also the string-padding overloads),
``aten.convolution`` (not transposed), ``aten.lstm/gru/rnn_tanh/rnn_relu.input`` and the four cell
ops. A zero initial state created only for the op becomes "no state" (``cell(x)``, as the module
would); ``aten.lstm``'s ``(out, h, c)`` is re-read from ``nn.LSTM``'s ``(out, (h, c))``. Ops that do
not match stay ATen. The new node takes over the ATen node's metadata (``nn_module_stack``, shapes,
``NodeInfo.origin``) plus ``NodeInfo.normalised_from``; ``GraphRecord.normalised`` counts them.
"""
from __future__ import annotations

import logging
import operator
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..analysis import LAYER_TYPES
from .meta import KEY, graph_record, update_graph, update_node

__all__ = ["NormaliseExport"]

log = logging.getLogger("fxwormhole")


class NormaliseExport(PassBase):
    """Turn ATen layer ops into ``call_module`` nodes of ``source``'s layers (see the module docstring).

    Args:
        source: the module the export front end traced (its deep copy of the user's model): the
            layers installed into the graph are taken from it.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.source = source

    def call(self, gm: fx.GraphModule) -> PassResult:
        count = _normalise(gm, self.source)
        if count:
            gm.graph.lint()
            gm.recompile()
        update_graph(gm, normalised=(graph_record(gm).normalised or 0) + count)
        return PassResult(gm, bool(count))


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


def _normalise(gm: fx.GraphModule, model: nn.Module) -> int:
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
            log.debug("NormaliseExport: not normalising %s (%s): %s", node.name, op, exc)
            continue
        if path is None:
            continue
        _install(gm, path, model.get_submodule(path))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, call_args)
        # The module computes the op's value: it takes over its metadata (stack, shapes, origin).
        new.meta = dict(node.meta)
        update_node(new, normalised_from=str(node.target))
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
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
        raise ValueError("aten.lstm result used other than through getitem")
    out, h, c = node.meta.get("val") or (None, None, None)
    new.meta["val"] = (out, (h, c))
    state = None
    for u in users:
        i = u.args[1]
        if i == 0:
            u.args = (new, 0)
            continue
        if state is None:
            with gm.graph.inserting_after(new):
                state = gm.graph.call_function(operator.getitem, (new, 1))
            state.meta = {k: v for k, v in new.meta.items() if k != KEY}
            state.meta["val"] = (h, c)
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
