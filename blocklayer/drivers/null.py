"""``null-co``: an image of a given size that stores nothing (tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..driver import BlockDriver

DEFAULT_SIZE = 1 << 30


class NullDriver(BlockDriver):
    """Reads return zeroes (with ``read-zeroes``, QEMU's default since 9.x) and writes vanish."""

    name = "null-co"
    protocol = True

    def __init__(self) -> None:
        super().__init__()
        self.size = DEFAULT_SIZE
        self.filename = "null-co://"

    def open(self, options: Mapping[str, Any], *, read_only: bool, inactive: bool) -> None:
        """Take ``size``; ``latency-ns`` and ``read-zeroes`` are accepted."""
        self.size = options.get("size", DEFAULT_SIZE)

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

    def flush(self) -> None:
        """Nothing to flush."""
