"""Helpers for tests that run server (or QEMU) processes: start, talk QMP, probe images.

``start_server(args, tmp_path)`` starts ``python -m qmp_server`` (or QEMU) with a QMP
socket in ``tmp_path`` and returns a :class:`Server` holding the process and a negotiated
blocking client. Several servers can be started at once with :func:`start_servers`,
which overlaps their start-up. The probes look at an image the way another process sees
it: ``qemu-io`` writes, ``qemu-img check``, and the lock bytes each process holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from server_support import Client, ProcessOutput

#: Our server as the tests start it: with QEMU's guest-less machine, like the QEMU command
#: beside it (a later -machine in a test's own arguments wins, as in QEMU).
SERVER = [sys.executable, "-m", "qmp_server", "-machine", "none"]
QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
DELAY_ENV = "QMP_SERVER_TEST_MIGRATION_DELAY"



class Server:
    """A server process, its QMP client and its log (stdout and stderr)."""

    def __init__(self, name: str, args: Sequence[str], tmp_path: Path, *, qemu: bool = False,
                 delays: str | None = None) -> None:
        self.name = name
        self.sock = tmp_path / f"{name}.sock"
        self.log_path = tmp_path / f"{name}.log"
        argv = (QEMU if qemu else SERVER) + ["-qmp", f"unix:{self.sock},server=on,wait=off", *args]
        env = dict(os.environ)
        env.pop(DELAY_ENV, None)
        if delays:
            env[DELAY_ENV] = delays
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._client: Client | None = None

    def connect(self) -> Client:
        """Connect and negotiate (waits for the socket to appear)."""
        if self._client is None:
            deadline = time.monotonic() + 20
            while not self.sock.exists():
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}: {self.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: no QMP socket after 20s")
                time.sleep(0.005)
            client = Client(self.sock)
            reply = client.execute("qmp_capabilities")
            assert reply == {"return": {}}, reply
            client.output = ProcessOutput(self.log_path)
            self._client = client
        return self._client

    @property
    def client(self) -> Client:
        """The negotiated client."""
        return self.connect()

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def cmd(self, command: str, **arguments: Any) -> Any:
        """Execute; return ``return`` or raise AssertionError on an error reply."""
        return self.client.cmd(command, **arguments)

    def error(self, command: str, **arguments: Any) -> str:
        """Execute a command that must fail; return its error desc."""
        reply = self.client.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})
        assert "error" in reply, f"{command} succeeded: {reply}"
        desc: str = reply["error"]["desc"]
        return desc

    def hmp(self, line: str) -> str:
        """An HMP command line's output."""
        return self.client.hmp(line)

    def qemu_io(self, args: str) -> str:
        """HMP ``qemu-io ARGS``: what the process printed (qemu-io's results), then the
        monitor's reply (:meth:`Client.qemu_io`)."""
        return self.client.qemu_io(args)

    def status(self) -> str:
        """``status`` of query-status."""
        result: str = self.cmd("query-status")["status"]
        return result

    def enable_events(self) -> None:
        """Turn on the ``events`` migration capability."""
        self.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])

    @staticmethod
    def _label(event: dict[str, Any]) -> str:
        if event["event"] == "MIGRATION":
            return f"MIGRATION:{event['data']['status']}"
        return str(event["event"])

    def labels(self) -> list[str]:
        """Every event received so far, in order (``MIGRATION:status`` for MIGRATION)."""
        return [self._label(e) for e in self.client.events]

    def wait_for(self, *labels: str, timeout: float = 20.0) -> str:
        """Wait for the next event (after the last one waited for) with one of ``labels``.

        Events stay in the history that :meth:`labels` returns.
        """
        client = self.client
        deadline = time.monotonic() + timeout
        cursor = getattr(self, "_cursor", 0)
        while True:
            for i in range(cursor, len(client.events)):
                label = self._label(client.events[i])
                if label in labels:
                    self._cursor = i + 1
                    return label
            cursor = len(client.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: none of {labels} within {timeout}s; got {self.labels()}")
            try:
                message = client.read(remaining)
            except TimeoutError:
                continue
            if "event" not in message:
                raise AssertionError(f"{self.name}: unexpected reply {message}")
            client.events.append(message)

    def settle(self, quiet: float = 0.1) -> list[str]:
        """Read events until none arrives for ``quiet`` seconds; return :meth:`labels`."""
        client = self.client
        try:
            while True:
                message = client.read(quiet)
                if "event" not in message:
                    raise AssertionError(f"{self.name}: unexpected reply {message}")
                client.events.append(message)
        except (TimeoutError, EOFError):
            pass
        return self.labels()

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit by itself; return its status."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (no clean-up at all, like a crash)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Disconnect and stop the process."""
        if self._client is not None:
            # The socket may already be gone with the process; nothing to clean up then.
            try:
                self._client.close()
            except OSError:
                pass
            self._client = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_server(args: Sequence[str], tmp_path: Path, name: str = "vm", **kwargs: Any) -> Server:
    """Start one server and connect to it."""
    server = Server(name, args, tmp_path, **kwargs)
    try:
        server.connect()
    except TimeoutError:
        if not kwargs.get("qemu"):
            raise
        # QEMU 7.2 was seen (once, in CI, under load) to send its greeting and then never
        # answer qmp_capabilities: what is under test is not QEMU's start-up, so a fresh
        # QEMU gets one more try. Our server gets none.
        server.close()
        server = Server(name, args, tmp_path, **kwargs)
        server.connect()
    return server


def start_servers(specs: Iterable[tuple[str, Sequence[str]]], tmp_path: Path, **kwargs: Any) -> list[Server]:
    """Start several servers at once (their start-up overlaps), then connect to each."""
    servers = [Server(name, args, tmp_path, **kwargs) for name, args in specs]
    for server in servers:
        server.connect()
    return servers


def blockdev(image: Path | str, node: str = "disk0", driver: str = "qcow2") -> list[str]:
    """``-blockdev`` arguments opening ``image`` as ``node``."""
    return ["-blockdev", f"driver={driver},node-name={node},file.driver=file,file.filename={image}"]


def qemu_img_create(image: Path, size: str = "64M", fmt: str = "qcow2") -> None:
    """Create an image with QEMU's own qemu-img."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), size], check=True)


def qemu_img_check(image: Path) -> subprocess.CompletedProcess[str]:
    """``qemu-img check`` (status 0 and no errors for a clean image)."""
    return subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)


def external_write(image: Path, offset: int = 0) -> subprocess.CompletedProcess[str]:
    """Try to write through an independent qemu-io: it must fail while any side is active."""
    return subprocess.run(["qemu-io", "-c", f"write -P 0x5a {offset} 512", str(image)],
                          capture_output=True, text=True)


def read_pattern(image: Path, offset: int, length: int, pattern: int) -> bool:
    """Whether ``image`` holds ``pattern`` there, read by QEMU's qemu-io (sharing locks)."""
    result = subprocess.run(
        ["qemu-io", "-r", "-U", "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
        capture_output=True, text=True)
    return result.returncode == 0 and "Pattern verification failed" not in result.stdout


def held_lock_bytes(pid: int, image: Path) -> set[int]:
    """The lock bytes process ``pid`` holds on ``image`` (from /proc/PID/fdinfo)."""
    target = os.path.realpath(image)
    held: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except FileNotFoundError:
        return held
    for fd in fds:
        try:
            if os.path.realpath(os.readlink(fd)) != target:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("lock:"):
                start, end = line.split()[-2:]
                held.update(range(int(start), int(end) + 1))
    return held


#: Byte 101 is "write" held, 201 "write" not shared: what an active writer holds.
WRITER_BYTES = {101, 201}


def is_writer(pid: int, image: Path) -> bool:
    """Whether ``pid`` holds the write lock bytes of ``image``."""
    return WRITER_BYTES <= held_lock_bytes(pid, image)
