"""The NBD server and block exports, against QEMU 7.2 doing the same.

Each scenario runs on QEMU and on our server, in directories whose paths have the same
length. Compared: QMP replies, errors and events; what QEMU's own NBD clients (qemu-nbd
--list, qemu-img, qemu-io) print through the export; the image's lock bytes while
exported; ``qemu-img check`` after writes through the export. Then hostile clients
speaking raw NBD, which must get error replies or be disconnected, never hang the server.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbd_client
import pytest
from lock_probe import locked
from server_support import QEMU, SERVER, Client

from qmp_server.nbd import protocol as nbd


@contextmanager
def _process(qemu: bool, work: Path) -> Iterator[tuple[subprocess.Popen[bytes], Client]]:
    sock = work / "qmp.sock"
    with (work / "out").open("wb") as sink:
        proc = subprocess.Popen((QEMU if qemu else SERVER) + ["-qmp", f"unix:{sock},server=on,wait=off"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        client = Client(sock)
        client.execute("qmp_capabilities")
        yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _both(tmp_path: Path, scenario: Callable[[subprocess.Popen[bytes], Client, Path], list[Any]]
          ) -> tuple[list[Any], list[Any]]:
    results = []
    for qemu, name in ((True, "qemu"), (False, "ours")):
        work = tmp_path / name
        work.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(work / "d.qcow2"), "4M"], check=True)
        with _process(qemu, work) as (proc, client):
            steps = scenario(proc, client, work)
        results.append(_normalized(steps, str(work)))
    return results[0], results[1]


def _normalized(value: Any, work: str) -> Any:
    """Paths and qemu-io's timings made comparable."""
    if isinstance(value, str):
        return re.sub(r"; [0-9.]+ sec \([^)]*\)", "; TIME", value.replace(work, "@"))
    if isinstance(value, list):
        return [_normalized(v, work) for v in value]
    if isinstance(value, dict):
        return {k: _normalized(v, work) for k, v in value.items()}
    return value


def _run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def _qmp(client: Client, command: str, /, **args: Any) -> dict[str, Any]:
    reply = client.execute(command, args)
    reply["events"] = [e["event"] + ":" + str(e.get("data")) for e in client.events]
    client.events.clear()
    return reply


def _quit(client: Client) -> list[str]:
    """``quit``'s reply and every event up to the end of the connection (QEMU 7.2 sends
    BLOCK_EXPORT_DELETED before its reply; we send it just after)."""
    reply = _qmp(client, "quit")
    events = list(reply.pop("events"))
    for _ in range(100):  # bounded: the server closes the connection
        try:
            message = client.read(timeout=10)
        except EOFError:
            break
        events.append(message["event"] + ":" + str(message.get("data")))
    return [str(reply), *events]


def _qmp_scenario(proc: subprocess.Popen[bytes], c: Client, work: Path) -> list[Any]:
    sock = str(work / "nbd.sock")
    unix = {"type": "unix", "data": {"path": sock}}
    return [
        _qmp(c, "blockdev-add", **{"node-name": "d0", "driver": "qcow2",
                                   "file": {"driver": "file", "filename": str(work / "d.qcow2")}}),
        _qmp(c, "blockdev-add", **{"node-name": "ro", "driver": "null-co", "read-only": True}),
        _qmp(c, "nbd-server-add", device="d0"),
        _qmp(c, "nbd-server-stop"),
        _qmp(c, "nbd-server-remove", name="x"),
        _qmp(c, "query-block-exports"),
        _qmp(c, "block-export-add", type="nbd", id="e1", **{"node-name": "d0"}),
        _qmp(c, "nbd-server-start", addr=unix, **{"tls-creds": "nope"}),
        _qmp(c, "nbd-server-start", addr={"type": "unix", "data": {"path": str(work / "no/s")}}),
        _qmp(c, "nbd-server-start", addr={"type": "fd", "data": {"str": "nope"}}),
        _qmp(c, "nbd-server-start",
             addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "nosuchservice"}}),
        _qmp(c, "nbd-server-start", addr=unix, **{"tls-authz": "nope"}),
        _qmp(c, "nbd-server-start", addr=unix),
        _qmp(c, "nbd-server-add", device="nope"),
        _qmp(c, "nbd-server-add", device="d0", bitmap="b"),
        _qmp(c, "nbd-server-add", device="d0", name="x" * 4097),
        _qmp(c, "nbd-server-add", device="ro", writable=True),
        _qmp(c, "block-export-add", type="nbd", id="e2", **{"node-name": "ro", "writable": True}),
        _qmp(c, "block-export-add", type="nbd", id="e,2", **{"node-name": "ro"}),
        _qmp(c, "block-export-add", type="nbd", id="e3", **{"node-name": "ro"}, iothread="io"),
        _qmp(c, "nbd-server-add", device="d0", writable=True),
        _qmp(c, "nbd-server-add", device="d0", name="d0"),
        _qmp(c, "block-export-add", type="nbd", id="e4", **{"node-name": "d0"}, name="d0"),
        _qmp(c, "block-export-add", type="nbd", id="e5", **{"node-name": "d0"}, name="other"),
        _qmp(c, "query-block-exports"),
        _qmp(c, "blockdev-del", **{"node-name": "d0"}),
        _qmp(c, "block-export-del", id="nope"),
        _qmp(c, "nbd-server-remove", name="e5", mode="hard"),
        _qmp(c, "block-export-del", id="ro"),
        _qmp(c, "nbd-server-remove", name="ro"),
        _qmp(c, "nbd-server-stop"),
        _qmp(c, "query-block-exports"),
        _qmp(c, "nbd-server-stop"),
        _qmp(c, "blockdev-del", **{"node-name": "d0"}),
    ]


def test_qmp_replies_and_events_as_qemu(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    theirs, ours = _both(tmp_path, _qmp_scenario)
    assert ours == theirs
    assert any(e.startswith("BLOCK_EXPORT_DELETED") for step in ours for e in step["events"])


def _io_scenario(proc: subprocess.Popen[bytes], c: Client, work: Path) -> list[Any]:
    image, sock = work / "d.qcow2", str(work / "nbd.sock")

    def url(name: str) -> str:
        return f"nbd+unix:///{name}?socket={sock}"

    steps: list[Any] = [
        _qmp(c, "blockdev-add", **{"node-name": "d0", "driver": "qcow2",
                                   "file": {"driver": "file", "filename": str(image)}}),
        _qmp(c, "nbd-server-start", addr={"type": "unix", "data": {"path": sock}}),
        locked(image),
        _qmp(c, "block-export-add", type="nbd", id="w", name="w", **{"node-name": "d0"}, writable=True,
             description="the disk"),
        _qmp(c, "nbd-server-add", device="d0", name="r"),
        # the export's permissions: consistent read + write, everything shared
        locked(image),
        _run("qemu-nbd", "--list", "-k", sock),
        _run("qemu-img", "info", url("w")),
        _run("qemu-io", "-f", "raw", url("w"), "-c", "write -P 0x5a 0 64k", "-c", "write -z 64k 64k",
             "-c", "discard 128k 64k", "-c", "flush", "-c", "write -P 0x11 1M 4k -f",
             "-c", "write -P 1 4M 1", "-c", "read -P 0x5a 0 64k"),
        _run("qemu-io", "-f", "raw", "-r", url("r"), "-c", "read -P 0x5a 0 64k", "-c", "read -P 0 64k 64k",
             "-c", "read -P 0x11 1M 4k", "-c", "write -P 1 0 4k", "-c", "read 4M 1"),
        _run("qemu-io", "-f", "raw", url("r"), "-c", "read 0 1"),
        _run("qemu-io", "-f", "raw", "-r", url("nosuch"), "-c", "read 0 1"),
        _run("qemu-img", "compare", "-f", "raw", url("r"), "-F", "raw", url("w")),
        _run("qemu-img", "convert", "-f", "raw", "-O", "raw", url("r"), str(work / "copy.raw")),
        _run("qemu-img", "compare", "-f", "raw", str(work / "copy.raw"), "-F", "raw", url("w")),
        # another process on the image: the node's own locks, as with QEMU
        _run("qemu-io", "-f", "qcow2", str(image), "-c", "read 0 1"),
        _qmp(c, "block-export-del", id="w"),
        locked(image),
        _quit(c),
    ]
    proc.wait(timeout=20)
    steps.append(Path(sock).exists())
    steps.append(_run("qemu-img", "check", str(image)))
    return steps


def test_io_through_the_export_as_qemu(tmp_path: Path, qemu_system: str, qemu_io: str) -> None:
    theirs, ours = _both(tmp_path, _io_scenario)
    # block status (holes and zeroes) is compared in detail by test_block_status.py
    assert ours == theirs
    assert "Images are identical." in ours[12] and "No errors were found" in ours[-1]


def _go(s: socket.socket, name: bytes, structured: bool) -> None:
    nbd_client.handshake(s)
    if structured:
        assert nbd_client.option(s, nbd.OPT_STRUCTURED_REPLY, b"")[-1][0] == nbd.REP_ACK
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    kinds = [kind for kind, _ in nbd_client.option(s, nbd.OPT_GO, payload)]
    assert kinds[-1] == nbd.REP_ACK and set(kinds[:-1]) <= {nbd.REP_INFO}, kinds


def _simple_error(s: socket.socket, flags: int, command: int, handle: int, offset: int, length: int,
                  data: bytes = b"") -> int:
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, command, handle, offset, length) + data)
    magic, error, got = struct.unpack(">IIQ", nbd_client.recv_exact(s, 16))
    assert (magic, got) == (nbd.SIMPLE_REPLY_MAGIC, handle)
    return int(error)


def test_hostile_clients(tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "1M"], check=True)
    with _process(False, tmp_path) as (_, c):
        c.cmd("blockdev-add", node_name="d0", driver="raw",
              file={"driver": "file", "filename": str(tmp_path / "d.raw")})
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        c.cmd("nbd-server-add", device="d0")
        # an unknown option with a 1 GiB payload announced: skipped unbuffered, answered
        s = nbd_client.connect(sock)
        nbd_client.recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, 9999, 1 << 30) + bytes(1 << 16))
        # ... the server keeps serving QMP meanwhile
        assert c.cmd("query-block-exports")[0]["id"] == "d0"
        s.close()
        # read-only export: writes EPERM, past the end EINVAL, unknown command EINVAL,
        # a read longer than NBD_MAX_BUFFER_SIZE EINVAL; the connection stays usable
        s = nbd_client.connect(sock)
        _go(s, b"d0", structured=False)
        assert _simple_error(s, 0, nbd.CMD_WRITE, 1, 0, 4, b"abcd") == 1
        assert _simple_error(s, 0, nbd.CMD_READ, 2, 1 << 20, 1) == 22
        assert _simple_error(s, 0, 42, 3, 0, 0) == 22
        assert _simple_error(s, 0, nbd.CMD_READ, 4, 0, nbd.MAX_BUFFER_SIZE + 1) == 22
        assert _simple_error(s, 0x8000, nbd.CMD_READ, 5, 0, 1) == 22
        assert _simple_error(s, 0, nbd.CMD_BLOCK_STATUS, 6, 0, 1) == 22
        assert _simple_error(s, 0, nbd.CMD_FLUSH, 7, 0, 0) == 0
        # a write longer than NBD_MAX_BUFFER_SIZE: disconnected, nothing buffered
        s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 8, 0, 1 << 31))
        assert s.recv(16) == b""
        # garbage instead of a request: disconnected
        s = nbd_client.connect(sock)
        _go(s, b"d0", structured=True)
        s.sendall(bytes(28))
        assert s.recv(16) == b""
        # a client that connects and says nothing does not block removing the export
        idle = nbd_client.connect(sock)
        c.cmd("nbd-server-remove", name="d0")
        idle.close()
        # a client that never reads its replies: QMP keeps answering
        c.cmd("nbd-server-add", device="d0")
        s = nbd_client.connect(sock)
        _go(s, b"d0", structured=True)
        s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 9, 0, 1 << 20) * 64)
        started = time.monotonic()
        assert c.cmd("query-block-exports")[0]["node-name"] == "d0"
        assert time.monotonic() - started < 5
        reply = c.execute("nbd-server-remove", {"name": "d0"})
        assert reply["error"]["desc"] == "export 'd0' still in use"
        c.cmd("nbd-server-remove", name="d0", mode="hard")
        s.close()
        c.cmd("nbd-server-stop")


@pytest.mark.parametrize("writable, expected", [
    (False, {"return": {}}),
    (True, {"error": {"class": "GenericError",
                      "desc": "Failed to inactivate node: Operation not permitted"}}),
])
def test_writable_export_keeps_its_node_active(tmp_path: Path, writable: bool, expected: Any) -> None:
    # blk_can_inactivate: an export that does not write lets the node go inactive
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "1M"], check=True)
    with _process(False, tmp_path) as (_, c):
        c.cmd("blockdev-add", node_name="d0", driver="qcow2",
              file={"driver": "file", "filename": str(tmp_path / "d.qcow2")})
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}})
        c.cmd("nbd-server-add", device="d0", writable=writable)
        assert c.execute("x-blockdev-inactivate", {"node-name": "d0"}) == expected


#: A server whose NBD request path has a bug (fault injection): reads raise a plain
#: Python error, as an unforeseen bug in a driver would.
_BUGGY_SERVER = [sys.executable, "-c", """
import sys
from qmp_server.nbd import service
def broken(export, request):
    raise RuntimeError("injected bug")
service._do_request = broken
from qmp_server.launcher import run
run()
""", "-machine", "none"]


def test_a_bug_in_a_request_fails_the_request_not_the_server(tmp_path: Path) -> None:
    sock = str(tmp_path / "nbd.sock")
    qmp = tmp_path / "qmp.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "1M"], check=True)
    with (tmp_path / "out").open("wb") as sink:
        proc = subprocess.Popen([*_BUGGY_SERVER, "-qmp", f"unix:{qmp},server=on,wait=off"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        c = Client(qmp)
        c.cmd("qmp_capabilities")
        c.cmd("blockdev-add", node_name="d0", driver="raw",
              file={"driver": "file", "filename": str(tmp_path / "d.raw")})
        c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        c.cmd("nbd-server-add", device="d0")
        s = nbd_client.connect(sock)
        _go(s, b"d0", structured=False)
        assert _simple_error(s, 0, nbd.CMD_READ, 1, 0, 512) == 5  # EIO
        assert _simple_error(s, 0, nbd.CMD_FLUSH, 2, 0, 0) == 5  # the connection still serves
        s.close()
        assert c.cmd("query-block-exports")[0]["id"] == "d0"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def _hmp(client: Client, line: str) -> list[Any]:
    """An HMP command's text and the events it caused."""
    text = client.hmp(line)
    events = [e["event"] + ":" + str(e.get("data")) for e in client.events]
    client.events.clear()
    return [line, text, events]


def _exports(client: Client) -> list[Any]:
    """query-block-exports, the generated node names (random in both) made equal."""
    return [re.sub(r"#block\d+", "#block", str(e)) for e in client.cmd("query-block-exports")]


def _hmp_scenario(proc: subprocess.Popen[bytes], c: Client, work: Path) -> list[Any]:
    # HMP's NBD commands (hmp_nbd_server_*): their texts, errors included, the exports
    # they make, and QEMU's tools reading and writing through them.
    image, sock = work / "d.qcow2", str(work / "nbd.sock")
    url = f"nbd+unix:///{{}}?socket={sock}"
    steps: list[Any] = [
        _hmp(c, f"drive_add 0 if=none,id=drive0,file={image}"),
        _hmp(c, "drive_add 0 if=none,id=empty0"),
        _hmp(c, f"drive_add 0 if=none,id=ro0,file={image},readonly=on,file.locking=off"),
        _hmp(c, "nbd_server_stop"),
        _hmp(c, "nbd_server_add drive0"),
        _hmp(c, "nbd_server_remove x"),
        _hmp(c, "nbd_server_start"),
        _hmp(c, "nbd_server_start -w unix:" + sock),
        _hmp(c, "nbd_server_start bogus"),
        _hmp(c, "nbd_server_start unix:"),
        _hmp(c, "nbd_server_start fd:nope"),
        _hmp(c, f"nbd_server_start unix:{work}/no/s"),
        _hmp(c, "nbd_server_start unix:" + sock),
        _hmp(c, "nbd_server_start unix:" + sock),
        _hmp(c, "nbd_server_add"),
        _hmp(c, "nbd_server_add nosuch"),
        _hmp(c, "nbd_server_add empty0"),
        _hmp(c, "nbd_server_add drive0 a b"),
        _hmp(c, "nbd_server_add -w drive0"),
        _hmp(c, "nbd_server_add drive0"),
        _hmp(c, "nbd_server_add -w ro0 second"),  # a read-only node: exported read-only
        _exports(c),
        _run("qemu-nbd", "--list", "-k", sock),
        _run("qemu-io", "-f", "raw", url.format("drive0"), "-c", "write -P 0x5a 0 64k"),
        _run("qemu-io", "-f", "raw", url.format("second"), "-c", "read 0 1"),  # read-only export
        _run("qemu-io", "-f", "raw", "-r", url.format("second"), "-c", "read -P 0x5a 0 64k"),
        _hmp(c, "nbd_server_remove"),
        _hmp(c, "nbd_server_remove nosuch"),
    ]
    # A connected client keeps an export unless -f forces it out.
    client = nbd_client.connect(sock)
    _go(client, b"second", structured=True)
    steps.append(_hmp(c, "nbd_server_remove second"))
    forced = c.hmp("nbd_server_remove -f second")
    client.close()
    # QEMU deletes the export once the client is gone (its event may come later).
    steps.append(["nbd_server_remove -f second", forced, c.wait_event("BLOCK_EXPORT_DELETED")["data"]])
    steps += [
        _hmp(c, "nbd_server_remove drive0"),
        _hmp(c, "nbd_server_stop"),
        _hmp(c, "nbd_server_stop"),
        # -a: every drive with a medium, named as the drive; -w makes them writable.
        _hmp(c, "nbd_server_start -a -w unix:" + sock),
        _exports(c),
        _run("qemu-nbd", "--list", "-k", sock),
        _hmp(c, "nbd_server_stop"),
        _hmp(c, "nbd_server_start -a unix:" + sock),
        _run("qemu-nbd", "--list", "-k", sock),
        _hmp(c, "nbd_server_stop"),
        *[_hmp(c, f"help {name}") for name in ("nbd_server_start", "nbd_server_add",
                                                "nbd_server_remove", "nbd_server_stop")],
        _quit(c),
    ]
    proc.wait(timeout=20)
    steps.append(_run("qemu-img", "check", str(image)))
    return steps


def test_hmp_nbd_commands_as_qemu(tmp_path: Path, qemu_system: str, qemu_io: str) -> None:
    theirs, ours = _both(tmp_path, _hmp_scenario)
    assert ours == theirs
    flat = str(ours)
    assert "wrote 65536/65536 bytes at offset 0" in flat and "read 65536/65536 bytes" in flat
    assert "Error: export 'second' still in use" in flat
