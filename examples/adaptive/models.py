"""Models of the adaptive-depth experiments, in plain PyTorch.

The *plain* models are ordinary feedforward networks that :func:`fxwormhole.transform` rewrites with
one wormhole; the *tied* models run the very cycle that wormhole creates a fixed number of times,
with shared weights, and back-propagate through the unrolled loop (the "deeper network" of the
paper's comparison). Both use the same gate and projection shapes as the library's input gate, so
the tied model and the wormhole model differ only in how often the cycle runs and how it is
differentiated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WORMHOLE = ("conv2", "conv1")  # (source, destination): conv2's activation feeds conv1's input


class ConvAdder(nn.Module):
    """Per-position classifier over a sequence: ``embed`` -> ``conv1`` -> ``conv2`` -> ``head``.

    Kernel-3 convolutions with ReLU; ``head`` is a 1x1 convolution to one logit per position.
    Input ``[B, in_channels, L]``, output ``[B, L]``.
    """

    def __init__(self, in_channels: int = 2, channels: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv1d(in_channels, channels, 3, padding=1)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.head = nn.Conv1d(channels, 1, 1)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.embed(x))

    def body(self, e: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(e))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.features(x))).squeeze(1)


class GatedFeedback(nn.Module):
    """``h -> sigmoid(W_g h + b) * (P h)`` with 1x1 convolutions: the library's input gate and
    feature-map projection, written out (``W_g`` starts at zero, ``b`` at ``gate_init``)."""

    def __init__(self, channels: int, gate_init: float = -2.0, proj_std: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Conv1d(channels, channels, 1, bias=False)
        self.gate = nn.Conv1d(channels, channels, 1)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, proj_std)
            self.gate.weight.zero_()
            self.gate.bias.fill_(gate_init)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.gate(h)) * self.proj(h)


class TiedAdder(ConvAdder):
    """:class:`ConvAdder` whose ``conv1 -> conv2`` cycle runs ``K`` times: ``z = 0``; repeat K:
    ``h = body(e + z)``; ``z = feedback(h)``; the head reads the last ``h``. K=1 is the plain model
    (the feedback is never used)."""

    def __init__(self, K: int, in_channels: int = 2, channels: int = 32, gate_init: float = -2.0,
                 proj_std: float = 0.1) -> None:
        super().__init__(in_channels, channels)
        self.K = K
        self.feedback = GatedFeedback(channels, gate_init, proj_std)

    def forward(self, x: Tensor) -> Tensor:
        e = self.features(x)
        z = torch.zeros_like(e)
        for _ in range(self.K):
            h = self.body(e + z)
            z = self.feedback(h)
        return self.head(h).squeeze(1)
