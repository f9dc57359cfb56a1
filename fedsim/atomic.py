"""Atomic writes: a file or a directory shows up under its final name only once it is complete.

The writer fills a temporary sibling (same directory, hence same filesystem, so the last step is
one ``rename``, which POSIX makes atomic) and the sibling is renamed over the target when the
``with`` block ends normally. A ``kill -9`` at any moment leaves either the old complete file or
the new complete one, never a half-written one. An exception inside the block removes the
temporary and leaves the target as it was.

A directory cannot be renamed over a non-empty one, so an existing directory is first moved
aside to ``.NAME.old-PID`` and removed after the swap: a kill between those two renames leaves
the old directory complete under that name rather than under ``NAME``.

What a kill can leave behind is a hidden sibling, and the names are fixed because the sweep's
clean-up recognises them: ``.NAME.XXXX.tmp`` (files), ``.NAME.tmp-XXXX`` and ``.NAME.old-PID``
(directories).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``, renamed over ``path`` when the block succeeds.

    The temporary exists already (empty, mode 0600 from ``mkstemp``): the writer may open it or
    write over it by name. ``suffix`` serves writers that pick their format from the extension.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: Path, *, replace: bool = True, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``, renamed to ``path`` on success.

    ``replace``: an existing ``path`` is swapped out whole. Without it an existing ``path`` is
    kept and the new one dropped: for a cache, where a concurrent build that finished first
    produced the same thing. ``fsync``: flush every file before the rename, so that after a
    power cut the new name never shows unwritten data (a process kill needs no flush).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if fsync:
            _fsync_files(tmp)
        if replace:
            _swap_into_place(tmp, path)
        else:
            _rename_unless_built(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _fsync_files(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rename_unless_built(tmp: Path, out: Path) -> None:
    try:
        tmp.rename(out)
    except OSError:
        if not out.is_dir():  # else a concurrent build won the race: its result stands
            raise
