"""Initialisation schemes that SAL is weighed against: orthogonal, delta-orthogonal, LSUV and
spectral-radius scaling.

All of them act once, before training; SAL (``fxwormhole.instrument(..., sal=SALConfig())``)
keeps adjusting sensitivity during training. ``docs/sensitivity.md`` compares them on the same
deep-MLP and long-lag RNN tasks.

* :func:`orthogonal_init_` -- every Linear gets an orthogonal weight, every ConvNd a
  delta-orthogonal kernel (Xiao et al. 2018, "Dynamical isometry and a mean field theory of CNNs"),
  every recurrent module orthogonal recurrent blocks; biases are zeroed.
* :func:`lsuv_` -- layer-sequential unit-variance initialisation (Mishkin & Matas 2016, "All you
  need is a good init"): orthonormal pre-initialisation, then each layer's weight is divided by the
  standard deviation of its output on a batch until that variance is 1 within a tolerance.
* :func:`scale_spectral_radius_` -- rescale a square (recurrent) weight to a given spectral radius
  ``max |eig(W)|`` (the hand-tuned baseline of Shibata et al. 2021).

Example::

    net = fxwormhole.init.lsuv_(net, (x,))            # in place; returns a per-layer report
    fxwormhole.init.scale_spectral_radius_(rnn.weight_hh_l0, 1.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import ConfigError, PlacementError

__all__ = [
    "orthogonal_init_",
    "delta_orthogonal_",
    "lsuv_",
    "LSUVLayer",
    "spectral_radius",
    "scale_spectral_radius_",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)


def _gate_count(module: nn.Module) -> int:
    return 4 if isinstance(module, (nn.LSTM, nn.LSTMCell)) else 3 if isinstance(module, (nn.GRU, nn.GRUCell)) else 1


def delta_orthogonal_(weight: Tensor, gain: float = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Delta-orthogonal kernel in place: an orthogonal ``[out, in/groups]`` matrix (times ``gain``)
    at the spatial centre tap, zeros elsewhere (Xiao et al. 2018). A 2-D weight is plain orthogonal.

    With ``out >= in`` the centre matrix has orthonormal columns, so a stride-1 convolution with
    circular padding preserves the norm of its input exactly.
    """
    if weight.dim() < 2:
        raise ConfigError(f"delta_orthogonal_: weight of shape {tuple(weight.shape)} is invalid: expected a 2-D "
                          "matrix or a ConvNd kernel [out, in, *kernel]")
    with torch.no_grad():
        centre = torch.empty(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
        nn.init.orthogonal_(centre, gain=gain, generator=generator)
        if weight.dim() == 2:
            return weight.copy_(centre)
        weight.zero_()
        idx = (slice(None), slice(None)) + tuple(k // 2 for k in weight.shape[2:])
        weight[idx] = centre
    return weight


def orthogonal_init_(model: nn.Module, gain: float = 1.0, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Orthogonal weights for every neuron layer of ``model``, in place; returns ``model``.

    Linear: ``nn.init.orthogonal_``; ConvNd: :func:`delta_orthogonal_`; RNN/LSTM/GRU (and cells):
    each gate's ``H x H`` recurrent block orthogonal, each gate's input block orthogonal. All
    biases are set to 0. ``gain`` multiplies every weight (1.0 is the critical value for tanh at
    zero bias).

    Raises:
        PlacementError: ``model`` has no Linear, ConvNd or recurrent module.
    """
    found = False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.orthogonal_(module.weight, gain=gain, generator=generator)
            elif isinstance(module, _CONV):
                delta_orthogonal_(module.weight, gain, generator)
            elif isinstance(module, _RECURRENT):
                gates = _gate_count(module)
                for name, p in module.named_parameters(recurse=False):
                    if name.startswith("weight_"):
                        for block in p.chunk(gates, 0):
                            nn.init.orthogonal_(block, gain=gain, generator=generator)
            else:
                continue
            found = True
            for name, p in module.named_parameters(recurse=False):
                if name.startswith("bias"):
                    p.zero_()
    if not found:
        raise PlacementError(f"orthogonal_init_: {type(model).__name__} has no Linear, ConvNd or recurrent module")
    return model


@dataclass(frozen=True)
class LSUVLayer:
    """One layer of an LSUV pass: module path, output variance before and after, iterations."""

    layer: str
    variance_before: float
    variance_after: float
    iterations: int


def lsuv_(model: nn.Module, example_inputs: Any, target_variance: float = 1.0, tol: float = 0.1,
          max_iters: int = 10, orthonormal: bool = True, generator: Optional[torch.Generator] = None
          ) -> List[LSUVLayer]:
    """Layer-sequential unit-variance initialisation of ``model`` in place (Mishkin & Matas 2016).

    Every Linear and ConvNd layer, in the order the forward pass reaches them: (optionally)
    orthonormal pre-initialisation (:func:`orthogonal_init_`, biases 0), then repeatedly run
    ``model(*example_inputs)`` and divide the layer's weight by ``sqrt(Var(output) / target)``
    until ``|Var(output) - target| < tol`` or ``max_iters`` passes. The output is the layer's own
    output (the pre-activation), its variance taken over every element of the batch.

    Args:
        model: the network (changed in place; switched to eval mode for the passes and back).
        example_inputs: a tensor or a tuple of positional inputs (a batch).
        target_variance, tol, max_iters: the scheme's ``T_var``, ``Tol_var`` and ``T_max``.
        orthonormal: orthonormal pre-initialisation first (the paper's step 1).

    Returns:
        One :class:`LSUVLayer` per layer, in forward order.

    Raises:
        PlacementError: ``model`` has no Linear or ConvNd layer.
    """
    if not (target_variance > 0 and tol > 0 and max_iters >= 1):
        raise ConfigError(f"lsuv_: target_variance={target_variance}, tol={tol}, max_iters={max_iters} are "
                          "invalid: expected target_variance > 0, tol > 0, max_iters >= 1")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear,) + _CONV)]
    if not layers:
        raise PlacementError(f"lsuv_: {type(model).__name__} has no Linear or ConvNd layer to initialise")
    if orthonormal:
        for _, m in layers:
            orthogonal_init_(m, generator=generator)
    order = _forward_order(model, args, [m for _, m in layers])
    names = {id(m): n for n, m in layers}
    was_training = model.training
    model.eval()
    report: List[LSUVLayer] = []
    try:
        for m in order:
            before = var = _output_variance(model, args, m)
            it = 0
            while abs(var - target_variance) >= tol and it < max_iters and var > 0:
                with torch.no_grad():
                    m.weight.div_(math.sqrt(var / target_variance))
                var = _output_variance(model, args, m)
                it += 1
            report.append(LSUVLayer(names[id(m)], before, var, it))
    finally:
        model.train(was_training)
    return report


def _forward_order(model: nn.Module, args: Tuple[Any, ...], modules: List[nn.Module]) -> List[nn.Module]:
    seen: List[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod) if mod not in seen else None) for m in modules]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _output_variance(model: nn.Module, args: Tuple[Any, ...], module: nn.Module) -> float:
    out: List[Tensor] = []
    h = module.register_forward_hook(lambda mod, i, o: out.append(o.detach()))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        h.remove()
    return float(out[0].double().var(unbiased=False))


def spectral_radius(weight: Tensor) -> float:
    """``max |eig(W)|`` of a square matrix."""
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ConfigError(f"spectral_radius: weight of shape {tuple(weight.shape)} is invalid: expected a square matrix")
    return float(torch.linalg.eigvals(weight.detach().double()).abs().max())


def scale_spectral_radius_(weight: Tensor, radius: float) -> Tensor:
    """Rescale a square matrix in place so that its spectral radius is ``radius``; returns it."""
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ConfigError(f"scale_spectral_radius_: radius={radius!r} is invalid: expected a finite float > 0")
    rho = spectral_radius(weight)
    if rho == 0:
        raise ConfigError("scale_spectral_radius_: the matrix has spectral radius 0 (nilpotent or zero); "
                          "initialise it randomly first")
    with torch.no_grad():
        weight.mul_(radius / rho)
    return weight
