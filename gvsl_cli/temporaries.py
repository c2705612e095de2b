"""Temporary files and staging folders next to outputs, and the removal of those that
killed processes left behind.

Outputs are written under a temporary name and renamed into place (``io.atomic_path``).
A process killed by SIGKILL (the OOM killer, SLURM after a preemption's grace time) cannot
remove its temporary, which may be a partial map of gigabytes. So the writer holds an
``flock`` on its temporary file or staging folder for as long as it exists: the kernel
drops the lock with the process, however it ends. A later run tells an abandoned
temporary (its lock is free) from one another process is writing right now (held), and
removes only the former. That works without any folder lock, so for commands that run
side by side into one folder (``gvsl embed`` over a SLURM array) too.

POSIX only. On Windows a byte-range lock would stop the writer's own writes through other
handles, so nothing is locked there and nothing is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: A temporary's name is ``.NAME.<random>.tmp<suffix>``; a NAME too long for that limit
#: gets ``.gvsl-<random>.tmp<suffix>`` (``io.atomic_path``).
LONG_NAME_PREFIX = ".gvsl-"


def _hold(fd: int) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        # A file system without flock (Lustre mounted without "flock", some FUSE ones)
        # says ENOSYS or EINVAL: write without the lock. Cleaners cannot lock such a
        # temporary either, so they keep it (``_remove_if_abandoned``).
        pass


@contextlib.contextmanager
def held_temporary_file(folder: Path, prefix: str, suffix: str) -> Iterator[Path]:
    """A new empty file in ``folder`` (``tempfile.mkstemp``), locked while the block runs.

    The caller renames or removes it; the lock goes with the descriptor at the end.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        _hold(fd)
        yield Path(name)
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_staging_folder(folder: Path, prefix: str, suffix: str = ".tmp") -> Iterator[Path]:
    """A new folder in ``folder`` (``tempfile.mkdtemp``), locked while the block runs and
    removed with its contents at the end."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder))
    fd = os.open(path, os.O_RDONLY) if fcntl is not None else None
    try:
        if fd is not None:
            _hold(fd)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def _output_name(entry: str) -> str | None:
    """NAME of a temporary ``.NAME.<random>.tmp<suffix>``, else None."""
    if not entry.startswith(".") or ".tmp" not in entry:
        return None
    stem = entry[1 : entry.rindex(".tmp")]
    return stem.rsplit(".", 1)[0] if "." in stem else None


def remove_abandoned(outputs: Iterable[Path], *, staging_in: Path | None = None, prefixes: Iterable[str] = ()) -> list[Path]:
    """Remove the temporaries that killed writers of ``outputs`` left next to them.

    Each folder holding outputs (and ``staging_in``) is listed once. A temporary there is
    one of ``.NAME.<random>.tmp*`` for an output NAME in that folder,
    ``.gvsl-<random>.tmp*``, or ``<prefix><random>.tmp*`` for ``prefixes`` (a command's
    staging folders); it is removed only when its lock is free, i.e. no live process
    writes it.

    Returns:
        The files and folders removed.
    """
    if fcntl is None:
        return []
    names_by_folder: dict[Path, set[str]] = {} if staging_in is None else {Path(staging_in): set()}
    for output in outputs:
        names_by_folder.setdefault(Path(output).parent, set()).add(Path(output).name)
    starts = (LONG_NAME_PREFIX, *prefixes)
    removed = []
    for folder, names in names_by_folder.items():
        try:
            entries = [entry.name for entry in os.scandir(folder)]
        except OSError:
            continue  # not made yet, or unreadable: nothing of ours to remove there
        for entry in entries:
            ours = _output_name(entry) in names or (entry.startswith(starts) and ".tmp" in entry)
            if ours and _remove_if_abandoned(folder / entry):
                removed.append(folder / entry)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    if path.is_symlink():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live process holds it
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except OSError:
        return False  # left for the next run; nothing depends on it
    finally:
        os.close(fd)
