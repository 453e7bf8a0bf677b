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

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List

from torch import nn

from ._modules import unwrap
from ._text import text_table
from .runtime.stats_rows import STATUS_NAMES as _STATUS, FixedPointRow, fixed_point_row, stats_repr, status_text, \
    tensor_of

__all__ = ["report", "stats_repr", "StatsReport", "FixedPointRow", "WormholeRow"]

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
            out[f"{base}/failed_solves"] = float(r.failed_solves)
            for status in _STATUS[1:]:  # failures only: 0 when all converged, so a plot shows when they start
                out[f"{base}/{status}_fraction"] = r.status.get(status, 0) / max(r.samples, 1)
        for w in self.wormholes:
            out[f"gate/{w.name}"] = w.gate
        for p in (p for p in self.probes if p.updates):  # a probe not measured yet has no figures to log
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
                     f"{r.worst_residual:.1e}", _opt(r.worst_backward_residual, ".1e"), status_text(r.status))
                    for r in self.fixed_points]
            if any(r.failed_solves for r in self.fixed_points):  # the warnings' running count
                head += ("failed solves so far",)
                body = [row + (r.failed_solves,) for row, r in zip(body, self.fixed_points)]
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
            body = [(p.layer, p.neurons, *p.figures(), p.updates) for p in self.probes]
            parts.append(text_table(head, body))
        return "\n\n".join(parts) if parts else "no fixed points, wormholes or sensitivity probes"


def _opt(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


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

    from .runtime._warnings import convergence_failures

    net = unwrap(net)
    rows, not_run = [], []
    failures = convergence_failures()
    stats_of = net.fixed_point_stats() if callable(getattr(net, "fixed_point_stats", None)) else {}
    for name, stats in stats_of.items():
        if stats is None or tensor_of(stats, "iterations") is None:
            not_run.append(name)
        else:
            # the warnings count by the runtime's name: the node's, or "temporal:<path>" (runtime.recurrent)
            failed = failures.get(getattr(stats, "name", None) or f"temporal:{name}", 0)
            rows.append(replace(fixed_point_row(name, stats), failed_solves=failed))
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
