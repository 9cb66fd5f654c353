"""In-memory forms of qcow2 metadata tables and their on-disk encodings.

L1/L2/refcount tables hold big-endian integers on disk. In memory they are
``array`` objects in host order so lookups are plain indexing; conversion happens once
per table load or write-back (``array.byteswap`` runs in C). Refcount blocks narrower
than a byte (refcount_order 0..2) stay packed in a bytearray.
"""

from __future__ import annotations

import sys
from array import array
from typing import Protocol

_LITTLE = sys.byteorder == "little"


def _typecode(size: int) -> str:
    for code in ("B", "H", "I", "L", "Q"):
        if array(code).itemsize == size:
            return code
    raise RuntimeError(f"no array type of {size} bytes")


U16 = _typecode(2)
U32 = _typecode(4)
U64 = _typecode(8)


def be_array(data: bytes, code: str = U64) -> array[int]:
    """Decode a big-endian table into a host-order array."""
    arr = array(code, data)
    if _LITTLE and arr.itemsize > 1:
        arr.byteswap()
    return arr


def be_bytes(arr: array[int]) -> bytes:
    """Encode a host-order array as big-endian bytes."""
    if _LITTLE and arr.itemsize > 1:
        tmp = array(arr.typecode, arr)
        tmp.byteswap()
        return tmp.tobytes()
    return arr.tobytes()


# Zero runs of 32 KiB down to 64 bytes, halving.
_ZERO_RUNS = tuple(bytes(1 << k) for k in range(15, 5, -1))


def used_length(data: bytes) -> int:
    """Length of ``data`` without its run of trailing zero bytes."""
    end = len(data)
    # Zero runs are skipped with memcmp (endswith copies nothing), halving the run each
    # time, so that only the last 64 bytes go through bytes.rstrip (byte-by-byte slow).
    for zeros in _ZERO_RUNS:
        size = len(zeros)
        while end >= size and data.endswith(zeros, 0, end):
            end -= size
    start = max(0, end - 64)
    return start + len(data[start:end].rstrip(b"\0"))


def be_array_trimmed(data: bytes) -> array[int]:
    """Decode a table of u64 but drop its all-zero tail (saves memory on idle nodes)."""
    used = used_length(data)
    return be_array(data[: (used + 7) // 8 * 8])


class RefBlock(Protocol):
    """One refcount block: entries addressed by index within the block."""

    def get(self, index: int) -> int: ...

    def set(self, index: int, value: int) -> None: ...

    def find_zero(self, start: int) -> int:
        """First index >= start whose refcount is 0, or -1."""
        ...

    def find_nonzero(self, start: int, stop: int) -> int:
        """First index in [start, stop) whose refcount is not 0, or -1."""
        ...

    def to_bytes(self) -> bytes: ...


class WordRefBlock:
    """Refcounts of 8, 16, 32 or 64 bits."""

    __slots__ = ("data",)

    def __init__(self, data: array[int]) -> None:
        self.data = data

    def get(self, index: int) -> int:
        """Refcount of entry ``index``."""
        return self.data[index]

    def set(self, index: int, value: int) -> None:
        """Store the refcount of entry ``index``."""
        self.data[index] = value

    def find_zero(self, start: int) -> int:
        """First index >= start whose refcount is 0, or -1."""
        try:
            return self.data.index(0, start)
        except ValueError:
            return -1

    def find_nonzero(self, start: int, stop: int) -> int:
        """First index in [start, stop) whose refcount is not 0, or -1."""
        # Zero is zero in any byte order, so scanning the raw bytes is enough.
        raw = self.data[start:stop].tobytes()
        rest = raw.lstrip(b"\0")
        if not rest:
            return -1
        return start + (len(raw) - len(rest)) // self.data.itemsize

    def to_bytes(self) -> bytes:
        """On-disk (big-endian) form."""
        return be_bytes(self.data)


def _zero_field_table(bits: int) -> bytes:
    """Translation table: byte -> 1 if some ``bits``-wide field of it is zero, else 0."""
    mask = (1 << bits) - 1
    out = bytearray(256)
    for byte in range(256):
        for shift in range(0, 8, bits):
            if (byte >> shift) & mask == 0:
                out[byte] = 1
                break
    return bytes(out)


_ZERO_FIELD = {bits: _zero_field_table(bits) for bits in (1, 2, 4)}


class BitRefBlock:
    """Refcounts of 1, 2 or 4 bits, packed little-end first within each byte."""

    __slots__ = ("bits", "data", "mask", "per_byte")

    def __init__(self, data: bytearray, bits: int) -> None:
        self.data = data
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.per_byte = 8 // bits

    def get(self, index: int) -> int:
        """Refcount of entry ``index``."""
        byte, slot = divmod(index, self.per_byte)
        return (self.data[byte] >> (slot * self.bits)) & self.mask

    def set(self, index: int, value: int) -> None:
        """Store the refcount of entry ``index``."""
        byte, slot = divmod(index, self.per_byte)
        shift = slot * self.bits
        self.data[byte] = (self.data[byte] & ~(self.mask << shift) & 0xFF) | (value << shift)

    def find_zero(self, start: int) -> int:
        """First index >= start whose refcount is 0, or -1."""
        total = len(self.data) * self.per_byte
        i = start
        while i < total and i % self.per_byte:
            if self.get(i) == 0:
                return i
            i += 1
        if i >= total:
            return -1
        flags = self.data[i // self.per_byte:].translate(_ZERO_FIELD[self.bits])
        pos = flags.find(1)
        if pos < 0:
            return -1
        first = (i // self.per_byte + pos) * self.per_byte
        for j in range(first, first + self.per_byte):
            if self.get(j) == 0:
                return j
        return -1

    def find_nonzero(self, start: int, stop: int) -> int:
        """First index in [start, stop) whose refcount is not 0, or -1."""
        i = start
        while i < stop and i % self.per_byte:
            if self.get(i):
                return i
            i += 1
        whole_end = stop - stop % self.per_byte
        if i < whole_end:
            raw = bytes(self.data[i // self.per_byte: whole_end // self.per_byte])
            rest = raw.lstrip(b"\0")
            if rest:
                first = (i // self.per_byte + len(raw) - len(rest)) * self.per_byte
                for j in range(first, first + self.per_byte):
                    if self.get(j):
                        return j
            i = max(i, whole_end)
        while i < stop:
            if self.get(i):
                return i
            i += 1
        return -1

    def to_bytes(self) -> bytes:
        """On-disk form (already packed)."""
        return bytes(self.data)


class RefBlockCodec:
    """Builds :class:`RefBlock` objects for one refcount order and cluster size."""

    def __init__(self, refcount_order: int, cluster_size: int) -> None:
        self.order = refcount_order
        self.bits = 1 << refcount_order
        self.cluster_size = cluster_size
        self.entries = cluster_size * 8 // self.bits
        self.max_value = (1 << self.bits) - 1
        self._code = {8: "B", 16: U16, 32: U32, 64: U64}.get(self.bits, "")

    def decode(self, data: bytes) -> RefBlock:
        """A block from its on-disk bytes."""
        if self._code:
            return WordRefBlock(be_array(data, self._code))
        return BitRefBlock(bytearray(data), self.bits)

    def empty(self) -> RefBlock:
        """A block of all-zero refcounts."""
        return self.decode(bytes(self.cluster_size))

    def encode(self, block: RefBlock) -> bytes:
        """On-disk bytes of a block."""
        return block.to_bytes()

    def from_counts(self, counts: array[int], start: int) -> bytes:
        """On-disk bytes of the block whose first entry is ``counts[start]``."""
        chunk = counts[start:start + self.entries]
        if self._code:
            arr = array(self._code, chunk) if self._code != chunk.typecode else chunk
            out = be_bytes(arr)
            return out + bytes(self.cluster_size - len(out))
        block = BitRefBlock(bytearray(self.cluster_size), self.bits)
        for i, value in enumerate(chunk):
            if value:
                block.set(i, value)
        return block.to_bytes()
