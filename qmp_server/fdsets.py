"""Descriptors passed over a monitor: ``getfd``/``closefd`` names and ``add-fd`` sets.

A client passes a descriptor with SCM_RIGHTS on a UNIX-socket monitor, in the same
``sendmsg`` as (or before) the command that claims it, as with QEMU. The server hands
what each read carried to the connection's :class:`MonitorFds`: the descriptors of the
last read that carried any wait there (earlier unclaimed ones are closed, as QEMU's socket
chardev does), ``getfd``/``add-fd`` take the first and close the others, and whatever is
still waiting when the client goes away is closed. Names given with ``getfd`` belong to
the monitor (they outlive a client's connection, as in QEMU); fd sets
(:class:`FdSets`) belong to the machine.

The block layer opens ``/dev/fdset/N`` through :meth:`FdSets.qemu_open` (QEMU's
qemu_open: a duplicate of a set member whose access mode matches) and closes what it got
with :meth:`FdSets.qemu_close`; the set keeps track of those duplicates in use, which keep
it alive after its own members are removed (monitor_fdset_dup_fd_add/_remove).

The command running now finds its monitor's descriptors with :func:`current` (QEMU's
``monitor_cur()``): the server sets it for the tasks of each connection. Nothing here
knows sockets or JSON.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from socket import SCM_RIGHTS, SOL_SOCKET
from typing import Any

from blocklayer.errors import BlockError

from .errors import QMPError

NO_FD = "No file descriptor supplied via SCM_RIGHTS"


def descriptors_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried (recvmsg's ancillary data)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class MonitorFds:
    """One client's descriptors: those received and not yet claimed, and the monitor's
    named ones (``named`` is shared by every client of one monitor)."""

    def __init__(self, named: dict[str, int] | None = None) -> None:
        self.named: dict[str, int] = {} if named is None else named
        self.received: list[int] = []

    def receive(self, fds: list[int]) -> None:
        """A read carried ``fds``: they replace (and close) any still unclaimed."""
        if not fds:
            return
        old, self.received = self.received, list(fds)
        for fd in old:
            _close(fd)

    def take_received(self) -> int:
        """The first descriptor received (the others are closed): QEMU's get_msgfd."""
        if not self.received:
            raise QMPError(NO_FD)
        first, *rest = self.received
        self.received = []
        for fd in rest:
            _close(fd)
        return first

    def close_received(self) -> None:
        """The client went away: what it sent and nobody claimed is closed."""
        fds, self.received = self.received, []
        for fd in fds:
            _close(fd)

    def getfd(self, name: str) -> None:
        """``getfd``: name the descriptor received (replacing one of that name)."""
        fd = self.take_received()
        if name[:1].isdigit():
            _close(fd)
            raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
        old = self.named.get(name)
        self.named[name] = fd
        if old is not None:
            _close(old)

    def closefd(self, name: str) -> None:
        """``closefd``."""
        fd = self.named.pop(name, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{name}' not found")
        _close(fd)

    def take(self, name: str) -> int:
        """Hand the named descriptor over to the caller (QEMU's monitor_get_fd)."""
        fd = self.named.pop(name, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{name}' has not been found")
        return fd


#: The monitor (client) whose command runs now; None outside a QMP client (start-up, HMP).
_CURRENT: ContextVar[MonitorFds | None] = ContextVar("monitor_fds", default=None)


def set_current(fds: MonitorFds | None) -> None:
    """Make ``fds`` the current monitor's for this task and the tasks it starts."""
    _CURRENT.set(fds)


def current() -> MonitorFds | None:
    """The current monitor's descriptors (QEMU's ``monitor_cur()``), if any."""
    return _CURRENT.get()


def fd_param(name: str) -> int:
    """A descriptor by name from the current monitor, or by number (QEMU's
    monitor_fd_param: a number when it starts with a digit or there is no monitor)."""
    monitor = current()
    if not name[:1].isdigit() and monitor is not None:
        return monitor.take(name)
    try:
        fd = int(name, 10) if name.strip() == name and name.lstrip("-").isdigit() else -1
    except ValueError:
        fd = -1
    if fd < 0 or fd > 0x7FFFFFFF:
        raise QMPError(f"Invalid file descriptor number '{name}'")
    return fd


@dataclass
class _SetFd:
    fd: int
    opaque: str | None
    removed: bool = False


@dataclass
class _FdSet:
    id: int
    fds: list[_SetFd] = field(default_factory=list)  # in the order added
    #: Duplicates handed out by qemu_open and not closed yet (QEMU's dup_fds).
    dups: list[int] = field(default_factory=list)


FDSET_PREFIX = "/dev/fdset/"


def parse_fdset(text: str) -> int:
    """The set id in ``/dev/fdset/TEXT``, or -1: QEMU's qemu_parse_fd (strtol in base 10:
    leading blanks and a sign allowed, nothing after the digits, 0..INT_MAX)."""
    body = text.lstrip(" \t\n\v\f\r")
    digits = body[1:] if body[:1] in ("+", "-") else body
    if not digits or not all("0" <= c <= "9" for c in digits):
        return -1
    value = int(body, 10)
    return value if 0 <= value <= 0x7FFFFFFF else -1


class FdSets:
    """The machine's fd sets (``add-fd``, ``remove-fd``, ``query-fdsets``)."""

    def __init__(self) -> None:
        self.sets: dict[int, _FdSet] = {}
        #: Connected QMP clients (QEMU's mon_refcount).
        self.clients = 0
        #: Whether the VM runs (runstate_is_running), for cleanups the block layer causes
        #: by closing a duplicate; machine.py wires it to the run state.
        self.running: Callable[[], bool] = lambda: True
        # QEMU's mon_fdsets_lock: the block layer opens and closes duplicates from its
        # worker thread while commands change the sets in the event loop's thread.
        self._lock = threading.Lock()

    def add(self, fd: int, fdset_id: int | None, opaque: str | None) -> dict[str, Any]:
        """``add-fd`` with the descriptor received; it is closed on an error."""
        with self._lock:
            return self._add(fd, fdset_id, opaque)

    def _add(self, fd: int, fdset_id: int | None, opaque: str | None) -> dict[str, Any]:
        if fdset_id is None:
            fdset_id = 0  # the first free id
            while fdset_id in self.sets:
                fdset_id += 1
        elif fdset_id < 0 and fdset_id not in self.sets:
            _close(fd)
            raise QMPError("Parameter 'fdset-id' expects a non-negative value")
        fdset = self.sets.setdefault(fdset_id, _FdSet(fdset_id))
        fdset.fds.append(_SetFd(fd, opaque))
        return {"fdset-id": fdset_id, "fd": fd}

    def remove(self, fdset_id: int, fd: int | None, running: bool) -> None:
        """``remove-fd``: marks the descriptor(s) removed; closed at once while running.

        Duplicates the block layer uses stay open: a set whose members are all gone stays
        (listed with no descriptors) until the last of them is closed, as in QEMU.
        """
        with self._lock:
            self._remove(fdset_id, fd, running)

    def _remove(self, fdset_id: int, fd: int | None, running: bool) -> None:
        fdset = self.sets.get(fdset_id)
        found = fdset is not None and (fd is None or any(item.fd == fd for item in fdset.fds))
        if fdset is None or not found:
            what = f"fdset-id:{fdset_id}" if fd is None else f"fdset-id:{fdset_id}, fd:{fd}"
            raise QMPError(f"File descriptor named '{what}' not found")
        for item in fdset.fds:
            if fd is None or item.fd == fd:
                item.removed = True
                if fd is not None:
                    break
        self._cleanup(fdset, running)

    def _cleanup(self, fdset: _FdSet, running: bool) -> None:
        # QEMU 7.2's monitor_fdset_cleanup: while the VM runs, removed members are closed,
        # and all of them when no client is connected and no duplicate is in use; the set
        # goes once it has neither members nor duplicates.
        if running:
            keep = []
            for item in fdset.fds:
                if item.removed or (not fdset.dups and self.clients == 0):
                    _close(item.fd)
                else:
                    keep.append(item)
            fdset.fds = keep
        if not fdset.fds and not fdset.dups:
            del self.sets[fdset.id]

    # The block layer's side: qemu_open / qemu_close of /dev/fdset/N --------------------

    def qemu_open(self, filename: str, flags: int) -> int:
        """A new descriptor for ``/dev/fdset/N`` opened with ``flags`` (QEMU's qemu_open).

        ``flags`` are the open(2) flags without O_CLOEXEC (they appear in the error text,
        as QEMU prints them); the duplicate is close-on-exec anyway. The newest member
        whose access mode matches is duplicated and gets ``flags``' status flags
        (O_DIRECT...), which its member shares, as QEMU's qemu_dup_flags does. Errors
        carry QEMU's texts: no such set (ENOENT), no member with that access mode
        (EACCES). Close it with :meth:`qemu_close`.
        """
        fdset_id = parse_fdset(filename[len(FDSET_PREFIX):])
        if fdset_id < 0:
            raise BlockError(f"Could not parse fdset {filename}", errno.EINVAL)
        try:
            with self._lock:
                return self._dup(fdset_id, flags)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise BlockError(f"Could not dup FD for {filename} flags {flags:x}: {os.strerror(err)}",
                             err) from exc

    def _dup(self, fdset_id: int, flags: int) -> int:
        # monitor_fdset_dup_fd_add: the set's members newest first (QEMU inserts at the head).
        fdset = self.sets.get(fdset_id)
        if fdset is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        for item in reversed(fdset.fds):
            if (fcntl.fcntl(item.fd, fcntl.F_GETFL) & os.O_ACCMODE) == (flags & os.O_ACCMODE):
                break
        else:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        dup = fcntl.fcntl(item.fd, fcntl.F_DUPFD_CLOEXEC, 0)
        try:
            # qemu_dup_flags: O_SYNC cannot be changed; the rest fcntl can set is set.
            if (flags & os.O_SYNC) != (fcntl.fcntl(dup, fcntl.F_GETFL) & os.O_SYNC):
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            fcntl.fcntl(dup, fcntl.F_SETFL, flags)
        except BaseException:
            os.close(dup)
            raise
        fdset.dups.append(dup)
        return dup

    def qemu_close(self, fd: int) -> None:
        """Close ``fd``; a duplicate from a set stops counting as in use (qemu_close,
        monitor_fdset_dup_fd_remove), and a set left without duplicates is cleaned up."""
        with self._lock:
            owner = next((s for s in self.sets.values() if fd in s.dups), None)
            try:
                os.close(fd)
            except OSError:
                if owner is not None:
                    return  # QEMU forgets the duplicate only once close() succeeded
                raise
            if owner is not None:
                owner.dups.remove(fd)
                if not owner.dups:
                    self._cleanup(owner, self.running())

    def in_use(self, fdset_id: int) -> int:
        """How many duplicates of set ``fdset_id`` are open (for diagnostics and tests)."""
        with self._lock:
            fdset = self.sets.get(fdset_id)
            return len(fdset.dups) if fdset is not None else 0

    def client_opened(self) -> None:
        """A QMP client connected."""
        with self._lock:
            self.clients += 1

    def client_closed(self, running: bool) -> None:
        """A QMP client went away: sets nobody can use any more are closed (if running)."""
        with self._lock:
            self.clients -= 1
            for fdset in list(self.sets.values()):
                self._cleanup(fdset, running)

    def query(self) -> list[dict[str, Any]]:
        """``query-fdsets``: QEMU's order (sets by falling id, each set's fds as added);
        duplicates in use are not listed (QEMU 7.2 lists only the members)."""
        with self._lock:
            return self._query()

    def _query(self) -> list[dict[str, Any]]:
        result = []
        for fdset_id in sorted(self.sets, reverse=True):
            fds = []
            for item in self.sets[fdset_id].fds:
                info: dict[str, Any] = {"fd": item.fd}
                if item.opaque is not None:
                    info["opaque"] = item.opaque
                fds.append(info)
            result.append({"fds": fds, "fdset-id": fdset_id})
        return result

    def close_all(self) -> None:
        """Close every member (the process exits; duplicates are their users' to close)."""
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        for fdset in self.sets.values():
            for item in fdset.fds:
                _close(item.fd)
        self.sets.clear()


_MACHINE_FDSETS: weakref.WeakKeyDictionary[object, FdSets] = weakref.WeakKeyDictionary()


def fdsets_of(machine: object) -> FdSets:
    """The fd sets of ``machine`` (made on first use)."""
    sets = _MACHINE_FDSETS.get(machine)
    if sets is None:
        sets = _MACHINE_FDSETS[machine] = FdSets()
    return sets
