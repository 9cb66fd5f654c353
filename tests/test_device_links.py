"""Disk devices' ``iothread=`` link and PCI hot-plug without ACPI, against QEMU 7.2.

``iothread=`` names an iothread object by (partial) QOM path: ``ID``, ``objects/ID`` or
``/objects/ID``; anything else is QEMU's "Device 'X' not found" (DeviceNotFound) or, for
an object of another type, its "Invalid parameter type" text. With ``-no-acpi`` or
``-machine acpi=off`` an i440fx machine's pci.0 takes no hot-plugged device; q35's PCIe
root bus never does.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import QEMU, SERVER, running

OBJECTS = ["-object", "secret,id=sec0,data=x", "-object", "iothread,id=io1"]


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "r.img"
    if not image.exists():
        subprocess.run([qemu_tools.require("qemu-img"), "create", "-q", "-f", "raw", str(image), "1M"],
                       check=True)
    return image


def _replies(args: list[str], tmp_path: Path, requests: list[dict[str, Any]]) -> list[list[Any]]:
    qemu_tools.require("qemu-system-x86_64")
    image = _image(tmp_path)
    results = []
    for name in ("qemu", "ours"):
        with running(["-S", *args], tmp_path, name, qemu=name == "qemu") as (_, client):
            client.cmd("blockdev-add", driver="file", node_name="f0", filename=str(image))
            results.append([client.execute("device_add", request) for request in requests])
    return results


@pytest.mark.parametrize("iothread", [
    "nope", "io1", "/objects/io1", "objects/io1", "sec0", "/objects/sec0", "/objects/nope",
    "peripheral", "", 5, True,
])
def test_device_add_iothread(tmp_path: Path, iothread: Any) -> None:
    # A missing drive too: the iothread link is set first, as in QEMU.
    requests = [{"driver": "virtio-blk-pci", "drive": "f0", "id": "v0", "iothread": iothread},
                {"driver": "virtio-blk-pci", "drive": "nonexist", "iothread": iothread}]
    theirs, mine = _replies(["-machine", "pc", *OBJECTS], tmp_path, requests)
    assert mine == theirs


@pytest.mark.parametrize("machine", [
    ["-machine", "pc", "-no-acpi"], ["-machine", "pc,acpi=off"], ["-machine", "pc-i440fx-7.2,acpi=off"],
    ["-machine", "pc", "-no-acpi", "-machine", "acpi=on"], ["-machine", "pc,acpi=on"],
    ["-machine", "q35"], ["-machine", "q35,acpi=off"],
])
def test_pci_hotplug_needs_acpi(tmp_path: Path, machine: list[str]) -> None:
    requests = [{"driver": "virtio-blk-pci", "drive": "f0", "id": "v0"}]
    theirs, mine = _replies(machine, tmp_path, requests)
    assert mine == theirs


def test_cold_plugged_device_cannot_be_unplugged_without_acpi(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    image = _image(tmp_path)
    args = ["-S", "-machine", "pc,acpi=off", "-blockdev", f"driver=file,node-name=f0,filename={image}",
            "-device", "virtio-blk-pci,drive=f0,id=v0"]
    replies = []
    for name in ("qemu", "ours"):
        with running(args, tmp_path, name, qemu=name == "qemu") as (_, client):
            replies.append(client.execute("device_del", {"id": "v0"}))
    assert replies[1] == replies[0]
    assert replies[1]["error"]["desc"] == "Bus 'pci.0' does not support hotplugging"


@pytest.mark.parametrize("device", [
    "virtio-blk-pci,drive=f0,iothread=nope", "virtio-blk-pci,drive=f0,iothread=sec0",
    '{"driver":"virtio-blk-pci","drive":"f0","iothread":"nope"}',
])
def test_cli_device_iothread(tmp_path: Path, device: str) -> None:
    qemu_tools.require("qemu-system-x86_64")
    image = _image(tmp_path)
    args = ["-S", "-machine", "pc", "-display", "none", "-nodefaults", *OBJECTS,
            "-blockdev", f"driver=file,node-name=f0,filename={image}", "-device", device]
    outputs = []
    for program in (QEMU, SERVER):
        done = subprocess.run([*program, *args], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 1
        outputs.append(done.stderr.split(": ", 1)[1])
    assert outputs[1] == outputs[0]
    assert outputs[1].startswith(f"-device {device}: ")


def test_cli_device_with_existing_iothread_starts(tmp_path: Path) -> None:
    image = _image(tmp_path)
    args = ["-machine", "pc", *OBJECTS, "-blockdev", f"driver=file,node-name=f0,filename={image}",
            "-device", "virtio-blk-pci,drive=f0,id=v0,iothread=io1"]
    with running(args, tmp_path, "ours") as (_, client):
        assert [d["device"] for d in client.cmd("query-block")] == [""]
