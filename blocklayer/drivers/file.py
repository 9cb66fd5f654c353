"""The ``file`` protocol driver: a regular host file, locked the way QEMU locks images.

Behaviour follows QEMU's ``block/file-posix.c`` where a QEMU tool could tell the
difference: open flags and error texts, the lock bytes that encode block permissions
(see :mod:`blocklayer.lockbytes`), fallocate-based zeroing and discard, the sticky
failure after a failed fdatasync, and dropping the page cache on activation.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..driver import BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, BlockDriver, DriverStatus
from ..errors import BlockError
from ..lockbytes import LockState, ofd_available
from ..perm import ALL

log = logging.getLogger(__name__)

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# linux/fs.h: _IO(0x12, 104), the logical block size of a block device.
BLKSSZGET = 0x1268

# The largest O_DIRECT alignment probed by trial reads; also the fallback when a trial
# read of a single byte succeeds, which says nothing (an empty file accepts anything).
MAX_BLOCKSIZE = 4096
_PROBE_ALIGNMENTS = (1, 512, 1024, 2048, 4096)

# Bounce buffers for O_DIRECT are at most this large; longer requests are split.
_DIRECT_CHUNK = 1 << 20

# Errnos meaning "this operation is not supported here", folded into ENOTSUP as QEMU does.
_UNSUPPORTED = frozenset({errno.ENODEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY})

_AIO_MODES = ("threads", "native", "io_uring")

#: Names QEMU's qemu_open() does not hand to open(2): a descriptor from an fd set.
FDSET_PREFIX = "/dev/fdset/"


class FdOpener(Protocol):
    """Where ``/dev/fdset/N`` names are opened (QEMU's qemu_open/qemu_close for fd sets).

    The block layer knows nothing of monitors: whoever wires the graph (the server's
    block service) passes one, and the ``file`` driver asks it for such names only.
    """

    def qemu_open(self, filename: str, flags: int) -> int:
        """A new descriptor for ``filename`` opened with open(2) ``flags`` (without
        O_CLOEXEC); raises :class:`BlockError` with QEMU's text."""
        ...

    def qemu_close(self, fd: int) -> None:
        """Close a descriptor :meth:`qemu_open` returned."""
        ...
_LOCKING_MODES = ("on", "off", "auto")


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    # fallocate64 keeps 64-bit offsets on 32-bit hosts; on 64-bit hosts both are the same.
    func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if func is None:
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func  # type: ignore[no-any-return]


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """``fallocate(2)``; returns 0 or the errno, with "unsupported" errnos as ENOTSUP."""
    if _fallocate is None:
        return errno.ENOTSUP
    while True:
        if _fallocate(fd, mode, offset, length) == 0:
            return 0
        err = ctypes.get_errno()
        # ctypes calls are not restarted by Python's EINTR handling.
        if err != errno.EINTR:
            return errno.ENOTSUP if err in _UNSUPPORTED else err


def _bounce_buffer(size: int) -> memoryview:
    """A zeroed, page-aligned buffer, as O_DIRECT needs; unmapped once unreferenced."""
    # Not closed explicitly: slices handed to the kernel calls may outlive a ``with``.
    return memoryview(mmap.mmap(-1, size))


def _host_path(filename: str) -> bytes:
    """The path QEMU would open for ``filename``.

    QEMU's JSON parser stores a ``\\u0000`` in a string as the two bytes C0 80 (so that C
    strings keep going), and opens that name: usually a file that does not exist.
    """
    return os.fsencode(filename).replace(b"\0", b"\xc0\x80")


def _io_error(exc: OSError) -> BlockError:
    err = exc.errno or errno.EIO
    return BlockError(os.strerror(err), err)


def _option_choice(options: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = options.get(key)
    if value is None:
        return default
    if value not in choices:
        # QemuOpts' text; over QMP the schema rejects such values before the driver runs.
        raise BlockError(f"invalid parameter value: {value}", errno.EINVAL)
    return str(value)


class FileDriver(BlockDriver):
    """A regular file as a block node (QMP ``driver: file``)."""

    name = "file"
    protocol = True

    def __init__(self, opener: FdOpener | None = None) -> None:
        super().__init__()
        #: Opens /dev/fdset/N names (None: they are opened as paths, and do not exist).
        self._opener = opener
        self._fd = -1
        # How self._fd is closed: the opener's qemu_close for a descriptor from an fd set.
        self._close_fd: Callable[[int], None] = os.close
        # A reopen's new descriptor, how to close it and its locks, until commit/abort.
        self._reopened: tuple[int, Callable[[int], None], LockState | None] | None = None
        self._filename = ""
        self._direct = False
        self._no_flush = False
        self._drop_cache = True
        self._check_cache_dropped = False
        self._align = 1
        self._inactive = False
        self._use_lock = False
        self._locks: LockState | None = None
        # The committed permissions; updated even while inactive, as QEMU does, because
        # the next prepare compares against them.
        self._perm = 0
        self._shared = ALL
        self._page_cache_inconsistent = 0
        # Whether anything was written since the last successful fdatasync: a flush of a
        # clean file is skipped, as QEMU's block layer skips it (write_gen == flushed_gen).
        self._unflushed = False
        self._has_discard = True
        self._has_write_zeroes = True
        self._has_fallocate = True

    # --- properties ------------------------------------------------------------------

    @property
    def filename(self) -> str:
        """The path as given in the ``filename`` option."""
        return self._filename

    @property
    def fd(self) -> int:
        """The open file descriptor (-1 when closed)."""
        return self._fd

    @property
    def request_alignment(self) -> int:
        """The O_DIRECT request alignment in bytes (1 for buffered I/O)."""
        return self._align

    @property
    def locked_bytes(self) -> list[int]:
        """The lock bytes this node holds right now (for diagnostics and tests)."""
        return self._locks.locked_bytes() if self._locks is not None else []

    # --- open / close ----------------------------------------------------------------

    def open(self, options: Mapping[str, Any], *, read_only: bool, inactive: bool) -> None:
        """Open ``options["filename"]`` (BlockdevOptionsFile; absent keys take QEMU's defaults).

        ``locking`` on/off/auto (auto: locks when OFD locks exist); ``aio`` threads, native
        (needs ``cache.direct``) or io_uring, all served by synchronous calls;
        ``cache`` {``direct``, ``no-flush``}; ``drop-cache`` (default on);
        ``x-check-cache-dropped`` and ``aio-max-batch`` are accepted and have no effect;
        ``pr-manager`` is refused (no such object can exist here). Errors carry QEMU's text
        and the errno (EACCES for a read-only file system, as QEMU reports it).
        """
        filename = options.get("filename")
        if not isinstance(filename, str):
            raise BlockError("Parameter 'filename' is missing", errno.EINVAL)
        if not filename:
            # bdrv_open_inherit() refuses an empty name for drivers that need one.
            raise BlockError("The 'file' block driver requires a file name", errno.EINVAL)
        self._filename = filename

        # Checked in QEMU's order, so the same bad option set fails with the same text.
        aio = _option_choice(options, "aio", "threads", _AIO_MODES)
        locking = _option_choice(options, "locking", "auto", _LOCKING_MODES)
        if locking == "on":
            self._use_lock = True
            if not ofd_available():
                log.warning(
                    "File lock requested but OFD locking syscall is unavailable, falling back "
                    "to POSIX file locks. Due to the implementation, locks can be lost unexpectedly."
                )
        else:
            self._use_lock = locking == "auto" and ofd_available()
        pr_manager = options.get("pr-manager")
        if pr_manager is not None:
            # There are no QOM objects here, so no pr-manager can be found by its id.
            raise BlockError(f"No persistent reservation manager with id '{pr_manager}'", errno.EINVAL)
        self._drop_cache = bool(options.get("drop-cache", True))
        # A debugging aid of QEMU's (mincore after dropping the cache); accepted, not run.
        self._check_cache_dropped = bool(options.get("x-check-cache-dropped", False))
        cache = options.get("cache") or {}
        self._direct = bool(cache.get("direct", False))
        self._no_flush = bool(cache.get("no-flush", False))

        # raw_parse_flags: the access mode, and O_DIRECT for cache.direct.
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if self._direct:
            flags |= os.O_DIRECT
        self._fd, self._close_fd = self._qemu_open(filename, flags)
        try:
            self._finish_open(aio)
        except BaseException:
            self.close()
            raise
        self._inactive = inactive
        if self._use_lock:
            self._locks = LockState(self._fd)

    def _qemu_open(self, filename: str, flags: int) -> tuple[int, Callable[[int], None]]:
        """QEMU's qemu_open as raw_open_common calls it: the descriptor and how to close it.

        ``/dev/fdset/N`` goes to the opener (a duplicate of a set member, QEMU's
        monitor_fdset_dup_fd_add); any other name to open(2).
        """
        if filename.startswith(FDSET_PREFIX) and self._opener is not None:
            fd = self._opener.qemu_open(filename, flags)
            return fd, self._opener.qemu_close
        try:
            return os.open(_host_path(filename), flags | os.O_CLOEXEC), os.close
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err == errno.EINVAL and self._direct:
                log.warning("file system may not support O_DIRECT")
            # QEMU returns EACCES for a read-only file system (auto-read-only keys on it)
            # but keeps the real reason in the text.
            raise BlockError(
                f"Could not open '{filename}': {os.strerror(err)}",
                errno.EACCES if err == errno.EROFS else err,
            ) from exc

    def _finish_open(self, aio: str) -> None:
        if aio == "native" and not self._direct:
            raise BlockError(
                "aio=native was specified, but it requires cache.direct=on, which was not specified.",
                errno.EINVAL,
            )
        # aio=native / io_uring only change how QEMU submits requests; the results are the
        # same as with the synchronous calls used here, so both are accepted as such.
        try:
            st = os.fstat(self._fd)
        except OSError as exc:
            raise BlockError(
                f"Could not stat file: {os.strerror(exc.errno or errno.EIO)}", exc.errno
            ) from exc
        if not stat.S_ISREG(st.st_mode):
            raise BlockError(f"'file' driver requires '{self._filename}' to be a regular file", errno.EINVAL)
        if self._direct:
            self._align = self._probe_alignment()
        # QEMU sizes a file with lseek(SEEK_END) (raw_getlength) when the node is opened;
        # some regular-looking files refuse that (/proc/self/mem: EINVAL), and then
        # bdrv_refresh_total_sectors() fails the open.
        try:
            os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise BlockError(f"Could not refresh total sector count: {os.strerror(err)}", err) from exc

    def _probe_alignment(self) -> int:
        try:
            raw = fcntl.ioctl(self._fd, BLKSSZGET, bytes(4))
            size = int.from_bytes(raw, sys.byteorder)
            if size > 0:
                return size
        except OSError:
            pass  # not a block device: fall back to trial reads
        max_align = max(MAX_BLOCKSIZE, mmap.PAGESIZE)
        buf = _bounce_buffer(max_align)
        for align in _PROBE_ALIGNMENTS:
            try:
                os.preadv(self._fd, [buf[:align]], 0)
            except OSError as exc:
                # Only EINVAL means "misaligned"; any other failure says nothing about
                # alignment, so the size counts as working.
                if exc.errno == errno.EINVAL:
                    continue
            return align if align != 1 else max_align
        error = BlockError("Could not find working O_DIRECT alignment", errno.EINVAL)
        error.add_note("Try cache.direct=off")
        raise error

    def close(self) -> None:
        """Close the file; closing the descriptor drops its OFD locks."""
        if self._fd >= 0:
            # qemu_close: a duplicate from an fd set shares its member's open file, so its
            # OFD locks stay with the member; only a path's own descriptor drops them.
            self._close_fd(self._fd)
        self._fd = -1
        self._locks = None

    # --- I/O -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise BlockError(os.strerror(errno.EIO), errno.EIO)

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; bytes past the end read as zeroes."""
        self._check_open()
        if length <= 0:
            return b""
        if self._direct:
            return self._direct_read(offset, length)
        try:
            chunk = os.pread(self._fd, length, offset)
            if len(chunk) == length:
                # The usual case: no second copy of the data.
                return chunk
            out = bytearray(chunk)
            while chunk and len(out) < length:
                chunk = os.pread(self._fd, length - len(out), offset + len(out))
                out += chunk
        except OSError as exc:
            raise _io_error(exc) from exc
        out += bytes(length - len(out))
        return bytes(out)

    def _aligned_window(self, offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % self._align
        end = -(-(offset + length) // self._align) * self._align
        return start, end

    def _direct_pread(self, buf: memoryview, pos: int) -> int:
        """Fill ``buf`` from ``pos``; returns the bytes read (short only at EOF)."""
        try:
            return os.preadv(self._fd, [buf], pos)
        except OSError as exc:
            raise _io_error(exc) from exc

    def _direct_read(self, offset: int, length: int) -> bytes:
        start, end = self._aligned_window(offset, length)
        out = bytearray()
        buf = _bounce_buffer(min(end - start, _DIRECT_CHUNK))
        pos = start
        while pos < end:
            n = min(len(buf), end - pos)
            got = self._direct_pread(buf[:n], pos)
            # The kernel only ends an aligned O_DIRECT read early at EOF.
            out += buf[:got]
            if got < n:
                break
            pos += n
        data = out[offset - start : offset - start + length]
        return bytes(data) + bytes(length - len(data))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``, growing the file if it reaches past the end."""
        self._unflushed = True
        self._check_open()
        if not data:
            return
        if self._direct:
            self._direct_write(offset, data)
            return
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                n = os.pwrite(self._fd, view[done:], offset + done)
                if n == 0:
                    raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
                done += n
        except OSError as exc:
            raise _io_error(exc) from exc

    def _direct_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        start, aligned_end = self._aligned_window(offset, len(data))
        old_size = self.getlength() if aligned_end != end else None
        buf = _bounce_buffer(min(aligned_end - start, _DIRECT_CHUNK))
        pos = start
        while pos < aligned_end:
            n = min(len(buf), aligned_end - pos)
            window = buf[:n]
            lo = max(offset, pos)
            hi = min(end, pos + n)
            # Read-modify-write of the partly covered alignment blocks at either end.
            if lo != pos:
                self._fill_block(window[: self._align], pos)
            if hi != pos + n:
                self._fill_block(window[n - self._align :], pos + n - self._align)
            window[lo - pos : hi - pos] = data[lo - offset : hi - offset]
            self._direct_pwrite(window, pos)
            pos += n
        if old_size is not None and aligned_end > max(old_size, end):
            # The padded tail grew the file past what was asked; a buffered write would
            # have stopped at ``end``, so the file size stays exact.
            self._set_size(max(old_size, end))

    def _fill_block(self, block: memoryview, pos: int) -> None:
        got = self._direct_pread(block, pos)
        # Past EOF the block reads short; a buffered write would leave zeroes there.
        block[got:] = bytes(len(block) - got)

    def _direct_pwrite(self, buf: memoryview, pos: int) -> None:
        done = 0
        try:
            while done < len(buf):
                n = os.pwritev(self._fd, [buf[done:]], pos + done)
                if n == 0:
                    raise BlockError(os.strerror(errno.EINVAL), errno.EINVAL)
                done += n
        except OSError as exc:
            raise _io_error(exc) from exc

    def zero_may_unmap(self) -> bool:
        """raw_open_common: zero writes may punch holes."""
        return True

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeroes, preferring fallocate over writing zeroes."""
        self._unflushed = True
        self._check_open()
        if length <= 0:
            return
        fd = self._fd
        if may_unmap:
            ret = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if ret == 0:
                # KEEP_SIZE does not grow the file; a write reaching past EOF must.
                if offset + length > self.getlength():
                    self._set_size(offset + length)
                return
            if ret not in (errno.ENOTSUP, errno.EINVAL, errno.EBUSY):
                raise BlockError(os.strerror(ret), ret)
        if self._has_write_zeroes:
            ret = fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)
            if ret == 0:
                return
            if ret == errno.ENOTSUP:
                self._has_write_zeroes = False
            elif ret != errno.EINVAL:
                raise BlockError(os.strerror(ret), ret)
            # EINVAL: some file systems refuse unaligned ranges; try the other ways.
        if self._has_discard and self._has_fallocate:
            ret = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if ret == 0:
                if self._allocate(offset, length):
                    return
            elif ret == errno.ENOTSUP:
                self._has_discard = False
            elif ret != errno.EINVAL:
                raise BlockError(os.strerror(ret), ret)
        if self._has_fallocate and offset >= self.getlength():
            if self._allocate(offset, length):
                return
        super().write_zeroes(offset, length, may_unmap)

    def _allocate(self, offset: int, length: int) -> bool:
        """Allocate the range (reading as zeroes); False once the file system cannot."""
        ret = fallocate(self._fd, 0, offset, length)
        if ret == 0:
            return True
        if ret != errno.ENOTSUP:
            raise BlockError(os.strerror(ret), ret)
        self._has_fallocate = False
        return False

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole; quietly does nothing where the file system cannot."""
        self._unflushed = True
        self._check_open()
        if length <= 0 or not self._has_discard:
            return
        ret = fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if ret == errno.ENOTSUP:
            self._has_discard = False
        elif ret != 0:
            raise BlockError(os.strerror(ret), ret)

    def flush(self) -> None:
        """fdatasync, unless cache.no-flush; fails for good once an fdatasync has failed."""
        self._check_open()
        if self._no_flush:
            return
        if self._page_cache_inconsistent:
            err = self._page_cache_inconsistent
            raise BlockError(os.strerror(err), err)
        if not self._unflushed:
            return
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            err = exc.errno or errno.EIO
            # After a failed writeback the kernel may have marked the dirty pages clean, so
            # a later fdatasync would succeed without the data being on disk. O_DIRECT
            # writes bypass the page cache, so they are not affected.
            if not self._direct:
                self._page_cache_inconsistent = err
            raise BlockError(os.strerror(err), err) from exc
        self._unflushed = False

    def getlength(self) -> int:
        """The file size in bytes."""
        self._check_open()
        try:
            return os.fstat(self._fd).st_size
        except OSError as exc:
            raise _io_error(exc) from exc

    def truncate(self, length: int, zero_new: bool = False) -> None:
        """Resize the file to exactly ``length`` bytes (growing reads as zeroes, so
        ``zero_new`` needs nothing more; QEMU's handle_aiocb_truncate, prealloc off)."""
        self._unflushed = True
        self._check_open()
        old_length = self.getlength()
        self._set_size(length)
        if old_length == 0 and length >= 512:
            self._allocate_first_block(length)

    def _set_size(self, length: int) -> None:
        try:
            os.ftruncate(self._fd, length)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise BlockError(f"Could not resize file: {os.strerror(err)}", err) from exc

    def _allocate_first_block(self, length: int) -> None:
        # QEMU allocates the first block of a freshly sized file so that later O_DIRECT
        # alignment probes hit data rather than a hole (where any length succeeds). It
        # shows in qemu-img map and actual-size, so do the same; failures do not matter.
        size = 512 if length < MAX_BLOCKSIZE else MAX_BLOCKSIZE
        try:
            os.pwritev(self._fd, [_bounce_buffer(size)], 0)
        except OSError:
            pass

    def block_status(self, want_zero: bool, offset: int, length: int,
                     allocated_file_size: Callable[[], int | None]) -> DriverStatus:
        """file-posix's raw_co_block_status: data and holes as SEEK_DATA/SEEK_HOLE see
        them (a hole reads as zeroes); without ``want_zero`` everything is data."""
        self._check_open()
        if not want_zero:
            return DriverStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset)
        code, data, hole = self._find_allocation(offset)
        if code == errno.ENXIO:  # a trailing hole (or the file shrank meanwhile)
            return DriverStatus(BLOCK_ZERO | BLOCK_OFFSET_VALID, length, offset)
        if code:  # nothing learned: pretend there are no holes
            return DriverStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset)
        if data == offset:
            # Up to the next hole; a partial block at the end of the file counts whole.
            align = self._align
            pnum = -(-(hole - offset) // align) * align
            return DriverStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, pnum, offset)
        return DriverStatus(BLOCK_ZERO | BLOCK_OFFSET_VALID, data - offset, offset)

    def _find_allocation(self, start: int) -> tuple[int, int, int]:
        """file-posix's find_allocation: (errno or 0, next data, next hole) at ``start``.

        In data: data == start and hole is where it ends; in a hole: hole == start and
        data is where the next data begins; ENXIO: a trailing hole or past the end.
        """
        try:
            data = os.lseek(self._fd, start, os.SEEK_DATA)
        except OSError as exc:
            return exc.errno or errno.EIO, 0, 0
        if data < start:
            return errno.EIO, 0, 0
        if data > start:
            return 0, data, start
        try:
            hole = os.lseek(self._fd, start, os.SEEK_HOLE)
        except OSError as exc:
            return exc.errno or errno.EIO, 0, 0
        if hole < start:
            return errno.EIO, 0, 0
        if hole > start:
            return 0, start, hole
        return errno.EBUSY, 0, 0  # a hole dug between the two seeks

    def image_info(self) -> dict[str, Any]:
        """``actual-size``: the bytes the file occupies on disk."""
        self._check_open()
        try:
            return {"actual-size": os.fstat(self._fd).st_blocks * 512}
        except OSError as exc:
            raise _io_error(exc) from exc

    def invalidate_cache(self) -> None:
        """Drop the host page cache of the file (drop-cache=on, buffered I/O only).

        Another host may have written the image through shared storage; without this
        stale pages could be read back.
        """
        if self._fd < 0:
            raise BlockError(f"The file descriptor is not open: {os.strerror(errno.EIO)}", errno.EIO)
        if not self._drop_cache or self._direct:
            return
        try:
            self.flush()
        except BlockError as exc:
            err = exc.errno or errno.EIO
            raise BlockError(f"flush failed: {os.strerror(err)}", err) from exc
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise BlockError(f"fadvise failed: {os.strerror(err)}", err) from exc

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Start reading ``ranges`` into the page cache (only where invalidation dropped it).

        Asked for by the graph right after the cache was dropped, with the ranges the
        format driver above is about to re-read: the kernel then fetches them for every
        image of a handoff at once (all files are invalidated before any format node)
        instead of one cold read after another. Only those ranges, not a blanket
        read-ahead, because the I/O itself is most of the cost of a handoff.
        """
        if self._fd < 0 or not self._drop_cache or self._direct:
            return
        for offset, length in ranges:
            if length <= 0:
                continue  # fadvise would take 0 to mean "to the end of the file"
            try:
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # a hint only: the reads will simply be slower

    # --- permissions and locks -------------------------------------------------------

    def _locking_live(self) -> bool:
        return self._use_lock and not self._inactive and self._locks is not None

    def _restore_committed(self) -> None:
        assert self._locks is not None
        try:
            self._locks.apply(self._perm, ~self._shared, unlock=True)
        except BlockError as exc:
            # Only unlocking happens here, which should not fail; QEMU only warns too.
            log.warning("%s", exc)

    def perm_prepare(self, perm: int, shared: int) -> None:
        """Lock what ``perm``/``shared`` needs on top of the committed set, then check.

        A request that only loosens the committed set takes and checks nothing (bytes are
        released on commit). On conflict the bytes this call added are released again.
        """
        if not self._locking_live():
            return
        assert self._locks is not None
        if (self._perm | perm) == self._perm and (self._shared & shared) == self._shared:
            return
        try:
            self._locks.apply(self._perm | perm, ~self._shared | ~shared, unlock=False)
        except BlockError:
            self._restore_committed()
            raise
        try:
            self._locks.check(perm, shared)
        except BlockError as exc:
            self._restore_committed()
            exc.add_note(f"Is another process using the image [{self._filename}]?")
            raise

    def perm_commit(self, perm: int, shared: int) -> None:
        """Hold exactly the bytes for ``perm``/``shared``; release the rest."""
        if self._locking_live():
            assert self._locks is not None
            try:
                self._locks.apply(perm, ~shared, unlock=True)
            except BlockError as exc:
                log.warning("%s", exc)
        self._perm = perm & ALL
        self._shared = shared & ALL

    def perm_abort(self) -> None:
        """Return to the bytes of the last committed permissions."""
        if self._locking_live():
            self._restore_committed()

    def set_inactive(self, inactive: bool) -> None:
        """While inactive the lock bytes stay exactly as they are, whatever is committed."""
        self._inactive = inactive

    # --- reopen (read-only <-> read-write) ------------------------------------------------

    def reopen_prepare(self, read_only: bool) -> None:
        """Open the file again in the new access mode, holding the same lock bytes.

        QEMU's raw_check_perm during a reopen (raw_reconfigure_getfd): the access mode
        cannot be changed with fcntl, so the name is opened again through qemu_open (for
        ``/dev/fdset/N`` a duplicate of a member with the new mode: none, and the reopen
        fails with QEMU's text), and the locks are copied to the new descriptor before
        the old one is closed, so nobody can slip in between.
        """
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if self._direct:
            flags |= os.O_DIRECT
        fd, close_fd = self._qemu_open(self._filename, flags)
        locks = LockState(fd) if self._locks is not None else None
        if locks is not None and self._locks is not None:
            try:
                locks.apply(self._locks.locked_perm, self._locks.locked_unshared, unlock=False)
            except BlockError:
                close_fd(fd)
                raise
        self._reopened = (fd, close_fd, locks)

    def reopen_commit(self) -> None:
        """Close the old descriptor (raw_set_perm) and serve from the new one.

        Closing drops the old descriptor's locks only if nothing else shares its open
        file: a member of an fd set keeps them, as in QEMU.
        """
        if self._reopened is None:
            return
        fd, close_fd, locks = self._reopened
        self._reopened = None
        if self._fd >= 0:
            self._close_fd(self._fd)
        self._fd, self._close_fd, self._locks = fd, close_fd, locks

    def reopen_abort(self) -> None:
        """Close the descriptor :meth:`reopen_prepare` opened."""
        if self._reopened is None:
            return
        fd, close_fd, _ = self._reopened
        self._reopened = None
        close_fd(fd)
