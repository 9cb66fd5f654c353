"""PCI(e) topology on pc and q35, against QEMU 7.2: root ports, PCI bridges, q35's SATA.

What libvirt builds a q35 domain from (pcie-root-port, i82801b11-bridge, pci-bridge,
pcie-pci-bridge, the machine's ich9-ahci) is set up on the command line of both QEMU and
our server, then the same device_add/device_del requests go to both: every reply (errors
included, with QEMU's texts), query-block and the qom tree of the peripherals must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import both, comparable

Q35 = ["-machine", "q35"]


def _disks(folder: str, count: int) -> list[str]:
    args = []
    for n in range(count):
        args += ["-blockdev", f"driver=file,filename={folder}/d{n}.raw,node-name=f{n}",
                 "-blockdev", f"driver=raw,file=f{n},node-name=d{n}"]
    return args


@pytest.fixture
def raw_images(tmp_path: Path) -> Path:
    for side in ("qemu", "ours"):
        (tmp_path / side).mkdir()
        for n in range(8):
            (tmp_path / side / f"d{n}.raw").write_bytes(bytes(1 << 20))
    return tmp_path


#: The topology libvirt gives a q35 domain, plus a DMI-PCI bridge with a PCI bridge behind it
#: and a PCIe-to-PCI bridge on a root port.
TOPOLOGY = [
    "-device", "pcie-root-port,port=16,chassis=1,id=pci.1,bus=pcie.0,multifunction=on,addr=0x2",
    "-device", "pcie-root-port,port=17,chassis=2,id=pci.2,bus=pcie.0,addr=0x2.0x1",
    "-device", "pcie-root-port,port=18,chassis=3,id=pci.3,bus=pcie.0,addr=0x2.0x2",
    "-device", "i82801b11-bridge,id=dmi,bus=pcie.0,addr=0x1e",
    "-device", "pci-bridge,chassis_nr=4,id=pb,bus=dmi,addr=0x0",
    "-device", "pcie-pci-bridge,id=ppb,bus=pci.3,addr=0x0",
]

Q35_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    # The root bus of a q35 takes no hot-plug; a root port takes one device, in slot 0.
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d0", "id": "v0"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d0", "id": "v0", "bus": "pcie.0"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d0", "id": "v0", "bus": "pci.1"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d1", "id": "v1", "bus": "pci.1"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d1", "id": "v1", "bus": "pci.2",
                    "addr": "0x1"}),
    ("device_add", {"driver": "virtio-blk-pci-non-transitional", "drive": "d1", "id": "v1",
                    "bus": "pci.2"}),
    # Behind the PCI bridges: any free slot, clashes refused with QEMU's text.
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d2", "id": "v2", "bus": "pb",
                    "addr": "0x3"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d3", "id": "v3", "bus": "pb",
                    "addr": "0x3"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d3", "id": "v3", "bus": "pb",
                    "addr": "0x0"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d4", "id": "v4", "bus": "ppb"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d6", "id": "v6", "bus": "dmi"}),
    ("device_add", {"driver": "virtio-blk-pci", "drive": "d7", "id": "v7", "bus": "nosuch"}),
    # q35's SATA ports (ich9-ahci's ide.0 ... ide.5) take no hot-plug.
    ("device_add", {"driver": "ide-hd", "drive": "d5", "id": "s5", "bus": "ide.2"}),
    ("device_add", {"driver": "pcie-root-port", "id": "rp9", "bus": "pcie.0", "chassis": 9}),
    ("query-block", {}),
    ("qom-list", {"path": "/machine/peripheral"}),
    ("device_del", {"id": "pci.1"}),
    ("device_del", {"id": "nosuch"}),
]


@pytest.mark.usefixtures("raw_images")
def test_q35_topology_as_qemu(tmp_path: Path) -> None:
    args = [*Q35, *_disks("{dir}", 8), *TOPOLOGY,
            "-device", "ide-hd,drive=d5,bus=ide.1,id=sata1"]
    with both(args, tmp_path) as (qemu, ours):
        for name, arguments in Q35_REQUESTS:
            theirs = qemu.execute(name, arguments)
            mine = ours.execute(name, arguments)
            if name == "qom-list":
                # QEMU lists an object's properties in its hash table's order (reversed);
                # ours come in the order they were added.
                theirs["return"].sort(key=repr)
                mine["return"].sort(key=repr)
            assert comparable(mine) == comparable(theirs), (name, arguments)


@pytest.mark.parametrize("device", [
    # What starts and what does not: the root port's slot rule, clashes, missing buses.
    "virtio-blk-pci,drive=d0,bus=pci.1,addr=0x1",
    "pcie-root-port,id=x,bus=pb,chassis=8",
    "ide-hd,drive=d0,bus=ide.6",
    "pci-bridge,id=y,bus=pcie.0,addr=0x2,chassis_nr=5",
    "virtio-blk-pci,drive=d0,bus=pb,addr=0x0",
    "virtio-blk-pci,drive=d0,bus=dmi,addr=0x0",
    "virtio-blk-pci,drive=d0,bus=pcie.0,addr=0x1e.0x1",
])
@pytest.mark.usefixtures("raw_images")
def test_q35_startup_as_qemu(tmp_path: Path, device: str) -> None:
    qemu_tools.require("qemu-system-x86_64")
    requests = [{"execute": "qmp_capabilities"},
                {"execute": "qom-list", "arguments": {"path": "/machine/peripheral-anon"}},
                {"execute": "quit"}]
    stdin = "".join(json.dumps(r) + "\n" for r in requests)
    outputs = []
    for side, argv in (("qemu", ["qemu-system-x86_64", "-nodefaults", "-display", "none"]),
                       ("ours", [sys.executable, "-m", "qmp_server"])):
        args = [a.replace("{dir}", str(tmp_path / side))
                for a in [*Q35, "-S", "-qmp", "stdio", *_disks("{dir}", 1), *TOPOLOGY,
                          "-device", device]]
        result = subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True,
                                timeout=30)
        replies = [json.loads(line) for line in result.stdout.splitlines()]
        replies = [r for r in replies if "return" in r or "error" in r]
        outputs.append([result.returncode, result.stderr.split(": ", 1)[-1],
                        sorted(replies[1]["return"], key=repr) if len(replies) > 1 else None])
    assert outputs[1] == outputs[0]


@pytest.mark.usefixtures("raw_images")
def test_pc_root_bus_addresses_as_qemu(tmp_path: Path) -> None:
    """i440fx's own functions (host bridge, PIIX3's ISA, IDE and PM) hold their slots; a
    function of a slot needs a multifunction function 0, and hot-plug cannot add one to
    a slot whose function 0 is there."""
    requests = [{"driver": "virtio-blk-pci", "drive": f"d{n}", "addr": addr}
                for n, addr in enumerate(["0x0", "0x1", "0x1.0x1", "0x1.0x2", "0x1.0x3",
                                          "0x3", "0x3.0x1", "0x4.0x1"])]
    requests.append({"driver": "virtio-blk-pci", "drive": "d7", "id": "auto"})
    with both(_disks("{dir}", 8), tmp_path) as (qemu, ours):
        for arguments in requests:
            assert ours.execute("device_add", arguments) == qemu.execute("device_add", arguments)
        assert comparable(ours.cmd("query-block")) == comparable(qemu.cmd("query-block"))
