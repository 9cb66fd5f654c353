"""Disk frontends (-device/-drive, device_add/device_del) against live QEMU 7.2.

Every test starts QEMU (``-machine pc -S``: no guest code runs) and the server with the
same command line and compares what a management tool sees: replies, events, query-block,
HMP text, and the lock bytes another process finds on the image.

Normalised, by design: query-block's ``inserted`` carries QEMU 10.1's ``active`` and
``children`` members (the version we report), which QEMU 7.2 lacks; generated node names
(``#blockNNN``) are random in both.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from lock_probe import locked
from server_support import PC, both, running


def _blockdevs(image: Path, fmt: str, read_only: bool = False) -> list[str]:
    ro = ",read-only=on" if read_only else ""
    return ["-blockdev", f"driver=file,node-name=f0,filename={image}{ro}",
            "-blockdev", f"driver={fmt},node-name=d0,file=f0{ro}"]


def _normal(value: Any) -> Any:
    """query-block with what differs by design taken out (see the module docstring)."""
    if isinstance(value, str):
        return re.sub(r"/(qemu|ours)/", "/DIR/", value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        out = {k: _normal(v) for k, v in value.items() if k not in ("active", "children")}
        for key in ("node-name",):
            if isinstance(out.get(key), str) and out[key].startswith("#block"):
                out[key] = "#block"
        return out
    return value


def _hmp_normal(text: str) -> str:
    return re.sub(r"#block\d+", "#block", re.sub(r"/(qemu|ours)/", "/DIR/", text))


@pytest.fixture
def images(tmp_path: Path, qemu_img: str) -> tuple[Path, Path]:
    """A qcow2 and a raw image in ``ours/``, copies in ``qemu/`` (one set per process)."""
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        qcow2, raw = folder / "d.qcow2", folder / "r.raw"
        # Created, not copied: a copy would not be sparse (actual-size differs).
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
        subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    return qcow2, raw


def _writer(qemu_io: str, image: Path, fmt: str) -> tuple[int, str]:
    result = subprocess.run([qemu_io, "-f", fmt, "-c", "write 0 512", str(image)],
                            capture_output=True, text=True)
    return result.returncode, result.stderr.replace(str(image), "IMG")


def test_device_add_query_block_and_blockdev_del(tmp_path: Path, images: tuple[Path, Path]) -> None:
    with both(_blockdevs(Path("{dir}/d.qcow2"), "qcow2"), tmp_path) as (qemu, ours):
        for client in (qemu, ours):
            assert client.execute("query-block") == {"return": []}
        add = {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0"}
        assert ours.execute("device_add", add) == qemu.execute("device_add", add) == {"return": {}}
        theirs_block, our_block = qemu.cmd("query-block"), ours.cmd("query-block")
        assert our_block[0]["qdev"] == "/machine/peripheral/vd0/virtio-backend"
        assert _normal(our_block) == _normal(theirs_block)
        assert _hmp_normal(ours.hmp("info block")) == _hmp_normal(qemu.hmp("info block"))
        for name in ("d0", "f0"):
            assert ours.execute("blockdev-del", {"node-name": name}) == \
                qemu.execute("blockdev-del", {"node-name": name})
        assert ours.execute("blockdev-del", {"node-name": "d0"})["error"]["desc"] == "Node d0 is in use"
        peripheral = {"path": "/machine/peripheral"}
        assert ours.cmd("qom-list", **peripheral) == qemu.cmd("qom-list", **peripheral)
        # A second device on the same node: QEMU's conflict text, naming both backends.
        for extra in ({}, {"share-rw": True}):
            second = {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd1", **extra}
            assert ours.execute("device_add", second) == qemu.execute("device_add", second)


@pytest.mark.parametrize("args", [
    {"driver": "virtio-blk-pci", "drive": "nosuch", "id": "x"},
    {"driver": "virtio-blk-pci", "id": "x"},
    {"driver": "nosuch", "id": "x"},
    {"driver": "virtio-blk-pci", "drive": "d0", "id": "1x"},
    {"driver": "virtio-blk-pci", "drive": "d0", "id": "x", "foo": 1},
    {"driver": "scsi-hd", "drive": "d0", "id": "x"},
    {"driver": "virtio-blk-device", "drive": "d0", "id": "x"},
    {"driver": "ide-hd", "drive": "d0", "id": "x"},
])
def test_device_add_errors(tmp_path: Path, images: tuple[Path, Path], args: dict[str, Any]) -> None:
    with both(_blockdevs(Path("{dir}/d.qcow2"), "qcow2"), tmp_path) as (qemu, ours):
        theirs = qemu.execute("device_add", args)
        assert "error" in theirs
        assert ours.execute("device_add", args) == theirs
        assert ours.cmd("query-block") == []


def test_failed_anonymous_device_add_uses_its_number_as_qemu(tmp_path: Path,
                                                           images: tuple[Path, Path]) -> None:
    """qdev_set_id names an anonymous device device[N] before its properties are set, so a
    device_add failing from there on has used N; one failing earlier (no such driver, no
    bus) has not."""
    failing: list[dict[str, Any]] = [
        {"driver": "virtio-blk-pci", "drive": "nosuch"},
        {"driver": "nosuch"},
        {"driver": "virtio-blk-pci", "drive": "d0", "foo": 1},
        {"driver": "scsi-hd", "drive": "d0"},
        {"driver": "virtio-blk-pci"},
    ]
    with both(_blockdevs(Path("{dir}/d.qcow2"), "qcow2"), tmp_path) as (qemu, ours):
        for args in failing:
            assert ours.execute("device_add", args) == qemu.execute("device_add", args)
        for client in (qemu, ours):
            client.cmd("device_add", driver="virtio-blk-pci", drive="d0")
        anon = {"path": "/machine/peripheral-anon"}
        assert ours.cmd("qom-list", **anon) == qemu.cmd("qom-list", **anon)
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))


def test_device_del_events_and_legacy_drive(tmp_path: Path, images: tuple[Path, Path]) -> None:
    args = [*_blockdevs(Path("{dir}/d.qcow2"), "qcow2"),
            "-drive", "if=none,id=drive0,file={dir}/r.raw,format=raw"]
    with both(args, tmp_path) as (qemu, ours):
        for client in (qemu, ours):
            client.cmd("device_add", driver="virtio-blk-pci", drive="d0", id="vd0", addr="0x5")
            client.cmd("device_add", driver="virtio-blk-pci", drive="drive0", addr="0x6")
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))
        anon = {"path": "/machine/peripheral-anon"}
        assert ours.cmd("qom-list", **anon) == qemu.cmd("qom-list", **anon)
        # The named backend is taken.
        taken = {"driver": "virtio-blk-pci", "drive": "drive0", "id": "vd1"}
        assert ours.execute("device_add", taken) == qemu.execute("device_add", taken)
        for ident, slot in (("vd0", 5), ("/machine/peripheral-anon/device[0]", 6)):
            assert ours.execute("device_del", {"id": ident}) == qemu.execute("device_del", {"id": ident})
            # QEMU waits for the guest: eject through the ACPI PCI hotplug register.
            qemu.hmp(f"o /w 0xae08 {1 << slot:#x}")
            theirs = [qemu.wait_event("DEVICE_DELETED"), qemu.wait_event("DEVICE_DELETED")]
            mine = [ours.wait_event("DEVICE_DELETED"), ours.wait_event("DEVICE_DELETED")]
            assert [e["data"] for e in mine] == [e["data"] for e in theirs]
        # The -drive backend went with its device; the -blockdev node stays and can go now.
        assert ours.cmd("query-block") == qemu.cmd("query-block") == []
        assert ours.execute("blockdev-del", {"node-name": "d0"}) == {"return": {}}
        missing = {"id": "vd0"}
        assert ours.execute("device_del", missing) == qemu.execute("device_del", missing)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("share_rw", [False, True])
def test_frontend_locks_and_outside_writer(tmp_path: Path, images: tuple[Path, Path], qemu_io: str,
                                           fmt: str, read_only: bool, share_rw: bool) -> None:
    image = images[0] if fmt == "qcow2" else images[1]
    args = _blockdevs(image, fmt, read_only)
    add = {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0", "share-rw": share_rw}
    seen = []
    for qemu in (True, False):
        with running(PC + args, tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
            assert client.execute("device_add", add) == {"return": {}}
            seen.append((locked(image), _writer(qemu_io, image, fmt)))
    assert seen[1] == seen[0]


def test_drive_probing_readonly_and_device_on_command_line(tmp_path: Path, images: tuple[Path, Path]) -> None:
    qcow2, raw = images
    args = ["-drive", "if=none,id=drive0,file={dir}/d.qcow2,readonly=on",
            "-drive", "if=none,id=drive1,file={dir}/r.raw,cache.direct=on,node-name=n1",
            "-device", '{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"drive0",'
                       '"id":"virtio-disk0","bootindex":1}']
    with both(args, tmp_path) as (qemu, ours):
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))
        assert _hmp_normal(ours.hmp("info block")) == _hmp_normal(qemu.hmp("info block"))
        assert locked(qcow2) == [100, 201, 203] and locked(raw) == [100]


@pytest.mark.parametrize("args", [
    ["-device", "virtio-blk-pci,drive=nosuch"],
    ["-device", "virtio-blk-pci"],
    ["-drive", "if=none,file=FILE,format=raw,id=1a"],
    ["-drive", "if=none,format=raw"],
    ["-drive", "if=none,file=FILE,format=raw,id=d", "-drive", "if=none,file=FILE,format=raw,id=d"],
    ["/nonexistent.qcow2"],
    ["-hdb", "/nonexistent.qcow2"],
    ["-hda", "FILE", "-hda", "FILE"],
    ["-drive", "if=none,file=FILE,format=raw,id=d0", "-device", "virtio-blk-pci,drive=d0,write-cache=x"],
    ["-"],
])
def test_startup_errors(tmp_path: Path, images: tuple[Path, Path], args: list[str]) -> None:
    qemu_tools.require("qemu-system-x86_64")
    args = [a.replace("FILE", str(images[1])) for a in args]
    outputs = []
    for argv in (["qemu-system-x86_64", "-nodefaults", "-display", "none"],
                 ["python3", "-m", "qmp_server"]):
        result = subprocess.run([*argv, *PC, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        outputs.append(re.sub(r"^(qemu-system-x86_64|qmp-server): ", "", result.stderr, flags=re.M))
    assert outputs[1] == outputs[0]


def test_no_pci_bus_with_machine_none(tmp_path: Path, images: tuple[Path, Path]) -> None:
    qemu_tools.require("qemu-system-x86_64")
    add = {"driver": "virtio-blk-pci", "drive": "d0", "id": "vd0"}
    with running(["-S", *_blockdevs(tmp_path / "qemu/d.qcow2", "qcow2")], tmp_path, "qemu",
                 qemu=True) as (_, qemu), \
            running(["-machine", "none", "-S", *_blockdevs(tmp_path / "ours/d.qcow2", "qcow2")],
                    tmp_path, "ours") as (_, ours):
        theirs = qemu.execute("device_add", add)
        assert theirs["error"]["desc"] == "No 'PCI' bus found for device 'virtio-blk-pci'"
        assert ours.execute("device_add", add) == theirs


def test_migration_moves_the_frontends_write_permission(tmp_path: Path, images: tuple[Path, Path],
                                                        qemu_io: str) -> None:
    """Source running with a device, destination with the same device: one writer at a time."""
    _, raw = images
    args = [*_blockdevs(raw, "raw"), "-device", "virtio-blk-pci,drive=d0,id=vd0"]
    sock = tmp_path / "mig.sock"
    with running(["-machine", "pc", *args], tmp_path, "src") as (_, src), \
            running(["-machine", "pc", "-incoming", "defer", *args], tmp_path, "dst") as (_, dst):
        # The destination's device waits for activation: only the source locks.
        assert locked(raw) == [100, 101, 201]
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        src.cmd("migrate", uri=f"unix:{sock}")
        deadline = time.monotonic() + 20
        while dst.cmd("query-status")["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        while src.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Destination writes now (and unshares write, once running); the source gave it up.
        assert locked(raw) == [100, 101, 201]
        assert _writer(qemu_io, raw, "raw")[0] == 1
        assert "[inactive]" in src.hmp("info block")
        assert src.execute("cont")["error"]["desc"].startswith("Failed to get \"write\" lock")


def test_hmp_qemu_io_on_a_device_and_a_named_drive(tmp_path: Path, images: tuple[Path, Path]) -> None:
    # hmp_qemu_io: -d names a device, a plain name a -drive backend before a node; the
    # bytes on the images are compared too.
    args = ["-drive", "if=none,id=drive0,file={dir}/d.qcow2",
            "-device", "virtio-blk-pci,drive=drive0,id=virtio-disk0"]
    with both(args, tmp_path) as (qemu, ours):
        for client in (qemu, ours):
            client.hmp('qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P 0x33 0 4k"')
            client.hmp('qemu-io drive0 "write -P 0x34 4k 4k"')
            client.hmp('qemu-io drive0 "flush"')
        for line in ('-d nosuch "read 0 4k"', 'nosuch "read 0 4k"', '-d virtio-disk0 "read 0 4k"'):
            assert ours.qemu_io(line) == qemu.qemu_io(line), line
        for client in (qemu, ours):
            # Both print qemu-io's results on their stdout (the reply is "").
            assert "read 4096/4096" in client.qemu_io(
                '-d /machine/peripheral/virtio-disk0/virtio-backend "read -P 0x34 4k 4k"')
    for name in ("qemu", "ours"):
        image = tmp_path / name / "d.qcow2"
        for offset, pattern in ((0, 0x33), (4096, 0x34)):
            result = subprocess.run(["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} 4k",
                                     str(image)], capture_output=True, text=True)
            assert "Pattern verification failed" not in result.stdout, (name, result.stdout)


def test_drive_legacy_options_as_qemu(tmp_path: Path, images: tuple[Path, Path]) -> None:
    # -drive is QemuOpts: cache=MODE (writeback is the BlockBackend's, the rest the
    # node's), aio= for the file node, file.* beside file=, if=ide with its generated id.
    for name in ("qemu", "ours"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name / "w.qcow2"), "1M"],
                       check=True)
    args = ["-drive", "if=none,id=drive0,file={dir}/d.qcow2,cache=writethrough,aio=threads",
            "-drive", "if=none,id=drive1,file={dir}/r.raw,format=raw,cache=directsync,file.locking=off",
            "-drive", "file={dir}/w.qcow2,if=ide,index=1,cache=unsafe"]
    with both(args, tmp_path) as (qemu, ours):
        mine, theirs = _normal(ours.cmd("query-block")), _normal(qemu.cmd("query-block"))
        # The IDE device QEMU's board creates lives under /machine/unattached; ours is an
        # anonymous peripheral.
        for block in mine + theirs:
            block.pop("qdev", None)
        assert mine == theirs
        assert [b["device"] for b in mine] == ["drive0", "drive1", "ide0-hd1"]


def test_hard_disk_options_and_a_bare_image_argument_as_qemu(tmp_path: Path,
                                                            images: tuple[Path, Path]) -> None:
    """``-hdX FILE`` and an image given as a bare argument are QEMU's drive_add: a disk at
    index 0 to 3 on the board's IDE, the file name taken whole (a comma in it too)."""
    for name in ("qemu", "ours"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name / "a,b.qcow2"),
                        "1M"], check=True)
    args = ["-hdc", "{dir}/a,b.qcow2", "{dir}/d.qcow2", "-hdb", "{dir}/r.raw"]
    with both(args, tmp_path) as (qemu, ours):
        mine, theirs = _normal(ours.cmd("query-block")), _normal(qemu.cmd("query-block"))
        for block in mine + theirs:
            block.pop("qdev", None)  # the board's IDE disks: see the test above
        assert mine == theirs
        assert [b["device"] for b in mine] == ["ide1-hd0", "ide0-hd0", "ide0-hd1"]


def test_drive_with_a_format_as_its_file_driver_as_qemu(tmp_path: Path, images: tuple[Path, Path]) -> None:
    # file.driver naming a format (iotest 120): that child opens its own file node from
    # the file name, so raw sits over qcow2 over the file.
    args = ["-drive", "id=drv,if=none,file={dir}/d.qcow2,driver=raw,file.driver=qcow2"]
    with both(args, tmp_path) as (qemu, ours):
        theirs = _normal(qemu.cmd("query-block"))
        # QEMU's raw passes bdrv_get_info through to its child: the qcow2's cluster size
        # shows on the raw node. Ours shows none for raw (a known difference).
        assert theirs[0]["inserted"]["image"].pop("cluster-size") == 65536
        assert _normal(ours.cmd("query-block")) == theirs
        mine = [(n["drv"], n["file"]) for n in ours.cmd("query-named-block-nodes")]
        assert [drv for drv, _ in mine] == ["raw", "qcow2", "file"]


def test_drive_with_a_protocol_driver_as_qemu(tmp_path: Path, images: tuple[Path, Path]) -> None:
    # -drive driver=file: the file node itself is the drive's top, as in QEMU.
    with both(["-drive", "driver=file,file={dir}/r.raw,if=none,id=d0"], tmp_path) as (qemu, ours):
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))


def test_node_name_may_not_take_a_drive_id(tmp_path: Path, images: tuple[Path, Path]) -> None:
    """bdrv_assign_node_name (iotest 087): a node name equal to a -drive id is refused
    after the file child opened and before the format driver reads anything, so a
    ``null-co`` file under qcow2 gives the name's error, not "not in qcow2 format"; a
    file that cannot be opened fails first."""
    args = ["-drive", "driver=qcow2,id=disk,node-name=test-node,file={dir}/d.qcow2"]
    adds = [{"driver": "qcow2", "node-name": "disk", "file": {"driver": "null-co"}},
            {"driver": "qcow2", "node-name": "disk",
             "file": {"driver": "file", "filename": str(tmp_path / "nonexistent")}},
            {"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "node-name": "disk"}},
            {"driver": "null-co", "node-name": "test-node"},
            {"driver": "null-co", "node-name": "other"}]
    with both(args, tmp_path) as (qemu, ours):
        replies = [[client.execute("blockdev-add", add) for add in adds] for client in (qemu, ours)]
    assert replies[1] == replies[0]
    assert [r.get("error", {}).get("desc") for r in replies[1]] == [
        "node-name=disk is conflicting with a device id",
        f"Could not open '{tmp_path / 'nonexistent'}': No such file or directory",
        "node-name=disk is conflicting with a device id",
        "Duplicate nodes with node-name='test-node'",
        None]
