"""Which of QEMU's lock bytes someone holds on an image, seen from another open file."""

from __future__ import annotations

import os
from pathlib import Path

from blocklayer.lockbytes import lock_holder

#: Permission bytes 100..104 and "not shared" bytes 200..204 (104/204 belonged to the
#: graph-mod permission QEMU dropped in 7.0; probing them shows nobody takes them).
PROBED = (*range(100, 105), *range(200, 205))


def held_bytes(path: Path) -> set[int]:
    """Lock bytes of ``path`` held by anybody, probed with F_OFD_GETLK from a fresh fd."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {off for off in PROBED if lock_holder(fd, off, ofd=True) is not None}
    finally:
        os.close(fd)


def locked(path: Path) -> list[int]:
    """:func:`held_bytes`, sorted."""
    return sorted(held_bytes(path))
