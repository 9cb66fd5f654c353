"""The fast path for plain queries answers exactly what the general request path answers.

The session's shortcut (:mod:`qmp_server.protocol.fastpath`) is compared byte for byte
with the general path (QEMU-exact parser,
member checks, schema validation, dispatch, encoding) on generated requests: the strict
shapes it takes must get the same bytes, and everything else must be left to the general
path. The wire tests check that it never answers out of order.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import SERVER, Client, running

from qmp_server.app import command_tables
from qmp_server.dispatcher import CommandContext, Dispatcher
from qmp_server.machine import Machine, MachineConfig
from qmp_server.protocol.session import QMPSession
from qmp_server.schema import Schema
from qmp_server.server import Connection

SCHEMA = Schema.load()
CONFIGS = {
    "running": MachineConfig(name="vm"),
    "prelaunch": MachineConfig(start_paused=True),
    "inmigrate": MachineConfig(name="\u00e9\u20ac", incoming="defer"),
}


@dataclass
class Setup:
    machine: Machine
    dispatcher: Dispatcher

    def fast_path(self, data: bytes) -> bytes | None:
        """What a negotiated session with the fast path answers by itself for ``data``."""
        session = negotiated(QMPSession(self.dispatcher.plain_queries()))
        requests = session.receive(data)
        reply = session.data_to_send()
        assert not (requests and reply), data
        return reply or None


def setup(state: str) -> Setup:
    machine = Machine(CONFIGS[state], SCHEMA)
    return Setup(machine, Dispatcher(machine, command_tables()))


def negotiated(session: QMPSession) -> QMPSession:
    """``session`` after ``qmp_capabilities``, its greeting taken."""
    session.negotiate([])
    assert session.data_to_send().startswith(b'{"QMP": ')
    return session


SETUPS = {state: setup(state) for state in CONFIGS}
PLAIN = sorted(SETUPS["running"].dispatcher.queries)


def general_path(s: Setup, data: bytes) -> bytes:
    """What the general path writes for ``data`` on a negotiated connection (one request)."""
    session = negotiated(QMPSession())
    requests = session.receive(data)
    assert len(requests) == 1, data
    assert session.between_messages()
    request = requests[0]

    async def run() -> bytes:
        assert session.runs_at_once(request)
        if session.begin(request):
            result, error, _ = await s.dispatcher.dispatch(session, request)
            session.reply(request, result, error)
        return session.data_to_send()

    return trio.run(run)


def test_plain_queries() -> None:
    # The fast path serves what polling tools ask for; none of these takes arguments.
    assert {"query-status", "query-name", "query-version", "query-commands",
            "query-migrate"} <= set(PLAIN)
    for name in PLAIN:
        assert not SCHEMA.commands[name].arguments.get("properties"), name


# How clients write requests: qemu.qmp, libvirt (compact, id last), hand-written.
CLIENT_SHAPES = [
    b'{"execute": "query-status", "id": "__qmp#00001"}',
    b'{"execute":"query-status","id":"libvirt-12"}\r\n',
    b'{"execute": "query-status"}\n',
    b'{"id": 7, "execute": "query-name"}\n',
    b' \t{ "execute" : "query-version" , "id" : -42 }\r\n\n',
    b'{"execute": "query-migrate", "id": null}',
    b'{"execute": "query-commands", "id": true}',
    b'{"execute": "query-status", "id": ""}',
    b'{"execute": "query-status", "id": "a/b <c> \'d\' {e} [f]"}',
    b'{"execute": "query-status", "id": 999999999999999999}',
]


@pytest.mark.parametrize("state", sorted(SETUPS))
@pytest.mark.parametrize("data", CLIENT_SHAPES)
def test_client_shapes_take_the_fast_path(state: str, data: bytes) -> None:
    s = SETUPS[state]
    fast = s.fast_path(data)
    assert fast is not None
    assert fast == general_path(s, data)


# Requests the fast path must leave alone (the general path answers them, often with an error).
GENERAL_ONLY = [
    b"{'execute': 'query-status'}",                              # single quotes
    b'{"execute": "query-status", "arguments": {}}',            # arguments, even empty
    b'{"execute": "query-status", "id": 1.5}',                  # float id (QEMU: %.17g)
    b'{"execute": "query-status", "id": 1e3}',
    b'{"execute": "query-status", "id": 0123}',                 # not JSON
    b'{"execute": "query-status", "id": -0}',
    b'{"execute": "query-status", "id": 1234567890123456789}',  # 19 digits
    b'{"execute": "query-status", "id": "\\u0041"}',            # escapes
    b'{"execute": "query-status", "id": "\xc3\xa9"}',           # non-ASCII
    b'{"execute": "query-status", "id": {"b": 1, "a": 2}}',     # QEMU reorders
    b'{"execute": "query-status", "id": 1, "id": 2}',           # duplicate key
    b'{"execute": "query-status", "extra": 1}',
    b'{"execute": "stop"}',                                     # has side effects
    b'{"execute": "query-named-block-nodes"}',                  # takes arguments
    b'{"execute": "no-such-command"}',
    b'{"execute": "query-status"}{"execute": "query-status"}',  # two requests
    b'{"execute": "query-status"',                              # incomplete
    b'{"execute": "query-status"}\x01',
    b'{"execute": "query-status"}\x0b',
]


@pytest.mark.parametrize("data", GENERAL_ONLY)
def test_everything_else_takes_the_general_path(data: bytes) -> None:
    assert SETUPS["running"].fast_path(data) is None


WS = st.text(alphabet=" \t\r\n", max_size=3)
PRINTABLE_ID = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Request bytes, and whether they have the strict shape the fast path takes."""
    strict = True
    name = draw(st.sampled_from([*PLAIN, "stop", "cont", "query-block", "no-such", "qmp_capabilities",
                                 "Query-Status", "query-named-block-nodes"]))
    if name not in PLAIN:
        strict = False
    members: list[tuple[str, str]] = [("execute", json.dumps(name))]
    id_kind = draw(st.sampled_from(["none", "string", "int", "const", "float", "object", "unicode"]))
    if id_kind != "none":
        if id_kind == "string":
            text = draw(PRINTABLE_ID)
            value = json.dumps(text)
            strict = strict and '"' not in text and "\\" not in text
        elif id_kind == "int":
            number = draw(st.integers(min_value=-(10**20), max_value=10**20))
            value = str(number)
            strict = strict and len(str(abs(number))) <= 18
        elif id_kind == "const":
            value = draw(st.sampled_from(["true", "false", "null"]))
        elif id_kind == "float":
            value = json.dumps(draw(st.floats(allow_nan=False, allow_infinity=False)))
            strict = False
        elif id_kind == "object":
            value = json.dumps(draw(st.dictionaries(st.text(max_size=3), st.integers(), max_size=3)))
            strict = False
        else:
            text = draw(st.text(max_size=6))
            value = json.dumps(text, ensure_ascii=draw(st.booleans()))
            strict = strict and all(" " <= c <= "~" and c not in '"\\' for c in text) and "\\" not in value
        members.append(("id", value))
    if draw(st.booleans()):
        members.append(("arguments", "{}"))
        strict = False
    if draw(st.booleans()):
        members.reverse()
    body = (draw(WS) + "," + draw(WS)).join(f'"{key}"{draw(WS)}:{draw(WS)}{value}' for key, value in members)
    text = draw(WS) + "{" + draw(WS) + body + draw(WS) + "}" + draw(WS)
    return text.encode("utf-8"), strict


@settings(max_examples=300, deadline=None)
@given(request=requests(), state=st.sampled_from(sorted(SETUPS)))
def test_fast_path_equals_general_path(request: tuple[bytes, bool], state: str) -> None:
    data, strict = request
    s = SETUPS[state]
    fast = s.fast_path(data)
    assert (fast is not None) == strict, data
    if fast is not None:
        assert fast == general_path(s, data)


# --------------------------------------------------------------------------------------
# On the wire

RUNNING = {"status": "running", "running": True}


def test_plain_query_waits_for_queued_in_band_commands(tmp_path: Path) -> None:
    """With OOB on, a plain query sent while an in-band command runs is answered after it."""
    with running(["-blockdev", "driver=null-co,node-name=disk"], tmp_path, negotiate=False) as (_, qmp):
        qmp.send_raw(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
        assert qmp.reply() == {"return": {}}
        qmp.send_raw(json.dumps({"execute": "human-monitor-command", "id": "slow", "arguments": {
            "command-line": 'qemu-io disk "sleep 500"'}}))
        time.sleep(0.1)  # the query arrives in a read of its own, while the sleep runs
        qmp.send_raw(b'{"execute": "query-status", "id": "fast"}')
        assert [qmp.reply()["id"], qmp.reply()["id"]] == ["slow", "fast"]
        assert qmp.execute("query-status", id=1) == {"return": RUNNING, "id": 1}


@pytest.mark.qemu
def test_fast_path_replies_match_live_qemu(qemu_system: str, tmp_path: Path) -> None:
    """The client shapes answered by QEMU 7.2 and by us, byte for byte (7.2 adds singlestep)."""
    shapes = [data for data in CLIENT_SHAPES if b"query-status" in data or b"query-name" in data]
    with running([], tmp_path, "ours") as (_, ours), \
            running([], tmp_path, "qemu", qemu=True) as (_, qemu):
        for data in shapes:
            ours.send_raw(data)
            qemu.send_raw(data)
            theirs = qemu.read_line().replace(b'"singlestep": false, ', b"")
            assert ours.read_line() == theirs, data


def test_plain_query_inside_pending_input_is_not_answered(tmp_path: Path) -> None:
    """A read that looks like a query but continues earlier input is parsed with it."""
    with running([], tmp_path) as (_, qmp):
        qmp.send_raw(b"[")
        time.sleep(0.1)  # two reads
        qmp.send_raw(b'{"execute": "query-status", "id": 1}')
        time.sleep(0.1)
        qmp.send_raw(b"]")
        assert qmp.reply() == {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        assert qmp.execute("query-status", id=2) == {"return": RUNNING, "id": 2}


def test_plain_queries_before_negotiation_are_refused(tmp_path: Path) -> None:
    with running([], tmp_path, negotiate=False) as (_, qmp):
        assert qmp.execute("query-status", id=1) == {"id": 1, "error": {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}


# --------------------------------------------------------------------------------------
# Polling a client's socket after answering it (-poll-max-ns)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("poll", [None, "0", "1000000"])
def test_requests_and_events_with_any_polling(tmp_path: Path, poll: str | None) -> None:
    args = [] if poll is None else ["-poll-max-ns", poll]
    with running(args, tmp_path) as (_, qmp):
        for number in range(50):
            assert qmp.execute("query-status", id=number) == {"return": RUNNING, "id": number}
            assert qmp.execute("query-status", {}, id=number) == {"return": RUNNING, "id": number}
        other = Client(tmp_path / "vm.sock")
        other.execute("qmp_capabilities")
        assert other.execute("stop") == {"return": {}}
        assert qmp.wait_event("STOP")["event"] == "STOP"
        assert qmp.cmd("query-status") == {"status": "paused", "running": False}
        other.close()


def test_idle_clients_cost_no_cpu(tmp_path: Path) -> None:
    """Polling stops when clients go quiet: connected idle clients leave the server idle."""
    with running([], tmp_path) as (proc, qmp):
        clients = [Client(tmp_path / "vm.sock") for _ in range(8)]
        for client in clients:
            client.execute("qmp_capabilities")
            for _ in range(20):
                client.execute("query-status")
        for _ in range(200):
            qmp.execute("query-status")
        before = cpu_seconds(proc.pid)
        time.sleep(1.0)
        assert cpu_seconds(proc.pid) - before < 0.1
        for client in clients:
            client.close()


@pytest.mark.parametrize("value", ["x", "-1", "1e3", "1000000001", "", "\u00b2", "\u0661\u0662"])
def test_poll_max_ns_must_be_nanoseconds(tmp_path: Path, value: str) -> None:
    result = subprocess.run([*SERVER, "-poll-max-ns", value], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"qmp-server: -poll-max-ns {value}: expected nanoseconds from 0 to 1000000000\n"
    assert not (tmp_path / "qmp.sock").exists()


def test_a_failing_plain_query_fails_like_any_command() -> None:
    """The reply is the general path's internal error, and the connection goes on."""
    machine = Machine(MachineConfig(), SCHEMA)
    dispatcher = Dispatcher(machine, command_tables())

    def broken(machine: Machine) -> Any:
        raise RuntimeError("broken")

    async def broken_handler(ctx: CommandContext, args: dict[str, Any]) -> Any:
        return broken(ctx.machine)

    dispatcher.queries["query-name"] = broken
    dispatcher.handlers["query-name"] = broken_handler

    async def main() -> list[bytes]:
        ours, theirs = trio.socket.socketpair()
        client = trio.SocketStream(theirs)
        buffer = bytearray()

        async def line() -> bytes:
            while b"\n" not in buffer:
                buffer.extend(await client.receive_some())
            end = buffer.index(b"\n") + 1
            text = bytes(buffer[:end])
            del buffer[:end]
            return text

        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(machine, dispatcher, trio.SocketStream(ours)).run)
            await line()  # greeting
            replies = []
            for request in (b'{"execute": "qmp_capabilities"}', b'{"execute": "query-name", "id": 1}',
                            b'{"execute": "query-status", "id": 2}'):
                await client.send_all(request)
                replies.append(await line())
            await client.aclose()
        return replies

    assert trio.run(main) == [
        b'{"return": {}}\r\n',
        b'{"id": 1, "error": {"class": "GenericError", "desc": "Internal error: RuntimeError"}}\r\n',
        b'{"return": {"status": "prelaunch", "running": false}, "id": 2}\r\n',
    ]
