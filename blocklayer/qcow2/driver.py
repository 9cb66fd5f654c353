"""The qcow2 format driver (``driver: "qcow2"``)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..dirtybitmap import DirtyBitmap
from ..driver import (
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_RECURSE,
    BLOCK_ZERO,
    BackingRequest,
    BlockDriver,
    ChildIO,
    DriverStatus,
)
from ..errors import BlockError
from ..perm import ChildRole
from . import bitmaps as BM
from . import datapath, resize
from . import snapshotops as SN
from . import status as ST
from .errors import CorruptionReport, Qcow2Corruption
from .header import COMPAT_LAZY_REFCOUNTS, COMPRESSION_NAMES, INCOMPAT_CORRUPT
from .image import HEADER_READ, Qcow2Image, open_image
from .l2 import ClusterType
from .options import Qcow2Options
from .repair import repair_image
from .snapshot import NO_ICOUNT, Snapshot

#: Default for new drivers' ``skip_invalidate_for_tests``. Only tests set this, to show
#: what goes wrong when stale metadata survives activation.
SKIP_INVALIDATE_FOR_TESTS = False

R = TypeVar("R")

log = logging.getLogger(__name__)

#: Told about every corruption the driver signals (the QMP layer makes it an event).
CorruptionListener = Callable[["Qcow2Driver", CorruptionReport], None]


class Qcow2Driver(BlockDriver):
    """qcow2 images (v2/v3) on top of the ``file`` child, with an optional backing child."""

    name = "qcow2"
    file_role = ChildRole.image()
    supports_backing = True
    # qcow2_strong_runtime_opts (encryption is not modelled: no image here has a key).
    strong_runtime_opts = ("encrypt.key-secret",)

    def __init__(self, skip_invalidate_for_tests: bool | None = None,
                 corruption_listener: CorruptionListener | None = None) -> None:
        super().__init__()
        self.corruption_listener = corruption_listener
        #: QEMU's ``bs->drv = NULL`` after a fatal corruption: every request then fails
        #: with ENOMEDIUM until the node is deleted.
        self.ejected = False
        self._signaled = False
        self._img: Qcow2Image | None = None
        self._options: Mapping[str, Any] = {}
        self._read_only = True
        self._inactive = False
        #: The node's dirty bitmaps (BlockNode.dirty_bitmaps, shared): persistent ones
        #: are loaded into it on open/activation and stored from it on inactivation.
        self._bitmaps: list[DirtyBitmap] = []
        self._node_name = ""
        #: QEMU's metadata_preallocation(_checked), for the image it was decided on.
        self._metadata_preallocation: tuple[Qcow2Image, bool] | None = None
        #: Test-only: make invalidate_cache() keep all cached metadata (unsafe).
        self.skip_invalidate_for_tests = (SKIP_INVALIDATE_FOR_TESTS
                                          if skip_invalidate_for_tests is None
                                          else skip_invalidate_for_tests)

    # -- lifecycle -----------------------------------------------------------------

    def bind_dirty_bitmaps(self, bitmaps: list[DirtyBitmap], node_name: str) -> None:
        """Share the node's bitmap list (called by BlockNode before open)."""
        self._bitmaps = bitmaps
        self._node_name = node_name

    def open(self, options: Mapping[str, Any], *, read_only: bool, inactive: bool) -> None:
        """Read and validate the header, L1 and refcount table (see image.open_image)."""
        if self.file is None:
            raise BlockError("qcow2 needs a file child", errno.EINVAL)
        self._options = dict(options)
        self._read_only = read_only
        self._inactive = inactive
        self._img = _open_and_repair(self.file, self._options, read_only=read_only,
                                     inactive=inactive, bitmaps=self._bitmaps)

    def close(self) -> None:
        """Drop all state; never writes.

        The graph inactivates writable nodes first (which stores their bitmaps); QEMU's
        qcow2_close tries the store on any active node, so a persistent bitmap added to a
        read-only node is reported lost here, as QEMU reports it.
        """
        img = self._img
        if img is not None and not self._inactive and not self.ejected and not img.writable:
            try:
                BM.store_bitmaps(img, self._bitmaps)  # writes nothing: the image is read-only
            except BlockError as exc:
                log.error("Lost persistent bitmaps during inactivation of node '%s': %s",
                          self._node_name, exc)
        if img is not None:
            img.drop()
        self._img = None

    def _image(self) -> Qcow2Image:
        if self.ejected:
            raise BlockError(os.strerror(errno.ENOMEDIUM), errno.ENOMEDIUM)
        return self._opened()

    def _opened(self) -> Qcow2Image:
        # The image state, also after a fatal corruption (queries still describe it).
        if self._img is None:
            if self.ejected:  # the re-open failed (bdrv_nb_sectors: no driver)
                raise BlockError(os.strerror(errno.ENOMEDIUM), errno.ENOMEDIUM)
            raise BlockError("qcow2 node is not open", errno.EBADF)
        return self._img

    def _writable_image(self, offset: int, length: int) -> Qcow2Image:
        img = self._image()
        if offset < 0 or length < 0 or offset + length > img.virtual_size:
            raise BlockError("Request beyond the end of the image", errno.EINVAL)
        if not img.writable:
            if self._inactive:
                raise BlockError("qcow2 node is inactive", errno.EPERM)
            if img.hdr.incompatible_features & INCOMPAT_CORRUPT:
                raise BlockError("qcow2: Image is corrupt; cannot be written", errno.EIO)
            raise BlockError("qcow2 node is read-only", errno.EACCES)
        img.maybe_clean_caches()
        return img

    def _guard(self, img: Qcow2Image, fn: Callable[[], R]) -> R:
        try:
            return fn()
        except Qcow2Corruption as exc:
            self._signal_corruption(img, exc)
            raise

    def _signal_corruption(self, img: Qcow2Image, exc: Qcow2Corruption) -> None:
        """QEMU's qcow2_signal_corruption.

        On a writable image the corruption is fatal: once metadata is known to be wrong
        any further write could spread the damage, so the corrupt bit is set and the
        node becomes unusable. A read-only image is only reported (the request fails).
        Either way only the first event is reported, as QEMU suppresses the rest.
        """
        fatal = img.writable
        first = not self._signaled
        self._signaled = True
        if fatal:
            img.mark_corrupt()
            self.ejected = True
        if first and self.corruption_listener is not None:
            self.corruption_listener(self, CorruptionReport(exc.detail, exc.offset, exc.size,
                                                            fatal))

    # -- I/O -----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes; unallocated clusters come from the backing child or read as zeroes."""
        img = self._image()
        img.maybe_clean_caches()
        return self._guard(img, lambda: datapath.read(img, self.backing, offset, length))

    def write(self, offset: int, data: bytes) -> None:
        """Write guest data (allocating, COWing from backing/old clusters as needed)."""
        img = self._writable_image(offset, len(data))
        self._guard(img, lambda: datapath.write(img, self.backing, offset, bytes(data)))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Zero clusters on v3 (freed when ``may_unmap``); on v2 see datapath.write_zeroes."""
        img = self._writable_image(offset, length)
        self._guard(img, lambda: datapath.write_zeroes(img, self.backing, offset, length,
                                                       may_unmap))

    def zero_may_unmap(self) -> bool:
        """qcow2_do_open: only version 3 images have zero clusters to unmap into."""
        return self._img is not None and self._img.version >= 3

    def discard(self, offset: int, length: int) -> None:
        """Deallocate whole clusters in the range (QEMU's qcow2_co_pdiscard)."""
        img = self._writable_image(offset, length)
        self._guard(img, lambda: datapath.discard(img, self.backing, offset, length))

    def make_empty(self) -> None:
        """qcow2_make_empty's general path: every cluster of the image is discarded
        (unallocated, references dropped), so reads go to the backing file. QEMU takes a
        shortcut on v3 images without snapshots or bitmaps (make_completely_empty
        rebuilds the metadata from scratch in a smaller file); the guest view and
        ``qemu-img check`` are the same, the file keeps its length here."""
        img = self._writable_image(0, 0)
        self._guard(img, lambda: datapath.full_discard(img, 0, img.virtual_size))

    def block_status(self, want_zero: bool, offset: int, length: int,
                     allocated_file_size: Callable[[], int | None]) -> DriverStatus:
        """qcow2_co_block_status: what the L2 entries say about the range.

        Unallocated clusters are neither data nor zero (the caller asks the backing
        file); zero clusters are zero, with their host offset if preallocated; normal
        and compressed clusters are data, only normal ones with a host offset. When
        the image looks metadata-preallocated, data is marked for the file to refine.
        """
        img = self._image()
        img.maybe_clean_caches()
        if want_zero and (self._metadata_preallocation is None
                          or self._metadata_preallocation[0] is not img):
            self._metadata_preallocation = (
                img, self._detect_metadata_preallocation(img, allocated_file_size))
        kind, pnum, host = self._guard(img, lambda: ST.host_offset(img, offset, length))
        flags = 0
        if kind in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
            flags |= BLOCK_OFFSET_VALID
        if kind in (ClusterType.ZERO_PLAIN, ClusterType.ZERO_ALLOC):
            flags |= BLOCK_ZERO
        elif kind != ClusterType.UNALLOCATED:
            flags |= BLOCK_DATA
        prealloc = self._metadata_preallocation
        if (prealloc is not None and prealloc[1] and flags & BLOCK_DATA
                and flags & BLOCK_OFFSET_VALID):
            flags |= BLOCK_RECURSE
        return DriverStatus(flags, pnum, host if flags & BLOCK_OFFSET_VALID else 0,
                            self.file if flags & BLOCK_OFFSET_VALID else None)

    def _detect_metadata_preallocation(self, img: Qcow2Image,
                                       allocated_file_size: Callable[[], int | None]) -> bool:
        # qcow2_co_block_status ignores a failed check (a corrupt refcount table is
        # still signalled): the image is then taken as not preallocated.
        try:
            allocated = allocated_file_size()
            if allocated is None:
                return False
            return ST.detect_metadata_preallocation(img, img.file.getlength(), allocated)
        except Qcow2Corruption as exc:
            self._signal_corruption(img, exc)
            return False
        except BlockError:
            return False

    def flush(self) -> None:
        """Write back L2 then refcount caches (dependency order), then flush the file."""
        if self.ejected:
            return  # QEMU: flushing a node without a driver succeeds and does nothing
        img = self._image()
        self._guard(img, img.flush)

    def truncate(self, length: int, zero_new: bool = False) -> None:
        """qcow2_co_truncate, preallocation off (see :mod:`.resize`)."""
        img = self._writable_image(0, 0)
        old_length = self.getlength()
        self._guard(img, lambda: resize.truncate(img, self.backing, length, old_length, zero_new))

    def getlength(self) -> int:
        """Virtual size, in whole 512-byte sectors as QEMU counts it."""
        return self._opened().virtual_size // 512 * 512

    # -- activation ----------------------------------------------------------------

    def inactivate(self) -> None:
        """Flush caches, clear the dirty bit, make it durable; no writes afterwards."""
        if self.ejected:
            self._inactive = True
            return
        img = self._image()
        self._guard(img, lambda: self._store_and_inactivate(img))
        self._inactive = True

    def _store_and_inactivate(self, img: Qcow2Image) -> None:
        """qcow2_inactivate: store persistent bitmaps, write back caches, mark clean.

        A bitmap that cannot be stored is reported and the image is left dirty-free but
        not marked clean, as QEMU does; the inactivation then fails.
        """
        try:
            BM.store_bitmaps(img, self._bitmaps)
        except Qcow2Corruption:
            raise
        except BlockError as exc:
            message = (f"Lost persistent bitmaps during inactivation of node "
                       f"'{self._node_name}': {exc}")
            log.error("%s", message)
            img.inactivate(mark_clean=False)
            raise BlockError(message, exc.errno) from exc
        img.inactivate()

    def invalidate_cache(self) -> None:
        """Drop every cache and all in-memory metadata, then open the image again."""
        img = self._image()
        if self.skip_invalidate_for_tests:
            self._inactive = False
            img.writable = not self._read_only
            return
        if not self._inactive:
            # qcow2_co_invalidate_cache closes the driver first: an active node stores
            # (and releases) its persistent bitmaps, which the re-open loads again.
            self._guard(img, lambda: self._store_and_inactivate(img))
        img.drop()
        self._img = None
        self._inactive = False
        assert self.file is not None
        try:
            self._img = _open_and_repair(self.file, self._options, read_only=self._read_only,
                                         inactive=False, opts=img.opts, bitmaps=self._bitmaps)
        except BlockError as exc:
            # qcow2_co_invalidate_cache: a failed reopen leaves the node without a driver
            # (bs->drv = NULL), exactly like a fatal corruption.
            self.ejected = True
            raise BlockError(f"Could not reopen qcow2 layer: {exc}", exc.errno) from exc

    def metadata_ranges(self) -> Sequence[tuple[int, int]]:
        """Header, L1 and refcount table as this node last knew them (open_image's reads)."""
        ranges = [(0, HEADER_READ)]
        img = self._img
        if img is not None and not self.ejected:
            hdr = img.hdr
            if hdr.l1_size:
                ranges.append((hdr.l1_table_offset, hdr.l1_size * 8))
            ranges.append((hdr.refcount_table_offset, hdr.refcount_table_clusters * img.cluster_size))
        return ranges

    # -- persistent dirty bitmaps (QEMU's bdrv_co_*_dirty_bitmap callbacks) ---------

    def default_bitmap_granularity(self) -> int:
        """The cluster size, which bdrv_get_default_bitmap_granularity clamps."""
        return self._opened().cluster_size

    def can_store_new_dirty_bitmap(self, name: str, granularity: int, node_name: str) -> None:
        """qcow2_co_can_store_new_dirty_bitmap: raise with QEMU's text if it cannot."""
        BM.can_store_new(self._image(), self._bitmaps, name, granularity, node_name)

    def remove_persistent_dirty_bitmap(self, name: str) -> None:
        """qcow2_co_remove_persistent_dirty_bitmap: drop it from the image now."""
        img = self._image()
        self._guard(img, lambda: BM.remove_persistent(img, name))

    # -- internal snapshots (QEMU's bdrv_snapshot_* callbacks) ---------------------

    def snapshot_list(self) -> list[Snapshot]:
        """qcow2_snapshot_list: every entry of the image's snapshot table."""
        img = self._image()
        return list(self._guard(img, lambda: SN.load(img)))

    def snapshot_create(self, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int,
                        icount: int, vm_state_size: int = 0) -> Snapshot:
        """qcow2_snapshot_create: ``vm_state_size`` bytes of VM state were saved first
        (save_vmstate); the active tree lets go of them once the snapshot holds them."""
        img = self._writable_image(0, 0)

        def create() -> Snapshot:
            sn = SN.create(img, name, date_sec=date_sec, date_nsec=date_nsec,
                           vm_clock_nsec=vm_clock_nsec, icount=icount,
                           vm_state_size=vm_state_size)
            SN.discard_vmstate(img, self.backing, vm_state_size)
            return sn
        return self._guard(img, create)

    def save_vmstate(self, data: bytes) -> None:
        """qcow2_save_vmstate: the VM state, past the guest disk in the active tree."""
        img = self._writable_image(0, 0)
        self._guard(img, lambda: SN.save_vmstate(img, self.backing, data))

    def read_vmstate(self, size: int) -> bytes:
        """qcow2_load_vmstate: the VM state of the active tree (a snapshot's after goto)."""
        img = self._image()
        return self._guard(img, lambda: SN.read_vmstate(img, size))

    def snapshot_goto(self, id_or_name: str) -> None:
        """qcow2_snapshot_goto: the guest sees the snapshot's data from now on."""
        img = self._writable_image(0, 0)
        self._guard(img, lambda: SN.goto(img, id_or_name))

    def snapshot_delete(self, snapshot_id: str | None, name: str | None) -> None:
        """qcow2_snapshot_delete: the entry goes, its clusters are freed."""
        img = self._writable_image(0, 0)
        self._guard(img, lambda: SN.delete(img, snapshot_id, name))

    # -- information ---------------------------------------------------------------

    def _full_backing_path(self, name: str) -> str:
        if os.path.isabs(name) or self.file is None:
            return name
        base = self.file.bottom_filename
        if ":" in name.split("/", 1)[0]:
            return name
        return os.path.join(os.path.dirname(base), name)

    def backing_request(self) -> BackingRequest | None:
        """The backing file the header names, resolved against the image's directory."""
        hdr = self._opened().hdr
        if not hdr.backing_file:
            return None
        return BackingRequest(hdr.backing_file, self._full_backing_path(hdr.backing_file),
                              hdr.backing_format or None)

    def change_backing_file(self, filename: str, fmt: str) -> None:
        """qcow2_change_backing_file: the header names ``filename`` (with the backing
        format extension ``fmt``), or no backing file for "", rewritten in place
        (qcow2_update_header)."""
        img = self._image()
        if len(filename.encode("utf-8", "surrogateescape")) > 1023 or (fmt and not filename):
            raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
        if not img.writable:
            raise BlockError(os.strerror(errno.EACCES), errno.EACCES)
        old = img.hdr.backing_file, img.hdr.backing_format
        img.hdr.backing_file = filename or None
        img.hdr.backing_format = fmt or None
        try:
            img.update_header()
        except BlockError:
            img.hdr.backing_file, img.hdr.backing_format = old
            raise

    def image_info(self) -> dict[str, Any]:
        """cluster-size, dirty-flag, format-specific and backing names, as QEMU reports."""
        img = self._opened()
        hdr = img.hdr
        data: dict[str, Any]
        compression = COMPRESSION_NAMES.get(hdr.compression_type, "zlib")
        if hdr.version == 2:
            data = {"compat": "0.10", "compression-type": compression,
                    "refcount-bits": hdr.refcount_bits}
        else:
            # Members in the order QEMU 7.2 sends them (checked live); "bitmaps" only
            # when the image has some, read from its directory (qcow2_get_specific_info).
            data = {"compat": "1.1", "compression-type": compression,
                    "lazy-refcounts": bool(hdr.compatible_features & COMPAT_LAZY_REFCOUNTS)}
            bitmaps = self._bitmap_info(img)
            if bitmaps is not None:
                data["bitmaps"] = bitmaps
            data.update({"refcount-bits": hdr.refcount_bits,
                         "corrupt": bool(hdr.incompatible_features & INCOMPAT_CORRUPT),
                         "extended-l2": False})
        info: dict[str, Any] = {
            "cluster-size": img.cluster_size,
            "format-specific": {"type": "qcow2", "data": data},
            "dirty-flag": img.dirty,
        }
        snapshots = self._snapshot_info(img)
        if snapshots:
            info["snapshots"] = snapshots
        if hdr.backing_file:
            info["backing-filename"] = hdr.backing_file
            info["full-backing-filename"] = self._full_backing_path(hdr.backing_file)
            if hdr.backing_format:
                info["backing-filename-format"] = hdr.backing_format
        return info


    @staticmethod
    def _snapshot_info(img: Qcow2Image) -> list[dict[str, object]]:
        """ImageInfo's ``snapshots`` (bdrv_query_image_info: SnapshotInfo per entry,
        ``icount`` only when recorded); an unreadable table lists none."""
        try:
            snaps = SN.load(img)
        except BlockError:
            return []
        out: list[dict[str, object]] = []
        for sn in snaps:
            # Members in the order QEMU 7.2 writes them (its QDict's hash order, live).
            entry: dict[str, object] = {}
            if sn.icount != NO_ICOUNT:
                entry["icount"] = sn.icount
            entry.update({"vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000, "name": sn.name,
                          "date-sec": sn.date_sec, "date-nsec": sn.date_nsec,
                          "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000, "id": sn.id_str,
                          "vm-state-size": sn.vm_state_size})
            out.append(entry)
        return out

    @staticmethod
    def _bitmap_info(img: Qcow2Image) -> list[dict[str, object]] | None:
        try:
            return BM.info_list(img)
        except BlockError:
            # QEMU fails the whole query then; a broken directory refuses to open
            # read-write anyway, so only an inactive node can get here.
            return None


def _open_and_repair(child: ChildIO, options: Mapping[str, Any], *, read_only: bool,
                     inactive: bool, opts: Qcow2Options | None = None,
                     bitmaps: list[DirtyBitmap] | None = None) -> Qcow2Image:
    """open_image, then what qcow2_do_open does next, in its order: load the persistent
    bitmaps unless inactive (qcow2_load_dirty_bitmaps), rewrite the header if open_image
    found it owed and loading did not already, repair a dirty image when writable."""
    img = open_image(child, options, read_only=read_only, inactive=inactive, opts=opts)
    header_updated = False
    if not inactive:
        header_updated = BM.load_bitmaps(img, bitmaps if bitmaps is not None else [])
    if img.need_header_update and not header_updated:
        try:
            img.update_header()
        except BlockError as exc:
            code = exc.errno or errno.EIO
            raise BlockError(f"Could not update qcow2 header: {os.strerror(code)}",
                             code) from exc
    img.need_header_update = False
    if img.writable and img.dirty:
        repair_image(img)
    return img
