"""bdrv_commit: HMP ``commit``, a synchronous copy of what a node itself holds into its
backing node, which then keeps it while the node is emptied. Not a block job: nothing
else runs meanwhile, and there is no event."""

from __future__ import annotations

import errno
import os

from .blockstatus import is_allocated
from .errors import BlockError
from .graph import BlockGraph
from .node import BlockNode, Edge
from .perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED

#: How much bdrv_commit copies at a time (COMMIT_BUF_SIZE).
COMMIT_BUF_SIZE = 2 << 20


def _fail(code: int) -> BlockError:
    return BlockError(os.strerror(code), code)


def commit_to_backing(graph: BlockGraph, node: BlockNode) -> None:
    """QEMU 7.2's bdrv_commit: raise BlockError with the errno QEMU returns (ENOTSUP
    without a backing node, EBUSY when a job blocks either node, EACCES when a
    read-only backing cannot be reopened read-write, others from the I/O)."""
    link = node.child("backing")
    if link is None:
        raise _fail(errno.ENOTSUP)
    backing = link.child
    if node.blockers or backing.blockers:
        raise _fail(errno.EBUSY)
    reopened = backing.read_only
    if reopened:
        try:
            graph.reopen_read_write(backing)
        except BlockError:
            raise _fail(errno.EACCES) from None
    users: list[Edge] = []
    try:
        # The commit_top filter QEMU puts between the node and its backing asks nothing
        # of the backing node and shares everything, so that the copy may write there.
        link.fixed_perm = (0, ALL)
        graph.refresh_perms([node])
        # WRITE_UNCHANGED is what emptying the node needs (bdrv_make_empty).
        users.append(graph.add_user(node, "commit", CONSISTENT_READ | WRITE_UNCHANGED, ALL))
        users.append(graph.add_user(backing, "commit", WRITE | RESIZE, ALL))
        length = node.getlength()
        if length > backing.getlength():
            backing.truncate(length)
        offset = 0
        # Bounded: each step moves forward by what bdrv_is_allocated covered (> 0).
        while offset < length:
            allocated, count = is_allocated(node, offset, min(COMMIT_BUF_SIZE, length - offset))
            if count <= 0:
                break
            if allocated:
                backing.pwrite(offset, node.pread(offset, count))
            offset += count
        try:
            node.make_empty()
        except BlockError as err:
            if err.errno != errno.ENOTSUP:
                raise
        node.flush()
        backing.flush()
    finally:
        for edge in reversed(users):
            graph.remove_user(edge)
        link.fixed_perm = None
        try:
            graph.refresh_perms([node])
        except BlockError:
            pass  # only loosens
        if reopened:
            try:
                graph.set_read_only(backing)
            except BlockError:
                pass  # bdrv_reopen_set_read_only(backing, true, NULL): ignored
