"""The incoming half of a migration (QEMU 10.x ``process_incoming_migration_bh``).

Every node has been inactive since it was opened (``inmigrate``), so the destination holds
no write locks until the handover. After the end marker: if the source was live and we
may autostart (no ``-S``, no ``stop`` during ``inmigrate``, or a later ``cont``), activate
every node (dropping metadata cached while inactive, taking the locks) and run (RESUME);
otherwise stay paused with the nodes inactive. MIGRATION ``completed`` comes only after
that, then the acknowledgement goes back to the source.
"""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from ..errorreport import error_report
from ..errors import QMPError
from ..runstate import LIVE_STATES, InvalidTransition, RunState
from . import bitmaps as bitmap_migration
from .blockconfig import NodeDescription, compare, describe
from .core import MigrationCore
from .oneway import OneWayError, open_source, wait_for_data
from .source import MigrationError
from .state import MigrationStatus
from .stream import (
    SUPPORTED_VERSIONS,
    VERSION,
    Channel,
    FrameKind,
    PeerFailed,
    StreamClosed,
    StreamError,
    encode_frame,
    encode_header,
)
from .uri import Listening, OneWayAddress


async def run_incoming(service: MigrationCore, origin: Listening | OneWayAddress) -> None:
    """The background task behind ``-incoming URI`` / ``migrate-incoming``.

    ``origin`` is a listening socket (a live source connects) or an exec:/file: stream
    (read now; what we would answer goes nowhere, see :mod:`.oneway`).
    """
    stream: trio.abc.Stream
    if isinstance(origin, Listening):
        try:
            stream = await origin.listener.accept()
        finally:
            # QEMU takes exactly one connection.
            origin.close()
    else:
        try:
            stream = await open_source(origin)
        except OneWayError as err:
            await _fail(service, str(err))
            return
        try:
            # 'setup' until the source's first bytes (QEMU's G_IO_IN watch).
            await wait_for_data(stream)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
    service.set_incoming_status(MigrationStatus.ACTIVE)
    channel = Channel(stream)
    try:
        await _receive(service, channel)
    except MigrationError as err:
        await _fail(service, str(err))  # the source has been told already
    except PeerFailed as err:
        await _fail(service, str(err))
    except StreamClosed:
        await _fail(service, "Migration stream truncated: the source closed the connection "
                             "before the end marker")
    except (StreamError, QMPError) as err:
        desc = err.desc if isinstance(err, QMPError) else str(err)
        await _refuse(channel, desc)
        await _fail(service, desc)
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()


async def _refuse(channel: Channel, error: str) -> MigrationError:
    """Tell the source why (best effort) and return the error to raise."""
    with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(StreamError):
        await channel.send(encode_frame(FrameKind.FAIL, {"error": error}))
    return MigrationError(error)


def _source_nodes(payload: dict[str, Any]) -> list[NodeDescription]:
    nodes = payload.get("nodes")
    if not isinstance(nodes, list):
        raise StreamError("Migration stream corrupt: bad 'C' frame")
    try:
        return [NodeDescription.from_wire(item) for item in nodes]
    except ValueError as err:
        raise StreamError(f"Migration stream corrupt: bad 'C' frame ({err})") from None


async def _receive(service: MigrationCore, channel: Channel) -> None:
    block = service.block
    # Read first: whatever a foreign peer sent (and why it hung up) is the error to report.
    version = await channel.receive_header()
    await channel.send(encode_header())
    if version not in SUPPORTED_VERSIONS:
        raise await _refuse(channel, f"Unsupported migration stream version {version} "
                                     f"(this server supports version {VERSION})")
    config = await channel.receive(FrameKind.CONFIG)
    mismatch = compare(_source_nodes(config.payload), await block.run(describe, block.graph))
    if mismatch is not None:
        raise await _refuse(channel, mismatch)
    await channel.send(encode_frame(FrameKind.ACCEPT))

    while True:
        frame = await channel.receive(FrameKind.BITMAP, FrameKind.GLOBAL)
        if frame.kind is FrameKind.GLOBAL:
            state = frame
            break
        await _load_bitmap(service, channel, frame.payload)
    await channel.receive(FrameKind.END)
    runstate = state.payload.get("runstate")
    running = state.payload.get("running")
    if not isinstance(runstate, str) or not isinstance(running, bool):
        raise StreamError("Migration stream corrupt: bad 'G' frame")
    await service.delays.pause("incoming-end")

    # The source has let go of the images; nothing below may fail the migration.
    with trio.CancelScope(shield=True):
        await _take_over(service, runstate, running)
        await service.delays.pause("incoming-ack")
        service.incoming.socket_addresses = []
        service.set_incoming_status(MigrationStatus.COMPLETED)
        vm = service.vm
        with trio.move_on_after(5), contextlib.suppress(StreamError):
            await channel.send(encode_frame(FrameKind.ACK, {"runstate": str(vm.state),
                                                            "running": vm.running}))


async def _load_bitmap(service: MigrationCore, channel: Channel, payload: dict[str, Any]) -> None:
    # No capability check: QEMU 7.2 always registers the 'dirty-bitmap' section, so a
    # destination without 'dirty-bitmaps' loads them too (checked against QEMU 7.2).
    block = service.block
    try:
        await block.run(bitmap_migration.apply, block.graph, service.backends(),
                        service.options.bitmap_mapping, payload, error_report)
    except bitmap_migration.BitmapMigrationError as err:
        error_report(str(err))
        raise await _refuse(channel, str(err)) from err


async def _take_over(service: MigrationCore, runstate: str, running: bool) -> None:
    vm = service.vm
    try:
        source_state: RunState | None = RunState(runstate)
    except ValueError:
        source_state = None
    if not (running or source_state in LIVE_STATES):
        # The source was paused (or never started): take over its state, nodes inactive.
        try:
            vm.set_state(source_state if source_state is not None else RunState.PAUSED)
        except InvalidTransition:
            vm.set_state(RunState.PAUSED)
        return
    if not vm.autostart:
        vm.set_state(RunState.PAUSED)
        return
    try:
        await service.block.activate_all()
    except QMPError as err:
        # Not started, nodes left inactive (QEMU: error on stderr, VM paused).
        error_report(err.desc)
        service.incoming.error = err.desc
        with contextlib.suppress(QMPError):
            await service.block.inactivate_all()
        vm.set_state(RunState.PAUSED)
        return
    if vm.autostart:
        vm.vm_start()
    else:
        # A `stop` arrived while the nodes were being activated.
        vm.set_state(RunState.PAUSED)


async def _fail(service: MigrationCore, error: str) -> None:
    incoming = service.incoming
    incoming.error = error
    incoming.socket_addresses = []
    service.set_incoming_status(MigrationStatus.FAILED)
    if incoming.exit_on_error:
        # QEMU reports the error and exits with status 1; the server lets the clients
        # read the MIGRATION event before it goes.
        error_report(f"load of migration failed: {error}")
        service.vm.request_exit(1)
    else:
        # Stay in inmigrate with the nodes inactive; a new migrate-incoming may try again.
        incoming.started = False
