"""Advisory file locks between processes, released by the operating system when a process
ends (even on a crash), so a lock is never stale.

POSIX uses ``flock`` on the open file; Windows a byte-range lock on its first byte.
"""

from __future__ import annotations

import os

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
