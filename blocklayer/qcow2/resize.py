"""Resizing a qcow2 image (QEMU's qcow2_co_truncate, preallocation off).

Growing: the active L1 table grows to exactly the new size (qcow2_grow_l1_table, via
:func:`snapshotops.grow_l1`: a new table in new clusters, durable, then the 12-byte
header switch, the old table freed), then the 8-byte header ``size`` write makes the new
size visible. A crash before that write leaves the old size and at most leaked clusters.

Shrinking: the clusters past the new end are discarded for good (unallocated, freed;
qcow2_cluster_discard with full_discard), the L1 entries past the new end are zeroed on
disk before their L2 tables are freed (qcow2_shrink_l1_table; ``l1_size`` stays),
refcount blocks left describing nothing leave the refcount table (qcow2_shrink_reftable),
the header ``size`` is written, and the file loses its tail past the last used cluster.

Every write goes through the image's overlap check; every loop is bounded by the old
size, the L1 table or the refcount table.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from array import array

from ..driver import ChildIO
from ..errors import BlockError
from . import datapath
from . import overlap as OL
from .errors import Qcow2Corruption, c_hex
from .header import MAX_L1_BYTES
from .image import Qcow2Image
from .l2 import L1E_OFFSET_MASK
from .snapshotops import grow_l1
from .tables import U64, be_bytes

log = logging.getLogger(__name__)

#: offsetof(QCowHeader, size).
_SIZE_FIELD = 24
#: qcow2_grow_l1_table refuses more entries than this before anything else (INT_MAX / 8).
_INT_MAX_L1 = (2**31 - 1) // 8


def _fail(what: str, exc: BlockError) -> BlockError:
    code = exc.errno or errno.EIO
    return BlockError(f"{what}: {os.strerror(code)}", code)


def truncate(img: Qcow2Image, backing: ChildIO | None, length: int, old_length: int,
             zero_new: bool) -> None:
    """qcow2_co_truncate(length, prealloc=off): ``old_length`` is the node's length in
    whole sectors; ``zero_new`` is bdrv_co_truncate's BDRV_REQ_ZERO_WRITE (a backing
    file longer than the old size must not show through the new area)."""
    if length % 512:
        raise BlockError("The new size must be a multiple of 512", errno.EINVAL)
    if img.hdr.nb_snapshots and img.version < 3:
        # Snapshot sizes were optional before v3, so a resize could not keep them right.
        raise BlockError("Can't resize a v2 image which has snapshots", errno.ENOTSUP)
    per_l1 = img.cluster_size << img.l2_bits
    new_l1_size = -(-length // per_l1)
    if length < old_length:
        _shrink(img, length, old_length, new_l1_size)
    else:
        try:
            if new_l1_size > img.hdr.l1_size and (new_l1_size > _INT_MAX_L1
                                                  or new_l1_size > MAX_L1_BYTES // 8):
                raise BlockError(os.strerror(errno.EFBIG), errno.EFBIG)
            grow_l1(img, new_l1_size, exact=True)
        except Qcow2Corruption:
            raise
        except BlockError as exc:
            raise _fail("Failed to grow the L1 table", exc) from exc
    if zero_new and length > old_length:
        # qcow2_subcluster_zeroize over the new area (zero clusters; the tail cluster
        # may be partial, at the end of the image).
        saved = img.virtual_size
        img.virtual_size = length
        try:
            datapath.write_zeroes(img, backing, old_length, length - old_length, False)
        except Qcow2Corruption:
            img.virtual_size = saved
            raise
        except BlockError as exc:
            img.virtual_size = saved
            raise _fail("Failed to zero out new clusters", exc) from exc
    try:
        img.check_overlap(_SIZE_FIELD, 8, OL.HEADER)
        img.file.pwrite(_SIZE_FIELD, struct.pack(">Q", length))
        img.file.flush()
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        raise _fail("Failed to update the image size", exc) from exc
    img.hdr.size = length
    img.virtual_size = length
    img.resize_caches()


def _shrink(img: Qcow2Image, length: int, old_length: int, new_l1_size: int) -> None:
    cs = img.cluster_size
    start = -(-length // cs) * cs
    if start < old_length:
        try:
            _discard_tail(img, start, old_length)
        except Qcow2Corruption:
            raise
        except BlockError as exc:
            raise _fail("Failed to discard cropped clusters", exc) from exc
    try:
        _shrink_l1(img, new_l1_size)
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        raise _fail("Failed to reduce the number of L2 tables", exc) from exc
    try:
        _shrink_reftable(img)
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        raise _fail("Failed to discard unused refblocks", exc) from exc
    # The file keeps nothing past its last used cluster (a failure only warns, as
    # QEMU's warn_reportf_err: the image is consistent either way).
    try:
        file_size = img.file.getlength()
        last = _last_used_cluster(img, file_size)
        if (last + 1) * cs < file_size:
            img.file.truncate((last + 1) * cs)
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        log.warning("Failed to truncate the tail of the image: %s", exc)


def _discard_tail(img: Qcow2Image, start: int, end: int) -> None:
    """qcow2_cluster_discard(start, end - start, QCOW2_DISCARD_ALWAYS, full_discard):
    every L2 entry in the range becomes unallocated and drops its reference (its host
    clusters are punched when the file allows it). Only existing L2 tables are
    visited, at most one pass over the range."""
    datapath.full_discard(img, start, end)


def _shrink_l1(img: Qcow2Image, new_l1_size: int) -> None:
    """qcow2_shrink_l1_table: the entries past ``new_l1_size`` are zeroed on disk and
    made durable before the L2 tables they pointed at are freed."""
    old_size = img.hdr.l1_size
    if new_l1_size >= old_size:
        return
    position = img.hdr.l1_table_offset + new_l1_size * 8
    count = old_size - new_l1_size
    try:
        img.check_overlap(position, count * 8, OL.ACTIVE_L1)
        img.file.pwrite(position, bytes(count * 8))
        img.file.flush()
    except BlockError:
        # A partly written table on disk: better no L2 tables past the end in memory.
        for i in range(new_l1_size, old_size):
            img.l1[i] = 0
        raise
    for i in range(old_size - 1, new_l1_size - 1, -1):
        offset = img.l1[i] & L1E_OFFSET_MASK
        if offset:
            img.refcounts.free_clusters(offset, img.cluster_size, discard=True)
            img.l1[i] = 0
    img.layout_changed()
    img.refcounts.process_discards()


def _shrink_reftable(img: Qcow2Image) -> None:
    """qcow2_shrink_reftable: refcount blocks that count nothing (but themselves) leave
    the refcount table, written whole and made durable before they are freed."""
    rc = img.refcounts
    old = list(rc.reftable)
    new = list(old)
    for index in range(len(old)):
        offset = rc.block_offset(index)
        if not offset:
            new[index] = 0
            continue
        block = rc.cache.get(offset).table
        own = offset >> img.cluster_bits
        if own >> rc.block_bits == index:
            # The block counts its own cluster: that reference alone keeps nothing used.
            saved = block.get(own & rc.block_mask)
            block.set(own & rc.block_mask, 0)
            unused = block.find_nonzero(0, rc.codec.entries) < 0
            block.set(own & rc.block_mask, saved)
        else:
            unused = block.find_nonzero(0, rc.codec.entries) < 0
        if unused:
            new[index] = 0
    if new == old:
        return
    table = new + [0] * (rc.reftable_size - len(new))
    img.check_overlap(rc.reftable_offset, rc.reftable_size * 8, OL.REFCOUNT_TABLE)
    try:
        img.file.pwrite(rc.reftable_offset, be_bytes(_u64(table)))
        img.file.flush()
    finally:
        for index, entry in enumerate(old):
            if entry and not new[index]:
                _discard_refblock(img, entry & ~0x1FF)
                rc.reftable[index] = 0
        img.layout_changed()
    rc.process_discards()


def _discard_refblock(img: Qcow2Image, offset: int) -> None:
    """qcow2_discard_refcount_block: the block's own refcount (1, or the refcounts are
    wrong) drops to 0 in whichever block counts it."""
    rc = img.refcounts
    cluster = offset >> img.cluster_bits
    covering = rc.block_offset(cluster >> rc.block_bits)
    if not covering:
        raise Qcow2Corruption(f"Refblock at {c_hex(offset)} is not covered by the refcount "
                              f"structures")
    count = rc.refcount(cluster)
    if count != 1:
        raise Qcow2Corruption(f"Invalid refcount: refblock offset {c_hex(covering)}, reftable "
                              f"index {cluster >> rc.block_bits}, block offset {c_hex(offset)}, "
                              f"refcount {c_hex(count)}")
    rc.update(cluster, 1, -1, discard=True)


def _last_used_cluster(img: Qcow2Image, file_size: int) -> int:
    """qcow2_get_last_cluster: the last cluster below ``file_size`` with a reference
    (one refcount lookup per cluster, at most the file's clusters)."""
    rc = img.refcounts
    cluster = -(-file_size // img.cluster_size) - 1
    while cluster >= 0:
        if not rc.block_offset(cluster >> rc.block_bits):
            # No refcount block: none of its clusters is used; skip them all at once.
            cluster = ((cluster >> rc.block_bits) << rc.block_bits) - 1
            continue
        if rc.refcount(cluster) > 0:
            return cluster
        cluster -= 1
    raise Qcow2Corruption("There are no references in the refcount table.")


def _u64(values: list[int]) -> array[int]:
    table = array(U64)
    table.extend(values)
    return table
