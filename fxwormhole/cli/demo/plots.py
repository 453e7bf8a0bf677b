"""Pictures for the demo and the examples (matplotlib, the ``plots`` extra)."""
from __future__ import annotations

from ...errors import ConfigError

__all__ = ["pyplot"]


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or :class:`ConfigError` naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError(f"the plots need matplotlib ({exc}); install it with: pip install fxwormhole[plots]") from None
    return plt
