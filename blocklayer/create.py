"""Image creation (QEMU's ``blockdev-create`` drivers): ``file`` and ``qcow2``.

``create_image`` runs under the graph lock, in a worker thread (it does file I/O and
fsyncs). Errors are BlockErrors with QEMU's texts; they become the job's error.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
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
        ref = options["file"]
        if not isinstance(ref, str):
            raise BlockError("Inline 'file' nodes are not supported by blockdev-create here; "
                             "add the node with blockdev-add and name it", errno.ENOTSUP)
        node = graph.find(ref)
        if node is None:
            raise BlockError(f"Cannot find device='{ref}' nor node-name='{ref}'", errno.ENODEV)
        self.spec = qcow2_create.validate(options)
        # blk_new_with_bs(bs, WRITE | RESIZE, ALL): an anonymous BlockBackend writes it.
        self.graph = graph
        self.node = node
        self.edge = graph.add_user(node, "an unnamed block device", WRITE | RESIZE, ALL)

    def run(self) -> None:
        try:
            self._create(self.node, self.spec)
        finally:
            self.graph.remove_user(self.edge)
