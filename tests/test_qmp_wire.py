"""The QMP wire protocol and the command line, as a client and a shell script see them.

The first half ports the checklist of QEMU's ``tests/qtest/qmp-test.c`` (malformed input
and recovery after each case, negotiation, ``id`` echo, out-of-band rules) and adds what
the issue asks on top (events only after negotiation, CRLF, escaping, framing). Expected
bytes are what QEMU 7.2 writes for the same input; the differential tests in
``test_protocol_transcript.py`` check the same inputs against a live QEMU.

The second half is the command line: options, exit codes, socket files, daemonizing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_support import SERVER, Client, running

from qmp_server import __version__

NAME = "\u00e9\u20ac"  # -name é€
NAME_WIRE = b'"\\u00E9\\u20AC"'


def greeting_line() -> bytes:
    return (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 10}, '
            b'"package": "qmp-server ' + __version__.encode() + b'"}, "capabilities": ["oob"]}}\r\n')


def generic_error(desc: str, id_json: str | None = None) -> bytes:
    """The exact line QEMU writes for a GenericError (``desc`` as JSON text, without quotes)."""
    prefix = "" if id_json is None else f'"id": {id_json}, '
    return f'{{{prefix}"error": {{"class": "GenericError", "desc": "{desc}"}}}}\r\n'.encode()


def not_found(desc: str, id_json: str | None = None) -> bytes:
    prefix = "" if id_json is None else f'"id": {id_json}, '
    return f'{{{prefix}"error": {{"class": "CommandNotFound", "desc": "{desc}"}}}}\r\n'.encode()


NEGOTIATION_HINT = "Expecting capabilities negotiation with 'qmp_capabilities'"


def start(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def shared_sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One server for the tests that do not change the VM state; each test connects anew."""
    sock = tmp_path_factory.mktemp("wire") / "wire.sock"
    proc = start([*SERVER, "-qmp", f"unix:{sock},server=on,wait=off", "-name", NAME])
    try:
        Client(sock).close()  # waits until it listens
        yield sock
    finally:
        stop_process(proc)


@pytest.fixture
def raw(shared_sock: Path) -> Iterator[Client]:
    """A fresh connection in negotiation mode (greeting already read)."""
    client = Client(shared_sock)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def qmp(shared_sock: Path) -> Iterator[Client]:
    """A fresh, negotiated connection."""
    client = Client(shared_sock)
    client.send_raw(b"{'execute': 'qmp_capabilities'}")
    assert client.read_line() == b'{"return": {}}\r\n'
    try:
        yield client
    finally:
        client.close()


def exchange(client: Client, data: bytes, lines: int = 1) -> list[bytes]:
    client.send_raw(data)
    return [client.read_line() for _ in range(lines)]


# --------------------------------------------------------------------------------------
# qmp-test.c: test_malformed(), run before and after negotiation

MALFORMED = [
    # syntax error
    pytest.param(b"{]\n", "JSON parse error, expecting value", id="syntax"),
    # lexical error: impossible byte outside string
    pytest.param(b"{\xff", "JSON parse error, stray '\\uFFFD'", id="ff-outside-string"),
    # lexical error: funny control character outside string
    pytest.param(b"{\x01", "JSON parse error, stray '\\u0001'", id="control-outside-string"),
    # lexical error: impossible byte in string
    pytest.param(b"{'bad \xff", "JSON parse error, stray ''bad \\uFFFD'", id="ff-in-string"),
    # lexical error: control character in string
    pytest.param(b"{'execute': 'nonexistent', 'id':'\n", "JSON parse error, stray ''\\n'",
                 id="control-in-string"),
    # lexical error: interpolation is not QMP syntax
    pytest.param(b"%p", "JSON parse error, stray '%'", id="interpolation"),
    # not even an object
    pytest.param(b"null\n", "QMP input must be a JSON object", id="null"),
    pytest.param(b"[1, 2]", "QMP input must be a JSON object", id="array"),
    pytest.param(b"{}", "QMP input lacks member 'execute'", id="no-execute"),
    pytest.param(b"{ 'execute': true }", "QMP input member 'execute' must be a string",
                 id="execute-not-string"),
    pytest.param(b"{ 'execute': 'no-such-cmd', 'arguments': [] }",
                 "QMP input member 'arguments' must be an object", id="arguments-not-object"),
    pytest.param(b"{ 'execute': 'no-such-cmd', 'extra': true }", "QMP input member 'extra' is unexpected",
                 id="extra-member"),
    pytest.param(b'{"execute": "query-name", "id": "a", "id": "b"}', "JSON parse error, duplicate key",
                 id="duplicate-key"),
]


@pytest.mark.parametrize(("data", "desc"), MALFORMED)
def test_malformed_before_negotiation(raw: Client, data: bytes, desc: str) -> None:
    assert exchange(raw, data) == [generic_error(desc)]
    # assert_recovered(): the next command is parsed normally
    assert exchange(raw, b"{ 'execute': 'no-such-cmd' }") == [not_found(NEGOTIATION_HINT)]


@pytest.mark.parametrize(("data", "desc"), MALFORMED)
def test_malformed_after_negotiation(qmp: Client, data: bytes, desc: str) -> None:
    assert exchange(qmp, data) == [generic_error(desc)]
    assert exchange(qmp, b"{ 'execute': 'no-such-cmd' }") == [
        not_found("The command no-such-cmd has not been found")]


def test_control_character_resets_a_half_sent_command(qmp: Client) -> None:
    # The QMP spec's way to put the parser into a known state: an ASCII control character.
    qmp.send_raw(b'{"execute": "query-name", "id": [1, {"a"')
    assert exchange(qmp, b"\x01") == [generic_error("JSON parse error, stray '\\u0001'")]
    assert exchange(qmp, b'{"execute": "query-name", "id": 7}') == [
        b'{"return": {"name": ' + NAME_WIRE + b'}, "id": 7}\r\n']


# --------------------------------------------------------------------------------------
# qmp-test.c: test_qmp_protocol()

def test_protocol(shared_sock: Path) -> None:
    client = Client(shared_sock)
    try:
        # greeting: version of the QEMU whose semantics we follow, our package, OOB offered
        assert client.greeting == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 10},
                                                       "package": f"qmp-server {__version__}"},
                                           "capabilities": ["oob"]}}
        # a valid command before the handshake
        assert exchange(client, b"{ 'execute': 'query-version' }") == [not_found(NEGOTIATION_HINT)]
        assert exchange(client, b"{ 'execute': 'query-version', 'id': 'v' }") == [
            not_found(NEGOTIATION_HINT, '"v"')]
        # the handshake, then a repeated one
        assert exchange(client, b"{ 'execute': 'qmp_capabilities' }") == [b'{"return": {}}\r\n']
        assert exchange(client, b"{ 'execute': 'qmp_capabilities' }") == [
            not_found("Capabilities negotiation is already complete, command ignored")]
        # a valid command
        version = (b'{"qemu": {"micro": 0, "minor": 1, "major": 10}, "package": "qmp-server '
                   + __version__.encode() + b'"}')
        assert exchange(client, b"{ 'execute': 'query-version' }") == [b'{"return": ' + version + b"}\r\n"]
        # 'id'
        assert exchange(client, b"{ 'execute': 'query-name', 'id': 'cookie#1' }") == [
            b'{"return": {"name": ' + NAME_WIRE + b'}, "id": "cookie#1"}\r\n']
        # command failure with 'id'
        assert exchange(client, b"{ 'execute': 'human-monitor-command', 'id': 2 }") == [
            generic_error("Parameter 'command-line' is missing", "2")]
    finally:
        client.close()


def test_greeting_bytes(shared_sock: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(20)
        sock.connect(str(shared_sock))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, "server closed the connection"
            data += chunk
        assert data == greeting_line()
    finally:
        sock.close()


def test_unknown_capability(raw: Client) -> None:
    fake = b"{ 'execute': 'qmp_capabilities', 'arguments': { 'enable': [ 'cap-does-not-exist' ] } }"
    assert exchange(raw, fake) == [
        generic_error("Parameter 'null' does not accept value 'cap-does-not-exist'")]
    assert exchange(raw, b"{ 'execute': 'qmp_capabilities', 'arguments': { 'enable': 'oob' } }") == [
        generic_error("Invalid parameter type for 'enable', expected: array")]
    # still in negotiation mode: the failed attempts did not negotiate
    assert exchange(raw, b"{ 'execute': 'query-name' }") == [not_found(NEGOTIATION_HINT)]


def test_argument_checks(qmp: Client) -> None:
    assert exchange(qmp, b'{"execute": "query-name", "arguments": {"x": 1}}') == [
        generic_error("Parameter 'x' is unexpected")]
    assert exchange(qmp, b'{"execute": "query-name", "arguments": {"x": 1}, "id": 3}') == [
        generic_error("Parameter 'x' is unexpected", "3")]
    # a request fault outranks an argument fault
    assert exchange(qmp, b"{ 'execute': 'query-name', 'arguments': {'x': 1}, 'extra': 1 }") == [
        generic_error("QMP input member 'extra' is unexpected")]
    assert exchange(qmp, b'{"arguments": {}}') == [generic_error("QMP input lacks member 'execute'")]
    assert exchange(qmp, b'{"id": "only"}') == [generic_error("QMP input lacks member 'execute'", '"only"')]
    assert exchange(qmp, b'"str"') == [generic_error("QMP input must be a JSON object")]
    assert exchange(qmp, b'{"execute": "no-such-command", "id": 2}') == [
        not_found("The command no-such-command has not been found", "2")]


# --------------------------------------------------------------------------------------
# qmp-test.c: test_qmp_oob()

def test_oob(raw: Client) -> None:
    # before OOB is enabled, exec-oob is just an unexpected member
    assert exchange(raw, b"{ 'exec-oob': 'query-name', 'id': 1 }") == [
        generic_error("QMP input member 'exec-oob' is unexpected", "1")]
    enable = b"{ 'execute': 'qmp_capabilities', 'arguments': { 'enable': [ 'oob' ] }, 'id': 'x' }"
    assert exchange(raw, enable) == [b'{"return": {}, "id": "x"}\r\n']
    # a command that does not support OOB, asked out of band
    assert exchange(raw, b"{ 'exec-oob': 'query-name', 'id': 3 }") == [
        generic_error("The command query-name does not support OOB", "3")]
    assert exchange(raw, b"{ 'exec-oob': 'no-such', 'id': 4 }") == [
        not_found("The command no-such has not been found", "4")]
    assert exchange(raw, b"{ 'exec-oob': 5, 'id': 5 }") == [
        generic_error("QMP input member 'exec-oob' must be a string", "5")]
    # both 'execute' and 'exec-oob', in either order
    clash = generic_error("QMP input member 'execute' clashes with 'exec-oob'", "6")
    assert exchange(raw, b"{ 'exec-oob': 'query-name', 'execute': 'query-name', 'id': 6 }") == [clash]
    assert exchange(raw, b"{ 'execute': 'query-name', 'exec-oob': 'query-name', 'id': 6 }") == [clash]
    # an out-of-band request is dispatched as soon as it is read: its reply comes before
    # the reply to anything sent after it
    assert exchange(raw, b"{ 'exec-oob': 'no-such', 'id': 'o' }{ 'execute': 'query-name', 'id': 'i' }",
                    lines=2) == [not_found("The command no-such has not been found", '"o"'),
                                 b'{"return": {"name": ' + NAME_WIRE + b'}, "id": "i"}\r\n']
    # even a malformed in-band command fails in-band, with its id
    assert exchange(raw, b"{ 'execute': 'query-name', 'id': 'ib' }{ 'id': 'err-2' }", lines=2) == [
        b'{"return": {"name": ' + NAME_WIRE + b'}, "id": "ib"}\r\n',
        generic_error("QMP input lacks member 'execute'", '"err-2"')]


def test_clash_without_oob_is_an_unexpected_member(qmp: Client) -> None:
    assert exchange(qmp, b"{ 'exec-oob': 'query-name', 'execute': 'query-name', 'id': 1 }") == [
        generic_error("QMP input member 'exec-oob' is unexpected", "1")]


# --------------------------------------------------------------------------------------
# id echo

ID_CASES: list[tuple[str | bytes, str]] = [
    ('"abc"', '"abc"'),
    ("1", "1"),
    ("-12", "-12"),
    ("-0", "0"),
    ("18446744073709551615", "18446744073709551615"),
    ("true", "true"),
    ("false", "false"),
    ("null", "null"),
    ("[]", "[]"),
    ("{}", "{}"),
    ('{"nested": [1, 2]}', '{"nested": [1, 2]}'),
    ("[true, false, null, 'a\\\"b']", '[true, false, null, "a\\"b"]'),
    ("'it\\'s'", '"it\'s"'),
    ("1.5", "1.5"),
    # QEMU prints doubles with %.17g
    ("0.1", "0.10000000000000001"),
    ("2.0", "2"),
    ("1E2", "100"),
    ("1e300", "1.0000000000000001e+300"),
    ("18446744073709551616", "1.8446744073709552e+19"),
    # members come out in QEMU's QDict order, not as sent
    ('{"b": 1, "a": 2, "c": {"z": 1, "y": 2}}', '{"a": 2, "b": 1, "c": {"y": 2, "z": 1}}'),
    (b"'\\u0000x\\u007f\xf0\x9f\x98\x80'", '"\\u0000x\\u007F\\uD83D\\uDE00"'),
]


@pytest.mark.parametrize(("sent", "echoed"), ID_CASES, ids=[repr(case[0]) for case in ID_CASES])
def test_id_echo(qmp: Client, sent: str | bytes, echoed: str) -> None:
    data = sent.encode() if isinstance(sent, str) else sent
    ok = b"{'execute': 'query-name', 'id': " + data + b"}"
    expected = b'{"return": {"name": ' + NAME_WIRE + b'}, "id": ' + echoed.encode() + b"}\r\n"
    assert exchange(qmp, ok) == [expected]
    # errors found once the input is known to be an object carry the id too
    for request, error in [
        (b"{'execute': 'no-such', 'id': " + data + b"}",
         not_found("The command no-such has not been found", echoed)),
        (b"{'execute': 'query-name', 'extra': 1, 'id': " + data + b"}",
         generic_error("QMP input member 'extra' is unexpected", echoed)),
    ]:
        assert exchange(qmp, request) == [error]


# --------------------------------------------------------------------------------------
# framing, line ends, escaping

def test_output_lines_end_in_crlf_and_input_accepts_crlf(qmp: Client) -> None:
    lines = exchange(qmp, b'{"execute": "query-name"}\r\n{"execute": "query-name", "id": 2}\r\n', lines=2)
    assert lines == [b'{"return": {"name": ' + NAME_WIRE + b"}}\r\n",
                     b'{"return": {"name": ' + NAME_WIRE + b'}, "id": 2}\r\n']


def test_non_ascii_is_escaped(qmp: Client) -> None:
    assert exchange(qmp, b'{"execute": "query-name"}') == [b'{"return": {"name": "\\u00E9\\u20AC"}}\r\n']
    # a command name is echoed in the error, escaped the same way (UTF-8 in, ASCII out)
    assert exchange(qmp, '{"execute": "caf\u00e9\U0001F600"}'.encode()) == [
        not_found("The command caf\\u00E9\\uD83D\\uDE00 has not been found")]


def test_several_commands_in_one_write(qmp: Client) -> None:
    data = b"".join(b'{"execute": "query-name", "id": %d}' % i for i in range(20))
    lines = exchange(qmp, data, lines=20)
    assert lines == [b'{"return": {"name": ' + NAME_WIRE + b'}, "id": %d}\r\n' % i for i in range(20)]


def test_one_command_split_byte_by_byte(qmp: Client) -> None:
    data = b"{'execute': 'query-name', 'arguments': {}, 'id': ['split', 1.5, \"\\u00e9\"]}"
    for i in range(len(data)):
        qmp.send_raw(data[i:i + 1])
        time.sleep(0.002)  # pacing only, so that the bytes arrive in separate reads
    assert qmp.read_line() == (b'{"return": {"name": ' + NAME_WIRE
                               + b'}, "id": ["split", 1.5, "\\u00E9"]}\r\n')


def test_events_only_after_negotiation(tmp_path: Path) -> None:
    with running([], tmp_path) as (_, actor):
        quiet = Client(tmp_path / "vm.sock")
        watcher = Client(tmp_path / "vm.sock")
        try:
            assert exchange(watcher, b'{"execute": "qmp_capabilities"}') == [b'{"return": {}}\r\n']
            assert actor.execute("stop") == {"return": {}}
            stop = watcher.read()
            assert stop["event"] == "STOP" and set(stop) == {"event", "timestamp"}
            # the un-negotiated connection got no STOP: its next line is its own reply
            assert exchange(quiet, b'{"execute": "qmp_capabilities", "id": "late"}') == [
                b'{"return": {}, "id": "late"}\r\n']
            assert actor.execute("cont") == {"return": {}}
            for client in (quiet, watcher):
                line = client.read_line()
                event = json.loads(line)
                assert line.endswith(b"\r\n")
                assert list(event) == ["timestamp", "event"] and event["event"] == "RESUME"
                assert set(event["timestamp"]) == {"seconds", "microseconds"}
                assert abs(event["timestamp"]["seconds"] - time.time()) < 3600
        finally:
            quiet.close()
            watcher.close()


# --------------------------------------------------------------------------------------
# command line

def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=30, cwd=cwd)


def test_unknown_option(tmp_path: Path) -> None:
    result = run_cli(["-foo"], tmp_path)
    assert result.returncode == 1
    assert result.stderr == "qmp-server: -foo: invalid option\n"
    assert not (tmp_path / "qmp.sock").exists()


def test_version_and_help(tmp_path: Path) -> None:
    result = run_cli(["--version"], tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert __version__ in result.stdout and "10.1.0" in result.stdout
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    for option in ("-qmp", "-S", "-name", "-incoming", "-daemonize", "-pidfile"):
        assert option in result.stdout
    assert not (tmp_path / "qmp.sock").exists()


def test_compatibility_options_are_accepted(tmp_path: Path) -> None:
    with running(["-machine", "none", "-nodefaults", "-display", "none", "-nographic"], tmp_path) as (_, qmp):
        assert qmp.cmd("query-status") == {"status": "running", "running": True}


def test_socket_file_mode_is_0600(shared_sock: Path) -> None:
    st = os.stat(shared_sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_regular_file_at_socket_path_is_never_deleted(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    path.write_bytes(b"precious data\n")
    result = run_cli(["-qmp", f"unix:{path},server=on,wait=off"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("qmp-server: ") and str(path) in result.stderr
    assert result.stderr.count("\n") == 1
    assert path.read_bytes() == b"precious data\n"


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    with running([], tmp_path) as (proc, qmp):
        assert qmp.cmd("query-status")["status"] == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert stat.S_ISSOCK(os.lstat(tmp_path / "vm.sock").st_mode)  # left behind by the dead server
    with running(["-S"], tmp_path) as (_, qmp):
        assert qmp.cmd("query-status") == {"status": "prelaunch", "running": False}


def test_socket_in_use_is_refused(tmp_path: Path) -> None:
    with running(["-S"], tmp_path) as (_, qmp):
        result = run_cli(["-qmp", f"unix:{tmp_path / 'vm.sock'},server=on,wait=off"], tmp_path)
        assert result.returncode == 1
        assert result.stderr.startswith("qmp-server: ") and result.stderr.count("\n") == 1
        # the first server still owns its socket, and answers on it
        assert qmp.cmd("query-status") == {"status": "prelaunch", "running": False}
        late = Client(tmp_path / "vm.sock")
        try:
            assert late.execute("qmp_capabilities") == {"return": {}}
        finally:
            late.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


def test_daemonize_with_pidfile(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    pidfile = tmp_path / "d.pid"
    argv = [*SERVER, "-qmp", f"unix:{sock},server=on,wait=off", "-daemonize", "-pidfile", str(pidfile)]
    daemon_pid: int | None = None
    try:
        result = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        # ready when the parent exits: the pidfile is written and the socket accepts at once
        daemon_pid = int(pidfile.read_text())
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            # the pidfile names the process that serves the socket (not the parent)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            assert struct.unpack("3i", creds)[0] == daemon_pid
        finally:
            probe.close()
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        client = Client(sock)
        try:
            assert client.execute("qmp_capabilities") == {"return": {}}
            assert client.cmd("query-status") == {"status": "running", "running": True}
            os.kill(daemon_pid, signal.SIGTERM)
            event = client.read()
            assert event["event"] == "SHUTDOWN"
            assert event["data"] == {"guest": False, "reason": "host-signal"}
            with pytest.raises(EOFError):
                client.read()
        finally:
            client.close()
        deadline = time.monotonic() + 20
        while not _gone(daemon_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(daemon_pid)
        assert not sock.exists()
    finally:
        if daemon_pid is not None and not _gone(daemon_pid):
            os.kill(daemon_pid, signal.SIGKILL)


def test_quit(tmp_path: Path) -> None:
    with running([], tmp_path) as (proc, qmp):
        qmp.send_raw(b'{"execute": "quit", "id": "bye"}')
        shutdown = json.loads(qmp.read_line())
        assert list(shutdown) == ["timestamp", "event", "data"]
        assert shutdown["event"] == "SHUTDOWN"
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert qmp.read_line() == b'{"return": {}, "id": "bye"}\r\n'
        with pytest.raises(EOFError):
            qmp.read_line()
        assert proc.wait(timeout=20) == 0
    assert not (tmp_path / "vm.sock").exists()


def test_start_paused_and_name(tmp_path: Path) -> None:
    with running(["-S", "-name", "vm1"], tmp_path) as (_, qmp):
        assert qmp.cmd("query-status") == {"status": "prelaunch", "running": False}
        assert qmp.cmd("query-name") == {"name": "vm1"}
        assert qmp.cmd("cont") == {}
        assert qmp.wait_event("RESUME")["event"] == "RESUME"
        assert qmp.cmd("query-status") == {"status": "running", "running": True}


def test_no_name(qmp_unnamed: Client) -> None:
    assert qmp_unnamed.execute("query-name") == {"return": {}}


@pytest.fixture
def qmp_unnamed(tmp_path: Path) -> Iterator[Client]:
    with running(["-incoming", "defer"], tmp_path) as (_, qmp):
        yield qmp


def test_incoming_defer(qmp_unnamed: Client) -> None:
    assert qmp_unnamed.cmd("query-status") == {"status": "inmigrate", "running": False}


def test_two_sockets_are_independent(tmp_path: Path) -> None:
    second = tmp_path / "second.sock"
    with running(["-qmp", f"unix:{second},server,nowait"], tmp_path, negotiate=False) as (_, first):
        other = Client(second)
        try:
            assert stat.S_IMODE(os.stat(second).st_mode) == 0o600
            # negotiation is per connection
            assert first.execute("qmp_capabilities") == {"return": {}}
            assert other.execute("query-status")["error"]["desc"] == NEGOTIATION_HINT
            assert other.execute("qmp_capabilities") == {"return": {}}
            # ... but both monitors control the same VM
            assert first.cmd("stop") == {}
            assert other.wait_event("STOP")["event"] == "STOP"
            assert other.cmd("query-status") == {"status": "paused", "running": False}
        finally:
            other.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_tcp_monitor(tmp_path: Path) -> None:
    port = _free_port()
    with running(["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"], tmp_path):
        client = Client(("127.0.0.1", port))
        try:
            assert client.greeting["QMP"]["capabilities"] == ["oob"]
            client.send_raw(b'{"execute": "qmp_capabilities"}')
            assert client.read_line() == b'{"return": {}}\r\n'
            assert client.cmd("query-status") == {"status": "running", "running": True}
        finally:
            client.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
