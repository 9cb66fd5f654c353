"""Jobs as QEMU runs them (job.c, job-qmp.c): the state machine, its events and verbs.

A job is created in ``created``, goes ``running`` as soon as it starts, and when its work
ends either ``waiting`` -> ``pending`` -> (finalized) ``concluded`` or, on failure or
cancellation, ``aborting`` -> ``concluded``; ``job-dismiss`` (or auto-dismiss) takes it to
``null`` and out of ``query-jobs``. Every change is a ``JOB_STATUS_CHANGE`` event. The
work itself (file I/O) runs in a worker thread (the caller's ``run`` coroutine decides
how, see ``BlockService.run``), so the event loop keeps serving while a job runs.

A job kind may bring a :class:`JobDriver` (QEMU's JobDriver callbacks: prepare, commit,
abort, clean, and the block jobs' notifiers for their BLOCK_JOB_* events). Kinds with pause
points (the block jobs, between chunks) call :meth:`JobService.pause_point`; for the
others ``job-pause`` only records the request, as QEMU does for a job that never reaches
one.

Cancelling follows QEMU's two flags: a cancel request (``cancel_requested``, QEMU's
job->cancelled) and a forced cancel (``cancelled``, job->force_cancel). A kind whose
driver says a cancel is soft (a ready active commit, commit_active_cancel) only gets the
request: it ends as a success, without its graph change.

Not modelled: transactions of several jobs (each job is its own transaction).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import QMPError
from .events import EventBus


class JobStatus(enum.Enum):
    """QAPI JobStatus, in QEMU's order (the order of JobSTT's rows)."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus

# job.c's JobSTT: the transitions a job may make (anything else is a bug here).
_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

# job.c's JobVerbTable: the states in which each QMP verb is accepted.
_EARLY = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
VERBS: dict[str, frozenset[JobStatus]] = {
    "cancel": _EARLY | {S.WAITING, S.PENDING},
    "pause": _EARLY,
    "resume": _EARLY,
    "set-speed": _EARLY,
    "complete": frozenset({S.READY, S.STANDBY}),
    "finalize": frozenset({S.PENDING}),
    "dismiss": frozenset({S.CONCLUDED}),
}


#: job_pause_point_locked: the status a pausing job takes, and back on resume.
_PAUSED_AS = {S.RUNNING: S.PAUSED, S.READY: S.STANDBY}
_RESUMED_AS = {S.PAUSED: S.RUNNING, S.STANDBY: S.READY}


def id_wellformed(name: str) -> bool:
    """QEMU's id_wellformed: an ASCII letter, then letters, digits, '-', '.', '_'."""
    if not name or not (name[0].isascii() and name[0].isalpha()):
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in name)


#: A job's work: returns normally on success, raises QMPError (its ``desc`` becomes the
#: job's error) on failure.
log = logging.getLogger(__name__)

JobRun = Callable[["Job"], Awaitable[None]]


class JobDriver:
    """What a job kind adds to the state machine; the defaults do nothing.

    The graph work (prepare, commit, abort, clean) runs in the event loop's thread, in
    QEMU's order: prepare when the job is finalized, then commit (or abort when it failed
    or was cancelled), then clean, then :meth:`finalized` (the kind's events).
    """

    #: The job stops at pause points (:meth:`JobService.pause_point`).
    pause_points = False

    def prepare(self, job: Job) -> str | None:
        """job_prepare: the graph changes that may fail; an error text fails the job."""
        return None

    def commit(self, job: Job) -> None:
        """job_commit: the job succeeded."""

    def abort(self, job: Job) -> None:
        """job_abort: the job failed or was cancelled."""

    def clean(self, job: Job) -> None:
        """job_clean: either way, last."""

    def pending(self, job: Job) -> None:
        """job_event_pending: the job waits for job-finalize (auto-finalize off)."""

    def ready(self, job: Job) -> None:
        """job_event_ready: the job went ``ready``."""

    def finalized(self, job: Job) -> None:
        """job_event_cancelled/completed: the job was finalized (after clean)."""

    def complete(self, job: Job) -> None:
        """job_complete on a ready job; raise QMPError when the kind cannot."""
        raise QMPError(f"The active block job '{job.id}' cannot be completed")

    def cancel(self, job: Job, force: bool) -> bool:
        """JobDriver.cancel: whether a cancel asked with ``force`` is a forced one. A
        kind without one is always force-cancelled (job_cancel_async_locked)."""
        return True


def _guarded(job: Job, step: Callable[[Job], None]) -> None:
    """One of a job kind's finishing steps: a failure there is a bug, reported on stderr
    with its traceback; the job still concludes and the server goes on."""
    try:
        step(job)
    except Exception:
        log.exception("job '%s': %s failed", job.id, getattr(step, "__name__", "a step"))


@dataclass(eq=False)
class Job:
    """One job (QEMU's Job), as query-jobs reports it."""

    id: str
    type: str
    auto_finalize: bool = True
    auto_dismiss: bool = True
    status: JobStatus = S.UNDEFINED
    current_progress: int = 0
    total_progress: int = 0
    #: job->err: why the job failed (also "Operation canceled" after a cancel).
    error: str | None = None
    #: job->ret != 0
    failed: bool = False
    #: QEMU's job->force_cancel (job_is_cancelled): the job stops and aborts.
    cancelled: bool = False
    #: QEMU's job->cancelled (job_cancel_requested): set by soft cancels too.
    cancel_requested: bool = False
    #: The work has returned (job->deferred_to_main_loop).
    finished: bool = False
    user_paused: bool = False
    #: The job's work is running in a worker thread (QEMU's job->busy, for queries).
    busy: bool = False
    driver: JobDriver = field(default_factory=JobDriver)
    #: Set to wake a job sleeping at a pause point (job_enter): pause, resume, cancel,
    #: a new speed.
    kicked: trio.Event = field(default_factory=trio.Event)

    def info(self) -> dict[str, Any]:
        """JobInfo, members in the order QEMU 7.2 writes them (checked live)."""
        info: dict[str, Any] = {"current-progress": self.current_progress, "status": self.status.value,
                                "total-progress": self.total_progress, "type": self.type, "id": self.id}
        if self.error is not None:
            info["error"] = self.error
        return info


class JobService:
    """The machine's jobs, newest first (QEMU inserts new jobs at the list head)."""

    def __init__(self, events: EventBus) -> None:
        self._events = events
        self.jobs: list[Job] = []

    # Lookup and queries ---------------------------------------------------------------

    def find(self, job_id: str) -> Job:
        """The job ``job_id``, or QEMU's find_job_locked error."""
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise QMPError("Job not found")

    def query(self) -> list[dict[str, Any]]:
        """query-jobs."""
        return [job.info() for job in self.jobs]

    # The state machine ------------------------------------------------------------------

    def _transition(self, job: Job, status: JobStatus) -> None:
        # job_state_transition_locked: only changes are announced.
        assert status in _TRANSITIONS[job.status], (job.status, status)
        old, job.status = job.status, status
        if old is not status:
            self._events.emit("JOB_STATUS_CHANGE", {"status": status.value, "id": job.id})

    @staticmethod
    def _apply_verb(job: Job, verb: str) -> None:
        # job_apply_verb_locked
        if job.status not in VERBS[verb]:
            raise QMPError(f"Job '{job.id}' in state '{job.status.value}' cannot accept "
                           f"command verb '{verb}'")

    def check_id(self, job_id: str) -> None:
        """job_create's checks of a new job's id, with QEMU's texts."""
        if not id_wellformed(job_id):
            raise QMPError(f"Invalid job ID '{job_id}'")
        if any(job.id == job_id for job in self.jobs):
            raise QMPError(f"Job ID '{job_id}' already in use")

    def create(self, job_id: str, job_type: str, run: JobRun, *, auto_finalize: bool = True,
               auto_dismiss: bool = True, early_error: str | None = None,
               progress: tuple[int, int] = (0, 0), driver: JobDriver | None = None) -> Job:
        """job_create + job_start: the job is ``running`` when this returns.

        ``run`` is started as a system task; call this from the event loop's thread.
        ``early_error``: the work already failed before its first I/O (the caller checked
        its options inline). QEMU's job coroutine then returns without ever yielding and
        the job concludes before the command's reply, which is what happens here: ``run``
        is not started. ``progress`` is (current, total) as the work sets it before its
        first yield (QEMU enters the job's coroutine inside the command).
        """
        self.check_id(job_id)
        job = Job(id=job_id, type=job_type, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        if driver is not None:
            job.driver = driver
        self.jobs.insert(0, job)
        self._transition(job, S.CREATED)
        self._transition(job, S.RUNNING)
        job.current_progress, job.total_progress = progress
        if early_error is not None:
            job.finished = job.failed = True
            job.error = early_error
            self._completed(job)
            return job
        trio.lowlevel.spawn_system_task(self._run, job, run, name=f"job {job_id}")
        return job

    def create_aborted(self, job_id: str, job_type: str) -> None:
        """A job a failed transaction had created and never started: created, then
        cancelled (job_cancel_sync of a job not started: aborting, concluded, gone)."""
        job = Job(id=job_id, type=job_type)
        self.jobs.insert(0, job)
        self._transition(job, S.CREATED)
        self._transition(job, S.ABORTING)
        self._transition(job, S.CONCLUDED)
        self._dismiss(job)

    async def _run(self, job: Job, run: JobRun) -> None:
        # job_co_entry: the work, then job_exit -> job_completed in the main loop.
        error: str | None = None
        try:
            await run(job)
        except QMPError as err:
            error = err.desc
        except Exception as err:  # a job's failure is reported, never raised
            error = str(err) or type(err).__name__
        job.finished = True
        if error is not None:
            job.failed = True
            job.error = error
        self._completed(job)

    def _update_rc(self, job: Job) -> None:
        # job_update_rc_locked: a cancelled job that succeeded fails with ECANCELED.
        if not job.failed and job.cancelled:
            job.failed = True
        if job.failed:
            if job.error is None:
                job.error = os.strerror(errno.ECANCELED)
            self._transition(job, S.ABORTING)

    def _completed(self, job: Job) -> None:
        # job_completed_locked
        self._update_rc(job)
        if job.failed:
            self._abort(job)
            return
        self._transition(job, S.WAITING)
        self._transition(job, S.PENDING)
        if not job.auto_finalize:
            job.driver.pending(job)  # job_transition_to_pending_locked
        if job.auto_finalize:
            self._finalize(job)

    def _finalize(self, job: Job) -> None:
        # job_do_finalize_locked: prepare (a job's own transaction), then
        # job_finalize_single_locked.
        if not job.failed:
            error = job.driver.prepare(job)
            if error is not None:
                job.failed = True
                job.error = error
                self._update_rc(job)
        self._finalize_single(job)

    def _finalize_single(self, job: Job) -> None:
        # job_finalize_single_locked: commit or abort, clean, the kind's events, conclude.
        self._update_rc(job)
        if job.failed:
            _guarded(job, job.driver.abort)
        else:
            _guarded(job, job.driver.commit)
        _guarded(job, job.driver.clean)
        _guarded(job, job.driver.finalized)
        self._conclude(job)

    def _abort(self, job: Job) -> None:
        # job_completed_txn_abort_locked, for a transaction of one job
        self._finalize_single(job)

    def _conclude(self, job: Job) -> None:
        # job_conclude_locked
        self._transition(job, S.CONCLUDED)
        if job.auto_dismiss:
            self._dismiss(job)

    def _dismiss(self, job: Job) -> None:
        # job_do_dismiss_locked
        self._transition(job, S.NULL)
        self.jobs.remove(job)

    # QMP verbs --------------------------------------------------------------------------

    def dismiss(self, job_id: str) -> None:
        """job-dismiss: a concluded job leaves query-jobs."""
        job = self.find(job_id)
        self._apply_verb(job, "dismiss")
        self._dismiss(job)

    def finalize(self, job_id: str) -> None:
        """job-finalize: a pending job (auto-finalize off) commits and concludes."""
        job = self.find(job_id)
        self._apply_verb(job, "finalize")
        self._finalize(job)

    def cancel(self, job_id: str, force: bool = True) -> None:
        """job-cancel (job_user_cancel_locked -> job_cancel_locked); job-cancel always
        forces, block-job-cancel passes its ``force``.

        The kind's driver decides whether the cancel is forced (only a ready active
        commit takes a soft one). A running job's work cannot be interrupted in its
        worker thread: a job with pause points stops at the next one, the others' result
        is dropped when their work returns; either way a forced cancel aborts the job.
        """
        job = self.find(job_id)
        self._apply_verb(job, "cancel")
        self._cancel(job, force)

    def cancel_job(self, job: Job, force: bool) -> None:
        """job_cancel_locked without a user's verb check, for the block layer's own
        cancels (a -drive's device going, blockdev_auto_del): a concluded job is
        dismissed, any other cancelled."""
        if job not in self.jobs:
            return
        if job.status is JobStatus.CONCLUDED:
            self._dismiss(job)
            return
        self._cancel(job, force)

    def _cancel(self, job: Job, force: bool) -> None:
        # job_cancel_async_locked
        force = job.driver.cancel(job, force)
        job.user_paused = False
        if force or not job.finished:
            # Soft cancels of a job whose work already returned are ignored.
            job.cancel_requested = True
            job.cancelled = job.cancelled or force
        job.kicked.set()
        if job.finished and job.cancelled:
            # Deferred to the main loop already (waiting/pending): abort right away.
            self._abort(job)

    def pause(self, job_id: str) -> None:
        """job-pause: recorded; a job without pause points keeps running (job_user_pause)."""
        job = self.find(job_id)
        self._apply_verb(job, "pause")
        if job.user_paused:
            raise QMPError("Job is already paused")
        job.user_paused = True
        if job.driver.pause_points and job.status in _PAUSED_AS and not job.busy:
            # job_pause_locked enters a sleeping job, which stops at its pause point
            # before the command returns (a ready job goes to standby).
            self._transition(job, _PAUSED_AS[job.status])
        job.kicked.set()

    def resume(self, job_id: str) -> None:
        """job-resume (job_user_resume_locked)."""
        job = self.find(job_id)
        # QEMU checks the pause before the verb.
        if not job.user_paused:
            raise QMPError("Can't resume a job that was not paused")
        self._apply_verb(job, "resume")
        job.user_paused = False
        if job.status in _RESUMED_AS:
            # job_resume_locked enters the job, which leaves its pause point at once.
            self._transition(job, _RESUMED_AS[job.status])
        job.kicked.set()

    async def pause_point(self, job: Job, delay: float = 0.0) -> None:
        """job_sleep_ns + job_pause_point, for the job's work between two steps: sleep
        ``delay`` seconds unless kicked, then stay paused while a pause is requested.
        Returns at once when the job is cancelled."""
        if delay > 0 and not job.cancelled and not job.user_paused:
            with trio.move_on_after(delay):
                await job.kicked.wait()
        job.kicked = trio.Event()
        while job.user_paused and not job.cancelled:
            # job_pause_point_locked: running -> paused, ready -> standby, and back.
            if job.status in _PAUSED_AS:
                self._transition(job, _PAUSED_AS[job.status])
            await job.kicked.wait()
            job.kicked = trio.Event()
        if job.status in _RESUMED_AS:
            self._transition(job, _RESUMED_AS[job.status])
        if job.status in (S.RUNNING, S.READY):
            await trio.lowlevel.checkpoint()

    async def cancel_all_at_exit(self) -> None:
        """qemu_cleanup for the jobs with pause points (the block jobs): the drain stops
        each running one at its pause point (``paused``), then job_cancel_sync_all
        cancels them one by one and waits until each concluded. Other kinds keep running
        until the process ends (their work is one worker call)."""
        jobs = [job for job in self.jobs if job.driver.pause_points and not job.finished]
        for job in jobs:
            if job.status in _PAUSED_AS:
                self._transition(job, _PAUSED_AS[job.status])
        for job in jobs:
            if job.status in VERBS["cancel"] and not job.cancelled:
                self.cancel(job.id, force=True)
            with trio.move_on_after(10):
                while job in self.jobs and job.status is not S.CONCLUDED:
                    await trio.sleep(0.001)

    def set_ready(self, job: Job) -> None:
        """job_transition_to_ready: the job is ``ready`` (and says so)."""
        self._transition(job, S.READY)
        job.driver.ready(job)

    def complete(self, job_id: str) -> None:
        """job-complete: only ready jobs accept it; the kind completes them
        (job_complete_locked: not one whose cancel was asked for)."""
        job = self.find(job_id)
        self._apply_verb(job, "complete")
        if job.cancel_requested:
            raise QMPError(f"The active block job '{job.id}' cannot be completed")
        job.driver.complete(job)
        if not job.user_paused:
            # mirror_complete enters the job unless it is paused.
            job.kicked.set()
