"""Block jobs (block-stream, block-commit, the block-job-* verbs) against QEMU 7.2.

Every scenario runs on QEMU and on our server, each in a directory whose path has the
same length ("qemu"/"ours"), on the same three-image chain (base <- mid <- top, each
layer with data of its own). What is compared: replies and error texts, the events
(JOB_STATUS_CHANGE, BLOCK_JOB_*) without timestamps, query-block-jobs / query-jobs,
the image lock bytes while a job runs and after it, and once the server is gone what
qemu-img info --backing-chain / map / check and qemu-io reads say of the images.

Jobs are held still with QEMU's own trick: ``speed: 1`` lets the first step through and
then sleeps for ever, so what a job did before it is stopped is the same on both.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lock_probe import locked
from server_support import Client, running

#: Members QEMU 7.2's query-named-block-nodes does not have (we answer as QEMU 10.x).
NEWER = ("active", "children")
IMAGES = ("top.qcow2", "mid.qcow2", "base.qcow2")


def _images(work: Path) -> None:
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=work)

    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    run("qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x11 1M 64k", "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "4M")
    run("qemu-io", "-c", "write -P 0x22 64k 64k", "-c", "write -P 0x22 1M 32k", "-c",
        "write -z 2M 64k", "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M")
    run("qemu-io", "-c", "write -P 0x33 128k 64k", "top.qcow2")


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in NEWER and k != "timestamp"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, str) and value.startswith("#block"):
        return "#block"
    return value


def _norm(value: Any, work: Path) -> Any:
    return _strip(json.loads(json.dumps(value).replace(str(work), "@TMP@")))


def _after(work: Path) -> list[Any]:
    """What qemu-img and qemu-io say of the images once the server is gone."""
    seen: list[Any] = []
    for name in IMAGES:
        info = subprocess.run(["qemu-img", "info", "--output=json", str(work / name)],
                              capture_output=True, text=True, check=True)
        image = json.loads(info.stdout)
        image.pop("actual-size", None)
        mapped = subprocess.run(["qemu-img", "map", "--output=json", str(work / name)],
                                capture_output=True, text=True, check=True)
        check = subprocess.run(["qemu-img", "check", str(work / name)], capture_output=True, text=True)
        seen.append([image, json.loads(mapped.stdout), check.returncode, check.stdout])
    for pattern, offset in (("0x11", "0"), ("0x22", "64k"), ("0x33", "128k"), ("0x22", "1M"),
                            ("0x11", "1056k"), ("0", "2M")):
        out = subprocess.run(["qemu-io", "-c", f"read -P {pattern} {offset} 32k", str(work / "top.qcow2")],
                             capture_output=True, text=True)
        seen.append(out.stdout.splitlines()[:1] + out.stderr.splitlines()[:1])
    return seen


Scenario = Callable[[Client, Path], list[Any]]


def both(tmp_path: Path, scenario: Scenario, args: Callable[[Path], list[str]] = lambda work: []
         ) -> tuple[list[Any], list[Any]]:
    """Run ``scenario`` on QEMU and on us (replies, then events, then the images after)."""
    results = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        _images(work)
        with running(args(work), work, qemu=qemu) as (proc, client):
            seen = scenario(client, work)
            client.execute("quit")
            # What comes after quit's reply (jobs cancelled on the way out), up to EOF.
            try:
                while True:
                    client.events.append(client.read(timeout=20))
            except EOFError:
                pass
            proc.wait(timeout=20)
        seen.append(client.events)
        seen.append(_after(work))
        results.append(_norm(seen, work))
    return results[0], results[1]


def _steps(client: Client, work: Path, steps: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    seen = []
    for name, arguments in steps:
        arguments = json.loads(json.dumps(arguments).replace("@TMP@", str(work)))
        seen.append([name, client.execute(name, arguments)])
    return seen


def _file(name: str) -> dict[str, Any]:
    return {"driver": "file", "filename": f"@TMP@/{name}"}


TOP = ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": _file("top.qcow2")})


def _settled(client: Client, job: str) -> list[Any]:
    """query-block-jobs once the job (speed 1) made its first step and sleeps."""
    deadline = time.monotonic() + 10
    last: Any = None
    while True:
        jobs = client.cmd("query-block-jobs")
        if jobs == last and jobs and jobs[0]["offset"] > 0 and not jobs[0]["busy"]:
            return [jobs, client.cmd("query-jobs")]
        assert time.monotonic() < deadline, jobs
        last = jobs
        time.sleep(0.1)


def _concluded(client: Client, job: str, status: str = "null", since: int = 0) -> None:
    """Wait until the job reached ``status`` (an event after the first ``since`` ones);
    every event stays in ``client.events``."""
    wanted = {"status": status, "id": job}
    while not any(e["event"] == "JOB_STATUS_CHANGE" and e["data"] == wanted for e in client.events[since:]):
        message = client.read()
        assert "event" in message, message
        client.events.append(message)


def _locks(work: Path) -> dict[str, list[int]]:
    """The lock bytes of the images, once they stay the same for 0.2 s (QEMU closes the
    nodes a job dropped a moment after the job's last event)."""
    deadline = time.monotonic() + 5
    seen = {name: locked(work / name) for name in IMAGES}
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = {name: locked(work / name) for name in IMAGES}
        if again == seen:
            break
        seen = again
    return seen


def _node_view(client: Client) -> list[Any]:
    return [(n["node-name"], n["drv"], n["ro"], n["file"], n.get("backing_file"), n["backing_file_depth"])
            for n in client.cmd("query-named-block-nodes")]


STREAM_ERRORS: list[tuple[str, dict[str, Any]]] = [
    TOP,
    ("block-stream", {"device": "nope"}),
    ("block-stream", {"device": "top"}),
    ("block-stream", {"job-id": "j1", "device": "top", "base": "nope"}),
    ("block-stream", {"job-id": "j1", "device": "top", "base-node": "top"}),
    ("block-stream", {"job-id": "j1", "device": "top", "base-node": "nope"}),
    ("block-stream", {"job-id": "j1", "device": "top", "base": "x", "base-node": "y"}),
    ("block-stream", {"job-id": "j1", "device": "top", "base": "x", "bottom": "y"}),
    ("block-stream", {"job-id": "j1", "device": "top", "bottom": "x", "base-node": "y"}),
    # Nothing to stream (the bottom is the top): the job ends at once, and the image
    # names its backing file by the absolute name.
    ("block-stream", {"job-id": "b0", "device": "top", "bottom": "top"}),
    ("block-stream", {"job-id": "j1", "device": "top", "backing-file": "x"}),
    ("block-stream", {"job-id": "1x", "device": "top"}),
    ("block-job-cancel", {"device": "j1"}),
    ("block-job-pause", {"device": "j1"}),
    ("block-job-set-speed", {"device": "j1", "speed": 1}),
    ("block-job-finalize", {"id": "j1"}),
    ("block-job-dismiss", {"id": "j1"}),
]


def test_stream_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """block-stream down to a base by file name, auto-finalize and auto-dismiss off: the
    errors, the job's life (BLOCK_JOB_PENDING, BLOCK_JOB_COMPLETED), the nodes it holds
    busy, and the image: mid's data in top, top's backing file the base (absolute)."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, STREAM_ERRORS)
        since = len(client.events)
        seen += _steps(client, work, [("block-stream", {
            "job-id": "j1", "device": "top", "base": "@TMP@/base.qcow2", "auto-finalize": False,
            "auto-dismiss": False})])
        _concluded(client, "j1", "pending", since)
        seen += _steps(client, work, [
            ("query-block-jobs", {}), ("query-jobs", {}),
            ("block-stream", {"job-id": "j1", "device": "top"}),
            ("block-stream", {"job-id": "j2", "device": "top"}),
            ("blockdev-del", {"node-name": "top"}),
            ("block-job-dismiss", {"id": "j1"}),
            ("block-job-finalize", {"id": "j1"}),
            ("query-block-jobs", {}),
            ("block-job-dismiss", {"id": "j1"}),
            ("query-block-jobs", {}),
        ])
        seen.append(_node_view(client))
        return seen

    theirs, ours = both(tmp_path, scenario)
    assert ours == theirs
    texts = [step[1].get("error", {}).get("desc") for step in ours[0:-3] if isinstance(step, list)
             and len(step) == 2 and isinstance(step[1], dict)]
    for text in ("Cannot find device='nope' nor node-name='nope'", "Invalid job ID ''",
                 "Can't find 'nope' in the backing chain", "Node 'top' is not a backing image of 'top'",
                 "backing file specified, but streaming the entire chain",
                 "Node 'top' is busy: block device is in use by block job: stream"):
        assert text in texts
    events = [e["event"] for e in ours[-2]]
    assert "BLOCK_JOB_PENDING" in events and "BLOCK_JOB_COMPLETED" in events
    # The base is top's backing file now, by its absolute name; mid is gone from the chain.
    top_info = ours[-1][0][0]
    assert top_info["backing-filename"] == "@TMP@/base.qcow2"
    assert all(image[2] == 0 for image in ours[-1][:3])


def test_stream_whole_chain_pause_cancel(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """A rate-limited stream of the whole chain: pause (the job stops at its pause point),
    resume, set-speed, the verbs refused while it runs, the lock bytes it takes (top:
    write unchanged), cancel (BLOCK_JOB_CANCELLED with its progress); then a second
    stream to the end, which leaves top without a backing file."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [TOP, ("block-stream", {"job-id": "j1", "device": "top", "speed": 1})])
        seen.append(_settled(client, "j1"))
        seen.append(_locks(work))
        seen += _steps(client, work, [
            ("block-job-set-speed", {"device": "j1", "speed": -1}),
            ("block-job-set-speed", {"device": "nope", "speed": 5}),
            ("block-job-pause", {"device": "j1"}),
            ("block-job-pause", {"device": "j1"}),
            ("query-block-jobs", {}),
            ("human-monitor-command", {"command-line": "info block-jobs"}),
            ("block-job-resume", {"device": "j1"}),
            ("block-job-resume", {"device": "j1"}),
            ("block-job-complete", {"device": "j1"}),
            ("block-job-finalize", {"id": "j1"}),
            ("block-job-dismiss", {"id": "j1"}),
            ("job-dismiss", {"id": "j1"}),
            ("block-job-cancel", {"device": "j1"}),
        ])
        _concluded(client, "j1")
        seen.append(_locks(work))
        seen += _steps(client, work, [("query-block-jobs", {}), ("query-jobs", {}),
                                      ("human-monitor-command", {"command-line": "info block-jobs"}),
                                      ("block-stream", {"job-id": "j2", "device": "top"})])
        _concluded(client, "j2")
        seen.append(_node_view(client))
        seen.append(_locks(work))
        return seen

    theirs, ours = both(tmp_path, scenario)
    assert ours == theirs
    assert "BLOCK_JOB_CANCELLED" in [e["event"] for e in ours[-2]]
    assert ours[3]["top.qcow2"] == [100, 101, 102, 103, 201, 203]
    assert "backing-filename" not in ours[-1][0][0]
    hmp = [step[1]["return"] for step in ours if isinstance(step, list) and step
           and step[0] == "human-monitor-command"]
    assert hmp[0].startswith("Streaming device j1: Completed ") and hmp[1] == "No active jobs\r\n"


def test_commit_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """block-commit of mid into base: the errors (DeviceNotFound first, as libvirt
    probes), base reopened read-write for the job (its lock bytes) and read-only after,
    mid unsharing consistent read, a cancelled commit, then one to the end: top's backing
    file is the base, mid is gone, base holds mid's data."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [
            TOP,
            ("block-commit", {"device": "nope"}),
            ("block-commit", {"job-id": "c1", "device": "top", "top-node": "nope"}),
            ("block-commit", {"job-id": "c1", "device": "top", "base-node": "nope"}),
            ("block-commit", {"job-id": "c1", "device": "top", "base": "nope"}),
            ("block-commit", {"job-id": "c1", "device": "top", "top": "nope"}),
            ("block-commit", {"job-id": "c1", "device": "top", "top": "x", "top-node": "y"}),
            ("block-commit", {"job-id": "c1", "device": "top", "base": "x", "base-node": "y"}),
            ("block-commit", {"job-id": "c1", "device": "top", "top-node": "top", "base-node": "top"}),
            ("block-commit", {"job-id": "c1", "device": "top", "top": "@TMP@/mid.qcow2",
                              "base": "@TMP@/mid.qcow2"}),
            ("block-commit", {"job-id": "c1", "device": "top", "top": "@TMP@/mid.qcow2", "speed": 1}),
        ])
        seen.append(_settled(client, "c1"))
        seen.append(_locks(work))
        seen += _steps(client, work, [
            ("block-stream", {"job-id": "s1", "device": "top"}),
            ("block-commit", {"job-id": "c2", "device": "top"}),
            ("blockdev-del", {"node-name": "top"}),
            ("human-monitor-command", {"command-line": "info block-jobs"}),
            ("block-job-cancel", {"device": "c1"}),
        ])
        _concluded(client, "c1")
        seen.append(_locks(work))
        seen.append(_node_view(client))
        seen += _steps(client, work, [("block-commit", {"job-id": "c3", "device": "top",
                                                        "top": "@TMP@/mid.qcow2"})])
        _concluded(client, "c3")
        seen.append(_locks(work))
        seen.append(_node_view(client))
        return seen

    theirs, ours = both(tmp_path, scenario)
    assert ours == theirs
    assert ours[1][1]["error"] == {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}
    during = ours[12]
    assert during["base.qcow2"] == [100, 101, 103, 201, 203] and 200 in during["mid.qcow2"]
    assert ours[-1][0][0]["backing-filename"] == "@TMP@/base.qcow2"
    assert ours[16][1]["return"].startswith("Type commit, device c1: Completed ")
    assert all(image[2] == 0 for image in ours[-1][:3])


def test_stream_of_a_drive(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """A -drive device: the job is named after it without job-id, the device name is
    accepted as ``device``, reads through the device see the same data after the job."""

    def drive(work: Path) -> list[str]:
        return ["-drive", f"if=none,id=d0,file={work / 'top.qcow2'},format=qcow2"]

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [("block-stream", {"device": "d0", "base": "base.qcow2"}),
                                     ])
        _concluded(client, "d0")
        since = len(client.events)
        seen += _steps(client, work, [("query-block", {}), ("block-stream", {"device": "d0"})])
        _concluded(client, "d0", since=since)
        seen += _steps(client, work, [("query-block", {})])
        return seen

    theirs, ours = both(tmp_path, scenario, drive)
    assert ours == theirs


def test_quit_while_a_job_runs(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """Quitting with a stream running (sleeping on speed 1) leaves every image consistent
    (qemu-img check clean) and the chain as it was."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [TOP, ("block-stream", {"job-id": "s", "device": "top", "speed": 1})])
        seen.append(_settled(client, "s"))
        return seen

    theirs, ours = both(tmp_path, scenario)
    assert ours == theirs
    assert all(image[2] == 0 for image in ours[-1][:3])


def _device(work: Path) -> list[str]:
    """A guest disk on the chain's top node, as libvirt starts one (paused, -blockdev)."""
    return ["-machine", "pc", "-S", "-blockdev",
            f"driver=qcow2,node-name=top,file.driver=file,file.filename={work / 'top.qcow2'}",
            "-device", "virtio-blk-pci,drive=top,id=vd0"]


def test_commit_below_a_device(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """block-commit of mid into base while a device reads and writes top (issue 10): the
    job takes mid's consistent read away from everybody, which QEMU allows because its
    commit filter sits between top and mid. Named by node and by file name, with the lock
    bytes during the job; the device then reads through the base."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [("block-commit", {"job-id": "c1", "device": "top",
                                                       "top": "@TMP@/mid.qcow2", "speed": 1})])
        seen.append(_settled(client, "c1"))
        seen.append(_locks(work))
        seen += _steps(client, work, [("block-job-cancel", {"device": "c1"})])
        _concluded(client, "c1")
        seen.append(_locks(work))
        seen.append(_node_view(client))
        seen += _steps(client, work, [("query-named-block-nodes", {"flat": True})])
        names = {n["file"].rsplit("/", 1)[-1]: n["node-name"] for n in seen[-1][1]["return"]
                 if n["drv"] == "qcow2"}
        seen[-1] = sorted(names)
        since = len(client.events)
        seen += _steps(client, work, [("block-commit", {"job-id": "c2", "device": "top",
                                                        "top-node": names["mid.qcow2"]})])
        _concluded(client, "c2", since=since)
        seen.append(_locks(work))
        seen.append(_node_view(client))
        seen += _steps(client, work, [("query-block", {})])
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    assert ours == theirs
    assert ours[0][1] == {"return": {}}
    assert ours[2]["mid.qcow2"] == [100, 200, 201, 203]
    assert ours[-1][0][0]["backing-filename"] == "@TMP@/base.qcow2"
    assert all(image[2] == 0 for image in ours[-1][:3])


def _until(client: Client, name: str, since: int = 0) -> dict[str, Any]:
    """Wait for event ``name`` after the first ``since`` events; it stays in the list."""
    while True:
        for event in client.events[since:]:
            if event["event"] == name:
                return event
        message = client.read()
        assert "event" in message, message
        client.events.append(message)


def _jobs_changed(client: Client, before: Any) -> list[Any]:
    """query-block-jobs once it differs from ``before`` (the job copied a new write)."""
    deadline = time.monotonic() + 10
    while True:
        jobs = client.cmd("query-block-jobs")
        if jobs != before and not jobs[0]["busy"]:
            return [jobs]
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)


def _compare_and_check(tmp_path: Path, first: str, second: str) -> list[Any]:
    """qemu-img compare of two images and check of both, in QEMU's and in our folder."""
    seen = []
    for side in ("qemu", "ours"):
        work = tmp_path / side
        compare = subprocess.run(["qemu-img", "compare", str(work / first), str(work / second)],
                                 capture_output=True, text=True)
        checks = [subprocess.run(["qemu-img", "check", str(work / name)], capture_output=True).returncode
                  for name in (first, second)]
        seen.append([compare.returncode, compare.stdout, checks])
    return seen


def test_active_commit_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """Active commit of a device's image into the base (issue 11), rate-limited first:
    the refused verbs, the lock bytes and query-block while it runs, BLOCK_JOB_READY with
    its progress, pause on a ready job (standby), a guest write copied while ready (the
    length grows by a granule), then block-job-complete: the device uses the base, which
    stays read-write, top and mid stay open (the monitor owns top). The base holds what
    the device saw: qemu-img compare top with base is clean."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [
            ("block-commit", {"device": "top"}),
            ("block-commit", {"job-id": "ac", "device": "top", "backing-file": "x"}),
            ("block-commit", {"job-id": "ac", "device": "top", "speed": 1}),
        ])
        seen.append(_settled(client, "ac"))
        seen.append(_locks(work))
        seen += _steps(client, work, [
            ("block-job-complete", {"device": "ac"}),
            ("block-stream", {"job-id": "s", "device": "top"}),
            ("blockdev-del", {"node-name": "top"}),
            ("query-block", {}),
            ("human-monitor-command", {"command-line": "info block-jobs"}),
            ("block-job-set-speed", {"device": "ac", "speed": 0}),
        ])
        _until(client, "BLOCK_JOB_READY")
        seen += _steps(client, work, [
            ("query-block-jobs", {}), ("query-jobs", {}),
            ("block-job-pause", {"device": "ac"}),
            ("query-block-jobs", {}), ("query-jobs", {}),
            ("block-job-resume", {"device": "ac"}),
        ])
        before = client.cmd("query-block-jobs")
        seen += _steps(client, work, [("human-monitor-command", {
            "command-line": "qemu-io -d vd0/virtio-backend \"write -P 0x44 4k 4k\""})])
        seen.append(_jobs_changed(client, before))
        seen += _steps(client, work, [("job-complete", {"id": "ac"})])
        _concluded(client, "ac")
        seen += _steps(client, work, [("block-job-complete", {"device": "ac"})])
        seen.append(_locks(work))
        seen.append(_node_view(client))
        seen += _steps(client, work, [("query-block", {})])
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    assert _host_order_free(ours) == _host_order_free(theirs)
    events = [e["event"] for e in ours[-2]]
    assert events.count("BLOCK_JOB_READY") == 1 and "BLOCK_JOB_COMPLETED" in events
    assert ours[-3][1]["return"][0]["inserted"]["file"] == "@TMP@/base.qcow2"
    identical = [0, "Images are identical.\n", [0, 0]]
    assert _compare_and_check(tmp_path, "top.qcow2", "base.qcow2") == [identical, identical]


def _host_order_free(result: list[Any]) -> list[Any]:
    """``result`` without where the base's clusters landed in its file: QEMU copies the
    parts of one mirror iteration concurrently, so the order its writes allocate
    clusters in varies from run to run (seen live). The maps become one entry per
    64 KiB cluster without ``offset``; qemu-img check's fragmentation figure goes."""
    after = result[-1]
    for image in after[:len(IMAGES)]:
        clusters = []
        for entry in image[1]:
            for start in range(entry["start"], entry["start"] + entry["length"], 65536):
                clusters.append({k: v for k, v in entry.items() if k not in ("offset", "start", "length")}
                                | {"start": start})
        image[1] = clusters
        image[3] = re.sub(r"[0-9.]+% fragmented", "fragmented", image[3])
    return result


def _drive(work: Path) -> list[str]:
    return ["-machine", "pc", "-S", "-drive", f"if=none,id=d0,file={work / 'top.qcow2'},format=qcow2",
            "-device", "virtio-blk-pci,drive=d0,id=vd0"]


def test_active_commit_cancel_and_finalize(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """Active commit of a -drive (the job named after it): job-cancel on a ready job
    forces (BLOCK_JOB_CANCELLED), block-job-cancel on a ready one is soft (BLOCK_JOB_COMPLETED,
    no pivot), auto-finalize and auto-dismiss off (BLOCK_JOB_PENDING, job-finalize does the
    pivot: top and mid close, their locks go); quitting with a ready job cancels it."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen: list[Any] = []
        for verb in (("job-cancel", {"id": "d0"}), ("block-job-cancel", {"device": "d0"})):
            since = len(client.events)
            seen += _steps(client, work, [("block-commit", {"device": "d0"})])
            _until(client, "BLOCK_JOB_READY", since)
            seen += _steps(client, work, [verb])
            _concluded(client, "d0", since=since)
            seen.append(_locks(work))
            seen += _steps(client, work, [("block-job-complete", {"device": "d0"})])
        since = len(client.events)
        seen += _steps(client, work, [("block-commit", {"device": "d0", "job-id": "a2",
                                                        "auto-finalize": False, "auto-dismiss": False})])
        _until(client, "BLOCK_JOB_READY", since)
        seen += _steps(client, work, [("job-complete", {"id": "a2"})])
        _concluded(client, "a2", "pending", since)
        seen += _steps(client, work, [("query-block-jobs", {}), ("job-finalize", {"id": "a2"})])
        _concluded(client, "a2", "concluded", since)
        seen.append(_locks(work))
        seen += _steps(client, work, [("query-jobs", {}), ("job-dismiss", {"id": "a2"}),
                                      ("query-block", {})])
        # Nothing below the base: nothing to commit.
        seen += _steps(client, work, [("block-commit", {"device": "d0"})])
        return seen

    theirs, ours = both(tmp_path, scenario, _drive)
    assert _host_order_free(ours) == _host_order_free(theirs)
    events = [e["event"] for e in ours[-2]]
    assert events.count("BLOCK_JOB_READY") == 3 and "BLOCK_JOB_CANCELLED" in events
    assert "BLOCK_JOB_PENDING" in events
    # query-block after the pivot: the drive's image is the base.
    assert ours[-4][1]["return"][0]["inserted"]["file"] == "@TMP@/base.qcow2"


def test_quit_with_a_ready_job(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """Quitting while an active commit is ready cancels it (forced): the events up to
    the end, and the images stay consistent with the chain as it was."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [("block-commit", {"job-id": "ac", "device": "top"})])
        _until(client, "BLOCK_JOB_READY")
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    assert _host_order_free(ours) == _host_order_free(theirs)
    assert all(image[2] == 0 for image in ours[-1][:3])


def test_active_commit_grows_a_shorter_base(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """Active commit into a base shorter than the top: the job grows the base to the
    top's length (mirror_run), the progress counts the chain's data past the base's end,
    and after the pivot the base is the top's size and reads as the top did."""
    seen = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()

        def image(*argv: str, cwd: Path = work) -> None:
            subprocess.run(argv, check=True, capture_output=True, cwd=cwd)

        image("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
        image("qemu-io", "-c", "write -P 0x11 0 64k", "base.qcow2")
        image("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", "3M")
        image("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M")
        image("qemu-io", "-c", "write -P 0x33 3M 64k", "top.qcow2")
        with running(_device(work), work, qemu=qemu) as (proc, client):
            replies = [client.execute("block-commit", {"job-id": "ac", "device": "top", "speed": 1})]
            replies.append(_settled(client, "ac"))
            replies.append(_locks(work))
            client.cmd("block-job-set-speed", device="ac", speed=0)
            replies.append(_until(client, "BLOCK_JOB_READY")["data"])
            client.cmd("block-job-complete", device="ac")
            _concluded(client, "ac")
            replies.append(_node_view(client))
            client.execute("quit")
            proc.wait(timeout=20)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(work / "base.qcow2")],
                                         capture_output=True, text=True, check=True).stdout)
        compare = subprocess.run(["qemu-img", "compare", str(work / "top.qcow2"), str(work / "base.qcow2")],
                                 capture_output=True, text=True)
        replies += [info["virtual-size"], compare.returncode, compare.stdout]
        seen.append(_norm(replies, work))
    assert seen[1] == seen[0]
    assert seen[1][-3:] == [4 << 20, 0, "Images are identical.\n"]


# A read-only overlay above ``top`` (issue 11) ---------------------------------------------

#: The four layers libvirt's `virsh blockcommit --top <s2>` works on, newest first.
LAYERS = ("active", "s3", "s2", "base")


def _libvirt_chain(work: Path) -> list[str]:
    """Four qcow2 layers, each with data of its own, opened as libvirt opens them: a
    named file node with auto-read-only under each format node, every backing format
    node read-only, the active one under a guest disk."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=work)

    args = ["-machine", "pc", "-S"]
    below: str | None = None
    for index, name in enumerate(reversed(LAYERS)):
        create = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if below is not None:
            create += ["-b", f"{below}.qcow2", "-F", "qcow2"]
        run(*create, f"{name}.qcow2", "4M")
        run("qemu-io", "-c", f"write -P 0x{index + 1}{index + 1} {index * 64}k 64k", f"{name}.qcow2")
        storage = {"driver": "file", "filename": str(work / f"{name}.qcow2"),
                   "node-name": f"{name}-storage", "auto-read-only": True, "discard": "unmap"}
        fmt = {"node-name": f"{name}-format", "read-only": name != "active", "driver": "qcow2",
               "file": f"{name}-storage", "backing": f"{below}-format" if below else None}
        args += ["-blockdev", json.dumps(storage), "-blockdev", json.dumps(fmt)]
        below = name
    return [*args, "-device", "virtio-blk-pci,drive=active-format,id=vd0"]


def _chain_locks(work: Path) -> dict[str, list[int]]:
    deadline = time.monotonic() + 5
    seen = {name: locked(work / f"{name}.qcow2") for name in LAYERS}
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = {name: locked(work / f"{name}.qcow2") for name in LAYERS}
        if again == seen:
            break
        seen = again
    return seen


def _ro_view(client: Client) -> list[Any]:
    # QEMU 7.2 also lists its commit_top filter node ("#block…") while the job runs; we
    # have no such node (the filter is the job's fixed permissions): left out here.
    return [(n["node-name"], n["ro"], n.get("backing_file"), n["image"].get("backing-filename-format"))
            for n in client.cmd("query-named-block-nodes") if not n["node-name"].startswith("#")]


def test_commit_below_a_read_only_overlay(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """libvirt's `blockcommit --top s2 --base base` on active <- s3 <- s2 <- base: s3,
    whose header must name the base afterwards, is read-only. QEMU keeps it read-only for
    the job (lock bytes, 'ro') and makes it writable only for the header's rewrite
    (bdrv_backing_update_filename); the job completes, s3's header names the base with
    its format, and the chain reads as before."""
    seen = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        with running(_libvirt_chain(work), work, qemu=qemu) as (proc, client):
            result = _steps(client, work, [("block-commit", {
                "job-id": "c1", "device": "active-format", "top-node": "s2-format",
                "base-node": "base-format", "speed": 1})])
            result.append(_settled(client, "c1"))
            result += [_chain_locks(work), _ro_view(client)]
            result += _steps(client, work, [("block-job-set-speed", {"device": "c1", "speed": 0})])
            _concluded(client, "c1")
            result += [_chain_locks(work), _ro_view(client), _strip(client.events)]
            client.execute("quit")
            proc.wait(timeout=20)
        chain = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain",
                                str(work / "active.qcow2")], capture_output=True, text=True, check=True)
        result.append([{k: v for k, v in image.items() if k != "actual-size"}
                       for image in json.loads(chain.stdout)])
        result.append(subprocess.run(["qemu-img", "check", str(work / "s3.qcow2")],
                                     capture_output=True, text=True).stdout)
        for index in range(4):
            out = subprocess.run(["qemu-io", "-c", f"read -P 0x{index + 1}{index + 1} {index * 64}k 64k",
                                  str(work / "active.qcow2")], capture_output=True, text=True)
            result.append(out.stdout.splitlines()[:1])
        seen.append(_norm(result, work))
    theirs, ours = seen
    assert ours == theirs
    assert not any("error" in e.get("data", {}) for e in ours[7])
    assert ours[2]["s3"] == [100, 201, 203] and ours[5]["s3"] == [100, 201, 203]
    assert ["s3-format", True, "@TMP@/base.qcow2", "qcow2"] in ours[6]
    assert [image["filename"] for image in ours[8]] == ["@TMP@/active.qcow2", "@TMP@/s3.qcow2",
                                                        "@TMP@/base.qcow2"]
    assert ours[8][1]["backing-filename-format"] == "qcow2"
    assert ours[10:] == [[f"read 65536/65536 bytes at offset {i * 65536}"] for i in range(4)]


def test_commit_below_a_read_only_top(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """The overlay opened read-only by blockdev-add with an implicit file node (reopened
    with it): commit of mid into base completes, the overlay's header names the base,
    and the overlay is read-only again (its lock bytes and 'ro')."""

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [
            ("blockdev-add", {"driver": "qcow2", "node-name": "top", "read-only": True,
                              "file": _file("top.qcow2")}),
            ("block-commit", {"job-id": "c1", "device": "top", "top": "@TMP@/mid.qcow2"})])
        _concluded(client, "c1")
        seen.append(_locks(work))
        seen.append(_node_view(client))
        return seen

    theirs, ours = both(tmp_path, scenario)
    assert ours == theirs
    assert ours[2]["top.qcow2"] == [100, 201, 203]
    assert ours[-1][0][0]["backing-filename"] == "@TMP@/base.qcow2"
    assert not any("error" in e["data"] for e in ours[-2] if e["event"] == "BLOCK_JOB_COMPLETED")


def test_read_only_overlay_held_by_another_reader(tmp_path: Path, qemu_utils: None) -> None:
    """Another process reads s3 (unsharing write) when the commit ends: s3 cannot be made
    writable for its header. QEMU 7.2 prints the reopen's error and then crashes
    (SIGSEGV, checked live), so this is ours alone: the same message on stderr, the job
    fails with the reopen's errno text (job_update_rc), s3 stays read-only with its lock
    bytes and its header, and every image stays consistent."""
    work = tmp_path / "ours"
    work.mkdir()
    with running(_libvirt_chain(work), work) as (proc, client):
        assert client.execute("block-commit", {
            "job-id": "c1", "device": "active-format", "top-node": "s2-format",
            "base-node": "base-format", "speed": 1}) == {"return": {}}
        _settled(client, "c1")
        spec = {"driver": "qcow2", "backing": None,
                "file": {"driver": "file", "filename": str(work / "s3.qcow2")}}
        reader = subprocess.Popen(["qemu-io", "-r", "json:" + json.dumps(spec)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert reader.stdout is not None
            # Its prompt comes once the image is open and its lock bytes are taken.
            assert reader.stdout.read(len("qemu-io> ")) == b"qemu-io> "
            client.cmd("block-job-set-speed", device="c1", speed=0)
            _concluded(client, "c1")
            completed = [e["data"] for e in client.events if e["event"] == "BLOCK_JOB_COMPLETED"]
            view = _ro_view(client)
        finally:
            assert reader.stdin is not None
            reader.stdin.close()
            reader.wait(timeout=20)
        locks = _chain_locks(work)
        client.execute("quit")
        proc.wait(timeout=20)
    assert completed == [{"device": "c1", "len": 4 << 20, "offset": 4 << 20, "speed": 0, "type": "commit",
                          "error": "Resource temporarily unavailable"}]
    assert client.output.all() == ('qmp-server: Failed to get "write" lock\n'
                                   f"Is another process using the image [{work / 's3.qcow2'}]?\n")
    assert ["s3-format", True] == list(next(n for n in view if n[0] == "s3-format")[:2])
    assert locks["s3"] == [100, 201, 203]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(work / "s3.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == "s2.qcow2"
    for name in LAYERS:
        assert subprocess.run(["qemu-img", "check", str(work / f"{name}.qcow2")],
                              capture_output=True).returncode == 0


# blockdev-mirror (virsh blockcopy) --------------------------------------------------------


def _copy(work: Path, name: str, size: str = "4M", backing: str | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", backing, "-F", "qcow2"]
    subprocess.run([*argv, name, size], check=True, capture_output=True, cwd=work)


def _copy_locks(work: Path, *names: str) -> dict[str, list[int]]:
    return {name: locked(work / name) for name in names}


COPY = ("blockdev-add", {"driver": "qcow2", "node-name": "copy", "file": _file("copy.qcow2")})
MIRROR_ERRORS: list[tuple[str, dict[str, Any]]] = [
    COPY,
    ("blockdev-add", {"driver": "qcow2", "node-name": "small", "file": _file("small.qcow2")}),
    ("blockdev-mirror", {"device": "nope", "target": "copy", "sync": "full"}),
    ("blockdev-mirror", {"device": "vd0", "target": "copy", "sync": "full"}),
    ("blockdev-mirror", {"device": "copy", "target": "nope", "sync": "full"}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full", "granularity": 256}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full", "granularity": 3072}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "incremental"}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "bitmap"}),
    ("blockdev-mirror", {"device": "top", "target": "top", "sync": "full"}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full", "replaces": "nope"}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full", "replaces": "copy"}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full", "buf-size": -1}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full", "job-id": "1x"}),
    ("blockdev-mirror", {"device": "top", "target": "copy", "sync": "full"}),
    # A target of another size: the job starts and fails at once.
    ("blockdev-mirror", {"job-id": "m0", "device": "top", "target": "small", "sync": "full"}),
]


def test_mirror_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """blockdev-mirror of a device's node into a new image (virsh blockcopy), rate-limited
    first: QEMU's refusals, the lock bytes and the busy nodes while it runs, complete
    refused before ready, BLOCK_JOB_READY, a guest write copied while ready, then
    job-complete: the device uses the copy, the source stays open (the monitor owns it).
    The copy reads as the source: qemu-img compare is clean."""

    def scenario(client: Client, work: Path) -> list[Any]:
        _copy(work, "copy.qcow2")
        _copy(work, "small.qcow2", "1M")
        seen = _steps(client, work, MIRROR_ERRORS)
        _concluded(client, "m0")
        seen += _steps(client, work, [
            ("blockdev-mirror", {"job-id": "m", "device": "top", "target": "copy", "sync": "full",
                                 "speed": 1}),
        ])
        seen.append(_settled(client, "m"))
        seen.append(_copy_locks(work, "top.qcow2", "mid.qcow2", "copy.qcow2"))
        seen += _steps(client, work, [
            ("block-job-complete", {"device": "m"}),
            ("blockdev-mirror", {"job-id": "m2", "device": "top", "target": "small", "sync": "full"}),
            ("block-stream", {"job-id": "s", "device": "top"}),
            ("blockdev-del", {"node-name": "copy"}),
            ("blockdev-del", {"node-name": "top"}),
            ("query-block", {}),
            ("block-job-set-speed", {"device": "m", "speed": 0}),
        ])
        _until(client, "BLOCK_JOB_READY")
        seen += _steps(client, work, [("query-block-jobs", {}), ("query-jobs", {})])
        before = client.cmd("query-block-jobs")
        seen += _steps(client, work, [("human-monitor-command", {
            "command-line": "qemu-io -d vd0/virtio-backend \"write -P 0x44 4k 4k\""})])
        seen.append(_jobs_changed(client, before))
        seen += _steps(client, work, [("job-complete", {"id": "m"})])
        _concluded(client, "m")
        seen.append(_copy_locks(work, "top.qcow2", "mid.qcow2", "copy.qcow2"))
        seen.append(_node_view(client))
        seen += _steps(client, work, [("query-block", {}), ("blockdev-del", {"node-name": "top"}),
                                      ("blockdev-del", {"node-name": "copy"})])
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    assert _host_order_free(ours) == _host_order_free(theirs)
    assert ours[-5][1]["return"][0]["inserted"]["file"] == "@TMP@/copy.qcow2"
    identical = [0, "Images are identical.\n", [0, 0]]
    assert _compare_and_check(tmp_path, "top.qcow2", "copy.qcow2") == [identical, identical]


def test_a_drives_device_going_cancels_its_jobs(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """blockdev_auto_del (iotest 040's test_hot_unplug): device_del of the device of a
    -drive cancels the block jobs on the drive (BLOCK_JOB_CANCELLED), and the drive's
    nodes go once the job let them go: no node left, no lock held."""

    def drive(work: Path) -> list[str]:
        return ["-machine", "pc", "-S", "-drive",
                f"if=none,id=drive0,file={work / 'top.qcow2'},node-name=top,backing.node-name=mid",
                # A SCSI disk: QEMU unplugs it without a guest's help (a virtio-blk-pci
                # would wait for the guest's acknowledgement, which ours gives at once).
                "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=drive0,id=vd0"]

    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, [
            ("block-commit", {"device": "drive0", "top-node": "mid", "speed": 1}),
            ("device_del", {"id": "vd0"}),
        ])
        _concluded(client, "drive0")
        _until(client, "DEVICE_DELETED")
        seen.append(_locks(work))
        seen += _steps(client, work, [("query-block-jobs", {}), ("query-block", {})])
        seen.append(_node_view(client))
        return seen

    def events(seen: list[Any]) -> list[Any]:
        # How far the job got, and whether it was paused while QEMU drained the drive on
        # its way out (DEVICE_DELETED then comes after the job's end), depend on timing.
        kept = []
        for event in seen[-2]:
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] in ("paused", "running"):
                continue
            if event["event"] == "BLOCK_JOB_CANCELLED":
                event = {**event, "data": {**event["data"], "offset": "OFFSET"}}
            kept.append(event)
        deleted = [e for e in kept if e["event"] == "DEVICE_DELETED"]
        return [e for e in kept if e["event"] != "DEVICE_DELETED"] + deleted

    theirs, ours = both(tmp_path, scenario, drive)
    # Replies, lock bytes (none held), query-block-jobs, query-block, the nodes (none).
    assert _host_order_free(ours[:-2]) == _host_order_free(theirs[:-2])
    assert events(ours) == events(theirs)
    assert "BLOCK_JOB_CANCELLED" in [e["event"] for e in ours[-2]]
    assert ours[-3] == []
    # Every image is consistent (qemu-img check), whatever the job copied before it went.
    assert [image[2] for image in ours[-1][:len(IMAGES)]] == [0] * len(IMAGES)


def _backup_target_view(work: Path, name: str) -> list[Any]:
    """What qemu-img and qemu-io say of a backup target while the server holds it."""
    mapped = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(work / name)],
                            capture_output=True, text=True, check=True)
    reads = []
    for pattern, offset in (("0x11", "0"), ("0x33", "128k"), ("0x44", "1M"), ("0", "2M"), ("0", "3M"),
                            ("0x55", "3M")):
        read = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P {pattern} {offset} 64k",
                               str(work / name)], capture_output=True, text=True)
        reads.append(read.stdout.splitlines()[0] if read.stdout else read.stderr)
    # Per cluster, without host offsets: QEMU copies with parallel requests, so the order
    # in which the target allocates its clusters varies.
    clusters = [{k: v for k, v in entry.items() if k not in ("offset", "start", "length")} | {"start": start}
                for entry in json.loads(mapped.stdout)
                for start in range(entry["start"], entry["start"] + entry["length"], 65536)]
    return [clusters, reads]


def _without_drains(events: list[Any]) -> list[Any]:
    """QEMU pauses a job while it drains its node for HMP qemu-io (paused, running);
    ours does not drain."""
    kept, running = [], set()
    for event in events:
        status = event["data"].get("status") if event["event"] == "JOB_STATUS_CHANGE" else None
        if status == "paused" or (status == "running" and event["data"]["id"] in running):
            continue
        if status == "running":
            running.add(event["data"]["id"])
        kept.append(event)
    return kept


BACKUP_ERRORS: list[tuple[str, dict[str, Any]]] = [
    ("blockdev-add", {"driver": "qcow2", "node-name": "full", "file": _file("full.qcow2")}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "incr", "file": _file("incr.qcow2")}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "small", "file": _file("small.qcow2")}),
    ("blockdev-add", {"driver": "raw", "node-name": "r", "file": _file("r.raw")}),
    ("block-dirty-bitmap-add", {"node": "top", "name": "b0"}),
    ("blockdev-backup", {"device": "nope", "target": "full", "sync": "full"}),
    ("blockdev-backup", {"device": "top", "target": "nope", "sync": "full"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "bitmap"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "incremental"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "incremental", "bitmap": "b0",
                         "bitmap-mode": "never"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "bitmap", "bitmap": "nope"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "bitmap", "bitmap": "b0"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "full", "bitmap-mode": "always"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "none", "bitmap": "b0",
                         "bitmap-mode": "always"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "full", "bitmap": "b0",
                         "bitmap-mode": "never"}),
    ("blockdev-backup", {"device": "top", "target": "top", "sync": "full"}),
    ("blockdev-backup", {"device": "top", "target": "r", "sync": "full", "compress": True}),
    ("blockdev-backup", {"device": "top", "target": "small", "sync": "full"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "full", "x-perf": {"max-workers": 0}}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "full", "x-perf": {"max-chunk": 4096}}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "full", "job-id": "1x"}),
    ("blockdev-backup", {"device": "top", "target": "full", "sync": "full"}),
    ("transaction", {"actions": [
        {"type": "blockdev-backup",
         "data": {"job-id": "t", "device": "top", "target": "full", "sync": "full"}},
        {"type": "abort", "data": {}}]}),
]


def test_backup_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """blockdev-backup of a device's node (virsh backup-begin): QEMU's refusals in its
    order; a full backup, rate-limited while the guest overwrites data it has not copied
    yet (the target gets the old data: copy-before-write), the target busy meanwhile;
    then an incremental one through a dirty bitmap, started by a transaction as libvirt
    does; the targets as qemu-img and qemu-io see them, and the bitmap after."""

    def scenario(client: Client, work: Path) -> list[Any]:
        for name, size in (("full.qcow2", "4M"), ("incr.qcow2", "4M"), ("small.qcow2", "1M")):
            _copy(work, name, size)
        (work / "r.raw").write_bytes(bytes(4 << 20))
        seen = _steps(client, work, BACKUP_ERRORS)
        guest = 'qemu-io -d vd0/virtio-backend "{}"'
        seen += _steps(client, work, [
            ("human-monitor-command", {"command-line": guest.format("write -P 0x44 1M 64k")}),
            ("blockdev-backup", {"job-id": "f", "device": "top", "target": "full", "sync": "full",
                                 "speed": 1, "auto-dismiss": False}),
            # Past what the job copies before its rate limit stops it (1 MiB).
            ("human-monitor-command", {"command-line": guest.format("write -P 0x55 3M 64k")}),
            ("blockdev-del", {"node-name": "full"}),
            ("block-job-set-speed", {"device": "f", "speed": 0}),
        ])
        _concluded(client, "f", "concluded")
        seen += _steps(client, work, [
            ("query-jobs", {}),
            ("job-dismiss", {"id": "f"}),
            ("transaction", {"actions": [{"type": "blockdev-backup", "data": {
                "job-id": "i", "device": "top", "target": "incr", "sync": "incremental",
                "bitmap": "b0", "auto-dismiss": False}}]}),
        ])
        _concluded(client, "i", "concluded")
        seen += _steps(client, work, [("query-jobs", {}), ("job-dismiss", {"id": "i"})])
        seen.append([b["count"] for b in client.cmd("query-block")[0]["inserted"]["dirty-bitmaps"]])
        seen.append(_copy_locks(work, "top.qcow2", "full.qcow2"))
        # Closed (and so written out) as libvirt closes them after a backup.
        seen += _steps(client, work, [("blockdev-del", {"node-name": "full"}),
                                      ("blockdev-del", {"node-name": "incr"})])
        seen.append(_backup_target_view(work, "full.qcow2"))
        seen.append(_backup_target_view(work, "incr.qcow2"))
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    theirs[-2], ours[-2] = _without_drains(theirs[-2]), _without_drains(ours[-2])
    assert ours == theirs
    full, incr = ours[-4], ours[-3]
    # The full backup has the data as it was at the start, not the guest's later write.
    assert [read.startswith("read ") for read in full[1]] == [True, True, True, True, True, False]
    # The incremental one has only what the bitmap marked: the two guest writes.
    assert [read.startswith("read ") for read in incr[1]] == [False, False, True, True, False, True]


def _targets_seen(work: Path, names: list[str]) -> list[Any]:
    """Each target image's format, backing file name and size (read while the server
    holds them), then whether full.qcow2 reads as top.qcow2 (qemu-img compare)."""
    seen: list[Any] = []
    for name in names:
        info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(work / name)],
                              capture_output=True, text=True, check=True)
        facts = json.loads(info.stdout)
        seen.append([facts["format"], facts.get("backing-filename"), facts["virtual-size"]])
    compared = subprocess.run(["qemu-img", "compare", "-U", str(work / "full.qcow2"),
                               str(work / "top.qcow2")], capture_output=True, text=True)
    seen.append([compared.returncode, compared.stdout])
    return seen


def test_drive_backup_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """drive-backup: the target image created as bdrv_img_create makes it (its
    ``Formatting`` line on stdout; with the source's backing file for sync top, the source
    itself for none), opened, backed up into and closed at the end; QEMU's refusals."""

    def scenario(client: Client, work: Path) -> list[Any]:
        def target(name: str) -> str:
            return str(work / name)

        seen = _steps(client, work, [
            ("drive-backup", {"device": "top", "target": target("d0.qcow2"), "sync": "full"}),
            ("drive-backup", {"job-id": "full", "device": "top", "target": target("full.qcow2"),
                              "sync": "full"}),
        ])
        _concluded(client, "full")
        seen += _steps(client, work, [
            ("drive-backup", {"job-id": "top", "device": "top", "target": target("top-only.qcow2"),
                              "sync": "top", "format": "qcow2"}),
        ])
        _concluded(client, "top")
        seen += _steps(client, work, [
            ("drive-backup", {"job-id": "raw", "device": "top", "target": target("full.raw"),
                              "sync": "full", "format": "raw"}),
        ])
        _concluded(client, "raw")
        seen += _steps(client, work, [
            ("drive-backup", {"job-id": "x", "device": "top", "target": target("x.raw"), "sync": "top",
                              "format": "raw"}),
            ("drive-backup", {"job-id": "x", "device": "top", "target": target("no/x.qcow2"),
                              "sync": "full"}),
            ("drive-backup", {"job-id": "x", "device": "top", "target": target("missing.qcow2"),
                              "sync": "full", "mode": "existing"}),
            ("drive-backup", {"job-id": "x", "device": "nope", "target": target("x.qcow2"),
                              "sync": "full"}),
            ("drive-backup", {"job-id": "none", "device": "top", "target": target("none.qcow2"),
                              "sync": "none"}),
            ("query-block-jobs", {}),
            ("block-job-cancel", {"device": "none"}),
        ])
        _concluded(client, "none")
        seen.append([line for line in (work / "vm.out").read_text().splitlines()
                     if line.startswith("Formatting")])
        seen += _targets_seen(work, ["full.qcow2", "top-only.qcow2", "full.raw", "none.qcow2"])
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    theirs[-2], ours[-2] = _without_drains(theirs[-2]), _without_drains(ours[-2])
    assert ours == theirs
    assert ours[-3] == [0, "Images are identical.\n"]


def test_drive_mirror_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """drive-mirror (what older management tools send for a block copy): the target image
    created as bdrv_img_create makes it, mirrored into, and on completion put in the
    source's place with the source's backing chain below it (sync top) or none (full);
    QEMU's refusals."""

    def scenario(client: Client, work: Path) -> list[Any]:
        def target(name: str) -> str:
            return str(work / name)

        seen = _steps(client, work, [
            ("drive-mirror", {"device": "top", "target": target("x.qcow2"), "sync": "full",
                              "replaces": "top"}),
            ("drive-mirror", {"device": "top", "target": target("x.raw"), "sync": "top", "format": "raw"}),
            ("drive-mirror", {"device": "top", "target": target("missing.qcow2"), "sync": "full",
                              "mode": "existing"}),
            ("drive-mirror", {"device": "nope", "target": target("x.qcow2"), "sync": "full"}),
            ("drive-mirror", {"job-id": "m", "device": "top", "target": target("top2.qcow2"),
                              "sync": "top", "node-name": "top2"}),
        ])
        _until(client, "BLOCK_JOB_READY")
        seen += _steps(client, work, [("block-job-complete", {"device": "m"})])
        _concluded(client, "m")
        seen += _steps(client, work, [("query-block", {})])
        seen.append(_node_view(client))
        since = len(client.events)
        seen += _steps(client, work, [
            ("drive-mirror", {"job-id": "f", "device": "top2", "target": target("full.qcow2"),
                              "sync": "full", "node-name": "full"}),
        ])
        _until(client, "BLOCK_JOB_READY", since=since)
        seen += _steps(client, work, [("block-job-complete", {"device": "f"})])
        _concluded(client, "f")
        seen += _steps(client, work, [("query-block", {})])
        seen.append(_node_view(client))
        seen.append([line for line in (work / "vm.out").read_text().splitlines()
                     if line.startswith("Formatting")])
        seen += _targets_seen(work, ["top2.qcow2", "full.qcow2"])
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    theirs[-2], ours[-2] = _without_drains(theirs[-2]), _without_drains(ours[-2])
    assert _host_order_free(ours) == _host_order_free(theirs)
    assert ours[-3] == [0, "Images are identical.\n"]


def test_drive_backup_in_a_transaction_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """drive-backup as a transaction action (iotest 124): its image is made at prepare and
    stays on disk when a later action aborts the transaction, the job it had created
    reporting its cancellation; then one that commits runs to its end."""

    def scenario(client: Client, work: Path) -> list[Any]:
        def backup(job: str, name: str) -> dict[str, Any]:
            return {"type": "drive-backup", "data": {"job-id": job, "device": "top", "sync": "full",
                                                     "target": str(work / name)}}

        seen = _steps(client, work, [
            ("transaction", {"actions": [backup("a", "a.qcow2"), {"type": "abort", "data": {}}]}),
            ("transaction", {"actions": [backup("b", "b.qcow2"), backup("b", "b2.qcow2")]}),
            ("transaction", {"actions": [backup("c", "c.qcow2")]}),
        ])
        _concluded(client, "c")
        seen.append(sorted(path.name for path in work.glob("[abc]*.qcow2")))
        seen.append([line for line in (work / "vm.out").read_text().splitlines()
                     if line.startswith("Formatting")])
        return seen

    theirs, ours = both(tmp_path, scenario, _device)
    theirs[-2], ours[-2] = _without_drains(theirs[-2]), _without_drains(ours[-2])
    assert ours == theirs
    assert ours[-4] == ["a.qcow2", "b.qcow2", "b2.qcow2", "base.qcow2", "c.qcow2"]
