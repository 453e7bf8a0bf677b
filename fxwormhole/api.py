"""The front door: ``fxwormhole.transform(model, example_inputs, config)``."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .capture import capture_graph
from .config import SALConfig, WormholeConfig, require_registered_solvers
from .errors import ConfigError
from .passes._common import run_passes
from .passes.meta import update_graph
from .passes.pipeline import transform_passes
from .passes.verify import PipelineCheck
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
    verify: bool = True,
) -> TransformedModule:
    """Rewrite ``model`` with gated wormholes wrapped in fixed-point nodes.

    The model is captured (``torch.fx.symbolic_trace``, else ``torch.export``) and one list of passes
    rewrites it (:func:`fxwormhole.passes.pipeline.transform_passes`): recurrent modules
    (``nn.RNN/LSTM/GRU``) become explicit per-step modules with temporal wormholes; feed-forward
    wormholes are planned, inserted and fused into
    :class:`~fxwormhole.runtime.fixed_point.FixedPoint` nodes; with ``sal`` every neuron also gets a
    sensitivity probe.

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
        verify: check the rewrite (default on): after every pass the graph, run on the example
            inputs with every wormhole's injection forced to zero, must equal the model as captured
            (relative 1e-5). A difference raises :class:`~fxwormhole.errors.VerificationError`
            naming the pass and the first diverging node. It costs one forward of the example
            inputs per pass that changed the graph and changes no state; ``False`` skips it.

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
    # checked when the config was built, and again here: the registry is global and can differ now
    require_registered_solvers(config)
    inputs = _as_tuple(example_inputs)

    captured = capture_graph(model, inputs, front_end=front_end)
    gm = run_passes(captured.graph_module, transform_passes(captured, config, inputs, sal=sal),
                    check=PipelineCheck(inputs, verify=verify))
    result = TransformedModule(gm, gm.graph)
    result.meta = dict(gm.meta)
    update_graph(result, transform=TransformRecord.of(model, inputs, config, sal))  # for fxwormhole.save/load
    result.train(model.training)
    return result
