"""One progress helper for the command line (``demo``, ``bench``) and the examples."""
from __future__ import annotations

import contextlib
import sys
from typing import IO, Iterable, Iterator, Optional

__all__ = ["progress"]

_CLEAR = "\r\033[K"


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _interactive(stream: IO[str], bar) -> bool:
    """A terminal, or a notebook (whose bars are widgets): anywhere else a bar is spam."""
    if bar is not None and "notebook" in bar.__module__:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


class _AboveTheBar:
    """A stream whose complete lines are written while the bars drawn on ``bar_stream`` are erased
    (tqdm redraws them below). stdout needs it as much as stderr: on a terminal they share the screen."""

    def __init__(self, stream: IO[str], bar_stream: IO[str], tqdm) -> None:
        self._stream, self._bar_stream, self._tqdm, self._pending = stream, bar_stream, tqdm, ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            self._put(lines + "\n")
        return len(text)

    def _put(self, text: str) -> None:
        with self._tqdm.external_write_mode(file=self._bar_stream):
            self._stream.write(text)
            self._stream.flush()

    def close_pending(self) -> None:
        if self._pending:
            self._put(self._pending)
            self._pending = ""

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _lines_above_the_bar(tqdm) -> Iterator[IO[str]]:
    """Route what others write to stdout/stderr (warnings, prints) above the bar while it runs.
    Yields the real stderr, for the bar."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _AboveTheBar(out, err, tqdm), _AboveTheBar(err, err, tqdm)
    try:
        yield err
    finally:
        wrapped = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        for stream in wrapped:
            if isinstance(stream, _AboveTheBar):
                stream.close_pending()


def progress(iterable: Iterable, *, total: Optional[int] = None, desc: str = "", enabled: bool = True) -> Iterator:
    """Iterate over ``iterable`` with a progress bar on one stderr line.

    With tqdm installed, the bar is drawn on a terminal or in a notebook only: piped or logged stderr
    (CI, ``| tee``, ``2> log``) gets nothing rather than a line per redraw. While the bar runs,
    warnings and prints appear above it and the bar stays on its line; it is erased when the loop
    ends. Without tqdm, a plain ``desc i/total`` line about every 10 % (rewritten in place on a
    terminal).
    """
    if not enabled:
        yield from iterable
        return
    tqdm = _tqdm()
    if tqdm is None:
        yield from _plain(iterable, total, desc, sys.stderr)
    elif _interactive(sys.stderr, tqdm):
        with _lines_above_the_bar(tqdm) as stderr:
            yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=stderr)
    else:
        yield from iterable


def _plain(iterable: Iterable, total: Optional[int], desc: str, out: IO[str]) -> Iterator:
    """``desc i/total`` about every 10 %: in place on a terminal (erased at the end), else one line each."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    every = max(1, (total or 10) // 10)
    tty = _interactive(out, None)
    for i, item in enumerate(iterable):
        if i % every == 0:
            line = f"{desc} {i}/{total if total is not None else '?'}"
            out.write(f"\r{line}\033[K" if tty else line + "\n")
            out.flush()
        yield item
    if tty:
        out.write(_CLEAR)
        out.flush()
