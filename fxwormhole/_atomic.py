"""Atomic file writes: every file fxwormhole writes goes through :func:`atomic_write`.

The writer writes a hidden temporary file in the target's directory; only when it finished is the
file flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic on POSIX and
Windows). So a failure at any point (disk full, no permission, an exception or Ctrl-C in the middle
of writing) leaves the file that was there before byte-for-byte intact and no temporary file
behind, and the error is a typed :class:`~fxwormhole.errors.FxWormholeError` that says what was
written, where, and what to do.

Usage::

    with atomic_write(path, what="the exported program", error=ExportError) as tmp:
        torch.export.save(ep, tmp)          # any writer that takes a path
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FxWormholeError, SaveError

__all__ = ["atomic_write", "atomic_files", "FileSet", "check_target", "temp_name_pattern"]

_TEMP_TAG = ".tmp-"

# errno -> what to do (the cause is named in the message before it)
_ADVICE = {
    errno.ENOSPC: "free space on that disk or write somewhere else, then run again",
    errno.EDQUOT: "free space within your disk quota or write somewhere else, then run again",
    errno.EACCES: "check that you may write to {dir} (permissions), or write somewhere else",
    errno.EPERM: "check that you may write to {dir} (permissions), or write somewhere else",
    errno.EROFS: "that file system is read-only: write somewhere else",
    errno.ENAMETOOLONG: "use a shorter file name",
}
_DEFAULT_ADVICE = "check free disk space and write permission in {dir}, then run again"


def temp_name_pattern(target: Path) -> str:
    """The glob of the temporary files :func:`atomic_write` makes for ``target`` (for tests)."""
    return f".{target.stem}{_TEMP_TAG}*{target.suffix}"


def _cannot(what: str, path: Path, why: str, advice: str, error: type[FxWormholeError]) -> FxWormholeError:
    return error(f"cannot write {what} to {path}: {why}; {advice}")


def check_target(path: str | Path, what: str = "the file", error: type[FxWormholeError] = SaveError) -> Path:
    """``path`` as a Path, after checking that a file can be written there: its directory exists and
    it is not itself a directory. Call it before expensive work so a bad path fails early."""
    path = Path(path)
    if path.is_dir():
        raise _cannot(what, path, "it is a directory", "pass the path of a file (inside that directory, "
                      "or elsewhere)", error)
    parent = path.parent
    if not parent.is_dir():
        why = (f"{parent} is a file, not a directory" if parent.exists()
               else f"the directory {parent} does not exist")
        raise _cannot(what, path, why, f"create it first (mkdir -p {parent}) or choose another path", error)
    return path


def _create_temp(target: Path) -> Path:
    """A new empty file next to ``target`` with the permissions a plain ``open(target, "w")`` would
    give it (mode 0o666 less the umask, or the mode of the file it will replace)."""
    for _ in range(100):
        tmp = target.with_name(f".{target.stem}{_TEMP_TAG}{secrets.token_hex(4)}{target.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            if target.exists():
                os.chmod(fd if os.chmod in os.supports_fd else tmp, stat.S_IMODE(target.stat().st_mode))
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(target.parent))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); best effort: some file systems refuse fsync on directories."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _failure(exc: BaseException, what: str, target: Path, existed: bool, error: type[FxWormholeError],
             advice: str | None, also_kept: str = "") -> FxWormholeError:
    where = target.parent
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        advice = _ADVICE.get(exc.errno, _DEFAULT_ADVICE)
    else:  # e.g. torch's C++ writer reports a full disk as RuntimeError("... file write failed")
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        advice = advice or _DEFAULT_ADVICE
    kept = (f"{target} is unchanged" if existed else f"nothing was written to {target}") + also_kept
    return error(f"writing {what} to {target} failed ({reason}); {kept}; {advice.format(dir=where)}")


class FileSet:
    """Files replaced together (see :func:`atomic_files`): :meth:`stage` writes each to a temporary
    file next to its target; :meth:`commit` renames them all into place, in the order staged."""

    def __init__(self, error: type[FxWormholeError]) -> None:
        self.error = error
        self._staged: list[tuple[Path, Path, str, bool]] = []  # (temporary, target, what, existed)

    def _kept(self, failed: Path) -> str:
        targets = [t for _, t, _, _ in self._staged if t != failed]
        return f"; {', '.join(str(t.name) for t in targets)} unchanged too" if targets else ""

    @contextmanager
    def stage(self, path: str | Path, *, what: str = "the file", advice: str | None = None) -> Iterator[Path]:
        """Yield a temporary path next to ``path``; when the block ends without an exception it is
        flushed to disk and kept for :meth:`commit`. A failure removes it and raises the typed error."""
        target = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
        check_target(target, what, self.error)
        existed = target.exists()
        try:
            tmp = _create_temp(target)
        except OSError as exc:
            raise _failure(exc, what, target, existed, self.error, advice, self._kept(target)) from exc
        try:
            yield tmp
            _fsync_file(tmp)
        except FxWormholeError:
            _remove(tmp)
            raise
        except Exception as exc:
            _remove(tmp)
            raise _failure(exc, what, target, existed, self.error, advice, self._kept(target)) from exc
        except BaseException:  # KeyboardInterrupt, SystemExit: clean up, do not disguise them
            _remove(tmp)
            raise
        self._staged.append((tmp, target, what, existed))

    def commit(self) -> None:
        """Rename every staged file onto its target, then flush the directories (the renames)."""
        replaced: list[str] = []
        while self._staged:
            tmp, target, what, existed = self._staged[0]
            try:
                os.replace(tmp, target)
            except OSError as exc:
                done = f"; already replaced: {', '.join(replaced)}" if replaced else ""
                raise _failure(exc, what, target, existed, self.error, None, self._kept(target) + done) from exc
            replaced.append(target.name)
            self._staged.pop(0)
            _fsync_dir(target.parent)

    def discard(self) -> None:
        """Remove the temporary files not yet renamed."""
        for tmp, *_ in self._staged:
            _remove(tmp)
        self._staged.clear()


@contextmanager
def atomic_files(*, error: type[FxWormholeError] = SaveError) -> Iterator[FileSet]:
    """Replace several files together: nothing is renamed until every file is written and flushed.

    So a failure while writing any of them (disk full, no permission, an exception or Ctrl-C) leaves
    every target as it was, where one :func:`atomic_write` per file would have left the first files
    new and the later ones old. Stage the file that makes the others valid (a manifest with their
    checksums) last: it is renamed last. Only a crash during the renames themselves (microseconds)
    can leave a mix, which such a manifest detects.

    Usage::

        with atomic_files() as files:
            with files.stage(folder / "model.safetensors", what="the weights") as tmp:
                write_weights(tmp)
            with files.stage(folder / "config.json", what="the configuration") as tmp:
                tmp.write_text(manifest)
    """
    files = FileSet(error)
    try:
        yield files
        files.commit()
    finally:
        files.discard()


@contextmanager
def atomic_write(path: str | Path, *, what: str = "the file", error: type[FxWormholeError] = SaveError,
                 advice: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an exception, move it
    onto ``path`` in one atomic step.

    Args:
        path: the file to (re)write. A symbolic link is followed: the file it points to is
            replaced and the link kept.
        what: what is written, for messages ("the exported program").
        error: the :class:`FxWormholeError` subclass raised on failure.
        advice: what to do when the writer fails with an exception that is not an ``OSError``
            (``{dir}`` is replaced by the target's directory); by default: check disk space and
            permissions, which fits torch's writers (they report a full disk as RuntimeError).

    Raises:
        error: the directory is missing, ``path`` is a directory, or writing, flushing or renaming
            failed (the cause is chained). The existing file at ``path`` is unchanged and the
            temporary file removed. An :class:`FxWormholeError` raised by the block and
            ``KeyboardInterrupt`` propagate unchanged (after the same clean-up).
    """
    with atomic_files(error=error) as files, files.stage(path, what=what, advice=advice) as tmp:
        yield tmp
