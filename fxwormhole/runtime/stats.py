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
    "failure_advice",
]

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

    def __repr__(self) -> str:  # one line, not three tensors (runtime.stats_rows)
        from .stats_rows import stats_repr
        return stats_repr(self)

    def counts(self) -> Dict[str, int]:
        """Number of samples per status name (only statuses that occur)."""
        codes = torch.bincount(self.status.long().flatten(), minlength=len(STATUS_NAMES)).tolist()
        return {STATUS_NAMES[i]: c for i, c in enumerate(codes) if c}

    @property
    def ok(self) -> bool:
        return bool((self.status == CONVERGED).all())

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

    def __repr__(self) -> str:  # one line, not six tensors (runtime.stats_rows)
        from .stats_rows import stats_repr
        return stats_repr(self)

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
        return out


def failure_advice(status: Tensor, iterations: Optional[Tensor], phase: str, hint: str) -> str:
    """The "what to do" of an ``on_fail`` message, by cause (the last dimension of ``status`` and
    ``iterations`` is the batch; a temporal solve has ``[T, B]``).

    A non-finite residual at the first evaluation of the map, before any solver step, comes from what
    the solve was given: the input or the activations computed from it (forward), the incoming
    gradient or the forward values (adjoint). No solver setting changes that, so such samples are
    named with that cause, unless the sample also went non-finite while iterating (then NaN carried
    to its later steps is the iteration's). The solver ``hint`` is given for every other failure
    (and for all when ``iterations`` is unknown)."""
    if iterations is None or status.numel() == 0:
        return f"to fix: {hint}"
    batch = status.shape[-1]
    failed = (status != CONVERGED).reshape(-1, batch)
    non_finite = (status == NON_FINITE).reshape(-1, batch)
    at_start = non_finite & (iterations.to(status.device) <= 1).reshape(-1, batch)
    given = (at_start.any(0) & ~(non_finite & ~at_start).any(0)).nonzero().flatten().tolist()
    if not given:
        return f"to fix: {hint}"
    one = len(given) == 1
    those = "that sample" if one else "those samples"
    shown = ", ".join(map(str, given[:5])) + (f" and {len(given) - 5} more" if len(given) > 5 else "")
    if phase.startswith("forward"):
        cause = (f"the input of {those}, or the activations computed from it before or inside the cycle, were "
                 "non-finite; check the input (torch.isfinite(x)) and the layers before the cycle")
    else:
        cause = (f"the gradient arriving from the loss, or the forward values of {those}, were non-finite; "
                 "check the loss and the forward warning")
    advice = (f"sample{'' if one else 's'} {shown} {'was' if one else 'were'} non-finite (NaN/Inf) at the first "
              f"evaluation, before any solver step: {cause}; no solver setting (max_iter, damping, gate_init) "
              "changes that")
    rest = int((failed & ~at_start).any(0).sum())
    return advice + (f"; to fix the other failures ({rest} sample{'' if rest == 1 else 's'}): {hint}" if rest else "")
