#!/usr/bin/env python3
"""Start-up time: process start to an answered ``query-status``, ours against QEMU's.

Each round spawns the program with a fresh QMP socket, connects as soon as the socket
exists, reads the greeting, negotiates, asks ``query-status``, sends ``quit`` and waits
for the process to end. The servers take turns round by round so that machine noise hits
both alike; the medians and their ratio are printed, with the median time of each phase
since the spawn: the socket accepts a connection, the greeting arrived, ``query-status``
was answered (the headline figure), the process ended after ``quit``.

    python3 bench/bench_startup.py [--rounds 20] [--server 'qmp-server'] [--qemu 'qemu-system-x86_64']

``--server`` may be given more than once (e.g. an install before and after a change):
all of them take turns with QEMU in the same run. ``--floor`` adds the floor of any Trio
server: this interpreter importing Trio and answering the same exchange with fixed
replies (with the cyclic GC off and ``os._exit`` at the end, as our launcher does).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

QEMU_ARGS = ["-machine", "none", "-nodefaults", "-display", "none"]

#: The floor (``--floor``), run as ``python -c FLOOR -qmp unix:PATH,...``: Python, Trio,
#: one listening socket, a fixed greeting and a fixed reply to each request.
FLOOR = """
import gc
gc.disable()
import os, sys, trio
async def serve(path):
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    conn, _ = await sock.accept()
    await conn.send(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 10}, '
                    b'"package": ""}, "capabilities": ["oob"]}}\\r\\n')
    while True:
        data = await conn.recv(65536)
        if not data or b'"quit"' in data:
            break
        await conn.send(b'{"return": {}}\\r\\n' * data.count(b'"execute"'))
    await conn.send(b'{"return": {}}\\r\\n')
    os.unlink(path)
trio.run(serve, sys.argv[2].removeprefix("unix:").split(",")[0])
os._exit(0)
"""


def _connect(path: str, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.0005)


def _line(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        buffer += chunk
    end = buffer.index(b"\n") + 1
    line = bytes(buffer[:end])
    del buffer[:end]
    return line


PHASES = ("connectable", "greeting", "answered", "ended")


def one_start(argv: list[str], folder: str) -> dict[str, float]:
    """Seconds from spawn to each of :data:`PHASES`."""
    path = os.path.join(folder, "s.sock")
    if os.path.exists(path):
        os.unlink(path)
    start = time.perf_counter()
    proc = subprocess.Popen([*argv, "-qmp", f"unix:{path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = _connect(path, start + 30)
    connectable = time.perf_counter()
    buffer = bytearray()
    _line(sock, buffer)  # greeting
    greeting = time.perf_counter()
    for request in (b'{"execute":"qmp_capabilities"}', b'{"execute":"query-status"}'):
        sock.sendall(request)
        reply = _line(sock, buffer)
        assert b'"return"' in reply, reply
    answered = time.perf_counter()
    sock.sendall(b'{"execute":"quit"}')
    with_quit = proc.wait(30)
    ended = time.perf_counter()
    sock.close()
    assert with_quit == 0, with_quit
    return dict(zip(PHASES, (moment - start for moment in (connectable, greeting, answered, ended)),
                    strict=True))


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--server", action="append", help=f"default: {sys.executable} -m qmp_server")
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--floor", action="store_true", help="also time the Python + Trio floor")
    args = parser.parse_args()
    servers = args.server or [f"{sys.executable} -m qmp_server"]
    programs = {("qmp-server" if index == 0 else f"server #{index + 1}"): shlex.split(command)
                for index, command in enumerate(servers)}
    if args.floor:
        programs["trio floor"] = [sys.executable, "-c", FLOOR]
    programs["QEMU"] = [*shlex.split(args.qemu), *QEMU_ARGS]
    times: dict[str, list[dict[str, float]]] = {name: [] for name in programs}
    with tempfile.TemporaryDirectory() as folder:
        for argv in programs.values():  # warm the page cache once each
            one_start(argv, folder)
        for _ in range(args.rounds):
            for name, argv in programs.items():
                times[name].append(one_start(argv, folder))
    medians = {name: statistics.median(t["answered"] for t in rounds) for name, rounds in times.items()}
    for name, rounds in times.items():
        answered = [t["answered"] for t in rounds]
        print(f"{name:10} median {medians[name] * 1e3:7.1f} ms  min {min(answered) * 1e3:7.1f} ms"
              f"  max {max(answered) * 1e3:7.1f} ms")
    print("phases (median ms since spawn): " + " / ".join(PHASES))
    for name, rounds in times.items():
        print(f"{name:10} " + " / ".join(f"{statistics.median(t[phase] for t in rounds) * 1e3:.1f}"
                                         for phase in PHASES))
    for name in programs:
        if name != "QEMU":
            print(f"start to answered query-status: {name} / QEMU = {medians[name] / medians['QEMU']:.2f}x")


if __name__ == "__main__":
    main()
