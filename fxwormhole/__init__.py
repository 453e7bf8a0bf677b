"""fxwormhole: torch.fx passes for gated wormhole edges, fixed points and sensitivity probes.

Public surface (imported lazily so that ``import fxwormhole`` stays cheap)::

    fxwormhole.capture(model, example_inputs)            -> torch.fx.GraphModule
    fxwormhole.transform(model, example_inputs, config)  -> transformed nn.Module
    fxwormhole.instrument(model, example_inputs, sal)    -> model with sensitivity probes
    fxwormhole.fixed_point(f, z0, *args, ...)            -> z*  (functional fixed point)
    fxwormhole.FixedPoint(body, ...)                     -> nn.Module solving z = body(z, *inputs)
    fxwormhole.compile(model) / fxwormhole.export(model, example_inputs, path)

Nothing here imports torch, so ``fxwormhole --help`` answers at once. Functions whose names are
also submodule names (``capture``, ``instrument``, ``compile``, ``export``) need care: importing a
submodule binds the package attribute to the module, which would hide the function of the same
name. The package's module class keeps the function there instead (:class:`_Package`).
"""
from __future__ import annotations

import importlib
import sys
import types
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
    VerificationError,
    LoadError,
)

__version__ = "0.1.0"

#: submodules that define a function of their own name: ``fxwormhole.compile`` is the function
_FUNCTION_MODULES = ("capture", "compile", "export", "instrument")

# name -> module that defines it
_LAZY = {
    "capture": "fxwormhole.capture",
    "compile": "fxwormhole.compile",  # the public name; torch.compile is unaffected
    "export": "fxwormhole.export",
    "instrument": "fxwormhole.instrument",
    "sensitivity_report": "fxwormhole.instrument",
    "SAL": "fxwormhole.instrument",
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
    "NonConvergenceWarning": "fxwormhole.runtime._warnings",
    "set_convergence_warnings": "fxwormhole.runtime._warnings",
    "flush_convergence_warnings": "fxwormhole.runtime._warnings",
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
    "VerificationError",
    "LoadError",
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


class _Package(types.ModuleType):
    """The package's module type: when the import system binds a submodule named like its function
    (``import fxwormhole.capture`` sets ``fxwormhole.capture = <module>``), bind the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTION_MODULES and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
