"""Temporal-wormhole pass: per-step fixed points inside explicit recurrent modules.

Runs after :class:`~fxwormhole.passes.recurrent.DecomposeRecurrent`. For every ``call_module``
node targeting an :class:`~fxwormhole.runtime.recurrent.ExplicitRecurrent`, the pairs of
``config.wormholes`` that name its layers become gated edges from a layer's hidden state at step t
back to a lower layer's input at the same step, solved to a fixed point per step:

* ``"auto"``: top layer -> bottom layer, ``(L-1, 0)`` (``(0, 0)`` for one layer);
* ``"every:K"``: one wormhole per block of K layers, from its top layer to its bottom layer;
* explicit pairs ``("layer1", "layer0")`` or ``("<module path>.layer1", "<module path>.layer0")``.

This is the one place the policy is applied to recurrent modules (:func:`resolve_temporal_pairs`)
and checked (:func:`add_temporal_wormhole`); the runtime receives the pairs and the wormhole modules
(:func:`~fxwormhole.runtime.recurrent.attach_temporal_runtime`). The module is modified in place (the
GraphModule owns it) and stays at its path; the graph is not changed.

Recorded: ``NodeInfo.recurrent.temporal_wormholes`` (or ``temporal_skipped``) per node and, for the
graph, a :class:`~fxwormhole.passes.meta.TemporalPlacement`: the pairs placed per module and what of
``config.wormholes`` this pass consumed. Under a policy a graph with recurrent modules gets temporal
wormholes only; explicit pairs naming recurrent layers are consumed here and the feed-forward plan
places the rest (:class:`~fxwormhole.passes.plan_wormholes.PlanWormholes` reads the record).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import WormholeConfig
from ..errors import PlacementError
from ..policy import Policy, parse_policy
from ..runtime.recurrent import ExplicitRecurrent, attach_temporal_runtime, explicit_from_module, layer_name
from ._common import build_wormhole
from .meta import RecurrentInfo, TemporalPlacement, graph_record, node_info, update_graph, update_node
from .recurrent import recurrent_info

__all__ = ["TemporalWormholes", "add_temporal_wormhole", "resolve_temporal_pairs"]

log = logging.getLogger("fxwormhole")

_TORCH_RNNS = (nn.RNN, nn.LSTM, nn.GRU)
Span = Tuple[str, str]


def resolve_temporal_pairs(rnn: ExplicitRecurrent, wormholes: Union[str, Sequence[Span], Policy],
                           path: str = "") -> Tuple[Tuple[int, int], ...]:
    """Turn ``WormholeConfig.wormholes`` into ``(src_layer, dst_layer)`` index pairs for ``rnn``.

    * ``"auto"``: top layer -> bottom layer, ``(L-1, 0)`` (``(0, 0)`` for one layer).
    * ``"every:K"``: one wormhole per block of K layers, from its top layer to its bottom layer:
      ``(min(i+K-1, L-1), i)`` for ``i = 0, K, 2K, ...``.
    * explicit pairs of names ``"layer<k>"`` (``layer0`` = bottom), optionally prefixed with the
      module path (``"encoder.rnn.layer1"``). ``src >= dst`` (the edge goes back down the stack).
      Pairs naming no layer of this module are skipped (another pass may place them); a pair with
      only one end in this module raises :class:`PlacementError`.
    """
    L = rnn.num_layers
    policy = parse_policy(wormholes)
    if policy.kind == "auto":
        return ((L - 1, 0),)
    if policy.kind == "every":
        k = policy.every
        return tuple((min(i + k - 1, L - 1), i) for i in range(0, L, k))
    out = []
    for src, dst in policy.pairs:
        a, b = _layer_index(src, path, L), _layer_index(dst, path, L)
        if a is None and b is None:
            continue
        where = path or type(rnn).__name__
        if a is None or b is None:
            raise PlacementError(f"temporal wormhole ({src!r}, {dst!r}) at {where}: both ends must name layers "
                                 f"of the same recurrent module ('layer0'..'layer{L - 1}', optionally prefixed "
                                 f"with '{path}.'); a wormhole between a recurrent layer and another module is not supported")
        if a < b:
            raise PlacementError(f"temporal wormhole ({src!r}, {dst!r}) at {where}: src must be at or above dst "
                                 "in the stack (the edge goes back to an earlier layer); swap the pair")
        out.append((a, b))
    return tuple(out)


def _layer_index(name: str, path: str, L: int) -> Optional[int]:
    prefix = f"{path}." if path else ""
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    elif "." in name:
        return None
    if not (name.startswith("layer") and name[5:].isdigit()):
        return None
    k = int(name[5:])
    if k >= L:
        raise PlacementError(f"temporal wormhole end {name!r} at {path or 'the recurrent module'}: the stack has "
                             f"layers 'layer0'..'layer{L - 1}'")
    return k


def add_temporal_wormhole(module: nn.Module, config: WormholeConfig = WormholeConfig(), *,
                          pairs: Optional[Sequence[Tuple[int, int]]] = None, path: str = "",
                          inplace: bool = False) -> ExplicitRecurrent:
    """Give a recurrent module per-step fixed points with temporal wormholes.

    Args:
        module: an :class:`ExplicitRecurrent` or an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (converted).
        config: gate kind and init, projection init, solver, gradient mode, failure policy; its
            ``wormholes`` field selects the pairs (see :func:`resolve_temporal_pairs`).
        pairs: ``(src_layer, dst_layer)`` indices overriding ``config.wormholes``.
        path: the module's path in its model (for error messages and prefixed pair names).
        inplace: modify ``module`` (an explicit module) instead of a deep copy.

    Returns the explicit module with wormholes; its ``stats`` gives per-step iteration counts.
    Also importable as ``fxwormhole.runtime.recurrent.add_temporal_wormhole``.
    """
    if isinstance(module, ExplicitRecurrent):
        rnn = module if inplace else copy.deepcopy(module)
    else:
        rnn = explicit_from_module(module)
    where = path or type(rnn).__name__
    if rnn.temporal_pairs:
        raise PlacementError(f"{where} already has temporal wormholes {rnn.temporal_pairs}")
    if rnn.bidirectional:
        raise PlacementError(f"temporal wormholes at {where}: a bidirectional stack has no per-step order "
                             "(the reverse direction needs future inputs); use bidirectional=False")
    idx = tuple(pairs) if pairs is not None else resolve_temporal_pairs(rnn, config.wormholes, path)
    if not idx:
        raise PlacementError(f"temporal wormholes at {where}: config.wormholes={config.wormholes!r} names no "
                             f"layer of this module (layers are 'layer0'..'layer{rnn.num_layers - 1}')")
    for a, b in idx:
        if not (0 <= b <= a < rnn.num_layers):
            raise PlacementError(f"temporal wormhole ({a}, {b}) at {where}: need 0 <= dst <= src < {rnn.num_layers}")
    ref = next(rnn.parameters())
    h = rnn.real_hidden_size
    wormholes = [build_wormhole((1, h), (1, rnn.input_size if b == 0 else h), config, src=layer_name(a),
                                dst=layer_name(b), like=ref) for a, b in idx]
    attach_temporal_runtime(rnn, idx, wormholes, config, where=where)
    return rnn


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
            if node.op == "call_module" and type(gm.get_submodule(str(node.target))) in _TORCH_RNNS:
                raise PlacementError(f"TemporalWormholes at {node.target}: the module is still a torch "
                                     f"{type(gm.get_submodule(str(node.target))).__name__}; run DecomposeRecurrent first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        policy = parse_policy(self.config.wormholes)
        placed: Dict[str, List[Span]] = {}
        consumed: List[Span] = []
        recurrent = False
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            path = str(node.target)
            mod = gm.get_submodule(path)
            recurrent = recurrent or isinstance(mod, (*_TORCH_RNNS, ExplicitRecurrent))
            if not isinstance(mod, ExplicitRecurrent):
                continue
            if path not in placed:
                placed[path] = self._place(mod, path, policy, consumed)
            info = replace(node_info(node).recurrent or RecurrentInfo(path=path, decomposed=True),
                           **_facts(recurrent_info(mod, path)))
            if not placed[path]:
                info = replace(info, temporal_skipped="bidirectional" if mod.bidirectional else "no pair names this module")
            update_node(node, recurrent=info)
        before = graph_record(gm).temporal or TemporalPlacement()
        update_graph(gm, temporal=TemporalPlacement(
            placed={**before.placed, **{p: tuple(pairs) for p, pairs in placed.items() if pairs}},
            consumed_pairs=tuple(dict.fromkeys((*before.consumed_pairs, *consumed))),
            policy_consumed=before.policy_consumed or (policy.automatic and recurrent)))
        return PassResult(gm, any(placed.values()))

    def _place(self, mod: ExplicitRecurrent, path: str, policy: Policy, consumed: List[Span]) -> List[Span]:
        if mod.temporal_pairs:
            return list(mod.temporal_pairs)  # already placed (e.g. the pass ran twice)
        if mod.bidirectional and policy.automatic:
            log.info("TemporalWormholes: %s is bidirectional; no temporal wormhole placed", path)
            return []
        mine = [pair for pair in policy.pairs if resolve_temporal_pairs(mod, (pair,), path)]
        consumed.extend(mine)
        pairs = resolve_temporal_pairs(mod, policy, path)
        if not pairs:
            return []
        add_temporal_wormhole(mod, self.config, pairs=pairs, path=path, inplace=True)
        return list(mod.temporal_pairs)


def _facts(info: RecurrentInfo) -> dict:
    """The fields of a fresh RecurrentInfo that describe the module (not what was decided about it)."""
    skip = {"path", "decomposed", "temporal_skipped", "reason"}
    return {k: getattr(info, k) for k in info.__dataclass_fields__ if k not in skip}
