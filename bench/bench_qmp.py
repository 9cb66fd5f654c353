#!/usr/bin/env python3
"""QMP round-trip benchmark: qmp-server against a Trio echo floor and QEMU, in one run.

    python3 bench/bench_qmp.py [--round-trips 5000] [--clients 16] [--seconds 3]

Servers on the same kind of socket (UNIX, stream), each in its own process:
(a) this server (``python -m qmp_server``); (b) a minimal Trio server that sends a fixed
greeting and answers every JSON line with a fixed reply (the floor: what any Trio server
needs just to move the bytes); (c) QEMU (``qemu-system-x86_64 -machine none``) when
installed; and, for reference, (b') the same Trio server parsing each line with
``json.loads`` and encoding a reply dict with ``json`` (the floor of any Python server
that reads JSON), and (b'') the echo server polling its socket after each reply as
qmp-server does by default (``echo-poll``: the floor of a server that polls). For each it measures:

- the ``query-status`` round trip of one client, sequential (median and mean), each
  request with a fresh ``id`` as management tools send them. For this server also
  ``qmp-nopoll``: started with ``-poll-max-ns 0`` (no polling of the client's socket after
  a reply; the floor does not poll either), and ``qmp-general``: the same query with
  ``"arguments": {}``, which its fast path for plain queries leaves to the general
  request path;
- the throughput of 16 concurrent clients, each with one request in flight. QEMU serves
  one client per monitor socket, so it gets 16 ``-qmp`` sockets, one per client; the
  others serve all clients on one socket.

The client is one process driving plain sockets, the same for all. Targets (issue 2):
our round trip <= 0.8x QEMU's and <= 1.3x the echo floor.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = [sys.executable, "-m", "qmp_server"]
QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]
# As management tools write it: every request carries a fresh id.
REQUEST = b'{"execute": "query-status", "id": %d}\n'
# The same query with an (empty) arguments object: the server's general request path,
# which its fast path for plain queries (qmp_server/protocol/fastpath.py) leaves this to.
GENERAL_REQUEST = b'{"execute": "query-status", "arguments": {}, "id": %d}\n'
ECHO_GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 10}, "package": ""}, '
                 b'"capabilities": ["oob"]}}\r\n')
ECHO_REPLY = b'{"return": {"status": "running", "running": true}}\r\n'


def echo_server(path: str, parse: bool, poll: bool = False) -> None:
    """The floor: greet, then answer each line with a fixed reply (or parse, and encode one)."""
    import json

    import trio

    encoder = json.JSONEncoder(separators=(", ", ": "))

    async def handle_json(stream: trio.SocketStream) -> None:
        await stream.send_all(ECHO_GREETING)
        pending = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            out = []
            for line in lines:
                message = json.loads(line)
                reply: dict[str, object] = {"return": {"status": "running", "running": True}}
                if "id" in message:
                    reply["id"] = message["id"]
                out.append(encoder.encode(reply).encode() + b"\r\n")
            if out:
                try:
                    await stream.send_all(b"".join(out))
                except trio.BrokenResourceError:
                    return

    async def receive(stream: trio.SocketStream) -> bytes | bytearray:
        # With polling: read the socket without blocking for up to 32768 ns first, other
        # tasks running between tries, as qmp-server does by default (-poll-max-ns).
        if poll:
            fd = stream.socket.fileno()
            deadline = time.perf_counter() + 32768e-9
            while True:
                try:
                    return os.read(fd, 65536)
                except BlockingIOError:
                    if time.perf_counter() >= deadline:
                        break
                    await trio.lowlevel.checkpoint()
        return await stream.receive_some(65536)

    async def handle(stream: trio.SocketStream) -> None:
        await stream.send_all(ECHO_GREETING)
        pending = b""
        while True:
            try:
                data = await receive(stream)
            except (trio.BrokenResourceError, OSError):
                return
            if not data:
                return
            pending += data
            lines = pending.count(b"\n")
            if lines:
                pending = pending[pending.rindex(b"\n") + 1:]
                try:
                    await stream.send_all(ECHO_REPLY * lines)
                except trio.BrokenResourceError:
                    return

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        await trio.serve_listeners(handle_json if parse else handle, [trio.SocketListener(sock)])

    trio.run(main)


def connect(path: Path, timeout: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def read_line(sock: socket.socket, buffer: bytearray) -> bytes:
    while True:
        end = buffer.find(b"\n")
        if end >= 0:
            line = bytes(buffer[:end + 1])
            del buffer[:end + 1]
            return line
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        buffer += data


def negotiated(path: Path) -> tuple[socket.socket, bytearray]:
    sock = connect(path)
    buffer = bytearray()
    read_line(sock, buffer)  # greeting
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    reply = read_line(sock, buffer)
    assert b'"return"' in reply, reply
    return sock, buffer


def round_trips(sock: socket.socket, buffer: bytearray, requests: list[bytes]) -> list[float]:
    """Seconds per query-status round trip, one request at a time, on a negotiated socket."""
    samples = []
    clock = time.perf_counter
    for request in requests:
        start = clock()
        sock.sendall(request)
        line = read_line(sock, buffer)
        samples.append(clock() - start)
        assert line.startswith(b'{"return": {"status": "running"'), line
    return samples


def throughput(paths: list[Path], clients: int, seconds: float, template: bytes = REQUEST) -> float:
    """Replies per second with ``clients`` connections, each keeping one request in flight.

    Client ``i`` connects to ``paths[i % len(paths)]``.
    """
    conns = [negotiated(paths[i % len(paths)]) for i in range(clients)]
    selector = selectors.DefaultSelector()
    try:
        for sock, buffer in conns:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, buffer)
        deadline = 0.0
        replies = 0
        started = 0.0
        for warmup in (True, False):
            replies = 0
            started = time.perf_counter()
            deadline = started + (min(0.5, seconds) if warmup else seconds)
            for sock, _ in conns:
                sock.sendall(template % replies)
            outstanding = len(conns)
            while outstanding:
                for key, _ in selector.select(timeout=30):
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    buffer = key.data
                    data = conn.recv(65536)
                    if not data:
                        raise EOFError("server closed the connection")
                    buffer += data
                    done = buffer.count(b"\n")
                    if not done:
                        continue
                    del buffer[:buffer.rindex(b"\n") + 1]
                    replies += done
                    if time.perf_counter() < deadline:
                        conn.sendall(template % replies)
                    else:
                        outstanding -= 1
        elapsed = time.perf_counter() - started
        return replies / elapsed
    finally:
        selector.close()
        for sock, _ in conns:
            sock.close()


def start(kind: str, folder: Path, clients: int,
          cpu: int | None) -> tuple[subprocess.Popen[bytes], list[Path]]:
    """Start server ``kind`` (all its threads on ``cpu`` if given); return it and its sockets."""
    folder.mkdir(parents=True, exist_ok=True)
    socks = [folder / f"{kind}.sock"]
    if kind in ("qmp-server", "qmp-general", "qmp-nopoll"):
        argv = [*SERVER, "-qmp", f"unix:{socks[0]},server=on,wait=off"]
        if kind == "qmp-nopoll":
            argv += ["-poll-max-ns", "0"]
    elif kind in ("echo", "echo-poll", "json-echo"):
        argv = [sys.executable, __file__, f"--{kind}-server", str(socks[0])]
    else:
        socks = [folder / f"{kind}-{i}.sock" for i in range(clients)]
        argv = list(QEMU)
        for sock in socks:
            argv += ["-qmp", f"unix:{sock},server=on,wait=off"]

    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
    return proc, socks


Result = tuple[float, float, float]  # median round trip, mean round trip, replies per second


def template_for(kind: str) -> bytes:
    return GENERAL_REQUEST if kind == "qmp-general" else REQUEST


def measure(kinds: list[str], folder: Path, args: argparse.Namespace, cpu: int | None) -> dict[str, Result]:
    """Round trips of every kind interleaved in rounds (so that all see the same moments of
    this shared machine), then each one's throughput."""
    procs: dict[str, tuple[subprocess.Popen[bytes], list[Path]]] = {}
    conns: dict[str, tuple[socket.socket, bytearray]] = {}
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    rates: dict[str, float] = {}
    try:
        for kind in kinds:
            procs[kind] = start(kind, folder / kind / "1", 1, cpu)
        for kind in kinds:
            conns[kind] = negotiated(procs[kind][1][0])
            sock, buffer = conns[kind]
            round_trips(sock, buffer, [template_for(kind) % i for i in range(min(500, args.round_trips))])
        per_round = max(1, args.round_trips // args.rounds)
        for number in range(args.rounds):
            order = kinds[number % len(kinds):] + kinds[:number % len(kinds)]
            for kind in order:
                sock, buffer = conns[kind]
                first = number * per_round
                requests = [template_for(kind) % i for i in range(first, first + per_round)]
                samples[kind] += round_trips(sock, buffer, requests)
        for kind in kinds:
            conns.pop(kind)[0].close()
            if kind != "qemu":
                rates[kind] = throughput(procs[kind][1], args.clients, args.seconds, template_for(kind))
    finally:
        for sock, _ in conns.values():
            sock.close()
        for proc, _ in procs.values():
            proc.kill()
            proc.wait()
    if "qemu" in kinds:  # one client per monitor socket
        proc, socks = start("qemu", folder / "qemu" / "n", args.clients, cpu)
        try:
            rates["qemu"] = throughput(socks, args.clients, args.seconds)
        finally:
            proc.kill()
            proc.wait()
    return {kind: (statistics.median(samples[kind]), statistics.fmean(samples[kind]), rates[kind])
            for kind in kinds}


def report(title: str, results: dict[str, Result]) -> None:
    print(title)
    print(f"  {'server':<12} {'median RT':>11} {'mean RT':>11} {'throughput':>16}")
    for kind, (median, mean, rate) in results.items():
        print(f"  {kind:<12} {median * 1e6:>9.1f}us {mean * 1e6:>9.1f}us {rate:>10.0f} req/s")
    for mine, label in (("qmp-server", "round trip"), ("qmp-nopoll", "no polling"),
                        ("qmp-general", "general path")):
        if mine not in results:
            continue
        ours = results[mine]
        for other, target in (("qemu", 0.8), ("echo", 1.3), ("echo-poll", None), ("json-echo", None)):
            if other not in results:
                continue
            if mine != "qmp-server":
                target = None  # the targets are for what clients send (the line above)
            theirs = results[other]
            ratio = ours[0] / theirs[0]
            goal = "no target"
            if target is not None:
                goal = f"target <= {target}x: {'ok' if ratio <= target else 'MISSED'}"
            print(f"  {label:<12} vs {other:<9} {ratio:5.2f}x (median; {goal}); "
                  f"mean {ours[1] / theirs[1]:.2f}x; throughput {ours[2] / theirs[2]:.2f}x")
    print()


PLACEMENTS = {
    # name: (client CPU, server CPU, description)
    "cross": (0, 1, "client on CPU 0, server on CPU 1"),
    "same": (0, 0, "client and server on CPU 0 (no cross-CPU wake-ups: mostly CPU cost)"),
    "free": (None, None, "left to the scheduler"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=10,
                        help="the round trips are measured in this many rounds, servers taking turns")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--placement", action="append", choices=sorted(PLACEMENTS),
                        help="CPU placement(s) to measure "
                             "(default: cross and same with >= 2 CPUs, else free)")
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--json-echo-server", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--echo-poll-server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server or args.json_echo_server or args.echo_poll_server:
        echo_server(args.echo_server or args.json_echo_server or args.echo_poll_server,
                    parse=bool(args.json_echo_server), poll=bool(args.echo_poll_server))
        return

    kinds = ["qmp-server", "qmp-nopoll", "qmp-general", "echo", "echo-poll", "json-echo"]
    if shutil.which(QEMU[0]):
        kinds.append("qemu")
    else:
        print(f"{QEMU[0]} not installed: QEMU column skipped", file=sys.stderr)
    cpus = sorted(os.sched_getaffinity(0))
    placements = args.placement or (["cross", "same"] if len(cpus) >= 2 else ["free"])
    print(f"query-status over a UNIX socket; {args.round_trips} sequential round trips, "
          f"{args.clients} concurrent clients for {args.seconds:g} s; {os.cpu_count()} CPUs\n")
    original = os.sched_getaffinity(0)
    with tempfile.TemporaryDirectory(prefix="bench-qmp-") as tmp:
        for placement in placements:
            client_cpu, server_cpu, description = PLACEMENTS[placement]
            client = None if client_cpu is None else cpus[client_cpu % len(cpus)]
            server = None if server_cpu is None else cpus[server_cpu % len(cpus)]
            os.sched_setaffinity(0, original if client is None else {client})
            try:
                results = measure(kinds, Path(tmp) / placement, args, server)
            finally:
                os.sched_setaffinity(0, original)
            report(f"{placement}: {description}", results)


if __name__ == "__main__":
    main()
