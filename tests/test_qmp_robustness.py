"""The server under abuse: junk input, clients that vanish mid-command, many clients at once.

Everything is observed from the outside: what each client reads, and the state other
clients (and qemu-img) see afterwards.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_support import SERVER, Client, running

# --------------------------------------------------------------------------------------
# Arbitrary bytes never crash a session or the server


@pytest.fixture(scope="module")
def junk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    sock = tmp_path_factory.mktemp("junk") / "junk.sock"
    proc = subprocess.Popen([*SERVER, "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        Client(sock).close()
        yield sock
        assert proc.poll() is None, "the server died"
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    # An internal error is survived (the session or command fails, the server goes on),
    # but it is still a bug: the server logs a traceback for it.
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")


JSONISH = [b"{", b"}", b"[", b"]", b'"', b"'", b":", b",", b"\\", b"\\u00", b"\\ud83d", b" ", b"\n",
           b"execute", b"arguments", b"id", b"exec-oob", b"query-name", b"qmp_capabilities", b"1", b"-",
           b"1.5e", b"true", b"nul", b"\xff", b"\xfe", b"\xc3", b"\xa9", b"\xe2\x82\xac", b"\xf0\x9f",
           b"\x00", b"\x01", b"\x7f", b"\t", b"%", b"%p"]

junk = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.sampled_from(JSONISH), max_size=80).map(b"".join),
    st.lists(st.one_of(st.sampled_from(JSONISH), st.binary(max_size=8)), max_size=60).map(b"".join),
)


def _read_until_probe(client: Client, probe_id: bytes) -> list[bytes]:
    lines = []
    while True:
        line = client.read_line()
        lines.append(line)
        if b'"id": "' + probe_id + b'"' in line:
            return lines


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=junk, negotiate=st.booleans(), chunked=st.booleans())
def test_arbitrary_bytes_then_control_character_recovers(junk_server: Path, data: bytes, negotiate: bool,
                                                         chunked: bool) -> None:
    client = Client(junk_server)
    try:
        if negotiate:
            client.send_raw(b'{"execute": "qmp_capabilities"}')
            assert client.read_line() == b'{"return": {}}\r\n'
        if chunked:
            for start in range(0, len(data), 7):
                client.send_raw(data[start:start + 7])
        else:
            client.send_raw(data)
        # An ASCII control character puts QEMU's JSON parser back into a known state.
        client.send_raw(b'\x01{"execute": "query-name", "id": "probe"}')
        lines = _read_until_probe(client, b"probe")
        for line in lines:
            assert line.endswith(b"\r\n") and line.count(b"\n") == 1
            message = json.loads(line)  # one whole JSON object per line, ASCII only
            line.decode("ascii")
            assert isinstance(message, dict) and ("error" in message or "return" in message)
            if "error" in message:
                assert set(message["error"]) == {"class", "desc"}
        if negotiate:
            assert lines[-1] == b'{"return": {}, "id": "probe"}\r\n'
        else:
            assert lines[-1] == (b'{"id": "probe", "error": {"class": "CommandNotFound", "desc": '
                                 b"\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n")
    finally:
        client.close()


def test_limits_are_errors_not_crashes(junk_server: Path) -> None:
    client = Client(junk_server)
    try:
        client.send_raw(b'{"execute": "qmp_capabilities"}')
        assert client.read_line() == b'{"return": {}}\r\n'
        # nesting deeper than QEMU's 1024
        client.send_raw(b"[" * 1100 + b"\x01" + b'{"execute": "query-name", "id": "after-depth"}')
        lines = _read_until_probe(client, b"after-depth")
        assert b"JSON nesting depth limit exceeded" in lines[0]
        assert lines[-1] == b'{"return": {}, "id": "after-depth"}\r\n'
        # arguments nested as deep as QEMU allows are validated, not a crash
        deep = b"[" * 1000 + b"]" * 1000
        client.send_raw(b'{"execute": "query-name", "arguments": {"x": ' + deep + b'}, "id": "deep-args"}')
        assert client.read_line() == (b'{"id": "deep-args", "error": {"class": "GenericError", '
                                      b"\"desc\": \"Parameter 'x' is unexpected\"}}\r\n")
        client.send_raw(b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", '
                        b'"node-name": "deep", "x": ' + deep + b'}, "id": "deep-union"}')
        reply = json.loads(client.read_line())
        assert reply["id"] == "deep-union" and reply["error"]["class"] == "GenericError"
    finally:
        client.close()


# --------------------------------------------------------------------------------------
# A client that disconnects mid-command

def _nodes(client: Client) -> list[str]:
    """User-named nodes (implicit children are named "#blockNNN")."""
    return sorted(node["node-name"] for node in client.cmd("query-named-block-nodes", flat=True)
                  if not node["node-name"].startswith("#"))


@pytest.mark.parametrize("oob", [False, True], ids=["in-band", "oob-enabled"])
def test_disconnect_mid_command(tmp_path: Path, qemu_img: str, qemu_io: str, oob: bool) -> None:
    """A client pipelines commands (the first, ``stop``, flushes 16 MiB) and hangs up at once.

    Without OOB the server runs what it has read, as QEMU does; with OOB enabled in-band
    commands wait in a queue, and what had not started when the client went is dropped,
    as QEMU drops a closed monitor's queue. Either way each command ran whole or not at
    all, in order, and the other session saw exactly that.
    """
    images = []
    for index in range(3):
        image = tmp_path / f"d{index}.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
        images.append(image)

    def add(node: str, image: Path) -> dict[str, Any]:
        return {"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": str(image)}}}

    with running([], tmp_path) as (proc, watcher):
        # dirty data for `stop` to drain and flush
        assert watcher.cmd("blockdev-add", **add("base", images[0])["arguments"]) == {}
        out = watcher.qemu_io('base "write -P 0x5a 0 16M"')
        assert "wrote 16777216/16777216 bytes" in out
        # The leaver pipelines its commands and hangs up without reading a reply.
        plan: list[dict[str, Any]] = [
            {"execute": "stop"}, add("n1", images[1]), {"execute": "cont"}, add("n2", images[2]),
        ]
        leaver = Client(tmp_path / "vm.sock")
        negotiate = {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"] if oob else []}}
        leaver.send_raw(json.dumps(negotiate).encode() + b"".join(json.dumps(c).encode() for c in plan))
        leaver.close()

        # The watcher's session goes on undisturbed while the server winds the leaver down.
        snapshots = []
        for _ in range(200):
            status = watcher.cmd("query-status")
            snapshots.append((tuple(_nodes(watcher)), status["status"]))
            if len(snapshots) >= 10 and len(set(snapshots[-10:])) == 1:
                break
            time.sleep(0.02)
        nodes, status = snapshots[-1]
        events = [event["event"] for event in watcher.events]

        # Whatever ran is a prefix of the plan, run completely and in order; the rest, if
        # anything, was dropped unstarted.
        def effect(done: int) -> tuple[list[str], str, list[str]]:
            ran = plan[:done]
            executed = [c["execute"] for c in ran]
            added = [c["arguments"]["node-name"] for c in ran if c["execute"] == "blockdev-add"]
            names = sorted(["base", *added])
            expected_events = [event for command, event in (("stop", "STOP"), ("cont", "RESUME"))
                               if command in executed]
            state = "paused" if "stop" in executed and "cont" not in executed else "running"
            return names, state, expected_events

        observed = (list(nodes), status, events)
        assert observed in [effect(done) for done in range(len(plan) + 1)]
        assert proc.poll() is None

        # Every node the leaver created is whole: it reads back and can be deleted; and
        # the flush on `stop` put the watcher's data on disk.
        for node in nodes:
            if node in ("n1", "n2"):
                assert "read 4096/4096 bytes" in watcher.qemu_io(f'{node} "read -P 0 0 4k"')
                assert watcher.cmd("blockdev-del", node_name=node) == {}
        assert "read 65536/65536 bytes" in watcher.qemu_io('base "read -P 0x5a 16711680 64k"')
        assert watcher.cmd("blockdev-del", node_name="base") == {}
        # no lock or half-open node was left behind: every image can be added again
        for index, image in enumerate(images):
            assert watcher.cmd("blockdev-add", **add(f"again{index}", image)["arguments"]) == {}
            assert watcher.cmd("blockdev-del", node_name=f"again{index}") == {}
        assert watcher.cmd("query-named-block-nodes") == []
        for image in images:
            check = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True)
            assert check.returncode == 0, check.stdout + check.stderr
    written = subprocess.run([qemu_io, "-c", "read -P 0x5a 0 16M", str(images[0])],
                             capture_output=True, text=True)
    assert "read 16777216/16777216 bytes" in written.stdout, written.stdout + written.stderr


@pytest.mark.parametrize("oob", [False, True], ids=["in-band", "oob-enabled"])
def test_quit_from_a_client_that_hangs_up_at_once(tmp_path: Path, oob: bool) -> None:
    """``quit`` either did not run, or it ran whole: SHUTDOWN, then the server exits."""
    with running([], tmp_path) as (proc, watcher):
        leaver = Client(tmp_path / "vm.sock")
        negotiate = {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"] if oob else []}}
        leaver.send_raw(json.dumps(negotiate).encode() + b'{"execute": "quit"}')
        leaver.close()
        try:
            status = watcher.cmd("query-status")
        except (EOFError, ConnectionError):
            status = None  # already gone: then it must have said why, before closing
            with contextlib.suppress(EOFError, ConnectionError):
                while True:  # a send refused (EPIPE) leaves what was sent before unread
                    message = watcher.read(timeout=5)
                    if "event" in message:
                        watcher.events.append(message)
        shut = [e for e in watcher.events if e["event"] == "SHUTDOWN"]
        if status is not None and not shut:
            # not run (yet): the server must still be whole and serving
            assert status == {"status": "running", "running": True}
            try:
                event = watcher.read(timeout=2)
            except TimeoutError:
                assert proc.poll() is None
                return
            shut = [event]
        assert [e["data"] for e in shut] == [{"guest": False, "reason": "host-qmp-quit"}]
        assert proc.wait(timeout=20) == 0


# --------------------------------------------------------------------------------------
# 50 clients at once while events fire

CLIENTS = 50
ROUNDS = 10     # bursts per client
BURST = 4       # commands pipelined per burst (the in-band queue holds 8)
TOGGLES = 15    # stop/cont pairs


class LineStream:
    """A Trio QMP connection that keeps every line it read."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.lines: list[bytes] = []

    async def read_line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                self.lines.append(line)
                return line
            data = await self.stream.receive_some(65536)
            assert data, "server closed the connection"
            self.buffer += data

    async def until_reply(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The next reply, and the events read before it."""
        events = []
        while True:
            message = json.loads(await self.read_line())
            if "event" in message:
                events.append(message)
            else:
                return message, events


COMMANDS: list[tuple[dict[str, Any], Any]] = [
    ({"execute": "query-name"}, {"return": {}}),
    ({"execute": "no-such"}, {"error": {"class": "CommandNotFound",
                                        "desc": "The command no-such has not been found"}}),
    ({"execute": "query-status"}, None),  # running or paused, whichever it is at that moment
    ({"execute": "human-monitor-command", "arguments": {"command-line": "info name"}}, {"return": ""}),
    ({"execute": "query-name", "arguments": {"bad": 1}},
     {"error": {"class": "GenericError", "desc": "Parameter 'bad' is unexpected"}}),
]


async def test_fifty_clients_while_events_fire(tmp_path: Path) -> None:
    with running([], tmp_path, negotiate=False) as (proc, _):
        path = str(tmp_path / "vm.sock")
        conns: list[LineStream] = []
        for _ in range(CLIENTS + 1):
            conn = LineStream(await trio.open_unix_socket(path))
            assert b'"QMP"' in await conn.read_line()
            await conn.stream.send_all(b'{"execute": "qmp_capabilities"}')
            assert await conn.read_line() == b'{"return": {}}\r\n'
            conns.append(conn)
        toggler, clients = conns[0], conns[1:]
        toggled = trio.Event()
        seen_events: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(conns))}
        problems: list[str] = []

        async def toggle() -> None:
            for round_ in range(TOGGLES):
                for command in ("stop", "cont"):
                    request = {"execute": command, "id": [command, round_]}
                    await toggler.stream.send_all(json.dumps(request).encode())
                    reply, events = await toggler.until_reply()
                    seen_events[0].extend(events)
                    if reply != {"return": {}, "id": [command, round_]}:
                        problems.append(f"toggler: {reply}")
                await trio.sleep(0.005)
            toggled.set()

        async def work(index: int, conn: LineStream) -> None:
            for round_ in range(ROUNDS):
                sent = []
                for slot in range(BURST):
                    command, expected = COMMANDS[(index + round_ + slot) % len(COMMANDS)]
                    request_id = {"client": index, "seq": round_ * BURST + slot}
                    sent.append((request_id, expected))
                    await conn.stream.send_all(json.dumps({**command, "id": request_id}).encode())
                for request_id, expected in sent:
                    reply, events = await conn.until_reply()
                    seen_events[index].extend(events)
                    if reply.get("id") != request_id:
                        problems.append(f"client {index}: expected id {request_id}, got {reply}")
                        return
                    del reply["id"]
                    if expected is None:
                        status = reply.get("return", {})
                        if status not in ({"status": "running", "running": True},
                                          {"status": "paused", "running": False}):
                            problems.append(f"client {index}: bad query-status reply {reply}")
                    elif reply != expected:
                        problems.append(f"client {index}: {reply} instead of {expected}")
            await toggled.wait()
            # Every event was queued before this request arrived, so it precedes the reply.
            await conn.stream.send_all(b'{"execute": "query-name", "id": "final"}')
            reply, events = await conn.until_reply()
            seen_events[index].extend(events)
            if reply != {"return": {}, "id": "final"}:
                problems.append(f"client {index}: final reply {reply}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(toggle)
            for index, conn in enumerate(clients, start=1):
                nursery.start_soon(work, index, conn)

        assert problems == [], problems[:5]
        reference = seen_events[0]
        assert [event["event"] for event in reference] == ["STOP", "RESUME"] * TOGGLES
        for index in range(1, len(conns)):
            # the very same messages (timestamps included), each once, in order
            assert seen_events[index] == reference, f"client {index}"
        for conn in conns:
            for line in conn.lines:
                assert line.endswith(b"\r\n") and line.count(b"\n") == 1
                assert isinstance(json.loads(line), dict)
            await conn.stream.aclose()
        assert proc.poll() is None
