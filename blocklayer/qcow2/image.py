"""The state of one open qcow2 image: header, L1, caches, refcounts.

:func:`open_image` is QEMU's ``qcow2_do_open``: it reads and validates the header,
reads the L1 and refcount tables, sizes the caches and validates the bitmaps extension
(the driver then loads the bitmaps, rewrites the header if needed and repairs a dirty
image when writable). Invalidation builds a fresh :class:`Qcow2Image` from the same
file, which is exactly QEMU's close-and-reopen of the driver state.

Metadata write ordering: refcounts before the L2 entries that use them (cache
dependency), a new L2 table durable before the L1 entry pointing at it, L1 entries
written through with a flush.
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from collections.abc import Mapping
from typing import Any

from ..driver import ChildIO
from ..errors import BlockError
from . import header as H
from . import overlap as OL
from .cache import CacheEntry, CleanTimer, MetadataCache
from .errors import Qcow2Corruption, c_hex
from .l2 import L1E_OFFSET_MASK, OFLAG_COPIED, CompressedLayout
from .options import Qcow2Options, cache_sizes, parse_options
from .refcount import REFT_OFFSET_MASK, RefcountManager
from .snapshot import Snapshot, SnapshotTable, read_table, table_of
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
        reftable = be_array_trimmed(_read_table(
            file, hdr.refcount_table_offset, hdr.refcount_table_clusters * cs,
            "Could not initialize refcount handling"))
        self.refcounts = RefcountManager(
            file, hdr.cluster_bits, RefBlockCodec(hdr.refcount_order, cs), reftable,
            hdr.refcount_table_offset, hdr.refcount_table_clusters, sizes.refcount_entries,
            self.l2_cache, self._reftable_moved)
        self.refcounts.discard_cluster_hook = self._forget_l2_cluster
        self.refcounts.layout_hook = self.layout_changed
        self.refcounts.overlap_check = self.check_overlap
        self.l2_cache.pre_write = lambda off, n: self.check_overlap(off, n, OL.ACTIVE_L2)
        self.refcounts.cache.pre_write = lambda off, n: self.check_overlap(off, n, OL.REFCOUNT_BLOCK)
        self.snapshots = SnapshotTable(hdr.snapshots_offset, 0, ())
        #: The snapshot entries (read at open by open_image; None: not read yet).
        self.snapshot_list: list[Snapshot] | None = None
        self._metadata: OL.MetadataMap | None = None
        self.clean_timer = CleanTimer(opts.cache_clean_interval)
        self.last_compressed: tuple[int, bytes] | None = None
        # The bitmaps extension as validated at open (bitmaps.read_extension); zero
        # bitmaps means the header carries no extension on its next rewrite.
        self.nb_bitmaps = 0
        self.bitmap_directory_offset = 0
        self.bitmap_directory_size = 0
        #: ((offset, size), entries) of the directory last read (see bitmaps.load_directory).
        self.bitmap_directory_cache: tuple[tuple[int, int], list[Any]] | None = None
        #: Set by open_image when a writer owes the image a header rewrite (unknown
        #: autoclear bits, a stale bitmaps extension); done after the bitmaps are loaded.
        self.need_header_update = False

    # -- header ----------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """The dirty bit as this node last wrote or read it."""
        return bool(self.hdr.incompatible_features & H.INCOMPAT_DIRTY)

    @property
    def need_accurate_refcounts(self) -> bool:
        """False while lazy refcounts let on-disk refcounts lag (image marked dirty)."""
        return not self.dirty

    def layout_changed(self) -> None:
        """Forget the metadata map (tables moved or were added); rebuilt on next use."""
        self._metadata = None

    def _build_metadata_map(self) -> OL.MetadataMap:
        meta = OL.MetadataMap(self.cluster_bits)
        hdr = self.hdr
        rc = self.refcounts
        meta.add_range(0, self.cluster_size, OL.HEADER)
        meta.add_range(hdr.l1_table_offset, hdr.l1_size * 8, OL.ACTIVE_L1)
        meta.add_range(rc.reftable_offset, rc.reftable_clusters << self.cluster_bits,
                       OL.REFCOUNT_TABLE)
        if hdr.nb_snapshots:
            meta.add_range(hdr.snapshots_offset, max(self.snapshots.length, 1), OL.SNAPSHOT_TABLE)
        if hdr.autoclear_features & H.AUTOCLEAR_BITMAPS:
            # Protected only while the autoclear bit vouches for it (QEMU's check).
            meta.add_range(self.bitmap_directory_offset, self.bitmap_directory_size,
                           OL.BITMAP_DIRECTORY)
        if self.opts.overlap_check != "constant":
            # As the entries say, unvalidated (qcow2_check_metadata_overlap): a huge or
            # misplaced snapshot L1 table makes writes fail instead of landing on it.
            for l1_offset, l1_size in self.snapshots.l1_tables:
                meta.add_range(l1_offset, l1_size * 8, OL.INACTIVE_L1)
            for entry in self.l1:
                if entry & L1E_OFFSET_MASK:
                    meta.add_cluster(entry & L1E_OFFSET_MASK, OL.ACTIVE_L2)
            for entry in rc.reftable:
                if entry & REFT_OFFSET_MASK:
                    meta.add_cluster(entry & REFT_OFFSET_MASK, OL.REFCOUNT_BLOCK)
        return meta

    def check_overlap(self, offset: int, length: int, ignore: int = 0) -> None:
        """QEMU's qcow2_pre_write_overlap_check: nothing may be written over metadata.

        Every metadata and data write calls this first, naming in ``ignore`` the kind of
        table it legitimately rewrites (an L2 table may be written over an L2 table).
        ``constant`` checks the header, L1, refcount table and snapshot table; ``cached``
        (the default) and ``all`` add L2 tables, refcount blocks and snapshot L1 tables.
        """
        mode = self.opts.overlap_check
        if mode == "none" or length <= 0:
            return
        meta = self._metadata
        if meta is None:
            meta = self._metadata = self._build_metadata_map()
        check = (OL.CONSTANT if mode == "constant" else OL.CACHED) & ~ignore
        found = meta.hits(offset, length, check)
        if found:
            raise Qcow2Corruption(
                f"Preventing invalid write on metadata (overlaps with {OL.name_of(found)})",
                offset, length)

    def _reftable_moved(self, offset: int, clusters: int) -> None:
        self.hdr.refcount_table_offset = offset
        self.hdr.refcount_table_clusters = clusters

    def _forget_l2_cluster(self, offset: int) -> None:
        for pos in range(offset, offset + self.cluster_size, self.slice_bytes):
            self.l2_cache.discard(pos)

    def update_header(self) -> None:
        """Rewrite cluster 0 from the in-memory header (QEMU's qcow2_update_header).

        The bitmaps extension is written from the validated state, only when there are
        bitmaps (so a stale extension disappears with the first rewrite, as in QEMU).
        """
        self.hdr.bitmaps_ext = (H.BITMAPS_EXT.pack(self.nb_bitmaps, 0,
                                                   self.bitmap_directory_size,
                                                   self.bitmap_directory_offset)
                                if self.nb_bitmaps else None)
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
        """Set the corrupt bit so nobody writes to the image again before a repair.

        Only the 8-byte feature field is written (never the whole header, whose in-memory
        copy is exactly what may be wrong); v2 images have no such bit (QEMU's
        qcow2_mark_corrupt then changes nothing on disk either). Cached tables are
        dropped unwritten: they may hold the very damage that was just caught.
        """
        if self.writable:
            self.hdr.incompatible_features |= H.INCOMPAT_CORRUPT
            if self.version >= 3:
                try:
                    self.file.pwrite(72, struct.pack(">Q", self.hdr.incompatible_features))
                    self.file.flush()
                except BlockError:
                    pass
        self.writable = False
        self.drop()

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

    def inactivate(self, mark_clean: bool = True) -> None:
        """Write everything back, clear the dirty bit, make it durable, stop writing."""
        if self.writable:
            self.l2_cache.flush()
            self.refcounts.cache.flush()
            if mark_clean:
                self.mark_clean()
            self.file.flush()
        self.writable = False

    def resize_caches(self) -> None:
        """Size the caches for the current virtual size (qcow2_co_truncate re-applies the
        options, qcow2_update_options: the default L2 cache covers the whole disk).

        Only the capacities change; the slice size stays what the image was opened with
        (a different one would only change how much is read at a time).
        """
        sizes = cache_sizes(self.opts, self.cluster_size, self.virtual_size)
        if sizes.l2_entry_size == self.slice_bytes:
            self.l2_cache.capacity = max(1, sizes.l2_entries)
        self.refcounts.cache.capacity = max(1, sizes.refcount_entries)

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
            raise Qcow2Corruption(f"L2 table offset {c_hex(offset)} unaligned "
                                  f"(L1 index: {c_hex(l1_index)})")
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
            raise Qcow2Corruption(f"L1 index {c_hex(l1_index)} out of range")
        entry = self.l1[l1_index]
        offset = self.l2_table_offset(l1_index)
        if not offset or not entry & OFLAG_COPIED:
            offset = self._allocate_l2(l1_index, offset)
        return self.l2_cache.get(offset + slice_start * 8)

    def _allocate_l2(self, l1_index: int, old_offset: int) -> int:
        cs = self.cluster_size
        new_offset = self.refcounts.alloc(1)
        if new_offset == 0:
            # Free refcounts for cluster 0 mean the refcounts are wrong (QEMU's l2_allocate).
            raise Qcow2Corruption("Preventing invalid allocation of L2 table at offset 0")
        old_entry = self.l1[l1_index]
        written = False
        try:
            # The new table's refcount must be on disk before the table is referenced
            # (this also writes out L2 changes the refcounts depend on).
            self.refcounts.cache.flush()
            if old_offset:
                table = self.file.pread(old_offset, cs)
            else:
                table = bytes(cs)
            self.check_overlap(new_offset, cs, OL.ACTIVE_L2)
            self.file.pwrite(new_offset, table)
            written = True
            self.file.flush()
            for pos in range(0, cs, self.slice_bytes):
                self.l2_cache.put(new_offset + pos,
                                  be_array(table[pos:pos + self.slice_bytes]), dirty=False)
            self.write_l1_entry(l1_index, new_offset | OFLAG_COPIED)
        except BlockError:
            # l2_allocate's failure path: the L1 entry keeps the old table and the new
            # cluster is freed, and discarded at once (QCOW2_DISCARD_ALWAYS) when the copy
            # was written there, so a refused L1 write (overlap) leaves no copy of the
            # table behind, as in QEMU. Deliberately unlike QEMU, a cluster the overlap
            # check refused is not discarded: the refcounts that offered it are wrong,
            # and it holds metadata (QEMU 7.2 punches a hole in it, e.g. in the snapshot
            # table).
            self.l1[l1_index] = old_entry
            self._forget_l2_cluster(new_offset)
            try:
                self.refcounts.free_clusters(new_offset, cs, discard=written)
                self.refcounts.process_discards()
            except BlockError:
                pass  # the first failure is the one reported
            raise
        self._metadata = None
        if old_offset:
            self.refcounts.free_clusters(old_offset, cs, self.opts.pass_discard_other)
        return new_offset

    def write_l1_entry(self, l1_index: int, value: int) -> None:
        """Update one L1 entry in memory and on disk, durably."""
        position = self.hdr.l1_table_offset + 8 * l1_index
        self.check_overlap(position, 8, OL.ACTIVE_L1)
        self.l1[l1_index] = value
        self.file.pwrite(position, struct.pack(">Q", value))
        self.file.flush()


def _read_table(file: TrackedFile, offset: int, length: int, what: str) -> bytes:
    """Read a table QEMU reads at open; a failed read is its ``what: strerror``."""
    try:
        return file.pread(offset, length)
    except BlockError as exc:
        code = exc.errno or errno.EIO
        raise BlockError(f"{what}: {os.strerror(code)}", code) from exc


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
    l1 = (be_array(_read_table(file, hdr.l1_table_offset, hdr.l1_size * 8,
                               "Could not read L1 table"))
          if hdr.l1_size else array(U64))
    img = Qcow2Image(file, hdr, opts, l1, writable)
    # After the L1 and refcount tables, before the snapshot table, as qcow2_do_open.
    ext = H.bitmaps_extension(hdr)
    if ext is not None:
        img.nb_bitmaps = ext.nb_bitmaps
        img.bitmap_directory_offset = ext.directory_offset
        img.bitmap_directory_size = ext.directory_size
    stale_bitmaps = ext is None and hdr.bitmaps_ext is not None
    if hdr.nb_snapshots:
        # qcow2_read_snapshots, at open as in qcow2_do_open: an entry QEMU refuses
        # refuses the open, and every snapshot L1 table, however absurd, is protected
        # by the overlap checks exactly as the table describes it.
        snaps, length = read_table(file, hdr.snapshots_offset, hdr.nb_snapshots, hdr.size)
        img.snapshot_list = snaps
        img.snapshots = table_of(snaps, hdr.snapshots_offset, length)
    # qcow2_do_open: unknown autoclear bits are cleared by a writer (that is how it tells
    # others their structures are stale); a stale bitmaps extension is dropped. The
    # rewrite waits until the bitmaps are loaded (the driver's step, as in QEMU).
    unknown = hdr.autoclear_features & ~(H.AUTOCLEAR_BITMAPS | H.AUTOCLEAR_DATA_FILE_RAW)
    if writable and (unknown or stale_bitmaps):
        hdr.autoclear_features &= H.AUTOCLEAR_BITMAPS | H.AUTOCLEAR_DATA_FILE_RAW
        img.need_header_update = True
    return img
