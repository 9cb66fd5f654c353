"""The protocol package without a socket: bytes in, bytes out.

A :class:`QMPSession` is fed what a client would send and asked for what the server
would write; a tiny runner stands in for the dispatcher (``qmp_capabilities`` and
``query-status`` only). The expected bytes are QEMU's (live comparisons at the end).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from server_support import running

from qmp_server import QEMU_VERSION, __version__
from qmp_server.errors import CommandNotFound, QMPError
from qmp_server.protocol.qdict import key_bytes, qdict_order, qemu_ordered
from qmp_server.protocol.requests import Request
from qmp_server.protocol.session import INBAND_QUEUE_MAX, Mode, QMPSession

STATUS = {"status": "running", "running": True}
STATUS_LINE = b'{"status": "running", "running": true}'
HINT = (b'"error": {"class": "CommandNotFound", '
        b'"desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}')


def run(session: QMPSession, request: Request) -> None:
    """Execute ``request`` as the server does, with a two-command dispatcher."""
    if not session.begin(request):
        return
    if request.command == "qmp_capabilities":
        try:
            session.negotiate(request.arguments.get("enable", []))
        except QMPError as err:
            session.reply(request, error=err)
            return
        session.reply(request)
    elif request.command == "query-status":
        session.reply(request, STATUS)
    else:
        session.reply(request, error=CommandNotFound(f"The command {request.command} has not been found"))


def exchange(session: QMPSession, data: bytes) -> bytes:
    """Feed ``data``, run every request it completes at once; what the session writes."""
    out = session.data_to_send()
    for request in session.receive(data):
        assert session.runs_at_once(request) or session.oob_enabled
        run(session, request)
    return out + session.data_to_send()


def negotiated(session: QMPSession, enable: str = "") -> QMPSession:
    arguments = f', "arguments": {{"enable": ["{enable}"]}}' if enable else ""
    reply = exchange(session, b'{"execute": "qmp_capabilities"%s}' % arguments.encode())
    assert reply.endswith(b'{"return": {}}\r\n')
    return session


def test_the_greeting_is_the_first_output() -> None:
    major, minor, micro = QEMU_VERSION
    assert QMPSession().data_to_send() == (
        b'{"QMP": {"version": {"qemu": {"micro": %d, "minor": %d, "major": %d}, '
        b'"package": "qmp-server %s"}, "capabilities": ["oob"]}}\r\n'
        % (micro, minor, major, __version__.encode()))


def test_negotiation() -> None:
    session = QMPSession()
    session.data_to_send()
    event = {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}
    assert not session.event(event)
    assert session.data_to_send() == b""
    assert exchange(session, b'{"execute": "query-status", "id": 1}') == b'{"id": 1, ' + HINT + b"}\r\n"
    assert exchange(session, b'{"execute": "no-such"}') == b"{" + HINT + b"}\r\n"
    # Errors that are not CommandNotFound keep their text.
    assert exchange(session, b'{"id": 2}') == (
        b'{"id": 2, "error": {"class": "GenericError", "desc": "QMP input lacks member \'execute\'"}}\r\n')
    reply = exchange(session, b'{"execute": "qmp_capabilities", "id": "c"}')
    assert reply == b'{"return": {}, "id": "c"}\r\n'
    assert session.mode is Mode.COMMAND and not session.oob_enabled
    assert session.event(event)
    assert session.data_to_send() == b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
    assert exchange(session, b'{"execute": "qmp_capabilities", "id": 3}') == (
        b'{"id": 3, "error": {"class": "CommandNotFound", '
        b'"desc": "Capabilities negotiation is already complete, command ignored"}}\r\n')
    assert exchange(session, b'{"execute": "query-status"}') == b'{"return": ' + STATUS_LINE + b"}\r\n"


def test_negotiation_is_judged_when_a_command_runs() -> None:
    """A command read with the qmp_capabilities before it runs after it (QEMU: dispatch time)."""
    session = QMPSession()
    session.data_to_send()
    assert exchange(session, b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}') == (
        b'{"return": {}}\r\n{"return": ' + STATUS_LINE + b', "id": 1}\r\n')


# Read in one chunk: QEMU checks each request when it runs (without OOB it reads nothing
# more while a command runs), so the two after qmp_capabilities see OOB enabled (QEMU 7.2
# live, test_checks_follow_negotiation_as_in_qemu below).
CAPS_THEN_OOB = (b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'
                 b'{"execute": "query-name", "exec-oob": "query-name", "id": 1}'
                 b'{"exec-oob": "query-name", "id": 2}')
CAPS_THEN_OOB_REPLIES = [
    b'{"return": {}}\r\n',
    b'{"id": 1, "error": {"class": "GenericError", '
    b'"desc": "QMP input member \'execute\' clashes with \'exec-oob\'"}}\r\n',
    b'{"id": 2, "error": {"class": "GenericError", '
    b'"desc": "The command query-name does not support OOB"}}\r\n',
]


def test_checks_follow_negotiation() -> None:
    session = QMPSession()
    session.data_to_send()
    caps, clash, oob = session.receive(CAPS_THEN_OOB)
    assert session.runs_at_once(caps)
    run(session, caps)
    assert not session.runs_at_once(clash)  # in-band, OOB on: the worker runs it
    run(session, clash)
    assert session.data_to_send() == b"".join(CAPS_THEN_OOB_REPLIES[:2])
    # The last one passes the session's checks; the dispatcher refuses it (not OOB-capable).
    assert session.runs_at_once(oob) and session.begin(oob)
    assert (oob.command, oob.oob) == ("query-name", True)


def test_input_errors_and_recovery() -> None:
    session = negotiated(QMPSession())
    assert exchange(session, b"}") == (
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n')
    assert exchange(session, b'{"execute": ') == b""
    assert not session.between_messages()
    assert exchange(session, b'"query-status", "id": [0.1, 1e400]}') == (
        b'{"return": ' + STATUS_LINE + b', "id": [0.10000000000000001, inf]}\r\n')
    assert session.between_messages()
    assert exchange(session, b'{"execute": "query-status", "id": {"b": 1, "a": 2}}') == (
        b'{"return": ' + STATUS_LINE + b', "id": {"a": 2, "b": 1}}\r\n')


# QEMU holds U+0000 as C0 80 and hashes those bytes: "e" comes before it (QEMU 7.2 live,
# test_nul_keys_are_ordered_as_qemu_does below).
NUL_CASES = [
    (b'{"execute": "query-status", "\\u0000": 1, "e": 2}',
     b'{"error": {"class": "GenericError", "desc": "QMP input member \'e\' is unexpected"}}\r\n'),
    (b'{"execute": "query-status", "id": {"\\u0000": 1, "e": 2}}',
     b'{"return": ' + STATUS_LINE + b', "id": {"e": 2, "\\u0000": 1}}\r\n'),
    (b'{"execute": "query-status", "id": {"\xc0\x80": 1, "e": 2}}',
     b'{"return": ' + STATUS_LINE + b', "id": {"e": 2, "\\u0000": 1}}\r\n'),
]


# The same bytes decide which unexpected argument QEMU's input visitor names first (its
# GHashTable, hashed with g_str_hash; see qmp_server.schema_validate), QEMU 7.2 live.
ARGUMENT_NUL_CASES = [
    (b'{"execute": "query-status", "arguments": {"\\u0000": 1, "%s": 2}}' % key.encode(),
     b'{"error": {"class": "GenericError", "desc": "Parameter \'%s\' is unexpected"}}\r\n' % first)
    for key, first in (("b", b"b"), ("d", b"d"), ("a", b"\\u0000"), ("e", b"e"))
]


@pytest.mark.parametrize(("data", "expected"), NUL_CASES)
def test_nul_keys_are_ordered_by_qemus_bytes(data: bytes, expected: bytes) -> None:
    assert exchange(negotiated(QMPSession()), data) == expected


def test_qdict_key_bytes() -> None:
    assert key_bytes("a\0b") == b"a\xc0\x80b"
    assert key_bytes("\u00e9") == b"\xc3\xa9"
    # A key from argv holds argv's bytes (Python decodes argv with surrogateescape).
    assert key_bytes(b"\xff".decode("utf-8", "surrogateescape")) == b"\xff"
    assert qdict_order(["\0", "e", "execute"]) == ["e", "\0", "execute"]
    assert qemu_ordered([{"\0": 1, "e": {"b": 1, "a": 2}}]) == [{"e": {"a": 2, "b": 1}, "\0": 1}]


# --------------------------------------------------------------------------------------
# OOB policy and the fast path


def queries(result: Callable[[], Any] = lambda: STATUS) -> dict[str, Callable[[], Any]]:
    return {"query-status": result}


def test_fast_path_answers_inside_receive() -> None:
    session = negotiated(QMPSession(queries()))
    assert session.receive(b'{"execute": "query-status", "id": "a"}\n') == []
    assert session.data_to_send() == b'{"return": ' + STATUS_LINE + b', "id": "a"}\r\n'
    # Only whole plain queries: anything else is a request for the general path.
    assert len(session.receive(b'{"execute": "query-status", "arguments": {}}')) == 1
    assert session.data_to_send() == b""


def test_fast_path_not_before_negotiation_nor_inside_a_message() -> None:
    session = QMPSession(queries())
    session.data_to_send()
    assert exchange(session, b'{"execute": "query-status"}') == b"{" + HINT + b"}\r\n"
    negotiated(session)
    assert session.receive(b"[") == []
    requests = session.receive(b'{"execute": "query-status"}]')
    assert [request.error.desc for request in requests if request.error] == [
        "QMP input must be a JSON object"]


def test_a_failing_fast_query_is_left_to_the_general_path() -> None:
    def broken() -> Any:
        raise RuntimeError("broken")

    session = negotiated(QMPSession(queries(broken)))
    (request,) = session.receive(b'{"execute": "query-status", "id": 1}')
    assert session.data_to_send() == b""
    assert session.begin(request)
    assert (request.command, request.id) == ("query-status", 1)


def test_oob_policy_and_the_in_band_queue() -> None:
    session = QMPSession(queries())
    session.data_to_send()
    # Before OOB is enabled every request runs at once (QEMU suspends input meanwhile).
    (request,) = session.receive(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert session.runs_at_once(request)
    run(session, request)
    assert session.data_to_send() == b'{"return": {}}\r\n'
    assert session.oob_enabled
    # In-band requests now wait in the queue; the fast path does not overtake them.
    queued = session.receive(b'{"execute": "query-status", "arguments": {}, "id": 1}')
    assert not session.runs_at_once(queued[0])
    assert INBAND_QUEUE_MAX == 8
    later = session.receive(b'{"execute": "query-status", "id": 2}')
    assert len(later) == 1 and not session.runs_at_once(later[0])
    (oob,) = session.receive(b'{"exec-oob": "query-status", "id": 3}')
    assert oob.oob and session.runs_at_once(oob)
    run(session, queued[0])
    (general,) = session.receive(b'{"execute": "query-status", "id": 4}')  # 2 is still pending
    assert not session.runs_at_once(general)
    run(session, later[0])
    run(session, general)
    assert session.data_to_send() == b"".join(
        b'{"return": ' + STATUS_LINE + b', "id": %d}\r\n' % number for number in (1, 2, 4))
    # Nothing pending: the fast path answers again.
    assert session.receive(b'{"execute": "query-status", "id": 5}') == []
    assert session.data_to_send() == b'{"return": ' + STATUS_LINE + b', "id": 5}\r\n'


def test_an_unencodable_result_changes_nothing() -> None:
    session = negotiated(QMPSession(queries()), "oob")
    (request,) = session.receive(b'{"execute": "query-status", "arguments": {}, "id": 1}')
    assert not session.runs_at_once(request)
    with pytest.raises(TypeError):
        session.reply(request, object())
    assert session.data_to_send() == b""
    session.reply(request, error=QMPError("Internal error: TypeError"))
    assert session.data_to_send() == (
        b'{"id": 1, "error": {"class": "GenericError", "desc": "Internal error: TypeError"}}\r\n')
    assert session.receive(b'{"execute": "query-status"}') == []


# --------------------------------------------------------------------------------------
# Against live QEMU


@pytest.mark.qemu
def test_checks_follow_negotiation_as_in_qemu(qemu_system: str, tmp_path: Path) -> None:
    with running([], tmp_path, "ours", negotiate=False) as (_, ours), \
            running([], tmp_path, "qemu", qemu=True, negotiate=False) as (_, qemu):
        for client in (ours, qemu):
            client.send_raw(CAPS_THEN_OOB)
            # The out-of-band one may overtake the queued in-band one (QEMU: a race).
            assert sorted(client.read_line() for _ in CAPS_THEN_OOB_REPLIES) == sorted(CAPS_THEN_OOB_REPLIES)


@pytest.mark.qemu
def test_nul_keys_are_ordered_as_qemu_does(qemu_system: str, tmp_path: Path) -> None:
    """QEMU 7.2 orders a key holding U+0000 by its C0 80 bytes; so do we, on the wire."""
    with running([], tmp_path, "ours") as (_, ours), \
            running([], tmp_path, "qemu", qemu=True) as (_, qemu):
        for data, expected in NUL_CASES + ARGUMENT_NUL_CASES:
            ours.send_raw(data)
            qemu.send_raw(data)
            theirs = qemu.read_line().replace(b'"singlestep": false, ', b"")
            assert theirs == expected, data
            assert ours.read_line() == expected, data


# --------------------------------------------------------------------------------------
# The layer


def test_the_protocol_package_does_no_io() -> None:
    """No sockets, no tasks, nothing above it: only the errors and version facts of qmp_server."""
    import ast

    import qmp_server.protocol

    allowed_own = {"qmp_server.errors", "qmp_server.version", "qmp_server"}
    for path in Path(qmp_server.protocol.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    names = [node.module or ""]
                elif node.level == 1:
                    continue  # a sibling in the package
                else:
                    names = ["qmp_server." + node.module if node.module else "qmp_server"]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root not in {"trio", "socket", "selectors", "asyncio", "threading"}, (path.name, name)
                if root == "qmp_server":
                    assert name in allowed_own, (path.name, name)
