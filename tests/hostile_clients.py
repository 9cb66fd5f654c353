"""Misbehaving QMP clients, each a program run in its own process.

Shared by the fairness tests and ``bench/bench_load.py``. In their own processes, not in
threads of the caller: a thread would share the interpreter lock with the well-behaved
client being measured and stall whenever that one runs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: Sends ``query-status`` 100 at a time, as fast as the server takes them, and reads
#: every reply.
FLOODER = """
import socket, sys, threading
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(b'{"execute":"qmp_capabilities"}')
def drain():
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass
threading.Thread(target=drain, daemon=True).start()
batch = b'{"execute":"query-status"}' * 100
print("ready", flush=True)
try:
    while True:
        sock.sendall(batch)
except OSError:
    pass
"""

#: Sends ``query-commands`` 64 at a time and never reads a reply.
NON_READER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(b'{"execute":"qmp_capabilities"}')
batch = b'{"execute":"query-commands"}' * 64
print("ready", flush=True)
try:
    while True:
        sock.sendall(batch)
except OSError:
    pass
"""


@contextmanager
def running(program: str, path: str) -> Iterator[subprocess.Popen[bytes]]:
    """``program`` connected to the QMP socket ``path``, from its first request to the end of the block."""
    proc = subprocess.Popen([sys.executable, "-c", program, path], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
