"""``fxwormhole.report(net)``: one readable table of every fixed point, wormhole and probe.

Built only on the public statistics: ``net.fixed_point_stats()`` (the last call of every fixed
point, per sample), the wormholes' gates, and :func:`fxwormhole.sensitivity_report`. ``str(report)``
is the tables; :meth:`StatsReport.metrics` flattens the same figures into ``{tag: float}`` for a
logger (see :class:`fxwormhole.StatsLogger`).

Example::

    loss.backward()
    print(fxwormhole.report(net))
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ._modules import unwrap
from ._text import text_table

__all__ = ["report", "StatsReport", "FixedPointRow", "WormholeRow"]

_STATUS = ("converged", "max_iter", "diverged", "non_finite")  # the codes of fxwormhole.runtime.stats


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

    @property
    def ok(self) -> bool:
        return set(self.status) <= {"converged"}


@dataclass(frozen=True)
class WormholeRow:
    """One wormhole: where it goes, the fixed point that solves it and how open its gate is
    (``cap * sigmoid(logit)`` averaged over channels; for ``input`` gates the input-independent part)."""

    name: str
    fixed_point: str
    src: str
    dst: str
    gate_kind: str
    gate: float


@dataclass(frozen=True)
class StatsReport:
    """Fixed points, wormholes and probes (the rows of :func:`fxwormhole.sensitivity_report`) of a
    model; ``str()`` is three small tables."""

    fixed_points: List[FixedPointRow] = field(default_factory=list)
    wormholes: List[WormholeRow] = field(default_factory=list)
    probes: List[Any] = field(default_factory=list)  # fxwormhole.instrument.SensitivityRow
    not_run: List[str] = field(default_factory=list)
    target: float = 1.0

    def metrics(self) -> Dict[str, float]:
        """Every figure as ``{"fixed_point/<name>/forward_iterations_mean": 2.5, ...}`` (tags group in
        TensorBoard by their first two parts)."""
        out: Dict[str, float] = {}
        for r in self.fixed_points:
            base = f"fixed_point/{r.name}"
            out[f"{base}/forward_iterations_mean"] = r.mean_iterations
            out[f"{base}/forward_iterations_max"] = float(r.max_iterations)
            out[f"{base}/forward_residual_worst"] = r.worst_residual
            if r.mean_backward_iterations is not None:
                out[f"{base}/backward_iterations_mean"] = r.mean_backward_iterations
                out[f"{base}/backward_iterations_max"] = float(r.max_backward_iterations)
            if r.worst_backward_residual is not None:
                out[f"{base}/backward_residual_worst"] = r.worst_backward_residual
            for status in _STATUS[1:]:  # failures only: 0 when all converged, so a plot shows when they start
                out[f"{base}/{status}_fraction"] = r.status.get(status, 0) / max(r.samples, 1)
        for w in self.wormholes:
            out[f"gate/{w.name}"] = w.gate
        for p in self.probes:
            out[f"sensitivity/{p.layer}/log_rms"] = p.log_rms_s
            out[f"sensitivity/{p.layer}/mean_s_bar"] = p.mean_s_bar
            out[f"sensitivity/{p.layer}/below_target_fraction"] = p.below_target
        return out

    def __str__(self) -> str:
        parts = []
        if self.fixed_points:
            head = ("fixed point", "solves", "fwd iter mean", "max", "bwd iter mean", "max", "worst residual fwd",
                    "bwd", "status")
            body = [(r.name, r.samples, f"{r.mean_iterations:.2f}", r.max_iterations,
                     _opt(r.mean_backward_iterations, ".2f"), _opt(r.max_backward_iterations, "d"),
                     f"{r.worst_residual:.1e}", _opt(r.worst_backward_residual, ".1e"), _status(r.status))
                    for r in self.fixed_points]
            parts.append(text_table(head, body))
        if self.not_run:
            parts.append(f"not called yet: {', '.join(self.not_run)}")
        if self.wormholes:
            head = ("wormhole", "fixed point", "src -> dst", "gate", "openness")
            body = [(w.name, w.fixed_point, f"{w.src} -> {w.dst}", w.gate_kind, f"{w.gate:.4f}") for w in self.wormholes]
            table = text_table(head, body, left=4)
            if any(w.gate_kind == "input" for w in self.wormholes):
                table += "\n(input gates: the openness of the bias alone; each sample adds W_g h to the logit)"
            parts.append(table)
        if self.probes:
            head = ("probed layer", "neurons", "mean s_bar", "log RMS s", f"s_bar<{self.target:g}", "updates")
            body = [(p.layer, p.neurons, f"{p.mean_s_bar:.4f}", f"{p.log_rms_s:+.4f}", f"{100 * p.below_target:.1f}%",
                     p.updates) for p in self.probes]
            parts.append(text_table(head, body))
        return "\n\n".join(parts) if parts else "no fixed points, wormholes or sensitivity probes"


def _opt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _status(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _tensor(stats: Any, name: str) -> Optional[torch.Tensor]:
    value = getattr(stats, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def _worst(residual: Optional[torch.Tensor]) -> Optional[float]:
    if residual is None or not residual.numel():
        return None
    return float(residual.float().nan_to_num(nan=math.inf).max())


def _fixed_point_row(name: str, stats: Any) -> FixedPointRow:
    iters, status = _tensor(stats, "iterations"), _tensor(stats, "status")
    b_iters = _tensor(stats, "backward_iterations")
    codes = Counter(int(c) for c in status.flatten().tolist()) if status is not None else Counter()
    return FixedPointRow(
        name=name,
        samples=int(iters.numel()),
        mean_iterations=float(iters.float().mean()),
        max_iterations=int(iters.max()),
        worst_residual=_worst(_tensor(stats, "residual")) or 0.0,
        status={_STATUS[c] if c < len(_STATUS) else str(c): n for c, n in sorted(codes.items())},
        mean_backward_iterations=None if b_iters is None else float(b_iters.float().mean()),
        max_backward_iterations=None if b_iters is None else int(b_iters.max()),
        worst_backward_residual=_worst(_tensor(stats, "backward_residual")),
    )


def _owner(path: str, fixed_points: List[str]) -> str:
    """The fixed point whose module path is the longest prefix of ``path`` ("" when none)."""
    owners = [fp for fp in fixed_points if path.startswith(f"{fp}.")]
    return max(owners, key=len, default="")


def report(net: nn.Module) -> StatsReport:
    """Every fixed point (iterations forward and backward, worst residuals, status counts of the
    last call), every wormhole (its gate's openness) and every sensitivity probe of ``net``.

    ``net`` is a model from :func:`fxwormhole.transform` or :func:`fxwormhole.instrument` (also
    inside ``DistributedDataParallel`` or ``torch.compile``); call it after a forward (and
    backward) pass. A model with none of these gives an empty report.
    """
    from .runtime.wormhole import Wormhole
    from .transformed import public_name

    net = unwrap(net)
    rows, not_run = [], []
    stats_of = net.fixed_point_stats() if callable(getattr(net, "fixed_point_stats", None)) else {}
    for name, stats in stats_of.items():
        if stats is None or _tensor(stats, "iterations") is None:
            not_run.append(name)
        else:
            rows.append(_fixed_point_row(name, stats))
    wormholes = []
    for path, module in net.named_modules():
        if isinstance(module, Wormhole):
            owner = _owner(path, list(stats_of))
            gate = module.gate
            wormholes.append(WormholeRow(public_name(path), owner, module.src, module.dst, gate.kind,
                                         float(gate.value().float().mean())))
    probes, target = [], 1.0
    from .runtime.sensitivity import probes_of

    if probes_of(net):
        from .instrument import sensitivity_report

        sens = sensitivity_report(net)
        target = sens.target
        probes = list(sens.rows)
    return StatsReport(rows, wormholes, probes, not_run, target)
