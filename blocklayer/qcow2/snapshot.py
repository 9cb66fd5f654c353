"""Internal snapshots: the snapshot table's on-disk format (operations: ``snapshotops``).

The on-disk layout (docs/interop/qcow2.rst, "Snapshots"): at ``snapshots_offset``,
``nb_snapshots`` entries, each 8-byte aligned: a 40-byte header, extra data (QEMU 7.2
writes 24 bytes: vm_state_size_large, disk_size, icount), the id string and the name.

The operations follow block/qcow2-snapshot.c:

* create (qcow2_snapshot_create): copy the active L1 table (as it is in memory, COPIED
  flags included) to new clusters, add one reference to every cluster reachable from
  the active L1 (clearing COPIED, which makes the next guest write copy the cluster),
  then write a whole new snapshot table and switch the header to it last;
* goto (qcow2_snapshot_goto): add references for the snapshot's clusters, overwrite the
  active L1 with the snapshot's, drop the references of the old active tree, and set
  COPIED again where a cluster is owned by the active tree alone;
* delete (qcow2_snapshot_delete): write the table without the entry (header switch),
  then drop the snapshot's references and free its L1 copy.

Every loop over on-disk structures is bounded by the validated table sizes.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from ..driver import ChildIO
from ..errors import BlockError
from .errors import Qcow2Corruption

_ENTRY = struct.Struct(">QIHHIIQII")
#: QEMU 7.2's QCowSnapshotExtraData: vm_state_size_large, disk_size, icount.
_EXTRA = struct.Struct(">QQQ")
#: QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE
MAX_SNAPSHOTS = 65536
MAX_EXTRA_DATA = 1024
MAX_TABLE_SIZE = 1024 * MAX_SNAPSHOTS
#: QCOW_MAX_L1_SIZE
MAX_L1_BYTES = 32 << 20
#: icount of a snapshot taken without record/replay (-1ULL).
NO_ICOUNT = (1 << 64) - 1
#: offsetof(QCowHeader, nb_snapshots): nb_snapshots (u32) then snapshots_offset (u64).
HEADER_SNAPSHOT_FIELDS = 60


@dataclass(frozen=True)
class SnapshotTable:
    """Where the table is, how long it is, and each snapshot's L1 table."""

    offset: int
    length: int
    l1_tables: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Snapshot:
    """One entry of the table (QEMU's QCowSnapshot)."""

    l1_offset: int
    l1_size: int
    id_str: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int
    disk_size: int
    extra_data_size: int
    unknown_extra: bytes = b""


def _text(raw: bytes) -> str:
    # C strings: the bytes as they are (round-trip safe), cut at a NUL as strcmp sees them.
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def read_snapshot_table(file: ChildIO, offset: int, count: int,
                        validate: bool = True) -> SnapshotTable:
    """Read ``count`` snapshot headers at ``offset`` (l1 offset/size of each).

    With ``validate`` off, snapshot L1 tables that could not be right are left out
    instead of refused (what the overlap checks need: as much as can be trusted).
    """
    if count == 0:
        return SnapshotTable(offset, 0, ())
    l1s: list[tuple[int, int]] = []
    pos = offset
    chunk = b""
    chunk_start = pos
    for _ in range(count):
        need_end = pos + _ENTRY.size
        if need_end > chunk_start + len(chunk):
            chunk_start = pos
            chunk = file.pread(pos, max(65536, _ENTRY.size))
        (l1_offset, l1_size, id_len, name_len, _sec, _nsec, _clock, _vmsize,
         extra_len) = _ENTRY.unpack_from(chunk, pos - chunk_start)
        if l1_offset % 512 or l1_size > (32 << 20) // 8:
            if validate:
                raise Qcow2Corruption("Snapshot L1 table invalid")
        else:
            l1s.append((l1_offset, l1_size))
        pos += _ENTRY.size + extra_len + id_len + name_len
        pos = (pos + 7) & ~7
        if pos - offset > 64 << 20:
            raise Qcow2Corruption("Snapshot table too large")
    return SnapshotTable(offset, pos - offset, tuple(l1s))


class _TableReader:
    """Reads the table through a window of at least 64 KiB: one pread for the usual
    table instead of several per entry. Bytes past the end of the file read as zeroes,
    as the file driver returns them (QEMU's bdrv_pread does the same)."""

    __slots__ = ("data", "file", "start")

    WINDOW = 65536

    def __init__(self, file: ChildIO) -> None:
        self.file = file
        self.start = 0
        self.data = b""

    def read(self, pos: int, length: int) -> bytes:
        if not self.start <= pos or pos + length > self.start + len(self.data):
            size = max(length, self.WINDOW)
            try:
                data = self.file.pread(pos, size)
            except BlockError:
                # Only what QEMU reads may fail the open (the window may reach past
                # the largest offset a request may have).
                size = length
                try:
                    data = self.file.pread(pos, size)
                except BlockError as exc:
                    raise _read_failed(exc) from exc
            self.start = pos
            self.data = data + bytes(size - len(data))
        return self.data[pos - self.start:pos - self.start + length]


def read_snapshots(file: ChildIO, offset: int, count: int, disk_size: int) -> list[Snapshot]:
    """The whole table, as QEMU's qcow2_read_snapshots reads it (its texts on failure)."""
    return read_table(file, offset, count, disk_size)[0]


def read_table(file: ChildIO, offset: int, count: int,
               disk_size: int) -> tuple[list[Snapshot], int]:
    """The entries and the table's length in bytes (QEMU's snapshots_size), as
    qcow2_read_snapshots reads them when the image is opened, with its texts and hints.

    ``count`` is at most MAX_SNAPSHOTS (the header validation), every entry is at most
    40 + 1024 + 2 * 65535 bytes, and the table may not exceed MAX_TABLE_SIZE: at most
    64 MiB plus one entry is ever read. The snapshots' L1 tables are not validated here
    (QEMU checks them only when a snapshot is used, deleted or checked); the overlap
    checks protect them as they are.
    """
    snaps: list[Snapshot] = []
    reader = _TableReader(file)
    pos = offset
    length = 0
    count = min(count, MAX_SNAPSHOTS)
    for i in range(count):
        pos = (pos + 7) & ~7
        length = (length + 7) & ~7
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_size,
         extra_len) = _ENTRY.unpack(reader.read(pos, _ENTRY.size))
        pos += _ENTRY.size
        if extra_len > MAX_EXTRA_DATA:
            err = BlockError(f"Too much extra metadata in snapshot table entry {i}",
                             errno.EFBIG)
            err.add_note("You can force-remove this extra metadata with qemu-img check -r all")
            raise err
        rest = reader.read(pos, extra_len + id_len + name_len)
        known = rest[:min(_EXTRA.size, extra_len)] + bytes(max(0, _EXTRA.size - extra_len))
        large, disk, icount = _EXTRA.unpack(known)
        if extra_len >= 8:
            vm_size = large
        if extra_len < 16:
            disk = disk_size
        if extra_len < 24:
            icount = NO_ICOUNT
        snaps.append(Snapshot(
            l1_offset, l1_size, _text(rest[extra_len:extra_len + id_len]),
            _text(rest[extra_len + id_len:]), vm_size, date_sec, date_nsec, vm_clock, icount,
            disk, extra_len, rest[_EXTRA.size:extra_len] if extra_len > _EXTRA.size else b""))
        pos += extra_len + id_len + name_len
        length += _ENTRY.size + extra_len + id_len + name_len
        if length > MAX_TABLE_SIZE:
            err = BlockError("Snapshot table is too big", errno.EFBIG)
            err.add_note(f"You can force-remove all {count - i} overhanging snapshots with "
                         "qemu-img check -r all")
            raise err
    # snapshots_size: up to the end of the last entry (no padding after it).
    return snaps, pos - offset


def _read_failed(exc: BlockError) -> BlockError:
    code = exc.errno or errno.EIO
    return BlockError(f"Failed to read snapshot table: {os.strerror(code)}", code)


def encode_table(snaps: list[Snapshot]) -> bytes:
    """The table as qcow2_write_snapshots writes it (at least 24 bytes of extra data)."""
    out = bytearray()
    for sn in snaps:
        out += bytes((-len(out)) % 8)
        ident, name = _raw(sn.id_str), _raw(sn.name)
        extra_len = max(_EXTRA.size, sn.extra_data_size)
        # A VM state over 4 GiB is 0 in the 32-bit field: older readers then see a
        # disk-only snapshot rather than a truncated state (QEMU's comment).
        small = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
        out += _ENTRY.pack(sn.l1_offset, sn.l1_size, len(ident), len(name), sn.date_sec,
                           sn.date_nsec, sn.vm_clock_nsec, small, extra_len)
        out += _EXTRA.pack(sn.vm_state_size, sn.disk_size, sn.icount)
        out += sn.unknown_extra[:extra_len - _EXTRA.size]
        out += ident + name
    return bytes(out)


def table_of(snaps: list[Snapshot], offset: int, length: int) -> SnapshotTable:
    """The overlap checks' view of a table."""
    return SnapshotTable(offset, length, tuple((s.l1_offset, s.l1_size) for s in snaps))


__all__ = ["HEADER_SNAPSHOT_FIELDS", "MAX_EXTRA_DATA", "MAX_L1_BYTES", "MAX_SNAPSHOTS",
           "MAX_TABLE_SIZE", "NO_ICOUNT", "Snapshot", "SnapshotTable", "encode_table",
           "read_snapshot_table", "read_snapshots", "read_table", "table_of"]
