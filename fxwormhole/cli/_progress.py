"""What a command is doing, on one stderr line, while a step takes long.

``with progress.step("transforming"):`` shows ``- transforming ... 7 s`` on stderr, updated a few
times a second, from ``delay`` seconds into the step until it ends, then erases the line: a terminal
never shows a stale status and the command's own output (stdout) stays clean. Nothing is written
when stderr is not a terminal (pipes, files, CI logs, tests) or with ``--quiet``.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Iterator

__all__ = ["Progress"]

_SPIN = "-\\|/"
_CLEAR = "\r\033[K"


class Progress:
    """Step status for one command run.

    Args:
        quiet: never write anything.
        stream: where to write (default: ``sys.stderr`` at the time of the step).
        delay: seconds a step runs before its line appears (short steps show nothing).
        interval: seconds between updates.
    """

    def __init__(self, quiet: bool = False, *, stream: IO[str] | None = None, delay: float = 1.0,
                 interval: float = 0.25) -> None:
        self.quiet, self.stream, self.delay, self.interval = quiet, stream, delay, interval

    def _out(self) -> IO[str] | None:
        stream = self.stream if self.stream is not None else sys.stderr
        if self.quiet or stream is None:
            return None
        try:
            return stream if stream.isatty() else None
        except (AttributeError, ValueError):  # closed or not a file
            return None

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Show ``what`` with the elapsed seconds while the block runs (see the module docstring)."""
        out = self._out()
        if out is None:
            yield
            return
        done = threading.Event()
        start = time.perf_counter()

        def show() -> None:
            if done.wait(self.delay):
                return
            tick = 0
            while not done.is_set():
                out.write(f"\r{_SPIN[tick % len(_SPIN)]} {what} ... {time.perf_counter() - start:.0f} s\033[K")
                out.flush()
                tick += 1
                done.wait(self.interval)

        thread = threading.Thread(target=show, name="fxwormhole-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            if time.perf_counter() - start >= self.delay:
                out.write(_CLEAR)
                out.flush()
