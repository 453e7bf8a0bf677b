"""What counts as a neuron layer, by what it computes.

A neuron layer holds a weight whose slices are the input weights of its output neurons:

* **layer modules**: torch's ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
  ``nn.RNN/LSTM/GRU`` and their cells (:data:`LAYER_TYPES`), and any module that holds only a
  2-D weight (and a bias) and whose forward is one matrix product against that weight, found by
  tracing the forward alone (:func:`matmul_form`): transformers' ``Conv1D``
  (``addmm(bias, x.view(-1, nx), weight)``), a hand-written ``x @ self.W + self.b``;
* **matrix products against a parameter** inside a bigger module (pytorch/examples' GAT:
  ``torch.mm(h, self.W)``): a graph node, not a module (:func:`parameter_product`).

Each kind knows which dim of its weight holds the output neurons (:func:`weight_out_dim`):
``nn.Linear`` and ``ConvNd`` keep them in dim 0 (``[out, in, k...]``), ``ConvTransposeNd`` in dim 1
(``[in, out/groups, k...]``), a matrix product ``x @ W`` in the last dim (``W`` is ``[in, out]``).
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LAYER_TYPES", "MatmulForm", "matmul_form", "is_layer_module", "layer_kind", "weight_out_dim",
           "parameter_product", "MATMUL_OPS"]

#: torch modules the toolkit treats as one layer (a "neuron layer" with weights).
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.RNNBase, nn.RNNCellBase,
)

_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"), (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"),
    (nn.ConvTranspose1d, "conv_transpose1d"), (nn.ConvTranspose2d, "conv_transpose2d"),
    (nn.ConvTranspose3d, "conv_transpose3d"),
    (nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.RNN, "rnn"),
    (nn.LSTMCell, "lstm_cell"), (nn.GRUCell, "gru_cell"), (nn.RNNCell, "rnn_cell"),
)


@dataclass(frozen=True)
class MatmulForm:
    """How a parameter-only module computes its output: ``x @ W (+ b)`` or ``x @ W.T (+ b)``."""

    weight: str  # parameter name of the 2-D weight
    bias: str | None  # parameter name of the bias, if it has one
    out_dim: int  # dim of the weight holding the output neurons (1 for x @ W, 0 for x @ W.T)


_FORMS: "weakref.WeakKeyDictionary[nn.Module, MatmulForm | None]" = weakref.WeakKeyDictionary()


def matmul_form(module: nn.Module) -> MatmulForm | None:
    """The :class:`MatmulForm` of a module whose forward is one matrix product against its own
    2-D weight (plus its bias and reshapes), else None. Torch's own modules are never matmul forms
    (their kinds are known); the answer is cached per module object."""
    if type(module).__module__.startswith("torch.") or not isinstance(module, nn.Module):
        return None
    if module in _FORMS:
        return _FORMS[module]
    form = None
    params = dict(module.named_parameters(recurse=False))
    weights = [n for n, p in params.items() if p.dim() == 2]
    if len(weights) == 1 and not list(module.children()) and not list(module.buffers()) and len(params) <= 2:
        try:
            form = _traced_form(module, weights[0], params)
        except Exception:  # noqa: BLE001 - a forward fx cannot trace alone is not a plain matrix product
            form = None
    _FORMS[module] = form
    return form


def is_layer_module(module: Any) -> bool:
    """True for a layer module (see the module docstring)."""
    return isinstance(module, LAYER_TYPES) or (isinstance(module, nn.Module) and matmul_form(module) is not None)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"conv_transpose2d"``, ``"lstm"``, ``"gru_cell"``, ``"matmul"`` (a
    matrix-product module), ... for a layer module, else None."""
    kind = next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)
    if kind is None and matmul_form(module) is not None:
        kind = "matmul"
    return kind


def weight_out_dim(module: nn.Module) -> int:
    """The dim of the layer's weight that holds its output neurons (see the module docstring)."""
    form = matmul_form(module)
    if form is not None:
        return form.out_dim
    return 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0


# ------------------------------------------------------------------------------------------------
# tracing a module's forward alone

#: matrix products against a weight, at torch level and at ATen level (export graphs)
MATMUL_OPS = {torch.mm, torch.matmul, torch.addmm, operator.matmul, F.linear, torch._C._nn.linear}
_ATEN_MATMUL = {"aten::mm", "aten::matmul", "aten::addmm", "aten::linear"}
_TRANSPOSES = {"t", "T", "mT"}
_RESHAPES = {"view", "reshape", "contiguous", "flatten", "view_as", "reshape_as"}
_ADDS = {operator.add, torch.add, "add"}


def _traced_form(module: nn.Module, weight: str, params: dict) -> MatmulForm | None:
    graph = fx.Tracer().trace(module)
    data: set[fx.Node] = set()  # nodes whose value is computed from the input's data (not its size)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders or any(p.users for p in placeholders[1:]):
        return None
    data.add(placeholders[0])
    product, out_dim, bias = None, 0, None
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        reads_data = [a for a in node.all_input_nodes if a in data]
        if not reads_data:
            continue  # sizes and constants
        target = node.target
        name = target if isinstance(target, str) else None
        if node.op == "call_method" and name in ("size", "dim") or (node.op == "call_function" and target is getattr
                                                                   and node.args[1] in ("shape", "ndim")):
            continue  # the input's size, not its data
        if node.op == "call_function" and target in MATMUL_OPS or node.op == "call_method" and name == "matmul":
            found = _product_weight(node, weight)
            if product is not None or found is None:
                return None
            product, out_dim, bias = node, found[0], found[1]
        elif node.op == "call_method" and name in _RESHAPES:
            pass
        elif (target in _ADDS and node.op in ("call_function", "call_method") and product is not None
              and len(node.args) == 2 and bias is None):
            other = next((a for a in node.args if a not in data), None)
            if not (isinstance(other, fx.Node) and other.op == "get_attr" and params.get(other.target) is not None
                    and params[other.target].dim() == 1):
                return None
            bias = other.target
        else:
            return None
        data.add(node)
    out = next(n for n in graph.nodes if n.op == "output")
    if product is None or len(out.all_input_nodes) != 1 or out.all_input_nodes[0] not in data:
        return None
    if len(params) == 2 and bias is None:
        return None  # a second parameter the product does not use
    if bias is not None and params[bias].shape[0] != params[weight].shape[out_dim]:
        return None
    return MatmulForm(weight=weight, bias=bias, out_dim=out_dim)


def _product_weight(node: fx.Node, weight: str) -> tuple[int, str | None] | None:
    """(out_dim, bias name) when ``node`` multiplies the data by the module's weight (or its transpose)."""
    target = node.target
    args = list(node.args)
    if target in (F.linear, torch._C._nn.linear):
        w, b = args[1], (args[2] if len(args) > 2 else node.kwargs.get("bias"))
        transposed = True  # linear(x, W) = x @ W.T
    elif target is torch.addmm:
        b, _, w = args[:3]
        transposed = False
    else:
        if len(args) != 2:
            return None
        w, b, transposed = args[1], None, False
    flips = 0
    while isinstance(w, fx.Node) and (w.op == "call_method" and w.target in _TRANSPOSES
                                      or w.op == "call_function" and w.target is getattr and w.args[1] in _TRANSPOSES):
        w, flips = w.args[0], flips + 1
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target == weight):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    out_dim = 0 if (transposed + flips) % 2 else 1
    return out_dim, (b.target if b is not None else None)


# ------------------------------------------------------------------------------------------------
# matrix products against a parameter in a captured graph


def parameter_product(node: fx.Node, root: nn.Module | None = None) -> tuple[str, int, fx.Node] | None:
    """``(parameter path, out_dim, data input)`` when ``node`` is a matrix product of data with a
    parameter (``mm(h, W)``, ``matmul(h, W)``, ``addmm(b, h, W)``, ``linear(h, W)``) read by ``get_attr``.

    Parameters of torch's own modules do not count (``nn.MultiheadAttention``'s packed ``in_proj``,
    ``F.linear(x, self.fc.weight)`` on an ``nn.Linear``): their layers are the modules. ``root``:
    the graph's module, to look the parameter's owner up in.
    """
    if node.op != "call_function":
        return None
    schema = getattr(getattr(node.target, "_schema", None), "name", None)
    if node.target not in MATMUL_OPS and schema not in _ATEN_MATMUL:
        return None
    linear = node.target in (F.linear, torch._C._nn.linear) or schema == "aten::linear"
    args = list(node.args)
    w = args[2] if (node.target is torch.addmm or schema == "aten::addmm") and len(args) > 2 else (
        args[1] if len(args) > 1 else None)
    data = args[1] if (node.target is torch.addmm or schema == "aten::addmm") else (args[0] if args else None)
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or not isinstance(data, fx.Node) or data.op == "get_attr":
        return None
    val = w.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() != 2 or _owned_by_torch(node, w.target, root):
        return None
    return w.target, (0 if linear else 1), data


def _owned_by_torch(node: fx.Node, path: str, root: nn.Module | None) -> bool:
    owner = path.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    kind = next((v[1] for v in stack.values() if v and v[0] == owner), None)
    if kind is not None:
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        return name.startswith("torch.")
    try:
        module = root.get_submodule(owner) if root is not None and owner else None
    except AttributeError:
        module = None
    # export keeps plain nn.Module holders: those say nothing about the owner
    return module is not None and type(module) is not nn.Module and type(module).__module__.startswith("torch.nn")
