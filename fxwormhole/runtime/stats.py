"""Per-sample statistics of a fixed-point solve (forward and adjoint).

Stats are data, not prints: every call of a :class:`~fxwormhole.runtime.fixed_point.FixedPoint`
leaves a :class:`FixedPointStats` on the module (``module.stats``), whose backward half is filled
in when the backward pass runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = [
    "CONVERGED",
    "MAX_ITER",
    "DIVERGED",
    "NON_FINITE",
    "STATUS_NAMES",
    "SolveStats",
    "FixedPointStats",
    "HostReads",
    "host_read",
]

class HostReads:
    """Counts the runtime's device-to-host reads (each is a stream sync on a GPU)."""

    count = 0

    @classmethod
    def reset(cls) -> int:
        n, cls.count = cls.count, 0
        return n


def host_read(t: Tensor) -> list:
    """The values of a small tensor on the host: the runtime's only synchronisation point."""
    HostReads.count += 1
    return (t if t.dim() == 1 else t.reshape(-1)).tolist()


# Status codes (int8 tensors); ordered so that a larger code is a worse outcome.
CONVERGED, MAX_ITER, DIVERGED, NON_FINITE = 0, 1, 2, 3
STATUS_NAMES = ("converged", "max_iter", "diverged", "non_finite")


@dataclass
class SolveStats:
    """One solve (forward or adjoint), per sample.

    Attributes:
        iterations: int64 ``[B]``, evaluations of the map spent on each sample.
        residual: float ``[B]``, relative residual at the returned point.
        status: int8 ``[B]``, codes indexing :data:`STATUS_NAMES`.
    """

    iterations: Tensor
    residual: Tensor
    status: Tensor

    def counts(self) -> Dict[str, int]:
        """Number of samples per status name (only statuses that occur)."""
        codes = torch.bincount(self.status.long().flatten(), minlength=len(STATUS_NAMES)).tolist()
        return {STATUS_NAMES[i]: c for i, c in enumerate(codes) if c}

    @property
    def ok(self) -> bool:
        return bool(host_read((self.status == CONVERGED).all())[0])

    @property
    def worst_residual(self) -> float:
        r = self.residual.detach().float()
        return float(r.nan_to_num(nan=float("inf")).max()) if r.numel() else 0.0

    @property
    def mean_iterations(self) -> float:
        return float(self.iterations.float().mean()) if self.iterations.numel() else 0.0

    def status_names(self) -> list[str]:
        return [STATUS_NAMES[int(c)] for c in self.status.tolist()]

    def summary(self) -> dict:
        return {
            "mean_iterations": self.mean_iterations,
            "max_iterations": int(self.iterations.max()) if self.iterations.numel() else 0,
            "worst_residual": self.worst_residual,
            "status": self.counts(),
        }


@dataclass
class FixedPointStats:
    """Statistics of the last call of a fixed-point node.

    Forward fields are set when the forward returns; ``backward_*`` stay ``None`` until the
    backward pass has run (implicit mode: the adjoint solve; other modes record no adjoint).
    """

    iterations: Tensor
    residual: Tensor
    status: Tensor
    name: str = "fixed_point"
    tol: float = 0.0
    grad_mode: str = "implicit"
    backward_iterations: Optional[Tensor] = None
    backward_residual: Optional[Tensor] = None
    backward_status: Optional[Tensor] = None
    extra: dict = field(default_factory=dict)

    @property
    def forward(self) -> SolveStats:
        return SolveStats(self.iterations, self.residual, self.status)

    @property
    def backward(self) -> Optional[SolveStats]:
        if self.backward_iterations is None:
            return None
        return SolveStats(self.backward_iterations, self.backward_residual, self.backward_status)

    def set_backward(self, solve: SolveStats) -> None:
        self.backward_iterations, self.backward_residual, self.backward_status = (
            solve.iterations, solve.residual, solve.status)

    @property
    def forward_work(self):
        """What the forward solve cost (:class:`~fxwormhole.runtime._loop.Work`: rows x evaluations
        really computed, checks, host reads), or None."""
        return self.extra.get("forward_work")

    @property
    def backward_work(self):
        """What the adjoint solve cost (rows really computed, re-linearised rows, ...), or None."""
        return self.extra.get("backward_work")

    @property
    def worst_residual(self) -> float:
        """Worst forward residual over the batch (NaN counts as +inf)."""
        return self.forward.worst_residual

    @property
    def mean_iterations(self) -> float:
        return self.forward.mean_iterations

    def status_names(self) -> list[str]:
        return self.forward.status_names()

    def summary(self) -> dict:
        """Plain-Python digest, suitable for logging."""
        out = {"name": self.name, "grad_mode": self.grad_mode, "tol": self.tol,
               "forward": self.forward.summary()}
        bwd = self.backward
        if bwd is not None:
            out["backward"] = bwd.summary()
        for phase in ("forward", "backward"):
            work = self.extra.get(f"{phase}_work")
            if work is not None and phase in out:
                out[phase]["rows_evaluated"] = work.evaluations
        return out
