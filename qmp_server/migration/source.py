"""The outgoing half of a migration (QEMU 10.x ordering).

setup -> connect, send the block configuration -> active -> destination accepts ->
stop the VM (``finish-migrate``, STOP if it was live) -> drain and flush -> device ->
inactivate every node (write locks released) -> global state + end marker ->
destination's acknowledgement -> ``postmigrate``, completed; nodes stay inactive.

On failure or cancel at any point the nodes are re-activated and the VM resumes if it was
live; if re-activation fails (the destination already holds the images) the VM stays in
``finish-migrate``, where ``cont`` is refused: never two writers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from blocklayer.dirtybitmap import DirtyBitmap

from ..errorreport import error_report
from ..errors import QMPError
from ..runstate import InvalidTransition, RunState
from . import bitmaps as bitmap_migration
from .blockconfig import describe
from .core import MigrationCore
from .oneway import OneWayStream
from .state import MigrationStatus, Outgoing
from .stream import (
    SUPPORTED_VERSIONS,
    VERSION,
    Channel,
    FrameKind,
    StreamClosed,
    StreamError,
    encode_frame,
    encode_header,
)
from .uri import ConnectError, SocketAddress, connect


class MigrationError(Exception):
    """The migration failed; the message is the error-desc."""


@dataclass
class _Progress:
    """How far the switchover got: what a failure has to undo."""

    stopped: bool = False
    old_state: RunState = RunState.RUNNING
    was_live: bool = False
    end_sent: bool = False
    #: Bitmaps marked not to be stored while they travel (unmarked again on failure).
    bitmaps: list[DirtyBitmap] = field(default_factory=list)


async def run_outgoing(service: MigrationCore, out: Outgoing,
                       target: SocketAddress | OneWayStream) -> None:
    """The background task behind ``migrate``; ends in completed, failed or cancelled."""
    progress = _Progress()
    channel: Channel | None = None
    error: str | None = None
    assert out.scope is not None
    with out.scope:
        try:
            await service.delays.pause("connect")
            if isinstance(target, OneWayStream):  # exec:/file:, opened by `migrate`
                channel = Channel(target)
                await _handover(service, out, channel, progress, target)
            else:
                channel = Channel(await connect(target))
                await _handover(service, out, channel, progress, None)
        except (ConnectError, MigrationError) as err:
            error = str(err)
        except QMPError as err:
            error = err.desc
        except StreamClosed:
            error = ("The destination closed the migration stream before acknowledging the handover"
                     if progress.end_sent else "The destination closed the migration stream")
        except StreamError as err:
            error = str(err)
    with trio.CancelScope(shield=True):
        if out.status is MigrationStatus.COMPLETED:
            assert channel is not None
            await channel.aclose()
            return
        # Failed, or cancelled by migrate_cancel; the undo must finish even if cancelled again.
        await _abort(service, out, channel, progress, error)


async def _handover(service: MigrationCore, out: Outgoing, channel: Channel,
                    progress: _Progress, one_way: OneWayStream | None) -> None:
    """The whole migration; ``one_way`` is the sink of an exec:/file: stream, on which
    nobody answers (no header, acceptance or acknowledgement to wait for)."""
    vm = service.vm
    block = service.block
    nodes = await block.run(describe, block.graph)
    await channel.send(encode_header(),
                       encode_frame(FrameKind.CONFIG, {"nodes": [n.to_wire() for n in nodes]}))
    out.bytes_sent = channel.bytes_sent
    out.active_at = time.monotonic()
    service.set_outgoing_status(MigrationStatus.ACTIVE)

    if one_way is None:
        version = await channel.receive_header()
        if version not in SUPPORTED_VERSIONS:
            raise MigrationError(f"The destination speaks migration stream version {version}, "
                                 f"this server speaks version {VERSION}")
        await channel.receive(FrameKind.ACCEPT)
    await _pause(service, channel, "active")

    # Switchover: from here on the guest is down (downtime starts).
    out.stopped_at = time.monotonic()
    out.bytes_before_stop = channel.bytes_sent
    progress.old_state = vm.state
    progress.was_live = vm.live
    # QEMU's vm_stop_force_state: a paused VM changes state silently, a live one says STOP.
    vm.set_state(RunState.FINISH_MIGRATE)
    progress.stopped = True
    if progress.was_live:
        service.vm.events.emit("STOP")
    try:
        await block.drain_and_flush_all()
    except QMPError as err:
        raise MigrationError(f"Failed to flush the block devices: {err.desc}") from err
    service.set_outgoing_status(MigrationStatus.DEVICE)
    await _pause(service, channel, "device")

    frames: list[bytes] = []
    if service.options.dirty_bitmaps:
        # Collected and marked before inactivation, so that it neither stores nor drops them.
        try:
            outgoing = await block.run(bitmap_migration.collect, block.graph, service.backends(),
                                       service.options.bitmap_mapping)
        except bitmap_migration.BitmapMigrationError as err:
            error_report(str(err))
            raise MigrationError(str(err)) from err
        progress.bitmaps = outgoing.bitmaps
        frames = [encode_frame(FrameKind.BITMAP, f) for f in outgoing.frames]

    # Inactivate before the end marker, so that the destination's activation can succeed.
    try:
        await block.inactivate_all()
    except QMPError as err:
        error_report(f"migration_block_inactivate: {err.desc}")
        raise MigrationError("Block inactivate failed during switchover") from err
    await _pause(service, channel, "inactivated")

    await channel.send(
        *frames,
        encode_frame(FrameKind.GLOBAL, {"runstate": str(progress.old_state), "running": progress.was_live}),
        encode_frame(FrameKind.END),
    )
    progress.end_sent = True
    out.bytes_sent = channel.bytes_sent
    if one_way is None:
        await channel.receive(FrameKind.ACK)
    else:
        # QEMU's semantics for a stream nobody answers: complete once it is written.
        await one_way.finish()

    # No checkpoint from here on: once acknowledged, a migrate_cancel cannot undo it.
    out.finished_at = time.monotonic()
    vm.set_state(RunState.POSTMIGRATE)
    service.set_outgoing_status(MigrationStatus.COMPLETED)


async def _pause(service: MigrationCore, channel: Channel, phase: str) -> None:
    """The test hook's delay for ``phase``, failing early if the destination goes away."""
    if phase not in service.delays:
        return
    error: StreamError | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal error
            try:
                await channel.receive()  # nothing is expected now: any frame is an error
            except StreamError as err:
                error = err
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await service.delays.pause(phase)
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def _abort(service: MigrationCore, out: Outgoing, channel: Channel | None,
                 progress: _Progress, error: str | None) -> None:
    vm = service.vm
    cancelled = out.status is MigrationStatus.CANCELLING
    if channel is not None:
        out.bytes_sent = channel.bytes_sent
        # Tell the destination why, so that its error-desc says so; best effort only.
        reason = ("Migration cancelled by the source" if cancelled
                  else f"The source failed the migration: {error}")
        with trio.move_on_after(1):
            try:
                await channel.send(encode_frame(FrameKind.FAIL, {"error": reason}))
            except StreamError:
                pass
        await channel.aclose()
    out.finished_at = time.monotonic()
    if not cancelled:
        out.error = error
        service.set_outgoing_status(MigrationStatus.FAILED)
        if error is not None:
            error_report(error)
    # Not inactivated yet (activation would clear the marks), or activation fails below.
    bitmap_migration.release(progress.bitmaps)
    if progress.stopped:
        try:
            await service.block.activate_all()
        except QMPError as err:
            # The destination may already run on the images: stay stopped (QEMU keeps
            # finish-migrate, where cont is refused) and let the management tool decide.
            note = f"Could not re-activate the block devices: {err.desc}"
            out.error = f"{out.error}; {note}" if out.error else note
            error_report(note)
        else:
            if progress.was_live:
                vm.vm_start()
            elif vm.state is RunState.FINISH_MIGRATE:
                try:
                    vm.set_state(progress.old_state)
                except InvalidTransition:
                    vm.set_state(RunState.PAUSED)
    if cancelled:
        service.set_outgoing_status(MigrationStatus.CANCELLED)
