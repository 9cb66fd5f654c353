"""The state of one open qcow2 image: header, L1, caches, refcounts.

:func:`open_image` is QEMU's ``qcow2_do_open``: it reads and validates the header,
reads the L1 and refcount tables, sizes the caches, clears autoclear bits and repairs a
dirty image when writable. Invalidation builds a fresh :class:`Qcow2Image` from the same
file, which is exactly QEMU's close-and-reopen of the driver state.

Metadata write ordering: refcounts before the L2 entries that use them (cache
dependency), a new L2 table durable before the L1 entry pointing at it, L1 entries
written through with a flush.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Mapping
from typing import Any

from ..driver import ChildIO
from ..errors import BlockError
from . import header as H
from .cache import CacheEntry, CleanTimer, MetadataCache
from .errors import Qcow2Corruption
from .l2 import L1E_OFFSET_MASK, OFLAG_COPIED, CompressedLayout
from .options import Qcow2Options, cache_sizes, parse_options
from .refcount import REFT_OFFSET_MASK, RefcountManager
from .tables import U64, RefBlockCodec, be_array, be_array_trimmed, be_bytes
from .tracked import TrackedFile

#: How much of cluster 0 is read first (more only if the header goes on past it).
HEADER_READ = 4096


def read_header(file: TrackedFile) -> H.Header:
    """Read cluster 0 (only as much of it as needed) and parse it."""
    length = HEADER_READ
    for _ in range(3):
        try:
            return H.parse_header(file.pread(0, length))
        except H.NeedMoreHeader as more:
            if more.length <= length:
                break
            length = more.length
    raise BlockError("Could not read qcow2 header", errno.EIO)


def check_features(hdr: H.Header, writable_open: bool) -> None:
    """Refuse what QEMU refuses, and what we do not implement, with a clear text."""
    unsupported = hdr.incompatible_features & (H.INCOMPAT_DATA_FILE | H.INCOMPAT_EXTL2)
    if unsupported:
        raise H.unsupported_features(hdr, unsupported)
    if hdr.incompatible_features & H.INCOMPAT_CORRUPT and writable_open:
        raise BlockError("qcow2: Image is corrupt; cannot be opened read/write", errno.EACCES)
    if hdr.refcount_order > 6:
        raise BlockError("Reference count entry width too large; may not exceed 64 bits",
                         errno.EINVAL)
    if hdr.crypt_method == H.CRYPT_AES:
        raise BlockError("Use of AES-CBC encrypted qcow2 images is no longer supported in "
                         "system emulators", errno.ENOSYS)
    if hdr.crypt_method == H.CRYPT_LUKS:
        raise BlockError("Encrypted qcow2 images (LUKS) are not supported", errno.ENOTSUP)
    if hdr.crypt_method != H.CRYPT_NONE:
        raise BlockError(f"Unsupported encryption method {hdr.crypt_method}", errno.EINVAL)
    H.validate_tables(hdr)


def check_option_conflicts(hdr: H.Header, options: Mapping[str, Any], opts: Qcow2Options) -> None:
    """Options that contradict the image (QEMU's texts)."""
    if opts.lazy_refcounts and hdr.version < 3:
        raise BlockError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                         "compatibility level", errno.EINVAL)
    encrypt = options.get("encrypt")
    if encrypt is not None:
        fmt = encrypt.get("format") if isinstance(encrypt, Mapping) else encrypt
        raise BlockError(f"No encryption in image header, but options specified format '{fmt}'",
                         errno.EINVAL)
    if options.get("data-file") is not None:
        raise BlockError("'data-file' can only be set for images with an external data file",
                         errno.EINVAL)
    if hdr.autoclear_features & H.AUTOCLEAR_DATA_FILE_RAW:
        raise BlockError("data-file-raw requires a data file", errno.EINVAL)


class Qcow2Image:
    """Metadata state of one open image (everything QEMU's BDRVQcow2State holds)."""

    def __init__(self, file: TrackedFile, hdr: H.Header, opts: Qcow2Options,
                 l1: array[int], writable: bool) -> None:
        self.file = file
        self.hdr = hdr
        self.opts = opts
        self.writable = writable
        self.version = hdr.version
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = cs = hdr.cluster_size
        self.l2_bits = hdr.cluster_bits - 3
        self.l2_entries = cs // 8
        self.l2_mask = self.l2_entries - 1
        self.virtual_size = hdr.size
        self.l1 = l1
        self.compressed = CompressedLayout(hdr.cluster_bits)
        self.use_lazy_refcounts = (opts.lazy_refcounts if opts.lazy_refcounts is not None
                                   else bool(hdr.compatible_features & H.COMPAT_LAZY_REFCOUNTS))
        sizes = cache_sizes(opts, cs, hdr.size)
        self.slice_bytes = sizes.l2_entry_size
        self.slice_entries = sizes.l2_entry_size // 8
        self.slice_mask = self.slice_entries - 1
        self.l2_cache: MetadataCache[array[int]] = MetadataCache(
            file, sizes.l2_entries, self.slice_bytes, be_array, be_bytes)
        reftable = be_array_trimmed(
            file.pread(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs))
        self.refcounts = RefcountManager(
            file, hdr.cluster_bits, RefBlockCodec(hdr.refcount_order, cs), reftable,
            hdr.refcount_table_offset, hdr.refcount_table_clusters, sizes.refcount_entries,
            self.l2_cache, self._reftable_moved)
        self.refcounts.discard_cluster_hook = self._forget_l2_cluster
        self.refcounts.layout_hook = self._layout_changed
        self._metadata_clusters: dict[int, str] | None = None
        self.clean_timer = CleanTimer(opts.cache_clean_interval)
        self.last_compressed: tuple[int, bytes] | None = None

    # -- header ----------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """The dirty bit as this node last wrote or read it."""
        return bool(self.hdr.incompatible_features & H.INCOMPAT_DIRTY)

    @property
    def need_accurate_refcounts(self) -> bool:
        """False while lazy refcounts let on-disk refcounts lag (image marked dirty)."""
        return not self.dirty

    def _layout_changed(self) -> None:
        self._metadata_clusters = None

    def _build_metadata_map(self) -> dict[int, str]:
        cb = self.cluster_bits
        found: dict[int, str] = {0: "qcow2_header"}

        def add(offset: int, length: int, name: str) -> None:
            for cluster in range(offset >> cb, ((offset + max(length, 1) - 1) >> cb) + 1):
                found[cluster] = name

        add(self.hdr.l1_table_offset, self.hdr.l1_size * 8, "active L1 table")
        rc = self.refcounts
        add(rc.reftable_offset, rc.reftable_clusters << cb, "refcount table")
        if self.hdr.nb_snapshots:
            add(self.hdr.snapshots_offset, 1, "snapshot table")
        if self.opts.overlap_check != "constant":
            for entry in self.l1:
                if entry & L1E_OFFSET_MASK:
                    found[(entry & L1E_OFFSET_MASK) >> cb] = "active L2 table"
            for entry in rc.reftable:
                if entry & REFT_OFFSET_MASK:
                    found[(entry & REFT_OFFSET_MASK) >> cb] = "refcount block"
        return found

    def check_overlap(self, offset: int, length: int) -> None:
        """QEMU's pre-write overlap check: guest data must never land on metadata.

        ``constant`` covers the header, L1, refcount table and snapshot table;
        ``cached`` (the default) and ``all`` add every active L2 table and refblock.
        """
        if self.opts.overlap_check == "none" or length <= 0:
            return
        meta = self._metadata_clusters
        if meta is None:
            meta = self._metadata_clusters = self._build_metadata_map()
        cb = self.cluster_bits
        for cluster in range(offset >> cb, ((offset + length - 1) >> cb) + 1):
            name = meta.get(cluster)
            if name is not None:
                raise Qcow2Corruption(
                    f"Preventing invalid write on metadata (overlaps with {name})")

    def _reftable_moved(self, offset: int, clusters: int) -> None:
        self.hdr.refcount_table_offset = offset
        self.hdr.refcount_table_clusters = clusters

    def _forget_l2_cluster(self, offset: int) -> None:
        for pos in range(offset, offset + self.cluster_size, self.slice_bytes):
            self.l2_cache.discard(pos)

    def update_header(self) -> None:
        """Rewrite cluster 0 from the in-memory header (QEMU's qcow2_update_header)."""
        self.file.pwrite(0, H.serialize_header(self.hdr))

    def mark_dirty(self) -> None:
        """Set the dirty bit on disk (8-byte write + flush) before refcounts may lag."""
        if self.dirty or self.version < 3:
            return
        value = self.hdr.incompatible_features | H.INCOMPAT_DIRTY
        self.file.pwrite(72, struct.pack(">Q", value))
        self.file.flush()
        self.hdr.incompatible_features = value

    def mark_clean(self) -> None:
        """Write all refcounts, then clear the dirty bit with a header rewrite."""
        if not self.dirty:
            return
        self.hdr.incompatible_features &= ~H.INCOMPAT_DIRTY
        self.flush_caches()
        self.update_header()

    def mark_corrupt(self) -> None:
        """Set the corrupt bit so nobody writes to the image again before a repair."""
        if self.version >= 3 and self.writable:
            self.hdr.incompatible_features |= H.INCOMPAT_CORRUPT
            try:
                self.update_header()
                self.file.flush()
            except BlockError:
                pass
        self.writable = False

    # -- caches ----------------------------------------------------------------

    def write_caches(self) -> None:
        """Write L2 slices, then (unless lazily dirty) refcount blocks; no flush."""
        self.l2_cache.write()
        if self.need_accurate_refcounts:
            self.refcounts.cache.write()

    def flush_caches(self) -> None:
        """Write both caches in dependency order and flush the file."""
        self.l2_cache.write()
        self.refcounts.cache.write()
        self.file.flush()

    def flush(self) -> None:
        """The node's flush: write back caches, then make the file durable."""
        if not self.writable:
            return
        self.write_caches()
        self.file.flush()

    def inactivate(self) -> None:
        """Write everything back, clear the dirty bit, make it durable, stop writing."""
        if self.writable:
            self.l2_cache.flush()
            self.refcounts.cache.flush()
            self.mark_clean()
            self.file.flush()
        self.writable = False

    def maybe_clean_caches(self) -> None:
        """Drop unused clean cache entries every cache-clean-interval seconds."""
        if self.clean_timer.due():
            self.l2_cache.clean_unused()
            self.refcounts.cache.clean_unused()

    def drop(self) -> None:
        """Release memory without writing anything."""
        self.l2_cache.clear()
        self.refcounts.clear()
        self.last_compressed = None

    # -- L1 / L2 -----------------------------------------------------------------

    def l2_table_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for ``l1_index``, 0 if unallocated."""
        if l1_index >= len(self.l1):
            return 0
        offset: int = self.l1[l1_index] & L1E_OFFSET_MASK
        if offset & (self.cluster_size - 1):
            raise Qcow2Corruption(f"L2 table offset {offset:#x} unaligned (L1 index: {l1_index:#x})")
        return offset

    def l2_slice(self, l1_index: int, slice_start: int) -> array[int] | None:
        """The L2 slice whose first entry is ``slice_start``, or None if no L2 table."""
        offset = self.l2_table_offset(l1_index)
        if not offset:
            return None
        return self.l2_cache.get(offset + slice_start * 8).table

    def l2_slice_for_write(self, l1_index: int, slice_start: int) -> CacheEntry[array[int]]:
        """The cache entry of an L2 slice this node may modify (allocated/COWed as needed)."""
        if l1_index >= len(self.l1):
            raise Qcow2Corruption(f"L1 index {l1_index:#x} out of range")
        entry = self.l1[l1_index]
        offset = self.l2_table_offset(l1_index)
        if not offset or not entry & OFLAG_COPIED:
            offset = self._allocate_l2(l1_index, offset)
        return self.l2_cache.get(offset + slice_start * 8)

    def _allocate_l2(self, l1_index: int, old_offset: int) -> int:
        cs = self.cluster_size
        new_offset = self.refcounts.alloc(1)
        # The new table's refcount must be on disk before the table is referenced
        # (this also writes out L2 changes the refcounts depend on).
        self.refcounts.cache.flush()
        if old_offset:
            table = self.file.pread(old_offset, cs)
        else:
            table = bytes(cs)
        self.file.pwrite(new_offset, table)
        self.file.flush()
        for pos in range(0, cs, self.slice_bytes):
            self.l2_cache.put(new_offset + pos, be_array(table[pos:pos + self.slice_bytes]),
                              dirty=False)
        self.write_l1_entry(l1_index, new_offset | OFLAG_COPIED)
        self._metadata_clusters = None
        if old_offset:
            self.refcounts.free_clusters(old_offset, cs, self.opts.pass_discard_other)
        return new_offset

    def write_l1_entry(self, l1_index: int, value: int) -> None:
        """Update one L1 entry in memory and on disk, durably."""
        self.l1[l1_index] = value
        self.file.pwrite(self.hdr.l1_table_offset + 8 * l1_index, struct.pack(">Q", value))
        self.file.flush()


def open_image(child: ChildIO, options: Mapping[str, Any], *, read_only: bool,
               inactive: bool, opts: Qcow2Options | None = None) -> Qcow2Image:
    """Open the image on ``child`` (QEMU's qcow2_do_open).

    ``opts`` is ``options`` as parsed by an earlier open of the same node, if any: they
    are the same on every reopen, and parsing them again could only give the same result.
    """
    file = TrackedFile(child)
    writable = not read_only and not inactive
    hdr = read_header(file)
    check_features(hdr, not read_only)
    if opts is None:
        opts = parse_options(options)
    check_option_conflicts(hdr, options, opts)
    l1 = be_array(file.pread(hdr.l1_table_offset, hdr.l1_size * 8)) if hdr.l1_size else array(U64)
    img = Qcow2Image(file, hdr, opts, l1, writable)
    if writable:
        if hdr.autoclear_features:
            # We maintain no bitmaps (bit 0) and know no other autoclear feature;
            # clearing the bits is how a writer tells others those structures are stale.
            hdr.autoclear_features = 0
            hdr.bitmaps_ext = None
            img.update_header()
        if img.dirty:
            from .repair import repair_image

            repair_image(img)
    return img
