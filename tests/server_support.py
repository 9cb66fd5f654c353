"""Starting qmp-server (or QEMU) processes in tests and talking QMP to them over a socket."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import qemu_tools
import schema_conformance

#: Our server as the tests start it: with QEMU's guest-less machine, like the QEMU command
#: beside it (a later -machine in a test's own arguments wins, as in QEMU).
SERVER = [sys.executable, "-m", "qmp_server", "-machine", "none"]
QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]


class Client:
    """A blocking QMP client that keeps events apart from replies."""

    def __init__(self, path: str | Path | tuple[str, int], timeout: float = 20.0) -> None:
        """Connect to a UNIX socket path, or to ``(host, port)`` over TCP; read the greeting."""
        deadline = time.monotonic() + timeout
        while True:
            if isinstance(path, tuple):
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            else:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path if isinstance(path, tuple) else str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.timeout = timeout
        # A receive buffer rather than makefile(): one timed-out read poisons a socket
        # file for good, and tests wait for events with deadlines.
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        #: Replies and events of our server (not QEMU's) are checked against schema/.
        self.conforms = schema_conformance.is_qmp_server(self.sock)
        self.greeting = self.read()
        #: The process's stdout and stderr, when :func:`running` started it.
        self.output: ProcessOutput | None = None

    def read(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message (reply, event or greeting)."""
        message: dict[str, Any] = json.loads(self.read_line(timeout))
        if self.conforms:
            schema_conformance.check_member_order(message)
            if "event" in message:
                schema_conformance.check_event(message)
        return message

    def read_line(self, timeout: float | None = None) -> bytes:
        """The next line exactly as the server wrote it (line end included).

        Raises TimeoutError after ``timeout`` seconds (default: the client's), EOFError
        when the server closed the connection.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end + 1], self._buffer[end + 1:]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the server in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError("server closed the connection")
            self._buffer += chunk

    def send_raw(self, data: bytes | str) -> None:
        """Send bytes as they are."""
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def reply(self) -> dict[str, Any]:
        """The next non-event message; events seen on the way are kept in :attr:`events`."""
        while True:
            message = self.read()
            if "event" in message:
                self.events.append(message)
                continue
            if "QMP" in message and not self.conforms:
                # QEMU 7.2 can greet twice: a client that connects while the monitor's
                # handlers are being installed in its I/O thread gets CHR_EVENT_OPENED
                # from the connection and again from qemu_chr_fe_set_handlers (be_open
                # already true). Seen in CI; our own server greets once (not skipped).
                continue
            return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Send a command and return the whole reply object."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        request.update(extra)
        self.send_raw(json.dumps(request))
        reply = self.reply()
        if self.conforms:
            schema_conformance.check_reply(command, reply)
        return reply

    def cmd(self, command: str, **arguments: Any) -> Any:
        """Execute and return ``return``; raise AssertionError on an error reply."""
        reply = self.execute(command, {k.replace("_", "-"): v for k, v in arguments.items()})
        if "error" in reply:
            raise AssertionError(f"{command} failed: {reply['error']}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        """Run an HMP command line and return its text."""
        result: str = self.cmd("human-monitor-command", command_line=line)
        return result

    def qemu_io(self, args: str) -> str:
        """HMP ``qemu-io ARGS`` as QEMU's user sees it: what the process printed on its
        stdout and stderr meanwhile (qemu-io's results: QEMU prints them there, and the
        monitor's reply is empty), then the reply (errors QEMU reports to the monitor).

        Needs a process started by :func:`running`, whose output goes to a file.
        """
        assert self.output is not None, "qemu_io needs the process's output (running())"
        self.output.skip()
        reply = self.hmp(f"qemu-io {args}")
        # The process wrote its output before it replied: it is all in the file now.
        return self.output.new() + reply

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for event ``name`` (already received ones count), removing it from the list."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            message = self.read(timeout=deadline - time.monotonic())
            if "event" not in message:
                raise AssertionError(f"unexpected reply while waiting for {name}: {message}")
            self.events.append(message)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


class ProcessOutput:
    """What a process started by :func:`running` printed (stdout and stderr, one file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def all(self) -> str:
        """Everything printed so far."""
        return self.path.read_bytes().decode(errors="replace")

    def new(self) -> str:
        """What was printed since the last :meth:`new` or :meth:`skip`."""
        with self.path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        self._offset += len(data)
        return data.decode(errors="replace")

    def skip(self) -> None:
        """Forget what was printed so far."""
        self._offset = self.path.stat().st_size


@contextmanager
def running(args: list[str], tmp_path: Path, name: str = "vm", *, qemu: bool = False,
            negotiate: bool = True) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    """Start a server (or QEMU) with a QMP socket in ``tmp_path``; yield (process, client).

    The process's stdout and stderr go to ``tmp_path/<name>.out`` (``client.output``): a
    file never fills up as an unread pipe would, stopping the process mid-write.
    """
    sock = tmp_path / f"{name}.sock"
    argv = (QEMU if qemu else SERVER) + ["-qmp", f"unix:{sock},server=on,wait=off", *args]
    env = dict(os.environ)
    output = tmp_path / f"{name}.out"
    with output.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    client: Client | None = None
    try:
        client = Client(sock)
        client.output = ProcessOutput(output)
        if negotiate:
            reply = client.execute("qmp_capabilities")
            assert reply == {"return": {}}, (reply, client.greeting)
        yield proc, client
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


#: The machine the frontend tests compare on: a PC that runs no guest code.
PC = ["-machine", "pc", "-S"]


@contextmanager
def both(args: list[str], tmp_path: Path) -> Iterator[tuple[Client, Client]]:
    """QEMU and the server started with ``PC + args``, each on its own copy of the
    images (``{dir}`` in ``args`` names ``tmp_path/qemu`` or ``tmp_path/ours``)."""
    qemu_tools.require("qemu-system-x86_64")
    with ExitStack() as stack:
        clients = []
        for name in ("qemu", "ours"):
            own = [a.replace("{dir}", str(tmp_path / name)) for a in args]
            _, client = stack.enter_context(running(PC + own, tmp_path, name, qemu=name == "qemu"))
            clients.append(client)
        yield clients[0], clients[1]


def comparable(value: Any) -> Any:
    """A query result from ``both``'s QEMU or server made comparable: the per-side folder
    (``/qemu/``, ``/ours/``) becomes ``/DIR/`` and query-block's QEMU 10.1 members
    (``active``, ``children``: the version we report) go."""
    if isinstance(value, str):
        return re.sub(r"/(qemu|ours)/", "/DIR/", value)
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in ("active", "children")}
    return value
