"""HMP ``commit`` (bdrv_commit) against QEMU 7.2: the monitor's answers, then what
qemu-img and qemu-io say of the images once the process is gone.

QEMU empties a qcow2 v3 top without snapshots by rebuilding its metadata in a smaller
file (make_completely_empty); ours discards every cluster. The guest view, the backing
file's contents, ``qemu-img map`` and ``qemu-img check``'s verdict agree; the file's
length and ``Image end offset`` do not, and are left out.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import qemu_tools
from server_support import running


def _images(folder: Path, *, base_read_only: bool = False) -> None:
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, cwd=folder)

    run("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
    run("qemu-io", "-c", "write -P 0x11 0 128k", "-c", "write -P 0x11 1M 64k", "base.qcow2")
    # The top is larger than its backing file: the commit grows the backing file.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M")
    run("qemu-io", "-c", "write -P 0x22 64k 64k", "-c", "write -z 1M 64k", "-c", "write -P 0x33 3M 4k",
        "top.qcow2")
    (folder / "r.raw").write_bytes(bytes(1 << 20))


def _session(folder: Path, qemu: bool) -> list[object]:
    args = ["-machine", "none", "-S",
            "-drive", f"id=testdisk,if=none,file={folder / 'top.qcow2'}",
            "-drive", f"id=r,if=none,file={folder / 'r.raw'},format=raw"]
    seen: list[object] = []
    with running(args, folder, qemu=qemu) as (proc, client):
        for line in ("commit", "commit nosuch", "commit r", "commit testdisk",
                     'qemu-io testdisk "read -P 0x22 64k 64k"', "commit all", "help commit"):
            seen.append(client.hmp(line))
        seen.append(client.cmd("query-named-block-nodes")[0]["image"]["virtual-size"])
        # What commit wrote is on disk before quit: a look from outside, while it runs.
        mapped = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(folder / "top.qcow2")],
                                capture_output=True, text=True, check=True)
        seen.append(json.loads(mapped.stdout))
        client.execute("quit")
        proc.wait(timeout=30)
    for image in ("top.qcow2", "base.qcow2"):
        mapped = subprocess.run(["qemu-img", "map", "--output=json", str(folder / image)],
                                capture_output=True, text=True, check=True)
        seen.append(json.loads(mapped.stdout))
        check = subprocess.run(["qemu-img", "check", str(folder / image)], capture_output=True, text=True)
        seen.append([check.returncode, check.stdout.splitlines()[0]])
        info = subprocess.run(["qemu-img", "info", "--output=json", str(folder / image)],
                              capture_output=True, text=True, check=True)
        facts = json.loads(info.stdout)
        seen.append([facts["virtual-size"], facts.get("backing-filename"), facts.get("dirty-flag")])
    for pattern, offset, length in (("0x11", "0", "64k"), ("0x22", "64k", "64k"), ("0x11", "128k", "0"),
                                    ("0", "1M", "64k"), ("0x33", "3M", "4k"), ("0", "2M", "1M")):
        read = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern} {offset} {length}",
                               str(folder / "base.qcow2")], capture_output=True, text=True)
        seen.append(read.stdout.splitlines()[0] if read.stdout else read.stderr)
    return [re.sub(r"/(qemu|ours)/", "/DIR/", str(item)) for item in seen]


def test_hmp_commit_as_qemu(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    qemu_tools.require("qemu-img")
    results = []
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        _images(folder)
        results.append(_session(folder, qemu=name == "qemu"))
    theirs, ours = results
    assert ours == theirs
    # The base holds the top's data, grown to the top's size; the top shows it through.
    assert "'commit' error for 'r': Operation not supported" in ours[2]
    assert ours[-1].startswith("read 1048576/1048576")
    assert ours[-2].startswith("read 4096/4096")


def _backup_session(folder: Path, qemu: bool) -> list[object]:
    args = ["-machine", "none", "-S", "-drive", f"id=testdisk,if=none,file={folder / 'top.qcow2'}"]
    seen: list[object] = []
    with running(args, folder, qemu=qemu) as (proc, client):
        for line in ("help drive_backup", "drive_backup", "drive_backup nosuch /x",
                     f"drive_backup -n testdisk {folder}/missing.qcow2",
                     f"drive_backup testdisk {folder}/raw.img raw",
                     f"drive_backup -f testdisk {folder}/full.qcow2"):
            seen.append(client.hmp(line))
            deadline = time.monotonic() + 10
            while "No active jobs" not in client.hmp("info block-jobs") and time.monotonic() < deadline:
                time.sleep(0.05)
        client.execute("quit")
        proc.wait(timeout=30)
    compared = subprocess.run(["qemu-img", "compare", str(folder / "full.qcow2"), str(folder / "top.qcow2")],
                              capture_output=True, text=True)
    seen.append([compared.returncode, compared.stdout])
    output = (folder / "vm.out").read_text().splitlines()
    seen.append([line for line in output if line.startswith("Formatting")])
    return [re.sub(r"/(qemu|ours)/", "/DIR/", str(item)) for item in seen]


def test_hmp_drive_backup_as_qemu(tmp_path: Path) -> None:
    """HMP drive_backup (iotest 028): its help, argument errors, QMP's errors as
    `Error: ...`, and a full backup that reads as the disk."""
    qemu_tools.require("qemu-system-x86_64")
    results = []
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        _images(folder)
        results.append(_backup_session(folder, qemu=name == "qemu"))
    assert results[1] == results[0]
    assert results[1][-2] == "[0, 'Images are identical.\\n']"
