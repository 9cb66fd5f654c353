"""QEMU's image locking: one-byte fcntl locks that encode block permissions.

QEMU marks an open image by taking *shared* (read) locks on single bytes of the image
file: byte ``100+i`` while it holds permission bit ``i`` and byte ``200+i`` while it
refuses to share bit ``i`` (bits in the order of :data:`blocklayer.perm.PERM_NAMES`).
Before it relies on a permission set it tests, with a write-lock probe, whether anybody
else holds the opposite byte. Because every participant only ever takes read locks, the
locks never block each other; they are pure markers, and the probe is what detects a
conflict.

Open file description (OFD) locks are used when the kernel has them: they belong to the
open file description, so two opens of the same image conflict even inside one process,
and closing an unrelated descriptor of the same file does not drop them. Otherwise this
falls back to classic POSIX locks, as QEMU does, with their per-process semantics.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import functools
import os
import struct
from dataclasses import dataclass

from .errors import BlockError
from .perm import ALL, PERM_NAMES

PERM_BASE = 100
SHARED_BASE = 200

# Present in Python >= 3.9 on Linux; the numeric fallbacks are the Linux ABI values, so
# the OFD probe below simply fails (EINVAL) on kernels that lack them.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)


class _Flock(ctypes.Structure):
    # ctypes lays the fields out with the platform C ABI, which keeps the padding between
    # l_whence and l_start and after l_pid right without a hand-written struct format.
    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    )


@dataclass(frozen=True)
class LockHolder:
    """A lock that conflicts with a probe, as ``F_GETLK`` describes it.

    ``pid`` is -1 for OFD locks (the kernel does not tie them to a process).
    """

    type: int
    start: int
    length: int
    pid: int


@functools.cache
def ofd_available() -> bool:
    """Whether the kernel supports OFD locks (probed once, on ``/dev/null``, like QEMU)."""
    try:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, 0, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


@functools.lru_cache(maxsize=256)
def _request(lock_type: int, start: int, length: int) -> bytes:
    # Only a handful of distinct requests exist (a few bytes, three lock types): build
    # each struct once instead of on every call.
    return bytes(_Flock(lock_type, os.SEEK_SET, start, length, 0))


_L_TYPE = struct.Struct("@h")  # l_type, the first member of struct flock


def _fcntl_lock(fd: int, cmd: int, lock_type: int, start: int, length: int) -> _Flock:
    reply = fcntl.fcntl(fd, cmd, _request(lock_type, start, length))
    assert isinstance(reply, bytes)
    return _Flock.from_buffer_copy(reply)


def _range_unlocked(fd: int, getlk: int, start: int, length: int) -> bool:
    """True if no other owner holds any lock in [start, start + length) (OSError as is)."""
    reply = fcntl.fcntl(fd, getlk, _request(fcntl.F_WRLCK, start, length))
    assert isinstance(reply, bytes)
    return bool(_L_TYPE.unpack_from(reply)[0] == fcntl.F_UNLCK)


def _setlk_cmd(ofd: bool | None) -> int:
    use_ofd = ofd_available() if ofd is None else ofd
    return F_OFD_SETLK if use_ofd else fcntl.F_SETLK


def _getlk_cmd(ofd: bool | None) -> int:
    use_ofd = ofd_available() if ofd is None else ofd
    return F_OFD_GETLK if use_ofd else fcntl.F_GETLK


def lock_byte(fd: int, offset: int, *, exclusive: bool = False, ofd: bool | None = None) -> None:
    """Take a non-blocking lock on one byte (shared unless ``exclusive``).

    ``ofd`` forces OFD (True) or POSIX (False) locks; None picks OFD when available.
    Raises OSError (EAGAIN/EACCES when someone holds a conflicting lock).
    """
    lock_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    fcntl.fcntl(fd, _setlk_cmd(ofd), _request(lock_type, offset, 1))


def unlock_byte(fd: int, offset: int, *, ofd: bool | None = None) -> None:
    """Release this descriptor's lock on one byte (a no-op if it holds none)."""
    fcntl.fcntl(fd, _setlk_cmd(ofd), _request(fcntl.F_UNLCK, offset, 1))


def lock_holder(
    fd: int, offset: int, *, exclusive: bool = True, ofd: bool | None = None
) -> LockHolder | None:
    """The lock of *someone else* that would keep ``fd`` from locking this byte, if any.

    Locks held through ``fd`` itself never count: with OFD locks the kernel ignores the
    probing description's own locks, with POSIX locks the calling process's. The default
    probe is exclusive, so any lock on the byte is reported, which is QEMU's test.
    """
    lock_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    reply = _fcntl_lock(fd, _getlk_cmd(ofd), lock_type, offset, 1)
    if reply.l_type == fcntl.F_UNLCK:
        return None
    return LockHolder(reply.l_type, reply.l_start, reply.l_len, reply.l_pid)


def byte_locked_by_other(fd: int, offset: int, *, ofd: bool | None = None) -> bool:
    """True if some other lock owner holds any lock on the byte at ``offset``."""
    return lock_holder(fd, offset, ofd=ofd) is not None


def _lock_failure(message: str, err: int) -> BlockError:
    # A conflicting holder is the expected case and QEMU leaves the errno text out for
    # it; any other errno is a real failure and gets its strerror appended.
    if err in (errno_mod.EAGAIN, errno_mod.EACCES):
        return BlockError(message, err)
    return BlockError(f"{message}: {os.strerror(err)}", err)


# (i, bit, name) with bit == 1 << i: byte 100+i / 200+i belongs to PERM_NAMES[i].
_BITS: tuple[tuple[int, int, str], ...] = tuple(
    (index, bit, name) for index, (bit, name) in enumerate(PERM_NAMES)
)


class LockState:
    """The permission lock bytes one descriptor holds, and how to change them.

    ``locked_perm`` is the mask of bits whose byte ``100+i`` is locked through ``fd``;
    ``locked_unshared`` the mask whose byte ``200+i`` is. The state only records bytes
    this object locked, so it stays exact as long as nobody else locks through ``fd``.
    """

    def __init__(self, fd: int, *, ofd: bool | None = None) -> None:
        self.fd = fd
        self.ofd = ofd_available() if ofd is None else ofd
        # Held masks keyed by their byte range's base offset.
        self._held = {PERM_BASE: 0, SHARED_BASE: 0}

    @property
    def locked_perm(self) -> int:
        """Bits whose byte ``100+i`` is locked through ``fd``."""
        return self._held[PERM_BASE]

    @property
    def locked_unshared(self) -> int:
        """Bits whose byte ``200+i`` is locked through ``fd``."""
        return self._held[SHARED_BASE]

    def locked_bytes(self) -> list[int]:
        """The byte offsets this state holds, ascending."""
        return [base + i for base, held in self._held.items() for i, bit, _ in _BITS if held & bit]

    def apply(self, perm: int, unshared: int, *, unlock: bool) -> None:
        """Lock byte ``100+i`` for each bit in ``perm`` and ``200+i`` for each in ``unshared``.

        ``unshared`` is the mask of permissions *not* shared (``~shared``). With
        ``unlock`` the bytes of bits outside the masks are released too; without it they
        stay, which is how a prepare holds the union of the old and new sets.
        Raises BlockError ``Failed to lock byte N`` / ``Failed to unlock byte N``, having
        kept whatever it changed before the failure (the state says what is held).
        """
        setlk = _setlk_cmd(self.ofd)
        for base, wanted in ((PERM_BASE, perm & ALL), (SHARED_BASE, unshared & ALL)):
            held = self._held[base]
            change = wanted & ~held
            if unlock:
                change |= held & ~wanted
            if not change:
                continue
            for i, bit, _ in _BITS:
                if not change & bit:
                    continue
                offset = base + i
                if wanted & bit:
                    try:
                        fcntl.fcntl(self.fd, setlk, _request(fcntl.F_RDLCK, offset, 1))
                    except OSError as exc:
                        raise _lock_failure(f"Failed to lock byte {offset}", exc.errno or 0) from exc
                    held |= bit
                else:
                    try:
                        fcntl.fcntl(self.fd, setlk, _request(fcntl.F_UNLCK, offset, 1))
                    except OSError as exc:
                        err = exc.errno or 0
                        raise BlockError(f"Failed to unlock byte {offset}: {os.strerror(err)}", err) from exc
                    held &= ~bit
                self._held[base] = held

    def release_all(self) -> None:
        """Unlock every byte this state holds."""
        self.apply(0, 0, unlock=True)

    def check(self, perm: int, shared: int) -> None:
        """Raise BlockError if another owner's bytes conflict with ``perm``/``shared``."""
        check_lock_bytes(self.fd, perm, shared, ofd=self.ofd)


def check_lock_bytes(fd: int, perm: int, shared: int, *, ofd: bool | None = None) -> None:
    """Check that nobody else's lock bytes forbid holding ``perm`` while sharing ``shared``.

    First, for every bit requested, byte ``200+i`` held by another owner means they do
    not share it: ``Failed to get "NAME" lock``. Then, for every bit not shared, byte
    ``100+i`` held by another owner means they hold it: ``Failed to get shared "NAME"
    lock``. The first conflict found is raised (errno EAGAIN), in QEMU's order.
    """
    getlk = _getlk_cmd(ofd)
    checks = (
        (SHARED_BASE, perm & ALL, 'Failed to get "{}" lock'),
        (PERM_BASE, ~shared & ALL, 'Failed to get shared "{}" lock'),
    )
    for base, mask, template in checks:
        if not mask:
            continue
        # One probe over all the bytes to check (and those between them) usually shows
        # that nobody holds any. Only if it finds something (or fails) are they probed
        # one by one, in QEMU's order, to name the first real conflict (or the error).
        first = (mask & -mask).bit_length() - 1
        try:
            if _range_unlocked(fd, getlk, base + first, mask.bit_length() - first):
                continue
        except OSError:
            pass
        for i, bit, name in _BITS:
            if not mask & bit:
                continue
            message = template.format(name)
            try:
                conflict = byte_locked_by_other(fd, base + i, ofd=ofd)
            except OSError as exc:
                raise _lock_failure(message, exc.errno or 0) from exc
            if conflict:
                raise BlockError(message, errno_mod.EAGAIN)
