"""The ``raw`` format: guest bytes are the file's bytes, optionally a window of them."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from typing import Any

from ..driver import BLOCK_OFFSET_VALID, BLOCK_RAW, BlockDriver, ChildIO, DriverStatus, whole_sectors
from ..errors import BlockError
from ..perm import RESIZE, WRITE, ChildRole

INT64_MAX = 2**63 - 1


class RawDriver(BlockDriver):
    """QEMU's raw format driver with its ``offset`` and ``size`` options."""

    name = "raw"
    file_role = ChildRole.FILTERED | ChildRole.PRIMARY
    strong_runtime_opts = ("offset", "size")  # raw_strong_runtime_opts

    @classmethod
    def file_role_for(cls, options: Mapping[str, Any]) -> ChildRole:
        """A filter (permissions pass straight through) unless offset/size make a window."""
        if "offset" in options or "size" in options:
            return ChildRole.DATA | ChildRole.PRIMARY
        return cls.file_role

    def child_perm(self, perm: int, nperm: int, nshared: int) -> tuple[int, int]:
        """raw_child_perm: write and resize only if the parents ask for them.

        The default rules for a data child (a window) add resize to write; the window never
        grows the file, so QEMU drops both unless they come from above (QEMU 7.2, checked
        live: a writer on a windowed raw node locks 101 but not 103).
        """
        return (nperm & ~(WRITE | RESIZE)) | (perm & (WRITE | RESIZE)), nshared

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0
        self.size: int | None = None

    def _file(self) -> ChildIO:
        assert self.file is not None, "the graph attaches the file child before open()"
        return self.file

    def has_info(self) -> bool:
        """As its file's: raw_get_info asks the file (bdrv_get_info on bs->file)."""
        return self._file().has_info()

    def open(self, options: Mapping[str, Any], *, read_only: bool, inactive: bool) -> None:
        """Check the window against the file, in QEMU's order (raw_read_options, then
        raw_apply_options against the opened file's length), with QEMU 7.2's texts."""
        offset = int(options.get("offset", 0))
        size = options.get("size")
        # QemuOpts parses both as sizes: no negative numbers.
        if offset < 0:
            raise BlockError("Parameter 'offset' expects a non-negative number below 2^64")
        if size is not None and size < 0:
            raise BlockError("Parameter 'size' expects a non-negative number below 2^64")
        file_len = self._file_length()
        if offset > file_len:
            raise BlockError(f"Offset ({offset}) cannot be greater than size of the "
                             f"containing file ({file_len})")
        if size is not None and offset + size > file_len:
            # Two spaces before "actual": QEMU 7.2's text, byte for byte.
            raise BlockError(f"The sum of offset ({offset}) and size ({size}) has to be smaller "
                             f"or equal to the  actual size of the containing file ({file_len})")
        if size is not None and size % 512:
            raise BlockError("Specified size is not multiple of 512")
        self.offset = offset
        self.size = size

    def getlength(self) -> int:
        """The window size, or what the file holds past ``offset``."""
        if self.size is not None:
            return self.size
        return max(0, self._file_length() - self.offset)

    def _file_length(self) -> int:
        # bdrv_getlength of the file: a file of 1000 bytes is 1024 long to its parents.
        return whole_sectors(self._file().getlength())

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the file at ``offset`` within the window."""
        return self._file().pread(self.offset + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Write through to the file."""
        self._file().pwrite(self.offset + offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Pass through to the file."""
        self._file().pwrite_zeroes(self.offset + offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        """Pass through to the file."""
        self._file().pdiscard(self.offset + offset, length)

    def block_status(self, want_zero: bool, offset: int, length: int,
                     allocated_file_size: Callable[[], int | None]) -> DriverStatus:
        """raw-format's raw_co_block_status: ask the file, at the window's offset."""
        return DriverStatus(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset + self.offset, self._file())

    def truncate(self, length: int, zero_new: bool = False) -> None:
        """raw_co_truncate: a window (``size``) cannot change; otherwise the file is
        resized to hold ``length`` bytes past ``offset``."""
        if self.size is not None:
            raise BlockError("Cannot resize fixed-size raw disks", errno.ENOTSUP)
        if INT64_MAX - length < self.offset:
            raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
        self._file().truncate(self.offset + length)

    def flush(self) -> None:
        """Nothing cached here: flush the file."""
        self._file().flush()
