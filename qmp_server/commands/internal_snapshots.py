"""snapshot-save, snapshot-load, snapshot-delete: internal snapshots as jobs.

QEMU's qmp_snapshot_save/load/delete (migration/savevm.c): a job (JOB_MANUAL_DISMISS, so
it concludes and waits for job-dismiss) whose work runs save_snapshot / load_snapshot /
delete_snapshot with ``devices`` given; progress goes 0/1 then 1/1 whatever the outcome,
and a failure is the job's error in query-jobs.

QEMU does the work in a bottom half of the main loop that runs as soon as the job has
started, before the command's reply is written: the reply comes after the STOP/RESUME
of the work and before the job's waiting/pending/concluded (or aborting/concluded).
Here too the work runs in the command, after the job is created and running; the job's
own coroutine only reports the outcome once the reply is on its way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..dispatcher import CommandContext, CommandTable
from ..errors import QMPError
from ..jobs import Job
from ..runstate import RunState

table = CommandTable()


async def _run_job(ctx: CommandContext, job_id: str, job_type: str,
                   work: Callable[[], Awaitable[None]]) -> None:
    """Create and start the job, do ``work`` now (QEMU's bottom half), and let the job
    conclude with its outcome after the reply."""
    done = trio.Event()
    failure: list[QMPError] = []

    async def run(job: Job) -> None:
        # The job's coroutine: progress 0/1 -> 1/1, then the outcome of the work.
        job.total_progress = 1
        await done.wait()
        job.current_progress = 1
        if failure:
            raise failure[0]

    ctx.machine.jobs.create(job_id, job_type, run, auto_dismiss=False)
    try:
        await work()
    except QMPError as err:
        failure.append(err)
    finally:
        done.set()


@table.command("snapshot-save")
async def snapshot_save(ctx: CommandContext, args: dict[str, Any]) -> None:
    """snapshot_save_job_bh: save_snapshot(tag, overwrite=false, vmstate, devices)."""
    service = ctx.machine.internal_snapshots

    async def work() -> None:
        await service.save(args["tag"], False, args["vmstate"], args["devices"])

    await _run_job(ctx, args["job-id"], "snapshot-save", work)


@table.command("snapshot-load")
async def snapshot_load(ctx: CommandContext, args: dict[str, Any]) -> None:
    """snapshot_load_job_bh: stop (restore-vm), load, resume if it was running and loaded."""
    service = ctx.machine.internal_snapshots
    vm = ctx.machine.vm

    async def work() -> None:
        was_running = vm.running
        await vm.vm_stop(RunState.RESTORE_VM)
        if await service.load(args["tag"], args["vmstate"], args["devices"]) and was_running:
            vm.vm_start()

    await _run_job(ctx, args["job-id"], "snapshot-load", work)


@table.command("snapshot-delete")
async def snapshot_delete(ctx: CommandContext, args: dict[str, Any]) -> None:
    """snapshot_delete_job_bh: delete_snapshot(tag, devices)."""
    service = ctx.machine.internal_snapshots

    async def work() -> None:
        await service.delete(args["tag"], args["devices"])

    await _run_job(ctx, args["job-id"], "snapshot-delete", work)
