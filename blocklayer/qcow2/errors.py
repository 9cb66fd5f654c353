"""Errors specific to qcow2 metadata, and the corruption report QEMU turns into an event."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..errors import BlockError


def c_hex(value: int) -> str:
    """``value`` as C's ``%#x`` prints it (QEMU's messages): ``0`` has no ``0x`` prefix."""
    return f"{value:#x}" if value else "0"


class Qcow2Corruption(BlockError):
    """Metadata that cannot be right (QEMU's ``qcow2_signal_corruption``).

    ``detail`` is QEMU's message for the event and the stderr line; ``offset``/``size``
    (-1 when unknown) locate the affected host range, as QEMU passes them.
    """

    def __init__(self, detail: str, offset: int = -1, size: int = -1) -> None:
        super().__init__(detail, errno.EIO)
        self.detail = detail
        self.offset = offset
        self.size = size


@dataclass(frozen=True)
class CorruptionReport:
    """What QEMU's qcow2_signal_corruption reports (stderr line and BLOCK_IMAGE_CORRUPTED).

    ``fatal`` is true when the image was writable: it is then marked corrupt and the node
    becomes unusable; a read-only image only gets the message (once).
    """

    msg: str
    offset: int
    size: int
    fatal: bool

    @property
    def stderr_line(self) -> str:
        """The line QEMU prints on stderr for this report."""
        if self.fatal:
            return (f"qcow2: Marking image as corrupt: {self.msg}; further corruption events "
                    "will be suppressed\n")
        return (f"qcow2: Image is corrupt: {self.msg}; further non-fatal corruption events "
                "will be suppressed\n")
