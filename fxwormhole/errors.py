"""One error hierarchy for the whole toolkit.

Every message says what failed, where (a module path or fx node name) and what to do. The CLI
prints ``str(error)`` on one line and exits with code 2.
"""
from __future__ import annotations

__all__ = [
    "FxWormholeError",
    "ConfigError",
    "CaptureError",
    "PlacementError",
    "ConvergenceError",
    "ExportError",
    "SaveError",
    "VerificationError",
    "LoadError",
]


class FxWormholeError(Exception):
    """Base class of every error fxwormhole raises on purpose."""


class ConfigError(FxWormholeError, ValueError):
    """A configuration value is invalid (names the field and the allowed values)."""


class CaptureError(FxWormholeError):
    """No front end (torch.fx.symbolic_trace, torch.export) could capture the model."""


class PlacementError(FxWormholeError):
    """A wormhole or probe cannot be placed where it was asked for."""


class ConvergenceError(FxWormholeError):
    """A fixed-point solve failed and the policy is ``on_fail="raise"``."""


class ExportError(FxWormholeError):
    """Export failed, or an exported (inference-only) artifact was used for training."""


class SaveError(FxWormholeError, OSError):
    """Writing a file failed (disk full, no permission, missing directory, ...); the file that was
    at the path before is unchanged and no temporary file is left behind."""


class VerificationError(FxWormholeError):
    """The rewritten model does not compute what the original computes at initialisation.

    Raised by the self-check of :func:`fxwormhole.transform` / :func:`fxwormhole.instrument`
    (``verify=True``, the default). It is a defect of fxwormhole, not of the model: the message names
    the pass after which the outputs diverged, the first fx node whose value differs and its module
    path. Attributes: ``pass_name``, ``node``, ``module_path``, ``error`` (max absolute difference)
    and ``scale`` (max absolute value of the original's tensor).
    """

    def __init__(self, message: str, *, pass_name: str | None = None, node: str | None = None,
                 module_path: str | None = None, error: float = float("nan"), scale: float = float("nan")):
        super().__init__(message)
        self.pass_name, self.node, self.module_path = pass_name, node, module_path
        self.error, self.scale = error, scale


class LoadError(FxWormholeError):
    """A folder written by :func:`fxwormhole.save` cannot be loaded: a file is missing or damaged, or
    the model passed to :func:`fxwormhole.load` does not rebuild the saved one (the message names the
    file and what to do)."""
