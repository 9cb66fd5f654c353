"""Internal snapshots (issue 11 §2): qcow2 snapshot tables, savevm/loadvm/delvm, the jobs.

The qcow2 tests do the same steps with QEMU 7.2's tools (``qemu-img snapshot -c/-a/-d``,
``qemu-io`` writes) on one copy of an image and with our driver on another, and compare
the files byte for byte after every step (our snapshots are given the date qemu-img
wrote, the only field that cannot match by itself); ``qemu-img check`` must find both
clean and ``qemu-img snapshot -l`` must list ours. The monitor tests compare HMP text,
QMP replies and events with QEMU 7.2 run with the same command line.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from qcow2_support import close_qcow2, open_qcow2
from qemu_tools import require

from blocklayer.qcow2 import Qcow2Driver
from blocklayer.qcow2.snapshot import NO_ICOUNT, read_snapshots

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


def test_writes_after_a_snapshot_leave_it_alone(tmp_path: Path, tools: None) -> None:
    """Copy-on-write: every kind of guest write after our snapshot; qemu-img then applies
    the snapshot and qemu-io reads the old data back."""
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
    _ours(o, steps)
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
