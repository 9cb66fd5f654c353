"""Errors raised by the block layer."""

from __future__ import annotations


class BlockError(Exception):
    """A block-layer failure whose message is QEMU's text for the same failure.

    The QMP adapter reports ``str(error)`` verbatim as a GenericError ``desc``.
    ``errno`` is set when the failure came from a system call (qemu-io prints it).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return self.message
