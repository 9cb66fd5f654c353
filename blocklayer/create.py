"""Image creation (QEMU's ``blockdev-create`` drivers): ``file`` and ``qcow2``.

``create_image`` runs under the graph lock, in a worker thread (it does file I/O and
fsyncs). Errors are BlockErrors with QEMU's texts; they become the job's error.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from .errors import BlockError
from .graph import BlockGraph
from .lockbytes import LockState
from .perm import ALL, RESIZE, WRITE

#: Drivers that can create images (the others answer QEMU's text for a driver without
#: ``bdrv_co_create``).
CREATE_DRIVERS = frozenset({"file", "qcow2"})


def check_driver(driver: str) -> None:
    """qmp_blockdev_create's check, made before any job exists."""
    if driver not in CREATE_DRIVERS:
        raise BlockError("Driver does not support blockdev-create")


class Creation(ABC):
    """A creation whose checks passed and whose resources are held; ``run`` does the I/O.

    QEMU's create functions fail before their first I/O (the first point where the job's
    coroutine yields) for bad options, a missing node, a conflicting user or lock; that
    is :func:`prepare_creation`. Everything after is :meth:`run`, in a worker thread.
    """

    #: Whether :meth:`run` touches the graph (and so needs its lock). A file creation
    #: works on its own file descriptor only: other block commands need not wait for it.
    needs_graph = True

    @abstractmethod
    def run(self) -> None:
        """Write the image; always releases what ``prepare_creation`` took."""


def prepare_creation(graph: BlockGraph, options: Mapping[str, Any]) -> Creation:
    """Check ``options`` (BlockdevCreateOptions) and take what the creation needs."""
    driver = options["driver"]
    check_driver(driver)
    if driver == "file":
        return _FileCreation(options)
    return _Qcow2Creation(graph, options)


def create_image(graph: BlockGraph, options: Mapping[str, Any]) -> None:
    """Create the image ``options`` describe, in one go."""
    prepare_creation(graph, options).run()


def _resize(fd: int, size: int, prealloc: str) -> None:
    # raw_regular_truncate -> handle_aiocb_truncate
    try:
        if prealloc == "off":
            os.ftruncate(fd, size)
        elif prealloc == "falloc":
            os.posix_fallocate(fd, 0, size) if size else None
            os.ftruncate(fd, size)
        elif prealloc == "full":
            chunk = bytes(1 << 20)
            pos = 0
            for _ in range(size // len(chunk) + 1):  # bounded by the size
                if pos >= size:
                    break
                n = min(len(chunk), size - pos)
                os.pwrite(fd, chunk[:n], pos)
                pos += n
            os.fsync(fd)
        else:
            raise BlockError(f"Unsupported preallocation mode: {prealloc}", errno.ENOTSUP)
    except OSError as err:
        code = err.errno or errno.EIO
        what = "Could not preallocate new data" if prealloc != "off" else "Failed to resize file"
        raise BlockError(f"{what}: {os.strerror(code)}", code) from err


class _FileCreation(Creation):
    """file-posix's raw_co_create: create (or empty) the file, lock it, give it its size."""

    needs_graph = False

    def __init__(self, options: Mapping[str, Any]) -> None:
        filename: str = options["filename"]
        self.size = options["size"] % (1 << 64)
        self.prealloc: str = options.get("preallocation", "off")
        if options.get("extent-size-hint", 1 << 20) % (1 << 64) > 0xFFFFFFFF:
            raise BlockError("Extent size hint is too large", errno.EINVAL)
        try:
            self.fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            code = err.errno or errno.EIO
            raise BlockError(f"Could not create '{filename}': {os.strerror(code)}", code) from err
        # We discard everything (write) and set the size (resize), and cannot share
        # resize: after this the file must have the size asked for.
        perm, shared = WRITE | RESIZE, ALL & ~RESIZE
        self.locks = LockState(self.fd)
        try:
            self.locks.apply(perm, ALL & ~shared, unlock=False)
            self.locks.check(perm, shared)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        try:
            self.locks.release_all()
        finally:
            os.close(self.fd)

    def run(self) -> None:
        try:
            _resize(self.fd, 0, "off")
            if self.size > (1 << 63) - 1:
                raise BlockError("Failed to resize file: File too large", errno.EFBIG)
            _resize(self.fd, self.size, self.prealloc)
        finally:
            self._release()


class _Qcow2Creation(Creation):
    """qcow2_co_create on the node ``options['file']`` names."""

    def __init__(self, graph: BlockGraph, options: Mapping[str, Any]) -> None:
        from .qcow2 import create as qcow2_create  # qcow2 is loaded on first use

        self._create = qcow2_create.create
        self.graph = graph
        ref = options["file"]
        # bdrv_open_blockdev_ref: a node by name, or a node tree opened for the job alone
        # (closed again when the job lets go of it).
        if isinstance(ref, str):
            found = graph.find(ref)
            if found is None:
                raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'", errno.ENODEV)
            self.node = found
        else:
            self.node = graph.open(ref)
            self.node.monitor_owned = False
        try:
            self.spec = qcow2_create.validate(options)
            # blk_new_with_bs(bs, WRITE | RESIZE, ALL): an anonymous BlockBackend writes it.
            self.edge = graph.add_user(self.node, "an unnamed block device", WRITE | RESIZE, ALL)
        except BaseException:
            graph.release(self.node)
            raise

    def run(self) -> None:
        try:
            self._create(self.node, self.spec)
        finally:
            self.graph.remove_user(self.edge)
            self.graph.release(self.node)


class _FdChild:
    """A ChildIO over a plain file descriptor: the file node ``qcow2_co_create_opts``
    opens on the file it just created, without a node in the graph."""

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self._filename = filename

    @property
    def node_name(self) -> str:
        return ""

    @property
    def filename(self) -> str:
        return self._filename

    @property
    def bottom_filename(self) -> str:
        return self._filename

    def has_info(self) -> bool:
        """Yes: a file."""
        return True

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data + bytes(length - len(data))

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:  # bounded: each pass writes at least one byte, or raises
            written = os.pwrite(self.fd, view, offset)
            if written <= 0:
                raise BlockError(os.strerror(errno.EIO), errno.EIO)
            view = view[written:]
            offset += written

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.pwrite(offset, bytes(length))

    def pdiscard(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def getlength(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)


def _opt_value(value: str) -> str:
    # qemu_opts_print's escaped_print: a string option's commas are doubled.
    return value.replace(",", ",,")


def overlay_format_line(filename: str, size: int, backing_file: str | None,
                        backing_format: str | None) -> str:
    """The line bdrv_img_create prints (unless quiet) before it creates a qcow2 image:
    ``Formatting 'FILE', fmt=qcow2`` and the creation options qemu_opts_print lists
    (qcow2's create options with a value or a default, in their list's order; the file
    name itself is printed as it is, string options with their commas doubled)."""
    backing = ""
    if backing_file is not None:
        backing = f" backing_file={_opt_value(backing_file)}"
        if backing_format is not None:
            backing += f" backing_fmt={_opt_value(backing_format)}"
    return (f"Formatting '{filename}', fmt=qcow2 cluster_size=65536 extended_l2=off "
            f"compression_type=zlib size={size}{backing} lazy_refcounts=off refcount_bits=16")


def create_raw_image(filename: str, size: int, announce: Callable[[str], None] | None = None) -> None:
    """bdrv_img_create for a raw image of ``size`` bytes (``qemu-img create -f raw``)."""
    if announce is not None:
        announce(f"Formatting '{filename}', fmt=raw size={size}")
    _FileCreation({"filename": filename, "size": size}).run()


def create_overlay_image(filename: str, size: int, backing_file: str | None, backing_format: str | None,
                         announce: Callable[[str], None] | None = None) -> None:
    """bdrv_img_create for a qcow2 overlay (``qemu-img create -f qcow2 -b F -F FMT``).

    The file is created (or emptied) as blockdev-create's file driver does, then the qcow2
    image is written with QEMU's defaults, the virtual size of the backing node and its
    filename and format as backing file. ``announce`` gets QEMU's ``Formatting ...`` line
    first (printed even when the creation then fails, as QEMU does); the block layer
    prints nothing itself.
    """
    from .qcow2 import create as qcow2_create  # qcow2 is loaded on first use

    # The size is the backing node's length, bdrv_getlength: whole sectors.
    size = -(-size // 512) * 512
    if announce is not None:
        announce(overlay_format_line(filename, size, backing_file, backing_format))
    _FileCreation({"filename": filename, "size": 0}).run()
    options: dict[str, Any] = {"size": size}
    if backing_file is not None:
        options["backing-file"] = backing_file
        if backing_format is not None:
            options["backing-fmt"] = backing_format
    spec = qcow2_create.validate(options)
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        code = err.errno or errno.EIO
        raise BlockError(f"Could not open '{filename}': {os.strerror(code)}", code) from err
    locks = LockState(fd)
    try:
        locks.apply(WRITE | RESIZE, ALL & ~(WRITE | RESIZE), unlock=False)
        locks.check(WRITE | RESIZE, ALL & ~(WRITE | RESIZE))
        try:
            qcow2_create.create(_FdChild(fd, filename), spec)
        except OSError as err:
            code = err.errno or errno.EIO
            raise BlockError(os.strerror(code), code) from err
    finally:
        locks.release_all()
        os.close(fd)
