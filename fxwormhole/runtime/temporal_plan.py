"""What the temporal runtime's modules share: the shape of a stacked recurrent module with temporal
wormholes (:class:`StackPlan`) and the per-step solver statistics of a call (:class:`TemporalStats`).

A module of its own so that the runtime's parts (maps, sequence loop) import it and not the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["StackPlan", "TemporalStats"]


@dataclass(frozen=True)
class StackPlan:
    """Shape of a stacked recurrent module with temporal wormholes.

    ``pairs[k] = (src, dst)``: wormhole ``k`` feeds layer ``src``'s new hidden state into layer
    ``dst``'s input at the same step; ``gates[k]`` is its gate kind (``scalar``, ``channel``,
    ``input``) and ``caps[k]`` the gate's cap (1.0 for none).

    ``region_only``: the step's fixed point spans only the looped layers (the lowest destination
    ``lo`` to the highest source ``hi``), as the per-step fixed point of an unrolled cell loop does:
    the forward residual's scale is then the norm of layer ``lo``'s input (else of ``x_t``) and the
    adjoint residual counts the constant cotangents of those layers only (else of every layer).
    """

    mode: str
    num_layers: int
    input_size: int
    hidden_size: int
    proj_size: int
    pairs: Tuple[Tuple[int, int], ...]
    gates: Tuple[str, ...]
    caps: Tuple[float, ...]
    region_only: bool = False

    @property
    def h_size(self) -> int:
        return self.proj_size or self.hidden_size

    def in_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.h_size

    @cached_property
    def dst_sizes(self) -> Tuple[int, ...]:
        return tuple(self.in_size(b) for _, b in self.pairs)

    @cached_property
    def lo(self) -> int:
        """Lowest layer that depends on the injection (the lowest destination)."""
        return min(b for _, b in self.pairs)

    @cached_property
    def hi(self) -> int:
        """Highest layer the feedback reads (the highest source)."""
        return max(a for a, _ in self.pairs)

    @cached_property
    def srcs(self) -> Tuple[int, ...]:
        return tuple(sorted({a for a, _ in self.pairs}))

    @cached_property
    def dsts(self) -> Tuple[int, ...]:
        return tuple(sorted({b for _, b in self.pairs}))


class TemporalStats:
    """Solver statistics of every step of the last forward; tensors are ``[T, B]``.

    ``backward_iterations`` (and ``backward_residual`` / ``backward_status``) are ``None`` until a
    backward pass has run through every step.
    """

    def __init__(self, iterations: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                 status: Optional[Tensor] = None, *, steps: Optional[List[Any]] = None) -> None:
        self._steps = steps  # generic path: one FixedPointStats per step, filled in by its backward
        self._fwd = (iterations, residual, status)
        self._bwd: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    @classmethod
    def from_steps(cls, steps: List[Any]) -> "TemporalStats":
        return cls(steps=steps)

    @property
    def steps(self) -> int:
        return len(self._steps) if self._steps is not None else int(self._fwd[0].shape[0])

    def _stack(self, field: str) -> Optional[Tensor]:
        vals = [getattr(s, field) for s in self._steps]
        return None if any(v is None for v in vals) else torch.stack([v.detach() for v in vals])

    def _get(self, field: str, index: int, backward: bool) -> Optional[Tensor]:
        if self._steps is not None:
            return self._stack(("backward_" if backward else "") + field)
        if backward:
            return None if self._bwd is None else self._bwd[index]
        return self._fwd[index]

    @property
    def iterations(self) -> Tensor:
        return self._get("iterations", 0, False)  # type: ignore[return-value]

    @property
    def residual(self) -> Tensor:
        return self._get("residual", 1, False)  # type: ignore[return-value]

    @property
    def status(self) -> Tensor:
        return self._get("status", 2, False)  # type: ignore[return-value]

    @property
    def backward_iterations(self) -> Optional[Tensor]:
        return self._get("iterations", 0, True)

    @property
    def backward_residual(self) -> Optional[Tensor]:
        return self._get("residual", 1, True)

    @property
    def backward_status(self) -> Optional[Tensor]:
        return self._get("status", 2, True)

    def set_backward(self, iterations: Tensor, residual: Tensor, status: Tensor) -> None:
        self._bwd = (iterations, residual, status)

    def __repr__(self) -> str:  # one line, not [T, B] tensors (runtime.stats_rows)
        from .stats_rows import stats_repr
        return stats_repr(self)

    def summary(self) -> dict:
        it = self.iterations.float()
        out = {"steps": self.steps, "mean_iterations": float(it.mean()), "max_iterations": int(it.max())}
        bwd = self.backward_iterations
        if bwd is not None:
            out["mean_backward_iterations"] = float(bwd.float().mean())
        return out
