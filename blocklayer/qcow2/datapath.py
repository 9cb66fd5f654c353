"""Guest reads, writes, write-zeroes and discards on top of the L2 mapping.

Runs of clusters that map to contiguous host ranges are transferred with one call.
Allocating writes follow QEMU's ``qcow2_alloc_cluster_link_l2``: allocate (refcount +1 in
the cache), write data plus COW padding, point the L2 entries at the new clusters (the
L2 cache now depends on the refcount cache), then drop the references to the old
clusters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..driver import ChildIO
from ..errors import BlockError
from .cache import CacheEntry
from .compress import decompress_cluster
from .errors import Qcow2Corruption
from .image import Qcow2Image
from .l2 import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, ClusterType, cluster_type

_INPLACE = 0  # standard cluster we own alone: overwrite where it is
_REUSE = 1  # preallocated zero cluster we own alone: fill it where it is
_NEW = 2  # everything else needs a newly allocated cluster
# Entries continue a contiguous standard run when these bits match (COPIED may differ).
_RUN_MASK = L2E_OFFSET_MASK | OFLAG_COMPRESSED | OFLAG_ZERO

if TYPE_CHECKING:
    from array import array

    L2Entry = CacheEntry[array[int]]


def _write_kind(entry: int) -> int:
    if entry & OFLAG_COPIED and entry & L2E_OFFSET_MASK and not entry & OFLAG_COMPRESSED:
        return _REUSE if entry & OFLAG_ZERO else _INPLACE
    return _NEW


def read_backing(backing: ChildIO | None, offset: int, length: int) -> bytes | None:
    """Backing data for an unallocated range; None when it reads as zeroes."""
    if backing is None:
        return None
    size = backing.getlength()
    if offset >= size:
        return None
    avail = min(length, size - offset)
    data = backing.pread(offset, avail)
    return data if avail == length else data + bytes(length - avail)


def _decompress(img: Qcow2Image, entry: int) -> bytes:
    offset, length = img.compressed.host_range(entry)
    cached = img.last_compressed
    if cached is not None and cached[0] == offset:
        return cached[1]
    data = decompress_cluster(img.file.pread(offset, length), img.cluster_size,
                              img.hdr.compression_type)
    img.last_compressed = (offset, data)
    return data


def _check_entry(img: Qcow2Image, entry: int, l1_index: int, index: int) -> None:
    if entry & OFLAG_ZERO and img.version < 3 and not entry & OFLAG_COMPRESSED:
        raise Qcow2Corruption(f"Zero cluster entry found in pre-v3 image "
                              f"(L1 index: {l1_index:#x}, L2 index: {index:#x})")
    if entry & L2E_OFFSET_MASK & (img.cluster_size - 1) and not entry & OFLAG_COMPRESSED:
        raise Qcow2Corruption(f"Cluster allocation offset {entry & L2E_OFFSET_MASK:#x} unaligned "
                              f"(L1 index: {l1_index:#x}, L2 index: {index:#x})")


# -- read ----------------------------------------------------------------------


def read(img: Qcow2Image, backing: ChildIO | None, offset: int, length: int) -> bytes:
    """Guest bytes [offset, offset+length); past the virtual size reads as zeroes."""
    end = min(offset + length, img.virtual_size)
    if offset >= end:
        return bytes(length)
    parts: list[bytes] = []
    cb = img.cluster_bits
    cs = img.cluster_size
    in_cluster = cs - 1
    pos = offset
    while pos < end:
        cluster = pos >> cb
        l1_index = cluster >> img.l2_bits
        l2_index = cluster & img.l2_mask
        slice_start = l2_index & ~img.slice_mask
        first = l2_index - slice_start
        chunk_end = min(end, (cluster - first + img.slice_entries) << cb)
        table = img.l2_slice(l1_index, slice_start)
        if table is None:
            data = read_backing(backing, pos, chunk_end - pos)
            parts.append(data if data is not None else bytes(chunk_end - pos))
            pos = chunk_end
            continue
        slice_cluster = cluster - first  # guest cluster number of table[0]
        limit = ((chunk_end - 1) >> cb) - slice_cluster + 1
        i = first
        while pos < chunk_end:
            entry = table[i]
            j = i + 1
            if entry & OFLAG_COMPRESSED:
                run_end = min(chunk_end, (pos | in_cluster) + 1)
                data = _decompress(img, entry)
                start = pos & in_cluster
                parts.append(data[start:start + run_end - pos])
            elif entry & (OFLAG_ZERO | L2E_OFFSET_MASK):
                _check_entry(img, entry, l1_index, i)
                if entry & OFLAG_ZERO:
                    while j < limit and table[j] & OFLAG_ZERO and not table[j] & OFLAG_COMPRESSED:
                        j += 1
                    run_end = min(chunk_end, (slice_cluster + j) << cb)
                    parts.append(bytes(run_end - pos))
                else:
                    host = entry & L2E_OFFSET_MASK
                    expect = host + cs
                    while j < limit and table[j] & _RUN_MASK == expect:
                        j += 1
                        expect += cs
                    run_end = min(chunk_end, (slice_cluster + j) << cb)
                    parts.append(img.file.pread(host + (pos & in_cluster), run_end - pos))
            else:
                while j < limit and not table[j] & ~OFLAG_COPIED:
                    j += 1
                run_end = min(chunk_end, (slice_cluster + j) << cb)
                data = read_backing(backing, pos, run_end - pos)
                parts.append(data if data is not None else bytes(run_end - pos))
            pos = run_end
            i = (pos >> cb) - slice_cluster
    if end < offset + length:
        parts.append(bytes(offset + length - end))
    return parts[0] if len(parts) == 1 else b"".join(parts)


# -- write ---------------------------------------------------------------------


def _cow_source(img: Qcow2Image, backing: ChildIO | None, entry: int, guest_cluster: int,
                start: int, length: int) -> bytes | None:
    """What a partially written cluster keeps outside the write; None means zeroes."""
    ctype = cluster_type(entry)
    if ctype == ClusterType.NORMAL:
        return img.file.pread((entry & L2E_OFFSET_MASK) + start, length)
    if ctype == ClusterType.COMPRESSED:
        return _decompress(img, entry)[start:start + length]
    if ctype == ClusterType.UNALLOCATED:
        return read_backing(backing, guest_cluster + start, length)
    return None


def _is_zero(data: bytes | None) -> bool:
    return data is None or data.count(0) == len(data)


def write(img: Qcow2Image, backing: ChildIO | None, offset: int, data: bytes) -> None:
    """Write guest data, allocating and COWing clusters as needed."""
    cb = img.cluster_bits
    cs = img.cluster_size
    total = len(data)
    pos = 0
    while pos < total:
        guest = offset + pos
        cluster = guest >> cb
        l2_index = cluster & img.l2_mask
        slice_start = l2_index & ~img.slice_mask
        first = l2_index - slice_start
        room = ((img.slice_entries - first) << cb) - (guest & (cs - 1))
        count = min(total - pos, room)
        entry = img.l2_slice_for_write(cluster >> img.l2_bits, slice_start)
        entry.pins += 1
        try:
            _write_in_slice(img, backing, entry, first, guest, data, pos, count)
        finally:
            entry.pins -= 1
        pos += count
    if img.refcounts.pending_discards:
        img.refcounts.process_discards()


def _write_in_slice(img: Qcow2Image, backing: ChildIO | None, entry: L2Entry, first: int,
                    guest: int, data: bytes, dpos: int, count: int) -> None:
    cb = img.cluster_bits
    cs = img.cluster_size
    table = entry.table
    base = guest & ~(cs - 1)
    nclusters = ((guest - base) + count + cs - 1) >> cb
    end = guest + count
    i = 0
    while i < nclusters:
        kind = _write_kind(table[first + i])
        j = i + 1
        if kind == _NEW:
            while j < nclusters and _write_kind(table[first + j]) == _NEW:
                j += 1
        else:
            host = table[first + i] & L2E_OFFSET_MASK
            while (j < nclusters and _write_kind(table[first + j]) == kind
                   and table[first + j] & L2E_OFFSET_MASK == host + ((j - i) << cb)):
                j += 1
        g0 = max(guest, base + (i << cb))
        g1 = min(end, base + (j << cb))
        d0 = dpos + g0 - guest
        payload = data if d0 == 0 and g1 - g0 == len(data) else data[d0:d0 + g1 - g0]
        if kind == _INPLACE:
            img.check_overlap(host + g0 - base - (i << cb), len(payload))
            img.file.pwrite(host + g0 - base - (i << cb), payload)
        else:
            old = [table[first + k] for k in range(i, j)]
            if kind == _NEW:
                host = img.refcounts.alloc(j - i)
            _fill_clusters(img, backing, host, base + (i << cb), j - i, g0, g1, payload,
                           old[0], old[-1])
            if kind == _NEW:
                if img.use_lazy_refcounts:
                    img.mark_dirty()
                if img.need_accurate_refcounts:
                    # Before touching the table: setting the dependency may write the
                    # L2 cache, which must not yet hold entries for the new clusters.
                    img.l2_cache.set_dependency(img.refcounts.cache)
            for k in range(i, j):
                table[first + k] = (host + ((k - i) << cb)) | OFLAG_COPIED
            entry.dirty = True
            if kind == _NEW:
                for old_entry in old:
                    free_entry(img, old_entry, discard=False)
        i = j


def _fill_clusters(img: Qcow2Image, backing: ChildIO | None, host: int, cluster_guest: int,
                   count: int, g0: int, g1: int, payload: bytes, old_first: int,
                   old_last: int) -> None:
    cs = img.cluster_size
    img.check_overlap(host, count * cs)
    head_len = g0 - cluster_guest
    tail_len = cluster_guest + (count * cs) - g1
    head = _cow_source(img, backing, old_first, cluster_guest, 0, head_len) if head_len else None
    tail_start = cs - tail_len
    tail = (_cow_source(img, backing, old_last, cluster_guest + (count - 1) * cs, tail_start,
                        tail_len) if tail_len else None)
    if host >= img.file.end() and _is_zero(head) and _is_zero(tail):
        # Past the end of the file everything already reads as zeroes.
        img.file.pwrite(host + head_len, payload)
        return
    if head_len or tail_len:
        buf = b"".join((head if head is not None else bytes(head_len), payload,
                        tail if tail is not None else bytes(tail_len)))
        img.file.pwrite(host, buf)
        # The COW data must be durable before an L2 entry points at it.
        img.l2_cache.depends_on_flush = True
    else:
        img.file.pwrite(host, payload)


def free_entry(img: Qcow2Image, entry: int, discard: bool) -> None:
    """Drop the reference an L2 entry holds (data cluster or compressed range)."""
    if entry & OFLAG_COMPRESSED:
        offset, length = img.compressed.host_range(entry)
        img.refcounts.free_clusters(offset, length, discard)
    elif entry & L2E_OFFSET_MASK:
        img.refcounts.free_clusters(entry & L2E_OFFSET_MASK, img.cluster_size, discard)


# -- write zeroes / discard ---------------------------------------------------------


def _reads_as_zero(img: Qcow2Image, backing: ChildIO | None, cluster_guest: int) -> bool:
    cluster = cluster_guest >> img.cluster_bits
    l2_index = cluster & img.l2_mask
    slice_start = l2_index & ~img.slice_mask
    table = img.l2_slice(cluster >> img.l2_bits, slice_start)
    ctype = ClusterType.UNALLOCATED if table is None else cluster_type(table[l2_index - slice_start])
    if ctype in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
        return True
    if ctype == ClusterType.UNALLOCATED:
        return backing is None or cluster_guest >= backing.getlength()
    return False


def write_zeroes(img: Qcow2Image, backing: ChildIO | None, offset: int, length: int,
                 may_unmap: bool) -> None:
    """Zero clusters for whole clusters, explicit zeroes for partial ones.

    v2 has no zero flag; like QEMU it deallocates whole clusters instead when there is no
    backing file (they then read as zeroes) and writes zeroes otherwise.
    """
    if img.version < 3 and backing is not None:
        _write_zero_buffers(img, backing, offset, length)
        return
    cs = img.cluster_size
    end = offset + length
    start_aligned = -(-offset // cs) * cs
    end_aligned = end if end == img.virtual_size else end // cs * cs
    if start_aligned >= end_aligned:
        _zero_partial(img, backing, offset, end)
        return
    if offset < start_aligned:
        _zero_partial(img, backing, offset, start_aligned)
    if end_aligned < end:
        _zero_partial(img, backing, end_aligned, end)
    if img.version < 3:
        _for_each_slice(img, start_aligned, end_aligned, lambda e, f, n: _discard_slice(
            img, backing, e, f, n), allocate=False)
    else:
        _for_each_slice(img, start_aligned, end_aligned, lambda e, f, n: _zero_slice(
            img, e, f, n, may_unmap), allocate=True)
    img.refcounts.process_discards()


def _write_zero_buffers(img: Qcow2Image, backing: ChildIO | None, offset: int,
                        length: int) -> None:
    chunk = 1 << 20
    zeroes = bytes(min(chunk, length))
    pos = offset
    while pos < offset + length:
        count = min(chunk, offset + length - pos)
        write(img, backing, pos, zeroes if count == len(zeroes) else bytes(count))
        pos += count


def _zero_partial(img: Qcow2Image, backing: ChildIO | None, start: int, end: int) -> None:
    cs = img.cluster_size
    pos = start
    while pos < end:
        stop = min(end, (pos | (cs - 1)) + 1)
        if not _reads_as_zero(img, backing, pos & ~(cs - 1)):
            write(img, backing, pos, bytes(stop - pos))
        pos = stop


def _for_each_slice(img: Qcow2Image, start: int, end: int,
                    fn: Callable[[L2Entry, int, int], None], allocate: bool,
                    backing: ChildIO | None = None) -> None:
    cb = img.cluster_bits
    cluster = start >> cb
    last = (end - 1) >> cb
    while cluster <= last:
        l1_index = cluster >> img.l2_bits
        l2_index = cluster & img.l2_mask
        slice_start = l2_index & ~img.slice_mask
        first = l2_index - slice_start
        count = min(last + 1 - cluster, img.slice_entries - first)
        if allocate or img.l2_table_offset(l1_index) or backing is not None:
            entry = img.l2_slice_for_write(l1_index, slice_start)
            entry.pins += 1
            try:
                fn(entry, first, count)
            finally:
                entry.pins -= 1
        cluster += count


def _zero_slice(img: Qcow2Image, entry: L2Entry, first: int, count: int, may_unmap: bool) -> None:
    table = entry.table
    keep_refs = img.opts.discard_no_unref
    for i in range(first, first + count):
        old = table[i]
        ctype = cluster_type(old)
        unmap = ctype == ClusterType.COMPRESSED or (may_unmap and ctype in (
            ClusterType.NORMAL, ClusterType.ZERO_ALLOC))
        if ctype == ClusterType.ZERO_PLAIN or (ctype == ClusterType.ZERO_ALLOC and not unmap):
            continue
        keep = keep_refs and ctype != ClusterType.COMPRESSED
        new = 0 if unmap and not keep else old
        table[i] = new | OFLAG_ZERO
        entry.dirty = True
        if unmap and not keep:
            free_entry(img, old, img.opts.pass_discard_request)


def discard(img: Qcow2Image, backing: ChildIO | None, offset: int, length: int) -> None:
    """Deallocate whole clusters: v3 leaves zero clusters, v2 unallocated ones."""
    if img.version < 3 and backing is not None:
        return  # QEMU: -ENOTSUP, since v2 cannot keep the backing file masked
    cs = img.cluster_size
    end = offset + length
    start = -(-offset // cs) * cs
    stop = end if end == img.virtual_size else end // cs * cs
    if start >= stop:
        return
    _for_each_slice(img, start, stop, lambda e, f, n: _discard_slice(img, backing, e, f, n),
                    allocate=False, backing=backing)
    img.refcounts.process_discards()


def _discard_slice(img: Qcow2Image, backing: ChildIO | None, entry: L2Entry, first: int,
                   count: int) -> None:
    table = entry.table
    keep_refs = img.opts.discard_no_unref and img.version >= 3
    zero = OFLAG_ZERO if img.version >= 3 else 0
    for i in range(first, first + count):
        old = table[i]
        ctype = cluster_type(old)
        if ctype == ClusterType.UNALLOCATED and backing is None:
            continue
        if ctype == ClusterType.ZERO_PLAIN:
            continue
        if ctype != ClusterType.UNALLOCATED and keep_refs and ctype != ClusterType.COMPRESSED:
            table[i] = old | OFLAG_ZERO
            entry.dirty = True
            if old & OFLAG_COPIED:
                # Only a cluster this tree owns alone may lose its data: without COPIED
                # an internal snapshot still reads it (refcount > 1).
                try:
                    img.file.pdiscard(old & L2E_OFFSET_MASK, img.cluster_size)
                except BlockError:
                    pass
            continue
        table[i] = zero
        entry.dirty = True
        free_entry(img, old, img.opts.pass_discard_request)


def full_discard(img: Qcow2Image, start: int, end: int) -> None:
    """qcow2_cluster_discard(full_discard=true, QCOW2_DISCARD_ALWAYS), used when an
    image shrinks: every entry of the clusters in [start, end) becomes unallocated
    (never a zero cluster: the area leaves the image) and drops its reference; a host
    cluster freed by that is punched in the file when the file allows discards. Like
    QEMU's get_cluster_table, every L2 table of the range is made writable first: a
    missing one is allocated (empty) and one an internal snapshot shares is copied, so the
    clusters the image ends up with are QEMU's (the L1 entries past the new end free
    them again)."""
    if start >= end:
        return
    _for_each_slice(img, start, end, lambda e, f, n: _unallocate_slice(img, e, f, n),
                    allocate=True)
    img.refcounts.process_discards()


def _unallocate_slice(img: Qcow2Image, entry: L2Entry, first: int, count: int) -> None:
    table = entry.table
    for i in range(first, first + count):
        old = table[i]
        if not old:
            continue
        table[i] = 0
        entry.dirty = True
        free_entry(img, old, True)
