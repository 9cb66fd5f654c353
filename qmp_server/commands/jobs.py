"""Job commands (job-*, query-jobs) and the commands that start jobs (blockdev-create)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from blocklayer.create import Creation, check_driver, prepare_creation
from blocklayer.errors import BlockError

from ..dispatcher import CommandContext, CommandTable, Handler
from ..errors import QMPError
from ..jobs import Job, JobService

if TYPE_CHECKING:
    from ..machine import Machine

table = CommandTable()


@table.query("query-jobs")
def query_jobs(machine: Machine) -> list[dict[str, Any]]:
    """Every job not yet dismissed, newest first (qmp_query_jobs)."""
    return machine.jobs.query()


def _by_id(verb: Callable[[JobService, str], None]) -> Handler:
    """A ``job-*`` command that applies ``verb`` to the job its ``id`` names."""
    async def handler(ctx: CommandContext, args: dict[str, Any]) -> None:
        verb(ctx.machine.jobs, args["id"])
    return handler


# job-dismiss: a concluded job leaves query-jobs; job-finalize: a pending job concludes;
# job-cancel: the job aborts (at once, or when its running work returns); job-pause and
# job-resume record or withdraw a pause request (no job kind here has a pause point);
# job-complete completes a ready job (an active commit once in sync).
for _name, _verb in (("job-dismiss", JobService.dismiss), ("job-finalize", JobService.finalize),
                     ("job-cancel", JobService.cancel), ("job-pause", JobService.pause),
                     ("job-resume", JobService.resume), ("job-complete", JobService.complete)):
    table.command(_name)(_by_id(_verb))


def _unlocked(creation: Creation) -> None:
    # A creation that works on its own file only, outside the graph lock.
    try:
        creation.run()
    except BlockError as err:
        raise QMPError(err.message) from err


@table.command("blockdev-create")
async def blockdev_create(ctx: CommandContext, args: dict[str, Any]) -> None:
    """qmp_blockdev_create: a ``create`` job that concludes and waits for job-dismiss.

    The options are checked (and the file opened and locked, or the node's user added)
    before the job starts, as QEMU's create functions do before their first I/O: a job
    that fails there concludes before the reply, as in QEMU. The I/O runs in a worker
    thread.
    """
    options: dict[str, Any] = args["options"]
    job_id: str = args["job-id"]
    try:
        check_driver(options["driver"])
    except BlockError as err:
        raise QMPError(err.message) from err
    jobs = ctx.machine.jobs
    jobs.check_id(job_id)
    block = ctx.machine.block
    creation: Creation | None = None
    early_error: str | None = None
    try:
        creation = await block.run_light(prepare_creation, block.graph, options)
    except QMPError as err:
        early_error = err.desc

    async def run(job: Job) -> None:
        # blockdev_create_run: progress 0/1 (set before the reply: see create()), the
        # driver's create, then 1/1.
        assert creation is not None
        try:
            if creation.needs_graph:
                await block.run(creation.run)
            else:
                await trio.to_thread.run_sync(_unlocked, creation)
        finally:
            job.current_progress = 1

    # JOB_DEFAULT | JOB_MANUAL_DISMISS
    jobs.create(job_id, "create", run, auto_finalize=True, auto_dismiss=False,
                early_error=early_error, progress=(0, 1) if early_error is None else (1, 1))
