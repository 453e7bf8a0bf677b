"""One progress helper for the command line (``demo``, ``bench``) and the examples."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional

__all__ = ["progress"]


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True) -> Iterator:
    """``tqdm`` progress bar (stderr) when tqdm is installed, else a plain stderr line every ~10%."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        return
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    every = max(1, (total or 10) // 10)
    for i, item in enumerate(iterable):
        if i % every == 0:
            print(f"{desc} {i}/{total if total is not None else '?'}", file=sys.stderr, flush=True)
        yield item
