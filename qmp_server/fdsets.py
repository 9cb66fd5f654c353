"""Descriptors passed over a monitor: ``getfd``/``closefd`` names and ``add-fd`` sets.

A client passes a descriptor with SCM_RIGHTS on a UNIX-socket monitor, in the same
``sendmsg`` as (or before) the command that claims it, as with QEMU. The server hands
what each read carried to the connection's :class:`MonitorFds`: the descriptors of the
last read that carried any wait there (earlier unclaimed ones are closed, as QEMU's socket
chardev does), ``getfd``/``add-fd`` take the first and close the others, and whatever is
still waiting when the client goes away is closed. Names given with ``getfd`` belong to
the monitor (they outlive a client's connection, as in QEMU); fd sets
(:class:`FdSets`) belong to the machine.

The command running now finds its monitor's descriptors with :func:`current` (QEMU's
``monitor_cur()``): the server sets it for the tasks of each connection. Nothing here
knows sockets or JSON.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .errors import QMPError

NO_FD = "No file descriptor supplied via SCM_RIGHTS"


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


class FdSets:
    """The machine's fd sets (``add-fd``, ``remove-fd``, ``query-fdsets``)."""

    def __init__(self) -> None:
        self.sets: dict[int, _FdSet] = {}
        #: Connected QMP clients (QEMU's mon_refcount).
        self.clients = 0

    def add(self, fd: int, fdset_id: int | None, opaque: str | None) -> dict[str, Any]:
        """``add-fd`` with the descriptor received; it is closed on an error."""
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
        """``remove-fd``: marks the descriptor(s) removed; closed at once while running."""
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
        # QEMU's monitor_fdset_cleanup (nothing here dups set members: no dup_fds).
        if running:
            keep = []
            for item in fdset.fds:
                if item.removed or self.clients == 0:
                    _close(item.fd)
                else:
                    keep.append(item)
            fdset.fds = keep
        if not fdset.fds:
            del self.sets[fdset.id]

    def client_opened(self) -> None:
        """A QMP client connected."""
        self.clients += 1

    def client_closed(self, running: bool) -> None:
        """A QMP client went away: sets nobody can use any more are closed (if running)."""
        self.clients -= 1
        for fdset in list(self.sets.values()):
            self._cleanup(fdset, running)

    def query(self) -> list[dict[str, Any]]:
        """``query-fdsets``: QEMU's order (sets by falling id, each set's fds as added)."""
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
        """Close every member (the process exits)."""
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
