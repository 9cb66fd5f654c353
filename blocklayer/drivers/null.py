"""``null-co``: an image of a given size that stores nothing (tests and benchmarks)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import Any

from ..driver import BLOCK_OFFSET_VALID, BLOCK_ZERO, BlockDriver, DriverStatus
from ..errors import BlockError

DEFAULT_SIZE = 1 << 30
# QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to BDRV_MAX_ALIGNMENT (1 GiB). Any node
# longer than this fails bdrv_refresh_total_sectors() with EFBIG.
MAX_LENGTH = (2**63 - 1) & ~((1 << 30) - 1)
INT64_MAX = 2**63 - 1


class NullDriver(BlockDriver):
    """Reads return zeroes (with ``read-zeroes``, QEMU's default since 9.x) and writes vanish."""

    name = "null-co"
    protocol = True
    # null_strong_runtime_opts: latency-ns changes no data.
    strong_runtime_opts = ("size", "read-zeroes")

    def __init__(self) -> None:
        super().__init__()
        self.size = DEFAULT_SIZE
        self.filename = "null-co://"
        #: Whether reads are said to return zeroes (block status ZERO).
        self.read_zeroes = True

    def open(self, options: Mapping[str, Any], *, read_only: bool, inactive: bool) -> None:
        """Take ``size``; ``latency-ns`` and ``read-zeroes`` are accepted.

        Checked in QEMU's order (null_file_open, then bdrv_refresh_total_sectors): a
        negative size as QemuOpts' size parser refuses it (QEMU 7.2 aborts there), a
        latency that is no int64, a size beyond what the block layer can address.
        """
        size = int(options.get("size", DEFAULT_SIZE))
        if size < 0:
            raise BlockError("Parameter 'size' expects a non-negative number below 2^64", errno.EINVAL)
        # latency-ns is a uint64 member stored in an int64_t: anything past INT64_MAX
        # (including a wrapped negative number) reads as negative in QEMU.
        if not 0 <= int(options.get("latency-ns", 0)) <= INT64_MAX:
            raise BlockError("latency-ns is invalid", errno.EINVAL)
        if size > MAX_LENGTH:
            raise BlockError("Could not refresh total sector count: File too large", errno.EFBIG)
        self.size = size
        self.read_zeroes = bool(options.get("read-zeroes", True))

    def refresh_filename(self, full_open_options: Mapping[str, Any]) -> str:
        """null_refresh_filename: ``null-co://`` unless an option other than ``driver``,
        ``filename`` or ``latency-ns`` is among the full open options."""
        if any(key not in ("driver", "filename", "latency-ns") for key in full_open_options):
            return ""
        return "null-co://"

    def has_info(self) -> bool:
        """No: null-co has no bdrv_get_info, so QEMU's ImageInfo has no ``dirty-flag``."""
        return False

    def image_info(self) -> dict[str, Any]:
        """``actual-size``: nothing is stored (null_allocated_file_size)."""
        return {"actual-size": 0}

    def getlength(self) -> int:
        """The configured size."""
        return int(self.size)

    def read(self, offset: int, length: int) -> bytes:
        """Zeroes."""
        return bytes(length)

    def write(self, offset: int, data: bytes) -> None:
        """Discarded."""

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Discarded."""

    def block_status(self, want_zero: bool, offset: int, length: int,
                     allocated_file_size: Callable[[], int | None]) -> DriverStatus:
        """null_co_block_status: nothing is data; zeroes with ``read-zeroes`` (QEMU 9.x's
        default; QEMU 7.2 defaults to off and then says neither data nor zero)."""
        return DriverStatus(BLOCK_OFFSET_VALID | (BLOCK_ZERO if self.read_zeroes else 0), length, offset)

    def flush(self) -> None:
        """Nothing to flush."""
