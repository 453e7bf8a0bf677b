"""Front door for sensitivity probes and SAL: :func:`instrument`, :func:`instrument_graph`,
:func:`sensitivity_report`.

Example::

    model = fxwormhole.instrument(net, (x,), sal=SALConfig(eta=0.02))   # net is not touched
    for x, y in data:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()      # SAL rides on .grad
    print(fxwormhole.sensitivity_report(model))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .capture import capture_graph
from .config import SALConfig
from ._text import text_table
from .errors import ConfigError, PlacementError
from .passes._common import run_passes
from .passes.pipeline import instrument_passes, sensitivity_passes
from .passes.sensitivity_annotate import ActivationSpec
from .passes.verify import PipelineCheck
from .runtime.sensitivity import probes_of

__all__ = ["instrument", "instrument_graph", "sensitivity_report", "SensitivityReport", "SensitivityRow", "SAL"]


def _check_sal(sal: Any) -> SALConfig:
    if sal is None:
        return SALConfig(enabled=False)
    if not isinstance(sal, SALConfig):
        raise ConfigError(f"sal={sal!r} is invalid: expected a fxwormhole.SALConfig or None (probes only)")
    return sal


def instrument_graph(gm: fx.GraphModule, sal: Optional[SALConfig] = None,
                     activations: Optional[Mapping[str, ActivationSpec]] = None, *,
                     check: Optional[PipelineCheck] = None) -> fx.GraphModule:
    """Put a sensitivity probe on every neuron layer of ``gm`` (in place) and return it.

    Nested GraphModules (fixed-point bodies) are instrumented too. Call it before any step that
    snapshots a body's graph (e.g. a VJP graph built with ``make_fx``), or rebuild that snapshot.

    Args:
        gm: a captured (possibly already rewritten) GraphModule; it is modified.
        sal: SAL rule; ``None`` or ``SALConfig(enabled=False)`` installs measuring probes only.
        activations: per-layer activation overrides (see :class:`SensitivityAnnotate`).
        check: the pipeline check to run between the passes (see :mod:`fxwormhole.passes.verify`).
    """
    return run_passes(gm, sensitivity_passes(_check_sal(sal), activations), check=check)


def instrument(model: nn.Module, example_inputs: Any, sal: Optional[SALConfig] = None, *,
               activations: Optional[Mapping[str, ActivationSpec]] = None, front_end: str = "auto",
               verify: bool = True) -> fx.GraphModule:
    """A copy of ``model`` with a sensitivity probe on every neuron (and SAL when ``sal`` is enabled).

    ``model`` is never mutated: it is captured (deep-copied) by :func:`fxwormhole.capture.capture`.
    The result is a GraphModule whose parameters keep their names (the original ``state_dict``
    loads into it; the result's ``state_dict`` adds the probes' ``s_bar``/``log_rms``/``count``
    buffers). Statistics and SAL act in training mode only; SAL's gradient is added to ``.grad``
    during ``loss.backward()``, so any optimizer applies it (see docs/sensitivity.md).

    Args:
        model: the network.
        example_inputs: a tensor or a tuple of positional example inputs.
        sal: :class:`SALConfig`; ``None`` installs measuring probes only.
        activations: per-layer activation overrides by module path (a registered name, or an
            elementwise callable / activation module).
        front_end: capture front end (``"auto"``, ``"symbolic_trace"``, ``"export"``).
        verify: check that the probes change no value (see ``verify`` of :func:`fxwormhole.transform`).

    Raises:
        ConfigError: bad ``sal`` or ``model``.
        PlacementError: the model holds no neuron layer to probe.
    """
    sal = _check_sal(sal)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"instrument(model=...) expects an nn.Module, got {type(model).__name__}")
    captured = capture_graph(model, example_inputs, front_end=front_end)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = run_passes(captured.graph_module, instrument_passes(captured, sal, activations),
                    check=PipelineCheck(inputs, verify=verify, what="instrument"))
    if not probes_of(gm):
        raise PlacementError(
            f"instrument: no neuron layer (Linear, ConvNd, RNN/LSTM/GRU or a cell) found as a submodule of "
            f"{type(model).__name__}; a bare layer passed as the model is not a submodule: wrap it in a module")
    gm.train(model.training)
    return gm


@dataclass(frozen=True)
class SensitivityRow:
    """One probed layer: per-neuron moving averages summarised. ``mean_s_bar``, ``log_rms_s`` and
    ``below_target`` are NaN while ``updates`` is 0: nothing was measured yet (statistics are gathered
    by training-mode forwards with autograd on), and the zeros in the buffers are no measurement."""

    layer: str
    kind: str
    activation: str
    source: str
    neurons: int
    mean_s_bar: float
    log_rms_s: float
    below_target: float
    updates: int

    def figures(self) -> Tuple[str, str, str]:
        """``mean s_bar``, ``log RMS s`` and ``s_bar<target`` as tables print them ("n/a" before the
        first update)."""
        if not self.updates:
            return ("n/a",) * 3
        return f"{self.mean_s_bar:.4f}", f"{self.log_rms_s:+.4f}", f"{100 * self.below_target:.1f}%"


@dataclass(frozen=True)
class SensitivityReport:
    """Per-layer sensitivity statistics of an instrumented model; ``str()`` is a table."""

    rows: List[SensitivityRow]
    target: float

    def mean_log_rms(self) -> float:
        """Mean over the measured layers of the log RMS sensitivity (0 at the edge of chaos; NaN
        when no layer was measured yet)."""
        vals = [r.log_rms_s for r in self.rows if r.updates]
        return sum(vals) / len(vals) if vals else math.nan

    def __str__(self) -> str:
        head = ("layer", "kind", "activation", "source", "neurons", "mean s_bar", "log RMS s",
                f"s_bar<{self.target:g}", "updates")
        body = [(r.layer, r.kind, r.activation, r.source, str(r.neurons), *r.figures(), str(r.updates))
                for r in self.rows]
        return text_table(head, body, left=4)


def sensitivity_report(model: nn.Module) -> SensitivityReport:
    """Per-layer sensitivity of an instrumented ``model`` (statistics gathered in training mode).

    Raises:
        ConfigError: ``model`` has no probes (it was not instrumented).
    """
    from .transformed import public_name  # layers inside fixed points report their original paths

    probes = probes_of(model)
    if not probes:
        raise ConfigError("sensitivity_report: the model has no sensitivity probes; build it with "
                          "fxwormhole.instrument(...) or fxwormhole.transform(..., sal=SALConfig())")
    rows, target = [], 1.0
    for p in probes.values():
        target = p.rule.target
        with torch.no_grad():
            s, updates = p.s_bar.float(), int(p.count)
            measured = (float(s.mean()), float(p.log_rms), float((s < p.rule.target).float().mean()))
            rows.append(SensitivityRow(public_name(p.layer), p.kind, p.activation, p.source, p.neurons,
                                       *(measured if updates else (math.nan,) * 3), updates))
    return SensitivityReport(rows, target)


class SAL:
    """Handle on the probes of an instrumented model.

    SAL needs no call in the training loop: its gradients enter ``.grad`` during ``loss.backward()``.
    This object reads statistics, resets them and changes the rule between steps (a change of a
    rule constant makes torch.compile recompile once).

    Example::

        model = fxwormhole.instrument(net, (x,), sal=SALConfig(eta=0.02))
        sal = fxwormhole.SAL(model)
        ...  # loss.backward(); opt.step()
        print(sal.mean_s_bar(), sal.report())
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.probes = probes_of(model)

    def zero_stats(self) -> None:
        """Reset every probe's moving averages."""
        for p in self.probes.values():
            p.zero_stats()

    def configure(self, **changes: Any) -> None:
        """Change rule fields (``eta``, ``target``, ``two_sided``, ``log_form``, ``enabled``) of every probe."""
        allowed = {"eta", "target", "two_sided", "log_form", "enabled"}
        bad = set(changes) - allowed
        if bad:
            raise ConfigError(f"SAL.configure: unknown field(s) {sorted(bad)}: expected some of {sorted(allowed)}")
        for p in self.probes.values():
            p.rule = replace(p.rule, **changes)
            if hasattr(p, "spec"):
                p.spec = replace(p.spec, rule=p.rule)

    def mean_s_bar(self) -> float:
        """Mean ``s_bar`` over all neurons of the probes measured so far (NaN before the first update)."""
        vals = [p.s_bar.float() for p in self.probes.values() if int(p.count)]
        return float(torch.cat(vals).mean()) if vals else math.nan

    def log_sensitivity(self) -> Dict[str, float]:
        """Per layer: log RMS sensitivity (moving average; NaN for a layer not measured yet)."""
        return {p.layer: float(p.log_rms) if int(p.count) else math.nan for p in self.probes.values()}

    def report(self) -> "SensitivityReport":
        """A :class:`SensitivityReport` of the model."""
        return sensitivity_report(self.model)
