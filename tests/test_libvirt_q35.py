"""libvirt end to end on a q35 machine: a PCIe topology of root ports and q35's SATA.

libvirt builds a q35 domain from pcie-root (the machine's pcie.0), one pcie-root-port per
PCI device plus a spare one for hot-plug, and the machine's built-in SATA controller
(ich9-ahci, whose ports are the buses ide.0 to ide.5). The flow (define, start, domblklist,
attach-disk onto the spare root port, detach-disk, suspend/resume, shutdown) runs on our
server and, where it is installed, on QEMU 7.2 under the same libvirtd; what virsh prints
is compared after names and paths are normalized. The daemon setup is in
tests/libvirt_support.py; docs/libvirt.md explains it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from libvirt_support import Libvirtd, normalize_virsh

QEMU = shutil.which("qemu-system-x86_64", path="/usr/bin:/usr/local/bin")
QEMU_IMG = shutil.which("qemu-img")

DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{sata_disk}'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _devices(command_line: str) -> list[str]:
    """The -device arguments of the domain's last command line, in order."""
    last = command_line.rsplit("-name guest=", 1)[-1]
    return re.findall(r"-device (\{.*?\}|\S+)", last)


def _flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """define, start, the disks, hot-plug and unplug, suspend/resume, shutdown; virsh's
    answers, normalized."""
    assert QEMU_IMG is not None
    folder.mkdir()
    disk, extra = folder / "disk.qcow2", folder / "extra.qcow2"
    for image in (disk, extra):
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    sata_disk = folder / "sata.raw"
    sata_disk.write_bytes(bytes(1 << 20))
    uuid = "2c5f39cb-3f42-42e3-994d-1127e4ddb5" + ("38" if "qmp" in name else "39")
    xml = folder / "domain.xml"
    xml.write_text(DOMAIN_XML.format(name=name, uuid=uuid, emulator=emulator, disk=disk,
                                      sata_disk=sata_disk))
    replacements = {str(folder): "DIR", name: "DOMAIN", uuid: "UUID"}
    seen: dict[str, str] = {}

    def run(key: str, *args: str) -> str:
        result = libvirtd.virsh(*args)
        seen[key] = normalize_virsh(result.stdout, replacements)
        return result.stdout

    run("define", "define", str(xml))
    try:
        # The controllers libvirt added at define: pcie-root, the root ports, q35's SATA.
        dumped = libvirtd.virsh("dumpxml", name).stdout
        seen["controllers"] = "\n".join(
            " ".join(found) for found in re.findall(
                r"<controller type='(\w+)' index='(\d+)'(?: model='([\w-]+)')?", dumped))
        run("start", "start", name)
        seen["devices"] = "\n".join(_devices(normalize_virsh(libvirtd.domain_log(name), replacements)))
        run("domstate-running", "domstate", name)
        run("domblklist", "domblklist", name)
        run("domblkinfo-sata", "domblkinfo", name, "sda")
        run("suspend", "suspend", name)
        run("domstate-paused", "domstate", name)
        run("resume", "resume", name)
        run("attach", "attach-disk", name, str(extra), "vdb", "--driver", "qemu",
            "--subdriver", "qcow2", "--live")
        run("domblklist-attached", "domblklist", name)
        seen["attached-address"] = " ".join(re.findall(
            r"<target dev='vdb' bus='virtio'/>\s*<alias name='[^']*'/>\s*(<address [^>]*>)",
            libvirtd.virsh("dumpxml", name).stdout))
        run("detach", "detach-disk", name, "vdb", "--live")
        run("domblklist-detached", "domblklist", name)
        run("shutdown", "shutdown", name)
        deadline = time.monotonic() + 3
        while run("domstate-after-shutdown", "domstate", name).strip() == "running":
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        libvirtd.virsh("destroy", name, check=False)
    run("undefine", "undefine", name)
    return seen


def test_q35_domain_flow(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """A q35 domain with a virtio and a SATA disk: define, start, domblklist, hot-plug of
    a virtio disk onto the spare root port and its unplug, suspend/resume, shutdown; then
    the same on QEMU, and virsh's answers compared."""
    ours = _flow(libvirtd, tmp_path / "ours", "qmp-q35", str(emulator))
    controllers = ours["controllers"].splitlines()
    assert {"pci 0 pcie-root", "pci 1 pcie-root-port", "sata 0 "} <= set(controllers), controllers
    assert ours["domstate-running"] == "running"
    assert ours["domblklist"].split("\n")[-2:] == ["vda DIR/disk.qcow2", "sda DIR/sata.raw"]
    assert '"driver":"ide-hd","bus":"ide.0"' in ours["devices"]
    assert '"driver":"pcie-root-port"' in ours["devices"]
    assert ours["domblkinfo-sata"].splitlines()[0] == "Capacity: 1048576"
    assert ours["domstate-paused"] == "paused"
    assert ours["domblklist-attached"].split("\n")[-3:] == [
        "vda DIR/disk.qcow2", "vdb DIR/extra.qcow2", "sda DIR/sata.raw"]
    assert ours["detach"] == "Disk detached successfully"
    # Our guest acknowledges the unplug and the power button at once.
    assert ours["domblklist-detached"] == ours["domblklist"]
    assert ours["domstate-after-shutdown"] == "shut off"
    if QEMU is None:
        return
    theirs = _flow(libvirtd, tmp_path / "qemu", "qemu-q35", QEMU)
    # QEMU's guest (firmware, no OS) acknowledges neither: the disk stays, the domain runs.
    different = {"domblklist-detached", "domstate-after-shutdown"}
    assert {key: value for key, value in ours.items() if key not in different} == \
        {key: value for key, value in theirs.items() if key not in different}
    assert theirs["domblklist-detached"] == theirs["domblklist-attached"]
