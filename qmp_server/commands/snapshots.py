"""External snapshots: blockdev-snapshot and blockdev-snapshot-sync (QEMU's blockdev.c).

Both run under the graph lock in the worker thread: they flush the old top and may
create and write a new image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blocklayer import overlay as overlays

from ..blockjobs import Backup, BackupRequest
from ..dispatcher import CommandContext, CommandTable
from ..errorreport import info_print
from ..errors import QMPError
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


@table.command("transaction")
async def transaction(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_transaction with the actions we have: every action prepares in order, then all
    commit, or, at the first failure, the prepared ones abort in reverse order."""
    machine = ctx.machine
    mode = args.get("properties", {}).get("completion-mode", "individual")
    kinds = {action["type"] for action in args["actions"]}
    if "blockdev-backup" in kinds:
        if kinds - {"blockdev-backup", "abort"}:
            raise QMPError("qmp-server: a transaction with blockdev-backup may only hold "
                           "blockdev-backup and abort actions")
        await _backup_transaction(machine, args["actions"], mode)
        return
    prepares: list[overlays.Prepare] = []
    for action in args["actions"]:
        kind: str = action["type"]
        if kind == "abort":
            prepares.append(_abort)
            continue
        make = _snapshot if kind == "blockdev-snapshot" else _snapshot_sync
        prepare = make(machine, action["data"])
        if mode != "individual":
            prepare = _refuse_mode(kind, mode)
        prepares.append(prepare)
    await machine.block.run(overlays.run_actions, prepares, machine.block.graph)


def _refuse_mode(kind: str, mode: str) -> overlays.Prepare:
    # action_check_completion_mode: the first thing the snapshot actions' prepare does.
    def prepare(action: overlays.SnapshotAction) -> None:
        raise QMPError(f"Action '{kind}' does not support Transaction property completion-mode = {mode}")

    return prepare


async def _backup_transaction(machine: Machine, actions: list[dict[str, Any]], mode: str) -> None:
    """qmp_transaction of blockdev-backup actions: each job is created in order (its
    checks fail the transaction, and the jobs created before go), then all start."""
    prepared: list[tuple[str, Backup, BackupRequest]] = []
    created: list[str] = []

    def prepare_all() -> None:
        try:
            for action in actions:
                if action["type"] == "abort":
                    raise QMPError("Transaction aborted using Abort action")
                if mode != "individual":
                    # QEMU fails every job of a grouped transaction when one fails; these
                    # jobs end on their own.
                    raise QMPError("qmp-server: completion-mode 'grouped' is not supported "
                                   "for blockdev-backup")
                request = backup_request(machine, action["data"])
                job_id, driver = machine.blockjobs.prepare_backup(request, {p[0] for p in prepared})
                prepared.append((job_id, driver, request))
                created.append(job_id)
        except BaseException:
            for _, driver, _ in reversed(prepared):
                machine.blockjobs.drop_backup(driver)
            prepared.clear()
            raise

    try:
        await machine.block.run_light(prepare_all)
    except QMPError:
        # The jobs created before the failure are cancelled (blockdev_backup_abort).
        for job_id in created:
            machine.jobs.create_aborted(job_id, "backup")
        raise
    for job_id, driver, request in prepared:
        machine.blockjobs.start_backup(job_id, driver, request)
