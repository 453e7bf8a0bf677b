"""Annotate pass: mark every neuron layer with what its sensitivity probe needs.

Writes ``NodeInfo.sensitivity`` (a :class:`~fxwormhole.passes.meta.SensitivityAnnotation`) on every
layer ``call_module`` node (Linear, Conv1d/2d/3d, RNN/LSTM/GRU, their cells, and fxwormhole's
explicit recurrent twins), in the graph and in every GraphModule nested in it (fixed-point bodies),
like torchao's ``prepare_pt2e``
recurses into ``while_loop`` bodies. Nothing is inserted: :class:`SensitivityInsert` materialises
the probes from these annotations, so a plan can be inspected (and tested) without running it.

Annotation fields: ``layer`` (module path from the root GraphModule), ``target`` (path inside the
graph being annotated), ``kind``, ``activation`` (registry name; ``identity`` for a layer with no
activation after it, e.g. an output layer), ``activation_params``, ``source`` (``sympy`` or
``autograd``), ``derivatives``, ``neurons``, ``calls`` (call sites of the module in this graph, for
averaging over time), ``recurrent_only`` and, for recurrent kinds, ``gates`` (from
:data:`fxwormhole.runtime.gates.RECURRENT_LAYOUTS`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..analysis import Layer, layer_kind, layer_table
from ..config import SALConfig
from ..errors import ConfigError
from .activations import Derivatives, derivatives, derivatives_of_callable, registered_form
from ..runtime.gates import layout_of_kind
from .meta import SensitivityAnnotation, node_info, update_node

__all__ = ["SensitivityAnnotate", "ActivationSpec", "graph_modules", "recurrent_kind"]

#: per-layer activation override: a registered name, or an elementwise callable / activation module
ActivationSpec = Union[str, Callable[..., Any], nn.Module]
_DENSE = ("linear", "conv1d", "conv2d", "conv3d")
_EXPLICIT_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn", "RNN_RELU": "rnn"}


def graph_modules(gm: fx.GraphModule) -> Iterator[Tuple[str, fx.GraphModule]]:
    """``gm`` itself (prefix ``""``) and every GraphModule nested in it, with its module path."""
    yield "", gm
    for name, mod in gm.named_modules():
        if mod is not gm and isinstance(mod, fx.GraphModule):
            yield name, mod


def recurrent_kind(module: nn.Module) -> Optional[str]:
    """Layer kind of a torch recurrent module or of fxwormhole's explicit twin (ExplicitLSTM, ...)."""
    mode = getattr(module, "mode", None)
    if isinstance(mode, str) and mode in _EXPLICIT_MODES and hasattr(module, "weight_ih_l0"):
        return _EXPLICIT_MODES[mode]
    kind = layer_kind(module)
    return kind if kind is not None and kind not in _DENSE else None


def _gate_activations(module: nn.Module, kind: str) -> Tuple[str, ...]:
    return layout_of_kind(kind, getattr(module, "nonlinearity", "tanh")).activations


def _neurons(module: nn.Module, kind: str) -> int:
    if kind in _DENSE:
        return int(module.weight.shape[0])
    gates = len(_gate_activations(module, kind))
    layers = getattr(module, "num_layers", 1)
    dirs = 2 if getattr(module, "bidirectional", False) else 1
    return gates * module.hidden_size * layers * dirs


def _activation_callable(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    """The elementwise function an activation node computes, as a one-argument callable."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda t: getattr(t, node.target)(*node.args[1:], **node.kwargs)
    return functools.partial(_call_first, node.target, node.args[1:], dict(node.kwargs))


def _call_first(fn: Callable[..., Any], rest: tuple, kwargs: dict, t: Any) -> Any:
    return fn(t, *rest, **kwargs)


class SensitivityAnnotate(PassBase):
    """Annotate every neuron layer for sensitivity probes (see the module docstring).

    Args:
        sal: the SAL configuration (``recurrent_only`` is recorded; the rest is read at insertion).
        activations: optional overrides by layer path: a registered activation name (e.g.
            ``"shifted_sigmoid"``) or an elementwise callable / activation module. Use it where the
            activation is not the node right after the layer (the analysis sees only that node).
    """

    def __init__(self, sal: Optional[SALConfig] = None, activations: Optional[Mapping[str, ActivationSpec]] = None):
        super().__init__()
        self.sal = sal if sal is not None else SALConfig(enabled=False)
        self.activations = dict(activations or {})

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        found = set()
        modified = False
        for prefix, gm in graph_modules(graph_module):
            rows = layer_table(gm)
            calls: Dict[str, int] = {}
            for row in rows:
                calls[row.name] = calls.get(row.name, 0) + 1
            nodes = {n.name: n for n in gm.graph.nodes}
            for row in rows:
                node = nodes[row.node]
                if node_info(node).sensitivity is not None:
                    continue
                path = f"{prefix}.{row.name}" if prefix else row.name
                update_node(node, sensitivity=self._annotation(gm, node, row, path, calls[row.name]))
                found.add(path)
                modified = True
            for node in gm.graph.nodes:  # explicit recurrent twins are not in the layer table
                if node.op != "call_module" or node_info(node).sensitivity is not None:
                    continue
                mod = gm.get_submodule(node.target)
                kind = recurrent_kind(mod)
                if kind is None or layer_kind(mod) is not None:
                    continue
                path = f"{prefix}.{node.target}" if prefix else node.target
                n_calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
                update_node(node, sensitivity=self._recurrent(mod, kind, path, node.target, n_calls))
                found.add(path)
                modified = True
        unknown = set(self.activations) - found
        if unknown:
            raise ConfigError(f"SensitivityAnnotate: activation overrides name no neuron layer: {sorted(unknown)}; "
                              f"layers found: {sorted(found)}")
        return PassResult(graph_module, modified)

    # ---------------------------------------------------------------------------------------
    def _annotation(self, gm: fx.GraphModule, node: fx.Node, row: Layer, path: str, n_calls: int) -> SensitivityAnnotation:
        module = gm.get_submodule(row.name)
        if row.kind not in _DENSE:
            return self._recurrent(module, row.kind, path, row.name, n_calls)
        name, params, deriv = self._dense_activation(gm, row, path)
        return SensitivityAnnotation(layer=path, target=row.name, kind=row.kind, activation=name,
                                     activation_params=params, source=deriv.source, derivatives=deriv,
                                     neurons=_neurons(module, row.kind), calls=n_calls, recurrent_only=False)

    def _recurrent(self, module: nn.Module, kind: str, path: str, target: str, n_calls: int) -> SensitivityAnnotation:
        if path in self.activations:
            raise ConfigError(f"SensitivityAnnotate: activation override for recurrent layer {path!r}: gate "
                              "activations are fixed by the module type; remove the override")
        gates = _gate_activations(module, kind)
        return SensitivityAnnotation(layer=path, target=target, kind=kind, activation="/".join(gates),
                                     activation_params={}, source="sympy", neurons=_neurons(module, kind),
                                     calls=n_calls, recurrent_only=self.sal.recurrent_only, gates=gates)

    def _dense_activation(self, gm: fx.GraphModule, row: Layer, path: str) -> Tuple[str, Dict[str, Any], Derivatives]:
        override = self.activations.get(path)
        if isinstance(override, str):
            return override, {}, derivatives(override)
        if override is not None:
            d = derivatives_of_callable(override)
            return d.name, {}, d
        if row.activation is None:
            return "identity", {}, derivatives("identity")  # output layer / no activation: f' = 1
        params = dict(row.activation_params)
        form = registered_form(row.activation, params)
        if form is not None:
            name, known = form
            return name, known, derivatives(name, **known)
        act_node = next(n for n in gm.graph.nodes if n.name == row.activation_node)
        d = derivatives_of_callable(_activation_callable(gm, act_node), name=row.activation)
        return row.activation, params, d
