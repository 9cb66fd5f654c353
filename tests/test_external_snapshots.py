"""External snapshots (blockdev-snapshot, blockdev-snapshot-sync) against QEMU 7.2.

Every scenario runs on QEMU and on our server, each in a directory whose path has the
same length ("qemu"/"ours"), so that even the overlay images' bytes (which hold the
backing file's absolute path) can be compared. What is compared: replies and error
texts, query-block / query-named-block-nodes (members QEMU 7.2 has), the image lock
bytes, the overlay files byte for byte, and qemu-img info --backing-chain / check /
qemu-io reads on the images afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from libvirt_support import (
    Libvirtd,
    domain_xml,
    installed_entry_point,
    libvirt_installed,
    user_namespaces_work,
)
from lock_probe import locked
from server_support import Client, running

MiB = 1 << 20
#: Members of BlockDeviceInfo QEMU 7.2 does not have (we answer as QEMU 10.x).
NEWER = ("active", "children")


def _norm(value: Any, work: Path) -> Any:
    text = json.dumps(value).replace(str(work), "@TMP@")
    data = json.loads(text)
    return _strip(data)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if k not in NEWER and not (k == "node-name" and str(v).startswith("#block"))}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _images(work: Path) -> None:
    for name in ("base.qcow2", "ov.qcow2", "other.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / name), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    str(work / "withbacking.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 128k", str(work / "base.qcow2")],
                   check=True, capture_output=True)


def both(tmp_path: Path, args: Callable[[Path], list[str]],
         scenario: Callable[[Client, Path], list[Any]]) -> tuple[list[Any], list[Any]]:
    """Run ``scenario`` on QEMU and on us; return (theirs, ours), paths normalized."""
    results = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        _images(work)
        with running(args(work), work, qemu=qemu) as (proc, client):
            seen = scenario(client, work)
            client.execute("quit")
            proc.wait(timeout=20)
        results.append(_norm(seen, work))
    return results[0], results[1]


def _steps(client: Client, work: Path, steps: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    seen = []
    for name, arguments in steps:
        arguments = json.loads(json.dumps(arguments).replace("@TMP@", str(work)))
        seen.append([name, client.execute(name, arguments)])
    return seen


def _file(name: str) -> dict[str, Any]:
    return {"driver": "file", "filename": f"@TMP@/{name}"}


ERRORS: list[tuple[str, dict[str, Any]]] = [
    ("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": _file("base.qcow2")}),
    ("blockdev-add", {"driver": "file", "node-name": "ovf", "filename": "@TMP@/ov.qcow2"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": "ovf", "backing": None}),
    ("blockdev-add", {"driver": "raw", "node-name": "rawov", "file": _file("other.qcow2")}),
    ("blockdev-snapshot", {"node": "nope", "overlay": "ov"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "nope"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "ovf"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "rawov"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "base"}),
    ("blockdev-del", {"node-name": "rawov"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "withb", "file": _file("other.qcow2"),
                      "backing": "base"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "withb"}),
    ("blockdev-snapshot", {"node": "withb", "overlay": "base"}),
    ("blockdev-snapshot", {"node": "ov", "overlay": "withb"}),
    ("blockdev-del", {"node-name": "base"}),
    ("blockdev-del", {"node-name": "withb"}),
    ("blockdev-snapshot-sync", {"snapshot-file": "@TMP@/x.qcow2"}),
    ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": "@TMP@/x.qcow2"}),
    ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": "@TMP@/x.qcow2",
                                "snapshot-node-name": "ov"}),
    ("blockdev-snapshot-sync", {"device": "base", "snapshot-file": "@TMP@/x.qcow2"}),
    ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": "@TMP@/nodir/x.qcow2",
                                "snapshot-node-name": "sn"}),
    ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": "@TMP@/x.qcow2",
                                "snapshot-node-name": "sn", "format": "raw"}),
    ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": "@TMP@/x.qcow2",
                                "snapshot-node-name": "sn", "mode": "existing"}),
    # Succeeds, but nothing uses the overlay, so it is closed again at once (as in QEMU),
    # and the old top stays read-only.
    ("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": "@TMP@/x.qcow2",
                                "snapshot-node-name": "sn"}),
    ("blockdev-snapshot-sync", {"node-name": "sn", "snapshot-file": "@TMP@/y.qcow2",
                                "snapshot-node-name": "sn2"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "ov"}),
    ("blockdev-snapshot", {"node": "base", "overlay": "ov"}),
    ("blockdev-del", {"node-name": "base"}),
    ("blockdev-del", {"node-name": "ov"}),
]


def test_errors_as_qemu(tmp_path: Path, qemu_system: str) -> None:
    def scenario(client: Client, work: Path) -> list[Any]:
        seen = _steps(client, work, ERRORS)
        nodes = client.cmd("query-named-block-nodes")
        seen.append([(n["node-name"] if not n["node-name"].startswith("#") else "#generated", n["ro"],
                      n.get("backing_file"), n["backing_file_depth"]) for n in nodes])
        return seen

    theirs, ours = both(tmp_path, lambda work: [], scenario)
    assert ours == theirs
    texts = [step[1].get("error", {}).get("desc") for step in ours[:-1]]
    for text in ("The overlay is already in use", "The overlay does not support backing images",
                 "Making 'base' a backing child of 'base' would create a cycle",
                 "Node 'base' is busy: node is used as backing hd of 'withb'",
                 "The overlay already has a backing image", "New overlay node-name missing",
                 "New overlay node-name already in use",
                 "Backing file not supported for file format 'raw'"):
        assert text in texts


def _drive(work: Path) -> list[str]:
    return ["-drive", f"if=none,id=d0,file={work / 'base.qcow2'},format=qcow2"]


def _view(client: Client, work: Path) -> list[Any]:
    block = client.cmd("query-block")
    nodes = client.cmd("query-named-block-nodes")
    return [block, nodes, {name: locked(work / name) for name in ("base.qcow2", "ov.qcow2")}]


#: What HMP qemu-io printed on our server's stdout (and its monitor said); the images
#: are compared with QEMU's after the run.
IO_OUTPUT: list[str] = []


def _io(client: Client, device: str, command: str) -> None:
    out: str = client.qemu_io(f'{device} "{command}"')
    if client.conforms:  # our server
        IO_OUTPUT.append(out)


def _after(work: Path) -> list[Any]:
    """What qemu-img and qemu-io say of the images once the server is gone."""
    info = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(work / "ov.qcow2")],
                          capture_output=True, text=True, check=True)
    chain = json.loads(info.stdout)
    for image in chain:
        image.pop("actual-size", None)
    checks = [subprocess.run(["qemu-img", "check", str(work / name)], capture_output=True,
                             text=True).returncode for name in ("ov.qcow2", "base.qcow2")]
    reads = [subprocess.run(["qemu-io", "-c", command, str(work / name)], capture_output=True,
                            text=True).stdout.splitlines()[0]
             for name, command in (("ov.qcow2", "read -P 0x22 64k 64k"), ("ov.qcow2", "read -P 0x11 0 64k"),
                                   ("base.qcow2", "read -P 0x11 0 128k"))]
    return [chain, checks, reads]


def test_snapshot_sync_on_a_drive(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """The usual flow: a -drive backend, snapshot-sync by device name; writes go to the
    overlay, reads of what it lacks fall through to the base."""
    overlays: list[bytes] = []

    def scenario(client: Client, work: Path) -> list[Any]:
        (work / "ov.qcow2").unlink()
        seen: list[Any] = [_steps(client, work, [("blockdev-snapshot-sync", {
            "device": "d0", "snapshot-file": "@TMP@/ov.qcow2", "snapshot-node-name": "top"})])]
        _io(client, "d0", "write -P 0x22 64k 64k")
        _io(client, "d0", "read -P 0x11 0 64k")
        _io(client, "d0", "read -P 0x22 64k 64k")
        seen.append(_view(client, work))
        seen.append(_steps(client, work, [("blockdev-del", {"node-name": "top"})]))
        return seen

    results = []
    for qemu in (True, False):
        work = tmp_path / ("qemu" if qemu else "ours")
        work.mkdir()
        _images(work)
        with running(_drive(work), work, qemu=qemu) as (proc, client):
            seen = scenario(client, work)
            client.execute("quit")
            proc.wait(timeout=20)
        seen.append(_after(work))
        path = str(work).encode()  # same length in both runs: the layout is unchanged
        overlays.append((work / "ov.qcow2").read_bytes().replace(path, b"W" * len(path)))
        results.append(_norm(seen, work))
    theirs, ours = results
    assert ours == theirs
    assert overlays[0] == overlays[1]
    # Spelled out: the device now reads the overlay, whose backing is the old top.
    inserted = ours[1][0][0]["inserted"]
    assert inserted["node-name"] == "top" and inserted["backing_file"] == "@TMP@/base.qcow2"
    assert ours[-1][1] == [0, 0]
    assert [line.split(" ")[0] for line in IO_OUTPUT[-3:]] == ["wrote", "read", "read"]
    assert not any("verification failed" in line for line in IO_OUTPUT)


def test_blockdev_snapshot_on_a_drive(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """blockdev-snapshot with an overlay created by blockdev-create and added with
    backing null: the drive's backend moves to it, locks follow."""

    def scenario(client: Client, work: Path) -> list[Any]:
        (work / "ov.qcow2").unlink()
        seen: list[Any] = []
        for job, options in (("f", {"driver": "file", "filename": str(work / "ov.qcow2"), "size": 0}),
                             ("q", {"driver": "qcow2", "file": "ovf", "size": MiB,
                                    "backing-file": str(work / "base.qcow2"), "backing-fmt": "qcow2"})):
            if job == "q":
                client.cmd("blockdev-add", driver="file", node_name="ovf", filename=str(work / "ov.qcow2"))
            client.cmd("blockdev-create", job_id=job, options=options)
            while client.wait_event("JOB_STATUS_CHANGE")["data"]["status"] != "concluded":
                pass
            client.cmd("job-dismiss", id=job)
        seen.append(_steps(client, work, [
            ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": "ovf", "backing": None}),
            ("blockdev-snapshot", {"node": "d0", "overlay": "top"}),
        ]))
        _io(client, "d0", "write -P 0x22 64k 64k")
        _io(client, "d0", "read -P 0x11 0 64k")
        seen.append(_view(client, work))
        return seen

    theirs, ours = both(tmp_path, _drive, scenario)
    assert ours == theirs
    assert ours[1][2] == theirs[1][2]
    assert not any("verification failed" in line for line in IO_OUTPUT)


@pytest.mark.parametrize("backing", [
    pytest.param('json:{"driver": "qcow2", "file": {"driver": "file", "filename": "@TMP@/base.qcow2"}}',
                 id="json-qcow2"),
    pytest.param('json:{"file": {"driver": "file", "filename": "@TMP@/base.qcow2"}}', id="json-probed"),
])
def test_json_backing_filename(tmp_path: Path, qemu_system: str, qemu_utils: None, backing: str) -> None:
    """Images whose backing file name is a json:{...} description open as QEMU opens them."""

    def scenario(client: Client, work: Path) -> list[Any]:
        name = backing.replace("@TMP@", str(work))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2",
                        str(work / "top.qcow2"), "1M"], check=True)
        seen: list[Any] = _steps(client, work, [("blockdev-add", {
            "driver": "qcow2", "node-name": "top", "file": _file("top.qcow2")})])
        _io(client, "top", "read -P 0x11 0 64k")
        nodes = client.cmd("query-named-block-nodes")
        seen.append([(n["drv"], n["ro"], n["file"], n.get("backing_file"), n["backing_file_depth"])
                     for n in nodes])
        return seen

    theirs, ours = both(tmp_path, lambda work: [], scenario)
    assert ours == theirs
    assert IO_OUTPUT[-1].startswith("read 65536/65536")


def test_old_top_keeps_its_persistent_bitmaps(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """The old top is reopened read-only: its persistent bitmaps are stored then (not lost,
    not left in_use) and stay readable, as in QEMU."""

    def scenario(client: Client, work: Path) -> list[Any]:
        (work / "ov.qcow2").unlink()
        seen: list[Any] = _steps(client, work, [
            ("block-dirty-bitmap-add", {"node": "d0", "name": "b0", "persistent": True}),
        ])
        _io(client, "d0", "write -P 0x33 0 64k")
        seen += _steps(client, work, [
            ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "@TMP@/ov.qcow2",
                                        "snapshot-node-name": "top"}),
            ("x-debug-block-dirty-bitmap-sha256", {"node": "top", "name": "b0"}),
        ])
        base = next(n for n in client.cmd("query-named-block-nodes") if n["drv"] == "qcow2"
                    and n["node-name"] != "top")
        seen.append((base["ro"], base.get("dirty-bitmaps")))
        seen += _steps(client, work, [("x-debug-block-dirty-bitmap-sha256", {"node": base["node-name"],
                                                                              "name": "b0"})])
        seen.append(json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(work / "base.qcow2")],
            capture_output=True, text=True, check=True).stdout)["format-specific"]["data"].get("bitmaps"))
        return seen

    theirs, ours = both(tmp_path, _drive, scenario)
    assert ours == theirs
    assert ours[-1] == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]


def test_blockdev_snapshot_under_a_device(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """A virtio-blk device's backend follows the new top (QEMU: -machine pc -S)."""

    def args(work: Path) -> list[str]:
        return ["-machine", "pc", "-S",
                "-blockdev",
                f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={work / 'base.qcow2'}",
                "-device", "virtio-blk-pci,drive=disk0,id=vd0"]

    def scenario(client: Client, work: Path) -> list[Any]:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(work / "base.qcow2"),
                        "-F", "qcow2", str(work / "ov.qcow2"), "1M"], check=True)
        seen: list[Any] = _steps(client, work, [
            ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": _file("ov.qcow2"),
                              "backing": None}),
            ("blockdev-snapshot", {"node": "vd0", "overlay": "top"}),
            ("blockdev-snapshot", {"node": "disk0", "overlay": "top"}),
        ])
        seen.append(_view(client, work))
        seen += _steps(client, work, [
            ("blockdev-del", {"node-name": "disk0"}),
            ("blockdev-del", {"node-name": "top"}),
            ("blockdev-snapshot-sync", {"node-name": "top", "snapshot-file": "@TMP@/ov2.qcow2",
                                        "snapshot-node-name": "top2"}),
        ])
        seen.append(_view(client, work))
        seen.append(locked(work / "ov2.qcow2"))
        return seen

    theirs, ours = both(tmp_path, args, scenario)
    assert ours == theirs
    block = ours[3][0][0]
    assert block["qdev"] == "/machine/peripheral/vd0/virtio-backend"
    assert block["inserted"]["node-name"] == "top"
    assert ours[-2][0][0]["inserted"]["node-name"] == "top2"


def test_transaction_all_or_nothing(tmp_path: Path, qemu_system: str, qemu_utils: None) -> None:
    """transaction (what libvirt sends for a disk-only snapshot): prepared actions are
    rolled back when a later one fails, committed together otherwise."""

    def summary(client: Client) -> list[Any]:
        nodes = client.cmd("query-named-block-nodes")
        return [(n["node-name"] if not n["node-name"].startswith("#") else "#generated", n["ro"],
                 n.get("backing_file"), n["backing_file_depth"]) for n in nodes]

    snap = {"type": "blockdev-snapshot", "data": {"node": "base", "overlay": "ov"}}
    sync: dict[str, Any] = {"type": "blockdev-snapshot-sync",
                            "data": {"node-name": "other", "snapshot-file": "@TMP@/o2.qcow2"}}

    def scenario(client: Client, work: Path) -> list[Any]:
        seen: list[Any] = _steps(client, work, [
            ("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": _file("base.qcow2")}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "other", "file": _file("other.qcow2")}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "ov", "file": _file("ov.qcow2"),
                              "backing": None}),
            ("transaction", {"actions": [snap, {"type": "abort", "data": {}}]}),
            ("transaction", {"actions": [snap, sync]}),
            ("transaction", {"actions": [snap], "properties": {"completion-mode": "grouped"}}),
            ("transaction", {"actions": []}),
            ("transaction", {"actions": [{"type": "abort"}]}),
        ])
        seen.append(summary(client))
        seen.append(locked(work / "base.qcow2"))
        sync["data"]["snapshot-node-name"] = "o2"
        seen += _steps(client, work, [("transaction", {"actions": [snap, sync]})])
        seen.append(summary(client))
        seen.append(locked(work / "base.qcow2"))
        del sync["data"]["snapshot-node-name"]
        return seen

    theirs, ours = both(tmp_path, lambda work: [], scenario)
    assert ours == theirs
    assert ours[3][1] == {"error": {"class": "GenericError",
                                    "desc": "Transaction aborted using Abort action"}}


def test_transaction_actions_not_implemented(tmp_path: Path) -> None:
    """Actions we do not have are refused by the argument check (QEMU has them)."""
    with running([], tmp_path) as (_, client):
        reply = client.execute("transaction", {"actions": [{
            "type": "blockdev-snapshot-internal-sync", "data": {"device": "x", "name": "s"}}]})
        # QEMU's text for an unknown union tag names the member without its path.
        assert reply["error"]["desc"] == \
            "Parameter 'type' does not accept value 'blockdev-snapshot-internal-sync'"


def test_libvirt_disk_only_snapshot(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    """virsh snapshot-create-as --disk-only: libvirt adds the overlay's file node, creates
    the qcow2 with a blockdev-create job (query-jobs, job-dismiss), adds it with backing
    null and sends a transaction of blockdev-snapshot; the same on QEMU."""
    if not libvirt_installed() or (os.geteuid() == 0 and not user_namespaces_work()):
        pytest.skip("needs libvirtd and virsh (and user namespaces as root)")
    entry = installed_entry_point()
    if entry is None:
        pytest.skip("the qmp-server console script is not installed (pip install -e .)")
    emulators = tmp_path / "emulators"
    emulators.mkdir()
    (emulators / "qemu-system-x86_64").symlink_to(entry)
    # A short root: libvirt's monitor socket paths under it must stay below 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="lv"))
    daemon = Libvirtd(root, emulators)
    daemon.start()
    results = []
    try:
        for name, emulator in (("qemu", qemu_system), ("ours", str(emulators / "qemu-system-x86_64"))):
            work = tmp_path / name
            work.mkdir()
            disk = work / "disk.qcow2"
            subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
            xml = work / "domain.xml"
            xml.write_text(domain_xml(name, emulator, disk))
            daemon.virsh("define", str(xml))
            daemon.virsh("start", name)
            seen = [daemon.virsh("snapshot-create-as", name, "s1", "--disk-only", "--diskspec",
                                 f"vda,file={work / 's1.qcow2'}").stdout,
                    daemon.virsh("domblklist", name).stdout,
                    daemon.virsh("snapshot-list", name, "--name").stdout]
            daemon.virsh("destroy", name)
            daemon.virsh("undefine", name, "--snapshots-metadata")
            info = subprocess.run([qemu_img, "info", "--backing-chain", "--output=json",
                                   str(work / "s1.qcow2")], capture_output=True, text=True, check=True)
            chain = json.loads(info.stdout)
            for image in chain:
                image.pop("actual-size", None)
            seen.append(chain)
            results.append(_norm(seen, work))
    finally:
        daemon.destroy_all()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    theirs, ours = results
    assert ours == theirs
    assert "@TMP@/s1.qcow2" in ours[1]
    assert ours[3][0]["backing-filename"] == "@TMP@/disk.qcow2"
