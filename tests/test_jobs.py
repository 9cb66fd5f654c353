"""Jobs: QEMU's job state machine, JOB_STATUS_CHANGE, query-jobs and the job-* verbs.

The live tests run the same commands on QEMU 7.2 (blockdev-create jobs) and on our server
and compare every reply and every event (without timestamps). The state machine's paths
that no blockdev-create job takes (auto-finalize off, cancelling a pending or running job,
auto-dismiss) are tested on the service itself, with QEMU's job.c as the reference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from server_support import Client, running

from qmp_server.errors import QMPError
from qmp_server.events import EventBus
from qmp_server.jobs import Job, JobService


def session(client: Client, steps: list[Any], tmp: Path) -> list[Any]:
    """Run ``steps`` (commands, or "settle" to wait for the running jobs to conclude);
    return what a user sees: replies and events' data, in order."""
    seen: list[Any] = []
    for step in steps:
        if step == "settle":
            seen.extend(settle(client))
            continue
        name, args = step
        text = json.dumps(args).replace("@TMP@", str(tmp))
        reply = client.execute(name, json.loads(text))
        seen.extend((e["event"], e.get("data")) for e in client.events)
        client.events.clear()
        seen.append(reply)
    # Paths differ between the two runs; what is around them must not.
    normalized: list[Any] = json.loads(json.dumps(seen).replace(str(tmp), "@TMP@"))
    return normalized


def settle(client: Client) -> list[Any]:
    """Events until no job is still running (every job concluded or gone)."""
    seen: list[Any] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = client.cmd("query-jobs")
        if all(job["status"] in ("concluded", "pending") for job in jobs):
            break
        time.sleep(0.02)
    # The last transitions' events were sent before query-jobs answered.
    seen.extend((e["event"], e.get("data")) for e in client.events)
    client.events.clear()
    return seen


def create_file(job: str, name: str, size: int = 1 << 20) -> tuple[str, dict[str, Any]]:
    return ("blockdev-create", {"job-id": job, "options": {"driver": "file", "filename": f"@TMP@/{name}",
                                                            "size": size}})


LIFECYCLE = [
    ("query-jobs", {}),
    create_file("j1", "a.img"),
    "settle",
    ("query-jobs", {}),
    ("job-finalize", {"id": "j1"}),
    ("job-cancel", {"id": "j1"}),
    ("job-pause", {"id": "j1"}),
    ("job-resume", {"id": "j1"}),
    ("job-complete", {"id": "j1"}),
    create_file("j1", "b.img"),
    create_file("1bad", "b.img"),
    create_file("j2", "b.img", 1000),
    "settle",
    ("query-jobs", {}),
    ("job-dismiss", {"id": "j1"}),
    ("job-dismiss", {"id": "j1"}),
    ("job-dismiss", {"id": "nope"}),
    ("job-finalize", {"id": "nope"}),
    ("job-cancel", {"id": "nope"}),
    ("job-pause", {"id": "nope"}),
    ("job-resume", {"id": "nope"}),
    ("job-complete", {"id": "nope"}),
    create_file("j3", "nodir/c.img"),
    "settle",
    ("query-jobs", {}),
    ("job-dismiss", {"id": "j3"}),
    ("job-dismiss", {"id": "j2"}),
    ("query-jobs", {}),
    ("blockdev-create", {"job-id": "j4", "options": {"driver": "raw"}}),
    ("blockdev-create", {"job-id": "j4", "options": {"driver": "null-co"}}),
    ("query-jobs", {}),
]


def test_lifecycle_as_qemu(tmp_path: Path, qemu_system: str) -> None:
    results = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        with running([], work, qemu=qemu) as (_, client):
            results.append(session(client, LIFECYCLE, work))
    qemu_seen, ours = results
    assert ours == qemu_seen
    assert json.dumps(ours) == json.dumps(qemu_seen)  # members in QEMU's order too
    # What the comparison covered, spelled out.
    assert ["JOB_STATUS_CHANGE", {"status": "aborting", "id": "j3"}] in ours
    assert {"error": {"class": "GenericError",
                      "desc": "Job 'j1' in state 'concluded' cannot accept command verb 'finalize'"}} in ours


def test_created_and_running_come_before_the_reply(tmp_path: Path) -> None:
    with running([], tmp_path) as (_, client):
        client.send_raw(json.dumps({"execute": "blockdev-create", "arguments": {
            "job-id": "j", "options": {"driver": "file", "filename": str(tmp_path / "x"), "size": 0}}}))
        lines = [json.loads(client.read_line()) for _ in range(3)]
        assert [m.get("data", m) for m in lines] == [{"status": "created", "id": "j"},
                                                     {"status": "running", "id": "j"}, {"return": {}}]


def test_query_jobs_while_a_job_runs(tmp_path: Path) -> None:
    """The work runs in a worker thread: the monitor answers while it is under way.

    (Writing 1 GiB of zeroes and syncing takes a few seconds here, so the job is still
    running when the next commands arrive; if it was not, there is nothing to check.)
    """
    SIZE = 1 << 30
    with running([], tmp_path) as (_, client):
        client.cmd("blockdev-create", job_id="big", options={
            "driver": "file", "filename": str(tmp_path / "big"), "size": SIZE, "preallocation": "full"})
        jobs = client.cmd("query-jobs")
        assert jobs[0]["id"] == "big"
        assert jobs[0]["status"] in ("running", "concluded")
        if jobs[0]["status"] == "running":
            assert (jobs[0]["current-progress"], jobs[0]["total-progress"]) == (0, 1)
        # A file creation holds no graph lock: block commands are served meanwhile.
        client.cmd("blockdev-add", driver="null-co", node_name="n0")
        after = client.cmd("query-jobs")[0]["status"]
        while client.wait_event("JOB_STATUS_CHANGE")["data"]["status"] != "concluded":
            pass
        assert (tmp_path / "big").stat().st_size == SIZE
        if jobs[0]["status"] == "running":
            assert after == "running"


# The service itself ------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.bus = EventBus()
        self.seen: list[str] = []
        self.bus.subscribe(lambda m: self.seen.append(m["data"]["status"]))


async def _ok(job: Job) -> None:
    job.total_progress = 1
    await trio.sleep(0)
    job.current_progress = 1


async def _fail(job: Job) -> None:
    raise QMPError("it broke")


async def _until_idle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_manual_finalize() -> None:
    rec = Recorder()
    jobs = JobService(rec.bus)
    jobs.create("j", "create", _ok, auto_finalize=False, auto_dismiss=False)
    await _until_idle()
    assert rec.seen == ["created", "running", "waiting", "pending"]
    with pytest.raises(QMPError, match="Job 'j' in state 'pending' cannot accept command verb 'dismiss'"):
        jobs.dismiss("j")
    jobs.finalize("j")
    assert rec.seen[4:] == ["concluded"]
    assert jobs.query() == [{"current-progress": 1, "status": "concluded", "total-progress": 1,
                             "type": "create", "id": "j"}]
    jobs.dismiss("j")
    assert rec.seen[5:] == ["null"] and jobs.query() == []


async def test_cancel_pending() -> None:
    rec = Recorder()
    jobs = JobService(rec.bus)
    jobs.create("j", "create", _ok, auto_finalize=False, auto_dismiss=False)
    await _until_idle()
    jobs.cancel("j")
    assert rec.seen == ["created", "running", "waiting", "pending", "aborting", "concluded"]
    assert jobs.query()[0]["error"] == "Operation canceled"


async def test_cancel_running_aborts_when_the_work_returns() -> None:
    rec = Recorder()
    jobs = JobService(rec.bus)
    release = trio.Event()

    async def slow(job: Job) -> None:
        await release.wait()

    jobs.create("j", "create", slow, auto_dismiss=False)
    await _until_idle()
    jobs.cancel("j")
    assert rec.seen == ["created", "running"]
    with pytest.raises(QMPError, match="Job 'j' in state 'running' cannot accept command verb 'dismiss'"):
        jobs.dismiss("j")
    release.set()
    await _until_idle()
    assert rec.seen[2:] == ["aborting", "concluded"]
    assert jobs.query()[0]["error"] == "Operation canceled"


async def test_failure_and_auto_dismiss() -> None:
    rec = Recorder()
    jobs = JobService(rec.bus)
    jobs.create("j", "create", _fail)  # auto-dismiss (QEMU's default for other job kinds)
    await _until_idle()
    assert rec.seen == ["created", "running", "aborting", "concluded", "null"]
    assert jobs.query() == []


async def test_pause_resume_records() -> None:
    rec = Recorder()
    jobs = JobService(rec.bus)
    release = trio.Event()

    async def slow(job: Job) -> None:
        await release.wait()

    jobs.create("j", "create", slow, auto_dismiss=False)
    with pytest.raises(QMPError, match="Can't resume a job that was not paused"):
        jobs.resume("j")
    jobs.pause("j")
    with pytest.raises(QMPError, match="Job is already paused"):
        jobs.pause("j")
    jobs.resume("j")
    with pytest.raises(QMPError, match="Job 'j' in state 'running' cannot accept command verb 'complete'"):
        jobs.complete("j")
    release.set()
    await _until_idle()
    assert rec.seen[-1] == "concluded"
