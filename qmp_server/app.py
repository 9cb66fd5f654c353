"""Wiring a server process together: machine, command tables, listeners, signals."""

from __future__ import annotations

import contextlib
import signal

import trio

from . import machinemodel
from .chardev import ChardevError, Endpoint, open_chardev
from .cli import Options
from .commands import (
    bitmaps,
    block,
    blockjobs,
    control,
    devices,
    fds,
    internal_snapshots,
    jobs,
    nbd,
    snapshots,
)
from .commands import machine as machine_commands
from .dispatcher import CommandTable, Dispatcher
from .errorreport import location
from .errors import QMPError, with_hints
from .hmp.terminal import PROMPT, banner, serve_terminal
from .keyval import blockdev_options_from_cli
from .machine import Machine, MachineConfig
from .migration import commands as migration_commands
from .protocol.session import QMPSession
from .qtest import QtestLog, serve_qtest
from .schema import Schema
from .schema_facts import check_all as check_schema_facts
from .server import Connection, serve
from .unixsocket import SocketFile


class SetupError(Exception):
    """Start-up failed; the message is for the user."""


def command_tables() -> list[CommandTable]:
    """Every command module's table."""
    return [control.table, block.table, migration_commands.table, machine_commands.table,
            devices.table, bitmaps.table, jobs.table, snapshots.table, internal_snapshots.table,
            fds.table, nbd.table, blockjobs.table]


class App:
    """One server process."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.machine: Machine | None = None
        self.listeners: list[trio.SocketListener] = []
        #: Monitors on a single connection (stdio, a connected socket): (stream, control).
        self.streams: list[tuple[trio.abc.Stream, bool]] = []
        #: Those of them on the process's stdio (what qemu-io prints must follow theirs).
        self.stdio_streams: list[trio.abc.Stream] = []
        #: HMP monitors on listening sockets.
        self.hmp_listeners: list[trio.SocketListener] = []
        #: The listeners and streams of ``pretty=on`` QMP monitors (-qmp-pretty).
        self.pretty: list[trio.SocketListener | trio.abc.Stream] = []
        self.qtest: trio.abc.Stream | None = None
        #: The qtest channel's log (QEMU's default: stderr).
        self.qtest_log = QtestLog()
        self._socket_files: list[SocketFile] = []

    def setup(self) -> None:
        """Everything that can fail before serving: schema, -blockdev, sockets."""
        options = self.options
        schema = Schema.load()
        config = MachineConfig(name=options.name, start_paused=options.start_paused,
                               incoming=options.incoming, machine_type=options.machine_type,
                               uuid=options.uuid or MachineConfig.uuid, no_shutdown=options.no_shutdown,
                               no_reboot=options.no_reboot,
                               smp=options.smp,
                               chardevs=[(device.id, device.filename(connected=True),
                                          f"chardev-{device.backend}")
                                         for device in options.chardevs.devices.values()])
        try:
            machinemodel.cpu_topology(options.smp, machinemodel.MACHINE_TYPES[options.machine_type])
        except ValueError as err:
            raise SetupError(str(err)) from None
        machine = Machine(config, schema)
        self.machine = machine
        self.dispatcher = Dispatcher(machine, command_tables())
        machine.hmp.queries = self.dispatcher.plain_queries()
        machine.devices.objects = machine.objects
        machine.devices.acpi = options.acpi
        if not schema.shipped:
            # The shipped schema is checked against the code by tests/test_schema.py
            # (check_all); a schema from elsewhere is checked here (~1 ms of start-up).
            check_schema_facts(schema, machine.block.graph.drivers)
        try:
            machine.objects.add_from_cli(schema, options.objects,
                                         machinemodel.MACHINE_TYPES[options.machine_type],
                                         options.ram_size, options.memory_backend)
        except QMPError as err:
            raise SetupError(err.desc) from err
        for text in options.blockdevs:
            try:
                with location(f"-blockdev {text}"):
                    machine.block.blockdev_add_at_startup(blockdev_options_from_cli(schema, text))
            except QMPError as err:
                raise SetupError(f"-blockdev {text}: {with_hints(err)}") from err
        # QEMU's order: -blockdev and -drive (configure_blockdev), then -device.
        for where, text in options.drives:
            try:
                with location(where):
                    machine.block.locked(machine.devices.cli_drive, text)
            except QMPError as err:
                raise SetupError(f"{where}: {with_hints(err)}") from err
        machine.internal_snapshots.clock.advances = options.accel != "qtest"
        # QEMU creates the monitors (qemu_create_late_backends) before -device, -loadvm
        # and -incoming (qmp_x_exit_preconfig): a failure there comes after the greeting
        # the monitors on a connected chardev already wrote. Ours are opened below, so
        # such a failure is held until they exist.
        late_error: SetupError | QMPError | None = None
        try:
            self._exit_preconfig(machine)
        except (SetupError, QMPError) as err:
            late_error = err
        # QEMU creates the chardevs (in order), then the monitors on them.
        opened: dict[str, Endpoint] = {}
        try:
            for device in options.chardevs.devices.values():
                endpoint = opened[device.id] = open_chardev(device)
                if endpoint.socket_file is not None:
                    self._socket_files.append(endpoint.socket_file)
            if options.qtest is not None:
                qtest = opened.get(options.qtest.id) or open_chardev(options.qtest)
                self.qtest = qtest.stream
                if self.qtest is not None:
                    # qtest_server_init (before the monitors): the connected channel's
                    # CHR_EVENT_OPENED is logged at once.
                    self.qtest_log.opened()
        except ChardevError as err:
            raise SetupError(str(err)) from err
        for monitor in options.chardevs.monitors:
            endpoint = opened[monitor.chardev.id]
            if endpoint.listener is not None:
                (self.listeners if monitor.control else self.hmp_listeners).append(endpoint.listener)
                if monitor.pretty:
                    self.pretty.append(endpoint.listener)
            elif endpoint.stream is not None:
                self.streams.append((endpoint.stream, monitor.control))
                if monitor.pretty:
                    self.pretty.append(endpoint.stream)
                if monitor.chardev.backend == "stdio":
                    self.stdio_streams.append(endpoint.stream)
        if late_error is not None:
            trio.run(self._greet)
            for socket_file in self._socket_files:
                socket_file.remove()
            raise late_error

    def _exit_preconfig(self, machine: Machine) -> None:
        """What QEMU does after its monitors exist (qmp_x_exit_preconfig): the -device
        frontends, -loadvm, then -incoming."""
        options = self.options
        for where, text in options.devices:
            try:
                with location(where):
                    machine.block.locked(machine.devices.cli_device, text)
            except QMPError as err:
                raise SetupError(f"{where}: {with_hints(err)}") from err
        if options.loadvm is not None:
            # qmp_x_exit_preconfig: load_snapshot(loadvm, ..., &error_fatal) after the
            # devices, before the incoming migration and the start.
            try:
                machine.internal_snapshots.load_at_startup(options.loadvm)
            except QMPError as err:
                raise SetupError(err.desc) from err
        machine.migration.check_incoming_uri()

    async def _greet(self) -> None:
        """What each monitor on a connected chardev writes when it is created, for a
        start-up that fails afterwards: QMP's greeting (monitor_qmp_event), HMP's banner
        and prompt (monitor_event on CHR_EVENT_OPENED)."""
        for stream, qmp in self.streams:
            if qmp:
                data = QMPSession(pretty=any(stream is p for p in self.pretty)).data_to_send()
            else:
                data = banner() + PROMPT
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(data)

    async def serve(self) -> int:
        """Serve until ``quit`` or a termination signal; returns the exit status."""
        machine = self.machine
        assert machine is not None
        machine.vm.start_after_launch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, machine)
            machine.migration.start(nursery)
            for stream, control in self.streams:
                if control:
                    stdio = any(stream is shared for shared in self.stdio_streams)
                    connection = Connection(machine, self.dispatcher, stream, self.options.poll_max_ns,
                                            shares_stdio=stdio,
                                            pretty=any(stream is p for p in self.pretty))
                    if stdio:
                        machine.hmp.console.shares_stdio(connection.drained)
                    nursery.start_soon(connection.run)
                else:
                    nursery.start_soon(serve_terminal, machine.hmp, stream)
            for listener in self.hmp_listeners:
                nursery.start_soon(_serve_hmp_listener, machine, listener)
            if self.qtest is not None:
                nursery.start_soon(serve_qtest, self.qtest, machine.internal_snapshots.clock,
                                   self.options.accel == "qtest", self.qtest_log)
            await serve(machine, self.dispatcher, self.listeners, poll_max_ns=self.options.poll_max_ns,
                        pretty=[listener for listener in self.listeners
                                if any(listener is p for p in self.pretty)])
            nursery.cancel_scope.cancel()
        return machine.vm.exit_code

    @staticmethod
    async def _signals(machine: Machine) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                if await machine.vm.shutdown("host-signal"):
                    machine.vm.request_exit(0)
                return

    def cleanup(self) -> None:
        """Close the images cleanly and remove our socket files."""
        if self.machine is not None:
            with contextlib.suppress(QMPError):
                self.machine.block.close_all()
        for socket_file in self._socket_files:
            socket_file.remove()  # only if it is still ours: it may have been replaced
        # The pidfile is the CLI's (cli.PidFile): removed there, and only while still ours.


async def _serve_hmp_listener(machine: Machine, listener: trio.SocketListener) -> None:
    """HMP on a listening socket: one client at a time, as QEMU's socket chardev."""
    named: dict[str, int] = {}  # the monitor's getfd names: they outlive a client
    while True:
        stream = await listener.accept()
        async with stream:
            await serve_terminal(machine.hmp, stream, named)
