"""snapshot-save, snapshot-load, snapshot-delete: internal snapshots as jobs.

QEMU's qmp_snapshot_save/load/delete (migration/savevm.c): a job (JOB_MANUAL_DISMISS, so
it concludes and waits for job-dismiss) whose work runs save_snapshot / load_snapshot /
delete_snapshot with ``devices`` given; progress goes 0/1 then 1/1 whatever the outcome,
and a failure is the job's error in query-jobs.
"""

from __future__ import annotations

from typing import Any

from ..dispatcher import CommandContext, CommandTable
from ..jobs import Job
from ..runstate import RunState

table = CommandTable()


@table.command("snapshot-save")
async def snapshot_save(ctx: CommandContext, args: dict[str, Any]) -> None:
    """snapshot_save_job_bh: save_snapshot(tag, overwrite=false, vmstate, devices)."""
    service = ctx.machine.internal_snapshots
    tag: str = args["tag"]
    vmstate: str = args["vmstate"]
    devices: list[str] = args["devices"]

    async def run(job: Job) -> None:
        job.total_progress = 1
        try:
            await service.save(tag, False, vmstate, devices)
        finally:
            job.current_progress = 1

    ctx.machine.jobs.create(args["job-id"], "snapshot-save", run, auto_dismiss=False)


@table.command("snapshot-load")
async def snapshot_load(ctx: CommandContext, args: dict[str, Any]) -> None:
    """snapshot_load_job_bh: stop (restore-vm), load, resume if it was running and loaded."""
    service = ctx.machine.internal_snapshots
    vm = ctx.machine.vm
    tag: str = args["tag"]
    vmstate: str = args["vmstate"]
    devices: list[str] = args["devices"]

    async def run(job: Job) -> None:
        job.total_progress = 1
        try:
            was_running = vm.running
            await vm.vm_stop(RunState.RESTORE_VM)
            if await service.load(tag, vmstate, devices) and was_running:
                vm.vm_start()
        finally:
            job.current_progress = 1

    ctx.machine.jobs.create(args["job-id"], "snapshot-load", run, auto_dismiss=False)


@table.command("snapshot-delete")
async def snapshot_delete(ctx: CommandContext, args: dict[str, Any]) -> None:
    """snapshot_delete_job_bh: delete_snapshot(tag, devices)."""
    service = ctx.machine.internal_snapshots
    tag: str = args["tag"]
    devices: list[str] = args["devices"]

    async def run(job: Job) -> None:
        job.total_progress = 1
        try:
            await service.delete(tag, devices)
        finally:
            job.current_progress = 1

    ctx.machine.jobs.create(args["job-id"], "snapshot-delete", run, auto_dismiss=False)
