"""Internal snapshots (issue 11 §2): qcow2 snapshot tables, savevm/loadvm/delvm, the jobs.

The qcow2 tests do the same steps with QEMU 7.2's tools (``qemu-img snapshot -c/-a/-d``,
``qemu-io`` writes) on one copy of an image and with our driver on another, and compare
the files byte for byte after every step (our snapshots are given the date qemu-img
wrote, the only field that cannot match by itself); ``qemu-img check`` must find both
clean and ``qemu-img snapshot -l`` must list ours. The monitor tests compare HMP text,
QMP replies and events with QEMU 7.2 run with the same command line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_support import close_qcow2, open_qcow2
from qemu_tools import require
from server_support import SERVER, running

from blocklayer.qcow2 import Qcow2Driver
from blocklayer.qcow2.snapshot import NO_ICOUNT, read_snapshots
from qmp_server.vmsnapshots import vm_state_stream

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def tools() -> None:
    require("qemu-img")
    require("qemu-io")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _base(path: Path) -> None:
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M")
    sh("qemu-io", "-c", "write -P 1 0 192k", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k",
       "-c", "write -c -P 5 3M 64k", str(path))


def _ours(path: Path, fn: Callable[[Qcow2Driver], object]) -> None:
    drv = open_qcow2(path)
    try:
        fn(drv)
    finally:
        close_qcow2(drv)


def _last_date(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(72)
    count = int.from_bytes(head[60:64], "big")
    offset = int.from_bytes(head[64:72], "big")

    class _File:
        def pread(self, pos: int, length: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(pos)
                return f.read(length)

    snaps = read_snapshots(_File(), offset, count, 0)  # type: ignore[arg-type]
    return snaps[-1].date_sec, snaps[-1].date_nsec


def _create_like(theirs: Path) -> Callable[[Qcow2Driver], object]:
    name_date = _last_date(theirs)

    def create(drv: Qcow2Driver) -> object:
        name = f"s{len(drv.snapshot_list()) + 1}"
        return drv.snapshot_create(name, date_sec=name_date[0], date_nsec=name_date[1],
                                   vm_clock_nsec=0, icount=0)
    return create


def _same(theirs: Path, ours: Path, step: str) -> None:
    assert theirs.read_bytes() == ours.read_bytes(), step
    assert "No errors were found on the image." in sh("qemu-img", "check", str(ours)), step


def test_snapshot_steps_match_qemu_img_byte_for_byte(tmp_path: Path, tools: None) -> None:
    """create, guest writes (copy-on-write), create, apply, write, delete, delete."""
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    _base(q)
    shutil.copy(q, o)
    # Snapshot names s1, s2 by count, as qemu-img's below.
    sh("qemu-img", "snapshot", "-c", "s1", str(q))
    _ours(o, _create_like(q))
    _same(q, o, "create s1")
    assert "s1" in sh("qemu-img", "snapshot", "-l", str(o))

    sh("qemu-io", "-c", "write -P 7 64k 64k", "-c", "write -P 8 3M 4k", str(q))
    _ours(o, lambda d: (d.write(64 * KiB, b"\7" * 64 * KiB), d.write(3 * MiB, b"\x08" * 4 * KiB)))
    _same(q, o, "guest writes after s1")

    sh("qemu-img", "snapshot", "-c", "s2", str(q))
    _ours(o, _create_like(q))
    _same(q, o, "create s2")

    sh("qemu-img", "snapshot", "-a", "s1", str(q))
    _ours(o, lambda d: d.snapshot_goto("s1"))
    _same(q, o, "apply s1")
    # The data written after s1 is gone again (it was copied, not overwritten).
    sh("qemu-io", "-r", "-c", "read -P 1 0 192k", "-c", "read -P 5 3M 64k", str(o))

    sh("qemu-io", "-c", "write -P 9 0 4k", str(q))
    _ours(o, lambda d: d.write(0, b"\t" * 4 * KiB))
    _same(q, o, "write after apply")

    sh("qemu-img", "snapshot", "-d", "s2", str(q))
    _ours(o, lambda d: d.snapshot_delete(None, "s2"))
    _same(q, o, "delete s2")
    sh("qemu-img", "snapshot", "-d", "s1", str(q))
    _ours(o, lambda d: d.snapshot_delete(None, "s1"))
    _same(q, o, "delete s1")


@pytest.mark.parametrize("no_unref", [False, True])
def test_writes_after_a_snapshot_leave_it_alone(tmp_path: Path, tools: None, no_unref: bool) -> None:
    """Copy-on-write: every kind of guest write after our snapshot; qemu-img then applies
    the snapshot and qemu-io reads the old data back. With discard-no-unref a discard
    keeps its reference and passes the discard down, but only for a cluster the active
    tree owns alone (it used to punch the snapshot's data)."""
    o = tmp_path / "o.qcow2"
    _base(o)

    def steps(drv: Qcow2Driver) -> None:
        drv.snapshot_create("before", date_sec=1, date_nsec=0, vm_clock_nsec=0, icount=NO_ICOUNT)
        drv.write(0, b"\xaa" * 192 * KiB)             # in place unless COPIED is clear
        drv.write(1 * MiB + 512, b"\xbb" * 512)        # partial cluster: COW of the rest
        drv.write_zeroes(0, 64 * KiB, may_unmap=True)  # frees only the active reference
        drv.discard(64 * KiB, 64 * KiB)
        drv.write(2 * MiB, b"\xcc" * 64 * KiB)         # over a zero cluster
        drv.write(3 * MiB, b"\xdd" * 4 * KiB)          # over a compressed cluster
    drv = open_qcow2(o, options={"discard-no-unref": no_unref})
    try:
        steps(drv)
    finally:
        close_qcow2(drv)
    assert "No errors were found on the image." in sh("qemu-img", "check", str(o))
    sh("qemu-io", "-r", "-c", "read -P 0 0 64k", "-c", "read -P 0xbb 1049088 512", str(o))
    sh("qemu-img", "snapshot", "-a", "before", str(o))
    sh("qemu-io", "-r", "-c", "read -P 1 0 192k", "-c", "read -P 2 1M 64k",
       "-c", "read -P 0 2M 64k", "-c", "read -P 5 3M 64k", str(o))
    assert "No errors were found on the image." in sh("qemu-img", "check", str(o))


def test_qemu_img_snapshots_are_listed_applied_and_deleted(tmp_path: Path, tools: None) -> None:
    o = tmp_path / "o.qcow2"
    _base(o)
    sh("qemu-img", "snapshot", "-c", "theirs", str(o))
    sh("qemu-io", "-c", "write -P 0x42 0 64k", str(o))
    sh("qemu-img", "snapshot", "-c", "second", str(o))
    drv = open_qcow2(o)
    try:
        listed = drv.snapshot_list()
        assert [(s.id_str, s.name, s.vm_state_size, s.icount) for s in listed] == [
            ("1", "theirs", 0, 0), ("2", "second", 0, 0)]
        drv.snapshot_goto("1")  # by id first, as qcow2_snapshot_goto looks it up
        assert drv.read(0, 64 * KiB) == b"\1" * 64 * KiB
        drv.snapshot_delete("2", None)
        assert [s.name for s in drv.snapshot_list()] == ["theirs"]
    finally:
        close_qcow2(drv)
    assert "No errors were found on the image." in sh("qemu-img", "check", str(o))
    listing = sh("qemu-img", "snapshot", "-l", str(o))
    assert "theirs" in listing and "second" not in listing


# ---------------------------------------------------------------- HMP and QMP against QEMU

_ROW = re.compile(r"^(\S+)\s+(\S+)\s+([\d.]+ \S?B) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                  r"\d\d:\d\d:\d\d\.\d{3}( +\S+)? *$")


def _normal_text(text: str) -> str:
    """HMP text with what cannot match masked: dates, clocks and automatic tags
    (vm-DATE); the VM SIZE is kept (765 B from both)."""
    lines = []
    for line in text.split("\r\n"):
        match = _ROW.match(line)
        if match:
            line = (f"{match.group(1)} {match.group(2)} {match.group(3)} <date clock>"
                    f"{match.group(4) or ''}")
        lines.append(re.sub(r"vm-\d{14}", "vm-DATE", line))
    return "\r\n".join(lines)


def _normal(value: object) -> object:
    """_normal_text on every string of a JSON-like value (tuples become lists)."""
    if isinstance(value, str):
        return _normal_text(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def _hmp_session(tmp: Path, qemu: bool, args: list[str],
                 lines: list[str | tuple[str, dict[str, object]]]) -> list[object]:
    """HMP lines (or QMP (command, arguments) steps): their text and the events' names."""
    seen: list[object] = []
    with running(args, tmp, qemu=qemu) as (_proc, client):
        for line in lines:
            if isinstance(line, tuple):
                text = str(client.execute(*line))
            else:
                text = _normal_text(client.hmp(line))
            seen.append((line, text, [e["event"] for e in client.events]))
            client.events.clear()
    return seen


def _both(tmp_path: Path, make: Callable[[Path], list[str]]) -> tuple[Path, list[str], Path, list[str]]:
    theirs, ours = tmp_path / "qemu", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    return theirs, make(theirs), ours, make(ours)


HMP_LINES = ["info snapshots", "savevm", "info snapshots", "savevm foo", "savevm foo",
             "info snapshots", "loadvm foo", "info status", "loadvm 1", "info status",
             "loadvm zz", "delvm zz", "delvm foo", "info snapshots", "loadvm", "delvm",
             "savevm a b", "info snapshots x", "cont", "info status",
             # A tag is kept to 255 bytes (char name[256]); the checks use all of it.
             "savevm " + "t" * 300, "savevm " + "t" * 300, "loadvm " + "t" * 300,
             "info snapshots"]


def test_hmp_savevm_loadvm_delvm_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    def make(work: Path) -> list[str]:
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / "d.qcow2"), "64M")
        return ["-drive", f"file={work / 'd.qcow2'},format=qcow2,if=none,id=d0"]
    theirs, t_args, ours, o_args = _both(tmp_path, make)
    expected = _hmp_session(theirs, True, t_args, HMP_LINES)
    assert _hmp_session(ours, False, o_args, HMP_LINES) == expected
    assert "No errors were found on the image." in sh("qemu-img", "check", str(ours / "d.qcow2"))
    listed = sh("qemu-img", "snapshot", "-l", str(ours / "d.qcow2"))
    assert re.search(r"^1 +vm-\d{14} +765 B ", listed, re.M), listed


@pytest.mark.parametrize("setup", ["none", "raw", "two-qcow2"])
def test_hmp_errors_and_listings_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None,
                                         setup: str) -> None:
    """No capable node, a writable node without snapshots, and partial snapshots (a
    tag on one node only, listed under the device name)."""
    def make(work: Path) -> list[str]:
        if setup == "none":
            return []
        if setup == "raw":
            sh("qemu-img", "create", "-q", "-f", "raw", str(work / "r.raw"), "1M")
            return ["-drive", f"file={work / 'r.raw'},format=raw,if=none,id=d0"]
        for name in ("a", "b"):
            sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), "8M")
            sh("qemu-img", "snapshot", "-c", "disk-only", str(work / f"{name}.qcow2"))
        sh("qemu-img", "snapshot", "-c", "only-a", str(work / "a.qcow2"))
        return ["-drive", f"file={work / 'a.qcow2'},format=qcow2,if=none,id=da",
                "-blockdev", f"driver=file,filename={work / 'b.qcow2'},node-name=fb",
                "-blockdev", "driver=qcow2,file=fb,node-name=qb"]
    lines = ["info snapshots", "savevm s", "info snapshots", "loadvm s", "info status",
             "loadvm only-a", "cont", "loadvm disk-only", "info status", "delvm s",
             "info snapshots"]
    theirs, t_args, ours, o_args = _both(tmp_path, make)
    expected = _hmp_session(theirs, True, t_args, lines)
    assert _hmp_session(ours, False, o_args, lines) == expected


def _qmp_session(tmp: Path, qemu: bool, args: list[str],
                 steps: list[tuple[str, dict[str, object]]]) -> list[object]:
    seen: list[object] = []
    with running(args, tmp, qemu=qemu) as (_proc, client):
        for name, arguments in steps:
            reply = client.execute(name, arguments)
            # What came before the reply, apart (QEMU does the work before replying).
            before = [(e["event"], e.get("data")) for e in client.events]
            client.events.clear()
            if name.startswith("snapshot-"):
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    jobs = client.cmd("query-jobs")
                    if all(job["status"] == "concluded" for job in jobs):
                        break
                    time.sleep(0.02)
            seen.append((name, before, reply, [(e["event"], e.get("data")) for e in client.events]))
            client.events.clear()
    return seen


def test_qmp_snapshot_jobs_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """Replies, JOB_STATUS_CHANGE/STOP/RESUME in order, query-jobs (errors, progress)."""
    def make(work: Path) -> list[str]:
        for name in ("a", "b"):
            sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / f"{name}.qcow2"), "8M")
        return ["-blockdev", f"driver=file,filename={work / 'a.qcow2'},node-name=fa",
                "-blockdev", "driver=qcow2,file=fa,node-name=qa",
                "-drive", f"file={work / 'b.qcow2'},format=qcow2,if=none,id=d1,node-name=qb"]

    def job(kind: str, job_id: str, tag: str, devices: list[str], vmstate: str | None = "qa"
            ) -> tuple[str, dict[str, object]]:
        arguments: dict[str, object] = {"job-id": job_id, "tag": tag, "devices": devices}
        if kind != "snapshot-delete":
            arguments["vmstate"] = vmstate
        return kind, arguments

    steps = [job("snapshot-save", "j1", "t1", ["qa", "d1"]),
             job("snapshot-save", "j2", "t2", ["qa", "qb"]),
             job("snapshot-save", "j3", "t2", ["qa"]),
             ("query-jobs", {}), ("job-dismiss", {"id": "j1"}),
             ("human-monitor-command", {"command-line": "info snapshots"}),
             job("snapshot-load", "j4", "t2", ["qa", "qb"]),
             job("snapshot-delete", "j5", "t2", ["qb"]),
             job("snapshot-delete", "j6", "nope", ["qa"]),
             job("snapshot-load", "j7", "t2", ["qa", "qb"]),
             ("human-monitor-command", {"command-line": "info status"}),
             job("snapshot-save", "j8", "t9", ["qa"], "fa"),
             job("snapshot-save", "j9", "t9", []),
             job("snapshot-save", "j10", "t9", ["zz"]),
             job("snapshot-save", "j11", "t9", ["fa"]),
             job("snapshot-save", "j11", "t9", ["qa"]),
             ("query-jobs", {})]
    theirs, t_args, ours, o_args = _both(tmp_path, make)
    expected = _normal(_qmp_session(theirs, True, t_args, steps))
    actual = _normal(_qmp_session(ours, False, o_args, steps))
    assert actual == expected
    for name in ("a", "b"):
        assert "No errors were found on the image." in sh("qemu-img", "check", str(ours / f"{name}.qcow2"))


def test_loadvm_restores_the_data_and_minus_loadvm(tmp_path: Path, qemu_utils: None) -> None:
    """savevm, guest writes, loadvm: the guest reads the saved data (HMP qemu-io);
    -loadvm at start-up does the same; an unknown tag ends start-up with QEMU's text."""
    disk = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M")
    sh("qemu-io", "-c", "write -P 0x11 0 128k", str(disk))
    args = ["-drive", f"file={disk},format=qcow2,if=none,id=d0"]
    with running(args, tmp_path) as (proc, client):
        assert client.hmp("savevm keep") == ""
        client.hmp('qemu-io d0 "write -P 0x22 0 64k"')
        assert client.hmp("loadvm keep") == ""
        assert "Pattern verification failed" not in client.qemu_io('d0 "read -P 0x11 0 128k"')
        client.hmp('qemu-io d0 "write -P 0x33 64k 64k"')
        assert client.cmd("query-status")["status"] == "running"
        client.execute("quit")
        proc.wait(timeout=20)
    sh("qemu-io", "-r", "-c", "read -P 0x33 64k 64k", str(disk))
    with running([*args, "-loadvm", "keep"], tmp_path) as (_proc, client):
        assert "Pattern verification failed" not in client.qemu_io('d0 "read -P 0x11 0 128k"')
        assert client.cmd("query-status")["status"] == "running"
    assert "No errors were found on the image." in sh("qemu-img", "check", str(disk))
    result = subprocess.run([*SERVER, *args, "-loadvm", "nope"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.endswith(": Snapshot 'nope' does not exist in one or more devices\n")


def test_image_info_lists_snapshots_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """query-named-block-nodes: ImageInfo's ``snapshots`` (members in QEMU's order)."""
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M")
    sh("qemu-img", "snapshot", "-c", "one", str(base))
    sh("qemu-img", "snapshot", "-c", "two", str(base))
    lists = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        shutil.copy(base, work / "d.qcow2")
        args = ["-blockdev", f"driver=file,filename={work / 'd.qcow2'},node-name=f0",
                "-blockdev", "driver=qcow2,file=f0,node-name=q0"]
        with running(args, work, qemu=qemu) as (_proc, client):
            nodes = client.cmd("query-named-block-nodes", flat=True)
            image = next(n["image"] for n in nodes if n["node-name"] == "q0")
            lists.append(json.dumps(image["snapshots"]))
            assert "snapshots" not in next(n["image"] for n in nodes if n["node-name"] == "f0")
    assert lists[1] == lists[0]


def _savevm_image(work: Path, qemu: bool, base: Path) -> Path:
    work.mkdir()
    disk = work / "d.qcow2"
    shutil.copy(base, disk)
    with running(["-drive", f"file={disk},format=qcow2,if=none,id=d0"], work, qemu=qemu) as (
            proc, client):
        assert client.hmp("savevm x") == ""
        client.execute("quit")
        proc.wait(timeout=20)
    return disk


def test_savevm_image_matches_qemu_and_qemu_loads_ours(tmp_path: Path, qemu_system: str,
                                                       qemu_utils: None) -> None:
    """The image after savevm is QEMU's byte for byte (the VM state written past the disk,
    the L1 table grown for it, the snapshot, the active tree's VM state discarded) but
    for the clocks and dates; QEMU then loads our snapshot (HMP loadvm and -loadvm)."""
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    sh("qemu-io", "-c", "write -P 0x11 0 128k", str(base))
    theirs = _savevm_image(tmp_path / "qemu", True, base).read_bytes()
    ours_path = _savevm_image(tmp_path / "ours", False, base)
    ours = ours_path.read_bytes()
    assert len(ours) == len(theirs)
    table = int.from_bytes(theirs[64:72], "big")
    timer = theirs.index(b"\x05timer") + 14  # the section's 24 bytes of values
    allowed = set(range(table + 16, table + 32)) | set(range(timer, timer + 24))
    assert [hex(i) for i in range(len(ours)) if ours[i] != theirs[i] and i not in allowed] == []
    assert "No errors were found on the image." in sh("qemu-img", "check", str(ours_path))

    sh("qemu-io", "-c", "write -P 0x22 0 64k", str(ours_path))
    args = ["-drive", f"file={ours_path},format=qcow2,if=none,id=d0"]
    with running(args, tmp_path / "ours", "qemu", qemu=True) as (_proc, client):
        assert client.hmp("loadvm x") == ""
        assert client.hmp("info status") == "VM status: running\r\n"
        assert "Pattern verification failed" not in client.qemu_io('d0 "read -P 0x11 0 128k"')
    with running([*args, "-loadvm", "x"], tmp_path / "ours", "qemu2", qemu=True) as (_proc, client):
        assert client.hmp("info status") == "VM status: running\r\n"


def test_vm_state_is_qemus_stream(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """What QEMU 7.2 saves for -machine none, read back from its snapshot, is our
    stream but for the host tick count (cpu_ticks_offset)."""
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M")
    disk = _savevm_image(tmp_path / "qemu", True, base)
    drv = open_qcow2(disk)
    try:
        sn = drv.snapshot_list()[0]
        drv.snapshot_goto("x")
        data = drv.read_vmstate(sn.vm_state_size)
    finally:
        close_qcow2(drv)
    ticks = data.index(b"\x05timer") + 14
    ours = vm_state_stream("none", "running", sn.vm_clock_nsec)
    assert ours[:ticks] + ours[ticks + 8:] == data[:ticks] + data[ticks + 8:]


def test_vm_clock_stands_still_under_qtest(tmp_path: Path, qemu_utils: None) -> None:
    """-accel qtest (QEMU's iotests): the virtual clock moves only on qtest's command, so
    a snapshot's VM CLOCK is 00:00:00.000 (iotest 267's expected output; the QEMU 7.2 here
    is built without the qtest accelerator, so this is not compared live). Under tcg it
    runs while the VM runs."""
    clocks = []
    for accel in ("qtest", "tcg"):
        work = tmp_path / accel
        work.mkdir()
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / "d.qcow2"), "8M")
        args = ["-accel", accel, "-drive", f"file={work / 'd.qcow2'},format=qcow2,if=none,id=d0"]
        with running(args, work) as (_proc, client):
            time.sleep(0.05)
            client.hmp("savevm a")
            match = re.search(r" (\d\d:\d\d:\d\d\.\d{3}) ", client.hmp("info snapshots"))
            assert match is not None
            clocks.append(match.group(1))
    assert clocks[0] == "00:00:00.000"
    assert clocks[1] >= "00:00:00.050"


def test_refcount_bits_1_refuses_snapshots_without_harm(tmp_path: Path, qemu_system: str,
                                                         qemu_utils: None) -> None:
    """An image whose refcounts cannot count two references: savevm fails with QEMU's
    text, the image is not marked corrupt and keeps its data (QEMU also leaks the L1
    copy it allocated first; we allocate nothing)."""
    texts = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        disk = work / "d.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", str(disk), "8M")
        sh("qemu-io", "-c", "write -P 1 0 64k", str(disk))
        with running(["-drive", f"file={disk},format=qcow2,if=none,id=d0"], work, qemu=qemu) as (
                proc, client):
            texts.append([client.hmp(line) for line in ("savevm x", "info snapshots", "info status")])
            client.execute("quit")
            proc.wait(timeout=20)
        sh("qemu-io", "-r", "-c", "read -P 1 0 64k", str(disk))
    assert texts[1] == texts[0]
    check = subprocess.run(["qemu-img", "check", str(tmp_path / "ours" / "d.qcow2")],
                           capture_output=True, text=True, check=False)
    assert "corrupt" not in check.stdout + check.stderr
    assert check.returncode in (0, 3)  # at most leaks (the VM state written first, as QEMU)


def test_prelaunch_and_dirty_bitmaps_as_qemu(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """-S: savevm/loadvm leave prelaunch alone (no STOP/RESUME); a node with a dirty
    bitmap refuses loadvm (bdrv_snapshot_goto) and the VM stays paused (restore-vm)."""
    def make(work: Path) -> list[str]:
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / "d.qcow2"), "8M")
        return ["-S", "-drive", f"file={work / 'd.qcow2'},format=qcow2,if=none,id=d0,node-name=n0"]
    lines: list[str | tuple[str, dict[str, object]]] = [
        "savevm a", "info status", "loadvm a", "info status", "cont", "savevm b",
        ("block-dirty-bitmap-add", {"node": "n0", "name": "bm"}), "loadvm a", "info status",
        "delvm a", "info snapshots"]
    theirs, t_args, ours, o_args = _both(tmp_path, make)
    expected = _hmp_session(theirs, True, t_args, lines)
    assert _hmp_session(ours, False, o_args, lines) == expected


@pytest.mark.parametrize("step", ["create", "apply", "delete", "savevm"])
def test_power_loss_during_snapshot_operations(tmp_path: Path, tools: None, step: str) -> None:
    """At every fdatasync of a snapshot operation, a power loss keeping all, none, or only
    the header among the volatile writes leaves an image whose snapshots all hold their
    data: every snapshot the table lists applies (qemu-img snapshot -a) and reads back
    what it had. qemu-img check finds leaks at worst, plus OFLAG_COPIED flags that lag
    behind a refcount (QEMU's order gives the same windows: refcounts, then L2 tables,
    then the L1 table, the snapshot table last; such a flag only costs a copy or a leak).
    The watcher's ordering rules (nothing points at a cluster before its refcount and
    contents are durable) all hold."""
    from test_durability import PowerLossDisk  # the power-loss model of the data path

    from blocklayer.graph import BlockGraph

    image = tmp_path / "d.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(image), "4M")
    sh("qemu-io", "-c", "write -P 1 0 256k", "-c", "write -P 2 1M 64k", str(image))
    if step in ("apply", "delete"):
        sh("qemu-img", "snapshot", "-c", "old", str(image))
        sh("qemu-io", "-c", "write -P 3 0 128k", str(image))
    candidates: list[bytes] = []
    with pytest.MonkeyPatch.context() as mp:
        disk = PowerLossDisk(image, mp)
        graph = BlockGraph()
        node = graph.open({"driver": "qcow2", "node-name": "d",
                           "file": {"driver": "file", "filename": str(image)}})
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)

        def crash(disk: PowerLossDisk) -> None:
            for keep in (lambda o, d: True, lambda o, d: False, lambda o, d: o == 0):
                candidates.append(bytes(disk.crash_image(keep)))

        disk.on_sync = crash
        try:
            if step == "create":
                drv.snapshot_create("new", date_sec=1, date_nsec=0, vm_clock_nsec=0, icount=NO_ICOUNT)
            elif step == "apply":
                drv.snapshot_goto("old")
            elif step == "delete":
                drv.snapshot_delete(None, "old")
            else:
                drv.save_vmstate(vm_state_stream("none", "running", 0))
                drv.snapshot_create("new", date_sec=1, date_nsec=0, vm_clock_nsec=0,
                                    icount=NO_ICOUNT, vm_state_size=765)
            graph.inactivate(node)
        finally:
            graph.close_all()
            disk.close()
    assert disk.violations == []
    assert len(candidates) >= 6
    crashed = tmp_path / "crashed.qcow2"
    for n, data in enumerate(candidates):
        crashed.write_bytes(data)
        check = subprocess.run(["qemu-img", "check", str(crashed)], capture_output=True,
                               text=True, check=False)
        errors = [line for line in (check.stdout + check.stderr).splitlines()
                  if line.startswith("ERROR") and not line.startswith("ERROR OFLAG_COPIED")]
        assert errors == [], (n, errors)
        listing = sh("qemu-img", "snapshot", "-l", str(crashed))
        for name in ("new", "old"):
            if re.search(rf"^\S+ +{name} ", listing, re.M):
                sh("qemu-img", "snapshot", "-a", name, str(crashed))
                sh("qemu-io", "-r", "-c", "read -P 1 0 256k", "-c", "read -P 2 1M 64k", str(crashed))
                crashed.write_bytes(data)
    assert "No errors were found on the image." in sh("qemu-img", "check", str(image))


# Inactive nodes (issue 11 and 10) -------------------------------------------------------


def _hmp_step(line: str) -> tuple[str, dict[str, object]]:
    return "human-monitor-command", {"command-line": line}


def test_inactive_nodes_refuse_snapshots_as_qemu(tmp_path: Path, qemu_system: str,
                                                 qemu_utils: None) -> None:
    """A destination before its migration (-incoming defer): its nodes are inactive, and
    QEMU 7.2 (bdrv_can_snapshot asks bdrv_is_writable, which an inactive node is not)
    refuses savevm, loadvm, delvm, the snapshot-* jobs and lists nothing, with "Device
    'disk0' is writable but does not support snapshots"; the image keeps its snapshot."""
    def make(work: Path) -> list[str]:
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "8M")
        sh("qemu-img", "snapshot", "-c", "old", str(work / "a.qcow2"))
        return ["-incoming", "defer",
                "-blockdev", f"driver=file,filename={work / 'a.qcow2'},node-name=f0",
                "-blockdev", "driver=qcow2,file=f0,node-name=disk0"]

    def job(kind: str, job_id: str, tag: str) -> tuple[str, dict[str, object]]:
        arguments: dict[str, object] = {"job-id": job_id, "tag": tag, "devices": ["disk0"]}
        if kind != "snapshot-delete":
            arguments["vmstate"] = "disk0"
        return kind, arguments

    steps = [_hmp_step("savevm s1"), _hmp_step("info snapshots"), _hmp_step("loadvm old"),
             _hmp_step("delvm old"), _hmp_step("info status"),
             job("snapshot-save", "j1", "t"), job("snapshot-load", "j2", "old"),
             job("snapshot-delete", "j3", "old"), ("query-jobs", {}), ("query-migrate", {})]
    theirs, t_args, ours, o_args = _both(tmp_path, make)
    expected = _qmp_session(theirs, True, t_args, steps)
    assert _qmp_session(ours, False, o_args, steps) == expected
    assert expected[0][2] == {"return": "Error: Device 'disk0' is writable but does not "
                                        "support snapshots\r\n"}
    listed = sh("qemu-img", "snapshot", "-l", str(ours / "a.qcow2"))
    assert re.search(r"^1 +old ", listed, re.M) and "s1" not in listed and " t " not in listed
    assert "No errors were found on the image." in sh("qemu-img", "check", str(ours / "a.qcow2"))


def _after_migration(work: Path, qemu: bool) -> list[tuple[str, str]]:
    """A source after its migration completed (postmigrate, nodes inactive): the HMP
    snapshot commands' texts, and the destination's savevm (it runs, active)."""
    from migration_support import blockdev, qemu_img_create, start_server

    image = work / "a.qcow2"
    qemu_img_create(image, "8M")
    src = start_server(blockdev(image), work, "src", qemu=qemu)
    dst = start_server(["-incoming", "defer", *blockdev(image)], work, "dst", qemu=qemu)
    seen: list[tuple[str, str]] = []
    try:
        seen.append(("savevm s0", src.hmp("savevm s0")))
        uri = f"unix:{work / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        deadline = time.monotonic() + 20
        while src.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while dst.status() != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for line in ("info status", "savevm s1", "info snapshots", "loadvm s0", "delvm s0",
                     "info status"):
            seen.append((line, src.hmp(line)))
        seen.append(("dst savevm s2", dst.hmp("savevm s2")))
    finally:
        src.close()
        dst.close()
    return seen


def test_a_source_after_migration_refuses_snapshots_as_qemu(tmp_path: Path, qemu_system: str,
                                                            qemu_utils: None) -> None:
    theirs, ours = tmp_path / "qemu", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    expected = _after_migration(theirs, True)
    assert _after_migration(ours, False) == expected
    assert ("savevm s1", "Error: Device 'disk0' is writable but does not support snapshots\r\n") \
        in expected
    listed = sh("qemu-img", "snapshot", "-l", "-U", str(ours / "a.qcow2"))
    assert " s0 " in listed and " s2 " in listed and " s1 " not in listed


# savevm is a migration into the image (qemu_savevm_state) --------------------------------


def _without_7_2_only(value: object) -> object:
    """QEMU 7.2's answers without what we leave out by design (docs/migration.md: the
    RAM stats' legacy ``skipped`` and MIGRATION_PASS, as QEMU 10.x)."""
    if isinstance(value, dict):
        return {k: _without_7_2_only(v) for k, v in value.items() if k != "skipped"}
    if isinstance(value, list):
        return [_without_7_2_only(v) for v in value if v != "MIGRATION_PASS"]
    return value


def _savevm_migration_session(work: Path, qemu: bool) -> list[object]:
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(work / "a.qcow2"), "8M")
    args = ["-blockdev", f"driver=file,filename={work / 'a.qcow2'},node-name=f0",
            "-blockdev", "driver=qcow2,file=f0,node-name=disk0"]
    steps: list[tuple[str, dict[str, object]]] = [
        ("query-migrate", {}),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}),
        _hmp_step("savevm s1"), ("query-migrate", {}), _hmp_step("loadvm s1"),
        ("query-migrate", {}), _hmp_step("savevm s2"), _hmp_step("savevm"),
        # A failed migration (its events and text are another test's: not compared).
        ("query-migrate", {}), ("migrate", {"uri": "exec:false"}), ("wait-migration", {}),
        _hmp_step("savevm s3"), ("query-migrate", {}),
        ("snapshot-save", {"job-id": "j", "tag": "t", "vmstate": "disk0", "devices": ["disk0"]}),
        ("wait", {}), ("query-migrate", {})]
    seen: list[object] = []
    with running(args, work, qemu=qemu) as (_proc, client):
        for name, arguments in steps:
            if name.startswith("wait"):
                # The failed migration, or the job: until it is over.
                deadline = time.monotonic() + 20
                while (client.cmd("query-migrate").get("status") not in ("failed", "completed")
                       or any(j["status"] != "concluded" for j in client.cmd("query-jobs"))):
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                reply: object = None
            else:
                reply = client.execute(name, arguments)
            if name in ("migrate", "wait-migration"):
                if name == "wait-migration":
                    # QEMU reactivates its nodes in a bottom half after the status turned
                    # 'failed' (migrate_fd_cleanup); a savevm before that meets an
                    # inactive disk ("is writable but does not support snapshots").
                    time.sleep(0.3)
                client.events.clear()
                continue
            events = [e["event"] if e["event"] != "MIGRATION" else ("MIGRATION", e["data"])
                      for e in client.events if e["event"] != "JOB_STATUS_CHANGE"]
            client.events.clear()
            seen.append((name, arguments, reply, events))
    return seen


def test_savevm_leaves_a_completed_migration_as_qemu(tmp_path: Path, qemu_system: str,
                                                     qemu_utils: None) -> None:
    """query-migrate after a savevm (HMP or snapshot-save) shows the migration QEMU ran
    into the image: completed, every time 0, 8 bytes; MIGRATION setup and completed with
    the events capability; a failed migration before it is forgotten (migrate_init)."""
    theirs, ours = tmp_path / "qemu", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    expected = _without_7_2_only(_normal(_savevm_migration_session(theirs, True)))
    actual = _normal(_savevm_migration_session(ours, False))
    assert actual == expected
    completed = [step for step in actual if isinstance(step, list) and step[0] == "query-migrate"]
    assert completed[1][2]["return"]["status"] == "completed"  # type: ignore[index]


def test_savevm_is_refused_while_a_migration_runs(tmp_path: Path, qemu_utils: None) -> None:
    """qemu_savevm_state refuses to start while a migration runs (QERR_MIGRATION_ACTIVE,
    after the VM was stopped for the save: STOP, then RESUME); the migration goes on and
    completes. Our migrations take milliseconds, so the test hook holds this one in
    ``active`` (a QEMU without guest RAM cannot be held there to compare)."""
    from migration_support import Server, blockdev, qemu_img_create, start_server

    image = tmp_path / "a.qcow2"
    qemu_img_create(image, "8M")
    src = Server("src", blockdev(image), tmp_path, delays="active=2")
    dst = start_server(["-incoming", "defer", *blockdev(image)], tmp_path, "dst")
    try:
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        deadline = time.monotonic() + 20
        while src.cmd("query-migrate")["status"] != "active":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        src.client.events.clear()
        assert src.hmp("savevm s1") == "Error: There's a migration process in progress\r\n"
        assert [e["event"] for e in src.client.events] == ["STOP", "RESUME"]
        assert src.cmd("query-migrate")["status"] == "active"
        while src.cmd("query-migrate")["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        src.close()
        dst.close()
    assert "s1" not in sh("qemu-img", "snapshot", "-l", "-U", str(image))
