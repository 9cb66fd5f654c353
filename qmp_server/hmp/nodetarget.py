"""The block node HMP ``qemu-io`` works on, through the user the block service lends it."""

from __future__ import annotations

from blocklayer.graph import BlockGraph
from blocklayer.node import Edge
from blocklayer.perm import WRITE


class NodeTarget:
    """A node as qemu-io sees it (hmp.qemu_io.QemuIoTarget) through a temporary user."""

    def __init__(self, graph: BlockGraph, edge: Edge) -> None:
        self.graph = graph
        self.edge = edge
        self.node = edge.child

    def require_write(self) -> None:
        """Take the write permission once, as QEMU's qemu-io does on its first write."""
        if not self.edge.perm & WRITE:
            self.graph.set_user_perm(self.edge, self.edge.perm | WRITE, self.edge.shared)

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
        """The node's length in bytes."""
        return self.node.getlength()
