"""Advisory file locks between processes, released by the operating system when a process
ends (even on a crash), so a lock is never stale.

POSIX uses ``flock`` on the open file; Windows a byte-range lock on its first byte.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import Iterator

try:  # POSIX
    import fcntl

    def try_lock(fd: int) -> bool:
        """Take the exclusive lock of the open file ``fd`` if free; False if another holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def try_lock(fd: int) -> bool:
        """Take the exclusive lock of the open file ``fd`` if free; False if another holds it."""
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def open_lock_file(path) -> int:
    """Open (creating it if needed) a lock file that stays in place, for ``try_lock``.

    Such a file is shared by every user of a folder (a group's weights cache): a new one
    is made readable and writable by all (0666 whatever the umask: it holds no data, and
    a colleague must be able to open it after us). An existing file this process may not
    write (another user's, made before that rule, or under a strict umask) is opened
    read-only: ``flock`` needs no write access. On Windows, where ``msvcrt.locking``
    needs a descriptor open for writing, only the first open applies.

    Returns:
        An open file descriptor (the caller closes it).

    Raises:
        OSError: the file can be neither created nor opened (a read-only folder, a lock
            file without read permission).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        try:
            return os.open(path, os.O_RDWR)
        except PermissionError:
            if os.name == "nt":
                raise
            return os.open(path, os.O_RDONLY)
    if hasattr(os, "fchmod"):
        with contextlib.suppress(OSError):  # a file system without modes (FAT, some SMB): nothing to widen
            os.fchmod(fd, 0o666)
    return fd


#: The lock file of an output folder while a command writes into it.
OUTPUT_LOCK_FILE = ".gvsl-output.lock"


class RemovableLock:
    """An exclusive lock file that is deleted when released, so it leaves nothing behind.

    The file is removed while its lock is still held, and a process that takes the lock
    checks that the file it locked is still the one at ``path``: a process that opened the
    old file just before it was removed would otherwise lock a file nobody else can see,
    and two processes would both hold "the" lock.
    """

    def __init__(self, path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self, note: str | None = None) -> bool:
        """Take the lock if it is free; False if another process holds it.

        ``note`` (one line, e.g. who holds the lock) is written into the lock file once it
        is held, for ``holder_note`` of the processes that find it taken.

        Raises:
            OSError: the lock file cannot be created, or the file system has no locks
                (ENOLCK, EOPNOTSUPP: some network file systems); nothing is left open.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                os.close(fd)
                return False
            try:
                still_there = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still_there = False
            if still_there:
                self._fd = fd
                if note is not None:
                    self._write_note(note)
                return True
            # The previous holder removed this file after we opened it: lock the new one.
            unlock(fd)
            os.close(fd)

    def _write_note(self, note: str) -> None:
        try:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, (note.strip() + "\n").encode("utf-8"))
        except OSError:  # a full disk: the note is a courtesy, the lock is what counts
            pass

    def holder_note(self) -> str | None:
        """The note the holder wrote (see ``try_acquire``); None when absent or unreadable.

        A holder that has just taken the lock may not have written it yet."""
        try:
            with open(self.path, "rb") as handle:
                text = handle.read(1000).decode("utf-8", errors="replace").strip()
        except OSError:
            return None
        return text.splitlines()[0] if text else None

    def release(self) -> None:
        """Remove the lock file and release the lock (no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:  # Windows cannot remove an open file; the lock still goes below
            pass
        unlock(self._fd)
        os.close(self._fd)
        self._fd = None


#: errno values of a file system that has no advisory locks (some NFS, Lustre and SMB
#: mounts; ENOTSUP differs from EOPNOTSUPP on macOS).
NO_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


def take_folder_lock(lock_path: Path, command: str, *, busy: str, default_holder: str = "gvsl process") -> RemovableLock | None:
    """Take the lock file ``lock_path`` of a folder for one ``gvsl COMMAND``, without waiting.

    The holder's note (command, pid, host) goes into the file, so a second process can
    say who holds the folder.

    Returns:
        The held lock (``release`` it), or None on a file system without locks
        (``NO_LOCK_ERRNOS``): the file is removed then, since it guards nothing.

    Raises:
        InputError: another process holds the folder ("FOLDER: another HOLDER BUSY").
        OSError: the lock file cannot be created (a missing or read-only folder).
    """
    from gvsl_cli.errors import InputError

    lock = RemovableLock(lock_path)
    try:
        taken = lock.try_acquire(f"gvsl {command} (pid {os.getpid()} on {socket.gethostname()})")
    except OSError as exc:
        if exc.errno not in NO_LOCK_ERRNOS:
            raise
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        return None
    if not taken:
        holder = lock.holder_note() or default_holder
        raise InputError(f"{lock_path.parent}: another {holder} {busy}", hint="wait for it to finish, or choose another -o")
    return lock


@contextlib.contextmanager
def exclusive_output_folder(folder, command: str) -> Iterator[None]:
    """Hold ``folder`` (existing, writable) for one ``gvsl COMMAND`` during the block.

    Two processes writing one output folder at once (a resubmitted job, two pipeline
    branches with one ``-o``) would mix their outputs under one record, or remove each
    other's staging files as leftovers. The lock file (``.gvsl-output.lock``, removed at
    the end) is taken without waiting (``take_folder_lock``); on a file system without
    locks the block runs unguarded.

    Raises:
        InputError: another gvsl process holds the folder.
    """
    lock = take_folder_lock(Path(folder) / OUTPUT_LOCK_FILE, command, busy="is writing into this output folder")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
