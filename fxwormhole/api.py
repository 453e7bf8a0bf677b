"""The front door: ``fxwormhole.transform(model, example_inputs, config)``."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from .capture import capture
from .config import SALConfig, WormholeConfig
from .errors import ConfigError
from .passes._common import run_passes
from .passes.insert_wormholes import InsertWormholes
from .passes.plan_wormholes import PlanWormholes
from .passes.wrap_fixed_points import WrapFixedPoints
from .transform_record import TransformRecord
from .transformed import TransformedModule

__all__ = ["transform"]


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(
        f"example_inputs must be a Tensor or a tuple of Tensors, got {type(example_inputs).__name__}; "
        f"pass e.g. (torch.randn(8, 32),)"
    )


def transform(
    model: nn.Module,
    example_inputs: Any,
    config: WormholeConfig | None = None,
    *,
    sal: SALConfig | None = None,
    front_end: str = "auto",
) -> TransformedModule:
    """Rewrite ``model`` with gated wormholes wrapped in fixed-point nodes.

    The model is captured (``torch.fx.symbolic_trace``, else ``torch.export``), wormholes are
    planned, inserted and fused into :class:`~fxwormhole.runtime.fixed_point.FixedPoint` nodes;
    recurrent modules (``nn.RNN/LSTM/GRU``) become explicit per-step modules with temporal
    wormholes; with ``sal`` every neuron also gets a sensitivity probe.

    The user's model is not modified. At initialisation (gates closed, projections zero) the result
    computes exactly what ``model`` computes, and ``model.state_dict()`` loads into it (only the
    new wormhole parameters are missing).

    Args:
        model: any feedforward or recurrent ``nn.Module``.
        example_inputs: a tensor or tuple of tensors the model accepts (shapes and dtypes are
            taken from them; batch dim 0).
        config: where the wormholes go and how fixed points are solved (default
            ``WormholeConfig()``: the ``"auto"`` policy, Anderson, implicit gradient).
        sal: instrument every neuron with sensitivity probes and SAL (see
            :func:`fxwormhole.instrument`).
        front_end: ``"auto"``, ``"symbolic_trace"`` or ``"export"``.

    Returns:
        A :class:`~fxwormhole.transformed.TransformedModule`: an ordinary ``nn.Module`` with
        ``fixed_point_stats()``, ``wormholes`` and ``summary()``.

    Example::

        net = fxwormhole.transform(mlp, (torch.randn(64, 32),),
                                   fxwormhole.WormholeConfig(wormholes=[("fc3", "fc1")]))
        y = net(x); net.fixed_point_stats()["fixed_point_0"].iterations
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = WormholeConfig()
    elif not isinstance(config, WormholeConfig):
        raise ConfigError(f"config must be a WormholeConfig, got {type(config).__name__}")
    if sal is not None and not isinstance(sal, SALConfig):
        raise ConfigError(f"sal must be a SALConfig or None, got {type(sal).__name__}")
    from .runtime.solvers import get_solver

    get_solver(config.solver.name)  # unknown names fail here, not at the first forward/backward
    get_solver(config.grad.solver)
    inputs = _as_tuple(example_inputs)

    gm = capture(model, inputs, front_end=front_end)
    gm, feedforward = _rewrite_recurrent(gm, config)
    if feedforward is not None:
        gm = run_passes(gm, [PlanWormholes(feedforward), InsertWormholes(feedforward), WrapFixedPoints(feedforward, inputs)])
    if sal is not None:
        from .instrument import instrument_graph

        gm = instrument_graph(gm, sal)
    result = TransformedModule(gm, gm.graph)
    result.meta = dict(gm.meta)
    result.meta["fxwormhole"]["transform"] = TransformRecord.of(model, inputs, config, sal)  # for fxwormhole.save/load
    result.train(model.training)
    return result


def _recurrent_modules(gm) -> dict[str, nn.Module]:
    from .runtime.recurrent import ExplicitRecurrent

    kinds = (nn.RNN, nn.LSTM, nn.GRU, ExplicitRecurrent)
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kinds)}


def _rewrite_recurrent(gm, config: WormholeConfig):
    """Decompose nn.RNN/LSTM/GRU into explicit steps and give them temporal wormholes.

    Returns the GraphModule and the config left for the feedforward passes: under a policy
    (``"auto"``/``"every:K"``) a model with recurrent modules gets temporal wormholes only; explicit
    pairs that name recurrent layers (``"rnn.layer1"``) are placed here and removed from the rest.
    """
    if not _recurrent_modules(gm):
        return gm, config
    from .passes.recurrent import DecomposeRecurrent
    from .passes.temporal_wormhole import TemporalWormholes
    from .runtime.recurrent import resolve_temporal_pairs

    gm = run_passes(gm, [DecomposeRecurrent(), TemporalWormholes(config)])
    if isinstance(config.wormholes, str):
        return gm, None
    modules = _recurrent_modules(gm)
    remaining = [pair for pair in config.wormholes
                 if not any(resolve_temporal_pairs(m, [pair], path) for path, m in modules.items())]
    return gm, (replace(config, wormholes=remaining) if remaining else None)
