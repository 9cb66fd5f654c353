"""Block status: which parts of a node hold data, read as zeroes, or come from below.

QEMU's block-status model (block/io.c: bdrv_co_block_status,
bdrv_co_common_block_status_above and the helpers built on them), over the drivers'
own answers (:meth:`blocklayer.driver.BlockDriver.block_status`):

* :func:`block_status` asks one node, following raw's pass-through to its file and
  refining metadata-preallocated qcow2 data with the file's holes.
* :func:`block_status_above` walks the backing chain down to (not including) ``base``:
  what an unallocated qcow2 cluster shows comes from the backing file, and past a
  shorter backing file's end the range reads as zeroes.
* :func:`is_allocated` / :func:`is_allocated_above` answer "is this range allocated in
  this layer / in the chain" quickly (``want_zero`` off), as qemu-io's ``map`` and
  ``alloc`` and QEMU's jobs ask.

The answer covers ``pnum`` bytes from the offset (never more than asked, never 0 inside
the node); callers loop. Every recursion follows graph edges, and the graph has no
cycles, so each query ends.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from .driver import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_EOF,
    BLOCK_OFFSET_VALID,
    BLOCK_RAW,
    BLOCK_RECURSE,
    BLOCK_ZERO,
    ChildIO,
    whole_sectors,
)
from .drivers.file import FileDriver
from .errors import BlockError
from .node import BlockNode

__all__ = [
    "BLOCK_ALLOCATED",
    "BLOCK_DATA",
    "BLOCK_EOF",
    "BLOCK_OFFSET_VALID",
    "BLOCK_RAW",
    "BLOCK_RECURSE",
    "BLOCK_ZERO",
    "Status",
    "allocated_file_size",
    "block_status",
    "block_status_above",
    "is_allocated",
    "is_allocated_above",
]


@dataclass(frozen=True)
class Status:
    """The status of ``pnum`` bytes from the queried offset.

    ``flags``: BLOCK_* bits. With BLOCK_OFFSET_VALID, ``map`` is the offset in ``file``
    (the node whose storage holds the range). ``depth`` counts the layers asked (1: the
    queried node), as bdrv_is_allocated_above reports it.
    """

    flags: int
    pnum: int
    map: int = 0
    file: BlockNode | None = None
    depth: int = 0


def _length(node: BlockNode) -> int:
    # bdrv_co_getlength (whole sectors): the partial sector at the end of a file counts
    # whole and reads as a hole there; a node whose driver gave up has no length.
    if node.driver.ejected:
        raise BlockError(os.strerror(errno.ENOMEDIUM), errno.ENOMEDIUM)
    return whole_sectors(node.getlength())


def _child_node(node: BlockNode, child: ChildIO) -> BlockNode:
    for edge in node.children:
        if edge.child is child:
            return edge.child
    raise BlockError(f"Node '{node.name}' reported the status of a node it does not use", errno.EIO)


def _cow_child(node: BlockNode) -> BlockNode | None:
    """bdrv_filter_or_cow_bs: the backing node (no driver here is a filter)."""
    if not node.driver.supports_backing:
        return None
    edge = node.child("backing")
    return edge.child if edge is not None else None


def allocated_file_size(node: BlockNode) -> int | None:
    """bdrv_get_allocated_file_size: the bytes a protocol node occupies on disk, or for
    other nodes the sum over their ``file`` child; None when unknown."""
    if node.driver.protocol:
        size = node.driver.image_info().get("actual-size")
        return size if isinstance(size, int) else None
    edge = node.child("file")
    return allocated_file_size(edge.child) if edge is not None else None


def block_status(node: BlockNode, offset: int, length: int, *, want_zero: bool = True) -> Status:
    """bdrv_co_block_status: the status of ``node`` alone at ``offset``.

    Past the end: BLOCK_EOF with ``pnum`` 0; ``length`` 0: no flags, ``pnum`` 0. Flags
    may include ALLOCATED (data or zeroes are defined by this node), and ZERO for an
    unallocated range with no backing file (or past a backing file's end).
    """
    total = _length(node)
    if offset >= total:
        return Status(BLOCK_EOF, 0)
    if length <= 0:
        return Status(0, 0)
    length = min(length, total - offset)
    driver = node.driver
    # Requests are widened to the node's alignment (O_DIRECT files) and the answer is
    # cut back to what was asked.
    align = driver.request_alignment if isinstance(driver, FileDriver) else 1
    aligned_offset = offset - offset % align
    aligned_length = -(-(offset + length) // align) * align - aligned_offset
    answer = driver.block_status(want_zero, aligned_offset, aligned_length,
                                 lambda: _allocated_file(node))
    if answer is None:
        # No bdrv_co_block_status: everything is data, at its own offset for protocols.
        flags = BLOCK_DATA | BLOCK_ALLOCATED | (BLOCK_EOF if offset + length == total else 0)
        if driver.protocol:
            return Status(flags | BLOCK_OFFSET_VALID, length, offset, node)
        return Status(flags, length)
    flags = answer.flags
    if answer.pnum <= 0 or answer.pnum % align:
        raise BlockError(f"Node '{node.name}' reported an invalid block status", errno.EIO)
    pnum = min(answer.pnum - (offset - aligned_offset), length)
    file: BlockNode | None = None
    mapped = 0
    if flags & BLOCK_OFFSET_VALID:
        file = node if answer.file is None else _child_node(node, answer.file)
        mapped = answer.map + offset - aligned_offset
    if flags & BLOCK_RAW:
        # The driver passes the question on (raw-format): the file's answer is the node's.
        assert file is not None and file is not node
        inner = block_status(file, mapped, pnum, want_zero=want_zero)
        return _with_eof(inner, offset, total)
    if flags & (BLOCK_DATA | BLOCK_ZERO):
        flags |= BLOCK_ALLOCATED
    elif driver.supports_backing:
        backing = _cow_child(node)
        if backing is None:
            flags |= BLOCK_ZERO
        elif want_zero and offset >= _length(backing):
            flags |= BLOCK_ZERO
    if (want_zero and flags & BLOCK_RECURSE and file is not None and file is not node
            and flags & BLOCK_DATA and not flags & BLOCK_ZERO and flags & BLOCK_OFFSET_VALID):
        # Metadata preallocation: the data clusters may still be holes in the file.
        refined: Status | None
        try:
            refined = block_status(file, mapped, pnum, want_zero=True)
        except BlockError:
            refined = None  # only extra information: errors are ignored
        if refined is not None:
            inner = refined
            if inner.flags & BLOCK_EOF and (not inner.pnum or inner.flags & BLOCK_ZERO):
                flags |= BLOCK_ZERO  # past the file's end reads as zeroes
            else:
                pnum = inner.pnum
                flags |= inner.flags & BLOCK_ZERO
    return _with_eof(Status(flags, pnum, mapped, file), offset, total)


def _allocated_file(node: BlockNode) -> int | None:
    edge = node.child("file")
    return allocated_file_size(edge.child) if edge is not None else None


def _with_eof(status: Status, offset: int, total: int) -> Status:
    if offset + status.pnum == total and not status.flags & BLOCK_EOF:
        return Status(status.flags | BLOCK_EOF, status.pnum, status.map, status.file)
    return status


def _common_above(node: BlockNode, base: BlockNode | None, include_base: bool, want_zero: bool,
                  offset: int, length: int) -> Status:
    """bdrv_co_common_block_status_above: ``node``, then each backing layer below it
    down to ``base`` (included with ``include_base``), until one defines the range."""
    if not include_base and node is base:
        return Status(0, length)
    status = block_status(node, offset, length, want_zero=want_zero)
    depth = 1
    if status.pnum == 0 or status.flags & BLOCK_ALLOCATED or node is base:
        return _depth(status, depth)
    eof = offset + status.pnum if status.flags & BLOCK_EOF else 0
    length = status.pnum
    layer = _cow_child(node)
    while layer is not None and (include_base or layer is not base):
        status = block_status(layer, offset, length, want_zero=want_zero)
        depth += 1
        if status.pnum == 0:
            # The layer is shorter than the one above: what lies past its end reads as
            # zeroes, as if allocated here (EOF is the top node's business).
            status = Status(BLOCK_ZERO | BLOCK_ALLOCATED, length, 0, layer)
            break
        if status.flags & BLOCK_ALLOCATED:
            status = Status(status.flags & ~BLOCK_EOF, status.pnum, status.map, status.file)
            break
        if layer is base:
            break
        length = status.pnum
        layer = _cow_child(layer)
    if offset + status.pnum == eof:
        status = Status(status.flags | BLOCK_EOF, status.pnum, status.map, status.file)
    return _depth(status, depth)


def _depth(status: Status, depth: int) -> Status:
    return Status(status.flags, status.pnum, status.map, status.file, depth)


def block_status_above(node: BlockNode, offset: int, length: int,
                       base: BlockNode | None = None) -> Status:
    """bdrv_block_status_above: the status of what ``node`` shows, walking its backing
    chain down to (not including) ``base``; None: the whole chain (what an NBD export's
    ``base:allocation`` and ``qemu-img map`` report)."""
    return _common_above(node, base, False, True, offset, length)


def is_allocated(node: BlockNode, offset: int, length: int) -> tuple[bool, int]:
    """bdrv_is_allocated: (whether ``node`` itself defines the range's first part, for
    how many bytes). ``pnum`` 0 means the offset is past the end."""
    status = _common_above(node, node, True, False, offset, length)
    return bool(status.flags & BLOCK_ALLOCATED), status.pnum


def is_allocated_above(top: BlockNode, base: BlockNode | None, include_base: bool,
                       offset: int, length: int) -> tuple[int, int]:
    """bdrv_is_allocated_above: (depth of the layer that defines the range's first part,
    1 being ``top``, or 0 if none between ``top`` and ``base`` does; bytes covered)."""
    status = _common_above(top, base, include_base, False, offset, length)
    return (status.depth if status.flags & BLOCK_ALLOCATED else 0), status.pnum
