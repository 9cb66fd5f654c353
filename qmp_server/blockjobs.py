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

Active commit (``top`` being the active layer, or a node something writes) runs as QEMU
runs it, as a mirror job of type ``commit`` (block/mirror.c, commit_active_start): a dirty
bitmap of the top node starts with what the chain above the base holds and records every
write meanwhile; the job copies dirty parts into the base until none is left, goes
``ready`` (BLOCK_JOB_READY) and keeps copying new writes; ``block-job-complete`` moves the
top's users onto the base (the pivot), a cancel of a ready job ends it as a success
without the pivot.

Differences from QEMU 7.2, all invisible in the images: QEMU inserts a filter node for
the job's lifetime (``copy-on-read`` above a streamed node, ``commit_top`` above the
committed one, ``mirror_top`` above an actively committed one), which
query-named-block-nodes lists meanwhile; here the filter is only what it does to
permissions (:attr:`blocklayer.node.Edge.fixed_perm`). ``on-error`` other than
``report`` is accepted but every I/O error is reported (the job fails). Data moves one
request at a time, where QEMU has up to 16 in flight.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blocklayer import blockjob as BJ
from blocklayer.backup import NO_CLUSTER_SIZE_WARNING, CopyState, copy_cluster_size
from blocklayer.bitmapops import default_granularity
from blocklayer.dirtybitmap import CHECK_DEFAULT, BitmapError, DirtyBitmap
from blocklayer.errors import BlockError
from blocklayer.node import BlockNode, Edge
from blocklayer.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED

from .errorreport import error_report, warn_report
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

    def use(self, node: BlockNode, job_id: str, perm: int, shared: int, *, block: bool = True,
            backend: bool = False) -> None:
        """block_job_add_bdrv: use ``node`` with ``perm``/``shared``, blocking it.
        ``backend``: a BlockBackend of the job's own (blk_new + blk_insert_bs), which is
        a user like any other (blockdev-del says the node is in use)."""
        graph = self.jobs.block.graph
        edge = graph.add_user(node, f"{self.kind} job '{job_id}'", perm, shared)
        edge.job = not backend
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
        # The parent of a filtered edge asks its usual permissions again.
        touched = [node for edge in self.filtered
                   for node in ([edge.parent] if edge.parent is not None else []) + [edge.child]
                   if node.name in graph.nodes]
        self.filtered.clear()
        used = []
        for edge in reversed(self.users):
            if edge in edge.child.parents:
                graph.remove_user(edge)
                used.append(edge.child)
        self.users.clear()
        if touched:
            try:
                graph.refresh_perms(touched)
            except BlockError:
                pass  # only loosens
        # The job's references go (block_job_remove_all_bdrv -> bdrv_unref): a node only
        # the job still held (a -drive whose device went meanwhile) closes now.
        for node in used:
            if graph.nodes.get(node.name) is node:
                graph.release(node)

    def _prepare(self, job: Job) -> None:
        # stream_prepare / commit_prepare (bdrv_drop_intermediate): the overlay reads
        # through the base, its image names it, the nodes between go.
        if self.overlay is None:
            return
        graph = self.jobs.block.graph
        # The job lets go of the nodes that are about to close first.
        self.release()
        try:
            BJ.set_backing_file(graph, self.overlay, self.base, self.backing_file)
        except BJ.HeaderReopenError as err:
            # bdrv_drop_intermediate: error_report_err(local_err), and the job ends with
            # the reopen's return code (job_update_rc: strerror).
            error_report("\n".join([err.message, *getattr(err, "__notes__", [])]))
            raise QMPError(os.strerror(err.errno or errno.EIO)) from err

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
    #: ``top`` is the active layer or has a writer: QEMU's commit_active_start.
    active: bool = False


@dataclass(frozen=True)
class MirrorRequest:
    """blockdev-mirror's arguments, the nodes looked up and the defaults applied."""

    job_id: str | None
    source: BlockNode
    target: BlockNode
    #: The node name the target replaces on completion (None: the source).
    replaces: str | None
    #: "full", "top" or "none" (a "top" of a node without backing is "full").
    sync: str
    speed: int
    #: The dirty bitmap's granularity (0: the target's default).
    granularity: int
    #: The copy buffer (0: QEMU's default).
    buf_size: int
    write_blocking: bool
    auto_finalize: bool
    auto_dismiss: bool
    #: drive-mirror: the target's backing node at the end (see :class:`Mirror`).
    target_backing: BlockNode | None = None
    set_target_backing: bool = False
    #: Zero the target first (None: for sync full, as blockdev-mirror does).
    zero_target: bool | None = None


@dataclass(frozen=True)
class BackupRequest:
    """blockdev-backup's arguments, the nodes and bitmap looked up, ``incremental`` made
    ``bitmap`` with bitmap-mode ``on-success`` (do_backup_common)."""

    job_id: str | None
    source: BlockNode
    target: BlockNode
    #: "full", "top", "none" or "bitmap".
    sync: str
    speed: int
    bitmap: DirtyBitmap | None
    bitmap_mode: str | None
    compress: bool
    max_workers: int
    max_chunk: int
    auto_finalize: bool
    auto_dismiss: bool


@dataclass(eq=False)
class Backup(BlockJob):
    """A backup job's driver (block/backup.c's backup_job_driver, with its
    copy-before-write filter as a hook on the source's writes)."""

    source: BlockNode | None = None
    copy: CopyState | None = None
    #: The bitmap ``bitmap`` names, frozen while the job runs, and its successor, which
    #: records the writes meanwhile (bdrv_dirty_bitmap_create_successor).
    sync_bitmap: DirtyBitmap | None = None
    successor: DirtyBitmap | None = None
    bitmap_mode: str = "on-success"
    job: Job | None = None

    def before_write(self, offset: int, length: int) -> None:
        """cbw_do_copy_before_write: what a write is about to overwrite is copied to the
        target first, if it still has to be; a failed copy fails the write."""
        if self.copy is None:
            return
        copied = self.copy.copy(offset, length)
        if self.job is not None:
            self.job.current_progress += copied

    def _bitmap_cleanup(self, success: bool) -> None:
        # backup_cleanup_sync_bitmap: abdicate (the successor, with the writes since the
        # start, becomes the bitmap) on success or with 'always', unless 'never'; else
        # reclaim (the bitmap gets the writes too). 'always' after a failure adds back
        # what was not copied.
        parent, child = self.sync_bitmap, self.successor
        if parent is None or child is None or self.source is None:
            return
        node = self.source
        self.sync_bitmap = self.successor = None
        sync = (success or self.bitmap_mode == "always") and self.bitmap_mode != "never"
        parent.busy = False
        if sync:
            child.name, child.persistent = parent.name, parent.persistent
            node.dirty_bitmaps.remove(child)
            node.dirty_bitmaps[node.dirty_bitmaps.index(parent)] = child
            kept = child
        else:
            parent.merge_from(child)
            parent.disabled = child.disabled
            node.dirty_bitmaps.remove(child)
            kept = parent
        if not success and self.bitmap_mode == "always" and self.copy is not None:
            kept.merge_from(self.copy.bitmap)
        node.touch()

    def commit(self, job: Job) -> None:
        """backup_commit: the bitmap as a success leaves it."""
        self.jobs.block.locked(self._bitmap_cleanup, True)

    def abort(self, job: Job) -> None:
        """backup_abort: the bitmap as a failure leaves it."""
        self.jobs.block.locked(self._bitmap_cleanup, False)

    def _drop_filter(self) -> None:
        # bdrv_cbw_drop: the source's writes are its own again.
        source = self.source
        if source is not None:
            if self.before_write in source.before_write_hooks:
                source.before_write_hooks.remove(self.before_write)
            source.under_job_filter = False

    def drop(self) -> None:
        """A prepared backup that never ran (its transaction failed): the bitmap as it
        was, the filter and the job's uses gone. Under the graph lock."""
        self._bitmap_cleanup(False)
        self._drop_filter()
        self.release()

    def clean(self, job: Job) -> None:
        """backup_clean: the copy-before-write filter goes (bdrv_cbw_drop)."""

        def drop() -> None:
            self._drop_filter()
            self.copy = None

        self.jobs.block.locked(drop)
        super().clean(job)


@dataclass(eq=False)
class Mirror(BlockJob):
    """A mirror job's driver (block/mirror.c's mirror_job_driver), and active commit's
    (commit_active_job_driver: the target is the source's backing node)."""

    #: The node copied from (mirror_top_bs's child), the node copied into (``base``),
    #: and the job's dirty bitmap on the source.
    top: BlockNode | None = None
    bitmap: DirtyBitmap | None = None
    #: The target is in the source's backing chain (active commit).
    is_commit: bool = True
    #: blockdev-mirror's ``replaces``, and the node it named at block-job-complete.
    replaces: str | None = None
    to_replace: BlockNode | None = None
    #: drive-mirror's MIRROR_SOURCE_BACKING_CHAIN: at the end the target reads through
    #: this node (the source's backing for sync top, the source for none, none for full).
    target_backing: BlockNode | None = None
    set_target_backing: bool = False
    #: copy-mode write-blocking: writes to the source reach the target before they
    #: complete.
    write_blocking: bool = False
    #: block-job-complete was accepted: the job ends with the pivot.
    should_complete: bool = False
    #: mirror_exit_common ran (prepare, or abort).
    prepared: bool = False
    #: Where the dirty bitmap's iterator stands (bdrv_dirty_iter_next).
    position: int = 0

    def ready(self, job: Job) -> None:
        """BLOCK_JOB_READY (block_job_event_ready), with the job's progress."""
        self.jobs.events.emit("BLOCK_JOB_READY", _event_data(self._progress(job)))

    def complete(self, job: Job) -> None:
        """mirror_complete: the job ends, with the pivot, once it is in sync again; a
        ``replaces`` node must still exist, and is blocked until then."""
        if self.replaces is not None and self.to_replace is None:
            node = self.jobs.block.graph.find(self.replaces)
            if node is None:
                raise QMPError(f"Node name '{self.replaces}' not found")
            node.blockers.insert(0, _REPLACE_BLOCKER)
            self.to_replace = node
        self.should_complete = True

    def cancel(self, job: Job, force: bool) -> bool:
        """mirror_cancel / commit_active_cancel: only a ready job can be cancelled softly."""
        return force or job.status not in (JobStatus.READY, JobStatus.STANDBY)

    def copy_write(self, offset: int, length: int, zero: bool, may_unmap: bool) -> None:
        """copy-mode write-blocking (bdrv_mirror_top_do_write + do_sync_target_write): a
        write to the source, once done, is written to the target too, and the granules it
        covers whole are clean; a failure leaves them dirty for the background copy."""
        top, target, bitmap = self.top, self.base, self.bitmap
        if top is None or target is None or bitmap is None or self.prepared:
            return
        granularity = bitmap.granularity
        first = -(-offset // granularity) * granularity
        last = (offset + length) // granularity * granularity
        try:
            if zero:
                target.pwrite_zeroes(offset, length, may_unmap=may_unmap)
            else:
                target.pwrite(offset, top.pread(offset, length))
        except BlockError:
            return
        if last > first:
            bitmap.reset_range(first, last - first)

    def _exit(self, abort: bool) -> None:
        # mirror_exit_common: the bitmap and the job's uses go, then (completed, not
        # aborted) every user of the source (or of ``replaces``) uses the target
        # instead. Active commit's base stays read-write either way (commit_active_start
        # only restores it on failure); a mirror's target takes the replaced node's
        # read-only state.
        if self.prepared:
            return
        self.prepared = True
        top, base, graph = self.top, self.base, self.jobs.block.graph
        assert top is not None and base is not None
        if self.bitmap is not None and self.bitmap in top.dirty_bitmaps:
            top.dirty_bitmaps.remove(self.bitmap)
        if self.copy_write in top.write_hooks:
            top.write_hooks.remove(self.copy_write)
        # A target only the job holds (drive-mirror's) stays open for the pivot, and
        # closes after it if nothing took it (the job's reference goes last).
        held = not base.monitor_owned
        base.monitor_owned = True
        try:
            self._exit_graph(abort, top, base)
        finally:
            if held:
                base.monitor_owned = False
                if base.name in graph.nodes:
                    graph.release(base)

    def _exit_graph(self, abort: bool, top: BlockNode, base: BlockNode) -> None:
        graph = self.jobs.block.graph
        self.release()
        top.under_job_filter = False
        to_replace = self.to_replace
        if to_replace is not None and _REPLACE_BLOCKER in to_replace.blockers:
            to_replace.blockers.remove(_REPLACE_BLOCKER)
        failed: QMPError | None = None
        if not abort and self.set_target_backing:
            try:
                graph.set_backing(base, self.target_backing)
            except BlockError as err:
                # error_report_err, and the job ends with -EPERM.
                error_report(err.message)
                failed = QMPError(os.strerror(errno.EPERM))
        if not self.should_complete or abort:
            if failed is not None:
                raise failed
            return
        if self.is_commit:
            if top.name in graph.nodes:
                if top.read_only and not base.read_only:
                    graph.set_read_only(base)
                elif base.read_only and not top.read_only:
                    graph.reopen_read_write(base)
                graph.replace_node(top, base)
            return
        old = to_replace or top
        if old.name not in graph.nodes:
            return
        try:
            # bdrv_reopen_set_read_only(target_bs, ro, NULL): a failure is ignored.
            if old.read_only and not base.read_only:
                graph.set_read_only(base)
            elif base.read_only and not old.read_only:
                graph.reopen_read_write(base)
        except BlockError:
            pass
        try:
            graph.replace_node(old, base)
        except BlockError as err:
            # error_report_err, and the job ends with -EPERM.
            error_report(err.message)
            raise QMPError(os.strerror(errno.EPERM)) from err

    def prepare(self, job: Job) -> str | None:
        """mirror_prepare: the pivot of a completed job, under the graph lock."""
        try:
            self.jobs.block.locked(self._exit, False)
        except (QMPError, BlockError) as err:
            return err.desc if isinstance(err, QMPError) else str(err)
        return None

    def abort(self, job: Job) -> None:
        """mirror_abort: the job's uses go, the graph stays as it was."""
        self.jobs.block.locked(self._exit, True)

    def clean(self, job: Job) -> None:
        """Nothing is left to undo: the base stays read-write (QEMU)."""
        self.jobs.block.locked(self.release)

    def info(self, job: Job) -> dict[str, Any]:
        """BlockJobInfo; between the end of its work and its graph change the job keeps
        its node drained (mirror_run's in_drain), which counts as a pause."""
        values = super().info(job)
        if job.finished and not self.prepared:
            values["paused"] = True
        return values


#: mirror_complete's op blocker on the node to be replaced.
_REPLACE_BLOCKER = "block device is in use by block-job-complete"


class BlockJobs:
    """The block jobs of a machine, on top of its jobs and its block graph."""

    def __init__(self, jobs: JobService, block: BlockService, events: EventBus) -> None:
        self.jobs = jobs
        self.block = block
        self.events = events

    # Lookup and queries -----------------------------------------------------------------

    def cancel_jobs_on(self, node: BlockNode) -> None:
        """blockdev_auto_del: every block job that uses ``node`` is cancelled, softly
        (job_cancel_locked(job, false): a ready mirror completes without its pivot)."""
        for job in list(self.jobs.jobs):
            if isinstance(job.driver, BlockJob) and any(edge.child is node for edge in job.driver.users):
                self.jobs.cancel_job(job, False)

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
            self._reopen_rw(driver, base)
            # bdrv_append(commit_top_bs, top) comes after the base's reopen; it updates
            # the overlay's permissions at once, so that a reader of the overlay (a
            # device) no longer asks ``top`` for consistent read when the job unshares it.
            edge = overlay.child("backing")
            if edge is not None:
                edge.fixed_perm = (0, ALL)
                driver.filtered.append(edge)
                graph.refresh_perms([overlay])
            node: BlockNode | None = top
            while node is not None and node is not base:
                driver.use(node, job_id, 0, WRITE_UNCHANGED | WRITE)
                node = BJ.backing(node)
            # The base BlockBackend asks to resize only a base shorter than the top.
            resize = RESIZE if BJ.length(base) < BJ.length(top) else 0
            driver.use(base, job_id, CONSISTENT_READ | WRITE | resize, CONSISTENT_READ | WRITE_UNCHANGED)
            total = BJ.length(top)
        except BaseException:
            driver.release()
            if driver.reopened is not None:
                graph.set_read_only(driver.reopened)
            raise
        driver.overlay, driver.base, driver.backing_file = overlay, base, request.backing_file
        return job_id, driver, base_overlay, total

    async def commit(self, request: CommitRequest) -> None:
        """block-commit: start the job (active commit when ``request.active``)."""
        if request.active:
            await self._active_commit(request)
            return
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

    # Active commit -------------------------------------------------------------------------

    def _start_active_commit(self, request: CommitRequest) -> tuple[str, Mirror, BlockNode]:
        # commit_active_start and mirror_start_job, under the graph lock.
        graph = self.block.graph
        top, base = request.top, request.base
        base_overlay = BJ.find_overlay(top, base)
        if base_overlay is None:
            raise QMPError(f"Could not find overlay image for {top.filename}:")
        driver = Mirror(self, "commit", speed=request.speed)
        try:
            self._reopen_rw(driver, base)
            # The job is named after the device even when ``top`` is below it (qmp_block_commit).
            job_id = self._job_id(request.job_id, request.root)
            # mirror_top_bs above ``top`` (bdrv_append): the top asks no consistent read of
            # the nodes below it any more (bdrv_mirror_top_child_perm for commit).
            edge = top.child("backing")
            if edge is not None:
                edge.fixed_perm = (0, ALL)
                driver.filtered.append(edge)
                graph.refresh_perms([top])
            # The job's BlockBackend on the filter and its "source" use: no resize of the top.
            driver.use(top, job_id, 0, CONSISTENT_READ | WRITE_UNCHANGED | WRITE)
            # The target BlockBackend: write (and resize for a shorter base), the others may
            # do anything but resize.
            resize = RESIZE if BJ.length(base) < BJ.length(top) else 0
            driver.use(base, job_id, WRITE | resize, CONSISTENT_READ | WRITE_UNCHANGED | WRITE,
                       block=False)
            driver.use(base, job_id, 0, ALL)
            node = BJ.backing(top)
            while node is not None and node is not base:
                driver.use(node, job_id, 0, WRITE_UNCHANGED | WRITE)
                node = BJ.backing(node)
            bitmap = DirtyBitmap("", default_granularity(base), top.getlength())
        except BaseException:
            driver.release()
            if driver.reopened is not None:
                graph.set_read_only(driver.reopened)
            raise
        # The base stays read-write whatever the end (only a failed start restores it).
        driver.reopened = None
        top.dirty_bitmaps.insert(0, bitmap)
        top.under_job_filter = True
        driver.top, driver.base, driver.bitmap = top, base, bitmap
        return job_id, driver, base_overlay

    async def _active_commit(self, request: CommitRequest) -> None:
        job_id, driver, base_overlay = await self.block.run_light(self._start_active_commit, request)
        run = self._mirror_run(driver, base_overlay, sync_none=False, zero_target=False)
        self.jobs.create(job_id, "commit", run, auto_finalize=request.auto_finalize,
                         auto_dismiss=request.auto_dismiss, driver=driver)

    def _mirror_run(self, driver: Mirror, base_overlay: BlockNode, *, sync_none: bool,
                    zero_target: bool, buffer: int = BJ.MIRROR_BUFFER) -> Callable[[Job], Awaitable[None]]:
        """mirror_run, from the source's length on: copy what the source shows (down to
        ``base_overlay``; nothing with ``sync_none``) into the target, be ready once in
        sync, keep copying new writes until completed or cancelled."""
        top, base, bitmap = driver.top, driver.base, driver.bitmap
        assert top is not None and base is not None and bitmap is not None
        jobs = self.jobs

        def ready(job: Job) -> bool:
            return job.status in (JobStatus.READY, JobStatus.STANDBY)

        async def run(job: Job) -> None:
            if job.cancelled:
                return
            length = BJ.length(top)
            if driver.is_commit and length > BJ.length(base):
                # Active commit grows a shorter base to the top's length.
                await self.block.run(base.truncate, length)
            if length == 0:
                jobs.set_ready(job)
                while not job.cancel_requested and not driver.should_complete:
                    await jobs.pause_point(job, SLICE)
                return
            if zero_target and not sync_none:
                # mirror_dirty_init: a target that cannot unmap zeroes gets everything.
                if BJ.can_write_zeroes_with_unmap(base):
                    await self.block.run(BJ.zero_target, base, length, bitmap.granularity)
                    await self.block.run(BJ.mirror_dirty_init, top, base_overlay, bitmap)
                else:
                    bitmap.set_range(0, length)
            elif not sync_none:
                await self.block.run(BJ.mirror_dirty_init, top, base_overlay, bitmap)
            zero_unmaps = base.options.discard_unmap
            delay = 0.0
            while True:
                await jobs.pause_point(job, delay)
                if job.cancelled:
                    return
                delay = 0.0
                dirty = bitmap.count()
                # job_progress_set_remaining: what is dirty is what is left.
                job.total_progress = job.current_progress + dirty
                if dirty:
                    job.busy = True
                    try:
                        driver.position, done, accounted = await self.block.run(
                            BJ.mirror_step, top, base, bitmap, driver.position, zero_unmaps, buffer)
                    finally:
                        job.busy = False
                    job.current_progress += sum(done)
                    for count in accounted:
                        delay = driver.limit.delay(count)
                    continue
                if not ready(job):
                    # In sync for the first time: flush the target, then say so.
                    await self.block.run(base.flush)
                    jobs.set_ready(job)
                if driver.should_complete or job.cancel_requested:
                    # The last check, drained: nothing new is dirty, the target is durable.
                    if bitmap.count() == 0:
                        await self.block.run(base.flush)
                        return
                    continue
                delay = SLICE

        return run

    # Mirror ---------------------------------------------------------------------------------

    def _start_mirror(self, request: MirrorRequest) -> tuple[str, Mirror, BlockNode]:
        # mirror_start_job, under the graph lock (blockdev_mirror_common's checks done).
        source, target = request.source, request.target
        granularity = request.granularity or default_granularity(target)
        if request.buf_size < 0:
            raise QMPError("Invalid parameter 'buf-size'")
        if BJ.skip_filters(source) is BJ.skip_filters(target):
            raise QMPError("Can't mirror node into itself")
        if BJ.chain_contains(source, target):
            # A target in the source's backing chain is a commit (target_is_backing).
            raise QMPError("blockdev-mirror into the source's backing chain (a commit) "
                           "is not supported here: use block-commit")
        if BJ.chain_contains(source, BJ.skip_filters(target)):
            raise QMPError("Cannot mirror to a filter on top of a node in the source's "
                           "backing chain")
        driver = Mirror(self, "mirror", speed=request.speed, is_commit=False,
                        replaces=request.replaces, write_blocking=request.write_blocking,
                        target_backing=request.target_backing,
                        set_target_backing=request.set_target_backing)
        try:
            job_id = self._job_id(request.job_id, source)
            # block_job_create on mirror_top_bs: consistent read of the source, which
            # may not be resized meanwhile (the filter passes it down).
            driver.use(source, job_id, CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED | WRITE,
                       block=False)
            # The target BlockBackend: write; others may only write unchanged data.
            driver.use(target, job_id, WRITE, WRITE_UNCHANGED, block=False, backend=True)
            driver.use(source, job_id, 0, WRITE_UNCHANGED | WRITE | CONSISTENT_READ)
            driver.use(target, job_id, 0, ALL)
        except BaseException:
            driver.release()
            raise
        bitmap = DirtyBitmap("", granularity, source.getlength())
        source.dirty_bitmaps.insert(0, bitmap)
        source.under_job_filter = True
        driver.top, driver.base, driver.bitmap = source, target, bitmap
        if request.write_blocking:
            source.write_hooks.append(driver.copy_write)
        # mirror_start: sync "top" copies down to the source itself, "full" the chain.
        below = BJ.backing(source) if request.sync == "top" else None
        base_overlay = BJ.find_overlay(source, below)
        assert base_overlay is not None
        return job_id, driver, base_overlay

    async def mirror(self, request: MirrorRequest) -> None:
        """blockdev-mirror: start the job (mirror_start_job's checks raise QEMU's errors)."""
        job_id, driver, base_overlay = await self.block.run_light(self._start_mirror, request)
        granularity = driver.bitmap.granularity if driver.bitmap is not None else 0
        buffer = -(-(request.buf_size or BJ.MIRROR_BUFFER) // granularity) * granularity
        # mirror_run's first checks run before its first yield: inside the command.
        sizes = await self.block.run_light(
            lambda: (BJ.length(request.source), BJ.length(request.target)))
        early = "Source and target image have different sizes" if sizes[0] != sizes[1] else None
        run = self._mirror_run(driver, base_overlay, sync_none=request.sync == "none",
                               zero_target=request.sync == "full" if request.zero_target is None
                               else request.zero_target, buffer=buffer)
        self.jobs.create(job_id, "mirror", run, auto_finalize=request.auto_finalize,
                         auto_dismiss=request.auto_dismiss, driver=driver, early_error=early)

    # Backup ---------------------------------------------------------------------------------

    def _start_backup(self, request: BackupRequest) -> tuple[str, Backup]:
        # backup_job_create, under the graph lock (do_backup_common's checks done).
        source, target = request.source, request.target
        graph = self.block.graph
        if source is target:
            raise QMPError("Source and target cannot be the same")
        if request.compress:
            raise QMPError("Compression is not supported for this drive "
                           f"{self.block.device_name(target)}")
        graph.check_no_job(source)
        graph.check_no_job(target)
        if not 1 <= request.max_workers <= 0x7FFFFFFF:
            raise QMPError("max-workers must be between 1 and 2147483647")
        if request.max_chunk < 0:
            raise QMPError("max-chunk must be zero (which means no limit) or positive")
        bitmap = request.bitmap
        if bitmap is not None:
            try:
                if request.bitmap_mode != "never":
                    bitmap.check(CHECK_DEFAULT)
            except BitmapError as err:
                raise QMPError(str(err)) from err
        if BJ.length(source) != BJ.length(target):
            raise QMPError("Source and target image have different sizes")
        cluster, warn = copy_cluster_size(target)
        if warn:
            warn_report(NO_CLUSTER_SIZE_WARNING)
        if request.max_chunk and request.max_chunk < cluster:
            raise QMPError(f"Required max-chunk ({request.max_chunk}) is less than backup "
                           f"cluster size ({cluster})")
        driver = Backup(self, "backup", speed=request.speed)
        try:
            job_id = self._job_id(request.job_id, source)
            # The copy-before-write filter's children: the source (read, and nobody may
            # resize it), the target (written; others may write too, not resize). The
            # job's op blocker is the filter's in QEMU, not the source's: another job may
            # start on the source by its node name.
            driver.use(source, job_id, CONSISTENT_READ, ALL & ~RESIZE, block=False)
            driver.use(target, job_id, WRITE, ALL & ~RESIZE, block=False)
            driver.use(target, job_id, 0, ALL)
        except BaseException:
            driver.release()
            raise
        copy = CopyState.create(source, target, cluster)
        if request.max_chunk:
            copy.chunk = request.max_chunk - request.max_chunk % cluster
        if bitmap is not None:
            # bdrv_dirty_bitmap_create_successor, then backup_init_bcs_bitmap: only what
            # the bitmap marks is copied.
            successor = DirtyBitmap("", bitmap.granularity, bitmap.size)
            successor.disabled = bitmap.disabled
            source.dirty_bitmaps.insert(0, successor)
            bitmap.busy = bitmap.disabled = True
            driver.sync_bitmap, driver.successor = bitmap, successor
            driver.bitmap_mode = request.bitmap_mode or "on-success"
            copy.bitmap.clear()
            copy.bitmap.merge_from(bitmap)
        source.before_write_hooks.append(driver.before_write)
        source.under_job_filter = True
        driver.source, driver.copy = source, copy
        return job_id, driver

    def prepare_backup(self, request: BackupRequest, taken: set[str]) -> tuple[str, Backup]:
        """backup_job_create for a transaction, under the graph lock: the job exists (its
        filter is in place) but has not started; ``taken`` holds the ids of the
        transaction's earlier backups (their jobs exist in QEMU already)."""
        if request.job_id is not None and request.job_id in taken:
            raise QMPError(f"Job ID '{request.job_id}' already in use")
        job_id, driver = self._start_backup(request)
        if job_id in taken:
            driver.drop()
            raise QMPError(f"Job ID '{job_id}' already in use")
        return job_id, driver

    async def backup(self, request: BackupRequest) -> None:
        """blockdev-backup: start the job (backup_job_create's checks raise QEMU's errors)."""
        job_id, driver = await self.block.run_light(self._start_backup, request)
        self.start_backup(job_id, driver, request)

    def start_backup(self, job_id: str, driver: Backup, request: BackupRequest) -> None:
        """job_start of a prepared backup; call from the event loop's thread."""
        copy = driver.copy
        assert copy is not None
        jobs = self.jobs

        async def run(job: Job) -> None:
            # backup_run: sync 'top' first drops what the source itself does not hold;
            # 'none' only serves copy-before-write until cancelled; else block_copy over
            # the whole disk, a request at a time.
            if request.sync == "top":
                dropped = await self.block.run(copy.reset_unallocated)
                job.total_progress = max(0, job.total_progress - dropped)
            if request.sync == "none":
                while not job.cancelled:
                    await jobs.pause_point(job, SLICE)
                return
            position = 0
            delay = 0.0
            while position < copy.length:
                await jobs.pause_point(job, delay)
                if job.cancelled:
                    return
                job.busy = True
                try:
                    copied = await self.block.run(copy.copy, position, copy.chunk)
                finally:
                    job.busy = False
                job.current_progress += copied
                position += copy.chunk
                delay = driver.limit.delay(copied) if copied else 0.0

        job = self.jobs.create(job_id, "backup", run, auto_finalize=request.auto_finalize,
                               auto_dismiss=request.auto_dismiss, driver=driver,
                               progress=(0, copy.remaining()))
        driver.job = job
