"""Per-sample solve statistics summed up: the row of one fixed point and the one-line ``repr`` of
the stats objects (:class:`~fxwormhole.runtime.stats.FixedPointStats`,
:class:`~fxwormhole.runtime.stats.SolveStats`, ``TemporalStats``).

Read through attributes only (``iterations``, ``residual``, ``status``, ``backward_*``), so it serves
every stats class without importing them; :func:`fxwormhole.report` builds its table from these rows.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

__all__ = ["FixedPointRow", "fixed_point_row", "stats_repr", "status_text", "tensor_of", "STATUS_NAMES"]

#: the status codes of :mod:`fxwormhole.runtime.stats` (not imported from there: its reprs import this module)
STATUS_NAMES = ("converged", "max_iter", "diverged", "non_finite")


@dataclass(frozen=True)
class FixedPointRow:
    """One fixed point (a graph node, or the per-step fixed points of a recurrent module) over the
    samples (and time steps) of its last call. Backward fields are None before a backward pass."""

    name: str
    samples: int
    mean_iterations: float
    max_iterations: int
    worst_residual: float
    status: Dict[str, int]
    mean_backward_iterations: Optional[float] = None
    max_backward_iterations: Optional[int] = None
    worst_backward_residual: Optional[float] = None
    #: solves (forward and adjoint) that did not converge, as counted by the non-convergence
    #: warnings (fxwormhole.set_convergence_warnings) since they started recording
    failed_solves: int = 0

    @property
    def ok(self) -> bool:
        return set(self.status) <= {"converged"}



def status_text(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def tensor_of(stats: Any, name: str) -> Optional[torch.Tensor]:
    value = getattr(stats, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def _worst(residual: Optional[torch.Tensor]) -> Optional[float]:
    if residual is None or not residual.numel():
        return None
    return float(residual.float().nan_to_num(nan=math.inf).max())


def fixed_point_row(name: str, stats: Any) -> FixedPointRow:
    iters, status = tensor_of(stats, "iterations"), tensor_of(stats, "status")
    b_iters = tensor_of(stats, "backward_iterations")
    codes = Counter(int(c) for c in status.flatten().tolist()) if status is not None else Counter()
    return FixedPointRow(
        name=name,
        samples=int(iters.numel()),
        mean_iterations=float(iters.float().mean()),
        max_iterations=int(iters.max()),
        worst_residual=_worst(tensor_of(stats, "residual")) or 0.0,
        status={STATUS_NAMES[c] if c < len(STATUS_NAMES) else str(c): n for c, n in sorted(codes.items())},
        mean_backward_iterations=None if b_iters is None else float(b_iters.float().mean()),
        max_backward_iterations=None if b_iters is None else int(b_iters.max()),
        worst_backward_residual=_worst(tensor_of(stats, "backward_residual")),
    )


def stats_repr(stats: Any) -> str:
    """One line for ``repr()`` of :class:`~fxwormhole.runtime.stats.FixedPointStats`,
    :class:`~fxwormhole.runtime.stats.SolveStats` and ``TemporalStats``: the figures of a
    :func:`report` row instead of per-sample tensors (``.summary()`` gives them as a dict, the
    attributes as tensors)."""
    kind = type(stats).__name__
    iters = tensor_of(stats, "iterations")
    if iters is None or not iters.numel():
        return f"{kind}(empty)"
    row = fixed_point_row(getattr(stats, "name", ""), stats)
    size = " x ".join(str(n) for n in iters.shape)
    unit = "samples" if iters.dim() == 1 else "(steps x samples)"
    parts = [f"{row.name!r}"] if row.name else []
    parts.append(f"{size} {unit}")
    phase = "forward " if hasattr(stats, "backward_iterations") else ""  # a SolveStats is either phase
    parts.append(f"{phase}{row.mean_iterations:.2f} iterations (max {row.max_iterations}), worst residual "
                 f"{row.worst_residual:.1e}, {status_text(row.status)}")
    if row.mean_backward_iterations is not None:
        parts.append(f"backward {row.mean_backward_iterations:.2f} iterations (max {row.max_backward_iterations})"
                     + ("" if row.worst_backward_residual is None else
                        f", worst residual {row.worst_backward_residual:.1e}"))
    elif hasattr(stats, "backward_iterations"):
        parts.append("no backward yet")
    return f"{kind}({'; '.join(parts)})"
