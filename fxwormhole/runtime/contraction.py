"""Guards that keep a wormhole's feedback contractive (issue: divergence when gates open wide)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["SpectralCap", "cap_spectral_norm"]


class SpectralCap(nn.Module):
    """Parametrisation ``W -> W / max(1, ||W||_2 / cap)``: the spectral norm never exceeds ``cap``.

    Unlike ``torch.nn.utils.spectral_norm`` (which pins the norm *to* 1), this leaves small weights
    alone, so a zero-initialised projection stays zero and the model still equals the original at
    initialisation. The norm is computed exactly (projections are small matrices).
    """

    def __init__(self, cap: float = 1.0):
        super().__init__()
        self.cap = float(cap)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # at least float32 (no half-precision SVD on CPU), and float64 stays float64
        flat = weight.flatten(1).to(torch.promote_types(weight.dtype, torch.float32))
        sigma = torch.linalg.matrix_norm(flat, ord=2).to(weight.dtype)
        return weight / torch.clamp(sigma / self.cap, min=1.0)


def cap_spectral_norm(module: nn.Module, name: str = "weight", cap: float = 1.0) -> nn.Module:
    """Register :class:`SpectralCap` on ``module.<name>`` (in place) and return the module."""
    parametrize.register_parametrization(module, name, SpectralCap(cap))
    return module
