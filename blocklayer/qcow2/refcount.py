"""Reference counts: lookup, first-fit allocation, updates and reftable growth.

The refcount table is held in memory (trimmed of its zero tail) and written through;
refcount blocks live in a :class:`MetadataCache`. Allocation scans the refcounts *as the
cache holds them*, so a cluster whose refcount was raised but not yet written is never
handed out twice, and new metadata is always made durable before anything points at it:

* a new refblock: its own refcount (if described elsewhere) is flushed, the block is
  written and flushed, then the 8-byte reftable entry is written and flushed;
* a bigger reftable: new refblocks and table go past everything the old table covers,
  describing themselves, are flushed, then one 12-byte header write switches to them.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from collections.abc import Callable
from typing import Any

from ..driver import ChildIO
from ..errors import BlockError
from . import overlap as OL
from .cache import MetadataCache
from .errors import Qcow2Corruption, c_hex
from .tables import U64, RefBlock, RefBlockCodec, be_bytes, used_length

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
#: QEMU's QCOW_MAX_CLUSTER_OFFSET: no cluster is ever allocated at or past it.
MAX_CLUSTER_OFFSET = (1 << 56) - 1


class RefcountManager:
    """Refcounts of one open image."""

    def __init__(self, file: ChildIO, cluster_bits: int, codec: RefBlockCodec,
                 reftable: array[int], reftable_offset: int, reftable_clusters: int,
                 cache_capacity: int, l2_cache: MetadataCache[Any],
                 on_reftable_moved: Callable[[int, int], None]) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.codec = codec
        self.block_bits = (codec.entries - 1).bit_length()
        self.block_mask = codec.entries - 1
        self.reftable = reftable
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self.reftable_size = reftable_clusters * self.cluster_size // 8
        self.free_index = 0
        self.l2_cache = l2_cache
        self.cache: MetadataCache[RefBlock] = MetadataCache(
            file, cache_capacity, self.cluster_size, codec.decode, codec.encode)
        self._on_reftable_moved = on_reftable_moved
        self.pending_discards: list[tuple[int, int]] = []
        self.discard_cluster_hook: Callable[[int], None] | None = None
        self.layout_hook: Callable[[], None] | None = None
        #: The image's pre-write overlap check (offset, length, kinds to ignore).
        self.overlap_check: Callable[[int, int, int], None] | None = None

    # -- lookup ----------------------------------------------------------------

    def block_offset(self, block_index: int) -> int:
        """Host offset of refcount block ``block_index``, 0 if there is none."""
        if block_index >= len(self.reftable):
            return 0
        # Reserved bits are ignored here, as QEMU's qcow2_get_refcount does (only
        # qemu-img check reports them).
        offset = self.reftable[block_index] & REFT_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise Qcow2Corruption(f"Refblock offset {c_hex(offset)} unaligned "
                                  f"(reftable index: {c_hex(block_index)})")
        return offset

    def refcount(self, cluster: int) -> int:
        """Refcount of host cluster ``cluster`` (as cached, i.e. the current truth)."""
        off = self.block_offset(cluster >> self.block_bits)
        if not off:
            return 0
        return self.cache.get(off).table.get(cluster & self.block_mask)

    # -- allocation ------------------------------------------------------------

    def alloc(self, count: int) -> int:
        """Allocate ``count`` contiguous clusters (refcount 1); return the host offset.

        As QEMU's qcow2_alloc_clusters: find a free run, create the refblocks it needs
        and, when that allocated anything, search again from the same start (the new
        refblock may sit in the run). Each retry adds a refblock (or a bigger table), so
        the retries are bounded by the run's refblocks; a search that still does not
        settle means refcounts that contradict themselves, and fails instead of looping.
        """
        for _ in range((count >> self.block_bits) + 16):
            start = self._find_free_run(count)
            self.free_index = start + count
            if self._ensure_blocks(start, count):
                self.free_index = min(self.free_index, start)
                continue
            self.update(start, count, 1)
            self._cancel_discards(start << self.cluster_bits, count << self.cluster_bits)
            return start << self.cluster_bits
        raise Qcow2Corruption("Refcount structures keep changing while allocating clusters")

    def _find_free_run(self, count: int) -> int:
        index = self.free_index
        limit = (MAX_CLUSTER_OFFSET >> self.cluster_bits) + 1
        # Every pass moves ``index`` forward, and past the refcount table everything is
        # free, so this ends; the limit is QEMU's -EFBIG for a run past the largest offset.
        while index + count <= limit:
            index = self._next_free(index)
            used = self._first_used(index, index + count)
            if used < 0:
                if index + count > limit:
                    break
                return index
            index = used + 1
        raise BlockError(os.strerror(errno.EFBIG), errno.EFBIG)

    def _next_free(self, index: int) -> int:
        while True:
            off = self.block_offset(index >> self.block_bits)
            if not off:
                return index
            block = self.cache.get(off).table
            found = block.find_zero(index & self.block_mask)
            if found >= 0:
                return (index & ~self.block_mask) + found
            index = (index | self.block_mask) + 1

    def _first_used(self, start: int, stop: int) -> int:
        index = start
        while index < stop:
            block_start = index & ~self.block_mask
            end = min(stop, block_start + self.codec.entries)
            off = self.block_offset(index >> self.block_bits)
            if off:
                found = self.cache.get(off).table.find_nonzero(index - block_start, end - block_start)
                if found >= 0:
                    return block_start + found
            index = end
        return -1

    def _ensure_blocks(self, start: int, count: int) -> bool:
        """Create missing refblocks for the run; True if any metadata was allocated."""
        for block in range(start >> self.block_bits, ((start + count - 1) >> self.block_bits) + 1):
            if not self.block_offset(block):
                self._alloc_block(block)
                return True
        return False

    def _alloc_block(self, block_index: int) -> None:
        if block_index >= self.reftable_size:
            self._grow_reftable(block_index)
            return
        # Anything that could point at a cluster we are about to reuse must be on disk
        # first; flushing the L2 cache flushes the refcounts it depends on as well.
        self.l2_cache.flush()
        self.cache.flush()
        cluster = self._next_free(self.free_index)
        if cluster == 0:
            # Cluster 0 is the header: free refcounts there mean broken refcounts
            # (QEMU's alloc_refcount_block refuses the same way).
            raise Qcow2Corruption("Preventing invalid allocation of refcount block at offset 0")
        self.free_index = cluster + 1
        owner = cluster >> self.block_bits
        if owner != block_index and not self.block_offset(owner):
            self._alloc_block(owner)
            return
        block = self.codec.empty()
        if owner == block_index:
            block.set(cluster & self.block_mask, 1)
        else:
            self.update(cluster, 1, 1)
            self.cache.flush()
        offset = cluster << self.cluster_bits
        entry_offset = self.reftable_offset + 8 * block_index
        self._check_overlap(offset, self.cluster_size, OL.REFCOUNT_BLOCK)
        self._check_overlap(entry_offset, 8, OL.REFCOUNT_TABLE)
        self.file.pwrite(offset, self.codec.encode(block))
        self.file.flush()
        self.cache.put(offset, block, dirty=False)
        self._set_reftable_entry(block_index, offset)
        self.file.pwrite(entry_offset, struct.pack(">Q", offset))
        self.file.flush()
        if self.layout_hook is not None:
            self.layout_hook()

    def _check_overlap(self, offset: int, length: int, ignore: int) -> None:
        if self.overlap_check is not None:
            self.overlap_check(offset, length, ignore)

    def _set_reftable_entry(self, index: int, value: int) -> None:
        if index >= len(self.reftable):
            self.reftable.extend([0] * (index + 1 - len(self.reftable)))
        self.reftable[index] = value

    def _grow_reftable(self, block_index: int) -> None:
        cs = self.cluster_size
        per_block = self.codec.entries
        old_size = self.reftable_size
        area = old_size * per_block
        new_blocks = 1
        while True:
            want = max(block_index + 1, old_size + new_blocks)
            entries = want + want // 2
            table_clusters = -(-entries * 8 // cs)
            entries = table_clusters * cs // 8
            meta = new_blocks + table_clusters
            needed_blocks = -(-meta // per_block)
            if needed_blocks <= new_blocks and entries >= old_size + new_blocks:
                break
            new_blocks = needed_blocks
        if entries * 8 > 8 << 20:
            raise BlockError("Could not grow the refcount table: image too large", errno.EFBIG)
        blocks = [self.codec.empty() for _ in range(new_blocks)]
        for i in range(new_blocks + table_clusters):
            blocks[i // per_block].set(i % per_block, 1)
        self._check_overlap(area * cs, (new_blocks + table_clusters) * cs,
                            OL.REFCOUNT_BLOCK | OL.REFCOUNT_TABLE)
        self.file.pwrite(area * cs, b"".join(self.codec.encode(b) for b in blocks))
        table = array(U64, self.reftable)
        table.extend([0] * (entries - len(table)))
        for i in range(new_blocks):
            table[old_size + i] = (area + i) * cs
        table_offset = (area + new_blocks) * cs
        self.file.pwrite(table_offset, be_bytes(table))
        self.file.flush()
        self.file.pwrite(48, struct.pack(">QI", table_offset, table_clusters))
        self.file.flush()
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        used = used_length(be_bytes(table))
        self.reftable = table[: (used + 7) // 8]
        self.reftable_offset = table_offset
        self.reftable_clusters = table_clusters
        self.reftable_size = entries
        self._on_reftable_moved(table_offset, table_clusters)
        if self.layout_hook is not None:
            self.layout_hook()
        for i, block in enumerate(blocks):
            self.cache.put((area + i) * cs, block, dirty=False)
        self.free_clusters(old_offset, old_clusters * cs, discard=False)

    # -- updates ---------------------------------------------------------------

    def update(self, cluster: int, count: int, delta: int, discard: bool = False) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster``.

        Decrements first make the refcount cache depend on the L2 cache, so that the L2
        change that dropped a reference reaches the disk before the lower refcount.
        """
        if delta < 0:
            self.cache.set_dependency(self.l2_cache)
        index = cluster
        end = cluster + count
        max_value = self.codec.max_value
        while index < end:
            block_index = index >> self.block_bits
            off = self.block_offset(block_index)
            if not off:
                raise Qcow2Corruption(f"Refcount block for cluster {c_hex(index)} missing")
            entry = self.cache.get(off)
            block = entry.table
            stop = min(end, (block_index + 1) << self.block_bits)
            base = block_index << self.block_bits
            for i in range(index - base, stop - base):
                value = block.get(i) + delta
                if value < 0 or value > max_value:
                    raise Qcow2Corruption(
                        f"Refcount of cluster {c_hex(base + i)} would become {value} "
                        f"(allowed 0..{max_value})")
                block.set(i, value)
                if value == 0:
                    self._freed(base + i, discard)
            entry.dirty = True
            index = stop

    def _freed(self, cluster: int, discard: bool) -> None:
        if cluster < self.free_index:
            self.free_index = cluster
        offset = cluster << self.cluster_bits
        # A freed cluster may have been a table; a stale cached copy must never be
        # written back over whatever the cluster holds next.
        self.cache.discard(offset)
        if self.discard_cluster_hook is not None:
            self.discard_cluster_hook(offset)
        if discard:
            self._add_discard(offset, self.cluster_size)

    def free_clusters(self, offset: int, length: int, discard: bool) -> None:
        """Drop one reference from every cluster touching [offset, offset+length)."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        self.update(first, last - first + 1, -1, discard)

    # -- discards ----------------------------------------------------------------

    def _add_discard(self, offset: int, length: int) -> None:
        if self.pending_discards:
            last_off, last_len = self.pending_discards[-1]
            if last_off + last_len == offset:
                self.pending_discards[-1] = (last_off, last_len + length)
                return
        self.pending_discards.append((offset, length))

    def _cancel_discards(self, offset: int, length: int) -> None:
        if not self.pending_discards:
            return
        end = offset + length
        kept: list[tuple[int, int]] = []
        for d_off, d_len in self.pending_discards:
            d_end = d_off + d_len
            if d_end <= offset or d_off >= end:
                kept.append((d_off, d_len))
                continue
            if d_off < offset:
                kept.append((d_off, offset - d_off))
            if d_end > end:
                kept.append((end, d_end - end))
        self.pending_discards = kept

    def process_discards(self) -> None:
        """Punch the clusters freed by the last operation (advisory; errors ignored)."""
        pending, self.pending_discards = self.pending_discards, []
        for offset, length in sorted(pending):
            try:
                self.file.pdiscard(offset, length)
            except BlockError:
                pass

    # -- write-back --------------------------------------------------------------

    def clear(self) -> None:
        """Forget cached blocks and pending discards without writing."""
        self.cache.clear()
        self.pending_discards = []
