"""``/dev/fdset/N`` file names in the block layer (issue 11): blockdev-add opens a
duplicate of an fd set member whose access mode matches, as QEMU's qemu_open does.

The same descriptors are passed (SCM_RIGHTS, ``add-fd``) to our server and to QEMU 7.2
and the replies, the fd sets, the lock bytes on the underlying file and what
``qemu-io`` says about it are compared. Descriptor numbers are each process's own, so
they are compared by order of appearance.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from lock_probe import locked
from qemu_tools import require
from server_support import Client, running


def _send(client: Client, command: str, arguments: dict[str, Any] | None = None,
          fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Send ``command`` with ``fds`` attached (SCM_RIGHTS) and return the reply."""
    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    data = json.dumps(message).encode()
    if fds:
        client.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        client.sock.sendall(data)
    return client.reply()


class _Shapes:
    """Replies with descriptor numbers replaced by their order of appearance."""

    def __init__(self) -> None:
        self.numbers: dict[int, str] = {}

    def __call__(self, value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: self(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if key == "fd" and isinstance(value, int):
            return self.numbers.setdefault(value, f"fd{len(self.numbers)}")
        return value


def _nodes(client: Client) -> list[tuple[str, bool, str]]:
    # What the two agree on: QEMU 7.2 lacks the newer members (active, children).
    # Generated names (#blockNNN) differ from run to run.
    return sorted(("#" if n["node-name"].startswith("#") else n["node-name"], n["ro"], n["file"])
                  for n in client.cmd("query-named-block-nodes"))


def _file(name: str, filename: str, **options: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": name, "filename": filename, **options}


def _opening(client: Client, raw: Path) -> list[Any]:
    shape = _Shapes()
    seen: list[Any] = []
    rw = os.open(raw, os.O_RDWR)
    ro = os.open(raw, os.O_RDONLY)

    def step(command: str, arguments: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> None:
        seen.append((command, arguments, shape(_send(client, command, arguments, fds))))

    try:
        # qemu_open's texts: no such set, a name that is no set id, no member whose
        # access mode matches (the flags as QEMU passed them, in hex).
        for name in ("/dev/fdset/7", "/dev/fdset/x", "/dev/fdset/", "/dev/fdset/-1",
                     "/dev/fdset/1 ", "/dev/fdset/2147483648", "/dev/fdset/0x1"):
            step("blockdev-add", _file("a", name))
        step("add-fd", {"fdset-id": 1, "opaque": "ro"}, (ro,))
        step("blockdev-add", _file("a", "/dev/fdset/1"))
        step("blockdev-add", _file("a", "/dev/fdset/1", cache={"direct": True}))
        step("blockdev-add", _file("a", "/dev/fdset/1", **{"read-only": True}))
        # strtol's syntax: blanks and a sign before the digits, leading zeros.
        step("blockdev-add", _file("b", "/dev/fdset/+1", **{"read-only": True}))
        step("blockdev-add", _file("c", "/dev/fdset/ 01", **{"read-only": True, "locking": "off"}))
        seen.append(_nodes(client))
        step("add-fd", {"fdset-id": 2}, (rw,))
        step("blockdev-add", _file("d", "/dev/fdset/2", **{"read-only": True}))
        step("blockdev-add", _file("d", "/dev/fdset/2"))
        step("query-fdsets")
        # Removing members in use: they are closed (the VM runs), the set stays while a
        # duplicate is open and goes with the last one.
        step("remove-fd", {"fdset-id": 2})
        step("query-fdsets")
        step("blockdev-del", {"node-name": "d"})
        step("query-fdsets")
        step("remove-fd", {"fdset-id": 1})
        step("query-fdsets")
        step("blockdev-del", {"node-name": "a"})
        step("blockdev-del", {"node-name": "b"})
        step("query-fdsets")
        step("blockdev-del", {"node-name": "c"})
        step("query-fdsets")
    finally:
        os.close(rw)
        os.close(ro)
    return seen


def test_fdset_file_nodes_open_as_in_qemu(tmp_path: Path) -> None:
    require("qemu-system-x86_64")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    results = []
    for qemu in (False, True):
        with running([], tmp_path, f"vm{qemu}", qemu=qemu) as (proc, client):
            results.append(_opening(client, raw))
            held = set(os.listdir(f"/proc/{proc.pid}/fd"))
            # Nothing of the image stays open once the sets and the nodes are gone.
            assert not any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(raw) for fd in held
                           if os.path.exists(f"/proc/{proc.pid}/fd/{fd}")), qemu
    assert results[0] == results[1]
    nodes = results[0][13]
    assert nodes == [("a", True, "/dev/fdset/1"), ("b", True, "/dev/fdset/+1"),
                     ("c", True, "/dev/fdset/ 01")]


def _qemu_io_write(image: Path) -> str:
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", str(image)],
                         capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def _locking(client: Client, image: Path, tmp_path: Path, name: str) -> list[Any]:
    shape = _Shapes()
    seen: list[Any] = []
    rw = os.open(image, os.O_RDWR)
    ro = os.open(image, os.O_RDONLY)

    def step(command: str, arguments: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> None:
        seen.append((command, shape(_send(client, command, arguments, fds))))

    def qcow2(node: str, **options: Any) -> dict[str, Any]:
        return {"driver": "qcow2", "node-name": node,
                "file": {"driver": "file", "filename": "/dev/fdset/1"}, **options}

    try:
        step("add-fd", {"fdset-id": 1}, (rw,))
        step("blockdev-add", qcow2("q"))
        # The duplicate holds the lock bytes as a path-opened file would.
        seen.append(("locks", locked(image), _qemu_io_write(image)))
        # Without a read-only member the snapshot's reopen of the old top fails, which
        # blockdev-snapshot-sync ignores: the nodes stay read-write.
        step("blockdev-snapshot-sync", {"node-name": "q", "format": "qcow2", "snapshot-node-name": "o1",
                                        "snapshot-file": str(tmp_path / f"{name}-1.qcow2")})
        seen.append(_nodes(client))
        step("blockdev-del", {"node-name": "q"})
        seen.append(("locks", locked(image)))
        step("add-fd", {"fdset-id": 1}, (ro,))
        step("blockdev-add", qcow2("q"))
        # With one, the file node gets a read-only duplicate; the old read-write one is
        # closed, but its open file lives on in the set's member with the bytes it held:
        # the image stays locked as in QEMU.
        step("blockdev-snapshot-sync", {"node-name": "q", "format": "qcow2", "snapshot-node-name": "o2",
                                        "snapshot-file": str(tmp_path / f"{name}-2.qcow2")})
        seen.append(_nodes(client))
        seen.append(("locks", locked(image), _qemu_io_write(image)))
        # A reader on the read-only member conflicts with those bytes; a writer on the
        # read-write member shares their open file and does not.
        step("blockdev-add", qcow2("r", **{"read-only": True}))
        step("blockdev-add", qcow2("w"))
        seen.append(("locks", locked(image)))
        step("query-fdsets")
    finally:
        os.close(rw)
        os.close(ro)
    return seen


def test_fdset_locks_and_reopen_as_in_qemu(tmp_path: Path) -> None:
    require("qemu-system-x86_64")
    require("qemu-io")
    results = []
    for qemu in (False, True):
        image = tmp_path / f"disk{qemu}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
        with running([], tmp_path, f"vm{qemu}", qemu=qemu) as (_, client):
            results.append([str(item).replace(str(image), "IMAGE") for item in
                            _locking(client, image, tmp_path, f"vm{qemu}")])
        assert locked(image) == []  # gone with the process
    assert results[0] == results[1]
    assert "Failed to get \"write\" lock" in results[0][2]


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_fdset_duplicates_keep_working_after_the_client_leaves(tmp_path: Path, qemu: bool) -> None:
    # The last client going closes the members of sets without duplicates in use
    # (monitor_fdset_cleanup); a set a node uses keeps its members, and the node works.
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    fd = os.open(image, os.O_RDWR)
    other = os.open(image, os.O_RDWR)
    try:
        with running([], tmp_path, qemu=qemu) as (proc, client):
            _send(client, "add-fd", {"fdset-id": 1}, (fd,))
            _send(client, "add-fd", {"fdset-id": 2}, (other,))
            assert "error" not in _send(client, "blockdev-add", {
                "driver": "qcow2", "node-name": "q",
                "file": {"driver": "file", "filename": "/dev/fdset/1"}})
            client.close()
            time.sleep(0.2)
            again = Client(tmp_path / "vm.sock")
            again.cmd("qmp_capabilities")
            assert [s["fdset-id"] for s in again.cmd("query-fdsets")] == [1]
            again.hmp('qemu-io q "write -P 0x5a 0 4k"')
            again.cmd("blockdev-del", node_name="q")
            # The duplicate gone and nobody else connected... but this client is.
            assert [s["fdset-id"] for s in again.cmd("query-fdsets")] == [1]
            again.close()
            time.sleep(0.2)
            assert not any(os.readlink(f"/proc/{proc.pid}/fd/{n}") == str(image)
                           for n in os.listdir(f"/proc/{proc.pid}/fd"))
    finally:
        os.close(fd)
        os.close(other)
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 4k", str(image)],
                         capture_output=True, text=True)
    assert "read 4096/4096" in out.stdout
