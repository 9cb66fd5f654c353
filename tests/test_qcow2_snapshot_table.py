"""Hostile internal snapshot tables: what QEMU 7.2 refuses at open, and the overlap
checks that keep writes off the snapshot table and the snapshots' L1 tables.

Each image is made with ``qemu-img create`` and ``qemu-img snapshot -c``, then patched.
QEMU answers on a copy of the same file (``qemu-io``, ``qemu-system`` over QMP); the
texts, the corrupt bit and the resulting bytes are compared with ours.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_support import close_qcow2, open_qcow2, poke, qemu_img_create, qemu_io, read_u64, run
from qemu_tools import require
from server_support import QEMU, SERVER, running

from blocklayer.errors import BlockError
from blocklayer.qcow2.errors import CorruptionReport

MiB = 1 << 20
CLUSTER = 65536
#: Header fields: nb_snapshots (u32) at 60, snapshots_offset (u64) at 64.
NB_SNAPSHOTS = 60
SNAPSHOTS_OFFSET = 64
#: Fields of a snapshot table entry: l1_table_offset (u64), l1_size (u32), ...,
#: extra_data_size (u32) at 36.
SN_L1_SIZE = 8
SN_EXTRA = 36


def _eof_cluster(path: Path) -> int:
    """Where the next cluster allocation goes (the file's end, rounded up)."""
    return (path.stat().st_size + CLUSTER - 1) & ~(CLUSTER - 1)


def _host_offset(path: Path, guest: int) -> int:
    for ext in json.loads(run("qemu-img", "map", "--output=json", str(path)).stdout):
        if ext["start"] <= guest < ext["start"] + ext["length"] and "offset" in ext:
            return int(ext["offset"]) + guest - int(ext["start"])
    raise AssertionError(f"{guest} is not allocated in {path}")


def _image(path: Path) -> Path:
    """4 MiB, data at 0, snapshot s1, then data at 2M written after it (COPIED)."""
    qemu_img_create(path, 4 * MiB)
    qemu_io(path, "write -P 0x11 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", str(path))
    qemu_io(path, "write -P 0x12 2M 64k")
    return path


def _entry(path: Path) -> int:
    return read_u64(path, SNAPSHOTS_OFFSET)


# -- open: qcow2_read_snapshots ---------------------------------------------------------

def _extra_data_huge(path: Path) -> None:
    poke(path, _entry(path) + SN_EXTRA, struct.pack(">I", 0xFFFFFFFF))


def _extra_data_1025_second_entry(path: Path) -> None:
    run("qemu-img", "snapshot", "-c", "s2", str(path))
    table = _entry(path)
    with open(path, "rb") as f:
        f.seek(table)
        head = f.read(40)
    extra, = struct.unpack_from(">I", head, SN_EXTRA)
    id_len, name_len = struct.unpack_from(">HH", head, 12)
    second = (table + 40 + extra + id_len + name_len + 7) & ~7
    poke(path, second + SN_EXTRA, struct.pack(">I", 1025))


def _table_too_big(path: Path) -> None:
    # 600 entries of 40 + 0 + 65535 + 65535 bytes (sparse, past the end of the file):
    # the 512th passes QCOW_MAX_SNAPSHOTS_SIZE (64 MiB).
    table = _eof_cluster(path)
    entry = struct.pack(">QIHHIIQII", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0)
    with open(path, "r+b") as f:
        for i in range(600):
            f.seek(table + i * ((40 + 2 * 0xFFFF + 7) & ~7))
            f.write(entry)
    poke(path, NB_SNAPSHOTS, struct.pack(">IQ", 600, table))


OPEN_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "extra-data-0xffffffff": (_extra_data_huge,
                              "Too much extra metadata in snapshot table entry 0\n"
                              "You can force-remove this extra metadata with qemu-img check "
                              "-r all"),
    "extra-data-1025-entry-1": (_extra_data_1025_second_entry,
                                "Too much extra metadata in snapshot table entry 1\n"
                                "You can force-remove this extra metadata with qemu-img "
                                "check -r all"),
    "table-too-big": (_table_too_big,
                      "Snapshot table is too big\n"
                      "You can force-remove all 89 overhanging snapshots with qemu-img check "
                      "-r all"),
}


def _qemu_io_open_error(path: Path, read_only: bool) -> str:
    """qemu-io's "can't open device" text and the hint lines after it."""
    proc = run("qemu-io", *(["-r"] if read_only else []), "-c", "read 0 512", str(path),
               check=False)
    prefix = f"qemu-io: can't open device {path}: "
    text = proc.stdout + proc.stderr
    return text[text.index(prefix) + len(prefix):].rstrip("\n") if prefix in text else ""


def _our_open_error(path: Path, read_only: bool) -> str:
    try:
        drv = open_qcow2(path, read_only=read_only)
    except BlockError as err:
        return "\n".join([err.message, *getattr(err, "__notes__", [])])
    close_qcow2(drv)
    return ""


@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_snapshot_table_refused_at_open(tmp_path: Path, case: str) -> None:
    """QEMU reads the whole table at open and refuses it with these texts (and hints)."""
    require("qemu-io")
    craft, text = OPEN_CASES[case]
    image = _image(tmp_path / "t.qcow2")
    craft(image)
    before = image.read_bytes()
    for read_only in (True, False):
        want = _qemu_io_open_error(image, read_only)
        assert want == text
        assert _our_open_error(image, read_only) == want
    assert image.read_bytes() == before


def test_snapshot_table_refusal_over_qmp_and_command_line(tmp_path: Path) -> None:
    """blockdev-add answers the text alone (QMP has no hints); -blockdev on the command
    line prints the hint line after it, as QEMU 7.2 does."""
    require("qemu-system-x86_64")
    image = _image(tmp_path / "t.qcow2")
    _extra_data_huge(image)
    node = {"driver": "qcow2", "node-name": "disk0",
            "file": {"driver": "file", "filename": str(image)}}
    replies = []
    for qemu in (False, True):
        with running([], tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
            replies.append(client.execute("blockdev-add", node))
    assert replies[0] == replies[1] == {"error": {
        "class": "GenericError", "desc": "Too much extra metadata in snapshot table entry 0"}}
    arg = f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}"
    printed = []
    for argv in (SERVER, QEMU):
        proc = subprocess.run([*argv, "-blockdev", arg], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1
        printed.append(proc.stderr.split(": ", 1)[1])
    assert printed[0] == printed[1] == (
        f"-blockdev {arg}: Too much extra metadata in snapshot table entry 0\n"
        "You can force-remove this extra metadata with qemu-img check -r all\n")


# -- writes: qcow2_check_metadata_overlap ----------------------------------------------

def _set_l1(offset: Callable[[Path], int], size: int | None = None) -> Callable[[Path], None]:
    def craft(path: Path) -> None:
        entry = _entry(path)
        poke(path, entry, struct.pack(">Q", offset(path)))
        if size is not None:
            poke(path, entry + SN_L1_SIZE, struct.pack(">I", size))
    return craft


def _set_l1_size(size: int) -> Callable[[Path], None]:
    return lambda path: poke(path, _entry(path) + SN_L1_SIZE, struct.pack(">I", size))


def _table_at(offset: Callable[[Path], int], count: int = 1) -> Callable[[Path], None]:
    return lambda path: poke(path, NB_SNAPSHOTS, struct.pack(">IQ", count, offset(path)))


INACTIVE_L1 = "Preventing invalid write on metadata (overlaps with inactive L1 table)"
SNAPSHOT_TABLE = "Preventing invalid write on metadata (overlaps with snapshot table)"

#: (craft, guest write, QEMU's corruption message or "" when the write succeeds)
WRITE_CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # (a) l1_size absurd: QEMU opens the image and protects the whole range it names.
    "l1-size-0xffffffff": (_set_l1_size(0xFFFFFFFF), "1M 64k", INACTIVE_L1),
    "l1-size-just-too-large": (_set_l1_size((32 << 20) // 8 + 1), "1M 64k", INACTIVE_L1),
    # (b) the snapshot's L1 table where the next allocation goes, or on a data cluster
    # that is written in place (aligned, and unaligned: whole clusters are compared).
    "l1-at-next-allocation": (_set_l1(_eof_cluster), "1M 64k", INACTIVE_L1),
    "l1-on-data-cluster": (_set_l1(lambda p: _host_offset(p, 2 * MiB), 1), "2M 4k",
                           INACTIVE_L1),
    "l1-inside-data-cluster": (_set_l1(lambda p: _host_offset(p, 2 * MiB) + 4096, 1),
                               "2M 4k", INACTIVE_L1),
    "l1-unaligned-elsewhere": (_set_l1(lambda p: _entry(p) + 512), "1M 64k", ""),
    # (d) the table where the next allocation goes, or far past the end (read as zeroes).
    "table-at-next-allocation": (_table_at(_eof_cluster), "1M 64k", SNAPSHOT_TABLE),
    "table-65536-at-next-allocation": (_table_at(_eof_cluster, 65536), "1M 64k",
                                       SNAPSHOT_TABLE),
    "table-far-past-eof": (_table_at(lambda p: 1 << 30, 65536), "1M 64k", ""),
    "table-over-active-l2": (_table_at(lambda p: read_u64(p, read_u64(p, 40)) & ~(1 << 63)), "1M 64k",
                             SNAPSHOT_TABLE),
}


def _our_write(path: Path, offset: int, length: int) -> tuple[str, list[CorruptionReport]]:
    reports: list[CorruptionReport] = []
    drv = open_qcow2(path)
    drv.corruption_listener = lambda _drv, report: reports.append(report)
    try:
        drv.write(offset, b"\x33" * length)
        drv.flush()
        result = "ok"
    except BlockError as err:
        result = f"{err.message} ({err.errno})"
    close_qcow2(drv)
    return result, reports


def _size(text: str) -> int:
    units = {"k": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


@pytest.mark.parametrize("case", sorted(WRITE_CASES))
def test_writes_never_land_on_snapshot_metadata(tmp_path: Path, case: str) -> None:
    """A write that would land on the snapshot table or a snapshot's L1 table marks the
    image corrupt and fails with EIO (QEMU's message and bytes); others go through."""
    require("qemu-io")
    craft, where, message = WRITE_CASES[case]
    ours = _image(tmp_path / "ours.qcow2")
    craft(ours)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    printed = qemu_io(theirs, f"write -P 0x33 {where}", check=False)
    offset, length = (_size(x) for x in where.split())
    result, reports = _our_write(ours, offset, length)
    if message:
        line = (f"qcow2: Marking image as corrupt: {message}; further corruption events "
                "will be suppressed")
        assert printed.splitlines() == ["write failed: Input/output error", line]
        assert result == f"{message} (5)"
        assert [r.stderr_line for r in reports] == [line + "\n"]
        assert read_u64(ours, 72) & 2  # the corrupt bit
    else:
        assert printed.startswith(f"wrote {length}/{length} bytes")
        assert result == "ok" and reports == []
    assert ours.read_bytes() == theirs.read_bytes()


def test_corruption_event_for_huge_snapshot_l1(tmp_path: Path) -> None:
    """End to end (blockdev-add, HMP qemu-io): QEMU's event, stderr line and replies."""
    require("qemu-system-x86_64")
    seen: dict[str, Any] = {}
    crafted = _image(tmp_path / "crafted.qcow2")
    _set_l1_size(0xFFFFFFFF)(crafted)
    for name in ("qemu", "ours"):
        image = tmp_path / f"{name}.qcow2"
        shutil.copy(crafted, image)
        with running([], tmp_path, name, qemu=name == "qemu") as (_, client):
            assert client.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "disk0",
                "file": {"driver": "file", "filename": str(image)}}) == {"return": {}}
            printed = client.qemu_io('disk0 "write -P 0x33 1M 64k"')
            event = client.wait_event("BLOCK_IMAGE_CORRUPTED", timeout=10)["data"]
            seen[name] = (printed, event, list(event), image.read_bytes())
    assert seen["ours"] == seen["qemu"]
    assert seen["ours"][1]["msg"] == INACTIVE_L1 and seen["ours"][1]["fatal"] is True


# -- a failed L2 allocation (l2_allocate's failure path) ----------------------------------

def _fresh_snapshot(path: Path) -> Path:
    """4 MiB, data at 0, snapshot s1: the next write copies the L2 table (COW)."""
    qemu_img_create(path, 4 * MiB)
    qemu_io(path, "write -P 0x11 0 64k")
    run("qemu-img", "snapshot", "-c", "s1", str(path))
    return path


def test_refused_l1_write_discards_the_new_l2_table(tmp_path: Path) -> None:
    """The snapshot table over the active L1: the copied L2 table is written, the L1
    entry pointing at it is refused (overlap), and the new cluster is freed and punched
    again, as QEMU does: the same bytes as QEMU leaves, the old L2 table in force."""
    require("qemu-io")
    ours = _fresh_snapshot(tmp_path / "ours.qcow2")
    _table_at(lambda p: read_u64(p, 40))(ours)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    printed = qemu_io(theirs, "write -P 0x33 1M 64k", check=False)
    assert SNAPSHOT_TABLE in printed
    result, reports = _our_write(ours, MiB, 64 * 1024)
    assert result == f"{SNAPSHOT_TABLE} (5)" and len(reports) == 1
    assert ours.read_bytes() == theirs.read_bytes()
    # The cluster the copy went to reads as zeroes again (punched).
    new_cluster = _eof_cluster(ours) - CLUSTER
    assert ours.read_bytes()[new_cluster:] == bytes(CLUSTER)


def test_cluster_refused_by_the_overlap_check_is_not_discarded(tmp_path: Path) -> None:
    """Wrong refcounts offer the snapshot table's cluster for a new L2 table; the overlap
    check refuses the write. QEMU 7.2 then frees the cluster with a discard and punches a
    hole in its own snapshot table. We deliberately do not: the table keeps its bytes,
    and the snapshot is still listed."""
    require("qemu-io")
    ours = _fresh_snapshot(tmp_path / "ours.qcow2")
    table = _entry(ours)
    refblock = read_u64(ours, read_u64(ours, 48))
    poke(ours, refblock + 2 * (table // CLUSTER), bytes(2))  # 16-bit refcount: 0
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    before = ours.read_bytes()
    assert SNAPSHOT_TABLE in qemu_io(theirs, "write -P 0x33 1M 64k", check=False)
    assert theirs.read_bytes()[table:table + 64] == bytes(64)  # QEMU's punched table
    result, _ = _our_write(ours, MiB, 64 * 1024)
    assert result == f"{SNAPSHOT_TABLE} (5)"
    # The same bytes as QEMU leaves (corrupt bit; the refcount of 1 that the allocation
    # wrote first, in both) but for the table's cluster, which keeps its bytes.
    after, qemus = ours.read_bytes(), theirs.read_bytes()
    start = table & ~(CLUSTER - 1)
    assert after[:start] + after[start + CLUSTER:] == qemus[:start] + qemus[start + CLUSTER:]
    assert after[start:start + CLUSTER] == before[start:start + CLUSTER]
    assert read_u64(ours, 72) == 2  # corrupt
    listed = run("qemu-img", "snapshot", "-l", "-U", str(ours)).stdout
    assert "s1" in listed
