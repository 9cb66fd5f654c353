"""What block jobs do to the graph: backing chain walks, one step of streaming or
committing data, and the end of a job (the chain without the intermediate nodes).

QEMU's block/stream.c and block/commit.c, the parts that touch data and graph; the job
itself (states, events, rate limit, threads) is the service's. Every function runs under
the graph lock, as the rest of :mod:`blocklayer.graph`.
"""

from __future__ import annotations

import os

from .blockstatus import block_status_above, is_allocated, is_allocated_above
from .dirtybitmap import DirtyBitmap
from .driver import BLOCK_DATA, BLOCK_ZERO, whole_sectors
from .errors import BlockError
from .graph import BlockGraph
from .node import BlockNode
from .perm import ChildRole
from .protocols import path_has_protocol as has_protocol

#: QEMU's STREAM_CHUNK and COMMIT_BUFFER_SIZE: the most one step looks at.
STREAM_CHUNK = 512 * 1024
COMMIT_BUFFER = 512 * 1024
#: block/mirror.c's MAX_IO_BYTES and DEFAULT_MIRROR_BUF_SIZE (16 requests of 1 MiB): the
#: most one request of active commit copies, and the most one iteration looks at.
MIRROR_IO = 1 << 20
MIRROR_BUFFER = 16 * MIRROR_IO


def backing(node: BlockNode) -> BlockNode | None:
    """bdrv_filter_or_cow_bs: the node's backing node (no driver here is a filter)."""
    if not node.driver.supports_backing:
        return None
    edge = node.child("backing")
    return edge.child if edge is not None else None


def chain(node: BlockNode) -> list[BlockNode]:
    """``node`` and every node below it through backing children, top first."""
    nodes = [node]
    below = backing(node)
    while below is not None and below not in nodes:
        nodes.append(below)
        below = backing(below)
    return nodes


def filter_chain(node: BlockNode) -> list[BlockNode]:
    """``node`` and the nodes below it through primary children that are filtered (a
    raw node without offset or size filters its file), top first."""
    nodes = [node]
    while True:
        edge = next((e for e in node.children
                     if e.role & ChildRole.PRIMARY and e.role & ChildRole.FILTERED), None)
        if edge is None or edge.child in nodes:
            return nodes
        node = edge.child
        nodes.append(node)


def skip_filters(node: BlockNode) -> BlockNode:
    """bdrv_skip_filters: the first node below ``node`` (or itself) that is no filter."""
    return filter_chain(node)[-1]


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    """bdrv_chain_contains: ``node`` is ``top`` or below it."""
    return node in chain(top)


def find_overlay(active: BlockNode, node: BlockNode | None) -> BlockNode | None:
    """bdrv_find_overlay: the node of ``active``'s chain whose backing node is ``node``
    (None: the bottom of the chain, bdrv_find_base)."""
    for member in chain(active):
        if backing(member) is node:
            return member
    return None


def length(node: BlockNode) -> int:
    """bdrv_getlength: the node's length in whole sectors."""
    return whole_sectors(node.getlength())


def _dirname(node: BlockNode) -> str:
    # bdrv_dirname: the directory of the file at the bottom of the node's primary chain.
    name = node.bottom_filename
    return name[:name.rfind("/") + 1] if "/" in name else ""


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path, strict=True)
    except OSError:
        return None


def find_backing_image(node: BlockNode, name: str) -> BlockNode | None:
    """bdrv_find_backing_image: the node below ``node`` that a backing file name means.

    An overridden backing child compares by its file name; protocol names compare as
    written (or with the full backing name); plain paths compare canonicalized, relative
    names taken relative to the directory of the image that names them.
    """
    for current in chain(node):
        below = backing(current)
        if below is None:
            break
        if current.backing_overridden():
            if name == below.filename:
                return below
        elif has_protocol(name) or has_protocol(current.backing_file):
            if name == current.backing_file or name == _full_name(current, current.backing_file):
                return below
        else:
            wanted = _realpath(_full_name(current, name))
            if wanted is None:
                continue
            named = _realpath(_full_name(current, current.backing_file))
            if named is not None and named == wanted:
                return below
    return None


def _full_name(node: BlockNode, name: str) -> str:
    # bdrv_make_absolute_filename: protocol names and absolute paths stay as they are.
    if not name or has_protocol(name) or name.startswith("/"):
        return name
    return _dirname(node) + name


def cluster_size(node: BlockNode) -> int:
    """bdrv_round_to_subclusters' granularity: the image's cluster size, else a sector."""
    size = node.driver.image_info().get("cluster-size") if node.has_info() else None
    return size if isinstance(size, int) and size > 0 else 512


def copy_on_read(top: BlockNode, offset: int, count: int) -> None:
    """bdrv_co_do_copy_on_readv as stream_populate uses it: the clusters of ``top``
    around the range that ``top`` does not hold yet get what the chain below shows;
    zeroes are written as zeroes (buffer_is_zero), never as data."""
    granularity = cluster_size(top)
    start = offset // granularity * granularity
    end = min(-(-(offset + count) // granularity) * granularity, length(top))
    pos = start
    while pos < end:
        allocated, pnum = is_allocated(top, pos, end - pos)
        if pnum <= 0:
            break
        if not allocated:
            data = top.pread(pos, pnum)
            if any(data):
                top.pwrite(pos, data)
            else:
                top.pwrite_zeroes(pos, pnum)
        pos += pnum


def stream_step(top: BlockNode, base_overlay: BlockNode, offset: int, total: int) -> tuple[int, bool]:
    """One iteration of stream_run at ``offset``: (bytes covered, whether data was
    copied). What ``top`` holds is skipped; what the chain from its backing node down to
    ``base_overlay`` (included) holds is copied into ``top``."""
    allocated, count = is_allocated(top, offset, STREAM_CHUNK)
    if allocated:
        return count, False
    below = backing(top)
    depth = 0
    if below is not None:
        depth, count = is_allocated_above(below, base_overlay, True, offset, count)
    else:
        count = 0
    if depth == 0 and count == 0:
        # The end of the backing file: nothing more to copy.
        return total - offset, False
    if depth > 0:
        copy_on_read(top, offset, count)
    return count, depth > 0


def commit_step(top: BlockNode, base_overlay: BlockNode, base: BlockNode, offset: int) -> tuple[int, bool]:
    """One iteration of commit_run (and of active commit's first pass) at ``offset``:
    (bytes covered, whether data was copied). What the chain from ``top`` down to
    ``base_overlay`` holds is written into ``base`` as ``top`` shows it."""
    depth, count = is_allocated_above(top, base_overlay, True, offset, COMMIT_BUFFER)
    if depth > 0 and count > 0:
        base.pwrite(offset, top.pread(offset, count))
    return count, depth > 0


def set_backing_file(graph: BlockGraph, node: BlockNode, base: BlockNode | None, name: str | None) -> None:
    """The end of a stream or commit: ``node`` reads through ``base`` (None: nothing),
    the nodes between close unless something else uses them, and the image names
    ``base`` as its backing file (``name``, else the base's file name) with the base's
    format (stream_prepare, bdrv_drop_intermediate -> bdrv_change_backing_file)."""
    filename = (name if name is not None else base.filename) if base is not None else ""
    fmt = base.driver.name if base is not None else ""
    graph.set_backing(node, base)
    # bdrv_backing_update_filename: a read-only overlay (a middle layer's, as libvirt
    # opens every backing node) is writable only for the header's rewrite, and read-only
    # again right after. The graph change above stays even when this fails, as in
    # bdrv_drop_intermediate.
    reopened = node.read_only
    if reopened:
        _reopen_for_header(graph, node)
    try:
        node.driver.change_backing_file(filename, fmt)
    finally:
        if reopened:
            try:
                graph.set_read_only(node)
            except BlockError:
                pass  # bdrv_reopen_set_read_only(parent, true, NULL): errors ignored
    node.backing_file = node.auto_backing_file = filename
    node.touch()
    graph.refresh_filenames([node])


class HeaderReopenError(BlockError):
    """A read-only overlay could not be made writable to rewrite its backing file name
    (bdrv_backing_update_filename's reopen failed): QEMU reports the reopen's error on
    stderr and the job fails with the errno's text."""


def _reopen_for_header(graph: BlockGraph, node: BlockNode) -> None:
    """bdrv_reopen_set_read_only(node, false) with the permissions a writable format
    node asks of its file (write and resize: the lock bytes), one transaction: on a
    failure the node is read-only again and :class:`HeaderReopenError` says why."""
    try:
        graph.reopen_read_write(node)
        try:
            graph.refresh_perms([node])
        except BlockError:
            try:
                graph.set_read_only(node)
            except BlockError:
                pass  # the reopen's own failure is the one reported
            raise
    except HeaderReopenError:
        raise
    except BlockError as err:
        failure = HeaderReopenError(err.message, err.errno)
        for note in getattr(err, "__notes__", []):
            failure.add_note(note)
        raise failure from err


# Mirror jobs, and active commit, which QEMU runs as one (block/mirror.c) ------------


def _zero_may_unmap(node: BlockNode) -> bool:
    # raw_open: the raw format passes on its file's supported_zero_flags.
    if node.driver.name == "raw":
        edge = node.child("file")
        return edge is not None and _zero_may_unmap(edge.child)
    return node.driver.zero_may_unmap()


def can_write_zeroes_with_unmap(node: BlockNode) -> bool:
    """bdrv_can_write_zeroes_with_unmap: opened with ``discard=unmap``, and a driver
    whose zero writes may deallocate."""
    return node.options.discard_unmap and _zero_may_unmap(node)


def zero_target(target: BlockNode, total: int, granularity: int) -> None:
    """mirror_dirty_init's initial zeroing of a ``sync: full`` target that can write
    zeroes with unmap: the whole target in zero writes of at most INT_MAX bytes (whole
    granules)."""
    chunk = (2**31 - 1) - (2**31 - 1) % granularity
    offset = 0
    while offset < total:
        count = min(total - offset, chunk)
        target.pwrite_zeroes(offset, count, may_unmap=True)
        offset += count


def mirror_dirty_init(top: BlockNode, base_overlay: BlockNode, bitmap: DirtyBitmap) -> None:
    """mirror_dirty_init: every part that the chain from ``top`` down to ``base_overlay``
    defines is dirty (whole granules), so it gets copied into the base."""
    total = length(top)
    offset = 0
    while offset < total:
        depth, count = is_allocated_above(top, base_overlay, True, offset, total - offset)
        if count <= 0:
            break
        if depth > 0:
            bitmap.set_range(offset, count)
        offset += count


def next_dirty(bitmap: DirtyBitmap, start: int) -> int | None:
    """bdrv_dirty_iter_next from ``start``, wrapping to the start once (mirror_iteration):
    the offset of the first dirty granule, or None when the bitmap is clean."""
    granularity = bitmap.granularity
    for first in (start, 0):
        offset = first - first % granularity
        while offset < bitmap.size:
            if bitmap.get(offset):
                return offset
            offset += granularity
    return None


def mirror_step(top: BlockNode, base: BlockNode, bitmap: DirtyBitmap, start: int,
                zero_unmaps: bool, buffer: int = MIRROR_BUFFER) -> tuple[int, list[int], list[int]]:
    """One mirror_iteration (a mirror job, or active commit) from the dirty iterator at
    ``start``: the run of dirty granules that follows the first one (at most ``buffer``
    bytes) is cleared, then copied into ``base`` (the target) request by request as
    ``top`` (the source) shows it. Parts that read as
    zeroes become zero writes (with unmap), parts with no data anywhere discards, when
    they cover whole clusters of the base; the rest is copied.

    Returns (where the iterator goes on, the bytes of each request for the progress,
    the bytes of each request for the rate limit: none for a zero write or discard when
    ``zero_unmaps``, as bdrv_can_write_zeroes_with_unmap decides)."""
    total = length(top)
    offset = next_dirty(bitmap, start)
    if offset is None:
        return 0, [], []
    granularity = bitmap.granularity
    chunks = 1
    while chunks * granularity < buffer:
        following = offset + chunks * granularity
        if following >= total or not bitmap.get(following):
            break
        chunks += 1
    bitmap.reset_range(offset, chunks * granularity)
    done: list[int] = []
    accounted: list[int] = []
    base_cluster = cluster_size(base)
    while chunks > 0 and offset < total:
        status = block_status_above(top, offset, chunks * granularity)
        count = status.pnum
        data = bool(status.flags & BLOCK_DATA)
        if data:
            count = min(count, MIRROR_IO)
        count -= count % granularity
        method = "copy"
        if count < granularity:
            count = granularity
        elif not data and offset % base_cluster == 0 and count % base_cluster == 0:
            # bdrv_round_to_clusters on the target leaves the request as it is.
            method = "zero" if status.flags & BLOCK_ZERO else "discard"
        count = min(count, total - offset)  # mirror_clip_bytes
        if method == "copy":
            base.pwrite(offset, top.pread(offset, count))
        elif method == "zero":
            base.pwrite_zeroes(offset, count, may_unmap=True)
        else:
            base.pdiscard(offset, count)
        done.append(count)
        accounted.append(0 if method != "copy" and zero_unmaps else count)
        offset += count
        chunks -= -(-count // granularity)
    return offset, done, accounted
