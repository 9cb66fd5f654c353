#!/usr/bin/env python3
"""QMP round-trip benchmark: qmp-server against a Trio echo floor and QEMU, in one run.

    python3 bench/bench_qmp.py [--round-trips 5000] [--clients 16] [--seconds 3]

Three servers on the same kind of socket (UNIX, stream), each in its own process:
(a) this server (``python -m qmp_server``); (b) a minimal Trio server that sends a fixed
greeting and answers every JSON line with a fixed reply (the floor: what any Trio server
needs just to move the bytes); (c) QEMU (``qemu-system-x86_64 -machine none``) when
installed. For each it measures:

- the ``query-status`` round trip of one client, sequential (median and mean);
- the throughput of 16 concurrent clients, each with one request in flight.

The client is one process driving plain sockets, the same for all three. Targets
(issue 2): our round trip <= 0.8x QEMU's and <= 1.3x the echo floor.
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
REQUEST = b'{"execute": "query-status"}\n'
ECHO_GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 10}, "package": ""}, '
                 b'"capabilities": ["oob"]}}\r\n')
ECHO_REPLY = b'{"return": {"status": "running", "running": true}}\r\n'


def echo_server(path: str) -> None:
    """The floor: greet, then answer each line with a fixed reply."""
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        await stream.send_all(ECHO_GREETING)
        pending = b""
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
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
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

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


def round_trips(path: Path, count: int) -> list[float]:
    """Seconds per query-status round trip, one client, one request at a time."""
    sock, buffer = negotiated(path)
    try:
        for _ in range(min(500, count)):  # warm-up
            sock.sendall(REQUEST)
            read_line(sock, buffer)
        samples = []
        clock = time.perf_counter
        for _ in range(count):
            start = clock()
            sock.sendall(REQUEST)
            line = read_line(sock, buffer)
            samples.append(clock() - start)
            assert line.startswith(b'{"return": {"status": "running"'), line
        return samples
    finally:
        sock.close()


def throughput(path: Path, clients: int, seconds: float) -> float:
    """Replies per second with ``clients`` connections, each keeping one request in flight."""
    conns = [negotiated(path) for _ in range(clients)]
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
                sock.sendall(REQUEST)
            outstanding = len(conns)
            while outstanding:
                for key, _ in selector.select(timeout=30):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    buffer = key.data
                    data = sock.recv(65536)
                    if not data:
                        raise EOFError("server closed the connection")
                    buffer += data
                    done = buffer.count(b"\n")
                    if not done:
                        continue
                    del buffer[:buffer.rindex(b"\n") + 1]
                    replies += done
                    if time.perf_counter() < deadline:
                        sock.sendall(REQUEST)
                    else:
                        outstanding -= 1
        elapsed = time.perf_counter() - started
        return replies / elapsed
    finally:
        selector.close()
        for sock, _ in conns:
            sock.close()


def start(kind: str, sock: Path) -> subprocess.Popen[bytes]:
    if kind == "qmp-server":
        argv = [*SERVER, "-qmp", f"unix:{sock},server=on,wait=off"]
    elif kind == "echo":
        argv = [sys.executable, __file__, "--echo-server", str(sock)]
    else:
        argv = [*QEMU, "-qmp", f"unix:{sock},server=on,wait=off"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return

    kinds = ["qmp-server", "echo"]
    if shutil.which(QEMU[0]):
        kinds.append("qemu")
    else:
        print(f"{QEMU[0]} not installed: QEMU column skipped", file=sys.stderr)
    results: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-qmp-") as tmp:
        for kind in kinds:
            sock = Path(tmp) / f"{kind}.sock"
            proc = start(kind, sock)
            try:
                samples = round_trips(sock, args.round_trips)
                rate = throughput(sock, args.clients, args.seconds)
            finally:
                proc.kill()
                proc.wait()
            results[kind] = (statistics.median(samples), statistics.fmean(samples), rate)

    print(f"query-status over a UNIX socket; {args.round_trips} sequential round trips, "
          f"{args.clients} concurrent clients for {args.seconds:g} s; {os.cpu_count()} CPUs")
    print(f"{'server':<12} {'median RT':>11} {'mean RT':>11} {'throughput':>14}")
    for kind, (median, mean, rate) in results.items():
        print(f"{kind:<12} {median * 1e6:>9.1f}us {mean * 1e6:>9.1f}us {rate:>10.0f} req/s")
    ours = results["qmp-server"]
    print()
    for other, target in (("qemu", 0.8), ("echo", 1.3)):
        if other not in results:
            continue
        theirs = results[other]
        ratio = ours[0] / theirs[0]
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"round trip vs {other:<5} {ratio:5.2f}x (median; target <= {target}x: {verdict}); "
              f"mean {ours[1] / theirs[1]:.2f}x; throughput {ours[2] / theirs[2]:.2f}x")


if __name__ == "__main__":
    main()
