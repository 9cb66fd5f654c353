#!/usr/bin/env python3
"""Start-up time: process start to an answered ``query-status``, ours against QEMU's.

Each round spawns the program with a fresh QMP socket, connects as soon as the socket
exists, reads the greeting, negotiates, asks ``query-status``, sends ``quit`` and waits
for the process to end. The servers take turns round by round so that machine noise hits
both alike; the medians and their ratio are printed.

    python3 bench/bench_startup.py [--rounds 20] [--server 'qmp-server'] [--qemu 'qemu-system-x86_64']
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


def one_start(argv: list[str], folder: str) -> float:
    """Seconds from spawn to the end of the process after quit."""
    path = os.path.join(folder, "s.sock")
    if os.path.exists(path):
        os.unlink(path)
    start = time.perf_counter()
    proc = subprocess.Popen([*argv, "-qmp", f"unix:{path},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = _connect(path, start + 30)
    buffer = bytearray()
    _line(sock, buffer)  # greeting
    for request in (b'{"execute":"qmp_capabilities"}', b'{"execute":"query-status"}'):
        sock.sendall(request)
        reply = _line(sock, buffer)
        assert b'"return"' in reply, reply
    answered = time.perf_counter()
    sock.sendall(b'{"execute":"quit"}')
    with_quit = proc.wait(30)
    sock.close()
    assert with_quit == 0, with_quit
    return answered - start


def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--server", default=f"{sys.executable} -m qmp_server")
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    args = parser.parse_args()
    programs = {"qmp-server": shlex.split(args.server), "QEMU": [*shlex.split(args.qemu), *QEMU_ARGS]}
    times: dict[str, list[float]] = {name: [] for name in programs}
    with tempfile.TemporaryDirectory() as folder:
        for argv in programs.values():  # warm the page cache once each
            one_start(argv, folder)
        for _ in range(args.rounds):
            for name, argv in programs.items():
                times[name].append(one_start(argv, folder))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:10} median {medians[name] * 1e3:7.1f} ms  min {min(values) * 1e3:7.1f} ms"
              f"  max {max(values) * 1e3:7.1f} ms")
    ratio = medians["qmp-server"] / medians["QEMU"]
    print(f"start to answered query-status: qmp-server / QEMU = {ratio:.2f}x")


if __name__ == "__main__":
    main()
