"""Append whole records to a file, or nothing.

A write on a full disk can write part of its bytes and then fail (``os.write`` returns a short
count, the next call raises ``ENOSPC``). Left there, the torn tail would be followed by the next
record and read back as a broken line in the middle of the file. :func:`append_whole` cuts the
file back to its size before the call on any failure (Ctrl-C included), so a file of records
(the experiment journal, the decision log) holds whole records only.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["append_whole"]


def append_whole(fd: int, data: bytes, fsync: bool = False) -> None:
    """Write all of ``data`` to ``fd`` (opened with ``O_APPEND``), then fsync it if asked; on any
    error the file is truncated to its size before the call and the error re-raised."""
    view = memoryview(data)
    start = os.fstat(fd).st_size
    try:
        while view:  # a short write (disk full) leaves the rest, which then fails
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise
