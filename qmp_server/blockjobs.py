"""Block jobs: block-stream and block-commit, as QEMU 7.2 runs them (block/stream.c,
block/commit.c, blockjob.c).

A block job is a job (:mod:`qmp_server.jobs`) with a :class:`BlockJob` driver: the graph
work of its start and end runs under the graph lock in the event loop's thread (metadata
only: permissions, a reopen, a header rewrite); the data moves in worker threads, one
step (at most 512 KiB, QEMU's STREAM_CHUNK / COMMIT_BUFFER_SIZE) per
``BlockService.run``, with a pause point between steps where the rate limit sleeps and
cancel, pause and other clients get their turn. While it runs, the job holds its nodes
busy (QEMU's op blockers: blockdev-del, another job and external snapshots are refused
with QEMU's text), takes the permissions QEMU's job takes (the lock bytes another process
sees), and reopens a read-only node it writes into read-write, and back when it ends.

Differences from QEMU 7.2, all invisible in the images: QEMU inserts a filter node for
the job's lifetime (``copy-on-read`` above a streamed node, ``commit_top`` above the
committed one), which query-named-block-nodes lists meanwhile; here the filter is only
what it does to permissions (:attr:`blocklayer.node.Edge.fixed_perm`). ``on-error``
other than ``report`` is accepted but every I/O error is reported (the job fails).
Active commit (``top`` being the active layer) is refused: see docs/block-layer.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blocklayer import blockjob as BJ
from blocklayer.errors import BlockError
from blocklayer.node import BlockNode, Edge
from blocklayer.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED

from .errors import QMPError
from .events import EventBus
from .jobs import Job, JobDriver, JobService, JobStatus
from .protocol.qdict import qdict_order

if TYPE_CHECKING:
    from .blockservice import BlockService

#: QEMU's BLOCK_JOB_SLICE_TIME: the rate limit's accounting period.
SLICE = 0.1


class RateLimit:
    """QEMU's RateLimit (include/qemu/ratelimit.h) as block jobs use it: ``speed`` bytes
    a second, accounted per slice; a step that overdraws the slice delays the next."""

    def __init__(self) -> None:
        self.quota = 0.0
        self.slice_start = 0.0
        self.slice_end = 0.0
        self.dispatched = 0

    def set_speed(self, speed: int) -> None:
        """ratelimit_set_speed: 0 is no limit."""
        self.quota = max(speed * SLICE, 1.0) if speed else 0.0

    def delay(self, count: int) -> float:
        """ratelimit_calculate_delay: seconds to wait after ``count`` more bytes."""
        if not self.quota:
            return 0.0
        now = time.monotonic()
        if self.slice_end < now:
            self.slice_start, self.slice_end, self.dispatched = now, now + SLICE, 0
        self.dispatched += count
        if self.dispatched < self.quota:
            return 0.0
        self.slice_end = self.slice_start + self.dispatched / self.quota * SLICE
        return self.slice_end - now


def _event_data(values: dict[str, Any]) -> dict[str, Any]:
    # QEMU builds the event's data as a QDict: its members come out in QDict order.
    return {key: values[key] for key in qdict_order(list(values))}


@dataclass(eq=False)
class BlockJob(JobDriver):
    """One block job's driver: its graph state and its BLOCK_JOB_* events."""

    jobs: BlockJobs
    kind: str
    speed: int = 0
    limit: RateLimit = field(default_factory=RateLimit)
    #: The job's own uses of nodes (QEMU's job BlockBackends and block_job_add_bdrv).
    users: list[Edge] = field(default_factory=list)
    #: Nodes carrying this job's op blocker.
    blocked: list[BlockNode] = field(default_factory=list)
    #: Edges whose permissions a filter of the job stands in for.
    filtered: list[Edge] = field(default_factory=list)
    #: A node the job reopened read-write, to reopen read-only at the end.
    reopened: BlockNode | None = None
    #: The node whose backing child changes at the end, the new backing node, and the
    #: name the image gets for it (None: the node's file name).
    overlay: BlockNode | None = None
    base: BlockNode | None = None
    backing_file: str | None = None

    pause_points = True

    def __post_init__(self) -> None:
        self.limit.set_speed(self.speed)

    # Graph state ------------------------------------------------------------------------

    def use(self, node: BlockNode, job_id: str, perm: int, shared: int, *, block: bool = True) -> None:
        """block_job_add_bdrv: use ``node`` with ``perm``/``shared``, blocking it."""
        graph = self.jobs.block.graph
        edge = graph.add_user(node, f"{self.kind} job '{job_id}'", perm, shared)
        edge.job = True
        self.users.append(edge)
        if block:
            node.blockers.insert(0, f"block device is in use by block job: {self.kind}")
            self.blocked.append(node)

    def release(self) -> None:
        """block_job_remove_all_bdrv and the filter's removal: every use and blocker goes."""
        graph = self.jobs.block.graph
        reason = f"block device is in use by block job: {self.kind}"
        for node in self.blocked:
            if reason in node.blockers:
                node.blockers.remove(reason)
        self.blocked.clear()
        for edge in self.filtered:
            edge.fixed_perm = None
        touched = [edge.child for edge in self.filtered if edge.child.name in graph.nodes]
        self.filtered.clear()
        for edge in reversed(self.users):
            if edge in edge.child.parents:
                graph.remove_user(edge)
        self.users.clear()
        if touched:
            try:
                graph.refresh_perms(touched)
            except BlockError:
                pass  # only loosens

    def _prepare(self, job: Job) -> None:
        # stream_prepare / commit_prepare (bdrv_drop_intermediate): the overlay reads
        # through the base, its image names it, the nodes between go.
        if self.overlay is None:
            return
        graph = self.jobs.block.graph
        # The job lets go of the nodes that are about to close first.
        self.release()
        BJ.set_backing_file(graph, self.overlay, self.base, self.backing_file)

    def prepare(self, job: Job) -> str | None:
        """The graph change of a successful job, under the graph lock."""
        try:
            self.jobs.block.locked(self._prepare, job)
        except QMPError as err:
            return err.desc
        return None

    def clean(self, job: Job) -> None:
        """stream_clean / commit_clean: uses released, a reopened node read-only again."""

        def clean() -> None:
            self.release()
            if self.reopened is not None and self.reopened.name in self.jobs.block.graph.nodes:
                try:
                    self.jobs.block.graph.set_read_only(self.reopened)
                except BlockError:
                    pass  # bdrv_reopen_set_read_only(..., NULL): QEMU ignores it too

        self.jobs.block.locked(clean)

    # Events and queries -----------------------------------------------------------------

    def _progress(self, job: Job) -> dict[str, Any]:
        return {"type": self.kind, "device": job.id, "len": job.total_progress,
                "offset": job.current_progress, "speed": self.speed}

    def pending(self, job: Job) -> None:
        """BLOCK_JOB_PENDING (block_job_event_pending)."""
        self.jobs.events.emit("BLOCK_JOB_PENDING", _event_data({"type": self.kind, "id": job.id}))

    def finalized(self, job: Job) -> None:
        """BLOCK_JOB_CANCELLED or BLOCK_JOB_COMPLETED (with the error of a failed job)."""
        data = self._progress(job)
        if job.cancelled:
            self.jobs.events.emit("BLOCK_JOB_CANCELLED", _event_data(data))
            return
        if job.failed and job.error is not None:
            data["error"] = job.error
        self.jobs.events.emit("BLOCK_JOB_COMPLETED", _event_data(data))

    def info(self, job: Job) -> dict[str, Any]:
        """BlockJobInfo (block_job_query_locked), in QEMU's member order."""
        values: dict[str, Any] = {
            "type": self.kind, "device": job.id, "len": job.total_progress,
            "offset": job.current_progress, "busy": job.busy,
            # job->pause_count > 0: a pause was asked for (reached or not)
            "paused": job.user_paused, "speed": self.speed, "io-status": "ok",
            "ready": job.status in (JobStatus.READY, JobStatus.STANDBY),
            "status": job.status.value, "auto-finalize": job.auto_finalize,
            "auto-dismiss": job.auto_dismiss}
        if job.error is not None:
            values["error"] = job.error
        return _event_data(values)


@dataclass(frozen=True)
class StreamRequest:
    """block-stream's arguments, the nodes looked up."""

    job_id: str | None
    top: BlockNode
    #: The node the data stops at (excluded; None: the whole chain).
    base: BlockNode | None
    #: The lowest node streamed (``bottom``), when given.
    bottom: BlockNode | None
    backing_file: str | None
    speed: int
    auto_finalize: bool
    auto_dismiss: bool


@dataclass(frozen=True)
class CommitRequest:
    """block-commit's arguments, the nodes looked up."""

    job_id: str | None
    #: The root node named by ``device``.
    root: BlockNode
    top: BlockNode
    base: BlockNode
    backing_file: str | None
    speed: int
    auto_finalize: bool
    auto_dismiss: bool


class BlockJobs:
    """The block jobs of a machine, on top of its jobs and its block graph."""

    def __init__(self, jobs: JobService, block: BlockService, events: EventBus) -> None:
        self.jobs = jobs
        self.block = block
        self.events = events

    # Lookup and queries -----------------------------------------------------------------

    def find(self, device: str) -> tuple[Job, BlockJob]:
        """find_block_job_locked: the block job ``device`` names, or QEMU's error."""
        for job in self.jobs.jobs:
            if job.id == device and isinstance(job.driver, BlockJob):
                return job, job.driver
        raise QMPError(f"Block job '{device}' not found", "DeviceNotActive")

    def query(self) -> list[dict[str, Any]]:
        """query-block-jobs: every block job, newest first (as query-jobs)."""
        return [job.driver.info(job) for job in self.jobs.jobs if isinstance(job.driver, BlockJob)]

    def set_speed(self, device: str, speed: int) -> None:
        """block-job-set-speed (block_job_set_speed_locked)."""
        job, driver = self.find(device)
        if job.status not in {JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED,
                              JobStatus.READY, JobStatus.STANDBY}:
            raise QMPError(f"Job '{job.id}' in state '{job.status.value}' cannot accept "
                           f"command verb 'set-speed'")
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        old = driver.speed
        driver.speed = speed
        driver.limit.set_speed(speed)
        if speed and speed <= old:
            return
        job.kicked.set()  # a faster job need not finish its current sleep

    # Starting ---------------------------------------------------------------------------

    def _job_id(self, job_id: str | None, node: BlockNode) -> str:
        # block_job_create: without an id the job is named after the node's device.
        name = job_id if job_id is not None else self.block.device_name(node)
        self.jobs.check_id(name)
        return name

    def _reopen_rw(self, driver: BlockJob, node: BlockNode) -> None:
        if node.read_only:
            self.block.graph.reopen_read_write(node)
            driver.reopened = node

    def _start_stream(self, request: StreamRequest) -> tuple[str, BlockJob, BlockNode]:
        # stream_start, under the graph lock.
        top = request.top
        base_overlay = request.bottom if request.bottom is not None else BJ.find_overlay(top, request.base)
        if base_overlay is None:
            assert request.base is not None
            raise QMPError(f"'{request.base.name}' is not in the backing chain of '{top.name}'")
        driver = BlockJob(self, "stream", speed=request.speed)
        base = BJ.backing(base_overlay)
        try:
            self._reopen_rw(driver, top)
            job_id = self._job_id(request.job_id, top)
            driver.use(top, job_id, CONSISTENT_READ | WRITE_UNCHANGED,
                       CONSISTENT_READ | WRITE_UNCHANGED | WRITE)
            node = BJ.backing(top)
            while node is not None and node is not base:
                driver.use(node, job_id, 0, CONSISTENT_READ | WRITE_UNCHANGED)
                node = BJ.backing(node)
        except BaseException:
            driver.release()
            if driver.reopened is not None:
                self.block.graph.set_read_only(driver.reopened)
            raise
        if BJ.backing(top) is not None:
            # stream_prepare changes the backing link only when there is one.
            driver.overlay, driver.base, driver.backing_file = top, base, request.backing_file
        return job_id, driver, base_overlay

    async def stream(self, request: StreamRequest) -> None:
        """block-stream: start the job (its checks and setup raise QEMU's errors)."""
        job_id, driver, base_overlay = await self.block.run_light(self._start_stream, request)
        top = request.top
        nothing = top is base_overlay
        total = 0 if nothing else await self.block.run_light(BJ.length, top)

        async def run(job: Job) -> None:
            # stream_run: from the start to the end, skip what the top holds, copy what
            # the chain down to the base holds, a step at a time.
            if nothing:
                return
            offset = 0
            delay = 0.0
            while offset < total:
                await self.jobs.pause_point(job, delay)
                if job.cancelled:
                    return
                job.busy = True
                try:
                    count, copied = await self.block.run(BJ.stream_step, top, base_overlay, offset, total)
                finally:
                    job.busy = False
                offset += count
                job.current_progress += count
                delay = driver.limit.delay(count) if copied else 0.0

        self.jobs.create(job_id, "stream", run, auto_finalize=request.auto_finalize,
                         auto_dismiss=request.auto_dismiss, progress=(0, total), driver=driver)

    def _start_commit(self, request: CommitRequest) -> tuple[str, BlockJob, BlockNode, int]:
        # commit_start, under the graph lock.
        graph = self.block.graph
        top, base, root = request.top, request.base, request.root
        overlay = BJ.find_overlay(root, top)
        base_overlay = BJ.find_overlay(top, base)
        if overlay is None or base_overlay is None:
            raise QMPError(f"Could not find overlay image for {top.filename}:")
        driver = BlockJob(self, "commit", speed=request.speed)
        try:
            job_id = self._job_id(request.job_id, root)
            driver.use(root, job_id, 0, ALL)
            # commit_top_bs above ``top``: the overlay's backing link asks nothing of
            # ``top`` while it is there (commit_top_child_perm).
            edge = overlay.child("backing")
            if edge is not None:
                edge.fixed_perm = (0, ALL)
                driver.filtered.append(edge)
            self._reopen_rw(driver, base)
            node: BlockNode | None = top
            while node is not None and node is not base:
                driver.use(node, job_id, 0, WRITE_UNCHANGED | WRITE)
                node = BJ.backing(node)
            driver.use(base, job_id, CONSISTENT_READ | WRITE | RESIZE, CONSISTENT_READ | WRITE_UNCHANGED)
            total = BJ.length(top)
        except BaseException:
            driver.release()
            if driver.reopened is not None:
                graph.set_read_only(driver.reopened)
            raise
        driver.overlay, driver.base, driver.backing_file = overlay, base, request.backing_file
        return job_id, driver, base_overlay, total

    async def commit(self, request: CommitRequest) -> None:
        """block-commit of a node below the active layer: start the job."""
        job_id, driver, base_overlay, total = await self.block.run_light(self._start_commit, request)
        top, base = request.top, request.base

        async def run(job: Job) -> None:
            # commit_run: copy what top..base_overlay holds into base, a step at a time.
            offset = 0
            delay = 0.0
            while offset < total:
                await self.jobs.pause_point(job, delay)
                if job.cancelled:
                    return
                job.busy = True
                try:
                    count, copied = await self.block.run(BJ.commit_step, top, base_overlay, base, offset)
                finally:
                    job.busy = False
                offset += count
                job.current_progress += count
                delay = driver.limit.delay(count) if copied else 0.0

        self.jobs.create(job_id, "commit", run, auto_finalize=request.auto_finalize,
                         auto_dismiss=request.auto_dismiss, progress=(0, total), driver=driver)
