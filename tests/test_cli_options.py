"""Command-line options as QEMU 7.2 takes them (issue 10): bad values of the guest
options refused with QEMU's texts, ``-msg timestamp=on``, pretty-printed monitors,
``-no-reboot``, the SIGTERM report, ``-loadvm`` with ``-incoming``/``-preconfig``.

Each case runs the same command line (``-machine none -nodefaults -display none``)
against QEMU 7.2 and compares what a user sees: the exit status and stderr, with the
program name normalized.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import qemu_tools
from server_support import QEMU, SERVER, Client

QEMU_PROG = "qemu-system-x86_64"
PROG = "qmp-server"
#: What QEMU's real_time_iso8601 prints (GLib's ISO 8601, UTC).
TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z"


def _argv(qemu: bool) -> list[str]:
    if qemu:
        qemu_tools.require(QEMU_PROG)
        return [*QEMU]
    return [*SERVER, "-nodefaults", "-display", "none"]


def _normalized(stderr: bytes, qemu: bool) -> str:
    """stderr with the program's name (at line starts, after any timestamp) as PROG."""
    text = stderr.decode()
    return re.sub(rf"^((?:{TIMESTAMP} )?(?:\S+ )?){QEMU_PROG}: ", rf"\1{PROG}: ", text, flags=re.M) if qemu \
        else text


def _refusal(qemu: bool, options: list[str], tmp_path: Path) -> tuple[int, str, bool]:
    """Run with ``options``; (exit status, stderr, whether a monitor socket was created)."""
    sock = tmp_path / f"{'qemu' if qemu else 'ours'}.sock"
    done = subprocess.run([*_argv(qemu), *options, "-qmp", f"unix:{sock},server=on,wait=off"],
                          capture_output=True, timeout=20, check=False, stdin=subprocess.DEVNULL)
    return done.returncode, _normalized(done.stderr, qemu), sock.exists()


REFUSED = [
    "-cpu bogus", "-cpu qemu64", "-cpu host,+ssbd",
    "-rtc bogus=1", "-rtc bogus", "-rtc base=nonsense", "-rtc clock=bogus", "-rtc driftfix=bogus",
    "-boot foo=bar", "-boot foo=bar,menu=maybe", "-boot order=zz", "-boot order=cc", "-boot once=x",
    "-boot c,bogus", "-boot splash-time=x",
    "-sandbox bogus", "-sandbox on,obsolete=bogus", "-sandbox on,spawn=x",
    "-msg timestamp=maybe", "-msg guest-name=x", "-msg bogus=on",
    "-overcommit foo=on", "-overcommit mem-lock=maybe",
    "-smp foo", "-smp 4", "-smp 1,maxcpus=2", "-smp 3,sockets=2", "-smp 1,foo", "-smp 1,foo=2",
    "-smp 2,dies=2", "-smp 300", "-smp sockets=300", "-smp 1,cores=2", "-smp cores=2", "-smp 0x2",
    "-m 1Q",
    "-name debug-threads=maybe", "-name foo,bogus=1",
    "-vga bogus", "-vga xenfb",
    "-global bogus", "-global foo.bar", "-global driver=a.b,property=c", "-global =x", "-global .x=1",
    "-loadvm x -incoming defer", "-incoming defer -loadvm x", "-preconfig -loadvm x",
    "-preconfig -incoming tcp:127.0.0.1:1",
    # several at once: QEMU's order of checks decides which one is reported
    "-rtc base=nonsense -cpu bogus", "-cpu bogus -vga bogus -boot foo=bar",
    "-loadvm x -incoming defer -cpu bogus",
    "-loadvm x -incoming defer -rtc bogus=1", "-rtc base=nonsense -vga bogus", "-vga bogus -smp foo",
    "-boot foo=bar -smp 1,maxcpus=2", "-cpu bogus -smp 4",
    # a PC (the last -machine counts): no KVM for -cpu host
    "-machine pc -cpu host", "-machine pc -cpu bogus", "-machine pc -smp 1,foo=2",
]


@pytest.mark.parametrize("options", REFUSED)
def test_refused_as_qemu_refuses_it(tmp_path: Path, options: str) -> None:
    ours = _refusal(False, options.split(), tmp_path)
    qemu = _refusal(True, options.split(), tmp_path)
    # QEMU makes some of these checks after creating the monitor socket, which it then
    # leaves behind; we make them all before creating anything.
    assert ours[0] == 1 and not ours[2], ours
    assert ours[:2] == qemu[:2]


@contextmanager
def _serving(argv: list[str], sock: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run ``argv`` (which serves QMP on ``sock``), its stderr to a file; yield both."""
    errors = tmp_path / f"{sock.name}.err"
    with errors.open("wb") as sink:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yield proc, errors
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _quit_and_stderr(qemu: bool, options: list[str], tmp_path: Path) -> tuple[int, str]:
    """Start with ``options``, quit over QMP; (exit status, stderr)."""
    sock = tmp_path / f"{'qemu' if qemu else 'ours'}.sock"
    argv = [*_argv(qemu), *options, "-qmp", f"unix:{sock},server=on,wait=off"]
    with _serving(argv, sock, tmp_path) as (proc, errors):
        client = Client(sock)
        client.execute("qmp_capabilities")
        client.execute("quit")
        client.close()
        status = proc.wait(timeout=20)
    return status, _normalized(errors.read_bytes(), qemu)


ACCEPTED = [
    "-rtc base=utc,clock=vm,driftfix=slew", "-rtc base=2006-06-17T16:01:21", "-rtc base=localtime,clock=host",
    "-boot order=cd,menu=on,strict=on,splash-time=5,reboot-timeout=1", "-boot cd",
    # what libvirt passes
    "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny", "-sandbox off",
    "-msg timestamp=off", "-overcommit mem-lock=off,cpu-pm=off", "-name guest=vm,debug-threads=on",
    "-smp 1", "-vga none", "-vga std",
]


@pytest.mark.parametrize("options", ACCEPTED)
def test_accepted_as_qemu_accepts_it(tmp_path: Path, options: str) -> None:
    ours = _quit_and_stderr(False, options.split(), tmp_path)
    assert ours == _quit_and_stderr(True, options.split(), tmp_path)
    assert ours[0] == 0


# --------------------------------------------------------------------------- -msg


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_msg_timestamp_prefixes_what_is_reported_after_it(tmp_path: Path, qemu: bool) -> None:
    status, err, _ = _refusal(qemu, ["-msg", "timestamp=on", "-rtc", "bogus=1"], tmp_path)
    assert status == 1
    assert re.fullmatch(rf"{TIMESTAMP} {PROG}: -rtc bogus=1: Invalid parameter 'bogus'\n", err), err
    # A warning's hint line (QEMU's error_printf) has no timestamp; a check made once all
    # options are read has one.
    status, err, _ = _refusal(qemu, ["-msg", "timestamp=on", "-global", "bogus"], tmp_path)
    assert re.fullmatch(rf"{TIMESTAMP} {PROG}: -global bogus: warning: short-form boolean option 'bogus' "
                        rf"deprecated\nPlease use bogus=on instead\n"
                        rf"{TIMESTAMP} {PROG}: -global bogus: Invalid parameter 'bogus'\n", err), err
    status, err, _ = _refusal(qemu, ["-msg", "timestamp=on,guest-name=on", "-name", "vm7", "-cpu", "bogus"],
                              tmp_path)
    assert re.fullmatch(rf"{TIMESTAMP} vm7 {PROG}: unable to find CPU model 'bogus'\n", err), err
    # An error in an option before -msg stops the parsing before -msg applies.
    assert _refusal(qemu, ["-rtc", "bogus=1", "-msg", "timestamp=on"], tmp_path)[:2] == (
        1, f"{PROG}: -rtc bogus=1: Invalid parameter 'bogus'\n")


# --------------------------------------------------------------------------- pretty


def _read_pretty(sock: socket.socket, count: int) -> bytes:
    """``count`` pretty-printed messages (each ends with a "}" line)."""
    data = b""
    sock.settimeout(20)
    while data.count(b"\r\n}\r\n") + data.startswith(b"}\r\n") < count:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def _pretty_transcript(qemu: bool, option: list[str], sock_path: Path, tmp_path: Path) -> list[bytes]:
    argv = [*_argv(qemu), *option]
    with _serving(argv, sock_path, tmp_path) as (proc, _):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            transcript = [_read_pretty(sock, 1)]
            for request in (b'{"execute": "qmp_capabilities"}', b'{"execute": "query-status"}',
                            b'{"execute": "bogus", "id": [1, {}, [], "a\\u00e9", 1.5, null]}',
                            b'{"execute": "query-block"}', b'{"execute": "query-chardev"}'):
                sock.sendall(request + b"\n")
                transcript.append(_read_pretty(sock, 1))
            sock.sendall(b'{"execute": "quit"}\n')
            _read_pretty(sock, 1)  # QEMU drops what a client that left had queued
        proc.wait(timeout=20)
    return transcript


@pytest.mark.parametrize("how", ["qmp-pretty", "mon"])
def test_pretty_monitor_bytes_as_qemu(tmp_path: Path, how: str) -> None:
    results = {}
    for qemu in (False, True):
        path = tmp_path / f"{qemu}.sock"
        if how == "qmp-pretty":
            option = ["-qmp-pretty", f"unix:{path},server=on,wait=off"]
        else:
            option = ["-chardev", f"socket,id=m,path={path},server=on,wait=off",
                      "-mon", "chardev=m,mode=control,pretty=on"]
        transcript = _pretty_transcript(qemu, option, path, tmp_path)
        # The versions and the package differ, query-chardev names the socket, and
        # query-status has no "singlestep" after QEMU 7.2 (we answer as QEMU 10).
        results[qemu] = [re.sub(rb'"(micro|minor|major)": \d+|"package": "[^"]*"|"unix:[^"]*"'
                                rb'| *"singlestep": false,\r\n', rb"\1", message) for message in transcript]
    assert results[False] == results[True]
    assert results[False][1] == b'{\r\n    "return": {\r\n    }\r\n}\r\n'


def test_pretty_encoding_of_empty_and_nested_values() -> None:
    # QEMU's bytes for a reply with a list of objects, empty containers, a float and an
    # escaped string (recorded from QEMU 7.2, -qmp-pretty; "id" echoed as given).
    from qmp_server.protocol.encoding import encode, prettify

    reply = {"return": [{"frontend-open": True, "label": "compat_monitor0"}],
             "id": [1, {}, [], "a\u00e9", 1.5, None]}
    assert prettify(encode(reply) + encode({"return": {}})) == (
        b'{\r\n    "return": [\r\n        {\r\n            "frontend-open": true,\r\n'
        b'            "label": "compat_monitor0"\r\n        }\r\n    ],\r\n    "id": [\r\n        1,\r\n'
        b'        {\r\n        },\r\n        [\r\n        ],\r\n        "a\\u00E9",\r\n        1.5,\r\n'
        b'        null\r\n    ]\r\n}\r\n{\r\n    "return": {\r\n    }\r\n}\r\n')


# --------------------------------------------------------------------------- -no-reboot


def _reset_transcript(qemu: bool, options: list[str], tmp_path: Path) -> tuple[list[object], int | None]:
    sock = tmp_path / f"{'qemu' if qemu else 'ours'}.sock"
    argv = [*_argv(qemu), *options, "-qmp", f"unix:{sock},server=on,wait=off"]
    with _serving(argv, sock, tmp_path) as (proc, _):
        client = Client(sock)
        client.execute("qmp_capabilities")
        client.send_raw('{"execute": "system_reset"}\n')
        seen: list[object] = []
        while not seen or "return" not in str(seen[-1]):
            message = client.read()
            message.pop("timestamp", None)
            seen.append(message)
        # A process that ends after the reply may still read one more command before it
        # goes (in QEMU too): give it a moment to end before asking for its state.
        status: int | None = None
        try:
            status = proc.wait(timeout=1.5)
            seen.append("closed")
        except subprocess.TimeoutExpired:
            try:
                seen.append(client.execute("query-status")["return"]["status"])
                client.execute("quit")  # still running (status None): done with it
            except (OSError, AssertionError, ValueError):
                seen.append("closed")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    status = proc.wait(timeout=5)
        client.close()
    return seen, status


@pytest.mark.parametrize("options", [
    pytest.param(["-no-reboot"], id="no-reboot"),
    pytest.param(["-no-reboot", "-no-shutdown"], id="no-reboot-no-shutdown"),
    pytest.param([], id="plain")])
def test_system_reset_with_no_reboot_shuts_down(tmp_path: Path, options: list[str]) -> None:
    ours = _reset_transcript(False, options, tmp_path)
    qemu = _reset_transcript(True, options, tmp_path)
    assert ours == qemu
    if options == ["-no-reboot"]:
        assert ours == ([{"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-system-reset"}},
                         {"return": {}}, "closed"], 0)


# --------------------------------------------------------------------------- signals


def _own_argv0() -> str:
    with open("/proc/self/cmdline", "rb") as cmdline:
        return cmdline.read().split(b"\0")[0].decode()


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_sigterm_is_reported_with_its_sender(tmp_path: Path, qemu: bool) -> None:
    sock = tmp_path / "s.sock"
    argv = [*_argv(qemu), "-qmp", f"unix:{sock},server=on,wait=off"]
    with _serving(argv, sock, tmp_path) as (proc, errors):
        Client(sock).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        err = _normalized(errors.read_bytes(), qemu)
    assert err == f"{PROG}: terminating on signal 15 from pid {os.getpid()} ({_own_argv0()})\n"


# --------------------------------------------------------------------------- -preconfig


def test_preconfig_is_refused_with_a_clear_text(tmp_path: Path) -> None:
    assert _refusal(False, ["-preconfig"], tmp_path) == (
        1, f"{PROG}: -preconfig: not supported by qmp-server: there is no machine initialization "
           "to pause; leave -preconfig out\n", False)


def test_cpu_help_is_qemus_list(tmp_path: Path) -> None:
    outputs = []
    for qemu in (False, True):
        done = subprocess.run([*_argv(qemu), "-cpu", "help"], capture_output=True, timeout=20, check=False)
        outputs.append((done.returncode, done.stdout, done.stderr))
    assert outputs[0] == outputs[1]
    assert b"\nx86 qemu64 " in outputs[0][1]
