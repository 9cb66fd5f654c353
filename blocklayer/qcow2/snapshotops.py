"""Internal snapshots of an open image: create, goto (apply), delete, as QEMU does them.

The operations follow block/qcow2-snapshot.c and qcow2_update_snapshot_refcount:

* create (qcow2_snapshot_create): copy the active L1 table (as it is in memory, COPIED
  flags included) to new clusters, add one reference to every cluster reachable from
  the active L1 (clearing COPIED, which makes the next guest write copy the cluster:
  the data path writes in place only where COPIED is set), then write a whole new
  snapshot table and switch the header to it last;
* goto (qcow2_snapshot_goto): add references for the snapshot's clusters, overwrite the
  active L1 with the snapshot's, drop the references of the old active tree, and set
  COPIED again where a cluster is owned by the active tree alone;
* delete (qcow2_snapshot_delete): write the table without the entry (header switch),
  then drop the snapshot's references and free its L1 copy.

Every loop over on-disk structures is bounded by validated table sizes (L1 sizes are
checked against QCOW_MAX_L1_SIZE and the file's end before a snapshot's table is read).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any

from ..driver import ChildIO
from ..errors import BlockError
from . import datapath
from . import overlap as OL
from .cache import CacheEntry
from .errors import Qcow2Corruption, c_hex
from .image import Qcow2Image
from .l2 import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED, ClusterType, cluster_type
from .snapshot import (
    HEADER_SNAPSHOT_FIELDS,
    MAX_L1_BYTES,
    MAX_SNAPSHOTS,
    MAX_TABLE_SIZE,
    NO_ICOUNT,
    Snapshot,
    encode_table,
    read_snapshots,
    table_of,
)
from .tables import be_array, be_bytes

#: sizeof(QCowSnapshotExtraData) in QEMU 7.2: what a new entry carries.
EXTRA_SIZE = 24
#: The largest VM state read back here (ours are under a kilobyte).
MAX_VMSTATE = 1 << 30

def load(img: Qcow2Image) -> list[Snapshot]:
    """The image's snapshots (read once per open, as qcow2_do_open does)."""
    if img.snapshot_list is None:
        img.snapshot_list = read_snapshots(img.file, img.hdr.snapshots_offset,
                                           img.hdr.nb_snapshots, img.virtual_size)
    return img.snapshot_list


def _alloc(img: Qcow2Image, size: int) -> int:
    """qcow2_alloc_clusters(size): a zero-size request allocates nothing and answers the
    current free-cluster hint (alloc_clusters_noref with no clusters to find)."""
    if size <= 0:
        return img.refcounts.free_index << img.cluster_bits
    return img.refcounts.alloc((size + img.cluster_size - 1) >> img.cluster_bits)


def write_table(img: Qcow2Image, snaps: list[Snapshot]) -> None:
    """qcow2_write_snapshots: a new table in new clusters, durable, then the header switch.

    The 12-byte header write (nb_snapshots, snapshots_offset) comes last, so a crash
    leaves either the old table or the new one in force; the old table is freed after.
    """
    data = encode_table(snaps)
    if len(data) > MAX_TABLE_SIZE:
        raise BlockError(os.strerror(errno.EFBIG), errno.EFBIG)
    new_offset = _alloc(img, len(data))
    discard = img.opts.pass_discard_snapshot
    try:
        img.flush()
        img.check_overlap(new_offset, len(data))
        img.file.pwrite(new_offset, data)
        img.flush()
        img.file.pwrite(HEADER_SNAPSHOT_FIELDS, struct.pack(">IQ", len(snaps), new_offset))
        img.file.flush()
    except BlockError:
        if new_offset > 0:
            img.refcounts.free_clusters(new_offset, len(data), discard=True)
        raise
    old = img.snapshots
    img.hdr.nb_snapshots = len(snaps)
    img.hdr.snapshots_offset = new_offset
    img.snapshots = table_of(snaps, new_offset, len(data))
    img.snapshot_list = list(snaps)
    img.layout_changed()
    img.refcounts.free_clusters(old.offset, old.length, discard)
    # qcow2_free_clusters discards at once (no batch is open here).
    img.refcounts.process_discards()


def _new_id(snaps: list[Snapshot]) -> str:
    """find_new_snapshot_id: one more than the largest id (strtoul: leading digits)."""
    highest = 0
    for sn in snaps:
        text = sn.id_str.lstrip(" \t\n\r\f\v")
        digits = len(text) - len(text.lstrip("0123456789"))
        if digits and text[:digits].isascii():
            highest = max(highest, min(int(text[:digits]), (1 << 64) - 1))
    return str(highest + 1)


def find(snaps: list[Snapshot], snapshot_id: str | None, name: str | None) -> int:
    """find_snapshot_by_id_and_name: index of the match, or -1."""
    for i, sn in enumerate(snaps):
        if ((snapshot_id is None or sn.id_str == snapshot_id)
                and (name is None or sn.name == name)
                and (snapshot_id is not None or name is not None)):
            return i
    return -1


def _validate_l1(img: Qcow2Image, sn: Snapshot) -> None:
    # qcow2_validate_table(..., "Snapshot L1 table"): size limit, alignment, file end.
    if sn.l1_size > MAX_L1_BYTES // 8:
        raise BlockError("Snapshot L1 table too large", errno.EFBIG)
    if ((1 << 63) - 1 - sn.l1_size * 8 < sn.l1_offset or sn.l1_offset % img.cluster_size
            or sn.l1_offset + sn.l1_size * 8 > img.file.getlength()):
        raise BlockError("Snapshot L1 table offset invalid", errno.EINVAL)


def update_snapshot_refcount(img: Qcow2Image, l1_offset: int, l1_size: int, addend: int) -> None:
    """qcow2_update_snapshot_refcount: add ``addend`` (-1, 0, 1) to every cluster of a tree.

    Walks the L1 table at ``l1_offset`` (the in-memory one when it is the active table),
    changes the refcount of every data cluster, compressed range and L2 table it reaches
    by ``addend``, and sets COPIED exactly where the refcount is then 1. The L1 table is
    rewritten (durably) when its COPIED flags changed, unless it is being dropped.
    """
    active = l1_offset == img.hdr.l1_table_offset
    if active:
        l1 = img.l1
    else:
        l1 = be_array(img.file.pread(l1_offset, l1_size * 8))
    rc = img.refcounts
    discard = img.opts.pass_discard_snapshot
    l1_modified = False
    cb = img.cluster_bits
    for i in range(min(l1_size, len(l1))):
        old_l1 = l1[i]
        if not old_l1:
            continue
        l2_offset = old_l1 & L1E_OFFSET_MASK
        if l2_offset & (img.cluster_size - 1):
            raise Qcow2Corruption(f"L2 table offset {c_hex(l2_offset)} unaligned "
                                  f"(L1 index: {c_hex(i)})")
        if not l2_offset:
            continue
        for slice_no in range(img.cluster_size // img.slice_bytes):
            entry = img.l2_cache.get(l2_offset + slice_no * img.slice_bytes)
            entry.pins += 1
            try:
                _update_slice(img, entry, l2_offset, slice_no, addend, discard)
            finally:
                entry.pins -= 1
        if addend:
            rc.update(l2_offset >> cb, 1, addend, discard)
        new_l1 = l2_offset | (OFLAG_COPIED if rc.refcount(l2_offset >> cb) == 1 else 0)
        if new_l1 != old_l1:
            l1[i] = new_l1
            l1_modified = True
    img.flush()
    rc.process_discards()
    if addend >= 0 and l1_modified:
        img.check_overlap(l1_offset, l1_size * 8, OL.ACTIVE_L1 if active else OL.INACTIVE_L1)
        img.file.pwrite(l1_offset, be_bytes(l1[:l1_size]))
        img.file.flush()
    img.layout_changed()


def _update_slice(img: Qcow2Image, entry: CacheEntry[Any], l2_offset: int, slice_no: int,
                  addend: int, discard: bool) -> None:
    table = entry.table
    rc = img.refcounts
    cb = img.cluster_bits
    for j in range(img.slice_entries):
        old = table[j]
        value = old & ~OFLAG_COPIED
        ctype = cluster_type(value)
        if ctype == ClusterType.COMPRESSED:
            if addend:
                host, length = img.compressed.host_range(value)
                first = host >> cb
                rc.update(first, ((host + length - 1) >> cb) - first + 1, addend, discard)
            refcount = 2  # compressed clusters are never modified in place
        elif ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            host = value & L2E_OFFSET_MASK
            if host & (img.cluster_size - 1):
                raise Qcow2Corruption(
                    f"Cluster allocation offset {c_hex(host)} unaligned (L2 offset: "
                    f"{c_hex(l2_offset)}, L2 index: {c_hex(slice_no * img.slice_entries + j)})")
            if addend:
                rc.update(host >> cb, 1, addend, discard)
            refcount = rc.refcount(host >> cb)
        else:
            refcount = 0
        if refcount == 1:
            value |= OFLAG_COPIED
        if value != old:
            if addend > 0:
                img.l2_cache.set_dependency(rc.cache)
            table[j] = value
            entry.dirty = True


def create(img: Qcow2Image, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int,
           icount: int = NO_ICOUNT, vm_state_size: int = 0) -> Snapshot:
    """qcow2_snapshot_create; returns the new entry (its id is generated)."""
    snaps = load(img)
    if len(snaps) >= MAX_SNAPSHOTS:
        raise BlockError(os.strerror(errno.EFBIG), errno.EFBIG)
    if img.refcounts.codec.max_value < 2:
        # refcount_bits=1 cannot count a second reference: QEMU's update_refcount fails
        # with EINVAL on the first cluster; refused here before anything is allocated
        # (QEMU leaks the L1 copy it allocated first).
        raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
    l1_size = img.hdr.l1_size
    l1_bytes = be_bytes(img.l1[:l1_size])
    l1_offset = _alloc(img, len(l1_bytes))
    img.check_overlap(l1_offset, len(l1_bytes))
    img.file.pwrite(l1_offset, l1_bytes)
    # Every cluster gets its extra reference (durably) before any table points at the copy.
    update_snapshot_refcount(img, img.hdr.l1_table_offset, l1_size, 1)
    sn = Snapshot(l1_offset, l1_size, _new_id(snaps), name, vm_state_size, date_sec,
                  date_nsec, vm_clock_nsec, icount, img.virtual_size // 512 * 512, EXTRA_SIZE)
    write_table(img, [*snaps, sn])
    return sn


def goto(img: Qcow2Image, id_or_name: str) -> None:
    """qcow2_snapshot_goto: the active tree becomes the snapshot's (by id, else by name)."""
    snaps = load(img)
    index = find(snaps, id_or_name, None)
    if index < 0:
        index = find(snaps, None, id_or_name)
    if index < 0:
        raise BlockError(os.strerror(errno.ENOENT), errno.ENOENT)
    sn = snaps[index]
    _validate_l1(img, sn)
    if sn.disk_size != img.virtual_size // 512 * 512:
        # QEMU resizes the image first; qcow2 here does not resize.
        raise BlockError(os.strerror(errno.ENOTSUP), errno.ENOTSUP)
    if sn.l1_size > img.hdr.l1_size:
        grow_l1(img, sn.l1_size)
    cur = img.hdr.l1_size
    sn_l1 = img.file.pread(sn.l1_offset, sn.l1_size * 8)
    new_l1 = be_array(sn_l1 + bytes(cur * 8 - len(sn_l1)))
    update_snapshot_refcount(img, sn.l1_offset, sn.l1_size, 1)
    active = img.hdr.l1_table_offset
    img.check_overlap(active, cur * 8, OL.ACTIVE_L1)
    img.file.pwrite(active, be_bytes(new_l1))
    img.file.flush()
    # The old tree's references go (walked from the in-memory table, still the old one).
    try:
        update_snapshot_refcount(img, active, cur, -1)
    finally:
        img.l1[:] = new_l1
        img.layout_changed()
    update_snapshot_refcount(img, active, cur, 0)


def grow_l1(img: Qcow2Image, min_size: int, exact: bool = True) -> None:
    """qcow2_grow_l1_table: a bigger active L1 in new clusters, then the header.

    Not ``exact``, the size grows by half again until it is enough (fewer growths as
    the VM state is written cluster by cluster). The new table is durable before the
    12-byte header write (l1_size, l1_table_offset) switches to it; the old table is
    freed after.
    """
    old_offset, old_size = img.hdr.l1_table_offset, img.hdr.l1_size
    if min_size <= old_size:
        return
    if not exact:
        size = max(old_size, 1)
        while min_size > size:  # bounded: the size grows by half each pass
            size = (size * 3 + 1) // 2
        min_size = size
    if min_size > MAX_L1_BYTES // 8:
        raise BlockError(os.strerror(errno.EFBIG), errno.EFBIG)
    table = img.l1[:old_size]
    table.extend([0] * (min_size - old_size))
    new_offset = _alloc(img, min_size * 8)
    img.flush()
    img.check_overlap(new_offset, min_size * 8)
    img.file.pwrite(new_offset, be_bytes(table))
    img.file.flush()
    img.file.pwrite(36, struct.pack(">IQ", min_size, new_offset))
    img.file.flush()
    img.l1 = table
    img.hdr.l1_size = min_size
    img.hdr.l1_table_offset = new_offset
    img.layout_changed()
    img.refcounts.free_clusters(old_offset, old_size * 8, discard=img.opts.pass_discard_other)
    img.refcounts.process_discards()


def vm_state_offset(img: Qcow2Image) -> int:
    """qcow2_vm_state_offset: the VM state lives in the first L1 entry past the disk."""
    per_l1_entry = img.cluster_size << img.l2_bits
    return -(-img.virtual_size // per_l1_entry) * per_l1_entry


def save_vmstate(img: Qcow2Image, backing: ChildIO | None, data: bytes) -> None:
    """qcow2_save_vmstate: guest-style writes at the VM state offset (past the disk),
    the L1 table grown (not exactly) as get_cluster_table grows it."""
    if not data:
        return
    offset = vm_state_offset(img)
    last_l1 = (offset + len(data) - 1) >> (img.cluster_bits + img.l2_bits)
    grow_l1(img, last_l1 + 1, exact=False)
    datapath.write(img, backing, offset, data)


def read_vmstate(img: Qcow2Image, size: int) -> bytes:
    """qcow2_load_vmstate: ``size`` bytes at the VM state offset of the active tree
    (after goto, the snapshot's). One lookup per cluster, bounded by ``size``."""
    if size > MAX_VMSTATE:
        raise BlockError(os.strerror(errno.EFBIG), errno.EFBIG)
    offset = vm_state_offset(img)
    cs = img.cluster_size
    out = bytearray()
    pos = offset
    while pos < offset + size:
        cluster = pos >> img.cluster_bits
        l1_index = cluster >> img.l2_bits
        l2_index = cluster & img.l2_mask
        start = l2_index & ~img.slice_mask
        table = img.l2_slice(l1_index, start)
        count = min(cs - (pos & (cs - 1)), offset + size - pos)
        entry = 0 if table is None else table[l2_index - start]
        kind = cluster_type(entry)
        if kind == ClusterType.NORMAL:
            out += img.file.pread((entry & L2E_OFFSET_MASK) + (pos & (cs - 1)), count)
        elif kind == ClusterType.COMPRESSED:
            raise BlockError(os.strerror(errno.ENOTSUP), errno.ENOTSUP)
        else:
            out += bytes(count)
        pos += count
    return bytes(out)


def discard_vmstate(img: Qcow2Image, backing: ChildIO | None, size: int) -> None:
    """What qcow2_snapshot_create does last: the active tree drops its references to
    the VM state (zero clusters on v3), so the next snapshot does not copy it."""
    if size <= 0:
        return
    cs = img.cluster_size
    datapath.discard(img, backing, vm_state_offset(img), -(-size // cs) * cs)


def delete(img: Qcow2Image, snapshot_id: str | None, name: str | None) -> None:
    """qcow2_snapshot_delete, with its texts."""
    snaps = load(img)
    index = find(snaps, snapshot_id, name)
    if index < 0:
        raise BlockError("Can't find the snapshot", errno.ENOENT)
    sn = snaps[index]
    _validate_l1(img, sn)
    try:
        write_table(img, snaps[:index] + snaps[index + 1:])
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        code = exc.errno or errno.EIO
        raise BlockError(f"Failed to remove snapshot from snapshot list: {os.strerror(code)}",
                         code) from exc
    # From here on a failure only leaks clusters (QEMU's comment).
    try:
        update_snapshot_refcount(img, sn.l1_offset, sn.l1_size, -1)
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        code = exc.errno or errno.EIO
        raise BlockError(f"Failed to free the cluster and L1 table: {os.strerror(code)}",
                         code) from exc
    img.refcounts.free_clusters(sn.l1_offset, sn.l1_size * 8, img.opts.pass_discard_snapshot)
    img.refcounts.process_discards()
    try:
        update_snapshot_refcount(img, img.hdr.l1_table_offset, img.hdr.l1_size, 0)
    except Qcow2Corruption:
        raise
    except BlockError as exc:
        code = exc.errno or errno.EIO
        raise BlockError(f"Failed to update snapshot status in disk: {os.strerror(code)}",
                         code) from exc


__all__ = ["create", "delete", "discard_vmstate", "find", "goto", "grow_l1", "load",
           "read_vmstate", "save_vmstate", "update_snapshot_refcount", "vm_state_offset",
           "write_table"]
