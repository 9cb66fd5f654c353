"""Write-back LRU caches for L2 slices and refcount blocks (QEMU's Qcow2Cache).

Entries are created only when a table is first used, so an idle node holds no table
memory. Ordering between the two caches follows QEMU: a cache may *depend* on the other
(everything dirty in the dependency is written and flushed before any entry of this cache
is written), or on a flush of the file (data written by COW must be durable before the
L2 entry that points at it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..driver import ChildIO

T = TypeVar("T")


class CacheEntry(Generic[T]):
    """One cached table and whether it differs from the disk."""

    __slots__ = ("dirty", "pins", "table", "used")

    def __init__(self, table: T) -> None:
        self.table = table
        self.dirty = False
        self.pins = 0
        self.used = True


class MetadataCache(Generic[T]):
    """A fixed-capacity write-back cache of tables keyed by their host offset."""

    def __init__(self, file: ChildIO, capacity: int, table_size: int,
                 decode: Callable[[bytes], T], encode: Callable[[T], bytes]) -> None:
        self.file = file
        self.capacity = max(1, capacity)
        self.table_size = table_size
        self._decode = decode
        self._encode = encode
        self._entries: OrderedDict[int, CacheEntry[T]] = OrderedDict()
        self.depends: MetadataCache[Any] | None = None
        self.depends_on_flush = False
        #: Called with (offset, length) before any entry is written: the image's overlap
        #: check (QEMU's qcow2_cache_entry_flush runs qcow2_pre_write_overlap_check).
        self.pre_write: Callable[[int, int], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, offset: int) -> CacheEntry[T] | None:
        """The entry for ``offset`` if cached (no I/O, no LRU update)."""
        return self._entries.get(offset)

    def get(self, offset: int) -> CacheEntry[T]:
        """The entry for the table at ``offset``, reading it on a miss."""
        entry = self._entries.get(offset)
        if entry is not None:
            self._entries.move_to_end(offset)
            entry.used = True
            return entry
        self._make_room()
        entry = CacheEntry(self._decode(self.file.pread(offset, self.table_size)))
        self._entries[offset] = entry
        return entry

    def put(self, offset: int, table: T, dirty: bool) -> CacheEntry[T]:
        """Install a table whose content the caller already knows (new or just written)."""
        old = self._entries.pop(offset, None)
        if old is None:
            self._make_room()
        entry = CacheEntry(table)
        entry.dirty = dirty
        self._entries[offset] = entry
        return entry

    def discard(self, offset: int) -> None:
        """Forget an entry without writing it (its cluster was freed)."""
        self._entries.pop(offset, None)

    def clear(self) -> None:
        """Forget everything without writing (invalidate / close)."""
        self._entries.clear()
        self.depends = None
        self.depends_on_flush = False

    def _make_room(self) -> None:
        while len(self._entries) >= self.capacity:
            victim = None
            for off, entry in self._entries.items():
                if entry.pins == 0:
                    victim = off
                    break
            if victim is None:
                raise RuntimeError("qcow2 metadata cache: every entry is pinned")
            entry = self._entries[victim]
            if entry.dirty:
                self._write_entry(victim, entry)
            del self._entries[victim]

    def _write_entry(self, offset: int, entry: CacheEntry[T]) -> None:
        if self.depends is not None:
            self.flush_dependency()
        elif self.depends_on_flush:
            self.file.flush()
            self.depends_on_flush = False
        if self.pre_write is not None:
            self.pre_write(offset, self.table_size)
        self.file.pwrite(offset, self._encode(entry.table))
        entry.dirty = False

    def flush_dependency(self) -> None:
        """Make the cache this one depends on durable, then drop the dependency."""
        dep = self.depends
        if dep is not None:
            dep.flush()
        self.depends = None
        self.depends_on_flush = False

    def set_dependency(self, dependency: MetadataCache[Any]) -> None:
        """Require ``dependency`` to be durable before any entry of this cache is written.

        Chains are kept one deep: if the dependency itself depends on something, or this
        cache already depends on another cache, those are flushed first.
        """
        if dependency.depends is not None:
            dependency.flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            self.flush_dependency()
        self.depends = dependency

    def has_dirty(self) -> bool:
        """True if some entry differs from the disk."""
        return any(e.dirty for e in self._entries.values())

    def write(self) -> None:
        """Write every dirty entry (in offset order), without flushing the file."""
        dirty = sorted(off for off, e in self._entries.items() if e.dirty)
        for off in dirty:
            entry = self._entries.get(off)
            if entry is not None and entry.dirty:
                self._write_entry(off, entry)

    def flush(self) -> None:
        """Write every dirty entry, then flush the file."""
        self.write()
        self.file.flush()

    def clean_unused(self) -> None:
        """Drop clean, unpinned entries not used since the previous call."""
        for off in [o for o, e in self._entries.items() if not e.used and not e.dirty and not e.pins]:
            del self._entries[off]
        for entry in self._entries.values():
            entry.used = False


class CleanTimer:
    """Calls a function every ``interval`` seconds, checked lazily on I/O (no threads)."""

    __slots__ = ("_deadline", "_interval")

    def __init__(self, interval: int) -> None:
        self._interval = interval
        self._deadline = time.monotonic() + interval if interval > 0 else 0.0

    def due(self) -> bool:
        """True (and re-armed) if the interval has passed since the last time."""
        if self._interval <= 0:
            return False
        now = time.monotonic()
        if now < self._deadline:
            return False
        self._deadline = now + self._interval
        return True
