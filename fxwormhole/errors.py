"""One error hierarchy for the whole toolkit.

Every message says what failed, where (a module path or fx node name) and what to do. The CLI
prints ``str(error)`` on one line and exits with code 2.
"""
from __future__ import annotations

import sys
import warnings

__all__ = [
    "warn_user",
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


def warn_user(message: str, category: type = RuntimeWarning) -> None:
    """Issue a warning attributed to the user's line: the first frame outside fxwormhole, torch and
    code that torch.fx generated (which has no ``__name__``; a transformed model's forward is such code).

    ``warnings.warn_explicit`` with a throwaway registry: ``warnings.warn`` would remember every
    distinct text in the caller's ``__warningregistry__``, and these texts carry residuals, so a long
    run grew without bound. The module is always named (``warn_explicit`` drops a warning whose
    module is None), and no module globals are passed (a caller run as ``python -m pkg`` has a
    loader that cannot give its source)."""
    caller = sys._getframe(1)
    while caller.f_back is not None and caller.f_globals.get("__name__", "torch").split(".")[0] in ("fxwormhole", "torch"):
        caller = caller.f_back
    warnings.warn_explicit(message, category, caller.f_code.co_filename, caller.f_lineno,
                           module=caller.f_globals.get("__name__") or "fxwormhole", registry={})
