"""The demo's training helpers, shared with ``examples/``: its wormhole config, a timed training log."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ...config import WormholeConfig
from ...transformed import per_sample_iterations

__all__ = ["DEMO_WORMHOLES", "TrainLog", "parameter_count"]

#: Wormhole settings of the demo (and the examples' default): input-dependent gates half open at
#: the start and a small random projection, so the fixed points need more than one iteration and
#: the count can differ per sample; plain (Picard) iteration, as in the paper.
DEMO_WORMHOLES = WormholeConfig(gate="input", gate_init=-1.0, proj_init="normal", proj_std=0.1,
                                solver="picard", tol=1e-4, max_iter=30)


@dataclass
class TrainLog:
    """Record of a training run: loss, wall and CPU seconds, and mean fixed-point iterations per step.

    ``cpu_seconds`` is this thread's CPU time: what the steps cost when other jobs share the cores
    (wall time then also counts the waits).
    """

    losses: list = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    fwd: list = field(default_factory=list)
    bwd: list = field(default_factory=list)

    def step(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], Tensor], clip: float = 1.0) -> float:
        """One optimizer step on ``loss_fn()`` (timed, gradient norm clipped to ``clip``); returns the loss."""
        t0, c0 = time.perf_counter(), time.thread_time()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.thread_time() - c0
        self.losses.append(float(loss.detach()))
        f, b = per_sample_iterations(model)
        if f is not None:
            self.fwd.append(float(f.mean()))
        if b is not None:
            self.bwd.append(float(b.mean()))
        return self.losses[-1]

    @staticmethod
    def _mean(v: list) -> float:
        return sum(v) / len(v) if v else math.nan

    @property
    def mean_fwd(self) -> float:
        return self._mean(self.fwd)

    @property
    def mean_bwd(self) -> float:
        return self._mean(self.bwd)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
