"""Live migration between two servers over shared storage (issue 4).

The service owns the machine's migration state and implements the QMP commands; the
long-running halves live in :mod:`.source` (outgoing) and :mod:`.destination`
(incoming). ``docs/migration.md`` describes the handoff and its failure paths.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import trio

from ..blockservice import BlockService
from ..errors import QMPError
from ..fdsets import current, fd_param
from ..runstate import VM, RunState
from .core import MigrationCore
from .oneway import OneWayError, OneWayStream, is_socket, open_sink
from .options import MIGRATION_ACTIVE, MigrationOptions
from .state import RUNNING, Incoming, MigrationStatus, Outgoing
from .uri import (
    Address,
    ConnectedSocket,
    ConnectError,
    ExecAddress,
    FdAddress,
    FileAddress,
    Listening,
    OneWayAddress,
    SocketAddress,
    listen,
    parse_uri,
    stream_socket,
)


class MigrationService(MigrationCore):
    """Outgoing and incoming migration of one machine: the QMP commands."""

    def __init__(self, vm: VM, block: BlockService, incoming_uri: str | None) -> None:
        # The capability and parameter tables are the schema's: schema_facts checks them
        # against it at start-up, so introspection and replies agree.
        super().__init__(vm, block, MigrationOptions())
        self.incoming_uri = incoming_uri
        self._pending: Listening | OneWayAddress | None = None
        self._nursery: trio.Nursery | None = None

    # Incoming ----------------------------------------------------------------------------

    def check_incoming_uri(self) -> None:
        """Validate ``-incoming`` at start-up and bind its socket.

        Raises QMPError with the message to print (QEMU's ``-incoming URI: error``).
        """
        if self.delay_error is not None:
            raise QMPError(self.delay_error)
        uri = self.incoming_uri
        if uri is None or uri == "defer":
            return
        try:
            origin = _prepare_incoming(parse_uri(uri))
        except QMPError as err:
            raise QMPError(f"-incoming {uri}: {err.desc}") from err
        self._pending = origin
        self._begin_incoming(origin, exit_on_error=True)

    def start(self, nursery: trio.Nursery) -> None:
        """Serving begins: background work runs in ``nursery``; take the ``-incoming``
        migration now if it named a URI (not ``defer``)."""
        self._nursery = nursery
        if self._pending is not None:
            from .destination import run_incoming

            origin, self._pending = self._pending, None
            nursery.start_soon(run_incoming, self, origin)

    def _begin_incoming(self, origin: Listening | OneWayAddress, *, exit_on_error: bool) -> None:
        addresses = [origin.socket_address()] if isinstance(origin, Listening) else []
        self.incoming = Incoming(exit_on_error=exit_on_error, started=True,
                                 socket_addresses=addresses)
        self.set_incoming_status(MigrationStatus.SETUP)
        if not self.options.events:
            # qemu_start_incoming_migration sends this one event even without the
            # 'events' capability, for compatibility (10.x: once the URI parsed).
            self.vm.events.emit("MIGRATION", {"status": str(MigrationStatus.SETUP)})

    async def migrate_incoming(self, uri: str | None, exit_on_error: bool) -> None:
        """``migrate-incoming``: listen now, take the migration in the background."""
        # The two halves are imported when a migration starts (start-up time).
        from .destination import run_incoming

        if self.incoming.started:
            raise QMPError("The incoming migration has already been started")
        if self.vm.state is not RunState.INMIGRATE:
            raise QMPError("'-incoming' was not specified on the command line")
        if uri is None:
            raise QMPError("need either 'uri' or 'channels' argument")
        self._refuse_unsupported_capabilities()
        origin = _prepare_incoming(parse_uri(uri))
        self._begin_incoming(origin, exit_on_error=exit_on_error)
        nursery = self._nursery
        assert nursery is not None, "commands run once serving has begun"
        nursery.start_soon(run_incoming, self, origin)

    # Outgoing ----------------------------------------------------------------------------

    async def migrate(self, uri: str | None, resume: bool = False) -> None:
        """``migrate``: checks as QEMU's migrate_prepare, then run in the background."""
        from .source import run_outgoing

        if uri is None:
            raise QMPError("need either 'uri' or 'channels' argument")
        address = parse_uri(uri)
        if resume:
            raise QMPError("Cannot resume if there is no paused migration")
        self._refuse_unsupported_capabilities()
        if self.outgoing.status in RUNNING:
            raise QMPError(MIGRATION_ACTIVE)
        state = self.vm.state
        if state is RunState.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        if state is RunState.POSTMIGRATE:
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        nursery = self._nursery
        assert nursery is not None, "commands run once serving has begun"
        # Created here so that a migrate_cancel arriving before the task starts still counts.
        scope = trio.CancelScope()
        self.outgoing = out = Outgoing(started=time.monotonic(), scope=scope)
        self.set_outgoing_status(MigrationStatus.SETUP)
        target: SocketAddress | OneWayStream
        if isinstance(address, ExecAddress | FileAddress | FdAddress):
            # QEMU opens these in qmp_migrate itself: a failure fails the command too
            # (migrate_fd_error: status failed, the error in query-migrate).
            try:
                if isinstance(address, FdAddress):
                    target = await _outgoing_fd(address.name)
                else:
                    target = await open_sink(address)
            except OneWayError as err:
                out.error = str(err)
                out.finished_at = time.monotonic()
                self.set_outgoing_status(MigrationStatus.FAILED)
                raise QMPError(str(err)) from err
        else:
            target = address
        nursery.start_soon(run_outgoing, self, out, target)

    def _refuse_unsupported_capabilities(self) -> None:
        # mapped-ram changes the stream into QEMU's fixed-offset RAM file format, which a
        # server without guest RAM does not write; saying so beats a stream that only
        # looks like one (QEMU accepts the capability and fails later on a socket URI).
        on = {cap["capability"] for cap in self.query_capabilities() if cap["state"]}
        if "mapped-ram" in on:
            raise QMPError("qmp-server does not implement the 'mapped-ram' migration stream "
                           "format; turn the capability off")

    def cancel(self) -> None:
        """``migrate_cancel``: succeeds even when no migration is running."""
        out = self.outgoing
        if out.status in RUNNING and out.status is not MigrationStatus.CANCELLING:
            self.set_outgoing_status(MigrationStatus.CANCELLING)
            assert out.scope is not None
            out.scope.cancel()

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: QEMU's qmp_migrate_start_postcopy checks and texts.

        QEMU only sets a flag that its migration thread reads when the RAM left to send is
        small enough to switch over; with no guest RAM nothing is left, so the migration
        completes as precopy (as QEMU's does for a machine whose RAM is all sent). Named
        dirty bitmaps, which QEMU would send after the switch-over, go with the device
        state before the end marker: the destination resumes only once it has them.
        """
        caps = self.options.capabilities
        if not (caps.get("postcopy-ram") or caps.get("dirty-bitmaps")):
            raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")
        if self.outgoing.status is MigrationStatus.NONE:
            # Racing a finished migration is no error (QEMU's comment there).
            raise QMPError("Postcopy must be started after migration has been started")

    # savevm's internal migration ----------------------------------------------------------

    def begin_vm_state_save(self) -> None:
        """The start of qemu_savevm_state (savevm, snapshot-save): refused while a
        migration runs; otherwise the outgoing migration state starts afresh (migrate_init:
        the last migration's times and error are gone) in ``setup``, with its event."""
        if self.outgoing.status in RUNNING:
            raise QMPError(MIGRATION_ACTIVE)
        self.outgoing = _VmStateSave(started=time.monotonic())
        self.set_outgoing_status(MigrationStatus.SETUP)

    def end_vm_state_save(self, ok: bool) -> None:
        """The end of qemu_savevm_state: ``completed`` (``failed`` if the VM state could
        not be written), with its event. query-migrate then shows what QEMU 7.2 shows after
        a savevm of a machine without RAM (compared live): every time 0, 8 bytes sent."""
        out = self.outgoing
        out.active_at = out.stopped_at = out.finished_at = out.started
        out.bytes_sent = _VM_STATE_SAVE_BYTES
        self.set_outgoing_status(MigrationStatus.COMPLETED if ok else MigrationStatus.FAILED)

    # Queries and settings -----------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """``query-migrate``: the destination's view, overridden by the source's if any."""
        info = self.incoming.info()
        info.update(self.outgoing.info())
        return info

    def set_capabilities(self, changes: list[dict[str, Any]]) -> None:
        """``migrate-set-capabilities``."""
        if self.outgoing.status in RUNNING:
            raise QMPError(MIGRATION_ACTIVE)
        self.options.set_capabilities(changes)

    def query_capabilities(self) -> list[dict[str, Any]]:
        """``query-migrate-capabilities``."""
        return self.options.query_capabilities()

    def set_parameters(self, changes: dict[str, Any]) -> None:
        """``migrate-set-parameters``."""
        self.options.set_parameters(changes)

    def query_parameters(self) -> dict[str, Any]:
        """``query-migrate-parameters``."""
        return self.options.query_parameters()


#: What QEMU 7.2 counts as sent RAM for a savevm without guest RAM: the end-of-section
#: flag of the completion stage (its 8 bytes, counted as sent while stopped).
_VM_STATE_SAVE_BYTES = 8


class _VmStateSave(Outgoing):
    """The migration state a savevm leaves (qemu_savevm_state runs a migration into the
    snapshot): QEMU keeps no times or throughput for it (setup, total and downtime 0,
    mbps 0), only the RAM counters."""

    def ram(self, now: float) -> dict[str, Any]:
        """MigrationStats as qemu_savevm_state leaves them: no throughput measured."""
        stats = super().ram(now)
        stats["mbps"] = 0
        return stats


def _taken(name: str) -> int:
    # QEMU's monitor_get_fd: the outgoing side takes names only, never numbers.
    monitor = current()
    if monitor is None:
        raise QMPError(f"File descriptor named '{name}' has not been found")
    return monitor.take(name)


async def _outgoing_fd(name: str) -> ConnectedSocket | OneWayStream:
    """``migrate fd:NAME``: take the named descriptor from the monitor. A socket carries
    the two-way stream (a destination of ours answers on it); a pipe or file one way."""
    try:
        fd = _taken(name)
    except QMPError as err:
        raise OneWayError(err.desc) from err
    try:
        if is_socket(fd):
            return ConnectedSocket(stream_socket(fd))
        return await open_sink(FdAddress(name, fd))
    except ConnectError as err:  # stream_socket closed it
        raise OneWayError(str(err)) from err
    except OneWayError:
        os.close(fd)
        raise


def _prepare_incoming(address: Address) -> Listening | OneWayAddress:
    """Listen on a socket address now; check a file can be read now. Errors reach the
    command (or the command line) as QEMU's qemu_start_incoming_migration reports them."""
    if isinstance(address, ExecAddress):
        return address  # the command starts with the incoming task
    if isinstance(address, FdAddress):
        # QEMU's monitor_fd_param: named by getfd on this monitor, or a number (always
        # a number on the command line); read (or answered) by the incoming task.
        return FdAddress(address.name, fd_param(address.name))
    if isinstance(address, FileAddress):
        try:
            os.close(os.open(address.path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as err:
            raise QMPError(f"Unable to open {address.path}: {os.strerror(err.errno or errno.EIO)}") from err
        return address
    return listen(address)
