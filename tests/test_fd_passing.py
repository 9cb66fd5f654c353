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
