"""libvirt end to end: a private libvirtd with qmp-server as the domain's ``<emulator>``.

What is checked is what a libvirt user sees: virsh's output. The same flow runs on real
QEMU (TCG) where it is installed, and the two transcripts are compared after normalizing
names and paths. Where they differ by design (no guest: power-off and disk unplug are
acknowledged at once), the test says so. The daemon setup is in tests/libvirt_support.py;
docs/libvirt.md explains it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from libvirt_support import Libvirtd, domain_xml, normalize_virsh

QEMU = shutil.which("qemu-system-x86_64", path="/usr/bin:/usr/local/bin")
QEMU_IMG = shutil.which("qemu-img")


DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
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
      <source file='{ide_disk}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _disk(path: Path, size: str = "16M") -> Path:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def _domcapabilities(libvirtd: Libvirtd, binary: str) -> ET.Element:
    text = libvirtd.virsh("domcapabilities", "--emulatorbin", binary, "--virttype", "qemu",
                          "--arch", "x86_64").stdout
    return ET.fromstring(text)


def test_domcapabilities(libvirtd: Libvirtd, emulator: Path) -> None:
    """libvirt's capability probe of our server succeeds, and `virsh capabilities` lists it.

    The machine libvirt reports is the default type canonicalized (``pc`` resolved): the
    i440fx type of the release the emulator reports (``-version``), ours and QEMU's alike.
    """

    def release(binary: str) -> str:
        found = re.search(r"version (\d+\.\d+)\.", subprocess.run(
            [binary, "-version"], capture_output=True, text=True, timeout=30, check=True).stdout)
        assert found is not None, binary
        return found[1]

    caps = _domcapabilities(libvirtd, str(emulator))
    assert caps.findtext("path") == str(emulator)
    assert caps.findtext("domain") == "qemu"
    assert caps.findtext("arch") == "x86_64"
    assert release(str(emulator)) == "10.1"
    assert caps.findtext("machine") == f"pc-i440fx-{release(str(emulator))}"
    assert caps.find("iothreads").get("supported") == "yes"  # type: ignore[union-attr]
    disk_buses = [value.text for value in caps.iterfind("devices/disk/enum[@name='bus']/value")]
    assert "virtio" in disk_buses
    host = ET.fromstring(libvirtd.virsh("capabilities").stdout)
    emulators = [element.text for element in host.iterfind("guest/arch[@name='x86_64']/emulator")]
    assert str(emulator) in emulators
    machines = [m.text for m in host.iterfind("guest/arch[@name='x86_64']/machine")]
    assert "pc" in machines and "q35" in machines
    if QEMU is not None:
        # The parts that describe the machine, not the host, agree with QEMU's; the machine
        # names each side's own release.
        theirs = _domcapabilities(libvirtd, QEMU)
        for path in ("domain", "arch"):
            assert caps.findtext(path) == theirs.findtext(path), path
        assert theirs.findtext("machine") == f"pc-i440fx-{release(QEMU)}"
        assert caps.find("vcpu").get("max") == theirs.find("vcpu").get("max")  # type: ignore[union-attr]


def _flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """The flow a libvirt user runs on a domain; virsh's answers, normalized."""
    folder.mkdir()
    disk = _disk(folder / "disk.qcow2")
    ide_disk = folder / "ide.raw"
    ide_disk.write_bytes(bytes(1 << 20))
    extra = _disk(folder / "extra.qcow2")
    xml = folder / "domain.xml"
    uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427" if "qmp" in name else "1b4e28ba-2fa1-11d2-883f-0016d3cca428"
    xml.write_text(DOMAIN_XML.format(name=name, uuid=uuid, emulator=emulator, disk=disk,
                                      ide_disk=ide_disk))
    replacements = {str(folder): "DIR", name: "DOMAIN", uuid: "UUID"}
    seen: dict[str, str] = {}

    def run(key: str, *args: str) -> str:
        result = libvirtd.virsh(*args)
        seen[key] = normalize_virsh(result.stdout, replacements)
        return result.stdout

    run("define", "define", str(xml))
    try:
        run("start", "start", name)
        run("domstate-running", "domstate", name)
        run("domblklist", "domblklist", name)
        # Guest I/O on the virtio disk (qemu-io's aio commands are accounted as a device's
        # requests are), then what libvirt reads from query-blockstats and query-block.
        for command in ("aio_read 0 4k", "aio_read 4k 8k", "aio_flush"):
            libvirtd.virsh("qemu-monitor-command", name, "--hmp",
                           f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{command}"')
        # QEMU completes an aio request (and accounts it) when its I/O finishes, which may
        # be after the monitor replied: wait until the flush has been counted.
        deadline = time.monotonic() + 10
        while True:
            stats = run("domblkstat", "domblkstat", name, "vda").splitlines()
            if "vda flush_operations 1" in stats or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # The times are the only numbers that vary from run to run.
        seen["domblkstat"] = normalize_virsh("\n".join(re.sub(r"(_total_times) [1-9][0-9]*$", r"\1 N", line)
                                                  for line in stats), replacements)
        run("domblkinfo", "domblkinfo", name, "vda")
        run("domblkinfo-ide", "domblkinfo", name, "hda")
        run("suspend", "suspend", name)
        run("domstate-paused", "domstate", name)
        run("resume", "resume", name)
        run("domstate-resumed", "domstate", name)
        run("hmp", "qemu-monitor-command", name, "--hmp", "info status")
        status = json.loads(run("qmp-status", "qemu-monitor-command", name, '{"execute":"query-status"}'))
        # QEMU 7.2 still reports the deprecated 'singlestep' (QEMU 8.1 dropped it; we answer
        # as a newer QEMU).
        status["return"].pop("singlestep", None)
        seen["qmp-status"] = normalize_virsh(json.dumps(status["return"], sort_keys=True), replacements)
        names = json.loads(run("qmp-name", "qemu-monitor-command", name, '{"execute":"query-name"}'))
        seen["qmp-name"] = normalize_virsh(json.dumps(names["return"]), replacements)
        # An iothread hot-plugged (object-add) and removed (object-del), and the vCPU threads.
        run("iothreadadd", "iothreadadd", name, "1", "--live")
        run("iothreadinfo", "iothreadinfo", name)
        run("iothreaddel", "iothreaddel", name, "1", "--live")
        run("iothreadinfo-deleted", "iothreadinfo", name)
        vcpus = run("vcpuinfo", "vcpuinfo", name).splitlines()
        # Which host CPU a thread last ran on and its CPU time vary from run to run.
        seen["vcpuinfo"] = normalize_virsh("\n".join(line for line in vcpus
                                                if line.startswith(("VCPU:", "State:", "CPU Affinity:"))),
                                      replacements)
        run("attach", "attach-disk", name, str(extra), "vdb", "--driver", "qemu",
            "--subdriver", "qcow2", "--live")
        run("domblklist-attached", "domblklist", name)
        # The monitor behind the disk: the format node libvirt named, on the new image.
        nodes = json.loads(libvirtd.virsh("qemu-monitor-command", name, json.dumps(
            {"execute": "query-named-block-nodes", "arguments": {"flat": True}})).stdout)["return"]
        seen["nodes"] = normalize_virsh(json.dumps(sorted((node["node-name"], node["drv"], node["file"])
                                                     for node in nodes)), replacements)
        libvirtd.restart()
        run("domstate-after-restart", "domstate", name)
        run("domblklist-after-restart", "domblklist", name)
        run("suspend-after-restart", "suspend", name)
        run("resume-after-restart", "resume", name)
        run("detach", "detach-disk", name, "vdb", "--live")
        run("domblklist-detached", "domblklist", name)
        run("shutdown", "shutdown", name)
        # A guest that honours the power button powers off: libvirt sees the emulator exit.
        deadline = time.monotonic() + 3
        while run("domstate-after-shutdown", "domstate", name).strip() == "running":
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        libvirtd.virsh("destroy", name, check=False)
    run("domstate-destroyed", "domstate", name)
    run("undefine", "undefine", name)
    return seen


def test_domain_flow(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """define, start, domblklist, suspend/resume, the monitor, hot-plug, libvirtd restart,
    shutdown and destroy, with our server as the emulator; then the same on QEMU."""
    ours = _flow(libvirtd, tmp_path / "ours", "qmp-vm", str(emulator))
    assert ours["domstate-running"] == "running"
    assert ours["domstate-paused"] == "paused"
    assert ours["domstate-resumed"] == "running"
    assert ours["domblklist"].split("\n")[-2:] == ["vda DIR/disk.qcow2", "hda DIR/ide.raw"]
    assert ours["domblklist-attached"].split("\n")[-3:] == ["vda DIR/disk.qcow2", "vdb DIR/extra.qcow2",
                                                              "hda DIR/ide.raw"]
    assert ours["domstate-after-restart"] == "running"
    assert ours["domblklist-after-restart"] == ours["domblklist-attached"]
    assert ours["hmp"] == "VM status: running"
    assert json.loads(ours["qmp-status"]) == {"running": True, "status": "running"}
    assert json.loads(ours["qmp-name"]) == {"name": "DOMAIN"}
    assert ours["iothreadinfo"].splitlines()[-1].split()[0] == "1"
    assert ours["iothreadinfo-deleted"] == "No IOThreads found for the domain"
    assert ours["vcpuinfo"].splitlines()[:2] == ["VCPU: 0", "State: running"]
    assert ours["domblkstat"].splitlines()[:2] == ["vda rd_req 2", "vda rd_bytes 12288"]
    assert "vda flush_operations 1" in ours["domblkstat"].splitlines()
    assert ours["domblkinfo-ide"].splitlines()[0] == "Capacity: 1048576"
    assert ours["detach"] == "Disk detached successfully"
    assert ours["shutdown"] == "Domain 'DOMAIN' is being shutdown"
    assert ours["domstate-destroyed"] == "shut off"
    if QEMU is None:
        return
    theirs = _flow(libvirtd, tmp_path / "qemu", "qemu-vm", QEMU)
    # Everything a user sees is the same, except what needs a guest: our guest acknowledges
    # the unplug and the power button at once; QEMU's (firmware only, no OS) never does:
    # libvirt reports both requests as done, yet the disk stays and the domain runs on.
    # QEMU's firmware also reads the boot disk (SeaBIOS: its first sector), so QEMU's
    # read counters are ahead of ours by what the firmware read.
    different = {"domblklist-detached", "domstate-after-shutdown", "domblkstat"}
    assert {key: value for key, value in ours.items() if key not in different} == \
        {key: value for key, value in theirs.items() if key not in different}
    assert ours["domblklist-detached"] == ours["domblklist"]
    assert theirs["domblklist-detached"] == theirs["domblklist-attached"]
    assert ours["domstate-after-shutdown"] == "shut off"
    assert theirs["domstate-after-shutdown"] == "running"
    mine, qemus = ours["domblkstat"].splitlines(), theirs["domblkstat"].splitlines()
    assert mine[2:] == qemus[2:]
    assert int(qemus[0].split()[-1]) > 2 and int(qemus[1].split()[-1]) > 12288


def _destroy_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """Start a domain, check its disk is locked, destroy it while it runs, check again."""
    folder.mkdir()
    disk = _disk(folder / "disk.qcow2")
    ide_disk = folder / "ide.raw"
    ide_disk.write_bytes(bytes(1 << 20))
    xml = folder / "domain.xml"
    uuid = "6f1e0d3a-5b7c-4c2e-9a8b-0d1c2e3f4a5" + ("b" if "qmp" in name else "c")
    xml.write_text(DOMAIN_XML.format(name=name, uuid=uuid, emulator=emulator, disk=disk,
                                      ide_disk=ide_disk))
    replacements = {str(folder): "DIR", name: "DOMAIN", uuid: "UUID"}
    seen: dict[str, str] = {}

    def writer() -> str:
        # What another program sees when it tries to write the domain's disk.
        assert QEMU_IMG is not None
        qemu_io = shutil.which("qemu-io")
        assert qemu_io is not None
        result = subprocess.run([qemu_io, "-f", "qcow2", "-c", "write 0 4k", str(disk)],
                                capture_output=True, text=True)
        return normalize_virsh(result.stdout + result.stderr, replacements).splitlines()[0]

    libvirtd.virsh("define", str(xml))
    try:
        libvirtd.virsh("start", name)
        seen["domstate-running"] = libvirtd.virsh("domstate", name).stdout.strip()
        seen["writer-while-running"] = writer()
        seen["destroy"] = normalize_virsh(libvirtd.virsh("destroy", name).stdout, replacements)
        seen["domstate-destroyed"] = libvirtd.virsh("domstate", name).stdout.strip()
        seen["writer-after-destroy"] = writer()
    finally:
        libvirtd.virsh("destroy", name, check=False)
        libvirtd.virsh("undefine", name, check=False)
    return seen


def test_destroy_a_running_domain(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """`virsh destroy` of a running domain stops the emulator and frees its disk's locks,
    as with QEMU: another writer is refused while it runs and allowed afterwards."""
    ours = _destroy_flow(libvirtd, tmp_path / "ours", "qmp-destroy", str(emulator))
    assert ours["domstate-running"] == "running"
    assert "Failed to get \"write\" lock" in ours["writer-while-running"]
    assert ours["destroy"] == "Domain 'DOMAIN' destroyed"
    assert ours["domstate-destroyed"] == "shut off"
    assert ours["writer-after-destroy"].startswith("wrote 4096/4096 bytes")
    if QEMU is not None:
        assert ours == _destroy_flow(libvirtd, tmp_path / "qemu", "qemu-destroy", QEMU)


def _scsi_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """A domain whose disks sit on a virtio-scsi controller: start, hot-plug and unplug a
    second SCSI disk (SCSI unplug needs no guest, in QEMU either), what the monitor shows."""
    folder.mkdir()
    disk, extra = _disk(folder / "disk.qcow2"), _disk(folder / "extra.qcow2")
    xml = folder / "domain.xml"
    xml.write_text(domain_xml(name, emulator, disk, bus="scsi"))
    replacements = {str(folder): "DIR", name: "DOMAIN"}
    seen: dict[str, str] = {}

    def run(key: str, *args: str) -> str:
        seen[key] = normalize_virsh(libvirtd.virsh(*args).stdout, replacements)
        return seen[key]

    libvirtd.virsh("define", str(xml))
    try:
        libvirtd.virsh("start", name)
        run("domblklist", "domblklist", name)
        run("attach", "attach-disk", name, str(extra), "sdb", "--driver", "qemu",
            "--subdriver", "qcow2", "--targetbus", "scsi", "--live")
        run("domblklist-attached", "domblklist", name)
        blocks = json.loads(libvirtd.virsh("qemu-monitor-command", name,
                                           '{"execute":"query-block"}').stdout)["return"]
        seen["qdevs"] = " ".join(sorted(block["qdev"] for block in blocks))
        seen["info-block"] = normalize_virsh(re.sub(r"#block\d+", "#block", libvirtd.virsh(
            "qemu-monitor-command", name, "--hmp", "info block").stdout), replacements)
        run("detach", "detach-disk", name, "sdb", "--live")
        # The unplug ends with DEVICE_DELETED, which libvirt waits for.
        deadline = time.monotonic() + 5
        while "sdb" in run("domblklist-detached", "domblklist", name) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        libvirtd.virsh("destroy", name, check=False)
        libvirtd.virsh("undefine", name, check=False)
    return seen


def test_scsi_disks(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """libvirt's virtio-scsi controller and SCSI disks, hot-plug and unplug included, as
    libvirt sees them on QEMU."""
    ours = _scsi_flow(libvirtd, tmp_path / "ours", "qmp-scsi", str(emulator))
    assert ours["domblklist"].splitlines()[-1] == "sda DIR/disk.qcow2"
    assert ours["domblklist-attached"].splitlines()[-2:] == ["sda DIR/disk.qcow2", "sdb DIR/extra.qcow2"]
    assert ours["qdevs"] == "scsi0-0-0-0 scsi0-0-0-1"
    assert ours["detach"] == "Disk detached successfully"
    assert ours["domblklist-detached"] == ours["domblklist"]
    if QEMU is not None:
        assert ours == _scsi_flow(libvirtd, tmp_path / "qemu", "qemu-scsi", QEMU)


def _backing_chain(libvirtd: Libvirtd, name: str) -> str:
    """The disk's source and its backing chain as the domain XML lists them."""
    domain = ET.fromstring(libvirtd.virsh("dumpxml", name).stdout)
    disk = domain.find("devices/disk")
    assert disk is not None
    files = []
    while disk is not None and disk.find("source") is not None:
        files.append(disk.find("source").get("file", ""))  # type: ignore[union-attr]
        disk = disk.find("backingStore")
    return " ".join(files)


class _Session:
    """One domain's flow under libvirt: its images in ``folder``, virsh's answers (and
    what qemu-img and qemu-io say of the images) by key, with the folder and the domain's
    name normalized away."""

    def __init__(self, libvirtd: Libvirtd, folder: Path, name: str) -> None:
        assert QEMU_IMG is not None
        qemu_io = shutil.which("qemu-io")
        assert qemu_io is not None
        folder.mkdir()
        self.libvirtd, self.folder, self.name = libvirtd, folder, name
        self.qemu_img, self.qemu_io = QEMU_IMG, qemu_io
        self.replacements = {str(folder): "DIR", name: "DOMAIN"}
        self.seen: dict[str, str] = {}

    def image(self, *args: str) -> None:
        """Run a tool in the folder (``qemu-img`` or ``qemu-io`` first)."""
        tool = {"qemu-img": self.qemu_img, "qemu-io": self.qemu_io}[args[0]]
        subprocess.run([tool, *args[1:]], check=True, capture_output=True, cwd=self.folder)

    def run(self, key: str, *args: str) -> str:
        """virsh ARGS, its output recorded as ``key``."""
        result = self.libvirtd.virsh(*args, check=False)
        self.seen[key] = normalize_virsh(result.stdout + result.stderr, self.replacements)
        return self.seen[key]

    def chain(self, key: str) -> None:
        """The disk's backing chain in the domain XML."""
        self.seen[key] = normalize_virsh(_backing_chain(self.libvirtd, self.name), self.replacements)

    def guest_write(self, command: str) -> None:
        """A write by the guest's disk (HMP qemu-io on its backend)."""
        self.libvirtd.virsh("qemu-monitor-command", self.name, "--hmp",
                            f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{command}"')

    def wait_for_backup(self) -> None:
        """Until domjobinfo no longer shows a backup, then its --completed summary."""
        deadline = time.monotonic() + 30
        while "Backup" in self.run("jobinfo", "domjobinfo", self.name) and time.monotonic() < deadline:
            time.sleep(0.1)
        completed = self.run("jobinfo-completed", "domjobinfo", self.name, "--completed")
        kept = ("Job type", "Operation", "File total")
        self.seen["jobinfo-completed"] = "\n".join(line for line in completed.splitlines()
                                                   if line.split(":")[0] in kept)

    @contextmanager
    def domain(self, emulator: str, disk: Path) -> Iterator[None]:
        """The domain defined and started on ``disk``; destroyed and undefined after."""
        xml = self.folder / "domain.xml"
        xml.write_text(domain_xml(self.name, emulator, disk))
        self.libvirtd.virsh("define", str(xml))
        try:
            self.libvirtd.virsh("start", self.name)
            yield
        finally:
            self.libvirtd.virsh("destroy", self.name, check=False)
            self.libvirtd.virsh("undefine", self.name, "--checkpoints-metadata", check=False)

    def read(self, key: str, image: str, pattern: str, offset: str, length: str = "64k") -> None:
        """qemu-io's verdict on a pattern read from an image."""
        command = f"read -P {pattern} {offset} {length}"
        result = subprocess.run([self.qemu_io, "-r", "-f", "qcow2", "-c", command, str(self.folder / image)],
                                capture_output=True, text=True)
        first = result.stdout.splitlines()[0] if result.stdout else ""
        self.seen[key] = normalize_virsh(first + result.stderr, self.replacements)

    def check(self, *images: str) -> None:
        """qemu-img check's exit status for each image."""
        for image in images:
            result = subprocess.run([self.qemu_img, "check", str(self.folder / image)],
                                    capture_output=True, text=True)
            self.seen[f"check-{image}"] = str(result.returncode)

    def info_chain(self, key: str, image: str) -> None:
        """qemu-img info --backing-chain, without the disk sizes."""
        info = subprocess.run([self.qemu_img, "info", "--backing-chain", str(self.folder / image)],
                              capture_output=True, text=True)
        self.seen[key] = normalize_virsh("\n".join(line for line in info.stdout.splitlines()
                                                   if not line.startswith("disk size:")), self.replacements)


def _blockcommit_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """virsh blockcommit on a domain whose disk is top over mid over base: mid into base
    (below the active layer, issue 10), then the active layer into the base with --pivot,
    then a new overlay (a disk-only snapshot) committed with --active --wait and pivoted
    with blockjob --pivot. virsh's answers, the chain in the domain XML, the images."""
    flow = _Session(libvirtd, folder, name)
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "16M")
    flow.image("qemu-io", "-c", "write -P 0x11 0 1M", "base.qcow2")
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    flow.image("qemu-io", "-c", "write -P 0x22 512k 1M", "mid.qcow2")
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    flow.image("qemu-io", "-c", "write -P 0x33 1M 1M", "top.qcow2")
    run = flow.run
    with flow.domain(emulator, folder / "top.qcow2"):
        flow.chain("chain")
        run("commit-mid", "blockcommit", name, "vda", "--top", str(folder / "mid.qcow2"), "--wait")
        flow.chain("chain-after-commit")
        flow.guest_write("write -P 0x44 3M 64k")
        run("commit-active", "blockcommit", name, "vda", "--active", "--pivot", "--wait")
        run("domblklist-pivoted", "domblklist", name)
        flow.chain("chain-pivoted")
        run("snapshot", "snapshot-create-as", name, "s1", "--disk-only", "--no-metadata",
            "--diskspec", f"vda,file={folder / 'over.qcow2'}")
        flow.guest_write("write -P 0x55 5M 64k")
        run("commit-ready", "blockcommit", name, "vda", "--active", "--wait")
        run("blockjob-info", "blockjob", name, "vda", "--info")
        run("blockjob-pivot", "blockjob", name, "vda", "--pivot")
        deadline = time.monotonic() + 10
        while "over.qcow2" in run("domblklist-final", "domblklist", name) and time.monotonic() < deadline:
            time.sleep(0.1)
        flow.chain("chain-final")
        run("blockjob-none", "blockjob", name, "vda", "--info")
    # The base holds everything the guest saw; every image is consistent.
    for pattern, offset, length in (("0x11", "0", "512k"), ("0x22", "512k", "512k"), ("0x33", "1M", "1M"),
                                    ("0x44", "3M", "64k"), ("0x55", "5M", "64k"), ("0", "6M", "1M")):
        flow.read(f"read-{offset}", "base.qcow2", pattern, offset, length)
    flow.check("base.qcow2", "mid.qcow2", "top.qcow2", "over.qcow2")
    return flow.seen


def test_blockcommit(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """`virsh blockcommit` below the active layer, `--active --pivot`, and `--active`
    followed by `blockjob --pivot`, as libvirt does them on QEMU."""
    ours = _blockcommit_flow(libvirtd, tmp_path / "ours", "qmp-commit", str(emulator))
    assert ours["chain"] == "DIR/top.qcow2 DIR/mid.qcow2 DIR/base.qcow2"
    assert ours["chain-after-commit"] == "DIR/top.qcow2 DIR/base.qcow2"
    assert ours["chain-pivoted"] == "DIR/base.qcow2"
    assert ours["chain-final"] == "DIR/base.qcow2"
    assert ours["commit-active"] == "Successfully pivoted"
    assert all(value == "0" for key, value in ours.items() if key.startswith("check-"))
    if QEMU is not None:
        theirs = _blockcommit_flow(libvirtd, tmp_path / "qemu", "qemu-commit", QEMU)
        assert ours == theirs


def _commit_middle_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """`virsh blockcommit --top s2 --base base --wait` on active <- s3 <- s2 <- base
    (issue 11): libvirt opens s3 read-only, and s3's header must name the base at the
    end. virsh's answers, domblklist, the chain in the domain XML, and once the domain
    is gone what `qemu-img info --backing-chain` and qemu-io say of the images."""
    flow = _Session(libvirtd, folder, name)
    layers = ("base", "s2", "s3", "active")
    for index, layer in enumerate(layers):
        backing = ["-b", f"{layers[index - 1]}.qcow2", "-F", "qcow2"] if index else []
        flow.image("qemu-img", "create", "-q", "-f", "qcow2", *backing, f"{layer}.qcow2", "16M")
        flow.image("qemu-io", "-c", f"write -P 0x{index + 1}{index + 1} {index}M 1M", f"{layer}.qcow2")
    with flow.domain(emulator, folder / "active.qcow2"):
        flow.chain("chain")
        flow.run("commit", "blockcommit", name, "vda", "--top", str(folder / "s2.qcow2"),
                 "--base", str(folder / "base.qcow2"), "--wait")
        flow.run("domblklist", "domblklist", name)
        flow.chain("chain-after")
        flow.run("blockjob-none", "blockjob", name, "vda", "--info")
    flow.info_chain("backing-chain", "active.qcow2")
    for index in range(4):
        flow.read(f"read-{index}M", "active.qcow2", f"0x{index + 1}{index + 1}", f"{index}M", "1M")
    flow.check("base.qcow2", "s3.qcow2", "active.qcow2")
    return flow.seen


def test_blockcommit_below_a_read_only_overlay(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """`virsh blockcommit --top <s2> --base <base>` on a four-layer chain: the job
    completes although s3 (whose header changes) is read-only, as on QEMU."""
    ours = _commit_middle_flow(libvirtd, tmp_path / "ours", "qmp-commit-mid", str(emulator))
    assert ours["chain"] == "DIR/active.qcow2 DIR/s3.qcow2 DIR/s2.qcow2 DIR/base.qcow2"
    assert ours["commit"] == "Commit complete"
    assert ours["chain-after"] == "DIR/active.qcow2 DIR/s3.qcow2 DIR/base.qcow2"
    assert "backing file: DIR/base.qcow2\nbacking file format: qcow2" in ours["backing-chain"]
    assert all(value == "0" for key, value in ours.items() if key.startswith("check-"))
    if QEMU is not None:
        assert ours == _commit_middle_flow(libvirtd, tmp_path / "qemu", "qemu-commit-mid", QEMU)


def _blockcopy_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """virsh blockcopy (blockdev-mirror): the whole chain into a new qcow2 with --pivot,
    then the copy's top into a pre-made image (--shallow --reuse-external) left in sync
    and ended with blockjob --abort; guest writes meanwhile. virsh's answers, the chain in
    the domain XML, and the images afterwards."""
    flow = _Session(libvirtd, folder, name)
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "16M")
    flow.image("qemu-io", "-c", "write -P 0x11 0 1M", "base.qcow2")
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    flow.image("qemu-io", "-c", "write -P 0x22 1M 1M", "top.qcow2")
    run = flow.run
    with flow.domain(emulator, folder / "top.qcow2"):
        flow.guest_write("write -P 0x33 2M 64k")
        run("copy", "blockcopy", name, "vda", str(folder / "copy.qcow2"), "--format", "qcow2",
            "--transient-job", "--wait", "--pivot")
        run("domblklist-copied", "domblklist", name)
        flow.chain("chain-copied")
        flow.guest_write("write -P 0x44 3M 64k")
        flow.image("qemu-img", "create", "-q", "-f", "qcow2", "shallow.qcow2", "16M")
        run("shallow", "blockcopy", name, "vda", str(folder / "shallow.qcow2"), "--format", "qcow2",
            "--shallow", "--reuse-external", "--transient-job", "--wait")
        run("blockjob-info", "blockjob", name, "vda", "--info")
        flow.guest_write("write -P 0x55 4M 64k")
        run("abort", "blockjob", name, "vda", "--abort")
        run("domblklist-final", "domblklist", name)
        run("blockjob-none", "blockjob", name, "vda", "--info")
    for file, pattern, offset in (("copy.qcow2", "0x11", "0"), ("copy.qcow2", "0x22", "1M"),
                                  ("copy.qcow2", "0x33", "2M"), ("copy.qcow2", "0x44", "3M"),
                                  ("copy.qcow2", "0x55", "4M"), ("shallow.qcow2", "0x44", "3M"),
                                  ("shallow.qcow2", "0x55", "4M"), ("shallow.qcow2", "0x11", "0")):
        flow.read(f"read-{file}-{offset}", file, pattern, offset)
    flow.info_chain("copy-chain", "copy.qcow2")
    flow.check("base.qcow2", "top.qcow2", "copy.qcow2", "shallow.qcow2")
    return flow.seen


def test_blockcopy(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """`virsh blockcopy` with --pivot and with --shallow --reuse-external then
    blockjob --abort, as libvirt does them on QEMU."""
    ours = _blockcopy_flow(libvirtd, tmp_path / "ours", "qmp-copy", str(emulator))
    if QEMU is not None:
        assert ours == _blockcopy_flow(libvirtd, tmp_path / "qemu", "qemu-copy", QEMU)
    assert ours["copy"] == "Successfully pivoted"
    assert ours["domblklist-copied"].splitlines()[-1] == "vda DIR/copy.qcow2"
    assert ours["blockjob-info"] == "Block Copy: [100 %]"
    # The guest's writes reached both copies; --abort left the domain on copy.qcow2.
    assert all(value.startswith("read 65536/65536") for key, value in ours.items()
               if key.startswith("read-")), ours
    assert ours["domblklist-final"].splitlines()[-1] == "vda DIR/copy.qcow2"
    assert all(value == "0" for key, value in ours.items() if key.startswith("check-"))


def _backup_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """virsh backup-begin (push mode: libvirt creates the target with blockdev-create and
    starts blockdev-backup in a transaction), a guest write once it is over, then what
    virsh says and what the backup holds."""
    flow = _Session(libvirtd, folder, name)
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "16M")
    flow.image("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 8M 64k", "disk.qcow2")
    backup_xml = folder / "backup.xml"
    backup_xml.write_text("<domainbackup><disks><disk name='vda' type='file'>"
                          f"<target file='{folder}/backup.qcow2'/><driver type='qcow2'/>"
                          "</disk></disks></domainbackup>")
    with flow.domain(emulator, folder / "disk.qcow2"):
        flow.run("begin", "backup-begin", name, str(backup_xml))
        flow.wait_for_backup()
        flow.guest_write("write -P 0x33 0 64k")
        flow.run("domblklist", "domblklist", name)
    for pattern, offset in (("0x11", "0"), ("0x22", "8M"), ("0", "9M")):
        flow.read(f"read-{offset}", "backup.qcow2", pattern, offset)
    flow.check("backup.qcow2")
    return flow.seen


def test_backup_begin(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """`virsh backup-begin` in push mode, as libvirt does it on QEMU: the backup image
    holds the disk as it was, the domain goes on."""
    ours = _backup_flow(libvirtd, tmp_path / "ours", "qmp-backup", str(emulator))
    assert ours["begin"] == "Backup started"
    assert ours["jobinfo-completed"].splitlines()[:2] == ["Job type: Completed", "Operation: Backup"]
    assert all(ours[key].startswith("read 65536/65536") for key in ("read-0", "read-8M", "read-9M")), ours
    assert ours["check-backup.qcow2"] == "0"
    if QEMU is not None:
        assert ours == _backup_flow(libvirtd, tmp_path / "qemu", "qemu-backup", QEMU)


def _incremental_flow(libvirtd: Libvirtd, folder: Path, name: str, emulator: str) -> dict[str, str]:
    """virsh checkpoint-create-as (a persistent bitmap added in a transaction), a guest
    write, then backup-begin with <incremental>: libvirt merges the checkpoint's bitmap
    into a temporary one and backs up only what it marks, into an image whose backing is
    the disk itself."""
    flow = _Session(libvirtd, folder, name)
    flow.image("qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "16M")
    flow.image("qemu-io", "-c", "write -P 0x11 0 1M", "disk.qcow2")
    backup_xml = folder / "backup.xml"
    backup_xml.write_text("<domainbackup><incremental>c1</incremental><disks><disk name='vda' type='file'>"
                          f"<target file='{folder}/inc.qcow2'/><driver type='qcow2'/>"
                          "</disk></disks></domainbackup>")
    with flow.domain(emulator, folder / "disk.qcow2"):
        flow.run("checkpoint", "checkpoint-create-as", name, "c1")
        flow.guest_write("write -P 0x22 4M 64k")
        flow.run("begin", "backup-begin", name, str(backup_xml))
        flow.wait_for_backup()
        listed = libvirtd.virsh("checkpoint-list", name, check=False).stdout
        flow.seen["checkpoints"] = " ".join(line.split()[0] for line in listed.strip().splitlines()[2:])
    mapped = subprocess.run([flow.qemu_img, "map", "--output=json", str(folder / "inc.qcow2")],
                            capture_output=True, text=True, check=True)
    flow.seen["inc-map"] = " ".join(f"{entry['start']}+{entry['length']}:{entry['depth']}:{entry['data']}"
                                    for entry in json.loads(mapped.stdout))
    info = subprocess.run([flow.qemu_img, "info", "--output=json", str(folder / "disk.qcow2")],
                          capture_output=True, text=True, check=True)
    bitmaps = json.loads(info.stdout)["format-specific"]["data"].get("bitmaps", [])
    flow.seen["disk-bitmaps"] = " ".join(bitmap["name"] for bitmap in bitmaps)
    return flow.seen


def test_checkpoint_and_incremental_backup(libvirtd: Libvirtd, emulator: Path, tmp_path: Path) -> None:
    """A checkpoint, then an incremental backup from it, as libvirt does them on QEMU:
    the backup holds only the write made since the checkpoint, and the disk keeps the
    checkpoint's persistent bitmap."""
    ours = _incremental_flow(libvirtd, tmp_path / "ours", "qmp-incr", str(emulator))
    assert ours["checkpoint"] == "Domain checkpoint c1 created"
    assert ours["begin"] == "Backup started"
    assert ours["checkpoints"] == "c1"
    # Only 4M..4M+64k is in the backup itself (depth 0); the rest reads through the disk.
    assert "4194304+65536:0:True" in ours["inc-map"].split()
    assert ours["disk-bitmaps"] == "c1"
    if QEMU is not None:
        assert ours == _incremental_flow(libvirtd, tmp_path / "qemu", "qemu-incr", QEMU)
