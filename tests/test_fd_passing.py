"""Descriptors passed over the monitor (issue 11 §3): getfd, closefd, add-fd, remove-fd,
query-fdsets, and migration over ``fd:`` URIs.

A client sends a descriptor with SCM_RIGHTS in the same sendmsg as the command that
claims it. The replies are compared with QEMU 7.2's (descriptor numbers are each
process's own, so they are compared by shape); descriptors nobody claims must not leak
(counted in /proc/PID/fd).
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from migration_support import (
    QEMU,
    SERVER,
    Server,
    blockdev,
    is_writer,
    qemu_img_check,
    qemu_img_create,
    read_pattern,
    start_server,
)
from qemu_tools import require
from server_support import Client, running


def _send(client: Client, command: str, arguments: dict[str, Any] | None = None,
          fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """Send ``command`` with ``fds`` attached (SCM_RIGHTS) and return the reply."""
    message: dict[str, Any] = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    request = json.dumps(message)
    if fds:
        client.sock.sendmsg([request.encode()],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        client.sock.sendall(request.encode())
    return client.reply()


def _open_fds(proc: subprocess.Popen[bytes]) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{proc.pid}/fd")}


def _shape(reply: dict[str, Any]) -> Any:
    """A reply with descriptor numbers replaced by their order of appearance."""
    numbers: dict[int, str] = {}

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if key == "fd" and isinstance(value, int):
            return numbers.setdefault(value, f"fd{len(numbers)}")
        return value

    return walk(reply)


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def _session(client: Client, proc: subprocess.Popen[bytes], pipe: tuple[int, int]) -> list[Any]:
    r, w = pipe
    seen: list[Any] = []
    base = _open_fds(proc)

    def step(command: str, arguments: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> None:
        seen.append((command, arguments, len(fds), _shape(_send(client, command, arguments, fds))))

    def count() -> None:
        time.sleep(0.05)
        seen.append(("open", len(_open_fds(proc) - base)))

    step("getfd", {"fdname": "x"})
    step("getfd", {"fdname": "1x"}, (r,))
    count()
    step("getfd", {"fdname": "x"}, (r,))
    step("getfd", {"fdname": "x"}, (w,))  # replaces (closes) the first
    count()
    step("getfd", {"fdname": ""}, (r,))
    step("closefd", {"fdname": ""})
    step("closefd", {"fdname": "nope"})
    count()
    # Sent with another command: waits for the next getfd; of two, the first is taken.
    step("query-name", None, (r, w))
    count()
    step("getfd", {"fdname": "y"})
    count()
    step("add-fd")
    step("add-fd", {}, (r,))
    step("add-fd", {"opaque": "hello"}, (w,))
    step("add-fd", {"fdset-id": 5, "opaque": "x"}, (w,))
    step("add-fd", {"fdset-id": 5}, (r,))
    step("add-fd", {"fdset-id": -1}, (w,))
    step("add-fd", {"fdset-id": 3}, (w, r))
    count()
    step("query-fdsets")
    step("remove-fd", {"fdset-id": 9})
    step("remove-fd", {"fdset-id": 5, "fd": 12345})
    step("remove-fd", {"fdset-id": 0})
    count()
    step("query-fdsets")
    step("closefd", {"fdname": "x"})
    step("closefd", {"fdname": "y"})
    count()
    return seen


def test_fd_commands_as_qemu(tmp_path: Path, pipe: tuple[int, int]) -> None:
    with running([], tmp_path, "ours") as (proc, client):
        ours = _session(client, proc, pipe)
    require("qemu-system-x86_64")
    with running([], tmp_path, "qemu", qemu=True) as (proc, client):
        theirs = _session(client, proc, pipe)
    assert ours == theirs


def _copies(proc: subprocess.Popen[bytes], fd: int) -> int:
    """How many descriptors of ``proc`` refer to the same pipe as our ``fd``."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir(f"/proc/{proc.pid}/fd"):
        try:
            count += os.readlink(f"/proc/{proc.pid}/fd/{name}") == target
        except OSError:
            pass
    return count


def test_unclaimed_descriptors_are_closed_and_sets_follow_the_clients(
        tmp_path: Path, pipe: tuple[int, int]) -> None:
    r = pipe[0]
    w, other = os.pipe()  # another pipe: both ends of one read the same in /proc
    os.close(other)
    with running([], tmp_path) as (proc, client):
        _send(client, "query-status", None, (r, r, r))
        time.sleep(0.05)
        assert _copies(proc, r) == 3  # waiting for a getfd
        _send(client, "add-fd", {"fdset-id": 1}, (r,))  # the three before are closed
        _send(client, "getfd", {"fdname": "kept"}, (r,))
        _send(client, "query-status", None, (r, r))
        time.sleep(0.05)
        assert _copies(proc, r) == 4
        assert _send(client, "query-status", None, (w,))["return"]["running"]
        time.sleep(0.05)
        assert _copies(proc, r) == 2  # the newer read's descriptors replace the older
        client.close()
        time.sleep(0.2)
        # What was pending and the set (nobody connected, VM running) are closed; the
        # named one belongs to the monitor and waits for a later client.
        assert (_copies(proc, r), _copies(proc, w)) == (1, 0)
        again = Client(tmp_path / "vm.sock")
        again.cmd("qmp_capabilities")
        assert again.cmd("query-fdsets") == []
        assert again.cmd("closefd", fdname="kept") == {}
        time.sleep(0.05)
        assert _copies(proc, r) == 0
        again.close()
    os.close(w)


def test_paused_machine_keeps_removed_set_members(tmp_path: Path, pipe: tuple[int, int]) -> None:
    r, _ = pipe
    for qemu in (False, True):
        if qemu:
            require("qemu-system-x86_64")
        with running(["-S"], tmp_path, f"vm{qemu}", qemu=qemu) as (proc, client):
            fd = _send(client, "add-fd", {"fdset-id": 2, "opaque": "o"}, (r,))["return"]["fd"]
            assert _send(client, "remove-fd", {"fdset-id": 2, "fd": fd}) == {"return": {}}
            assert client.cmd("query-fdsets") == [{"fdset-id": 2, "fds": [{"fd": fd, "opaque": "o"}]}]
            client.close()
            time.sleep(0.2)
            assert _copies(proc, r) == 1, qemu


# Migration over fd: ------------------------------------------------------------------------


def _give(server: Server, name: str, fd: int) -> None:
    """``getfd name`` on ``server`` with ``fd`` attached."""
    assert _send(server.client, "getfd", {"fdname": name}, (fd,)) == {"return": {}}


def _wait_migration(server: Server, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := server.cmd("query-migrate").get("status")) not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"{server.name}: migration still {status}"
        time.sleep(0.02)
    assert isinstance(status, str)
    return status


def _wait_running(server: Server, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while server.status() != "running":
        assert time.monotonic() < deadline, f"{server.name}: {server.status()}"
        time.sleep(0.02)


class _InheritingServer(Server):
    """A server started with descriptors it inherits (``-incoming fd:N``)."""

    def __init__(self, name: str, args: list[str], tmp_path: Path, pass_fds: tuple[int, ...],
                 qemu: bool = False) -> None:
        self.name = name
        self.sock = tmp_path / f"{name}.sock"
        self.log_path = tmp_path / f"{name}.log"
        argv = (QEMU if qemu else SERVER) + ["-qmp", f"unix:{self.sock},server=on,wait=off", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=pass_fds)
        self._client = None


def test_migration_between_two_servers_over_a_socketpair(tmp_path: Path) -> None:
    # libvirt's pattern: the management tool connects the two sides itself and hands each
    # its end with getfd; our socket transport's handshake runs over it.
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    src = start_server(blockdev(image), tmp_path, "src")
    dst = start_server([*blockdev(image), "-incoming", "defer"], tmp_path, "dst")
    try:
        for server in (src, dst):
            server.enable_events()
        src.hmp('qemu-io disk0 "write -P 0x5c 0 64k"')
        a, b = socket.socketpair()
        _give(src, "mig", a.fileno())
        _give(dst, "mig", b.fileno())
        a.close()
        b.close()
        assert dst.cmd("migrate-incoming", uri="fd:mig") == {}
        assert src.cmd("migrate", uri="fd:mig") == {}
        assert _wait_migration(src) == "completed"
        _wait_running(dst)
        assert _wait_migration(dst) == "completed"
        assert src.status() == "postmigrate"
        assert not is_writer(src.pid, image) and is_writer(dst.pid, image)
        dst.hmp('qemu-io disk0 "write -P 0x5d 64k 64k"')
        # The name was consumed by the migration on both sides.
        assert src.error("closefd", fdname="mig") == "File descriptor named 'mig' not found"
        assert dst.error("closefd", fdname="mig") == "File descriptor named 'mig' not found"
        dst.cmd("quit")
        dst.wait_exit()
    finally:
        src.close()
        dst.close()
    assert read_pattern(image, 0, 65536, 0x5C) and read_pattern(image, 65536, 65536, 0x5D)
    assert qemu_img_check(image).returncode == 0


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_migration_into_a_pipe_read_by_a_later_destination(tmp_path: Path, qemu: bool) -> None:
    # The source writes into a pipe passed with getfd and completes (nobody answers on a
    # pipe); a destination started afterwards with -incoming fd:N inherits the read end.
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    r, w = os.pipe()
    src = start_server(blockdev(image), tmp_path, "src", qemu=qemu)
    dst: Server | None = None
    seen: dict[str, Any] = {}
    try:
        src.hmp('qemu-io disk0 "write -P 0x5c 0 64k"')
        _give(src, "out", w)
        os.close(w)
        src.cmd("migrate", uri="fd:out")
        seen["source"] = _wait_migration(src)
        seen["source-state"] = src.status()
        dst = _InheritingServer("dst", [*blockdev(image), "-incoming", f"fd:{r}"], tmp_path, (r,), qemu)
        dst.connect()
        os.close(r)
        _wait_running(dst)
        seen["destination"] = _wait_migration(dst)
        seen["writers"] = (is_writer(src.pid, image), is_writer(dst.pid, image))
        dst.cmd("quit")
        dst.wait_exit()
    finally:
        src.close()
        if dst is not None:
            dst.close()
    assert seen == {"source": "completed", "source-state": "postmigrate",
                    "destination": "completed", "writers": (False, True)}
    assert read_pattern(image, 0, 65536, 0x5C)


def _fd_errors(server: Server, incoming: Server) -> list[Any]:
    seen: list[Any] = [server.error("migrate", uri="fd:nosuch"),
                       server.cmd("query-migrate")]
    for uri in ("fd:x", "fd:1x", "fd:-1"):
        seen.append(incoming.error("migrate-incoming", uri=uri))
    return seen


def test_fd_uri_errors_as_qemu(tmp_path: Path) -> None:
    require("qemu-system-x86_64")
    results = []
    for qemu in (False, True):
        src = start_server([], tmp_path, f"src{qemu}", qemu=qemu)
        dst = start_server(["-incoming", "defer"], tmp_path, f"dst{qemu}", qemu=qemu)
        try:
            results.append(_fd_errors(src, dst))
        finally:
            src.close()
            dst.close()
    assert results[0] == results[1]
    assert results[0][0] == "File descriptor named 'nosuch' has not been found"


def test_socket_fd_carries_the_acknowledged_handshake(tmp_path: Path) -> None:
    # On a socket the destination answers: a destination that refuses the block
    # configuration fails the source too, which keeps running on its images (on a
    # one-way stream the source would have completed and let go of them).
    image, other = tmp_path / "disk.qcow2", tmp_path / "other.qcow2"
    qemu_img_create(image)
    qemu_img_create(other)
    src = start_server(blockdev(image), tmp_path, "src")
    dst = start_server([*blockdev(other), "-incoming", "defer"], tmp_path, "dst")
    try:
        a, b = socket.socketpair()
        _give(src, "mig", a.fileno())
        _give(dst, "mig", b.fileno())
        a.close()
        b.close()
        dst.cmd("migrate-incoming", uri="fd:mig", **{"exit-on-error": False})
        src.cmd("migrate", uri="fd:mig")
        assert _wait_migration(src) == "failed"
        assert src.cmd("query-migrate")["error-desc"].startswith("Block configuration mismatch")
        assert src.status() == "running" and is_writer(src.pid, image)
        assert _wait_migration(dst) == "failed"
    finally:
        src.close()
        dst.close()
