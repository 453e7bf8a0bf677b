"""Deprecated: the demo moved out of the core library to :mod:`fxwormhole.cli.demo`.

``fxwormhole demo`` and ``make demo`` are unchanged; import the helpers from ``fxwormhole.cli.demo``
(``per_sample_iterations`` also from ``fxwormhole.transformed``, ``progress`` from
``fxwormhole.cli.progress``).
"""
from __future__ import annotations

import warnings

from .cli.demo import *  # noqa: F401,F403 - the compatibility alias
from .cli.demo import __all__  # noqa: F401

warnings.warn("fxwormhole.demo moved to fxwormhole.cli.demo", DeprecationWarning, stacklevel=2)
