"""Differential test: JSONStreamer against the QMP monitor of a real qemu-system-x86_64.

Every case is sent to QEMU on one connection, followed by a resynchronisation byte and a
command carrying a unique id; everything QEMU answers before that command's reply is the
case's outcome.  The streamer is fed exactly the same bytes.  QEMU replies are reduced to
what the input layer decides: a JSON error text, "not an object", or "an object" (with
its echoed id, which checks the parsed values too).

The connection stays in capabilities-negotiation mode, so no command ever executes.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import qemu_tools

from qmp_server.protocol.framing import JSONParseError, JSONStreamer

pytestmark = pytest.mark.qemu

_NOT_OBJECT = "QMP input must be a JSON object"
_MISSING = "<no id>"

Outcome = tuple[Any, ...]


class _Monitor:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        json.loads(self.file.readline())  # greeting
        self.serial = 0

    def outcomes(self, data: bytes) -> list[Outcome]:
        self.serial += 1
        sync = f"SYNC-{self.serial}"
        self.sock.sendall(data + _sync_suffix(sync))
        result: list[Outcome] = []
        while True:
            line = self.file.readline()
            assert line, "QEMU closed the connection"
            reply = _loads_lenient(line)
            if "QMP" in reply:
                # QEMU 7.2 may greet a client that connected while it started twice
                # (server_support.Client.reply).
                continue
            if reply.get("id") == sync:
                return result
            result.append(_qemu_outcome(reply))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _sync_suffix(sync: str) -> bytes:
    return b'\x01{"execute":"query-status","id":"' + sync.encode() + b'"}'


def _loads_lenient(line: bytes) -> dict[str, Any]:
    try:
        reply: dict[str, Any] = json.loads(line)
    except ValueError:
        # QEMU prints infinite doubles as inf/-inf, which is not JSON.
        reply = json.loads(re.sub(rb"(?<=[:\[, ])(-?)inf(?=[,\]} ])", rb"\1Infinity", line))
    return reply


def _qemu_outcome(reply: dict[str, Any]) -> Outcome:
    error = reply.get("error")
    if error is not None and "id" not in reply:
        desc = error["desc"]
        if desc.startswith("JSON "):
            return ("error", desc)
        if desc == _NOT_OBJECT:
            return ("not-object",)
    return ("object", reply.get("id", _MISSING))


def _our_outcomes(data: bytes, sync: str, chunk: int | None = None) -> list[Outcome]:
    streamer = JSONStreamer()
    stream = data + _sync_suffix(sync)
    results: list[Any] = []
    if chunk is None:
        results = streamer.feed(stream)
    else:
        for i in range(0, len(stream), chunk):
            results += streamer.feed(stream[i:i + chunk])
    assert isinstance(results[-1], dict) and results[-1]["id"] == sync
    outcomes: list[Outcome] = []
    for item in results[:-1]:
        if isinstance(item, JSONParseError):
            outcomes.append(("error", item.desc))
        elif isinstance(item, dict):
            outcomes.append(("object", item.get("id", _MISSING)))
        else:
            outcomes.append(("not-object",))
    return outcomes


@pytest.fixture(scope="module")
def monitor() -> Iterator[_Monitor]:
    binary = qemu_tools.require("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="jsonstream-qemu") as tmp:
        path = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            [binary, "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{path},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(path):
                assert proc.poll() is None, "QEMU exited early"
                assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
                time.sleep(0.02)
            mon = _Monitor(path)
            try:
                yield mon
            finally:
                mon.close()
        finally:
            proc.kill()
            proc.wait()


CASES: list[bytes] = [
    # the brief's and qmp-test.c's malformed inputs
    b"{]", b"{]\n", b"{\xff", b"{\x01", b"{'bad \xff", b"{'execute': 'nonexistent', 'id':'\n",
    b'"unterminated\x01', b"%p", b"{'a':1}junk{\"execute\":\"x\"}", b"null", b"{}",
    b"{ 'execute': true }", b"{ 'execute': 'no-such-cmd', 'arguments': [] }",
    # framing
    b"[}", b"[}]", b"}", b"]", b"42", b"42 ", b"1 2 3 ", b'"a""b"', b"true false ", b"[1][2]{}",
    b'{"a":[}', b"[{]}", b"[[[", b"{{{}", b"x:1",
    # lexical errors and their rendering
    b"01", b"\x00", b'"abc\x00', b"\x01\x01", b"\xff\xff", b"%%", b"-a", b"1.x", b"1ex", b"1e+x",
    b"- 1", b"+1", b".5", b"[True]", b"NaN", b"Infinity", b'{"execute":"a\xffb"}',
    b'{"execute":"a\tb"}', b'"\xc0\x80\x01', b'"\xef\xbf\xbe\x01', b'"\xc3\x01',
    b'"\xf0\x9f\x98\x80\x01', b'"\xe0\x80\x01', b'"\xed\xa0\x80\x01', b'"\xf8\x88\x80\x80\x80\x01',
    b'"\x80\x80\x01', b'"\xe2\x82\x01', b'"\x7f\x01', b'"\xf4\x90\x80\x80\x01', b'"\xfe', b"\xfe",
    b'"\\\x01', b'"\\\xff', b"'\\'", b"\xc3\xa9", b"\x1b[A{}",
    # recovery resynchronisation points
    b'x\t{"id":1}', b'%\t{"id":1}', b'%\r{"id":1}', b'%\n{"id":1}', b'%\xfe{"id":1}', b'%ab:{"id":1}',
    b'%ab,{"id":1}', b'%ab]{"id":1}', b'%ab}{"id":1}', b'%ab[1]', b'%"{"id":1}',
    # parser errors and their precedence
    b'{"a":1,"a":2}', b"{1:2}", b'{"a" 1}', b'{"a":1 "b":2}', b"[1 2]", b"[1,]", b'{"a":1,}',
    b'{"a":}', b"{foo:1}", b"[truex]", b"[nul]", b"{[1,}:3}", b"{[1]:3}", b"{{}:1}",
    b'{"a":1,"a":}', b'{"a":1,"a":"\\q"}', b'{"\\q":1}', b"{1:}", b"[1,2}", b'{"a":1]',
    b'{"a"]', b"{,}", b"[,]", b"{:}", b"[:]", b'{"a":1,"b"}', b'{"a":{"b":1,"b":2},"a":3}',
    # strings
    b'{"id":"a\\u0000b"}', b'{"id":"a\xc0\x80b"}', b'{"id":"a\xef\xbf\xbeb"}', b'{"id":"a\\uFFFEb"}',
    b'{"id":"a\\ud800b"}', b'{"id":"a\\ud800\\u0041b"}', b'{"id":"a\\udc00b"}',
    b'{"id":"a\\ud83d\\ude00b"}', b'{"id":"a\\ud83f\\udffeb"}', b'{"id":"a\\u12"}', b'{"id":"a\\u"}',
    b'{"id":"a\\u12xyzw"}', b'{"id":"a\\qb"}', b'{"id":"a\\\'b"}', b"{'id':'a\\\"b'}",
    b'{"id":"a\xe9b"}', b'{"id":"a\xc3\xa9b"}', b'["\\u\xc3\xa9"]', b'["\\u1\xc3\xa9"]',
    b'["\\u12\xc3\xa9"]', b'"\\ud83d\\u"', b'"\\ud83dx"', b'"\\uDBFF\\uDFFF"', b'"\\uDBFF\\uDFFD"',
    b'"\\uFDD0"', b'"\\uFDCF"', b'"\\U00e9"', b'"\xf4\x8f\xbf\xbd"', b'"\xc1\xbf"',
    b'{"id":"\\"\\\\\\/\\b\\f\\n\\r\\t"}', b"{'id':'it''s'}", b'{"id":"%p %s"}',
    # numbers
    b'{"id":[-0, -0.0, 0.5e-3, 1E2, 123456789012345678901234567890]}', b"0e5 ", b"-0e5 ", b"0.0e5 ",
    b'{"id":[9223372036854775807, 9223372036854775808, -9223372036854775808]}',
    b'{"id":[18446744073709551615, 18446744073709551616, -9223372036854775809]}',
    b'{"id":1.5e300}', b'{"id":1e400}', b'{"id":-1e400}', b'{"id":1e-400}',
    b'{"id":' + b"9" * 400 + b"}", b'{"id":1.7976931348623157e308}',
    # limits small enough to be quick for QEMU
    b"[" * 1024 + b"]" * 1024, b"[" * 1025 + b"]" * 1025,
    b'{"a":' * 512 + b"[" * 512 + b"]" * 512 + b"}" * 512,
    b"[" + b"a" * 1005 + b"]", b"[" + b"a" * 1006 + b"]", b"[" + b"a" * 2000 + b"]",
]


def test_cases_match_qemu(monitor: _Monitor) -> None:
    mismatches = []
    for data in CASES:
        expected = monitor.outcomes(data)
        sync = f"SYNC-{monitor.serial}"
        for chunk in (None, 1, 7):
            got = _our_outcomes(data, sync, chunk)
            if got != expected:
                mismatches.append((data[:80], chunk, expected[:6], got[:6]))
    assert not mismatches


_PIECES = [
    b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b"\r", b'"', b"'", b"\\", b"u", b"d800",
    b"DC00", b"00e9", b"0", b"1", b"9", b"-", b".", b"e", b"E", b"+", b"a", b"true", b"null", b"false",
    b"x", b"X", b"%", b"\x00", b"\x01", b"\x1f", b"\x7f", b"\xc3\xa9", b"\xc0\x80", b"\xff", b"\xfe",
    b"\xef\xbf\xbe", b"\xe2\x82", b'"id"', b'"a"', b"1e400", b"18446744073709551616", b'{"id":',
]


def test_random_inputs_match_qemu(monitor: _Monitor) -> None:
    rng = random.Random(20240607)
    mismatches = []
    for _ in range(400):
        data = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 30)))
        expected = monitor.outcomes(data)
        sync = f"SYNC-{monitor.serial}"
        got = _our_outcomes(data, sync, rng.choice([None, 1, 3]))
        if got != expected:
            mismatches.append((data, expected, got))
    assert not mismatches[:5]
