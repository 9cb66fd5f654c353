"""Write ordering under power loss: what may reach the disk before what.

A SIGKILL keeps the page cache, so the crash tests (test_qcow2_crash.py) cannot see a
missing or misplaced flush. Here the file driver's lowest-level I/O (``os.pwrite``,
``fallocate``, ``os.fdatasync``) is watched for one image file: every write since the last
successful fdatasync counts as volatile, and a power loss may keep any subset of them.
:class:`PowerLossDisk` fails when a write of qcow2 metadata would make durable metadata
point at, or depend on, something that is still volatile, following the orderings QEMU's
qcow2 keeps (cache dependencies in ``qcow2_cache_set_dependency``,
``qcow2_cache_depends_on_flush``, ``l2_allocate``, ``alloc_refcount_block``,
``qcow2_mark_clean``):

* an L1 entry, a refcount-table entry, or a header table pointer may only start pointing
  at a table whose contents are already durable;
* an L1 or L2 entry may only start pointing at a cluster whose refcount is durable (or
  while the durable header says "dirty", with lazy refcounts);
* a refcount may only drop to 0 once no durable L1/L2 entry points at the cluster;
* the dirty bit may only be cleared when nothing else is volatile and every referenced
  cluster has its refcount written.

The checks parse the image with the small independent reader below, not with
``blocklayer.qcow2``.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocklayer.drivers import file as file_mod
from blocklayer.errors import BlockError
from blocklayer.graph import BlockGraph
from blocklayer.node import BlockNode

OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED = 1 << 62
DIRTY = 1
HEADER_BYTES = 104


# --- an independent qcow2 reader -------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The header fields the ordering rules need."""

    cluster_bits: int
    l1_offset: int
    l1_size: int
    reftable_offset: int
    reftable_clusters: int
    refcount_order: int
    incompatible: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & DIRTY)

    @property
    def refcounts_per_block(self) -> int:
        return (self.cluster_size * 8) >> self.refcount_order


Reader = Callable[[int, int], bytes]


def parse_header(raw: bytes) -> Layout:
    """The fields of a qcow2 header (v2 images have no feature fields and order 4)."""
    version = struct.unpack_from(">I", raw, 4)[0]
    v3 = version >= 3
    return Layout(
        cluster_bits=struct.unpack_from(">I", raw, 20)[0],
        l1_size=struct.unpack_from(">I", raw, 36)[0],
        l1_offset=struct.unpack_from(">Q", raw, 40)[0],
        reftable_offset=struct.unpack_from(">Q", raw, 48)[0],
        reftable_clusters=struct.unpack_from(">I", raw, 56)[0],
        incompatible=struct.unpack_from(">Q", raw, 72)[0] if v3 else 0,
        refcount_order=struct.unpack_from(">I", raw, 96)[0] if v3 else 4,
    )


def entries(raw: bytes) -> list[int]:
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


class Image:
    """Read-only view of a qcow2 image through ``read(offset, length)``; ``backing``
    reads the backing file's bytes (zeroes past its end), for unallocated clusters."""

    def __init__(self, read: Reader, backing: Reader | None = None) -> None:
        self.read = read
        self.backing = backing
        self.layout = parse_header(read(0, HEADER_BYTES))

    def l1(self) -> list[int]:
        lay = self.layout
        return entries(self.read(lay.l1_offset, lay.l1_size * 8))

    def l2_tables(self) -> list[int]:
        return [e & OFFSET_MASK for e in self.l1() if e & OFFSET_MASK]

    def reftable(self) -> list[int]:
        lay = self.layout
        return entries(self.read(lay.reftable_offset, lay.reftable_clusters * lay.cluster_size))

    def refcount(self, host: int) -> int:
        lay = self.layout
        cluster = host >> lay.cluster_bits
        block, index = divmod(cluster, lay.refcounts_per_block)
        table = self.reftable()
        if block >= len(table) or not table[block] & ~0x1FF:
            return 0
        return self._refcount_in(table[block] & ~0x1FF, index)

    def _refcount_in(self, block: int, index: int) -> int:
        bits = 1 << self.layout.refcount_order
        if bits >= 8:
            width = bits // 8
            raw = self.read(block + index * width, width)
            return int.from_bytes(raw, "big")
        byte = self.read(block + index * bits // 8, 1)[0]
        shift = (index * bits) % 8
        return (byte >> shift) & ((1 << bits) - 1)

    def referenced(self) -> set[int]:
        """Host offsets of every cluster the image's tables point at: the clusters of the
        L1 table and of the refcount table (the header points at them), the refcount
        blocks, the L2 tables and the standard data clusters."""
        found: set[int] = set()
        lay = self.layout
        cs = lay.cluster_size
        for start, length in ((lay.l1_offset, lay.l1_size * 8),
                              (lay.reftable_offset, lay.reftable_clusters * cs)):
            found.update(range(start & ~(cs - 1), start + length, cs))
        found.update(block & ~0x1FF for block in self.reftable() if block & ~0x1FF)
        for l2 in self.l2_tables():
            found.add(l2)
            for entry in entries(self.read(l2, cs)):
                if not entry & COMPRESSED and entry & OFFSET_MASK:
                    found.add(entry & OFFSET_MASK)
        return found

    def guest_read(self, offset: int, length: int) -> bytes:
        """Guest bytes (no compressed clusters in these tests)."""
        lay = self.layout
        cs = lay.cluster_size
        l2_bits = lay.cluster_bits - 3
        l1 = self.l1()
        out = bytearray()
        pos = offset
        while pos < offset + length:
            cluster, within = divmod(pos, cs)
            n = min(cs - within, offset + length - pos)
            l1_index, l2_index = divmod(cluster, 1 << l2_bits)
            l2 = l1[l1_index] & OFFSET_MASK if l1_index < len(l1) else 0
            entry = struct.unpack(">Q", self.read(l2 + 8 * l2_index, 8))[0] if l2 else 0
            assert not entry & COMPRESSED
            host = entry & OFFSET_MASK
            if not entry & 1 and not host and self.backing is not None:
                out += self.backing(pos, n)
            elif entry & 1 or not host:
                out += bytes(n)
            else:
                out += self.read(host + within, n)
            pos += n
        return bytes(out)


def reader_of(data: bytes | bytearray) -> Reader:
    def read(offset: int, length: int) -> bytes:
        chunk = bytes(data[offset:offset + length])
        return chunk + bytes(length - len(chunk))
    return read


# --- the power-loss model --------------------------------------------------------------


class PowerLossDisk:
    """Watches one image file's writes and fdatasyncs at the file driver's syscalls.

    ``durable`` is the file as of the last successful fdatasync; ``pending`` the writes
    since (offset, bytes). ``violations`` collects every ordering rule broken.
    ``on_sync`` is called before each fdatasync with the disk, so that a test can look at
    the images a power loss at that moment could leave.
    """

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch, *, qcow2: bool = True) -> None:
        self.qcow2 = qcow2
        self.path = os.path.realpath(path)
        self.durable = bytearray(Path(path).read_bytes())
        self.pending: list[tuple[int, bytes]] = []
        self.violations: list[str] = []
        self.syncs = 0
        self.on_sync: Callable[[PowerLossDisk], None] | None = None
        self._durable_image: Image | None = None
        self._durable_refs: set[int] | None = None
        self._fd = os.open(self.path, os.O_RDONLY)
        self._real_pwrite = os.pwrite
        self._real_fdatasync = os.fdatasync
        self._real_fallocate = file_mod.fallocate
        monkeypatch.setattr(os, "pwrite", self._pwrite)
        monkeypatch.setattr(os, "fdatasync", self._fdatasync)
        monkeypatch.setattr(file_mod, "fallocate", self._fallocate)

    def close(self) -> None:
        os.close(self._fd)

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}") == self.path and fd != self._fd
        except OSError:
            return False

    # Hooks -----------------------------------------------------------------------------

    def _pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self._ours(fd):
            self.check_write(offset, bytes(data))
            self.pending.append((offset, bytes(data)))
        return self._real_pwrite(fd, data, offset)

    def _fallocate(self, fd: int, mode: int, offset: int, length: int) -> int:
        zeroing = mode & (file_mod.FALLOC_FL_PUNCH_HOLE | file_mod.FALLOC_FL_ZERO_RANGE)
        if zeroing and self._ours(fd):
            self.check_write(offset, bytes(length))
        ret = self._real_fallocate(fd, mode, offset, length)
        if zeroing and ret == 0 and self._ours(fd):
            self.pending.append((offset, bytes(length)))
        return ret

    def _fdatasync(self, fd: int) -> None:
        if not self._ours(fd):
            self._real_fdatasync(fd)
            return
        if self.on_sync is not None:
            self.on_sync(self)
        self._real_fdatasync(fd)
        self.syncs += 1
        self.durable = bytearray(Path(self.path).read_bytes())
        self.pending.clear()
        self._durable_image = None
        self._durable_refs = None

    # Views -----------------------------------------------------------------------------

    def current(self, offset: int, length: int) -> bytes:
        chunk = os.pread(self._fd, length, offset)
        return chunk + bytes(length - len(chunk))

    def durable_image(self) -> Image:
        if self._durable_image is None:
            self._durable_image = Image(reader_of(self.durable))
        return self._durable_image

    def durable_refs(self) -> set[int]:
        if self._durable_refs is None:
            self._durable_refs = self.durable_image().referenced()
        return self._durable_refs

    def volatile(self, offset: int, length: int) -> bool:
        """Whether a pending write touches [offset, offset + length)."""
        return any(o < offset + length and offset < o + len(d) for o, d in self.pending)

    def crash_image(self, keep: Callable[[int, bytes], bool]) -> bytearray:
        """The durable file plus the pending writes ``keep`` selects, in order."""
        out = bytearray(self.durable)
        for offset, data in self.pending:
            if keep(offset, data):
                if len(out) < offset + len(data):
                    out += bytes(offset + len(data) - len(out))
                out[offset:offset + len(data)] = data
        return out

    # The rules ---------------------------------------------------------------------------

    def _fail(self, text: str) -> None:
        self.violations.append(f"{text} (after {self.syncs} fdatasyncs)")

    def _needs_durable_refcount(self, what: str, host: int) -> None:
        durable = self.durable_image()
        if durable.layout.dirty:
            return  # lazy refcounts: the durable dirty bit lets refcounts lag
        if durable.refcount(host) == 0:
            self._fail(f"{what} points at cluster {host:#x} whose refcount is not durable")

    def _needs_durable_contents(self, what: str, offset: int, length: int) -> None:
        if self.volatile(offset, length):
            self._fail(f"{what} points at {offset:#x}+{length:#x}, whose contents are not durable")

    def check_write(self, offset: int, new: bytes) -> None:
        """Record every rule the write ``new`` at ``offset`` would break (qcow2 images)."""
        if not self.qcow2:
            return
        end = offset + len(new)
        lay = parse_header(self.current(0, HEADER_BYTES))
        cs = lay.cluster_size

        def old_new(start: int, length: int) -> tuple[bytes, bytes] | None:
            lo, hi = max(start, offset), min(start + length, end)
            if lo >= hi:
                return None
            before = self.current(start, length)
            after = bytearray(before)
            after[lo - start:hi - start] = new[lo - offset:hi - offset]
            return before, bytes(after)

        header = old_new(0, HEADER_BYTES)
        if header is not None:
            old_h, new_h = (parse_header(h) for h in header)
            if (new_h.l1_offset, new_h.l1_size) != (old_h.l1_offset, old_h.l1_size):
                self._needs_durable_contents("header (L1 table)", new_h.l1_offset, new_h.l1_size * 8)
            if (new_h.reftable_offset, new_h.reftable_clusters) != (old_h.reftable_offset,
                                                                     old_h.reftable_clusters):
                self._needs_durable_contents("header (refcount table)", new_h.reftable_offset,
                                             new_h.reftable_clusters * cs)
            if old_h.dirty and not new_h.dirty:
                if self.pending:
                    self._fail(f"dirty bit cleared while {len(self.pending)} writes are not durable")
                current = Image(self.current)
                for host in sorted(current.referenced()):
                    if current.refcount(host) == 0:
                        self._fail(f"dirty bit cleared while cluster {host:#x} has refcount 0")
                        break

        l1 = old_new(lay.l1_offset, lay.l1_size * 8)
        if l1 is not None:
            for old_e, new_e in zip(entries(l1[0]), entries(l1[1]), strict=True):
                target = new_e & OFFSET_MASK
                if target and target != old_e & OFFSET_MASK:
                    self._needs_durable_contents("L1 entry", target, cs)
                    self._needs_durable_refcount("L1 entry", target)
                    for entry in entries(self.current(target, cs)):
                        if entry & OFFSET_MASK and not entry & COMPRESSED:
                            self._needs_durable_refcount("new L2 table", entry & OFFSET_MASK)

        table = old_new(lay.reftable_offset, lay.reftable_clusters * cs)
        if table is not None:
            for old_e, new_e in zip(entries(table[0]), entries(table[1]), strict=True):
                if new_e & ~0x1FF and new_e != old_e:
                    self._needs_durable_contents("refcount table entry", new_e & ~0x1FF, cs)

        current = Image(self.current)
        for l2 in current.l2_tables():
            change = old_new(l2, cs)
            if change is None:
                continue
            for old_e, new_e in zip(entries(change[0]), entries(change[1]), strict=True):
                target = new_e & OFFSET_MASK
                if target and not new_e & COMPRESSED and target != old_e & OFFSET_MASK:
                    self._needs_durable_refcount("L2 entry", target)

        if not self.durable_image().layout.dirty:
            per_block = lay.refcounts_per_block
            for block_index, block in enumerate(current.reftable()):
                block &= ~0x1FF
                if not block or old_new(block, cs) is None:
                    continue
                before = Image(self.current)
                after_bytes = bytearray(self.current(0, max(block + cs, end)))
                after_bytes[offset:end] = new
                after = Image(reader_of(after_bytes))
                for index in range(per_block):
                    host = (block_index * per_block + index) << lay.cluster_bits
                    if (before._refcount_in(block, index) and not after._refcount_in(block, index)
                            and host in self.durable_refs()):
                        self._fail(f"refcount of cluster {host:#x} dropped to 0 while durable "
                                   "metadata still points at it")


# --- fixtures --------------------------------------------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def create(path: Path, size: str = "4M", opts: str = "cluster_size=512") -> None:
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), size).check_returncode()


def assert_check_clean(path: Path) -> None:
    result = qemu_img("check", "--output=json", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"leaks"' not in result.stdout and '"corruptions"' not in result.stdout, result.stdout


@pytest.fixture
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            qemu_utils: None) -> Iterator[Callable[..., tuple[BlockGraph, BlockNode, PowerLossDisk]]]:
    """Open a fresh qcow2 image as node ``d`` with a PowerLossDisk on its file."""
    opened: list[tuple[BlockGraph, PowerLossDisk]] = []

    def open_image(opts: str = "cluster_size=512", size: str = "4M",
                   **node: Any) -> tuple[BlockGraph, BlockNode, PowerLossDisk]:
        path = tmp_path / "disk.qcow2"
        create(path, size, opts)
        disk = PowerLossDisk(path, monkeypatch)
        graph = BlockGraph()
        spec = {"driver": "qcow2", "node-name": "d", "discard": "unmap",
                "file": {"driver": "file", "filename": str(path)}, **node}
        root = graph.open(spec)
        opened.append((graph, disk))
        return graph, root, disk

    yield open_image
    for graph, disk in opened:
        graph.close_all()
        disk.close()


def pattern(byte: int, length: int) -> bytes:
    return bytes([byte]) * length


# --- the write paths -------------------------------------------------------------------


def test_allocating_writes_l2_and_refcount_blocks_keep_the_order(watched: Any, tmp_path: Path) -> None:
    # 512-byte clusters: an L2 table maps 32 KiB, a refcount block covers 128 KiB of file,
    # so 1.5 MiB of scattered writes allocate many L2 tables and refcount blocks and grow
    # the refcount table.
    graph, node, disk = watched()
    for i in range(48):
        node.pwrite(i * 32 * 1024 + 512 * (i % 7), pattern(i + 1, 700))
        if i % 5 == 4:
            node.flush()
    node.flush()
    graph.inactivate(node)
    assert disk.violations == []
    assert disk.syncs > 10
    graph.close_all()
    assert_check_clean(tmp_path / "disk.qcow2")


def test_lazy_refcounts_set_dirty_before_and_clear_it_last(watched: Any, tmp_path: Path) -> None:
    graph, node, disk = watched("cluster_size=512,lazy_refcounts=on")
    for i in range(40):
        node.pwrite(i * 16 * 1024, pattern(i + 1, 1500))
    assert parse_header(disk.durable[:HEADER_BYTES]).dirty  # set and made durable first
    node.flush()
    graph.inactivate(node)
    assert disk.violations == []
    assert not parse_header(disk.durable[:HEADER_BYTES]).dirty
    # Clean again, and a write into an L2 table that exists already (no allocation of
    # metadata, so no other flush): the dirty bit must still be durable before the L2
    # entry for the new cluster is written.
    graph.activate(node)
    syncs = disk.syncs
    node.pwrite(3 * 512, pattern(0xEE, 512))
    assert disk.syncs == syncs + 1 and parse_header(disk.durable[:HEADER_BYTES]).dirty
    node.flush()
    graph.inactivate(node)
    assert disk.violations == []
    assert not parse_header(disk.durable[:HEADER_BYTES]).dirty
    graph.close_all()
    assert_check_clean(tmp_path / "disk.qcow2")


def test_discard_and_zeroing_free_clusters_only_after_the_tables_forget_them(
        watched: Any, tmp_path: Path) -> None:
    graph, node, disk = watched()
    for i in range(32):
        node.pwrite(i * 4096, pattern(i + 1, 4096))
    node.flush()
    node.pdiscard(8 * 4096, 8 * 4096)
    node.pwrite_zeroes(20 * 4096, 4 * 4096, may_unmap=True)
    # Reuse the freed clusters straight away.
    for i in range(12):
        node.pwrite(200 * 4096 + i * 4096, pattern(0x80 + i, 4096))
    node.flush()
    graph.inactivate(node)
    assert disk.violations == []
    graph.close_all()
    assert_check_clean(tmp_path / "disk.qcow2")
    image = Image(reader_of((tmp_path / "disk.qcow2").read_bytes()))
    assert image.guest_read(8 * 4096, 8 * 4096) == bytes(8 * 4096)
    assert image.guest_read(200 * 4096, 4096) == pattern(0x80, 4096)
    assert image.guest_read(7 * 4096, 4096) == pattern(8, 4096)


# --- resize and copy-on-write ----------------------------------------------------------


class Guest:
    """A node, what the guest wrote to it, and what it had flushed; a power loss at each
    fdatasync is checked with :func:`worst_power_loss`."""

    def __init__(self, node: BlockNode, disk: PowerLossDisk, size: int,
                 initial: bytes | None = None, backing: Reader | None = None) -> None:
        self.node = node
        self.size = size
        self.model = bytearray(initial if initial is not None else bytes(size))
        self.flushed = bytearray(self.model)
        self.touched: list[tuple[int, int]] = []
        self.crashes: list[str] = []
        disk.on_sync = lambda d: worst_power_loss(d, self.size, self.flushed, self.touched,
                                                  self.crashes, backing)

    def write(self, offset: int, data: bytes) -> None:
        self.node.pwrite(offset, data)
        self.model[offset:offset + len(data)] = data
        self.touched.append((offset, offset + len(data)))

    def flush(self) -> None:
        self.node.flush()
        self.flushed[:] = self.model
        self.touched.clear()

    def resize(self, size: int) -> None:
        """block_resize: the node's truncate. What is past the new end is gone; a grown
        area reads as zeroes. The resize is durable when it returns (qcow2_co_truncate
        flushes its header write). While it runs, what is past a new, smaller end may
        read as before or as zeroes."""
        if size < self.size:
            self.touched.append((size, self.size))
        self.node.truncate(size)
        self.size = size
        for buf in (self.model, self.flushed):
            del buf[size:]
            buf.extend(bytes(size - len(buf)))
        self.touched = [(a, min(b, size)) for a, b in self.touched if a < size]


def test_block_resize_grow_moves_the_l1_table_only_once_it_is_durable(
        watched: Any, tmp_path: Path) -> None:
    """Growing 4 MiB -> 16 MiB with 512-byte clusters: the L1 table (128 -> 512 entries)
    moves to new clusters. Its copy and its refcount are durable before the header
    points at it; the old table's refcount drops only once the durable header no longer
    points at it; writes past the old end then allocate L2 tables in the new table."""
    graph, node, disk = watched(size="4M")
    guest = Guest(node, disk, 4 << 20)
    for i in range(24):
        guest.write(i * 160 * 1024 + 512 * (i % 3), pattern(i + 1, 900))
    guest.flush()
    old_l1 = parse_header(disk.durable[:HEADER_BYTES]).l1_offset
    guest.resize(16 << 20)
    layout = parse_header(disk.durable[:HEADER_BYTES])
    assert (layout.l1_size, disk.pending) == (512, [])
    assert layout.l1_offset != old_l1
    for i in range(12):
        guest.write((4 << 20) + i * (1 << 20) + 700, pattern(0x40 + i, 1200))
        if i % 4 == 3:
            guest.flush()
    guest.flush()
    graph.inactivate(node)
    assert disk.violations == []
    assert guest.crashes == []
    assert disk.syncs > 10
    graph.close_all()
    path = tmp_path / "disk.qcow2"
    assert_check_clean(path)
    assert Image(reader_of(path.read_bytes())).guest_read(0, 16 << 20) == bytes(guest.model)


def test_block_resize_shrink_unlinks_before_it_frees(watched: Any, tmp_path: Path) -> None:
    """Shrinking 4 MiB -> 320 KiB with 512-byte clusters and 64-bit refcounts (a refcount
    block covers 32 KiB of the file): the clusters past the end are
    unmapped before their refcounts drop, the L1 entries past the end are zeroed durably
    before their L2 tables are freed, and refcount blocks that count nothing leave the
    durable refcount table before they are freed. What the guest flushed below the new
    end survives a power loss at any point."""
    graph, node, disk = watched("cluster_size=512,refcount_bits=64", size="4M")
    guest = Guest(node, disk, 4 << 20)
    for i in range(40):
        guest.write(i * 100 * 1024 + 512 * (i % 5), pattern(i + 1, 2000))
    guest.flush()
    # Not flushed (may read old or new), in clusters allocated already.
    guest.write(200 * 1024 + 1024, pattern(0x77, 2000))
    before = parse_header(disk.durable[:HEADER_BYTES])
    blocks_before = sum(1 for e in Image(reader_of(disk.durable)).reftable() if e)
    guest.resize(320 * 1024)
    assert disk.pending == []
    after = Image(reader_of(disk.durable))
    assert struct.unpack_from(">Q", disk.durable, 24)[0] == 320 * 1024
    # 512-byte clusters: an L1 entry maps 32 KiB, so 10 entries stay.
    assert all(e == 0 for e in after.l1()[10:]) and before.l1_size == after.layout.l1_size
    assert sum(1 for e in after.reftable() if e) < blocks_before
    guest.write(100 * 1024, pattern(0x99, 3000))
    guest.flush()
    graph.inactivate(node)
    assert disk.violations == []
    assert guest.crashes == []
    graph.close_all()
    path = tmp_path / "disk.qcow2"
    assert_check_clean(path)
    assert Image(reader_of(path.read_bytes())).guest_read(0, 320 * 1024) == bytes(guest.model)


@pytest.mark.parametrize("cluster_size, lazy", [(512, False), (65536, False), (512, True),
                                                (65536, True)])
def test_copy_on_write_from_a_backing_file_is_durable_before_the_l2_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qemu_utils: None,
        cluster_size: int, lazy: bool) -> None:
    """Partial writes to clusters the backing file provides: the new cluster holds the
    guest's bytes and the backing file's around them (QEMU's perform_cow). That copy is
    data the guest already had, so it must be durable before an L2 entry points at the
    new cluster (qcow2_cache_depends_on_flush): a power loss at any fdatasync keeps the
    backing file's bytes around the guest's. With lazy refcounts no refcount flush comes
    first: that dependency alone orders them."""
    size = 1 << 20
    base = tmp_path / "base.raw"
    base_data = bytes((i * 7 + 3) % 251 for i in range(size))
    base.write_bytes(base_data)
    path = tmp_path / "disk.qcow2"
    opts = f"cluster_size={cluster_size}" + (",lazy_refcounts=on" if lazy else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, "-b", str(base),
             "-F", "raw", str(path), str(size)).check_returncode()
    disk = PowerLossDisk(path, monkeypatch)
    graph = BlockGraph()
    try:
        node = graph.open({"driver": "qcow2", "node-name": "d",
                           "file": {"driver": "file", "filename": str(path)}})
        guest = Guest(node, disk, size, base_data, reader_of(base_data))
        clusters = size // cluster_size
        for i in range(24):
            offset = (i * 5 % clusters) * cluster_size + 100 + 37 * i
            guest.write(offset, pattern(0xA0 + i, 300 + 11 * i))
            if i % 3 == 2:
                guest.flush()
        guest.flush()
        graph.inactivate(node)
    finally:
        graph.close_all()
        disk.close()
    assert disk.violations == []
    assert guest.crashes == []
    assert Image(reader_of(path.read_bytes()), reader_of(base_data)).guest_read(0, size) == \
        bytes(guest.model)
    assert_check_clean(path)


# --- a property: any power loss keeps what the guest flushed ---------------------------


def worst_power_loss(disk: PowerLossDisk, size: int, flushed: bytes | bytearray,
                     touched: list[tuple[int, int]], crashes: list[str],
                     backing: Reader | None = None) -> None:
    """The worst power loss for metadata, as of now: every volatile metadata write reached
    the disk, no volatile data write did. The guest must still read what it had flushed
    (``flushed``; a backing file's bytes count as flushed); the ranges in ``touched``,
    written since the last flush, may read old or new. Failures go to ``crashes``."""
    current = Image(disk.current)
    lay = current.layout
    cs = lay.cluster_size
    meta = [(0, cs), (lay.l1_offset, lay.l1_size * 8),
            (lay.reftable_offset, lay.reftable_clusters * cs)]
    meta += [(t, cs) for t in current.l2_tables()]
    meta += [(b & ~0x1FF, cs) for b in current.reftable() if b & ~0x1FF]

    def is_meta(offset: int, data: bytes) -> bool:
        return any(o < offset + len(data) and offset < o + n for o, n in meta)

    crashed = Image(reader_of(disk.crash_image(is_meta)), backing)
    seen = crashed.guest_read(0, size)
    expected = bytearray(flushed)
    for start, end in touched:
        expected[start:end] = seen[start:end]
    if expected != seen:
        first = next(i for i in range(size) if expected[i] != seen[i])
        crashes.append(f"guest byte {first:#x} reads {seen[first]:#x}, "
                       f"flushed {flushed[first]:#x} (after {disk.syncs} fdatasyncs)")

OPS = st.lists(
    st.tuples(st.sampled_from(["write", "write", "write", "zero", "discard", "flush"]),
              st.integers(0, 255), st.integers(1, 6000), st.integers(1, 255)),
    min_size=1, max_size=20)


@pytest.mark.qemu
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS, lazy=st.booleans())
def test_power_loss_at_any_fdatasync_keeps_flushed_data(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int, int]],
        lazy: bool, qemu_utils: None) -> None:
    size = 256 * 4096
    tmp = tmp_path_factory.mktemp("pl")
    path = tmp / "disk.qcow2"
    create(path, "1M", "cluster_size=512" + (",lazy_refcounts=on" if lazy else ""))
    with pytest.MonkeyPatch.context() as mp:
        disk = PowerLossDisk(path, mp)
        graph = BlockGraph()
        node = graph.open({"driver": "qcow2", "node-name": "d", "discard": "unmap",
                           "file": {"driver": "file", "filename": str(path)}})
        model = bytearray(size)        # what the guest wrote
        flushed = bytearray(size)      # ... as of its last flush
        touched: list[tuple[int, int]] = []  # ranges written since that flush
        crashes: list[str] = []

        def metadata_only(disk: PowerLossDisk) -> None:
            worst_power_loss(disk, size, flushed, touched, crashes)

        disk.on_sync = metadata_only
        try:
            for op, start, length, byte in ops:
                offset = start * 4096 % size
                length = min(length, size - offset)
                if op == "write":
                    node.pwrite(offset, pattern(byte, length))
                    model[offset:offset + length] = pattern(byte, length)
                elif op == "zero":
                    node.pwrite_zeroes(offset, length, may_unmap=bool(byte & 1))
                    model[offset:offset + length] = bytes(length)
                elif op == "discard":
                    # Only the whole clusters in the range go (QEMU's bdrv_co_pdiscard
                    # aligns to the cluster size); without a backing file they read as 0.
                    node.pdiscard(offset, length)
                    length = length // 512 * 512
                    model[offset:offset + length] = bytes(length)
                else:
                    node.flush()
                    flushed[:] = model
                    touched.clear()
                    continue
                touched.append((offset, offset + length))
            node.flush()
            flushed[:] = model
            graph.inactivate(node)
        finally:
            graph.close_all()
            disk.close()
        assert disk.violations == []
        assert crashes == []
        assert Image(reader_of(path.read_bytes())).guest_read(0, size) == bytes(model)
    assert_check_clean(path)


# --- flush reaches fdatasync, and a failed one sticks ----------------------------------


def test_flush_after_write_zeroes_reaches_fdatasync(watched: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(pattern(0x5A, 1 << 20))
    graph = BlockGraph()
    node = graph.open({"driver": "raw", "node-name": "r",
                       "file": {"driver": "file", "filename": str(raw)}})
    disk = PowerLossDisk(raw, monkeypatch, qcow2=False)
    try:
        node.flush()
        assert disk.syncs == 0  # nothing written: nothing to sync
        node.pwrite_zeroes(4096, 8192)
        assert disk.pending
        node.flush()
        assert disk.syncs == 1 and not disk.pending
        assert disk.durable[4096:4096 + 8192] == bytes(8192)
        node.pdiscard(0, 4096)  # discard=ignore: dropped before the file
        node.flush()
        assert disk.syncs == 1
    finally:
        graph.close_all()
        disk.close()


def test_failed_fdatasync_fails_every_later_flush_through_the_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    graph = BlockGraph()
    node = graph.open({"driver": "raw", "node-name": "r",
                       "file": {"driver": "file", "filename": str(raw)}})
    calls: list[int] = []
    real = os.fdatasync

    def failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)
    try:
        node.pwrite(0, b"lost?")
        for _ in range(3):
            with pytest.raises(BlockError, match="^Input/output error$"):
                node.flush()
        # Another write does not make it succeed either: the pages may be gone.
        node.pwrite(512, b"more")
        with pytest.raises(BlockError, match="^Input/output error$"):
            node.flush()
        assert len(calls) == 1
    finally:
        graph.close_all()
