"""Decompose pass: replace ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` submodules by their explicit twins.

Every ``call_module`` node whose target is a torch recurrent module gets, at the *same* module
path, an :class:`~fxwormhole.runtime.recurrent.ExplicitRecurrent` with the same parameter names and
values (so ``state_dict`` keys do not change and the original state_dict loads strictly), the same
call signature and the same outputs. The node itself is unchanged; what was done is recorded in
``NodeInfo.recurrent`` (:class:`~fxwormhole.passes.meta.RecurrentInfo`) and the module paths in
``GraphRecord.recurrent``.

Subclasses that override ``forward`` are left alone (their semantics may differ) and recorded as
skipped. Python loops over ``nn.RNNCell``/``LSTMCell``/``GRUCell`` need nothing from this pass:
the front ends already unroll them into repeated ``call_module`` nodes of the cell.
"""
from __future__ import annotations

import logging
from typing import Dict

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..runtime.gates import RECURRENT_LAYOUTS
from ..runtime.recurrent import ExplicitRecurrent, explicit_from_module, layer_name
from .meta import RecurrentInfo, graph_record, update_graph, update_node

__all__ = ["DecomposeRecurrent", "recurrent_info"]

log = logging.getLogger("fxwormhole")

_TORCH_RNNS = (nn.RNN, nn.LSTM, nn.GRU)


def recurrent_info(module: ExplicitRecurrent, path: str) -> RecurrentInfo:
    """The facts about an explicit recurrent module that later passes and reports need."""
    return RecurrentInfo(
        path=path,
        decomposed=True,
        mode=module.mode,
        explicit=type(module).__name__,
        num_layers=module.num_layers,
        layers=tuple(layer_name(k) for k in range(module.num_layers)),
        hidden_size=module.hidden_size,
        input_size=module.input_size,
        bidirectional=module.bidirectional,
        batch_first=module.batch_first,
        gate_order=RECURRENT_LAYOUTS[module.mode].gates,
        temporal_wormholes=tuple(module.temporal_pairs),
    )


class DecomposeRecurrent(PassBase):
    """Swap torch recurrent modules for explicit per-step twins at the same paths.

    Args:
        share_parameters: reuse the original ``nn.Parameter`` objects instead of copying them.
            Safe on a GraphModule from :func:`fxwormhole.capture.capture` (which deep-copies the
            model); keep the default ``False`` on a GraphModule that shares modules with a user's
            model (e.g. straight from ``torch.fx.symbolic_trace``).
    """

    def __init__(self, share_parameters: bool = False) -> None:
        super().__init__()
        self.share_parameters = share_parameters

    def call(self, gm: fx.GraphModule) -> PassResult:
        done: Dict[str, ExplicitRecurrent] = {}
        skipped: Dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            path = str(node.target)
            if path in done:
                update_node(node, recurrent=recurrent_info(done[path], path))
                continue
            mod = gm.get_submodule(path)
            if isinstance(mod, ExplicitRecurrent) or not isinstance(mod, _TORCH_RNNS):
                continue
            if type(mod).forward not in (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward):
                skipped[path] = f"{type(mod).__name__} overrides forward"
                update_node(node, recurrent=RecurrentInfo(path=path, decomposed=False, reason=skipped[path]))
                log.info("DecomposeRecurrent: left %s (%s) as is: %s", path, type(mod).__name__, skipped[path])
                continue
            explicit = explicit_from_module(mod, share_parameters=self.share_parameters)
            gm.set_submodule(path, explicit)
            done[path] = explicit
            update_node(node, recurrent=recurrent_info(explicit, path))
        if done or skipped:
            update_graph(gm, recurrent={**(graph_record(gm).recurrent or {}), **{p: "decomposed" for p in done},
                                        **{p: f"skipped: {why}" for p, why in skipped.items()}})
        return PassResult(gm, bool(done))
