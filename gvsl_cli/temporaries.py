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

Shared file systems: NFS emulates ``flock`` with whole-file locks, which a cleaner can take
on files it may write (it opens them read-write) but not on folders, so there staging
folders are kept. Where locks are local to one node (Lustre mounted with ``localflock``,
NFS with ``local_lock``), a live writer on another node looks abandoned; so a temporary
is removed only when, besides its lock being free, nothing in it has changed for
``ABANDONED_AFTER_S`` (a writer streams into it; a killed one does not). That also covers
the instant between a temporary's creation and its lock.

POSIX only. On Windows a byte-range lock would stop the writer's own writes through other
handles, so nothing is locked there, and only callers that hold their folder's own lock
(``unchanged_for_s=0``: pretrain and finetune run folders) remove anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

#: A temporary's name is ``.NAME.<random>.tmp<suffix>``; a NAME too long for the file
#: system's limit, or not UTF-8, gets ``.gvsl-<random>.tmp<suffix>`` (``io.atomic_path``).
#: ``<random>`` is ``tempfile``'s: 8 characters of [a-z0-9_].
UNNAMED_TEMPORARY = re.compile(r"\.gvsl-[a-z0-9_]{8}\.tmp")
#: A temporary unchanged for this long, whose lock is free, is taken for abandoned.
ABANDONED_AFTER_S = 600.0


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


def remove_abandoned(outputs: Iterable[Path], *, staging_in: Path | None = None, prefixes: Iterable[str] = (), unchanged_for_s: float = ABANDONED_AFTER_S) -> list[Path]:
    """Remove the temporaries that killed writers of ``outputs`` left next to them.

    Each folder holding outputs (and ``staging_in``) is listed once. A temporary there is
    one of ``.NAME.<random>.tmp*`` for an output NAME in that folder,
    ``.gvsl-<random>.tmp*`` (``UNNAMED_TEMPORARY``), or ``<prefix><random>.tmp*`` for
    ``prefixes`` (a command's staging folders); it is removed only when its lock is free
    and it has not changed for ``unchanged_for_s`` (see the module's docstring).

    ``unchanged_for_s=0`` is for a caller that holds the folder's own lock (a training run
    folder): no other gvsl process writes there, so age proves nothing, and without
    ``flock`` (Windows) nothing but that lock is needed.

    Returns:
        The files and folders removed.
    """
    if fcntl is None and unchanged_for_s > 0:
        return []
    names_by_folder: dict[Path, set[str]] = {} if staging_in is None else {Path(staging_in): set()}
    for output in outputs:
        names_by_folder.setdefault(Path(output).parent, set()).add(Path(output).name)
    starts = tuple(prefixes)
    removed = []
    for folder, names in names_by_folder.items():
        try:
            entries = [entry.name for entry in os.scandir(folder)]
        except OSError:
            continue  # not made yet, or unreadable: nothing of ours to remove there
        for entry in entries:
            ours = _output_name(entry) in names or UNNAMED_TEMPORARY.match(entry) or (entry.startswith(starts) and ".tmp" in entry)
            if ours and _remove_if_abandoned(folder / entry, unchanged_for_s):
                removed.append(folder / entry)
    return removed


def _last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of what it holds."""
    newest = path.stat().st_mtime
    if path.is_dir():
        for root, folders, files in os.walk(path):
            for name in folders + files:
                newest = max(newest, os.stat(os.path.join(root, name), follow_symlinks=False).st_mtime)
    return newest


def _remove_if_abandoned(path: Path, unchanged_for_s: float) -> bool:
    if path.is_symlink():
        return False
    try:
        if unchanged_for_s > 0 and time.time() - _last_change(path) < unchanged_for_s:
            return False  # written lately: maybe by a live process whose lock we cannot see
    except OSError:
        return False
    if fcntl is None:
        return _remove(path)
    try:
        # Read-write where possible: NFS grants an exclusive lock only on such a handle.
        fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live process holds it
        return _remove(path)
    finally:
        os.close(fd)


def _remove(path: Path) -> bool:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except OSError:
        return False  # left for the next run; nothing depends on it
