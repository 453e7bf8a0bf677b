"""The pass lists of the front doors: each runs ONE list with one ``PassManager`` and one check
(``run_passes(gm, passes, check=PipelineCheck(...))``).

=============  ==============================================================================
capture        [NormaliseExport] (export graphs only)
transform      [NormaliseExport], DecomposeRecurrent, TemporalWormholes, [FuseCellLoops] (without SAL),
               PlanWormholes, InsertWormholes, WrapFixedPoints, RefuseDeadCycles,
               SeparateAliasedInputs, SolveDropoutMasks, CycleLayers, CyclePenalties,
               [SensitivityAnnotate, SensitivityInsert]
instrument     [NormaliseExport], SensitivityAnnotate, SensitivityInsert
=============  ==============================================================================

Every pass decides from the graph and the records earlier passes left (``fxwormhole.passes.meta``)
whether it has work: the decompose and temporal passes find no recurrent module in a feed-forward
model; the cell-loop pass runs a user's unrolled cell loop as one recurrent module when it gets
the temporal wormhole (and records that in the same ``TemporalPlacement``); the plan places what
the temporal passes did not consume, so
insert and wrap find nothing to do in a model that got temporal wormholes only. The front doors
hold no routing logic.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch.fx.passes.infra.pass_base import PassBase

from ..config import SALConfig, WormholeConfig
from .cell_loops import FuseCellLoops
from .cycle_layers import CycleLayers
from .cycle_penalties import CyclePenalties
from .dead_cycles import RefuseDeadCycles
from .insert_wormholes import InsertWormholes
from .normalise_export import NormaliseExport
from .plan_wormholes import PlanWormholes
from .recurrent import DecomposeRecurrent
from .sensitivity_annotate import ActivationSpec, SensitivityAnnotate
from .sensitivity_insert import SensitivityInsert
from .separate_aliases import SeparateAliasedInputs
from .solve_dropout import SolveDropoutMasks
from .temporal_wormhole import TemporalWormholes
from .wrap_fixed_points import WrapFixedPoints

__all__ = ["capture_passes", "transform_passes", "instrument_passes", "sensitivity_passes"]


def capture_passes(captured: Any) -> list[PassBase]:
    """What turns a front end's graph into the graph every pass expects (a :class:`~fxwormhole.capture.Captured`)."""
    return [NormaliseExport(captured.source)] if captured.front_end == "export" else []


def sensitivity_passes(sal: Optional[SALConfig],
                       activations: Optional[Mapping[str, ActivationSpec]] = None) -> list[PassBase]:
    """Annotate every neuron layer, then put a probe on it."""
    return [SensitivityAnnotate(sal, activations), SensitivityInsert(sal)]


def transform_passes(captured: Any, config: WormholeConfig, example_inputs: Sequence[Any], *,
                     sal: Optional[SALConfig] = None) -> list[PassBase]:
    """The passes of :func:`fxwormhole.transform`, in order (see the module docstring)."""
    passes = [
        *capture_passes(captured),
        DecomposeRecurrent(),
        TemporalWormholes(config),
        *([FuseCellLoops(config)] if sal is None else []),  # SAL probes wrap each cell call: loops stay unrolled
        PlanWormholes(config),
        InsertWormholes(config),
        WrapFixedPoints(config, example_inputs),
        RefuseDeadCycles(config),
        SeparateAliasedInputs(),
        SolveDropoutMasks(),
        CycleLayers(),
        CyclePenalties(config.contraction, config.compute_cost),
    ]
    return passes + (sensitivity_passes(sal) if sal is not None else [])


def instrument_passes(captured: Any, sal: Optional[SALConfig],
                      activations: Optional[Mapping[str, ActivationSpec]] = None) -> list[PassBase]:
    """The passes of :func:`fxwormhole.instrument`, in order."""
    return [*capture_passes(captured), *sensitivity_passes(sal, activations)]

