"""Deprecated location of :mod:`fxwormhole.passes.activations` (transform-time sympy maths).

Kept so that code importing ``fxwormhole.runtime.activations`` and models saved before the move
(their probes pickle a reference to this module) keep working; import from
``fxwormhole.passes.activations`` instead.
"""
from __future__ import annotations

import warnings

from ..passes.activations import *  # noqa: F401,F403 - the compatibility alias
from ..passes.activations import __all__, _rebuild_registered  # noqa: F401 - unpickles old probes

warnings.warn("fxwormhole.runtime.activations moved to fxwormhole.passes.activations", DeprecationWarning,
              stacklevel=2)
