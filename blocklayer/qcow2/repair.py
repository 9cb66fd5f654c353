"""Repair of a dirty image: rebuild the refcounts from the L1/L2 walk.

QEMU repairs an image whose dirty bit is set (lazy refcounts after a crash) on the next
read-write open. We do what its ``rebuild_refcount_structure`` does: count every
reference, write a complete new refcount structure (describing itself) past the end of
the file, switch the header to it with one write, fix the COPIED flags, then clear the
dirty bit. Until the switch the old structure stays in force, so a crash during the
repair leaves an image that is still dirty and gets repaired again.
"""

from __future__ import annotations

import errno
import struct
from array import array

from ..errors import BlockError
from . import overlap as OL
from .bitmaps import count_references as count_bitmap_references
from .errors import Qcow2Corruption
from .image import Qcow2Image
from .l2 import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from .snapshot import read_snapshot_table
from .tables import U64, be_array, be_array_trimmed, be_bytes


class _Counter:
    """Reference counts per host cluster, growing as references are found."""

    def __init__(self, cluster_bits: int, clusters: int) -> None:
        self.bits = cluster_bits
        self.counts: array[int] = array(U64, bytes(8 * max(clusters, 1)))

    def add(self, offset: int, length: int) -> None:
        """Count one reference to every cluster touching [offset, offset+length)."""
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        if last >= len(self.counts):
            self.counts.extend(array(U64, bytes(8 * (last + 1 - len(self.counts)))))
        for cluster in range(first, last + 1):
            self.counts[cluster] += 1

    def get(self, offset: int) -> int:
        """References counted for the cluster at ``offset``."""
        index = offset >> self.bits
        return self.counts[index] if index < len(self.counts) else 0


def _count_l1(img: Qcow2Image, counter: _Counter, l1: array[int]) -> None:
    cs = img.cluster_size
    for l1_entry in l1:
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l2_offset & (cs - 1):
            raise Qcow2Corruption(f"L2 table offset {l2_offset:#x} unaligned")
        counter.add(l2_offset, cs)
        for entry in be_array(img.file.pread(l2_offset, cs)):
            if not entry:
                continue
            if entry & OFLAG_COMPRESSED:
                counter.add(*img.compressed.host_range(entry))
                continue
            host = entry & L2E_OFFSET_MASK
            if host:
                if host & (cs - 1):
                    raise Qcow2Corruption(f"Cluster offset {host:#x} unaligned")
                counter.add(host, cs)


def count_references(img: Qcow2Image) -> _Counter:
    """Count every reference to every host cluster, as qemu-img check does."""
    hdr = img.hdr
    cs = img.cluster_size
    counter = _Counter(img.cluster_bits, -(-img.file.getlength() // cs))
    counter.add(0, cs)
    if hdr.l1_size:
        counter.add(hdr.l1_table_offset, hdr.l1_size * 8)
    _count_l1(img, counter, img.l1)
    if hdr.nb_snapshots:
        table = read_snapshot_table(img.file, hdr.snapshots_offset, hdr.nb_snapshots)
        counter.add(table.offset, table.length)
        for l1_offset, l1_size in table.l1_tables:
            if l1_size:
                counter.add(l1_offset, l1_size * 8)
                _count_l1(img, counter, be_array(img.file.pread(l1_offset, l1_size * 8)))
    # Persistent bitmaps own their directory, tables and data clusters
    # (qcow2_check_bitmaps_refcounts); forgetting them would free live clusters.
    count_bitmap_references(img, counter.add)
    return counter


def _write_structure(img: Qcow2Image, counter: _Counter) -> None:
    cs = img.cluster_size
    rc = img.refcounts
    per_block = rc.codec.entries
    start = len(counter.counts)
    blocks = -(-start // per_block)
    while True:
        table_clusters = -(-blocks * 8 // cs)
        total = start + blocks + table_clusters
        need = -(-total // per_block)
        if need <= blocks:
            break
        blocks = need
    counter.add(start * cs, (blocks + table_clusters) * cs)
    if max(counter.counts) > rc.codec.max_value:
        raise BlockError("Could not repair dirty image: reference count overflow", errno.EIO)
    data = b"".join(rc.codec.from_counts(counter.counts, i * per_block) for i in range(blocks))
    table = array(U64, [(start + i) * cs for i in range(blocks)])
    table.extend([0] * (table_clusters * cs // 8 - blocks))
    table_offset = (start + blocks) * cs
    img.file.pwrite(start * cs, data)
    img.file.pwrite(table_offset, be_bytes(table))
    img.file.flush()
    img.file.pwrite(48, struct.pack(">QI", table_offset, table_clusters))
    img.file.flush()
    rc.clear()
    rc.reftable = be_array_trimmed(be_bytes(table))
    rc.reftable_offset = table_offset
    rc.reftable_clusters = table_clusters
    rc.reftable_size = table_clusters * cs // 8
    rc.free_index = 0
    img.hdr.refcount_table_offset = table_offset
    img.hdr.refcount_table_clusters = table_clusters
    img.layout_changed()


def _fix_copied(img: Qcow2Image, counter: _Counter) -> None:
    cs = img.cluster_size
    l1_changed = False
    for index, l1_entry in enumerate(img.l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        want = l2_offset | (OFLAG_COPIED if counter.get(l2_offset) == 1 else 0)
        if want != l1_entry:
            img.l1[index] = want
            l1_changed = True
        table = be_array(img.file.pread(l2_offset, cs))
        changed = False
        for i, entry in enumerate(table):
            if not entry:
                continue
            if entry & OFLAG_COMPRESSED:
                fixed = entry & ~OFLAG_COPIED
            elif entry & L2E_OFFSET_MASK:
                copied = counter.get(entry & L2E_OFFSET_MASK) == 1
                fixed = (entry & ~OFLAG_COPIED) | (OFLAG_COPIED if copied else 0)
            else:
                fixed = entry & OFLAG_ZERO
            if fixed != entry:
                table[i] = fixed
                changed = True
        if changed:
            img.check_overlap(l2_offset, cs, OL.ACTIVE_L2)
            img.file.pwrite(l2_offset, be_bytes(table))
    if l1_changed:
        img.check_overlap(img.hdr.l1_table_offset, len(img.l1) * 8, OL.ACTIVE_L1)
        img.file.pwrite(img.hdr.l1_table_offset, be_bytes(img.l1))
    img.file.flush()


def repair_image(img: Qcow2Image) -> None:
    """Rebuild refcounts and COPIED flags of a dirty image, then mark it clean."""
    try:
        counter = count_references(img)
        _write_structure(img, counter)
        _fix_copied(img, counter)
    except BlockError as exc:
        raise BlockError(f"Could not repair dirty image: {exc}", exc.errno or errno.EIO) from exc
    img.l2_cache.clear()
    img.mark_clean()
