"""The modules a wormhole edge is made of: a projection and a gate.

A wormhole carries the output ``h`` of a deep layer back to the input ``x`` of an earlier one::

    x' = x + gate(h) * proj(h)

``proj`` maps the source's shape onto the destination's and has no bias, so ``proj(0) = 0``. By
default it starts at zero and the gate starts nearly closed (``sigmoid(-6) ~ 0.0025``): the
transformed network then computes exactly what the original did, and its fixed point settles after a
single evaluation. Training opens the wormhole where it helps.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PlacementError

__all__ = ["Projection", "Gate", "Wormhole", "ZerosInit", "bridge_kind", "per_sample_norm"]

Shape = Sequence[int]


def bridge_kind(src_shape: Shape, dst_shape: Shape) -> str:
    """Classify how a value of ``src_shape`` can be mapped onto ``dst_shape`` (batch dim 0).

    Returns one of ``"features"`` (same leading dims, map the last dim), ``"map"`` (feature maps
    ``[B, C, *spatial]`` with the same number of spatial dims), ``"map_to_vector"``,
    ``"vector_to_map"``; raises :class:`PlacementError` otherwise.
    """
    src, dst = tuple(src_shape), tuple(dst_shape)
    if len(src) < 2 or len(dst) < 2:
        raise PlacementError(f"cannot bridge shapes {src} -> {dst}: both need a batch dim and a feature dim")
    if len(src) == len(dst) and src[:-1] == dst[:-1]:
        return "features"
    if len(src) == len(dst) and len(src) >= 3 and src[0] == dst[0]:
        return "map"
    if len(src) >= 3 and len(dst) == 2:
        return "map_to_vector"
    if len(src) == 2 and len(dst) >= 3:
        return "vector_to_map"
    raise PlacementError(f"cannot bridge shapes {src} -> {dst}")


def _conv(n_spatial: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n_spatial]


def _init_weight(weight: torch.Tensor, proj_init: str, proj_std: float) -> None:
    with torch.no_grad():
        if proj_init == "zero":
            weight.zero_()
        else:
            weight.normal_(0.0, proj_std)


class Projection(nn.Module):
    """Bias-free map from the source's shape to the destination's (``proj(0) = 0``).

    * vectors / sequences ``[..., n] -> [..., m]``: a Linear on the last dim;
    * feature maps ``[B, C1, *S1] -> [B, C2, *S2]``: a 1x1 convolution, then resizing to ``S2``
      (adaptive average pooling when shrinking, nearest interpolation when growing);
    * map -> vector: global average pooling, then a Linear; vector -> map: a Linear onto channels,
      broadcast over the spatial dims.
    """

    def __init__(self, src_shape: Shape, dst_shape: Shape, *, proj_init: str = "zero", proj_std: float = 1e-2):
        super().__init__()
        self.kind = bridge_kind(src_shape, dst_shape)
        self.dst_spatial = tuple(int(s) for s in dst_shape[2:])
        if self.kind in ("features", "map_to_vector", "vector_to_map"):
            n_in = int(src_shape[1] if self.kind == "map_to_vector" else src_shape[-1])
            n_out = int(dst_shape[1] if self.kind == "vector_to_map" else dst_shape[-1])
            self.map = nn.Linear(n_in, n_out, bias=False)
        else:
            self.map = _conv(len(dst_shape) - 2)(int(src_shape[1]), int(dst_shape[1]), 1, bias=False)
        _init_weight(self.map.weight, proj_init, proj_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "features":
            return self.map(h)
        if self.kind == "map_to_vector":
            return self.map(h.flatten(2).mean(-1))
        if self.kind == "vector_to_map":
            out = self.map(h)
            return out.reshape(out.shape + (1,) * len(self.dst_spatial)).expand(*out.shape, *self.dst_spatial)
        out = self.map(h)
        if tuple(out.shape[2:]) == self.dst_spatial:
            return out
        if all(o >= d for o, d in zip(out.shape[2:], self.dst_spatial)):
            pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(self.dst_spatial)]
            return pool(out, self.dst_spatial)
        return F.interpolate(out, size=self.dst_spatial, mode="nearest")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class Gate(nn.Module):
    """``sigmoid`` gate in ``(0, cap)``.

    * ``scalar``: one learned logit for the whole wormhole;
    * ``channel``: one logit per destination channel (dim 1 of feature maps, last dim otherwise);
    * ``input``: ``sigmoid(W_g h + b_g)`` computed from the source (a Projection-shaped map with a
      bias), so each sample opens its wormhole by its own amount. ``W_g`` starts at zero.
    """

    def __init__(self, kind: str, src_shape: Shape, dst_shape: Shape, *, init: float = -6.0, cap: float | None = None):
        super().__init__()
        self.kind = kind
        self.cap = 1.0 if cap is None else float(cap)
        self.channel_dim = 1 if len(dst_shape) >= 3 else len(dst_shape) - 1
        self.dst_ndim = len(dst_shape)
        if kind == "scalar":  # shape [1], not 0-d: FSDP2's fully_shard refuses 0-d parameters
            self.logit = nn.Parameter(torch.full((1,), float(init)))
        elif kind == "channel":
            self.logit = nn.Parameter(torch.full((int(dst_shape[self.channel_dim]),), float(init)))
        elif kind == "input":
            self.map = Projection(src_shape, dst_shape, proj_init="zero")
            self.logit = nn.Parameter(torch.full((int(dst_shape[self.channel_dim]),), float(init)))
        else:
            raise PlacementError(f"unknown gate kind {kind!r}: use 'scalar', 'channel' or 'input'")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit"  # state dicts and saves made before the [1] shape hold a 0-d scalar logit
        if self.kind == "scalar" and key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _broadcast(self, logit: torch.Tensor) -> torch.Tensor:
        if self.kind == "scalar":
            return logit
        shape = [1] * self.dst_ndim
        shape[self.channel_dim] = -1
        return logit.reshape(shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logit = self._broadcast(self.logit)
        if self.kind == "input":
            logit = self.map(h) + logit
        gate = torch.sigmoid(logit)
        return gate if self.cap == 1.0 else gate * self.cap

    def value(self) -> torch.Tensor:
        """The gate's input-independent part (for reports): ``cap * sigmoid(logit)``."""
        return torch.sigmoid(self.logit.detach()) * self.cap

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, cap={self.cap}"


class Wormhole(nn.Module):
    """``h -> gate(h) * proj(h)``: the signal a deep layer injects into an earlier layer's input."""

    def __init__(
        self,
        src_shape: Shape,
        dst_shape: Shape,
        *,
        gate: str = "scalar",
        gate_init: float = -6.0,
        proj_init: str = "zero",
        proj_std: float = 1e-2,
        gate_cap: float | None = None,
        src: str = "",
        dst: str = "",
    ):
        super().__init__()
        self.src, self.dst = src, dst
        self.src_shape, self.dst_shape = tuple(src_shape), tuple(dst_shape)
        self.proj = Projection(src_shape, dst_shape, proj_init=proj_init, proj_std=proj_std)
        self.gate = Gate(gate, src_shape, dst_shape, init=gate_init, cap=gate_cap)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(h) * self.proj(h)

    def extra_repr(self) -> str:
        return f"src={self.src!r}, dst={self.dst!r}, {self.src_shape} -> {self.dst_shape}"


def per_sample_norm(*tensors: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_i ||t_i||^2)`` per sample (batch dim 0), accumulated in float32 or wider."""
    norms = [
        torch.linalg.vector_norm(t.detach().flatten(1), dim=1, dtype=torch.promote_types(t.dtype, torch.float32))
        for t in tensors
    ]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms, 1), dim=1)


class ZerosInit:
    """Initial state of a wormhole fixed point: zero injection, shaped like each destination input.

    ``entries[i] = (input_index, shape_without_batch, dtype)``: the state ``z_i`` is
    ``zeros_like(inputs[input_index])`` when the destination input comes from outside the cycle,
    else zeros of the recorded shape with the batch size of the first batched input.
    """

    def __init__(self, entries: Sequence[tuple[int | None, tuple[int, ...], torch.dtype]]):
        self.entries = [(i, tuple(s), d) for i, s, d in entries]

    def __call__(self, *inputs: torch.Tensor):
        batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), 1)
        ref = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
        zs = []
        for index, shape, dtype in self.entries:
            if index is not None:
                zs.append(torch.zeros_like(inputs[index]))
            else:
                zs.append(torch.zeros((batch, *shape), dtype=dtype, device=None if ref is None else ref.device))
        return zs[0] if len(zs) == 1 else tuple(zs)
