"""blockdev-reopen against QEMU 7.2: a backing node made writable and read-only again
(what libvirt does to merge a backing image's bitmaps), QEMU's refusals, a read-only
file node under a node made writable, two nodes reopened together; the replies, each
node's ``ro`` and the backing image's lock bytes after each request."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import qemu_tools
from lock_probe import locked
from server_support import running


def _requests(work: Path) -> list[list[dict[str, Any]]]:
    base = {"driver": "qcow2", "node-name": "b", "file": "bf"}
    top = {"driver": "qcow2", "node-name": "t", "file": "tf"}
    return [
        [{**base, "read-only": False}],  # its file node was opened read-only by name
        [{**base, "read-only": False},
         {"driver": "file", "node-name": "bf", "filename": str(work / "b.qcow2"), "read-only": False}],
        [{**base, "read-only": True},
         {"driver": "file", "node-name": "bf", "filename": str(work / "b.qcow2"), "read-only": True}],
        [{**base, "node-name": "nope"}],
        [{**base, "driver": "raw"}],
        [top],  # backing missing
        [{**top, "backing": "b", "read-only": True}],
        [{**top, "backing": "b", "read-only": False}],
        [{"node-name": "t", "driver": "qcow2", "file": "tf", "backing": None}],
    ]


def _session(work: Path, qemu: bool) -> list[Any]:
    work.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "b.qcow2"), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(work / "b.qcow2"), "-F", "qcow2",
                    str(work / "t.qcow2")], check=True)
    args = ["-blockdev", f"driver=file,node-name=bf,filename={work / 'b.qcow2'},read-only=on",
            "-blockdev", "driver=qcow2,node-name=b,file=bf,read-only=on",
            "-blockdev", f"driver=file,node-name=tf,filename={work / 't.qcow2'}",
            "-blockdev", "driver=qcow2,node-name=t,file=tf,backing=b"]
    seen: list[Any] = []
    with running(args, work, qemu=qemu) as (_, client):
        for options in _requests(work):
            reply = client.execute("blockdev-reopen", {"options": options})
            if "error" in reply and reply["error"]["desc"].startswith("qmp-server: "):
                reply = {"error": "not supported here"}
            seen.append(reply)
            seen.append(sorted((n["node-name"], n["ro"]) for n in client.cmd("query-named-block-nodes")))
            seen.append(locked(work / "b.qcow2"))
    return seen


def test_blockdev_reopen_as_qemu(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    theirs = _session(tmp_path / "qemu", qemu=True)
    ours = _session(tmp_path / "ours", qemu=False)
    # The last request detaches the backing node: QEMU can, we refuse (docs/block-layer.md).
    assert ours[-3] == {"error": "not supported here"}
    assert ours[:-3] == theirs[:-3]
    both_writable = [("b", False), ("bf", False), ("t", False), ("tf", False)]
    assert ours[4:6] == [both_writable, [100, 101, 103, 201, 203]]
