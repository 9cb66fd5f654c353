"""HMP ``getfd``/``closefd`` on an HMP monitor socket (issue 11): the descriptor comes
with the command line (SCM_RIGHTS), and ``migrate fd:NAME`` on that monitor uses it.

Each monitor's text is compared with QEMU 7.2's, and the descriptors the process holds
are counted in /proc/PID/fd (what is replaced, closed or unclaimed must not leak).
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from qemu_tools import require
from server_support import QEMU, SERVER, Client


class _Hmp:
    """A client of an HMP socket that reads up to the next prompt."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 20
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                assert time.monotonic() < deadline
                time.sleep(0.02)
        self.sock.settimeout(20)
        self._until_prompt()

    def _until_prompt(self) -> bytes:
        out = b""
        while not out.endswith(b"(qemu) "):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out

    def run(self, line: str, fds: tuple[int, ...] = ()) -> str:
        """The monitor's answer to ``line`` (after the echo, without the prompt)."""
        data = line.encode() + b"\n"
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(data)
        out = self._until_prompt()
        return out.split(b"\r\n", 1)[1].removesuffix(b"(qemu) ").decode()


@contextmanager
def _machine(tmp_path: Path, name: str, qemu: bool) -> Iterator[tuple[subprocess.Popen[bytes], _Hmp, Client]]:
    hmp_sock, qmp_sock = tmp_path / f"{name}.hmp", tmp_path / f"{name}.qmp"
    argv = (QEMU if qemu else SERVER) + [
        "-chardev", f"socket,id=h,path={hmp_sock},server=on,wait=off", "-mon", "chardev=h,mode=readline",
        "-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    with open(tmp_path / f"{name}.out", "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = Client(qmp_sock)
        client.cmd("qmp_capabilities")
        yield proc, _Hmp(hmp_sock), client
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _open(proc: subprocess.Popen[bytes]) -> int:
    time.sleep(0.05)
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def _session(tmp_path: Path, name: str, qemu: bool) -> list[object]:
    r, w = os.pipe()
    seen: list[object] = []
    try:
        with _machine(tmp_path, name, qemu) as (proc, hmp, client):
            base = _open(proc)

            def step(line: str, fds: tuple[int, ...] = ()) -> None:
                seen.append((line, len(fds), hmp.run(line, fds), _open(proc) - base))

            step("getfd")
            step("getfd x")
            step("getfd x", (r,))
            step("getfd x", (w,))  # replaces (closes) the first
            step("getfd 1x", (r,))
            step("closefd")
            step("closefd nope")
            step("closefd x")
            step("getfd y", (r, w))  # the first is taken, the other closed
            step("info status", (r,))  # waits for the next getfd
            step("getfd z")
            step("getfd z extra", (r,))  # refused, still waiting
            step("closefd y extra")
            step("closefd y")
            step("closefd z")
            step("help getfd")
            step("help closefd")
            # human-monitor-command's monitor has no character device: nothing to take,
            # and it does not see the HMP monitor's names.
            step("getfd q", (r,))
            seen.append(client.hmp("getfd q"))
            seen.append(client.hmp("closefd q"))
            step("closefd q")
    finally:
        os.close(r)
        os.close(w)
    return seen


def test_hmp_getfd_closefd_as_qemu(tmp_path: Path) -> None:
    require("qemu-system-x86_64")
    ours = _session(tmp_path, "ours", False)
    theirs = _session(tmp_path, "qemu", True)
    assert ours == theirs
    assert ours[1][2] == "Error: No file descriptor supplied via SCM_RIGHTS\r\n"
    assert ours[-3] == "Error: No file descriptor supplied via SCM_RIGHTS\r\n"


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_hmp_migrate_to_a_descriptor_named_on_the_hmp_monitor(tmp_path: Path, qemu: bool) -> None:
    if qemu:
        require("qemu-system-x86_64")
    r, w = os.pipe()
    try:
        with _machine(tmp_path, "src", qemu) as (_, hmp, client):
            assert hmp.run("getfd out", (w,)) == ""
            os.close(w)
            w = -1
            # Without -d the monitor waits for the end of the migration.
            assert hmp.run("migrate fd:out") == ""
            assert client.cmd("query-migrate")["status"] == "completed"
            assert client.cmd("query-status")["status"] == "postmigrate"
            # The name was taken by the migration, as on a QMP monitor.
            assert hmp.run("closefd out") == "Error: File descriptor named 'out' not found\r\n"
            assert hmp.run("migrate fd:nosuch") == (
                "Error: Can't migrate the vm that was paused due to previous migration\r\n")
        # The stream went into the pipe (ours is not QEMU's format: docs/migration.md).
        assert len(os.read(r, 4)) == 4
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_hmp_names_outlive_the_client(tmp_path: Path) -> None:
    # The names belong to the monitor (QEMU's mon->fds), not to one connection.
    r, w = os.pipe()
    try:
        with _machine(tmp_path, "vm", False) as (proc, hmp, _):
            assert hmp.run("getfd kept", (r,)) == ""
            assert hmp.run("info status", (w,)) == "VM status: running\r\n"
            hmp.sock.close()
            time.sleep(0.2)
            # The unclaimed one is closed with the connection, the named one is kept.
            targets = [os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")]
            assert targets.count(os.readlink(f"/proc/self/fd/{r}")) == 1
            again = _Hmp(tmp_path / "vm.hmp")
            assert again.run("closefd kept") == ""
            assert again.run("closefd kept") == "Error: File descriptor named 'kept' not found\r\n"
    finally:
        os.close(r)
        os.close(w)
