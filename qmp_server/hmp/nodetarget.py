"""What HMP ``qemu-io`` works on: a node through a user the block service lends it, or a
device's or ``-drive``'s BlockBackend itself (hmp_qemu_io)."""

from __future__ import annotations

import errno
import os

from blocklayer.backend import BlockAcctStats, BlockBackend
from blocklayer.blockstatus import is_allocated
from blocklayer.errors import BlockError
from blocklayer.graph import BlockGraph
from blocklayer.node import BlockNode, Edge
from blocklayer.perm import WRITE


class _Target:
    """A node as qemu-io sees it (hmp.qemu_io.QemuIoTarget); subclasses say how write
    permission is taken."""

    def __init__(self, node: BlockNode) -> None:
        self.node = node

    def require_write(self) -> None:
        """Take the write permission once, as QEMU's qemu-io does on its first write."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """Guest read."""
        return self.node.pread(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Guest write."""
        self.node.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Guest write-zeroes."""
        self.node.pwrite_zeroes(offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        """Guest discard."""
        self.node.pdiscard(offset, length)

    def flush(self) -> None:
        """Flush the node."""
        self.node.flush()

    def getlength(self) -> int:
        """The node's length in bytes; a node whose driver gave up (fatal corruption)
        has none, as QEMU's blk_getlength (``No medium found``)."""
        if self.node.driver.ejected:
            raise BlockError(os.strerror(errno.ENOMEDIUM), errno.ENOMEDIUM)
        return self.node.getlength()

    def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """bdrv_is_allocated on the node (qemu-io's ``alloc`` and ``map``)."""
        return is_allocated(self.node, offset, length)

    def acct_stats(self) -> BlockAcctStats | None:
        """No BlockBackend of a device or -drive here: nobody reads the accounting."""
        return None


class NodeTarget(_Target):
    """A node through the temporary user the block service lent."""

    def __init__(self, graph: BlockGraph, edge: Edge) -> None:
        super().__init__(edge.child)
        self.graph = graph
        self.edge = edge

    def require_write(self) -> None:
        """Take the write permission once, as QEMU's qemu-io does on its first write."""
        if not self.edge.perm & WRITE:
            self.graph.set_user_perm(self.edge, self.edge.perm | WRITE, self.edge.shared)


class BackendTarget(_Target):
    """A BlockBackend's node, with the backend's own permissions, which qemu-io extends
    and leaves extended (QEMU's qemuio_command; hmp_qemu_io explains why)."""

    def __init__(self, backend: BlockBackend) -> None:
        if backend.node is None:
            raise BlockError("Device has no medium")
        super().__init__(backend.node)
        self.backend = backend

    def acct_stats(self) -> BlockAcctStats | None:
        """The backend's own accounting (blk_get_stats)."""
        return self.backend.stats

    def require_write(self) -> None:
        """blk_set_perm with write added, sharing as before."""
        if not self.backend.perm & WRITE:
            self.backend.set_perm(self.backend.perm | WRITE, self.backend.shared)
