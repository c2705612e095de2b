"""A gzip file written on several threads, as pigz does: the stream is cut into blocks,
each compressed on its own into a complete gzip member, and the members are written in
order.

A gzip file may hold several members one after the other (RFC 1952, section 2.2); zlib's
``gzread`` (ITK's NIfTI reader, and so SimpleITK and ANTs), Python's ``gzip`` (nibabel) and
``gunzip`` read them as one stream. zlib releases the GIL while it compresses, so threads
run in parallel. Python's zlib is about 1.7 times slower than the zlib-ng inside ITK at the
same level; at level 1 on two cores this writer is about as fast as ITK's own NIfTI writer,
with files 0.6 % larger, and faster on more cores.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

#: Bytes of input per gzip member: large enough that the members' headers and the lost
#: history at each cut cost nothing measurable (< 0.1 % of the size), small enough that a few
#: blocks in flight per thread hold little memory.
BLOCK_BYTES = 16 << 20

#: zlib's fastest level. Float maps barely compress (a probability map of 575 MB: 480.7 MB
#: at level 1, 477.5 MB at 6, ITK's 477.6 MB), and on 2 busy cores level 1 on two threads
#: took 13.1 s, level 6 20.5 s, ITK's own writer 12.3 s.
DEFAULT_LEVEL = 1


def _member(block: memoryview, level: int) -> bytes:
    """``block`` as one complete gzip member (header, deflate stream, CRC and length)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # 16 + 15: gzip wrapping
    return compressor.compress(block) + compressor.flush()


class ParallelGzipWriter:
    """Write bytes to ``handle`` (a binary file open for writing) as gzip members.

    Use as a context manager; ``write`` takes any C-contiguous buffer (bytes, a
    memoryview of a numpy array) and keeps no reference to it after returning, so the
    caller may reuse or free it. At most two blocks per thread are in flight.
    """

    def __init__(self, handle: BinaryIO, *, level: int = DEFAULT_LEVEL, threads: int | None = None, block_bytes: int | None = None) -> None:
        self.handle = handle
        self.level = level
        self.block_bytes = block_bytes or BLOCK_BYTES
        self.threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="gvsl-gzip")
        self._pending: deque[Future] = deque()
        self._buffer = bytearray()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        start = 0
        if self._buffer:
            # Fill the partial block first.
            taken = min(self.block_bytes - len(self._buffer), len(view))
            self._buffer += view[:taken]
            start = taken
            if len(self._buffer) == self.block_bytes:
                self._submit(bytes(self._buffer))
                self._buffer = bytearray()
        while len(view) - start >= self.block_bytes:
            # A copy: the caller's buffer may change once write returns.
            self._submit(bytes(view[start : start + self.block_bytes]))
            start += self.block_bytes
        self._buffer += view[start:]

    def _submit(self, block: bytes) -> None:
        self._pending.append(self._pool.submit(_member, memoryview(block), self.level))
        while len(self._pending) > 2 * self.threads:
            self.handle.write(self._pending.popleft().result())

    def close(self) -> None:
        """Compress what is left and write every member, in order."""
        try:
            if self._buffer or not self._pending:
                self._submit(bytes(self._buffer))  # an empty stream is one empty member
                self._buffer = bytearray()
            while self._pending:
                self.handle.write(self._pending.popleft().result())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ParallelGzipWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:  # the file is discarded by the caller: do not compress the rest
            self._pool.shutdown(wait=True, cancel_futures=True)
