"""Temporal-wormhole pass: per-step fixed points inside explicit recurrent modules.

Runs after :class:`~fxwormhole.passes.recurrent.DecomposeRecurrent`. For every ``call_module``
node targeting an :class:`~fxwormhole.runtime.recurrent.ExplicitRecurrent`, the pairs of
``config.wormholes`` that name its layers (``"auto"``: top layer -> bottom layer; explicit pairs
``("layer1", "layer0")`` or ``("<module path>.layer1", "<module path>.layer0")``) become gated
edges from a layer's hidden state at step t back to a lower layer's input at the same step, solved
to a fixed point per step (:func:`~fxwormhole.runtime.recurrent.add_temporal_wormhole`). The
module is modified in place (the GraphModule owns it) and stays at its path; the graph is not
changed. ``node.meta["fxwormhole"]["recurrent"]["temporal_wormholes"]`` lists the pairs placed.

Use with the decompose pass (what :func:`fxwormhole.transform` does for recurrent modules)::

    gm = run_passes(gm, [DecomposeRecurrent(), TemporalWormholes(config)])
"""
from __future__ import annotations

import logging
from typing import Dict

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import WormholeConfig
from ..errors import PlacementError
from ..runtime.recurrent import ExplicitRecurrent, add_temporal_wormhole, resolve_temporal_pairs
from ._common import graph_meta, node_meta
from .recurrent import recurrent_info

__all__ = ["TemporalWormholes"]

log = logging.getLogger("fxwormhole")


class TemporalWormholes(PassBase):
    """Enable temporal wormholes on the explicit recurrent modules of a GraphModule.

    Args:
        config: the :class:`~fxwormhole.config.WormholeConfig` (pairs, gate, init, solver, grad).

    Bidirectional modules are skipped under ``wormholes="auto"`` (recorded in the metadata) and
    rejected with :class:`PlacementError` when a pair names them explicitly.
    """

    def __init__(self, config: WormholeConfig = WormholeConfig()) -> None:
        super().__init__()
        self.config = config

    def requires(self, gm: fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_module" and type(gm.get_submodule(str(node.target))) in (nn.RNN, nn.LSTM, nn.GRU):
                raise PlacementError(f"TemporalWormholes at {node.target}: the module is still a torch "
                                     f"{type(gm.get_submodule(str(node.target))).__name__}; run DecomposeRecurrent first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        placed: Dict[str, list] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            path = str(node.target)
            mod = gm.get_submodule(path)
            if not isinstance(mod, ExplicitRecurrent):
                continue
            if path not in placed:
                placed[path] = self._place(mod, path)
            info = node_meta(node).setdefault("recurrent", {"path": path, "decomposed": True})
            info.update(recurrent_info(mod))
            if not placed[path]:
                info["temporal_skipped"] = "bidirectional" if mod.bidirectional else "no pair names this module"
        meta = graph_meta(gm).setdefault("temporal_wormholes", {})
        meta.update({p: pairs for p, pairs in placed.items() if pairs})
        return PassResult(gm, any(placed.values()))

    def _place(self, mod: ExplicitRecurrent, path: str) -> list:
        if mod.temporal_pairs:
            return list(mod.temporal_pairs)  # already placed (e.g. the pass ran twice)
        if mod.bidirectional and isinstance(self.config.wormholes, str):  # "auto" / "every:K"
            log.info("TemporalWormholes: %s is bidirectional; no temporal wormhole placed", path)
            return []
        pairs = resolve_temporal_pairs(mod, self.config.wormholes, path)
        if not pairs:
            return []
        add_temporal_wormhole(mod, self.config, pairs=pairs, path=path, inplace=True)
        return list(mod.temporal_pairs)
