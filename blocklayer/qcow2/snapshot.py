"""The internal snapshot table, read only as far as refcounting needs it."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..driver import ChildIO
from .errors import Qcow2Corruption

_ENTRY = struct.Struct(">QIHHIIQII")


@dataclass(frozen=True)
class SnapshotTable:
    """Where the table is, how long it is, and each snapshot's L1 table."""

    offset: int
    length: int
    l1_tables: tuple[tuple[int, int], ...]


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
