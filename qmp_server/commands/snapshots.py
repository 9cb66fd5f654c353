"""External snapshots: blockdev-snapshot and blockdev-snapshot-sync (QEMU's blockdev.c).

Both run under the graph lock in the worker thread: they flush the old top and may
create and write a new image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blocklayer import overlay as overlays

from ..backuprequest import drive_backup_request
from ..blockjobs import Backup, BackupRequest
from ..dispatcher import CommandContext, CommandTable
from ..errorreport import info_print
from ..errors import QMPError
from . import bitmaps
from .blockjobs import backup_request
from .lookup import lookup_bs

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


def _snapshot(machine: Machine, data: dict[str, Any]) -> overlays.Prepare:
    """A blockdev-snapshot action: the lookups happen in its prepare, as in QEMU."""

    def prepare(action: overlays.SnapshotAction) -> None:
        old = lookup_bs(machine, data["node"], data["node"])
        action.prepare_snapshot(old, lambda: lookup_bs(machine, data["overlay"], data["overlay"]))

    return prepare


def _snapshot_sync(machine: Machine, data: dict[str, Any]) -> overlays.Prepare:
    """A blockdev-snapshot-sync action."""
    node_name: str | None = data.get("node-name")
    request = overlays.SyncRequest(snapshot_file=data["snapshot-file"],
                                   node_name=data.get("snapshot-node-name"),
                                   format=data.get("format", "qcow2"),
                                   existing=data.get("mode", "absolute-paths") == "existing",
                                   by_node_name=node_name is not None,
                                   announce=info_print)

    def prepare(action: overlays.SnapshotAction) -> None:
        old = lookup_bs(machine, data.get("device"), node_name)
        action.prepare_sync(old, request)

    return prepare


@table.command("blockdev-snapshot")
async def blockdev_snapshot(ctx: CommandContext, args: dict[str, Any]) -> None:
    """The overlay (added with blockdev-add, backing null) goes on top of ``node``."""
    machine = ctx.machine
    await machine.block.run(overlays.run_actions, [_snapshot(machine, args)], machine.block.graph)


@table.command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(ctx: CommandContext, args: dict[str, Any]) -> None:
    """Create the overlay image (unless mode=existing), open it, put it on top."""
    machine = ctx.machine
    await machine.block.run(overlays.run_actions, [_snapshot_sync(machine, args)], machine.block.graph)


def _abort(action: overlays.SnapshotAction) -> None:
    # abort_prepare: this action never succeeds.
    raise QMPError("Transaction aborted using Abort action")


#: The bitmap actions: (kind, the change made at prepare, returning its undo).
_BITMAP_ACTIONS: dict[str, Callable[[Machine, dict[str, Any]], Callable[[], None]]] = {
    "block-dirty-bitmap-add": bitmaps.apply_add,
    "block-dirty-bitmap-clear": bitmaps.apply_clear,
    "block-dirty-bitmap-enable": lambda machine, data: bitmaps.apply_enable(machine, data, True),
    "block-dirty-bitmap-disable": lambda machine, data: bitmaps.apply_enable(machine, data, False),
    "block-dirty-bitmap-merge": bitmaps.apply_merge,
}


def _bitmap_action(machine: Machine, kind: str, data: dict[str, Any]) -> overlays.Prepare:
    """A bitmap action: the change at prepare (undone on abort); a removal at commit."""

    def prepare(action: overlays.SnapshotAction) -> None:
        if kind == "block-dirty-bitmap-remove":
            action.later.append(bitmaps.check_remove(machine, data))
        else:
            action.undo.append(_BITMAP_ACTIONS[kind](machine, data))

    return prepare


class _Backups:
    """The backup jobs a transaction creates: started once it has committed."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.prepared: list[tuple[str, Backup, BackupRequest]] = []
        #: Every job id created, for the events of those a failure cancels.
        self.created: list[str] = []

    def action(self, data: dict[str, Any], drive: bool = False) -> overlays.Prepare:
        """blockdev_backup_prepare (drive_backup_prepare with ``drive``: the target image
        made and opened first): the job is created, not started; abort drops it."""

        def prepare(action: overlays.SnapshotAction) -> None:
            if drive:
                request = drive_backup_request(self.machine.devices, self.machine.block.graph, data)
                # The target was the job's alone: it goes with a dropped job.
                action.undo.append(lambda: self.machine.block.graph.release(request.target))
            else:
                request = backup_request(self.machine, data)
            taken = {entry[0] for entry in self.prepared}
            job_id, driver = self.machine.blockjobs.prepare_backup(request, taken)
            entry = (job_id, driver, request)
            self.prepared.append(entry)
            self.created.append(job_id)

            def undo() -> None:
                driver.drop()
                self.prepared.remove(entry)

            action.undo.append(undo)

        return prepare


@table.command("transaction")
async def transaction(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_transaction with the actions we have: every action prepares in order, then all
    commit, or, at the first failure, the prepared ones abort in reverse order. Backup
    jobs start once all committed."""
    machine = ctx.machine
    mode = args.get("properties", {}).get("completion-mode", "individual")
    backups = _Backups(machine)
    prepares: list[overlays.Prepare] = []
    for action in args["actions"]:
        kind: str = action["type"]
        if kind == "abort":
            prepares.append(_abort)
            continue
        if mode != "individual":
            # QEMU runs the backup jobs of a grouped transaction as one; ours end alone.
            prepares.append(_refuse_mode(kind, mode))
        elif kind in ("blockdev-backup", "drive-backup"):
            prepares.append(backups.action(action["data"], drive=kind == "drive-backup"))
        elif kind in _BITMAP_ACTIONS or kind == "block-dirty-bitmap-remove":
            prepares.append(_bitmap_action(machine, kind, action["data"]))
        elif kind == "blockdev-snapshot":
            prepares.append(_snapshot(machine, action["data"]))
        else:
            prepares.append(_snapshot_sync(machine, action["data"]))
    try:
        await machine.block.run(overlays.run_actions, prepares, machine.block.graph)
    except QMPError:
        # The backup jobs created before the failure are cancelled (blockdev_backup_abort).
        for job_id in backups.created:
            machine.jobs.create_aborted(job_id, "backup")
        raise
    for job_id, driver, request in backups.prepared:
        machine.blockjobs.start_backup(job_id, driver, request)


def _refuse_mode(kind: str, mode: str) -> overlays.Prepare:
    # action_check_completion_mode: the first thing the snapshot actions' prepare does.
    def prepare(action: overlays.SnapshotAction) -> None:
        raise QMPError(f"Action '{kind}' does not support Transaction property completion-mode = {mode}")

    return prepare
