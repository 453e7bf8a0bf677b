"""The grammar of ``WormholeConfig.wormholes``, parsed in one place.

``"auto"``, ``"every:K"`` (K >= 1) or a non-empty list of ``(src, dst)`` name pairs. The config
validates with :func:`parse_policy`; the placement passes (feed-forward plan, temporal wormholes)
apply the parsed :class:`Policy`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Tuple, Union

from .errors import ConfigError

__all__ = ["Policy", "parse_policy"]

Span = Tuple[str, str]


@dataclass(frozen=True)
class Policy:
    """A parsed ``WormholeConfig.wormholes``.

    ``kind`` is ``"auto"``, ``"every"`` (``every`` holds K) or ``"pairs"`` (``pairs`` holds them).
    """

    kind: str
    every: int = 0
    pairs: Tuple[Span, ...] = ()

    @property
    def automatic(self) -> bool:
        """True for ``"auto"`` and ``"every:K"``: the passes choose where wormholes go."""
        return self.kind != "pairs"


def parse_policy(wormholes: Union[str, Sequence[Span], "Policy"], owner: str = "WormholeConfig") -> Policy:
    """Parse ``wormholes``; raises :class:`ConfigError` naming ``<owner>.wormholes`` and what it accepts."""
    if isinstance(wormholes, Policy):
        return wormholes
    if isinstance(wormholes, str):
        if wormholes == "auto":
            return Policy("auto")
        k = wormholes[6:]
        if wormholes.startswith("every:") and k.isdigit() and int(k) >= 1:
            return Policy("every", every=int(k))
        _refuse(owner, wormholes, "'auto', 'every:K' (K >= 1) or a list of (src, dst) pairs")
    try:
        pairs = tuple(tuple(p) for p in wormholes)
    except TypeError:
        pairs = None
    ok = pairs is not None and len(pairs) > 0 and all(len(p) == 2 and all(isinstance(s, str) and s for s in p)
                                                      for p in pairs)
    if not ok:
        _refuse(owner, wormholes, "'auto', 'every:K' or a non-empty list of (src, dst) name pairs")
    return Policy("pairs", pairs=pairs)  # type: ignore[arg-type]


def _refuse(owner: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{owner}.wormholes={value!r} is invalid: expected {allowed}")
