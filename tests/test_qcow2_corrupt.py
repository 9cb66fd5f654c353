"""Hostile qcow2 images: the server refuses or fails requests like QEMU, never damages the
image further and never hangs.

Every crafted file is also given to real QEMU (qemu-system over QMP, qemu-io, qemu-img)
in the same test, and the texts, events and resulting bytes are compared.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_support import close_qcow2, open_qcow2, poke, qemu_check, qemu_img_create, qemu_io, read_u64, run
from qemu_tools import require
from server_support import Client, running

from blocklayer.errors import BlockError
from blocklayer.qcow2.errors import CorruptionReport

MiB = 1 << 20
CLUSTER = 65536


def _reftable_past_eof(path: Path) -> None:
    poke(path, 48, struct.pack(">Q", 1 << 30))


def _first_reftable_entry_zero(path: Path) -> None:
    poke(path, read_u64(path, 48), bytes(8))


# The two images of the report, with what QEMU 7.2 says about a write to them.
REPORTED = {
    "reftable-past-eof": (_reftable_past_eof,
                          "Preventing invalid allocation of L2 table at offset 0"),
    "reftable-entry-zero": (_first_reftable_entry_zero,
                            "Preventing invalid write on metadata (overlaps with refcount table)"),
}


def _blockdev(path: Path) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": "disk0",
            "file": {"driver": "file", "filename": str(path)}}


def _session(tmp_path: Path, image: Path, *, qemu: bool) -> dict[str, Any]:
    """Add the image, write to it while a second client queries, then reopen it."""
    out: dict[str, Any] = {}
    name = "qemu" if qemu else "ours"
    second = tmp_path / f"{name}-2.sock"  # one client per monitor socket, as in QEMU
    with running(["-qmp", f"unix:{second},server=on,wait=off"], tmp_path, name=name,
                 qemu=qemu) as (proc, client):
        assert client.execute("blockdev-add", _blockdev(image)) == {"return": {}}
        other = Client(second, timeout=10)
        assert other.execute("qmp_capabilities") == {"return": {}}
        client.send_raw(json.dumps({"execute": "human-monitor-command", "arguments": {
            "command-line": 'qemu-io disk0 "write -P 0x22 64k 128k"'}}))
        # Another client is answered while (or after) the write runs: nothing hangs.
        # (QEMU answers "Block device disk0 is ejected" once the corruption is caught.)
        reply = other.execute("query-named-block-nodes")
        assert "return" in reply or "ejected" in reply["error"]["desc"]
        out["write"] = client.reply()["return"]
        out["event"] = client.wait_event("BLOCK_IMAGE_CORRUPTED", timeout=10)["data"]
        out["read"] = client.qemu_io('disk0 "read 0 4k"')
        # The node has no driver any more (bs->drv = NULL): node queries fail.
        out["nodes"] = [client.execute("query-named-block-nodes", {"flat": flat})
                        for flat in (False, True)]
        out["info-block"] = client.hmp("info block -n")
        out["info"] = run("qemu-img", "info", "-U", "--output=json", str(image)).stdout
        assert client.execute("blockdev-del", {"node-name": "disk0"}) == {"return": {}}
        out["reopen"] = client.execute("blockdev-add", _blockdev(image))
        other.close()
        client.execute("quit")
        proc.wait(timeout=10)
        assert client.output is not None
        out["stdout"] = client.output.all()
    return out


@pytest.mark.parametrize("case", sorted(REPORTED))
def test_reported_images_end_to_end(tmp_path: Path, case: str) -> None:
    require("qemu-system-x86_64")
    craft, message = REPORTED[case]
    ours = tmp_path / "ours.qcow2"
    qemu_img_create(ours, MiB)
    craft(ours)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    header = ours.read_bytes()[:72]

    got = _session(tmp_path, ours, qemu=False)
    want = _session(tmp_path, theirs, qemu=True)

    assert got["event"] == want["event"]
    assert want["event"]["msg"] == message and want["event"]["fatal"] is True
    assert list(got["event"]) == list(want["event"])  # QEMU 7.2's key order
    line = f"qcow2: Marking image as corrupt: {message}; further corruption events will be suppressed"
    assert line in got["stdout"] and line in want["stdout"]
    assert got["nodes"] == want["nodes"]
    assert want["nodes"][0]["error"]["desc"] == "Block device disk0 is ejected"
    assert got["info-block"] == want["info-block"] == ""
    for side in (got, want):
        assert "write failed: Input/output error" in side["write"] + side["stdout"]
        assert "read failed: No medium found" in side["read"] + side["stdout"]
        assert json.loads(side["info"])["format-specific"]["data"]["corrupt"] is True
        assert side["reopen"]["error"]["desc"] == \
            "qcow2: Image is corrupt; cannot be opened read/write"
    # Same bytes as QEMU leaves: the header intact but for the corrupt bit.
    data = ours.read_bytes()
    assert data == theirs.read_bytes()
    assert data[:72] == header
    assert read_u64(ours, 72) & 2
    # Read-only still works, as in QEMU.
    assert "read 4096/4096 bytes" in qemu_io(ours, "read 0 4k", read_only=True)


def test_read_only_corruption_is_not_fatal(tmp_path: Path) -> None:
    """A read-only node reports once (fatal: false), fails the read, stays usable."""
    image = tmp_path / "ro.qcow2"
    qemu_img_create(image, MiB)
    qemu_io(image, "write -P 1 0 64k")
    l1 = read_u64(image, 40)
    poke(image, l1, struct.pack(">Q", read_u64(image, l1) + 512))
    before = image.read_bytes()
    qemu_out = qemu_io(image, "read 0 4k", "read 0 4k", read_only=True, check=False)
    assert qemu_out.count("read failed: Input/output error") == 2
    qemu_line = qemu_out.splitlines()[-1]
    reports: list[CorruptionReport] = []
    drv = open_qcow2(image, read_only=True)
    drv.corruption_listener = lambda _drv, report: reports.append(report)
    for _ in range(2):
        with pytest.raises(BlockError) as err:
            drv.read(0, 4096)
        assert err.value.errno == 5
    close_qcow2(drv)
    assert len(reports) == 1 and not reports[0].fatal
    assert reports[0].stderr_line.rstrip("\n") == qemu_line
    assert image.read_bytes() == before


def _qemu_open_error(path: Path, read_only: bool) -> str:
    proc = run("qemu-io", *(["-r"] if read_only else []), "-c", "read 0 512", str(path),
               check=False)
    prefix = f"qemu-io: can't open device {path}: "
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(prefix)]
    return lines[0][len(prefix):] if lines else ""


def _our_open_error(path: Path, read_only: bool) -> str:
    try:
        drv = open_qcow2(path, read_only=read_only)
    except BlockError as err:
        return err.message
    close_qcow2(drv)
    return ""


NEAR_END = (1 << 63) - (1 << 30)

OPEN_CASES: dict[str, tuple[int, bytes]] = {
    "l1-offset-near-2^63": (40, struct.pack(">Q", NEAR_END)),
    "l1-offset-unaligned": (40, struct.pack(">Q", 3 * CLUSTER + 8)),
    "l1-too-large": (36, struct.pack(">I", (32 << 20) // 8 + 1)),
    "l1-too-small": (36, struct.pack(">I", 0)),
    "reftable-near-2^63": (48, struct.pack(">Q", NEAR_END)),
    "reftable-offset-invalid": (48, struct.pack(">Q", (1 << 63) - CLUSTER)),
    "reftable-unaligned": (48, struct.pack(">Q", CLUSTER + 512)),
    "reftable-too-large": (56, struct.pack(">I", (8 << 20) // CLUSTER + 1)),
    "no-reftable": (56, struct.pack(">I", 0)),
    "snapshot-table-near-2^63": (60, struct.pack(">IQ", 1, NEAR_END)),
    "snapshot-table-unaligned": (60, struct.pack(">IQ", 1, 513)),
    "too-many-snapshots": (60, struct.pack(">I", 70000)),
    "image-too-big": (24, struct.pack(">Q", 1 << 62)),
    "corrupt-bit": (72, struct.pack(">Q", 2)),
}


@pytest.mark.parametrize("case", sorted(OPEN_CASES))
def test_open_refusals_match_qemu(tmp_path: Path, case: str) -> None:
    require("qemu-io")
    image = tmp_path / "t.qcow2"
    qemu_img_create(image, MiB)
    qemu_io(image, "write -P 7 0 64k")
    poke(image, *OPEN_CASES[case])
    before = image.read_bytes()
    for read_only in (True, False):
        want = _qemu_open_error(image, read_only)
        if case == "corrupt-bit" and read_only:
            assert want == ""
        else:
            assert want, f"QEMU opened {case}"
        assert _our_open_error(image, read_only) == want
    assert image.read_bytes() == before


# -- property: random damage to real images ----------------------------------------------

SHAPES = ("fresh", "data", "snapshot", "bitmap", "compressed")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require("qemu-img")
    base = tmp_path_factory.mktemp("shapes")
    made: dict[str, Path] = {}
    for shape in SHAPES:
        path = base / f"{shape}.qcow2"
        qemu_img_create(path, 4 * MiB)
        if shape != "fresh":
            qemu_io(path, "write -P 0x11 0 96k", "write -P 0x12 1M 64k")
        if shape == "snapshot":
            run("qemu-img", "snapshot", "-c", "s1", str(path))
            qemu_io(path, "write -P 0x13 32k 64k")
        if shape == "bitmap":
            # A persistent bitmap with a stored table: the bitmaps extension, its
            # directory and table are metadata too.
            run("qemu-img", "bitmap", "--add", str(path), "b0")
            qemu_io(path, "write -P 0x15 2M 64k")
        if shape == "compressed":
            qemu_io(path, "write -c -P 0x14 2M 64k")
        made[shape] = path
    return made


def _targets(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of fields worth damaging: header fields, header extensions, table
    entries (L1, L2 incl. a compressed one, refcount table and block), snapshot entries
    and their L1 tables, the bitmap directory and bitmap tables."""
    fields = [(24, 8), (36, 4), (40, 8), (48, 8), (56, 4), (60, 4), (64, 8), (72, 8), (80, 8),
              (88, 8), (96, 4), (100, 4)]

    def u(fmt: str, offset: int) -> int:
        if offset < 0 or offset + struct.calcsize(fmt) > len(data):
            return 0
        value: int = struct.unpack_from(fmt, data, offset)[0]
        return value

    l1 = u(">Q", 40)
    rt = u(">Q", 48)
    fields += [(l1, 8), (l1 + 8, 8), (rt, 8), (rt + 8, 8)]
    block = u(">Q", rt) & ~0x1FF
    if 0 < block < len(data):
        fields += [(block + 2 * i, 2) for i in range(8)]
    l2 = u(">Q", l1) & 0x00FFFFFFFFFFFE00
    if 0 < l2 < len(data):
        # Entries 0-2 and the one mapping 2 MiB (compressed or bitmap-covered data).
        fields += [(l2 + 8 * i, 8) for i in (0, 1, 2, 32)]
    # Header extensions (bounded: a damaged length must not make this loop long).
    ext = u(">I", 100) or 72
    for _ in range(8):
        kind, length = u(">I", ext), u(">I", ext + 4)
        if kind == 0 or ext + 8 + length > min(len(data), CLUSTER):
            break
        fields += [(ext, 4), (ext + 4, 4)]
        if kind == 0x23852875:  # bitmaps: nb_bitmaps, directory size and offset
            fields += [(ext + 8, 4), (ext + 16, 8), (ext + 24, 8)]
            directory = u(">Q", ext + 24)
            if 0 < directory < len(data):
                fields += [(directory, 8), (directory + 8, 4), (directory + 12, 4),
                           (directory + 16, 1), (directory + 17, 1), (directory + 18, 2),
                           (directory + 20, 4)]
                table = u(">Q", directory)
                if 0 < table < len(data):
                    fields += [(table, 8)]
        ext += 8 + ((length + 7) & ~7)
    # The first snapshot entry (L1 offset and size, name/id sizes, VM state and extra
    # data sizes) and its L1 table.
    if u(">I", 60):
        entry = u(">Q", 64)
        if 0 < entry < len(data):
            fields += [(entry, 8), (entry + 8, 4), (entry + 12, 2), (entry + 14, 2),
                       (entry + 32, 4), (entry + 36, 4)]
            snap_l1 = u(">Q", entry)
            if 0 < snap_l1 < len(data):
                fields += [(snap_l1, 8)]
    return [(offset, width) for offset, width in fields if 0 <= offset]


VALUES = st.one_of(
    st.sampled_from([0, 1, 512, CLUSTER, 2 * CLUSTER, 3 * CLUSTER, 4 * CLUSTER, 5 * CLUSTER,
                     1 << 30, 1 << 62, NEAR_END, (1 << 63) | CLUSTER, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise _Hang


def _with_deadline(seconds: float, fn: Callable[[], None]) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _check_counts(path: Path) -> tuple[int, int]:
    code, result = qemu_check(path)
    if "filename" not in result:
        return 1 << 30, code  # qemu-img could not even check it
    return result.get("corruptions", 0), code


@pytest.fixture()
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("damaged") / "img.qcow2"


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(shape=st.sampled_from(SHAPES), picks=st.lists(st.tuples(st.integers(0, 1000), VALUES),
                                                    min_size=1, max_size=3))
def test_damaged_images_never_get_worse(shapes: dict[str, Path], scratch: Path, shape: str,
                                        picks: list[tuple[int, int]]) -> None:
    data = bytearray(shapes[shape].read_bytes())
    targets = _targets(bytes(data))
    for index, value in picks:
        offset, width = targets[index % len(targets)]
        if offset + width <= len(data):
            data[offset:offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    scratch.write_bytes(bytes(data))
    corrupt_before, _ = _check_counts(scratch)
    outcome: dict[str, Any] = {}

    def exercise() -> None:
        try:
            drv = open_qcow2(scratch, with_backing=False)
        except BlockError:
            outcome["open"] = False
            return
        try:
            drv.write(64 * 1024, b"\x22" * (128 * 1024))
            drv.write(3 * MiB, b"\x23" * 4096)
            assert drv.read(64 * 1024, 128 * 1024) == b"\x22" * (128 * 1024)
            drv.flush()
            outcome["write"] = True
        except BlockError:
            outcome["write"] = False
        finally:
            close_qcow2(drv)

    _with_deadline(20, exercise)
    with open(scratch, "rb") as f:  # the file may now be large and sparse: only its head
        after = f.read(4096)
    # The fields that locate everything are never rewritten (the reported damage was a
    # refcount block written over cluster 0).
    assert after[:8] == data[:8] and after[20:48] == data[20:48]
    corrupt_after, _ = _check_counts(scratch)
    if outcome.get("write"):
        # A write that QEMU also lets through an already damaged image may add to the
        # damage in QEMU too (e.g. 512 snapshots over the header: 519 -> 520 errors with
        # qemu-io), so the strict comparison is for images that were clean.
        if corrupt_before == 0:
            assert corrupt_after == 0
            out = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x22 64k 128k",
                                  str(scratch)], capture_output=True, text=True).stdout
            assert "Pattern verification failed" not in out and "read 131072" in out
    elif outcome.get("open", True):
        # A refused write leaves nothing worse behind than what was there, apart from
        # the corrupt bit (which, when a table overlaps the header, qemu-img check may
        # count as well: it is put back for the comparison).
        poke(scratch, 72, bytes(data[72:80]))
        corrupt_restored, _ = _check_counts(scratch)
        if corrupt_restored > corrupt_before:
            # Worse than before only where QEMU, given the same writes, leaves it as bad:
            # a first write that went through on an already damaged image (its refcounts
            # wrong) and a second one refused.
            assert corrupt_restored <= _qemu_after(bytes(data), scratch.parent)


def _qemu_after(damaged: bytes, folder: Path) -> int:
    """qemu-img check's corruption count after qemu-io's run of the same two writes."""
    copy = folder / "qemu.qcow2"
    copy.write_bytes(damaged)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 64k 128k",
                    "-c", "write -P 0x23 3M 4k", "-c", "flush", str(copy)],
                   capture_output=True, timeout=60)
    poke(copy, 72, damaged[72:80])
    return _check_counts(copy)[0]


@pytest.mark.parametrize("frontend, device", [
    ("-drive if=none,node-name=drive,driver=qcow2,file={img}", "none0"),
    ("-drive if=none,id=disk,node-name=drive,driver=qcow2,file={img}", "disk"),
    ("-blockdev driver=qcow2,node-name=drive,file.driver=file,file.filename={img}", ""),
])
def test_corruption_event_names_the_block_backend(tmp_path: Path, frontend: str, device: str) -> None:
    """BLOCK_IMAGE_CORRUPTED's ``device`` is the node's BlockBackend (bdrv_get_device_name):
    the id -drive generates ("none0"), the given id, or "" for a node without one (iotest
    060's shutdown case). The write's error is printed on stdout, the reply is ""."""
    require("qemu-system-x86_64")
    seen = {}
    for name in ("qemu", "ours"):
        image = tmp_path / f"{name}.qcow2"
        qemu_img_create(image, 64 * MiB)
        _first_reftable_entry_zero(image)
        option, value = frontend.format(img=image).split(" ", 1)
        with running([option, value], tmp_path, name, qemu=name == "qemu") as (_, client):
            printed = client.qemu_io('drive "write 0 512"')
            event = client.wait_event("BLOCK_IMAGE_CORRUPTED", timeout=10)
            seen[name] = (printed, event["data"], list(event["data"]))
    assert seen["ours"] == seen["qemu"]
    # stderr's line (qcow2_signal_corruption's error_report), then qemu-io's on stdout.
    assert seen["ours"][0] == ("qcow2: Marking image as corrupt: Preventing invalid write on "
                               "metadata (overlaps with refcount table); further corruption "
                               "events will be suppressed\nwrite failed: Input/output error\n")
    assert seen["ours"][1]["device"] == device


@pytest.mark.parametrize("mode", ["none", "constant", "cached", "all"])
def test_overlap_check_modes_as_qemu(tmp_path: Path, mode: str) -> None:
    """A data cluster mapped onto a refcount block: ``overlap-check=constant`` (and
    ``none``) does not guard refcount blocks and lets the write through, as QEMU does;
    ``cached`` and ``all`` refuse it and mark the image corrupt. The bytes left are QEMU's."""
    require("qemu-system-x86_64")
    images = {}
    for side in ("ours", "theirs"):
        image = tmp_path / f"{side}.qcow2"
        qemu_img_create(image, MiB)
        qemu_io(image, "write -P 0x11 0 512")
        assert read_u64(image, 0x40000) == (1 << 63) | 0x50000  # L2 entry 0 -> data cluster
        poke(image, 0x40000, struct.pack(">Q", (1 << 63) | 0x20000))  # -> refcount block
        images[side] = image
    theirs = run("qemu-io", "--image-opts",
                 f"driver=qcow2,file.filename={images['theirs']},overlap-check={mode}",
                 "-c", "write -P 0x33 0 512", check=False)
    with running([], tmp_path, name="ours") as (_, client):
        assert client.execute("blockdev-add", {**_blockdev(images["ours"]),
                                               "overlap-check": mode}) == {"return": {}}
        ours = client.qemu_io('disk0 "write -P 0x33 0 512"')
        assert client.execute("blockdev-del", {"node-name": "disk0"}) == {"return": {}}
    written = "wrote 512/512 bytes at offset 0" in theirs.stdout
    assert written == (mode in ("none", "constant"))
    assert ("wrote 512/512 bytes at offset 0" in ours) == written
    assert images["ours"].read_bytes() == images["theirs"].read_bytes()
