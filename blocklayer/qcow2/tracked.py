"""A ChildIO wrapper that knows where the file ends without asking on every write."""

from __future__ import annotations

import errno
import os

from ..driver import ChildIO
from ..errors import BlockError

#: QEMU's BDRV_MAX_LENGTH (INT64_MAX rounded down to BDRV_MAX_ALIGNMENT, 1 GiB): its
#: bdrv_check_request fails anything reaching past it with EIO, which is what a crafted
#: table offset near 2^63 gets ("Could not read L1 table: Input/output error").
MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)


def _check_request(offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset > MAX_LENGTH - length:
        raise BlockError(os.strerror(errno.EIO), errno.EIO)


class TrackedFile:
    """Forwards to the ``file`` child and tracks its length.

    Newly allocated clusters past the end of the file read as zeroes already, so the
    write path can skip writing zero padding there; that needs an exact, cheap end.
    """

    __slots__ = ("_end", "child")

    def __init__(self, child: ChildIO) -> None:
        self.child = child
        self._end: int | None = None

    @property
    def node_name(self) -> str:
        """The child's node name."""
        return self.child.node_name

    @property
    def filename(self) -> str:
        """The child's filename."""
        return self.child.filename

    @property
    def bottom_filename(self) -> str:
        """The child's."""
        return self.child.bottom_filename

    def has_info(self) -> bool:
        """The child's."""
        return self.child.has_info()

    def end(self) -> int:
        """Current length of the file."""
        if self._end is None:
            self._end = self.child.getlength()
        return self._end

    def pread(self, offset: int, length: int) -> bytes:
        """Read from the child (requests past QEMU's largest length fail with EIO)."""
        _check_request(offset, length)
        return self.child.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write to the child, noting growth."""
        _check_request(offset, len(data))
        self.child.pwrite(offset, data)
        if self._end is not None and offset + len(data) > self._end:
            self._end = offset + len(data)

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Zero a range of the child, noting growth."""
        _check_request(offset, length)
        self.child.pwrite_zeroes(offset, length, may_unmap)
        if self._end is not None and offset + length > self._end:
            self._end = offset + length

    def pdiscard(self, offset: int, length: int) -> None:
        """Punch a range (the length of the file does not change)."""
        self.child.pdiscard(offset, length)

    def flush(self) -> None:
        """Flush the child."""
        self.child.flush()

    def getlength(self) -> int:
        """Length of the child, asked afresh."""
        self._end = self.child.getlength()
        return self._end

    def truncate(self, length: int) -> None:
        """Truncate the child."""
        self.child.truncate(length)
        self._end = length
