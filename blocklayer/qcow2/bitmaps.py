"""Persistent dirty bitmaps in qcow2 images (the bitmaps extension).

What QEMU 7.2's block/qcow2-bitmap.c does, in our own words (layout: the qcow2 spec,
docs/interop/qcow2.txt, "Bitmaps extension"):

* the header extension names a bitmap directory (count, size, offset); it is trusted only
  while autoclear bit 0 is set — a program that does not know bitmaps clears that bit on
  a read-write open, and then every bitmap in the image is stale;
* a directory entry names a bitmap table (one u64 per cluster of serialized bitmap: a data
  cluster offset, 0 for all zeroes, or 1 for all ones), flags (in_use, auto), granularity;
* loading (qcow2_load_dirty_bitmaps, on open and activation of a node that is not
  inactive) creates the node's bitmaps, marks them in_use in the image while we may write
  it (a crash then leaves them visibly stale), and loads an in_use bitmap as
  ``inconsistent`` without its data;
* storing (qcow2_store_persistent_dirty_bitmaps, on inactivation and close) writes every
  persistent bitmap in new clusters, a new directory, switches the header to it, frees
  the old clusters, and drops the stored bitmaps from memory (activation reloads them).

Every offset and size read from the image is checked before it is used, with QEMU's
limits and texts; every loop is bounded by a count the image's header limits.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..dirtybitmap import BitmapError, DirtyBitmap, create, find
from ..errors import BlockError
from . import header as H
from . import overlap as OL
from .image import Qcow2Image

MAX_BITMAPS = H.MAX_BITMAPS
MAX_DIRECTORY_SIZE = H.MAX_BITMAP_DIRECTORY_SIZE
MAX_TABLE_SIZE = 0x8000000  # BME_MAX_TABLE_SIZE (entries)
MAX_PHYS_SIZE = 0x20000000  # BME_MAX_PHYS_SIZE (bytes of bitmap data)
MAX_GRANULARITY_BITS = 31
MIN_GRANULARITY_BITS = 9
MAX_NAME_SIZE = 1023
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
ENTRY_RESERVED_MASK = 0xFF000000000001FE
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_ALL_ONES = 1
TYPE_DIRTY_TRACKING = 1

_DIR_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gran, name, extra


def _err(message: str, code: int = errno.EINVAL) -> BlockError:
    return BlockError(message, code)


def _with_errno(message: str, code: int) -> BlockError:
    # QEMU's error_setg_errno: "<message>: <strerror>".
    return BlockError(f"{message}: {os.strerror(code)}", code)


@dataclass
class DirEntry:
    """One bitmap directory entry (QEMU's Qcow2Bitmap)."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    #: The in-memory bitmap this entry is stored from (store) — QEMU's bm->dirty_bitmap.
    bitmap: DirtyBitmap | None = field(default=None, repr=False)

    def encoded_name(self) -> bytes:
        """The name as stored in the directory."""
        return self.name.encode("utf-8", "surrogateescape")


def entry_size(name_size: int, extra_size: int = 0) -> int:
    """calc_dir_entry_size: fixed part, extra data and name, rounded up to 8."""
    return (_DIR_ENTRY.size + name_size + extra_size + 7) & ~7


def bitmap_length(img: Qcow2Image) -> int:
    """bdrv_getlength of the qcow2 node: the virtual size in whole sectors."""
    return img.virtual_size // 512 * 512


# -- the directory ---------------------------------------------------------------


def _check_dir_entry(img: Qcow2Image, table_offset: int, table_size: int, flags: int,
                     type_: int, granularity_bits: int, name_size: int) -> bool:
    """check_dir_entry: whether an entry satisfies the constraints."""
    cs = img.cluster_size
    if (table_size == 0 or table_offset == 0 or table_offset % cs
            or table_size > MAX_TABLE_SIZE or granularity_bits > MAX_GRANULARITY_BITS
            or granularity_bits < MIN_GRANULARITY_BITS or flags & RESERVED_FLAGS
            or name_size > MAX_NAME_SIZE or type_ != TYPE_DIRTY_TRACKING):
        return False
    phys = table_size * cs
    if phys > MAX_PHYS_SIZE:
        return False
    # A stale (in_use) bitmap may be too small after a resize; a valid one may not.
    return bool(flags & FLAG_IN_USE) or bitmap_length(img) <= (phys * 8) << granularity_bits


def load_directory(img: Qcow2Image) -> list[DirEntry]:
    """bitmap_list_load: read and check the directory the header names."""
    size = img.bitmap_directory_size
    if size == 0:
        raise _err("Requested bitmap directory size is zero")
    if size > MAX_DIRECTORY_SIZE:
        raise _err("Requested bitmap directory size is too big")
    cached = img.bitmap_directory_cache
    if cached is not None and cached[0] == (img.bitmap_directory_offset, size):
        return [DirEntry(e.name, e.table_offset, e.table_size, e.flags, e.granularity_bits)
                for e in cached[1]]
    try:
        data = img.file.pread(img.bitmap_directory_offset, size)
    except BlockError as exc:
        raise _with_errno("Failed to read bitmap directory", exc.errno or errno.EIO) from exc
    entries: list[DirEntry] = []
    pos = 0
    broken = _err("Broken bitmap directory")
    # Each pass consumes at least one 24-byte entry and there are at most nb_bitmaps.
    while pos < size:
        if pos + _DIR_ENTRY.size > size:
            raise broken
        if len(entries) + 1 > img.nb_bitmaps:
            raise _err("More bitmaps found than specified in header extension")
        table_offset, table_size, flags, type_, gbits, name_size, extra = \
            _DIR_ENTRY.unpack_from(data, pos)
        length = entry_size(name_size, extra)
        if pos + length > size:
            raise broken
        if extra:
            raise _err("Bitmap extra data is not supported")
        name_start = pos + _DIR_ENTRY.size + extra
        name = data[name_start:name_start + name_size].decode("utf-8", "surrogateescape")
        if not _check_dir_entry(img, table_offset, table_size, flags, type_, gbits, name_size):
            raise _err(f"Bitmap '{name}' doesn't satisfy the constraints")
        entries.append(DirEntry(name, table_offset, table_size, flags, gbits))
        pos += length
    if len(entries) != img.nb_bitmaps:
        raise _err("Less bitmaps found than specified in header extension")
    img.bitmap_directory_cache = ((img.bitmap_directory_offset, size),
                                  [DirEntry(e.name, e.table_offset, e.table_size, e.flags,
                                            e.granularity_bits) for e in entries])
    return entries


def _encode_directory(img: Qcow2Image, entries: list[DirEntry]) -> bytes:
    parts: list[bytes] = []
    for e in entries:
        name = e.encoded_name()
        if not _check_dir_entry(img, e.table_offset, e.table_size, e.flags, TYPE_DIRTY_TRACKING,
                                e.granularity_bits, len(name)):
            raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
        raw = _DIR_ENTRY.pack(e.table_offset, e.table_size, e.flags, TYPE_DIRTY_TRACKING,
                              e.granularity_bits, len(name), 0) + name
        parts.append(raw + bytes(entry_size(len(name)) - len(raw)))
    return b"".join(parts)


def _store_directory(img: Qcow2Image, entries: list[DirEntry], in_place: bool) -> tuple[int, int]:
    """bitmap_list_store: write the directory (in place, or in new clusters)."""
    data = _encode_directory(img, entries)
    if not data or len(data) > MAX_DIRECTORY_SIZE:
        raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
    if in_place:
        if img.bitmap_directory_size != len(data) or img.bitmap_directory_offset == 0:
            raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
        offset = img.bitmap_directory_offset
    else:
        offset = _alloc_bytes(img, len(data))
    try:
        img.check_overlap(offset, len(data), OL.BITMAP_DIRECTORY if in_place else 0)
        img.file.pwrite(offset, data)
    except BlockError:
        if not in_place:
            img.refcounts.free_clusters(offset, len(data), img.opts.pass_discard_other)
        raise
    return offset, len(data)


def _alloc_bytes(img: Qcow2Image, length: int) -> int:
    """qcow2_alloc_clusters for ``length`` bytes (whole clusters)."""
    offset = img.refcounts.alloc(-(-length // img.cluster_size))
    if offset == 0:
        raise BlockError("Preventing invalid allocation at offset 0", errno.EIO)
    return offset


def _update_header_sync(img: Qcow2Image) -> None:
    img.update_header()
    img.file.flush()


def _directory_changed(img: Qcow2Image) -> None:
    img.bitmap_directory_cache = None
    img.layout_changed()


def update_directory_in_place(img: Qcow2Image, entries: list[DirEntry]) -> None:
    """update_ext_header_and_dir_in_place: rewrite flags without moving the directory.

    The autoclear bit is cleared on disk while the directory is rewritten, so that a
    crash in between leaves bitmaps that everybody treats as stale, never a half-written
    directory that is trusted.
    """
    if (not img.hdr.autoclear_features & H.AUTOCLEAR_BITMAPS or not entries
            or len(entries) != img.nb_bitmaps):
        raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
    img.hdr.autoclear_features &= ~H.AUTOCLEAR_BITMAPS
    _directory_changed(img)
    _update_header_sync(img)
    _store_directory(img, entries, in_place=True)
    _update_header_sync(img)
    img.hdr.autoclear_features |= H.AUTOCLEAR_BITMAPS
    _directory_changed(img)
    _update_header_sync(img)


def update_directory(img: Qcow2Image, entries: list[DirEntry]) -> None:
    """update_ext_header_and_dir: a new directory in new clusters, then the header."""
    old = (img.bitmap_directory_offset, img.bitmap_directory_size, img.nb_bitmaps,
           img.hdr.autoclear_features)
    new_offset = new_size = 0
    try:
        if entries:
            if len(entries) > MAX_BITMAPS:
                raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
            new_offset, new_size = _store_directory(img, entries, in_place=False)
            # The directory's refcounts (and everything it points at) before the header.
            img.flush_caches()
            img.hdr.autoclear_features |= H.AUTOCLEAR_BITMAPS
        else:
            img.hdr.autoclear_features &= ~H.AUTOCLEAR_BITMAPS
        img.bitmap_directory_offset = new_offset
        img.bitmap_directory_size = new_size
        img.nb_bitmaps = len(entries)
        _directory_changed(img)
        _update_header_sync(img)
    except BlockError:
        if new_offset:
            img.refcounts.free_clusters(new_offset, new_size, img.opts.pass_discard_other)
        (img.bitmap_directory_offset, img.bitmap_directory_size, img.nb_bitmaps,
         img.hdr.autoclear_features) = old
        _directory_changed(img)
        raise
    if old[1] > 0:
        img.refcounts.free_clusters(old[0], old[1], img.opts.pass_discard_other)


# -- bitmap tables and data -----------------------------------------------------------


def _check_table_entry(entry: int, cluster_size: int) -> bool:
    if entry & ENTRY_RESERVED_MASK:
        return False
    offset = entry & ENTRY_OFFSET_MASK
    return not offset or not (entry & ENTRY_ALL_ONES or offset % cluster_size)


def load_table(img: Qcow2Image, offset: int, size: int) -> list[int]:
    """bitmap_table_load: the table's entries, each checked (EINVAL otherwise)."""
    if not 0 < size <= MAX_TABLE_SIZE:
        raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
    raw = img.file.pread(offset, size * 8)
    table = list(struct.unpack(f">{size}Q", raw))
    for entry in table:
        if not _check_table_entry(entry, img.cluster_size):
            raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
    return table


def _free_table(img: Qcow2Image, offset: int, size: int) -> None:
    """free_bitmap_clusters: free the data clusters, then the table (errors ignored)."""
    try:
        table = load_table(img, offset, size)
    except BlockError:
        return
    for entry in table:
        data = entry & ENTRY_OFFSET_MASK
        if data:
            img.refcounts.free_clusters(data, img.cluster_size, True)
    img.refcounts.free_clusters(offset, size * 8, img.opts.pass_discard_other)


def _table_size(img: Qcow2Image, bitmap: DirtyBitmap) -> int:
    return -(-bitmap.serialized_size() // img.cluster_size)


def _load_bitmap(img: Qcow2Image, entry: DirEntry, bitmaps: list[DirtyBitmap]) -> DirtyBitmap:
    """load_bitmap: create the bitmap, then read its data unless it is in_use."""
    try:
        bitmap = create(bitmaps, entry.name, 1 << entry.granularity_bits, bitmap_length(img))
    except BitmapError as exc:  # a name the node already has, or one too long
        raise BlockError(str(exc), errno.EINVAL) from exc
    if entry.flags & FLAG_IN_USE:
        return bitmap  # its data cannot be trusted: not even read
    try:
        try:
            table = load_table(img, entry.table_offset, entry.table_size)
        except BlockError as exc:
            raise _with_errno("Could not read bitmap_table table from image for bitmap "
                              f"'{entry.name}'", exc.errno or errno.EIO) from exc
        try:
            _load_data(img, table, bitmap)
        except BlockError as exc:
            raise _with_errno(f"Could not read bitmap '{entry.name}' from image",
                              exc.errno or errno.EIO) from exc
    except BlockError:
        bitmaps.remove(bitmap)
        raise
    return bitmap


def _load_data(img: Qcow2Image, table: list[int], bitmap: DirtyBitmap) -> None:
    """load_bitmap_data: one cluster of serialized bitmap per table entry."""
    cs = img.cluster_size
    total = bitmap.serialized_size()
    if len(table) != _table_size(img, bitmap) or len(table) > MAX_TABLE_SIZE:
        raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
    for i, entry in enumerate(table):
        start = i * cs
        chunk = min(cs, total - start)
        data_offset = entry & ENTRY_OFFSET_MASK
        if data_offset:
            bitmap.deserialize_part(start, img.file.pread(data_offset, cs)[:chunk])
        elif entry & ENTRY_ALL_ONES:
            bitmap.deserialize_ones(start, chunk)


def _store_bitmap(img: Qcow2Image, entry: DirEntry) -> None:
    """store_bitmap/store_bitmap_data: data clusters for the dirty chunks, then the table."""
    bitmap = entry.bitmap
    assert bitmap is not None
    cs = img.cluster_size
    size = _table_size(img, bitmap)
    if size > MAX_TABLE_SIZE or size * cs > MAX_PHYS_SIZE:
        raise _err(f"Bitmap '{bitmap.name}' is too big")
    table = [0] * size
    table_offset = 0
    try:
        total = bitmap.serialized_size()
        for i in range(size):
            chunk = bitmap.serialize_part(i * cs, min(cs, total - i * cs))
            if not chunk.strip(b"\0"):
                continue  # all clean: entry 0, no cluster
            try:
                offset = _alloc_bytes(img, cs)
            except BlockError as exc:
                raise _with_errno(f"Failed to allocate clusters for bitmap '{bitmap.name}'",
                                  exc.errno or errno.EIO) from exc
            table[i] = offset
            img.check_overlap(offset, cs)
            try:
                img.file.pwrite(offset, chunk + bytes(cs - len(chunk)))
            except BlockError as exc:
                raise _with_errno(f"Failed to write bitmap '{bitmap.name}' to file",
                                  exc.errno or errno.EIO) from exc
        try:
            table_offset = _alloc_bytes(img, size * 8)
        except BlockError as exc:
            raise _with_errno(f"Failed to allocate clusters for bitmap '{bitmap.name}'",
                              exc.errno or errno.EIO) from exc
        img.check_overlap(table_offset, size * 8)
        try:
            img.file.pwrite(table_offset, struct.pack(f">{size}Q", *table))
        except BlockError as exc:
            raise _with_errno(f"Failed to write bitmap '{bitmap.name}' to file",
                              exc.errno or errno.EIO) from exc
    except BlockError:
        for offset in table:
            if offset:
                img.refcounts.free_clusters(offset, cs, True)
        if table_offset:
            img.refcounts.free_clusters(table_offset, size * 8, img.opts.pass_discard_other)
        raise
    entry.table_offset = table_offset
    entry.table_size = size


# -- what the driver calls --------------------------------------------------------------


def load_bitmaps(img: Qcow2Image, bitmaps: list[DirtyBitmap]) -> bool:
    """qcow2_load_dirty_bitmaps; True if the header was rewritten (flags set in_use)."""
    if img.nb_bitmaps == 0:
        return False
    entries = load_directory(img)
    created: list[DirtyBitmap] = []
    needs_update = False
    try:
        for entry in entries:
            if entry.flags & FLAG_IN_USE and find(bitmaps, entry.name) is not None:
                # Ours already (e.g. kept in memory while inactive): the image's copy is
                # the stale one.
                continue
            bitmap = _load_bitmap(img, entry, bitmaps)
            created.append(bitmap)
            bitmap.persistent = True
            if entry.flags & FLAG_IN_USE:
                # bdrv_dirty_bitmap_set_inconsistent: also stops recording.
                bitmap.inconsistent = True
                bitmap.disabled = True
            else:
                entry.flags |= FLAG_IN_USE
                needs_update = True
            if not entry.flags & FLAG_AUTO:
                bitmap.disabled = True
        updated = False
        if needs_update and img.writable:
            try:
                update_directory_in_place(img, entries)
            except BlockError as exc:
                raise _with_errno("Can't update bitmap directory",
                                  exc.errno or errno.EIO) from exc
            updated = True
        if not img.writable:
            for bitmap in created:
                bitmap.readonly = True
        return updated
    except BlockError:
        for bitmap in created:
            if bitmap in bitmaps:
                bitmaps.remove(bitmap)
        raise


def check_constraints(img: Qcow2Image, name: str, granularity: int) -> None:
    """check_constraints_on_bitmap, with QEMU's texts."""
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        raise _err(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if bits < MIN_GRANULARITY_BITS:
        raise _err(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    length = bitmap_length(img)
    granules = (length + granularity - 1) // granularity
    needed = (granules + 7) // 8  # get_bitmap_bytes_needed
    if needed > MAX_PHYS_SIZE or needed > MAX_TABLE_SIZE * img.cluster_size:
        raise _err("Too much space will be occupied by the bitmap. Use larger granularity")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE:
        raise _err(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")


def can_store_new(img: Qcow2Image, bitmaps: list[DirtyBitmap], name: str, granularity: int,
                  node_name: str) -> None:
    """qcow2_co_can_store_new_dirty_bitmap: raise with QEMU's text if it cannot be stored."""
    if find(bitmaps, name) is not None:
        raise _err(f"Bitmap already exists: {name}")
    prefix = f"Can't make bitmap '{name}' persistent in '{node_name}': "
    if img.version < 3:
        raise _err(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
    try:
        check_constraints(img, name, granularity)
    except BlockError as exc:
        raise _err(prefix + str(exc)) from exc
    count = 1
    dir_size = entry_size(len(name.encode("utf-8", "surrogateescape")))
    for bitmap in bitmaps:
        if bitmap.persistent:
            count += 1
            dir_size += entry_size(len(bitmap.name.encode("utf-8", "surrogateescape")))
    if count > MAX_BITMAPS:
        raise _err(prefix + "Maximum number of persistent bitmaps is already reached")
    if dir_size > MAX_DIRECTORY_SIZE:
        raise _err(prefix + "Not enough space in the bitmap directory")


def remove_persistent(img: Qcow2Image, name: str) -> None:
    """qcow2_co_remove_persistent_dirty_bitmap: drop it from the image now."""
    if img.nb_bitmaps == 0:
        return
    entries = load_directory(img)
    found = next((e for e in entries if e.name == name), None)
    if found is None:
        return
    entries.remove(found)
    try:
        update_directory(img, entries)
    except BlockError as exc:
        raise _with_errno("Failed to update bitmap extension", exc.errno or errno.EIO) from exc
    _free_table(img, found.table_offset, found.table_size)


def store_bitmaps(img: Qcow2Image, bitmaps: list[DirtyBitmap]) -> None:
    """qcow2_store_persistent_dirty_bitmaps with release_stored (inactivation, close).

    Bitmaps already in the image are rewritten only if they are ours (in_use there);
    inconsistent and non-persistent bitmaps stay in memory, stored ones are released.
    """
    entries = load_directory(img) if img.nb_bitmaps else []
    nb_bitmaps = img.nb_bitmaps
    dir_size = img.bitmap_directory_size
    drop_tables: list[tuple[int, int]] = []
    need_write = False
    try:
        for bitmap in bitmaps:
            if not bitmap.persistent or bitmap.skip_store or bitmap.inconsistent:
                continue
            entry = next((e for e in entries if e.name == bitmap.name), None)
            if bitmap.readonly:
                if entry is not None:
                    entry.bitmap = bitmap  # released below, not written
                continue
            need_write = True
            try:
                check_constraints(img, bitmap.name, bitmap.granularity)
            except BlockError as exc:
                raise _err(f"Bitmap '{bitmap.name}' doesn't satisfy the constraints: "
                           f"{exc}") from exc
            if entry is None:
                nb_bitmaps += 1
                if nb_bitmaps > MAX_BITMAPS:
                    raise _err("Too many persistent bitmaps")
                dir_size += entry_size(len(bitmap.name.encode("utf-8", "surrogateescape")))
                if dir_size > MAX_DIRECTORY_SIZE:
                    raise _err("Bitmap directory is too large")
                entry = DirEntry(bitmap.name, 0, 0, 0, 0)
                entries.append(entry)
            else:
                if not entry.flags & FLAG_IN_USE:
                    raise _err(f"Bitmap '{bitmap.name}' already exists in the image")
                drop_tables.append((entry.table_offset, entry.table_size))
                entry.table_offset = entry.table_size = 0
            entry.flags = 0 if bitmap.disabled else FLAG_AUTO
            entry.granularity_bits = bitmap.shift
            entry.bitmap = bitmap
        if need_write:
            if not img.writable:
                raise _err("No write access")
            for entry in entries:
                if entry.bitmap is not None and not entry.bitmap.readonly:
                    _store_bitmap(img, entry)
            try:
                update_directory(img, entries)
            except BlockError as exc:
                raise _with_errno("Failed to update bitmap extension",
                                  exc.errno or errno.EIO) from exc
            for offset, size in drop_tables:
                _free_table(img, offset, size)
    except BlockError:
        for entry in entries:
            if (entry.bitmap is not None and entry.table_offset
                    and not entry.bitmap.readonly and entry.table_size
                    and (entry.table_offset, entry.table_size) not in drop_tables):
                _free_table(img, entry.table_offset, entry.table_size)
        raise
    for entry in entries:
        if entry.bitmap is not None and entry.bitmap in bitmaps:
            bitmaps.remove(entry.bitmap)


def info_list(img: Qcow2Image) -> list[dict[str, object]] | None:
    """qcow2_get_bitmap_info_list: the image's bitmaps for ImageInfoSpecificQCow2."""
    if img.nb_bitmaps == 0:
        return None
    out: list[dict[str, object]] = []
    for entry in load_directory(img):
        flags = [name for bit, name in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                 if entry.flags & bit]
        out.append({"flags": flags, "name": entry.name,
                    "granularity": 1 << entry.granularity_bits})
    return out


def count_references(img: Qcow2Image, add: Callable[[int, int], None]) -> None:
    """qcow2_check_bitmaps_refcounts: the directory, tables and data clusters in use."""
    if img.nb_bitmaps == 0:
        return
    add(img.bitmap_directory_offset, img.bitmap_directory_size)
    for entry in load_directory(img):
        add(entry.table_offset, entry.table_size * 8)
        for value in load_table(img, entry.table_offset, entry.table_size):
            offset = value & ENTRY_OFFSET_MASK
            if offset:
                add(offset, img.cluster_size)
