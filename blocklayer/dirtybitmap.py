"""Dirty bitmaps: which parts of a node were written since a point in time.

QEMU's BdrvDirtyBitmap (block/dirty-bitmap.c) over an HBitmap (util/hbitmap.c). Only the
lowest HBitmap level matters to anything a user can observe: the dirty count, the
serialized form stored in qcow2 images, and ``x-debug-block-dirty-bitmap-sha256``, which
hashes that level's memory (64-bit little-endian words on the hosts QEMU is built for).
So one bit per ``granularity`` bytes of the node, kept in a bytearray with bit ``i`` at
byte ``i // 8``, bit ``i % 8`` — exactly the little-endian words' bytes.

The node keeps its bitmaps newest first (QEMU's QLIST_INSERT_HEAD), which is the order
queries report and the order new persistent bitmaps join a qcow2 bitmap directory.
"""

from __future__ import annotations

import hashlib

#: QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
MAX_NAME_SIZE = 1023

# bdrv_dirty_bitmap_check flags (include/block/dirty-bitmap.h).
CHECK_BUSY = 1
CHECK_RO = 2
CHECK_INCONSISTENT = 4
CHECK_DEFAULT = CHECK_BUSY | CHECK_RO | CHECK_INCONSISTENT
CHECK_ALLOW_RO = CHECK_BUSY | CHECK_INCONSISTENT

_LOW_MASK = tuple((1 << k) - 1 for k in range(9))  # bits below k within a byte


class BitmapError(Exception):
    """A refused bitmap operation, with QEMU's text."""


class DirtyBitmap:
    """One named dirty bitmap of a node."""

    __slots__ = ("bits", "busy", "disabled", "granularity", "inconsistent", "name",
                 "persistent", "readonly", "shift", "size", "skip_store")

    def __init__(self, name: str, granularity: int, size: int) -> None:
        if granularity < 512 or granularity & (granularity - 1):
            raise ValueError(f"bad granularity {granularity}")
        self.name = name
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.size = size
        self.bits = bytearray(self._storage_bytes(size))
        self.disabled = False
        self.persistent = False
        #: Loaded with the in_use flag set: its content cannot be trusted (QEMU).
        self.inconsistent = False
        #: Loaded from an image we may not write: it cannot change (QEMU).
        self.readonly = False
        #: In use by a block job; we run none, so this stays False.
        self.busy = False
        #: Travelling in a migration stream: inactivation must neither store nor drop it
        #: (QEMU's skip_store); activation clears it.
        self.skip_store = False

    def _storage_bytes(self, size: int) -> int:
        # hbitmap_alloc: the lowest level has at least one 64-bit word.
        nbits = -(-size >> self.shift) if size > 0 else 0
        return max(-(-nbits // 64), 1) * 8

    @property
    def nbits(self) -> int:
        """Number of bits covering the node's ``size`` bytes."""
        return (self.size + self.granularity - 1) >> self.shift

    @property
    def recording(self) -> bool:
        """Whether writes are being recorded (bdrv_dirty_bitmap_recording)."""
        return not self.disabled

    # -- checks ----------------------------------------------------------------

    def check(self, flags: int) -> None:
        """QEMU's bdrv_dirty_bitmap_check, with its texts and order."""
        if flags & CHECK_BUSY and self.busy:
            raise BitmapError(f"Bitmap '{self.name}' is currently in use by another "
                              "operation and cannot be used")
        if flags & CHECK_RO and self.readonly:
            raise BitmapError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & CHECK_INCONSISTENT and self.inconsistent:
            raise BitmapError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    # -- bits ------------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> None:
        """Mark the granules touching [offset, offset+length) dirty (hbitmap_set)."""
        if length <= 0 or offset >= self.size:
            return
        end = min(offset + length, self.size)
        self._fill(offset >> self.shift, ((end - 1) >> self.shift) + 1, True)

    def reset_range(self, offset: int, length: int) -> None:
        """Mark the granules touching [offset, offset+length) clean (hbitmap_reset; its
        callers pass whole granules)."""
        if length <= 0 or offset >= self.size:
            return
        end = min(offset + length, self.size)
        self._fill(offset >> self.shift, ((end - 1) >> self.shift) + 1, False)

    def _fill(self, first: int, stop: int, value: bool) -> None:
        bits = self.bits
        if first >= stop:
            return
        fbyte, fbit = divmod(first, 8)
        lbyte, lbit = divmod(stop, 8)
        if fbyte == lbyte:
            mask = _LOW_MASK[lbit] & ~_LOW_MASK[fbit] & 0xFF
            bits[fbyte] = bits[fbyte] | mask if value else bits[fbyte] & ~mask
            return
        if fbit:
            mask = ~_LOW_MASK[fbit] & 0xFF
            bits[fbyte] = bits[fbyte] | mask if value else bits[fbyte] & ~mask
            fbyte += 1
        if lbyte > fbyte:
            bits[fbyte:lbyte] = (b"\xff" if value else b"\0") * (lbyte - fbyte)
        if lbit:
            mask = _LOW_MASK[lbit]
            bits[lbyte] = bits[lbyte] | mask if value else bits[lbyte] & ~mask

    def get(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty."""
        index = offset >> self.shift
        return bool(self.bits[index >> 3] >> (index & 7) & 1)

    def clear(self) -> None:
        """Reset every bit (block-dirty-bitmap-clear)."""
        self.bits[:] = bytes(len(self.bits))

    def count(self) -> int:
        """Dirty bytes as QEMU reports them: dirty granules (within the size) times granularity."""
        nbits = self.nbits
        full, rest = divmod(nbits, 8)
        ones = int.from_bytes(self.bits[:full], "little").bit_count()
        if rest:
            ones += (self.bits[full] & _LOW_MASK[rest]).bit_count()
        return ones << self.shift

    def merge_from(self, other: DirtyBitmap) -> None:
        """OR ``other`` into this bitmap (bdrv_merge_dirty_bitmap; sizes already checked).

        Bitmaps of different granularities merge granule by granule as QEMU's
        hbitmap_merge does: every dirty source granule marks the bytes it covers.
        """
        if other.granularity == self.granularity:
            merged = (int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little"))
            self.bits[:] = merged.to_bytes(len(self.bits), "little")
            return
        value = int.from_bytes(other.bits, "little")
        index = 0
        # Bounded by the source's bit count: each pass consumes at least one bit.
        while value:
            low = (value & -value).bit_length() - 1
            index += low
            run = (~(value >> low) & ((value >> low) + 1)).bit_length() - 1
            start = index << other.shift
            self.set_range(start, (run << other.shift))
            value >>= low + run
            index += run

    def sha256(self) -> str:
        """Hex SHA-256 of the lowest bitmap level (hbitmap_sha256)."""
        return hashlib.sha256(bytes(self.bits)).hexdigest()

    def truncate(self, size: int) -> None:
        """Follow a resize of the node (hbitmap_truncate: new granules start clean)."""
        old_nbits = self.nbits
        self.size = size
        length = self._storage_bytes(size)
        if length < len(self.bits):
            del self.bits[length:]
        else:
            self.bits.extend(bytes(length - len(self.bits)))
        nbits = self.nbits
        if nbits < old_nbits:
            self._fill(nbits, len(self.bits) * 8, False)

    # -- serialization (qcow2 bitmap data clusters) ---------------------------------

    def serialized_size(self) -> int:
        """Bytes of the serialized form (bdrv_dirty_bitmap_serialization_size of all)."""
        return -(-self.nbits // 64) * 8

    def serialize_part(self, start: int, length: int) -> bytes:
        """Serialized bytes [start, start+length) (whole 64-bit words, little-endian)."""
        return bytes(self.bits[start:start + length])

    def deserialize_part(self, start: int, data: bytes) -> None:
        """Load serialized bytes at ``start`` (hbitmap_deserialize_part copies whole words)."""
        end = min(start + len(data), len(self.bits))
        if end > start:
            self.bits[start:end] = data[:end - start]

    def deserialize_ones(self, start: int, length: int) -> None:
        """Set whole serialized words to ones (hbitmap_deserialize_ones, for all-ones entries)."""
        end = min(start + length, len(self.bits))
        if end > start:
            self.bits[start:end] = b"\xff" * (end - start)


def find(bitmaps: list[DirtyBitmap], name: str) -> DirtyBitmap | None:
    """The bitmap called ``name`` (bdrv_find_dirty_bitmap)."""
    for bitmap in bitmaps:
        if bitmap.name == name:
            return bitmap
    return None


def create(bitmaps: list[DirtyBitmap], name: str, granularity: int, size: int) -> DirtyBitmap:
    """bdrv_create_dirty_bitmap: a new, enabled, empty bitmap at the head of the list."""
    if find(bitmaps, name) is not None:
        raise BitmapError(f"Bitmap already exists: {name}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_SIZE:
        raise BitmapError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(name, granularity, size)
    bitmaps.insert(0, bitmap)
    return bitmap


def set_dirty(bitmaps: list[DirtyBitmap], offset: int, length: int) -> None:
    """bdrv_set_dirty: every enabled bitmap records the range."""
    for bitmap in bitmaps:
        if not bitmap.disabled:
            bitmap.set_range(offset, length)
