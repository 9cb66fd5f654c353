#!/usr/bin/env python3
"""Live migration between two qmp-server processes, driven the way a management tool would.

Starts a source and a destination (``-incoming defer``) on one shared qcow2 image,
writes through the source (HMP ``qemu-io``), migrates over a UNIX socket, reads the data
back on the destination, and shows that the source can no longer take the image.
Everything goes through QMP with the ``qemu.qmp`` library (``pip install qemu.qmp``);
swap the server command for ``qemu-system-x86_64 -machine none ...`` and the script works
against QEMU too.

    python examples/migrate.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

SERVER = f"{shlex.quote(sys.executable)} -m qmp_server"


def create_qcow2(path: Path, size: int = 64 << 20) -> None:
    """An empty qcow2 image: qemu-img if installed, else a minimal v3 image written here."""
    if shutil.which("qemu-img"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
        return
    cluster = 1 << 16
    l1_entries = -(-size // (cluster * (cluster // 8)))
    # Cluster 0 header, 1 refcount table, 2 refcount block, 3 L1 table.
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, 0, 0, 16, size, 0, l1_entries,
                         3 * cluster, cluster, 1, 0, 0, 0, 0, 0, 4, 104)
    image = bytearray(4 * cluster)
    image[:len(header)] = header
    image[cluster:cluster + 8] = struct.pack(">Q", 2 * cluster)
    image[2 * cluster:2 * cluster + 8] = struct.pack(">4H", 1, 1, 1, 1)
    path.write_bytes(bytes(image))


async def connect(name: str, socket_path: Path) -> QMPClient:
    """Connect once the server has created its socket."""
    client = QMPClient(name)
    for _ in range(500):
        if socket_path.exists():
            try:
                await client.connect(str(socket_path))
                return client
            except (ConnectError, OSError):
                pass  # listening starts a moment after the socket file appears
        await asyncio.sleep(0.01)
    raise SystemExit(f"{name}: could not connect to {socket_path}")


async def hmp(client: QMPClient, line: str) -> str:
    """Run an HMP command line, return its output."""
    return str(await client.execute("human-monitor-command", {"command-line": line}))


async def qemu_io(client: QMPClient, log: Path, args: str) -> str:
    """HMP ``qemu-io ARGS``. Like QEMU, the server prints qemu-io's results on its stdout
    (here the file ``log``) before it replies; return them, then the reply (errors)."""
    start = log.stat().st_size
    reply = await hmp(client, f"qemu-io {args}")
    with log.open("rb") as printed:
        printed.seek(start)
        return printed.read().decode() + reply


async def wait_migration(events: EventListener, *final: str) -> str:
    """The first MIGRATION status among ``final``."""
    while True:
        event: Any = await events.get()
        status = str(event["data"]["status"])
        if status in final:
            return status


async def run(workdir: Path, server: str) -> int:
    image = workdir / "shared.qcow2"
    create_qcow2(image)
    blockdev = ["-blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    clients: dict[str, QMPClient] = {}
    logs = {name: workdir / f"{name}.log" for name in ("src", "dst")}
    for name, extra in (("src", []), ("dst", ["-incoming", "defer"])):
        sock = workdir / f"{name}.sock"
        argv = [*shlex.split(server), "-qmp", f"unix:{sock},server=on,wait=off", *extra, *blockdev]
        with logs[name].open("wb") as log:
            procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        for name in procs:
            clients[name] = await connect(name, workdir / f"{name}.sock")
        src, dst = clients["src"], clients["dst"]
        events_on: dict[str, Any] = {"capabilities": [{"capability": "events", "state": True}]}
        for client in (src, dst):
            await client.execute("migrate-set-capabilities", events_on)
        print("destination:", await dst.execute("query-status"))

        print(await qemu_io(src, logs["src"], 'disk0 "write -P 0xab 0 1M"'), end="")

        uri = f"unix:{workdir / 'migration.sock'}"
        src_events, dst_events = EventListener("MIGRATION"), EventListener("MIGRATION")
        with src.listen(src_events), dst.listen(dst_events):
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            outcome = await wait_migration(src_events, "completed", "failed", "cancelled")
            if outcome != "completed":
                print("migration", outcome, await src.execute("query-migrate"))
                return 1
            await wait_migration(dst_events, "completed", "failed")
        info: Any = await src.execute("query-migrate")
        print(f"migration completed in {info['total-time']} ms, downtime {info['downtime']} ms")
        print("source:", await src.execute("query-status"))
        print("destination:", await dst.execute("query-status"))

        readback = await qemu_io(dst, logs["dst"], 'disk0 "read -P 0xab 0 1M"')
        if "verification failed" in readback or "read 1048576/1048576" not in readback:
            print("destination read unexpected data:", readback)
            return 1
        print("destination read back the source's data")
        print(await qemu_io(dst, logs["dst"], 'disk0 "write -P 0xcd 1M 1M"'), end="")

        try:
            await src.execute("cont")
        except ExecuteError as err:
            print(f"source can no longer take the image: {err.error.error.desc}")
        else:
            print("source resumed: two writers!")
            return 1

        for client in (dst, src):
            await client.execute("quit")
            # The server hangs up after answering quit; that is the expected end.
            with contextlib.suppress(EOFError):
                await client.disconnect()
        for proc in procs.values():
            proc.wait(10)
        return 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        help="where the image and sockets go (default: a temporary directory)")
    parser.add_argument("--server", default=SERVER, help=f"server command (default: {SERVER})")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(run(args.workdir, args.server))
    with tempfile.TemporaryDirectory(prefix="qmp-migrate-") as workdir:
        return asyncio.run(run(Path(workdir), args.server))


if __name__ == "__main__":
    sys.exit(main())
