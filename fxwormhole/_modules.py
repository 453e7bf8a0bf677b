"""Reaching the user's module inside the wrappers training code puts around it."""
from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``), however they are nested; any other module unchanged."""
    for _ in range(8):
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):
            net = net._orig_mod
        else:
            return net
    return net
