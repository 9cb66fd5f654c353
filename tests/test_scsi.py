"""SCSI disks on a virtio-scsi controller, against live QEMU 7.2.

libvirt puts ``<disk bus='scsi'>`` on a ``virtio-scsi-pci`` controller; a scsi-hd needs
that controller's bus (``ID.0``, or ``scsi.N`` when the controller has no id). What is
compared is what a management tool sees: replies and their errors (target/LUN addressing,
bus lookup), query-block, HMP ``info block``, the QOM tree and DEVICE_DELETED events,
on QEMU and on the server started with the same command line.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from lock_probe import locked
from server_support import PC, both, running
from test_frontends import _hmp_normal, _normal


def _disks(count: int) -> list[str]:
    args = []
    for n in range(count):
        args += ["-blockdev", f"driver=file,node-name=f{n},filename={{dir}}/r{n}.raw"]
    return args


@pytest.fixture
def raws(tmp_path: Path, qemu_img: str) -> None:
    """Four raw images in ``ours/`` and ``qemu/``."""
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        for n in range(4):
            subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(folder / f"r{n}.raw"), "1M"],
                           check=True)


def test_scsi_disks_on_a_controller(tmp_path: Path, raws: None) -> None:
    """Cold-plugged controllers and disks, the automatic choice of bus and target/LUN,
    query-block, info block and the QOM tree are QEMU's."""
    args = [*_disks(4), "-device", "virtio-scsi-pci,id=scsi0", "-device", "virtio-scsi",
            "-device", "scsi-hd,drive=f0,id=sd0",  # the newest controller's bus: scsi.0
            "-device", "scsi-hd,drive=f1,bus=scsi0.0,scsi-id=3"]
    with both(args, tmp_path) as (qemu, ours):
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))
        assert _hmp_normal(ours.hmp("info block")) == _hmp_normal(qemu.hmp("info block"))
        for path in ("/machine/peripheral", "/machine/peripheral-anon"):
            assert ours.cmd("qom-list", path=path) == qemu.cmd("qom-list", path=path)
        backend = {"path": "/machine/peripheral/scsi0/virtio-backend", "property": "type"}
        assert ours.cmd("qom-get", **backend) == qemu.cmd("qom-get", **backend) == "virtio-scsi-device"
        # Addressing: the LUN is free on target 3, taken on target 0 of scsi.0.
        for add in ({"driver": "scsi-hd", "drive": "f2", "id": "sd2", "bus": "scsi0.0", "scsi-id": 3},
                    {"driver": "scsi-hd", "drive": "f3", "id": "sd3", "bus": "scsi.0", "scsi-id": 0,
                     "lun": 0}):
            assert ours.execute("device_add", add) == qemu.execute("device_add", add)
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))


@pytest.mark.parametrize("args", [
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "bus": "scsi0.0", "scsi-id": 256},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "bus": "scsi0.0", "lun": 16384},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "bus": "scsi0.0", "channel": 1},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "scsi-id": 4294967294},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "scsi-id": -1},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "scsi-id": "x"},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "scsi-id": 0, "lun": 0},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "bus": "nope.0"},
    {"driver": "scsi-hd", "drive": "f1", "id": "x", "bus": "pci.0"},
    {"driver": "virtio-blk-pci", "drive": "f1", "id": "x", "bus": "scsi0.0"},
    {"driver": "scsi-hd", "drive": "f0", "id": "x"},
    {"driver": "virtio-scsi-pci", "id": "scsi0"},
])
def test_scsi_device_add_errors(tmp_path: Path, raws: None, args: dict[str, Any]) -> None:
    with both([*_disks(2), "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=f0,id=sd0"],
              tmp_path) as (qemu, ours):
        theirs = qemu.execute("device_add", args)
        assert "error" in theirs
        assert ours.execute("device_add", args) == theirs
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))


def test_lun_taken_by_a_disk_without_id(tmp_path: Path, raws: None) -> None:
    """QEMU names the holder with printf's %s of a NULL id."""
    with both([*_disks(2), "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=f0"],
              tmp_path) as (qemu, ours):
        add = {"driver": "scsi-hd", "drive": "f1", "scsi-id": 0, "lun": 0}
        theirs = qemu.execute("device_add", add)
        assert theirs["error"]["desc"] == "lun already used by '(null)'"
        assert ours.execute("device_add", add) == theirs


def test_scsi_disk_unplug_and_controller_unplug(tmp_path: Path, raws: None) -> None:
    """A SCSI disk leaves at once (no guest needed, in QEMU too); a controller leaves with
    its disks, children first, once the guest ejects it (QEMU: through ACPI's register)."""
    args = [*_disks(3), "-device", "virtio-scsi-pci,id=scsi0,addr=0x5",
            "-device", "scsi-hd,drive=f0,id=sd0", "-device", "scsi-hd,drive=f1"]
    with both(args, tmp_path) as (qemu, ours):
        for client in (qemu, ours):
            client.cmd("device_add", driver="scsi-hd", drive="f2", id="sd2")
        assert ours.execute("device_del", {"id": "sd2"}) == qemu.execute("device_del", {"id": "sd2"})
        assert ours.wait_event("DEVICE_DELETED")["data"] == qemu.wait_event("DEVICE_DELETED")["data"]
        # The node is free again: blockdev-del succeeds on both.
        assert ours.execute("blockdev-del", {"node-name": "f2"}) == \
            qemu.execute("blockdev-del", {"node-name": "f2"}) == {"return": {}}
        assert ours.execute("device_del", {"id": "scsi0"}) == qemu.execute("device_del", {"id": "scsi0"})
        qemu.hmp(f"o /w 0xae08 {1 << 5:#x}")
        theirs = [qemu.wait_event("DEVICE_DELETED")["data"] for _ in range(4)]
        mine = [ours.wait_event("DEVICE_DELETED")["data"] for _ in range(4)]
        assert mine == theirs
        assert ours.cmd("query-block") == qemu.cmd("query-block") == []


def test_scsi_disk_locks_the_image(tmp_path: Path, qemu_img: str) -> None:
    """A scsi-hd takes QEMU's permissions on its image: the lock bytes QEMU's holds."""
    image = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    args = [*PC, "-blockdev", f"driver=file,node-name=f0,filename={image}",
            "-blockdev", "driver=qcow2,node-name=d0,file=f0",
            "-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=d0,id=sd0"]
    seen = []
    for qemu in (True, False):
        with running(args, tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
            assert client.cmd("query-status")["status"] == "prelaunch"
            seen.append(locked(image))
    assert seen[0] == seen[1]
    assert {101, 201} <= set(seen[1])  # it writes, and nobody else may


def test_qom_get_on_devices_and_partial_qdev_paths(tmp_path: Path, raws: None) -> None:
    """qom-get of a disk device's properties (``drive`` names the backend, else the node;
    the virtio transport aliases its backend's), and HMP qemu-io -d with a partial QOM
    path (blk_by_qdev_id's find_device_state), as QEMU."""
    args = [*_disks(2), "-drive", "if=none,id=dr,file={dir}/r2.raw,format=raw",
            "-device", "virtio-blk-pci,drive=f0,id=vd0,share-rw=on", "-device", "virtio-scsi-pci",
            "-device", "scsi-hd,drive=dr,id=sd,lun=3", "-device", "scsi-hd,drive=f1"]
    gets = [("/machine/peripheral/vd0", "drive"), ("vd0/virtio-backend", "drive"),
            ("/machine/peripheral/vd0/virtio-backend", "share-rw"), ("vd0", "share-rw"),
            ("sd", "drive"), ("sd", "lun"), ("sd", "scsi-id"), ("sd", "channel"), ("sd", "hotplugged"),
            ("sd", "realized"), ("/machine/peripheral-anon/device[0]", "drive"),
            ("/machine/peripheral-anon/device[1]", "drive"), ("sd", "nosuch")]
    with both(args, tmp_path) as (qemu, ours):
        for path, prop in gets:
            query = {"path": path, "property": prop}
            assert ours.execute("qom-get", query) == qemu.execute("qom-get", query), query
        for target in ("vd0/virtio-backend", "vd0", "virtio-backend", "sd", "nosuch/virtio-backend"):
            line = f'qemu-io -d {target} "read 0 512"'
            assert ours.hmp(line) == qemu.hmp(line), line
