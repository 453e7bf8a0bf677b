"""fxwormhole: torch.fx passes for gated wormhole edges, fixed points and sensitivity probes.

Public surface (imported lazily so that ``import fxwormhole`` stays cheap)::

    fxwormhole.capture(model, example_inputs)            -> torch.fx.GraphModule
    fxwormhole.transform(model, example_inputs, config)  -> transformed nn.Module
    fxwormhole.instrument(model, example_inputs, sal)    -> model with sensitivity probes
    fxwormhole.fixed_point(f, z0, *args, ...)            -> z*  (functional fixed point)
    fxwormhole.FixedPoint(body, ...)                     -> nn.Module solving z = body(z, *inputs)
    fxwormhole.compile(model) / fxwormhole.export(model, example_inputs, path)

Functions whose names are also submodule names (``capture``, ``instrument``, ``compile``,
``export``) are imported eagerly: importing a submodule binds the package attribute to the
module, so a lazy function of the same name would stop being callable once anything imported
``fxwormhole.capture``.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import GradConfig, SALConfig, SolverConfig, WormholeConfig
from .errors import (
    CaptureError,
    ConfigError,
    ConvergenceError,
    ExportError,
    FxWormholeError,
    PlacementError,
    SaveError,
    LoadError,
)

from .capture import capture
from .compile import compile  # noqa: A001 - the public name; torch.compile is unaffected
from .export import export
from .instrument import SAL, instrument, sensitivity_report

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "layer_table": "fxwormhole.analysis",
    "FixedPoint": "fxwormhole.runtime.fixed_point",
    "fixed_point": "fxwormhole.runtime.fixed_point",
    "FixedPointStats": "fxwormhole.runtime.stats",
    "register_solver": "fxwormhole.runtime.solvers",
    "transform": "fxwormhole.api",
    "save": "fxwormhole.persistence",
    "load": "fxwormhole.persistence",
    "load_optimizer": "fxwormhole.persistence",
    "report": "fxwormhole.stats_report",
    "StatsLogger": "fxwormhole.stats_logger",
}

__all__ = [
    "GradConfig",
    "SALConfig",
    "SolverConfig",
    "WormholeConfig",
    "FxWormholeError",
    "ConfigError",
    "CaptureError",
    "PlacementError",
    "ConvergenceError",
    "ExportError",
    "SaveError",
    "LoadError",
    "capture",
    "compile",
    "export",
    "instrument",
    "sensitivity_report",
    "SAL",
    *_LAZY,
]


# submodules reachable as attributes without an explicit import (``fxwormhole.zoo.MLP()``)
_SUBMODULES = ("analysis", "zoo", "drawing", "passes", "runtime", "transformed")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fxwormhole' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
