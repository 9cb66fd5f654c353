"""One client must not take the server from the others: fairness, backpressure, limits.

Each test runs the server as a subprocess and judges it from outside: replies and
greetings other clients get (within generous bounds), the server's resident memory
(``VmRSS`` in /proc), what it logs on stderr, the socket file it leaves behind.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostile_clients import FLOODER, running
from server_support import SERVER, Client

QUERY_STATUS = b'{"execute":"query-status"}'
# What QEMU answers to a lone "}" (checked against QEMU 7.2 by test_jsonstream_qemu).
EXPECTING_VALUE = b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n'
SIZE_LIMIT = b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\r\n'
MIB = 1 << 20


class Server:
    """A server subprocess; its stderr goes to a file, to be read after it ends."""

    def __init__(self, tmp_path: Path, *args: str,
                 preexec: Callable[[], None] | None = None) -> None:
        self.sock = tmp_path / "qmp.sock"
        self.stderr_path = tmp_path / "stderr.txt"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [*SERVER, "-qmp", f"unix:{self.sock},server=on,wait=off", *args],
                stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=preexec)

    def client(self, timeout: float = 5.0) -> Client:
        """A negotiated client; the greeting and the reply must come within ``timeout``."""
        client = Client(self.sock, timeout=timeout)
        assert client.execute("qmp_capabilities") == {"return": {}}
        return client

    def rss(self) -> int:
        """Resident memory in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM; the exit status, which must come within ``timeout``."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        """What it logged (complete once it has ended)."""
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        """End it if still running."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path)
    try:
        Client(srv.sock).close()
        yield srv
    finally:
        srv.kill()


def _round_trips(client: Client, count: int) -> list[float]:
    """``count`` query-status round trips; their durations (each within the client's timeout)."""
    times = []
    for n in range(count):
        start = time.monotonic()
        client.send_raw(b'{"execute":"query-status","id":%d}' % n)
        assert client.reply() == {"return": {"status": "running", "running": True}, "id": n}
        times.append(time.monotonic() - start)
    return times


class _Sender(threading.Thread):
    """Sends ``chunk`` again and again (or ``total`` bytes of it) until stopped or refused."""

    def __init__(self, sock: socket.socket, chunk: bytes, total: int | None = None) -> None:
        super().__init__(daemon=True)
        self.sock, self.chunk, self.total = sock, chunk, total
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        view = memoryview(self.chunk)
        while not self.stop.is_set() and (self.total is None or self.sent < self.total):
            try:
                self.sent += self.sock.send(view[self.sent % len(self.chunk):])
            except TimeoutError:
                continue
            except OSError:
                return


class _Drainer(threading.Thread):
    """Reads and counts what the server sends until end of input or stopped."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.lines = 0
        self.tail = b""
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.lines += data.count(b"\n")
            self.tail = (self.tail + data)[-4096:]


# --------------------------------------------------------------------------------------
# §2: a client pipelining requests as fast as it can


@contextlib.contextmanager
def flooding(sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A client pipelining requests as fast as it can, for the duration of the block."""
    with running(FLOODER, str(sock)) as proc:
        time.sleep(0.3)
        yield proc


def test_flooding_client_leaves_room_for_everyone(server: Server) -> None:
    with flooding(server.sock) as flooder:
        # A well-behaved client beside it, asking now and then: every reply within the 5 s
        # of Client's timeout, and nine in ten within 50 ms (the flooder gets a share of
        # the time, not all of it, and not in long stretches).
        other = server.client()
        base = server.rss()
        times, peak = [], base
        for _ in range(40):
            times += _round_trips(other, 1)
            peak = max(peak, server.rss())
            time.sleep(0.02)
        times.sort()
        assert times[36] < 0.05, f"p90 {times[36] * 1000:.0f} ms"
        assert peak - base < 16 * MIB, f"server grew {(peak - base) / MIB:.0f} MiB under the flood"
        # A new client gets its greeting.
        Client(server.sock, timeout=5).close()
        assert flooder.poll() is None, "the flood ended early"
        # And the server still ends on SIGTERM.
        assert server.terminate() == 0


# --------------------------------------------------------------------------------------
# §3: a client that sends and never reads


def test_client_that_never_reads_costs_bounded_memory(server: Server) -> None:
    other = server.client()
    _round_trips(other, 5)
    base = server.rss()
    hog = server.client()
    # Each 28-byte request makes a 749-byte reply; unbounded, that is ~30 MB/s.
    sender = _Sender(hog.sock, b'{"execute":"query-commands"}' * 64)
    sender.start()
    peak = base
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            _round_trips(other, 1)  # others are still served
            peak = max(peak, server.rss())
            time.sleep(0.05)
        assert sender.sent > 8 * MIB // 28 // 10, "the hog sent too little to tell"
    finally:
        sender.stop.set()
        sender.join()
    assert peak - base < 16 * MIB, f"server grew {(peak - base) / MIB:.0f} MiB for a client that never reads"
    hog.close()
    _round_trips(other, 5)
    time.sleep(0.5)
    assert server.rss() - base < 16 * MIB, "memory kept after the client left"


def test_client_that_stopped_reading_is_disconnected_once_its_events_pile_up(server: Server) -> None:
    hog = server.client()
    hog.sock.setblocking(False)
    batch = b'{"execute":"query-commands"}' * 64
    # Until the server stops reading it (its output is over the bound).
    blocked_since = None
    while blocked_since is None or time.monotonic() - blocked_since < 0.5:
        try:
            hog.sock.send(batch)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            time.sleep(0.01)
    # Events still come for it: 4,000 of them (~340 KB), more than it may have queued.
    other = server.client()
    for _ in range(2000):
        assert other.execute("stop") == {"return": {}}
        assert other.execute("cont") == {"return": {}}
    # It gets what was queued for it, then the end of the connection.
    hog.sock.setblocking(True)
    hog.sock.settimeout(10)
    while True:
        try:
            if not hog.sock.recv(1 << 20):
                break
        except ConnectionResetError:
            break
    _round_trips(other, 1)
    assert server.terminate() == 0
    assert "stopped reading its replies and events; disconnecting it" in server.stderr()


def test_input_over_the_limits_makes_its_errors_under_the_output_bound(server: Server) -> None:
    client = server.client(timeout=30)
    # A token past QEMU's 64 MiB token limit: one error (QEMU holds the token as well).
    start = time.monotonic()
    client.send_raw(b'"' + b"a" * (64 * MIB))
    assert client.read_line() == SIZE_LIMIT
    # A control character takes the lexer back to a known state (as in QEMU); whatever
    # errors the rest of the token makes come before the probe's reply.
    client.send_raw(b'\x01{"execute":"query-name","id":"probe"}')
    while b'"probe"' not in client.read_line():
        pass
    print(f"token: {time.monotonic() - start:.1f} s")
    base = server.rss()
    # Then input where every byte is an error: 200,000 error replies (17 MB) that the
    # client does not read for a while.
    count = 200_000
    sender = _Sender(client.sock, b"}" * count, total=count)
    sender.start()
    peak = base
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        peak = max(peak, server.rss())
        time.sleep(0.05)
    # Now read them all: exactly QEMU's reply to each byte, in order, none lost.
    drainer = _Drainer(client.sock)
    drainer.start()
    sender.join(timeout=60)
    deadline = time.monotonic() + 60
    while drainer.lines < count and time.monotonic() < deadline:
        peak = max(peak, server.rss())
        time.sleep(0.05)
    drainer.stop.set()
    drainer.join()
    assert drainer.lines == count
    assert drainer.tail.endswith(EXPECTING_VALUE * 10)
    assert peak - base < 16 * MIB, f"server grew {(peak - base) / MIB:.0f} MiB making error replies"
    _round_trips(server.client(), 1)


# --------------------------------------------------------------------------------------
# §4: socket hygiene


@pytest.mark.parametrize("replacement", ["none", "file", "socket"])
def test_exit_removes_only_our_own_socket(tmp_path: Path, replacement: str) -> None:
    srv = Server(tmp_path)
    other: socket.socket | None = None
    try:
        Client(srv.sock).close()
        if replacement != "none":
            # Someone removes our socket file and puts something else there.
            srv.sock.unlink()
            if replacement == "file":
                srv.sock.write_text("not yours")
            else:
                other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                other.bind(str(srv.sock))
                other.listen(1)
        assert srv.terminate() == 0
        if replacement == "none":
            assert not srv.sock.exists()
        elif replacement == "file":
            assert srv.sock.read_text() == "not yours"
        else:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(srv.sock))  # the other server's socket still works
            probe.close()
    finally:
        if other is not None:
            other.close()
        srv.kill()


def _limit_fds(soft: int, hard: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return preexec


def test_running_out_of_descriptors_is_logged_once_and_survived(tmp_path: Path) -> None:
    srv = Server(tmp_path, preexec=_limit_fds(40, 40))
    socks: list[socket.socket] = []
    try:
        Client(srv.sock).close()
        for _ in range(80):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(srv.sock))
            socks.append(sock)
        time.sleep(2)  # twenty retries' worth
        for sock in socks:
            sock.close()
        socks.clear()
        # Descriptors are free again: a new client is served.
        _round_trips(srv.client(timeout=10), 3)
        assert srv.terminate() == 0
    finally:
        for sock in socks:
            sock.close()
        srv.kill()
    lines = [line for line in srv.stderr().splitlines() if "Too many open files" in line]
    assert len(lines) == 1, srv.stderr()


def test_a_thousand_clients_connecting_at_once_are_all_greeted(tmp_path: Path) -> None:
    clients = 1000
    own = resource.getrlimit(resource.RLIMIT_NOFILE)
    if own[1] < clients + 100:
        pytest.skip("the hard limit on descriptors is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (own[1], own[1]))
    # The server starts with a soft limit too low for them all, as shells often set it.
    srv = Server(tmp_path, preexec=_limit_fds(256, own[1]))
    socks: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    try:
        Client(srv.sock).close()
        # Stopped, the server accepts nothing: every connection must wait in the backlog.
        srv.proc.send_signal(signal.SIGSTOP)
        for _ in range(clients):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            sock.connect(str(srv.sock))  # BlockingIOError once the backlog is full
        srv.proc.send_signal(signal.SIGCONT)
        received = {sock: b"" for sock in socks}
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        greeted = 0
        deadline = time.monotonic() + 30
        while greeted < clients and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(4096)
                assert data, "connection closed without a greeting"
                received[sock] += data
                if received[sock].endswith(b"\r\n"):
                    assert received[sock].startswith(b'{"QMP": {"version": ')
                    selector.unregister(sock)
                    greeted += 1
        assert greeted == clients
    finally:
        with contextlib.suppress(ProcessLookupError):
            srv.proc.send_signal(signal.SIGCONT)
        selector.close()
        for sock in socks:
            sock.close()
        srv.kill()
        resource.setrlimit(resource.RLIMIT_NOFILE, own)
