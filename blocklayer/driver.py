"""The contract between the block graph (:mod:`blocklayer.graph`) and the drivers.

A driver instance is the private state of one open node. The graph owns the node, its
children and the permission bookkeeping; the driver does the I/O. All calls come from one
thread at a time (the graph is guarded by one lock), so drivers need no locking.

Offsets and lengths are in bytes and need no alignment; a driver that needs alignment
(O_DIRECT) pads internally.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

from .errors import BlockError
from .perm import ChildRole


class ChildIO(Protocol):
    """What a driver may do with one of its children (the ``file`` or ``backing`` node).

    The graph implements it on top of the child node's driver and enforces the node's
    state: writing to an inactive or read-only child raises :class:`BlockError`.
    """

    @property
    def node_name(self) -> str: ...

    @property
    def filename(self) -> str:
        """The node's file name as QEMU reports it (``file`` of BlockDeviceInfo)."""
        ...

    @property
    def bottom_filename(self) -> str:
        """The exact file name at the bottom of the child's primary chain, the base of
        relative backing file names (QEMU's bdrv_dirname); "" when it has none."""
        ...

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes; what lies past the end reads as zeroes."""
        ...

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write ``data``; writing past the end grows the child."""
        ...

    def pwrite_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None: ...

    def pdiscard(self, offset: int, length: int) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable (fdatasync at the bottom)."""
        ...

    def getlength(self) -> int:
        """The exact length in bytes (for a file: its size)."""
        ...

    def truncate(self, length: int) -> None: ...

    def has_info(self) -> bool:
        """Whether bdrv_get_info succeeds on the child (see :meth:`BlockDriver.has_info`)."""
        ...


@dataclass(frozen=True)
class BackingRequest:
    """The backing image an image names in its own metadata (qcow2 header).

    ``filename`` is as stored in the image; ``path`` is resolved against the image's
    directory as QEMU does. ``format`` is None when the image does not say (QEMU then
    probes; we probe qcow2 by magic and fall back to raw).
    """

    filename: str
    path: str
    format: str | None


def whole_sectors(length: int) -> int:
    """``length`` as QEMU's block layer sees a node's length: in whole 512-byte sectors
    (bs->total_sectors, rounded up; bdrv_getlength), the partial last one reading as
    zeroes."""
    return (length + 511) // 512 * 512


#: QEMU's BDRV_BLOCK_* block-status flags (block-common.h), the same bit values.
BLOCK_DATA = 0x01
BLOCK_ZERO = 0x02
BLOCK_OFFSET_VALID = 0x04
BLOCK_RAW = 0x08
BLOCK_ALLOCATED = 0x10
BLOCK_EOF = 0x20
BLOCK_RECURSE = 0x40


class DriverStatus(NamedTuple):
    """A driver's answer to a block-status query (QEMU's bdrv_co_block_status callback).

    ``flags`` are BLOCK_* bits (never ALLOCATED or EOF: :mod:`blocklayer.blockstatus`
    derives those); ``pnum`` (> 0) is how many bytes from the queried offset share them;
    with BLOCK_OFFSET_VALID, ``map`` is where the offset lies in ``file``: a child of the
    node, or None for the node itself (a protocol driver's own storage).
    """

    flags: int
    pnum: int
    map: int = 0
    file: ChildIO | None = None


class BlockDriver(ABC):
    """One open instance of a block driver.

    Lifecycle, driven by the graph:

    1. ``__init__()``; for format drivers the graph sets :attr:`file` to the opened child.
    2. :meth:`open` with the driver-specific options (already validated by the schema) and
       the node's flags.
    3. If the node may have a backing child, the graph asks :meth:`backing_request` (when
       the ``backing`` option is absent), opens that node, and sets :attr:`backing`.
    4. I/O, :meth:`flush`, :meth:`inactivate` / :meth:`invalidate_cache` as the node's
       state changes.
    5. :meth:`close`. The graph calls :meth:`inactivate` first if the node is active and
       writable, so ``close`` itself must never write.
    """

    #: The QMP ``driver`` value.
    name: ClassVar[str]
    #: True for drivers at the bottom of the graph (``file``, ``null-co``): no children.
    protocol: ClassVar[bool] = False
    #: How a format driver uses its ``file`` child (decides the permissions it asks).
    file_role: ClassVar[ChildRole] = ChildRole.DATA | ChildRole.PRIMARY
    #: True if the format can have a backing image (qcow2).
    supports_backing: ClassVar[bool] = False
    #: QEMU's strong_runtime_opts: the driver's options that change what the node holds
    #: (null-co's ``size``), so that its file name must carry them (a ``json:`` name,
    #: see :meth:`blocklayer.node.BlockNode.refresh_filename`). A name ending in ``.``
    #: stands for every option under it.
    strong_runtime_opts: ClassVar[tuple[str, ...]] = ()
    #: QEMU's ``bs->drv == NULL``: the driver gave the node up (fatal corruption, failed
    #: re-open) and it only waits to be deleted; queries then fail as QEMU's do.
    ejected: bool = False

    def __init__(self) -> None:
        self.file: ChildIO | None = None
        self.backing: ChildIO | None = None

    @classmethod
    def file_role_for(cls, options: Mapping[str, Any]) -> ChildRole:
        """The role of the file child for a node opened with ``options``.

        Default: :attr:`file_role`. (raw is a pure filter unless it exposes a window.)
        """
        return cls.file_role

    @abstractmethod
    def open(self, options: Mapping[str, Any], *, read_only: bool, inactive: bool) -> None:
        """Open the node. Raise :class:`BlockError` with QEMU's text on failure.

        ``options`` holds only this driver's own options (``filename``, ``locking``,
        ``lazy-refcounts``, ...), never the common ones (node-name, driver, file, backing,
        read-only, cache, ...), except ``cache.direct`` / ``cache.no-flush`` which reach the
        file driver as ``options["cache"]``.
        An inactive open must not write to the image.
        """

    def close(self) -> None:
        """Release resources. Must not write (see the class docstring)."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Guest-visible bytes; past the end of the image reads as zeroes."""

    @abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Write guest data; the graph has checked the range and the node's state."""

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeroes. Default: write a zero buffer."""
        chunk = 1 << 20
        pos = offset
        end = offset + length
        while pos < end:
            n = min(chunk, end - pos)
            self.write(pos, bytes(n))
            pos += n

    def discard(self, offset: int, length: int) -> None:
        """Advisory: the range may be deallocated. Default: do nothing."""

    def make_empty(self) -> None:
        """bdrv_make_empty: drop everything the image itself holds, so that it shows its
        backing file again. Default: ENOTSUP (QEMU's drivers without .bdrv_make_empty)."""
        raise BlockError(os.strerror(errno.ENOTSUP), errno.ENOTSUP)

    def zero_may_unmap(self) -> bool:
        """Whether zero writes may deallocate (``BDRV_REQ_MAY_UNMAP`` in QEMU's
        supported_zero_flags). Default: no."""
        return False

    @abstractmethod
    def flush(self) -> None:
        """Write back every cache, then flush the child (or fdatasync the file)."""

    @abstractmethod
    def getlength(self) -> int:
        """The virtual size in bytes."""

    def truncate(self, length: int, zero_new: bool = False) -> None:
        """The driver's bdrv_co_truncate (preallocation off): the node is ``length``
        bytes long afterwards. ``zero_new``: the new area must read as zeroes even where
        a backing file would show through (BDRV_REQ_ZERO_WRITE). Default: the driver
        cannot resize, with QEMU's text."""
        raise BlockError("Image format driver does not support resize", errno.ENOTSUP)

    def inactivate(self) -> None:
        """Prepare for another process to take over the image.

        Write back every cache, make it durable, and mark the image clean (qcow2). After
        this the driver must not write until :meth:`invalidate_cache` has run.
        """
        self.flush()

    def invalidate_cache(self) -> None:
        """Forget all cached metadata and read it again from the image.

        Called on activation, after another process may have changed the image.
        """

    def metadata_ranges(self) -> Sequence[tuple[int, int]]:
        """(offset, length) of what :meth:`invalidate_cache` will read first from ``file``.

        Only a prefetch hint for the child's activation: it may be stale (the image may
        have changed meanwhile), and nothing relies on it being right.
        """
        return ()

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Hint that ``ranges`` will be read soon (protocol drivers). Must not fail."""

    def refresh_filename(self, full_open_options: Mapping[str, Any]) -> str | None:
        """The driver's own bdrv_refresh_filename: the node's exact file name given its
        full open options ("" for none), or None to leave it to the generic rule."""
        return None

    def backing_request(self) -> BackingRequest | None:
        """The backing image named by the image itself, if any."""
        return None

    def change_backing_file(self, filename: str, fmt: str) -> None:
        """Make the image's own metadata name ``filename`` (format ``fmt``) as its backing
        file, "" for none (QEMU's bdrv_change_backing_file). Default: the format cannot
        (QEMU: -ENOTSUP)."""
        raise BlockError(os.strerror(errno.ENOTSUP), errno.ENOTSUP)

    def child_perm(self, perm: int, nperm: int, nshared: int) -> tuple[int, int]:
        """Adjust what the default rules ask of a child (QEMU: the driver's bdrv_child_perm).

        ``perm`` is what this node's own parents need; ``nperm``/``nshared`` what
        :func:`blocklayer.permissions.child_permissions` derived from it. Default: as is.
        """
        return nperm, nshared

    def has_info(self) -> bool:
        """Whether QEMU's bdrv_get_info succeeds on this node (then ImageInfo has a
        ``dirty-flag``). True unless a driver says otherwise."""
        return True

    def block_status(self, want_zero: bool, offset: int, length: int,
                     allocated_file_size: Callable[[], int | None]) -> DriverStatus | None:
        """The driver's bdrv_co_block_status for ``length`` (> 0) bytes at ``offset``,
        both inside the node; None when the driver has none (QEMU then reports data).

        ``want_zero`` asks for precise zero/data answers rather than quick ones.
        ``allocated_file_size`` is bdrv_get_allocated_file_size of the ``file`` child
        (None when unknown), for drivers that need it (qcow2's preallocation check).
        Raises :class:`BlockError` when the status cannot be had.
        """
        return None

    def image_info(self) -> dict[str, Any]:
        """Format-specific members of QMP ``ImageInfo``.

        Keys may include ``cluster-size``, ``dirty-flag``, ``format-specific``,
        ``backing-filename``, ``backing-filename-format``, ``full-backing-filename``,
        ``encrypted``, ``compressed``. ``filename``, ``format``, ``virtual-size`` and
        ``actual-size`` are filled in by the graph.
        """
        return {}

    # Permission hooks; only protocol drivers that lock their storage implement them.
    # The graph calls perm_prepare on every affected node first, then perm_commit on all
    # of them, or perm_abort on all of them if any prepare failed.

    def perm_prepare(self, perm: int, shared: int) -> None:
        """Check that ``perm``/``shared`` can be taken; lock what is needed to hold them.

        Raise :class:`BlockError` (e.g. ``Failed to get "write" lock``) on conflict, having
        undone anything this call locked.
        """

    def perm_commit(self, perm: int, shared: int) -> None:
        """Hold exactly ``perm``/``shared`` from now on; release what is no longer needed."""

    def perm_abort(self) -> None:
        """Return to the state of the last commit (after a successful prepare)."""

    def set_inactive(self, inactive: bool) -> None:
        """The node's INACTIVE flag changed (file driver: lock handling is frozen while set)."""

    # Changing a protocol node's read-only flag (QEMU's bdrv_reopen for file-posix):
    # prepare gets what the new mode needs (a new descriptor) without giving anything up,
    # then the graph commits, or aborts if anything else in the reopen failed.

    def reopen_prepare(self, read_only: bool) -> None:
        """Get ready to serve the node read-only or read-write; raise :class:`BlockError`
        (QEMU's text) if it cannot be. Default: nothing to change."""

    def reopen_commit(self) -> None:
        """Switch to what :meth:`reopen_prepare` got."""

    def reopen_abort(self) -> None:
        """Drop what :meth:`reopen_prepare` got; the node stays as it was."""
