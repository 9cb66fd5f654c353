"""Wiring a server process together: machine, command tables, listeners, signals."""

from __future__ import annotations

import contextlib
import signal
import socket
from functools import partial

import trio

from .cli import MonitorSpec, Options
from .commands import block, control, devices
from .commands import machine as machine_commands
from .dispatcher import CommandTable, Dispatcher
from .errors import QMPError
from .machine import Machine, MachineConfig
from .runstate import RunState
from .schema import Schema, blockdev_options_from_cli
from .server import LISTEN_BACKLOG, ListenError, SocketFile, bind_unix_file, serve


class SetupError(Exception):
    """Start-up failed; the message is for the user."""


def command_tables() -> list[CommandTable]:
    """Every command module's table."""
    from .migration import commands as migration_commands

    return [control.table, block.table, migration_commands.table, machine_commands.table,
            devices.table]


def _address(monitor: MonitorSpec) -> str:
    if monitor.kind == "unix":
        return f"unix:{monitor.path}"
    return f"tcp:{monitor.host}:{monitor.port}"


class App:
    """One server process."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.machine: Machine | None = None
        self.listeners: list[trio.SocketListener] = []
        self._socket_files: list[SocketFile] = []

    def setup(self) -> None:
        """Everything that can fail before serving: schema, -blockdev, sockets."""
        options = self.options
        schema = Schema.load()
        config = MachineConfig(name=options.name, start_paused=options.start_paused,
                               incoming=options.incoming, machine_type=options.machine_type,
                               monitor_addresses=[_address(monitor) for monitor in options.monitors])
        machine = Machine(config, schema)
        self.machine = machine
        self.dispatcher = Dispatcher(machine, command_tables())
        for text in options.blockdevs:
            try:
                spec = blockdev_options_from_cli(schema, text)
                if "node-name" not in spec:
                    raise QMPError("'node-name' must be specified for the root node")
                inactive = machine.vm.state is RunState.INMIGRATE
                machine.block.locked(partial(machine.block.graph.open, spec, inactive=inactive))
            except QMPError as err:
                raise SetupError(f"-blockdev {text}: {err.desc}") from err
        # QEMU's order: -blockdev and -drive (configure_blockdev), then -device.
        for flag, texts, make in (("-drive", options.drives, machine.devices.cli_drive),
                                  ("-device", options.devices, machine.devices.cli_device)):
            for text in texts:
                try:
                    machine.block.locked(make, text)
                except QMPError as err:
                    raise SetupError(f"{flag} {text}: {err.desc}") from err
        machine.migration.check_incoming_uri()
        for monitor in options.monitors:
            try:
                if monitor.kind == "unix":
                    listener, socket_file = bind_unix_file(monitor.path)
                    self.listeners.append(listener)
                    self._socket_files.append(socket_file)
                else:
                    sock = socket.create_server((monitor.host, monitor.port), reuse_port=False,
                                                backlog=LISTEN_BACKLOG)
                    self.listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            except (ListenError, OSError) as err:
                raise SetupError(f"-qmp {monitor.text}: {err}") from err

    async def serve(self) -> int:
        """Serve until ``quit`` or a termination signal; returns the exit status."""
        machine = self.machine
        assert machine is not None
        machine.vm.start_after_launch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals, machine)
            await machine.migration.start_incoming(nursery)
            await serve(machine, self.dispatcher, self.listeners, poll_max_ns=self.options.poll_max_ns)
            nursery.cancel_scope.cancel()
        return machine.exit_code

    @staticmethod
    async def _signals(machine: Machine) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                machine.events.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})
                machine.request_exit(0)
                return

    def cleanup(self) -> None:
        """Close the images cleanly and remove our socket files."""
        if self.machine is not None:
            with contextlib.suppress(QMPError):
                self.machine.block.close_all()
        for socket_file in self._socket_files:
            socket_file.remove()  # only if it is still ours: it may have been replaced
        # The pidfile is the CLI's (cli.PidFile): removed there, and only while still ours.
