"""Errors specific to qcow2 metadata."""

from __future__ import annotations

import errno

from ..errors import BlockError


class Qcow2Corruption(BlockError):
    """Metadata that cannot be right (QEMU's ``qcow2_signal_corruption``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"qcow2: Image is corrupt: {detail}", errno.EIO)
        self.detail = detail
