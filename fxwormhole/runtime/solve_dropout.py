"""Dropout inside a fixed point: one mask per forward call, shared by every iteration of the solve.

A fixed point ``z* = body(z*)`` is only defined when the body is a function of its arguments. An
ordinary dropout draws a new mask at every evaluation, so a training-mode solve chases a moving
target and stops (if ever) when the noise happens to fall below ``tol``; the implicit gradient then
differentiates a map the forward never solved. :class:`SolveDropout` draws its mask at the first
evaluation after :func:`new_masks` (the fixed point calls it at the start of each forward) and
reuses it until the next call: "variational" dropout over the iterations, a new mask per step,
as TorchDEQ recommends for DEQs. The body, its implicit gradient and a second evaluation at the
same point all see one mask. In eval mode it is the identity, like ``nn.Dropout``.
"""
from __future__ import annotations

from typing import Optional

import math

import torch
from torch import Tensor, nn

__all__ = ["SolveDropout", "SolveAttention", "new_masks", "has_masks"]


class SolveDropout(nn.Module):
    """Dropout whose mask holds until :meth:`new_mask`.

    Args:
        p: the drop probability.
        feature: drop whole channels (dim 1), as ``nn.Dropout1d/2d/3d`` do.
        returns_mask: return ``(out, keep)`` like ``aten.native_dropout`` (``keep`` boolean).
    """

    def __init__(self, p: float, *, feature: bool = False, returns_mask: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability {p} is not in [0, 1]")
        self.p, self.feature, self.returns_mask = float(p), bool(feature), bool(returns_mask)
        self._noise: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", feature=True" if self.feature else "")

    def new_mask(self) -> None:
        """The next evaluation draws a new mask."""
        self._noise = None

    def _mask_shape(self, x: Tensor) -> tuple[int, ...]:
        if self.feature and x.dim() >= 2:
            return (x.shape[0], x.shape[1], *(1,) * (x.dim() - 2))
        return tuple(x.shape)

    def _draw(self, x: Tensor) -> Tensor:
        """The scaled noise ``keep / (1 - p)``, drawn by the op the original dropout runs, so that
        under one seed the first evaluation equals the original model's, bit for bit."""
        # elementwise noise is laid out like x (ATen draws into empty_like(x): a permuted x gets
        # permuted noise); channel noise is a fresh contiguous [N, C, 1, ...] tensor
        ones = (torch.ones(self._mask_shape(x), dtype=x.dtype, device=x.device) if self.feature
                else torch.ones_like(x))
        if self.returns_mask:
            return torch.native_dropout(ones, self.p, True)[0]
        return (torch.feature_dropout if self.feature else torch.dropout)(ones, self.p, True)

    def forward(self, x: Tensor):
        if not self.training or self.p == 0.0:
            return (x, torch.ones_like(x, dtype=torch.bool)) if self.returns_mask else x
        noise = self._noise
        if noise is None or noise.shape != self._mask_shape(x) or noise.device != x.device or noise.dtype != x.dtype:
            noise = self._noise = self._draw(x)  # a new call, or a new batch: draw afresh
        out = x * noise
        return (out, (noise != 0).expand_as(x)) if self.returns_mask else out


class SolveAttention(nn.Module):
    """``scaled_dot_product_attention`` with ``dropout_p > 0``, its attention weights dropped by a
    :class:`SolveDropout` (the math of ATen's reference kernel, which draws the same noise).

    Args:
        p, is_causal, scale, enable_gqa: the call's arguments.
    """

    def __init__(self, p: float, *, is_causal: bool = False, scale: Optional[float] = None,
                 enable_gqa: bool = False) -> None:
        super().__init__()
        self.is_causal, self.scale, self.enable_gqa = bool(is_causal), scale, bool(enable_gqa)
        self.dropout = SolveDropout(p)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        if not self.training or self.dropout.p == 0.0:
            return nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask, 0.0, self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa)
        if self.enable_gqa:
            k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
            v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
        root = math.sqrt(self.scale if self.scale is not None else 1.0 / math.sqrt(q.size(-1)))
        scores = (q * root) @ (k * root).transpose(-2, -1)
        if self.is_causal:
            causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask)
        return self.dropout(scores.softmax(-1)) @ v


def _dropouts(module: nn.Module) -> list[SolveDropout]:
    return [m for m in module.modules() if isinstance(m, SolveDropout)]


def has_masks(module: nn.Module) -> bool:
    """Whether ``module`` holds a :class:`SolveDropout` that draws masks (training mode)."""
    return any(m.training and m.p > 0.0 for m in _dropouts(module))


def new_masks(module: nn.Module) -> None:
    """Every :class:`SolveDropout` in ``module`` draws a new mask at its next evaluation."""
    for m in _dropouts(module):
        m.new_mask()
