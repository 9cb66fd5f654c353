"""QEMU's block permission bits and child roles."""

from __future__ import annotations

import enum

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL = 0x0F

# Order matters: bit i is locked at byte 100+i / 200+i by the file driver.
PERM_NAMES: tuple[tuple[int, str], ...] = (
    (CONSISTENT_READ, "consistent read"),
    (WRITE, "write"),
    (WRITE_UNCHANGED, "write unchanged"),
    (RESIZE, "resize"),
)


def perm_names(perm: int) -> str:
    """QEMU's comma-separated list of permission names, as in its error messages."""
    return ", ".join(name for bit, name in PERM_NAMES if perm & bit)


class ChildRole(enum.Flag):
    """What a parent uses a child for; decides which permissions it asks of it."""

    DATA = enum.auto()
    METADATA = enum.auto()
    FILTERED = enum.auto()
    COW = enum.auto()
    PRIMARY = enum.auto()

    @classmethod
    def image(cls) -> ChildRole:
        """The role of a format driver's file child (qcow2): data and metadata."""
        return cls.DATA | cls.METADATA | cls.PRIMARY
