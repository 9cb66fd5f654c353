"""Latency of a well-behaved client under load: idle crowds, a flooder, a client that never reads.

    python3 bench/bench_load.py [--idle 1000] [--samples 1000] [--interval 0.002]

Measures, for qmp-server, the ``query-status`` round trip of one well-behaved client (a
request with a fresh ``id`` every ``--interval`` seconds, ``--samples`` of them; p50 and
p99) and the server's peak resident memory (``VmHWM``), in two set-ups:

- ``alone``: the well-behaved client is the only one;
- ``flooded``: beside it, one client pipelining ``query-status`` 100 at a time as fast
  as the server takes them (reading every reply);
- ``loaded``: beside it, ``--idle`` connected clients that send nothing, one client
  pipelining ``query-status`` 100 at a time as fast as the server takes them (reading
  every reply), as in ``flooded``, and one client sending ``query-commands`` without ever reading a reply.

QEMU (``qemu-system-x86_64 -machine none``, when installed) serves one client per
monitor socket and runs one main loop for all of them, so it is measured ``alone`` (the
well-behaved client on its only monitor) and ``flooded``: a second monitor socket for
the flooder (the nearest it has to our loaded set-up; 1,000 monitors, or a non-reading
client, are not something QEMU is meant for: it would stop reading that monitor, as we
do, after 8 requests). Ratios are ours / QEMU's.

Targets (issue 8): with 1,000 connected clients and a flooder, the well-behaved
client's p99 stays under 50 ms and the server's RSS under 128 MB.

Each flooder and non-reader runs in a process of its own (in a thread of the measuring
process they would share its interpreter lock and skew its timings). The soft limit on
open descriptors is raised to the hard one here (the server raises its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = [sys.executable, "-m", "qmp_server"]
sys.path.insert(0, str(ROOT / "tests"))
from hostile_clients import FLOODER, NON_READER, running  # type: ignore[import-not-found]  # noqa: E402

QEMU = ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none"]


def connect(path: str, timeout: float = 20.0) -> socket.socket:
    """A connected socket whose greeting has been read (retrying until the server listens)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    sock.settimeout(timeout)
    read_line(sock)
    return sock


def read_line(sock: socket.socket) -> bytes:
    """One line (the well-behaved client never has more than one message in flight)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        data += chunk
    return data


def peak_rss(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(path: str, samples: int, interval: float) -> list[float]:
    """Round trips of the well-behaved client, one every ``interval`` seconds."""
    sock = connect(path)
    sock.sendall(b'{"execute":"qmp_capabilities"}')
    read_line(sock)
    times = []
    for n in range(samples):
        start = time.perf_counter()
        sock.sendall(b'{"execute":"query-status","id":"bench-%d"}' % n)
        reply = json.loads(read_line(sock))
        times.append(time.perf_counter() - start)
        assert reply.get("id") == f"bench-{n}", reply
        time.sleep(interval)
    sock.close()
    return times


def run(argv: list[str], paths: list[str], *, idle: int, flood: bool, non_reader: bool,
        samples: int, interval: float) -> tuple[list[float], int]:
    """Start a server with ``argv``; load it as asked; (round trips, peak RSS)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    idle_socks: list[socket.socket] = []
    try:
        connect(paths[0]).close()
        for _ in range(idle):
            idle_socks.append(connect(paths[0]))
        with contextlib_nullable(flood, FLOODER, paths[-1]), \
                contextlib_nullable(non_reader, NON_READER, paths[0]):
            time.sleep(0.5)  # let the load settle
            times = measure(paths[0], samples, interval)
            rss = peak_rss(proc.pid)
        return times, rss
    finally:
        for sock in idle_socks:
            sock.close()
        proc.kill()
        proc.wait()


@contextmanager
def contextlib_nullable(enabled: bool, code: str, path: str) -> Iterator[None]:
    """The misbehaving client ``code`` on ``path`` if ``enabled``, else nothing."""
    if enabled:
        with running(code, path):
            yield
    else:
        yield


def percentile(times: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank)."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    """Run every set-up and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.002)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle + 64:
        sys.exit(f"the hard limit on open descriptors ({hard}) is too low for {args.idle} clients")
    results: dict[str, tuple[list[float], int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours = os.path.join(tmp, "ours.sock")
        argv = [*SERVER, "-qmp", f"unix:{ours},server=on,wait=off"]
        common = {"samples": args.samples, "interval": args.interval}
        results["qmp-server alone"] = run(argv, [ours], idle=0, flood=False, non_reader=False, **common)
        results["qmp-server flooded"] = run(argv, [ours], idle=0, flood=True, non_reader=False, **common)
        results["qmp-server loaded"] = run(argv, [ours], idle=args.idle, flood=True, non_reader=True,
                                           **common)
        if shutil.which(QEMU[0]):
            mon, flood = os.path.join(tmp, "qemu.sock"), os.path.join(tmp, "qemu-flood.sock")
            qemu = [*QEMU, "-qmp", f"unix:{mon},server=on,wait=off"]
            results["qemu alone"] = run(qemu, [mon], idle=0, flood=False, non_reader=False, **common)
            qemu_flood = [*qemu, "-qmp", f"unix:{flood},server=on,wait=off"]
            results["qemu flooded"] = run(qemu_flood, [mon, flood], idle=0, flood=True, non_reader=False,
                                          **common)
    print(f"query-status round trip of a well-behaved client, {args.samples} samples, "
          f"one every {args.interval * 1000:g} ms; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"loaded: {args.idle} idle clients + a pipelining flooder + a client that never reads\n")
    print(f"  {'set-up':<20} {'p50':>9} {'p99':>9} {'max':>9} {'mean':>9} {'peak RSS':>10}")
    for name, (times, rss) in results.items():
        print(f"  {name:<20} {percentile(times, 0.5) * 1e3:7.2f}ms {percentile(times, 0.99) * 1e3:7.2f}ms "
              f"{max(times) * 1e3:7.2f}ms {statistics.mean(times) * 1e3:7.2f}ms {rss / 2**20:8.1f}MB")
    loaded_times, loaded_rss = results["qmp-server loaded"]
    p99 = percentile(loaded_times, 0.99)
    rss_ok = "ok" if loaded_rss < 128 << 20 else "MISSED"
    print(f"\n  loaded p99 {p99 * 1e3:.1f} ms (target < 50 ms: {'ok' if p99 < 0.05 else 'MISSED'}); "
          f"peak RSS {loaded_rss / 2**20:.0f} MB (target < 128 MB: {rss_ok})")
    for ours_name, qemu_name in (("qmp-server alone", "qemu alone"), ("qmp-server flooded", "qemu flooded"),
                                 ("qmp-server loaded", "qemu alone"), ("qmp-server loaded", "qemu flooded")):
        if qemu_name not in results:
            continue
        a, b = results[ours_name][0], results[qemu_name][0]
        print(f"  {ours_name} vs {qemu_name}: p50 {percentile(a, 0.5) / percentile(b, 0.5):.2f}x, "
              f"p99 {percentile(a, 0.99) / percentile(b, 0.99):.2f}x, "
              f"peak RSS {results[ours_name][1] / results[qemu_name][1]:.2f}x")


if __name__ == "__main__":
    main()
