"""Insert pass: materialise the sensitivity probes planned by :class:`SensitivityAnnotate`.

* Dense layers (Linear, ConvNd): the layer's ``call_module`` node is replaced by a call of a
  :class:`~fxwormhole.runtime.sensitivity.DenseProbe` that receives the layer input and the layer's
  own ``weight``/``bias`` (``get_attr`` nodes, so parameter names and ``state_dict`` keys stay) and
  computes the same functional op. One probe per module, shared by all its call sites.
* Recurrent modules and cells: the ``call_module`` node stays; a
  :class:`~fxwormhole.runtime.sensitivity.RecurrentProbe` call is inserted after it, receiving the
  module's output, input, initial state and parameters, and its result replaces the module's
  output for every user.

Probes never change values: eval-mode outputs are identical, training-mode outputs too (only the
gradients gain the SAL term). Nested GraphModules (fixed-point bodies) get their own probes.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import SALConfig
from ..errors import PlacementError
from ..runtime.sensitivity import DenseProbe, NeuronProbe, RecurrentProbe, probes_of
from ._common import fake_value
from .meta import KEY, SensitivityAnnotation, SensitivityRecord, node_info, update_graph, update_node
from .sensitivity_annotate import graph_modules

__all__ = ["SensitivityInsert", "PROBE_PREFIX"]

PROBE_PREFIX = "sal_probe_"


def _arg(node: fx.Node, i: int, name: str) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name)


def _get_attr(gm: fx.GraphModule, target: str) -> fx.Node:
    """A ``get_attr`` node with its value in ``meta["val"]`` (a fake tensor when the graph has them)."""
    node = gm.graph.get_attr(target)
    node.meta["val"] = fake_value(gm, gm.get_parameter(target))
    return node


def _unique_name(gm: fx.GraphModule, target: str) -> str:
    base = PROBE_PREFIX + target.replace(".", "_")
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


class SensitivityInsert(PassBase):
    """Insert a probe for every node annotated by :class:`SensitivityAnnotate`.

    Args:
        sal: SAL rule for the probes (``None``: probes only, no SAL).
    """

    def __init__(self, sal: SALConfig | None = None):
        super().__init__()
        self.sal = sal if sal is not None else SALConfig(enabled=False)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for _, gm in list(graph_modules(graph_module)):
            probes: Dict[str, str] = {}
            for node in list(gm.graph.nodes):
                ann = node_info(node).sensitivity
                if node.op != "call_module" or ann is None or ann.probe:
                    continue
                module = gm.get_submodule(node.target)
                if isinstance(module, NeuronProbe):
                    continue
                name = probes.get(node.target)
                if name is None:
                    name = probes[node.target] = _unique_name(gm, node.target)
                    gm.add_submodule(name, self._probe(module, ann))
                if ann.kind in ("linear", "conv1d", "conv2d", "conv3d"):
                    self._replace_dense(gm, node, name, ann)
                else:
                    self._append_recurrent(gm, node, name, ann)
                modified = True
            if modified:
                gm.graph.lint()
                gm.recompile()
        update_graph(graph_module, sensitivity=SensitivityRecord(sal=self.sal, probes=tuple(sorted(probes_of(graph_module)))))
        return PassResult(graph_module, modified)

    def _probe(self, module: nn.Module, ann: SensitivityAnnotation) -> NeuronProbe:
        kind, layer = ann.kind, ann.layer
        if kind in ("linear", "conv1d", "conv2d", "conv3d"):
            return DenseProbe(layer, module, kind, ann.derivatives, ann.activation, self.sal, ann.calls)
        sal = self.sal
        if ann.recurrent_only != sal.recurrent_only:
            sal = replace(sal, recurrent_only=bool(ann.recurrent_only))
        try:
            return RecurrentProbe(layer, module, kind, sal, ann.calls)
        except NotImplementedError as exc:
            raise PlacementError(f"sensitivity probe for {layer!r} ({type(module).__name__}): {exc} is not "
                                 "supported; exclude the layer or use a module without it") from None

    @staticmethod
    def _replace_dense(gm: fx.GraphModule, node: fx.Node, probe: str, ann: SensitivityAnnotation) -> None:
        x = _arg(node, 0, "input")
        with gm.graph.inserting_before(node):
            w = _get_attr(gm, f"{node.target}.weight")
            has_bias = gm.get_submodule(node.target).bias is not None
            b = _get_attr(gm, f"{node.target}.bias") if has_bias else None
            new = gm.graph.call_module(probe, (x, w, b))
        new.meta.update(node.meta)  # the probe computes the layer's value: it takes over its record (origin too)
        update_node(new, sensitivity=replace(ann, probe=probe))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    @staticmethod
    def _append_recurrent(gm: fx.GraphModule, node: fx.Node, probe: str, ann: SensitivityAnnotation) -> None:
        module = gm.get_submodule(node.target)
        names: List[str] = [n for n, _ in module.named_parameters(recurse=False)]
        x, hx = _arg(node, 0, "input"), _arg(node, 1, "hx")
        attrs, prev = [], node
        for n in names:
            with gm.graph.inserting_after(prev):
                prev = _get_attr(gm, f"{node.target}.{n}")
            attrs.append(prev)
        with gm.graph.inserting_after(prev):
            new = gm.graph.call_module(probe, (node, x, hx, *attrs))
        new.meta.update({k: v for k, v in node.meta.items() if k != KEY})
        update_node(new, sensitivity=replace(ann, probe=probe))
        update_node(node, sensitivity=replace(ann, probe=probe))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
