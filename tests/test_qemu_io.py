"""qemu-io emulation (qmp_server.hmp.qemu_io) against QEMU 7.2's qemu-io and HMP.

The comparisons run the same command lines through real qemu-io (standalone, and as HMP
``qemu-io`` inside qemu-system) and through our emulation, and compare the text with only
the timing numbers normalised.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blocklayer.errors import BlockError
from qmp_server.hmp.qemu_io import (
    Channel,
    HmpArgumentError,
    QemuIoOutput,
    dump_buffer,
    execute_qemu_io,
    format_report,
    run_qemu_io,
    split_hmp_qemu_io_args,
)
from qmp_server.hmp.sizes import SizeError, cvtnum, format_size, qemu_strtosz

MiB = 1 << 20

# glibc's getopt stops permuting options under POSIXLY_CORRECT; QEMU never runs that way.
_ENV = {key: value for key, value in os.environ.items() if key != "POSIXLY_CORRECT"}


class MemoryTarget:
    """A block node in a bytearray; records the calls the emulation makes."""

    def __init__(self, size: int = MiB, *, read_only: bool = False) -> None:
        self.data = bytearray(size)
        self.read_only = read_only
        self.calls: list[tuple[object, ...]] = []
        self.error: BlockError | None = None

    def _maybe_fail(self) -> None:
        if self.error is not None:
            raise self.error

    def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        self._maybe_fail()
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.calls.append(("write", offset, len(data)))
        self._maybe_fail()
        self.data[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self.calls.append(("write_zeroes", offset, length, may_unmap))
        self._maybe_fail()
        self.data[offset : offset + length] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        self._maybe_fail()
        # A raw file reads zeroes after a discard (hole punching).
        self.data[offset : offset + length] = bytes(length)

    def flush(self) -> None:
        self.calls.append(("flush",))
        self._maybe_fail()

    def getlength(self) -> int:
        return len(self.data)

    def require_write(self) -> None:
        self.calls.append(("require_write",))
        if self.read_only:
            raise BlockError("Block node is read-only")


class SizedTarget(MemoryTarget):
    """A huge node without data, for zero-length requests at large offsets."""

    def __init__(self, size: int) -> None:
        super().__init__(0)
        self.size = size

    def getlength(self) -> int:
        return self.size


def fixed_clock(*times: float) -> Callable[[], float]:
    """A clock returning ``times`` in turn."""
    values = iter(times)
    return lambda: next(values)


# ---------------------------------------------------------------------------------------
# Normalising the timing numbers

_RATE = re.compile(r"(?:\d+\.\d{6}|\d+) bytes|\d+(?:\.\d{3})? (?:KiB|MiB|GiB|TiB|PiB|EiB)")
_REPORT = re.compile(
    r"^(?P<head>.+, \d+ ops; )(?P<time>\d\d\.\d\d sec|\d+:\d\d:\d\d\.\d\d) "
    r"\((?P<rate>.+)/sec and \d+\.\d{4} ops/sec\)$"
)
_MACHINE = re.compile(r"^(?P<head>\d+,\d+),\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$")


def normalize(text: str) -> str:
    """Replace the timing values of report lines, after checking their shape."""
    lines = []
    for line in text.split("\n"):
        if match := _REPORT.match(line):
            assert _RATE.fullmatch(match["rate"]), line
            line = f"{match['head']}TIME (RATE/sec and OPS ops/sec)"
        elif match := _MACHINE.match(line):
            line = f"{match['head']},TIME,RATE,OPS"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Against standalone qemu-io


def _sequence(source: Path) -> list[str]:
    return [
        "write -P 0xab 0 64k",
        "read -P 0xab 0 64k",
        "read -P 0xcd 0 4k",
        "read -v 0 40",
        "read -v 65530 20",
        "write -P 0x41 100 10",
        "write -P 0x7a 110 3",
        "read -v 96 32",
        "length",
        "l",
        "flush",
        "f",
        "discard 0 4k",
        "read -P 0 0 4k",
        "read -P 0xab 4k 60k",
        "read 1M 1",
        "read 1048575 2",
        "read 1M 0",
        "read 1048577 0",
        "write 1M 1",
        "write -z 1M 1",
        "discard 1M 1",
        "x",
        "read",
        "read 0",
        "r",
        "flush 1",
        "length x",
        "read a 1",
        "read 0 1x",
        "read 0 1.5",
        "read 0 1.5k",
        "read 1.5k 1",
        "read 0 -1",
        "read -- 0 -1",
        "read -x 0 1",
        "read --foo 0 1",
        "read -a 0 1",
        "read -: 0 1",
        "read -P",
        "read 0 1 -P",
        "read -P 300 0 1",
        "read -P 08 0 1",
        "read -P x 0 1",
        "read -P -1 0 1",
        "read -P 0x 0 1",
        "read -P 0 -x 0 1",
        "read -x -P 0 0 1",
        "read -P x -x 0 1",
        "read -l 5 0 1",
        "read -s 0 0 1",
        "read -l x 0 1",
        "read -s x -l y 0 1",
        "read -P 0 -s 2 0 1",
        "read -P 0 -l 2 0 1",
        "read -P 0 -s 1 -l 1 0 1",
        "read -P 0xab -s 10 -l 20 4k 512",
        "read -P 0xab -s 10 -l 20 0 512",
        "read -P 0 -s 1 4k 1",
        "read -P 0xab -l 0 0 1",
        "read -q 0 1",
        "read -P 1 -q 0 1",
        "read -vq 0 1",
        "read -P0xab -v 4k 17",
        "read -C 0 1",
        "read -p 0 1",
        "read 0 512 -v",
        "read -v 0 512 -P 0",
        "read 0 2G",
        "read 0 3G",
        "read 0 2147483136",
        "read 8E 1",
        "read 9223372036854775807 1",
        "read 9223372036854775808 1",
        "read 0 1b",
        "read 0 1kB",
        'read 0 " 1"',
        "read 0 1 2",
        "read\t0 1",
        "read - 1",
        "read -",
        "read -b 1 512",
        "read -b 0 511",
        "read -b 0 512",
        "r 0 1",
        "w 0 1",
        "d 0 1",
        "read 010 1",
        "w 0x10 0x10",
        "read -P 0xcd 16 16",
        "write -u 0 1",
        "write -n 0 1",
        "write -u -n 0 1",
        "write -z -P 1 0 1",
        f"write -z -s {source} 0 1",
        f"write -P 1 -s {source} 0 1",
        "write -s /nonexistent/file 0 1",
        "write -s /dev/null 0 1",
        f"write -s {source} 0 0",
        f"write -s {source.parent} 0 1",
        f"write -s {source} 8k 100",
        "read -v 8k 100",
        f"write -s {source} 8k 3",
        "read -v 8k 8",
        "write -b -z 0 1",
        "write -f -b 0 1",
        "write -f -c 0 1",
        "write -b 1 512",
        "write -b 0 511",
        "write -b -c 0 1",
        "write -c 1 512",
        "write -c 0 512",
        "write -c 1M 512",
        "write -c -z 0 512",
        "write -b 0 512",
        "write -z 0 3G",
        "write 0 3G",
        "write -z -n 0 3G",
        "write -P 0x11 12k 8k",
        "write -z -u 12k 4k",
        "write -z -n 16k 1k",
        "write -z -n -u 19k 1k",
        "read -P 0 12k 8k",
        "write -f 0 512",
        "write -q 0 1",
        "write -C 0 512",
        "write -P 010 0 1",
        "read -P 8 0 1",
        "write -P 08 0 1",
        "write -u -P 08 0 1",
        "write -x -P 08 0 1",
        "write a 1",
        "write 0 a",
        "write -P 0x22 0 0",
        "discard -x 0 1",
        "discard 0 1 2",
        "discard 0",
        "discard 0 3G",
        "discard 0 2147483136",
        "discard 0 2147483137",
        "discard -q 24k 1",
        "discard -C 24k 512",
        "discard 0 0",
        "readv 0 512 512",
        "readv -P 1 0 512 1k",
        "readv -P 0xcd 16 8 8",
        "readv 0 3G",
        "readv 0 2G 2G",
        "readv 0 x",
        "readv 0",
        "readv 1M 1",
        "readv -v 0 7 9",
        "readv -q 0 1",
        "readv -C 0 1",
        "readv -x 0 1",
        "writev -P 0xa 40k 7 9",
        "read -v 40k 18",
        "writev 1M 1",
        "writev -q 0 1",
        "writev -C 0 1",
        "writev -f 32 1",
        "writev -z 0 1",
        "writev 0 x",
        "",
        "   ",
        "read  0   1",
        "sleep 0",
        "sleep 2",
        "sleep 0x2",
        "sleep 02",
        "sleep 99999999999999999999",
        "sleep abc",
        "sleep -5",
        "sleep 10x",
        "sleep 0x",
        "sleep 1e3",
        "sleep",
        "sleep 1 2",
        "length",
    ]


def _run_qemu_io(qemu_io: str, image: Path, command: str) -> tuple[str, str]:
    result = subprocess.run(
        [qemu_io, "-f", "raw", "-c", command, str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=_ENV,
    )
    return result.stdout, result.stderr


@pytest.mark.qemu
def test_command_outputs_match_qemu_io(qemu_io: str, tmp_path: Path) -> None:
    """Each command prints what qemu-io prints, and the data ends up the same."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    source = tmp_path / "pattern.txt"
    source.write_bytes(b"hello, world\n")
    target = MemoryTarget()
    for command in _sequence(source):
        stdout, stderr = _run_qemu_io(qemu_io, image, command)
        output = execute_qemu_io(target, command)
        assert (normalize(output.stdout), output.stderr) == (normalize(stdout), stderr), command
        assert output.monitor == "", command
    assert bytes(target.data) == image.read_bytes()


_SIZES = [
    "1", "1.", "1.k", "1.e", "1.5e", "1.5e3", "1.0005k", "0x10", "0x1e", "0x1E", "0X10", "0x1b",
    "0x", "0x.5", "-0", " 1", "1k", "1K", "1m", "1g", "1t", "1p", "1e", "3e", "4e", "5e", "8e",
    "16e", "1.99999999999999999999k", "00012", "0.5k", "0.0k", "0.0", "1.0", "1.00001k",
    "12.345M", "0.0000000001k", "1b", "1.5b", "18446744073709551615", "18446744073709551616",
    "99999999999999999999k", "+5", "++5", "1.25t", "0.000001t", "abc", "1kb", "0x7fffffff",
    "0x1ffffffffffffffff", "1.5.", "1..5k", "1.5kk", "\t7", "7\t", "0b1", "1x", "0.5", "0.50b",
    "1.0b", "1.00049k", "1.00048k", "1.0004883k", "0.00048828125k", "0.000244140625k",
    "3.9999999999999999e", "3.99999999999999e", "1.7976931348623157e308k", "1.k5", "0x0.k",
    ".5k", "1e2", "00x10", "+0x10", "-0x10", "4611686018427387904", "9223372036854775807",
    "0x10k", "0x1p", "0x1kx", "0x10000000000000e",
]  # fmt: skip


@pytest.mark.qemu
def test_size_arguments_match_qemu_io(qemu_io: str) -> None:
    """Offsets parse (and fail to parse) exactly as qemu-io's cvtnum, warnings included."""
    commands = [f"read -- {size} 0" for size in _SIZES]
    args = [qemu_io, "--image-opts"]
    for command in commands:
        args += ["-c", command]
    # null-co: a 4 EiB node without data, so that huge offsets are inside it.
    args.append("driver=null-co,size=4E")
    real = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False, env=_ENV)
    target = SizedTarget(4 << 60)
    outputs = [execute_qemu_io(target, command) for command in commands]
    assert normalize("".join(output.stdout for output in outputs)) == normalize(real.stdout)
    # Standalone qemu-io prefixes warnings with its name; HMP prints them to the monitor.
    warnings = "".join("qemu-io: " + line for output in outputs for line in output.monitor.splitlines(True))
    assert warnings == real.stderr
    assert target.calls == []


# ---------------------------------------------------------------------------------------
# Against HMP qemu-io in qemu-system


class _Qmp:
    """A minimal QMP client over a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        json.loads(self.file.readline())
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                break
        assert "error" not in reply, reply
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


_HMP_LINES = [
    'qemu-io rw "write -P 0x5a 0 4k"',
    'qemu-io rw "read -P 0x5a 0 4k"',
    'qemu-io rw "read -v 4090 10"',
    'qemu-io rw "read 0x1k 1"',
    'qemu-io rw "x"',
    'qemu-io rw "read"',
    'qemu-io rw "read -x 0 1"',
    'qemu-io rw "length"',
    'qemu-io rw "discard 0 1k"',
    'qemu-io rw "read 1M 1"',
    'qemu-io ro "write 0 512"',
    'qemu-io ro "write -u 0 1"',
    'qemu-io ro "discard 0 512"',
    'qemu-io ro "writev 0 1"',
    'qemu-io ro "w 0x1k 1"',
    'qemu-io ro "write"',
    'qemu-io ro "write -x"',
    'qemu-io ro "read -P 0 0 512"',
    'qemu-io ro "flush"',
    "qemu-io",
    "qemu-io rw",
    'qemu-io -x rw "read 0 1"',
    'qemu-io - rw "read 0 1"',
    "qemu-io -",
    'qemu-io rw "read 0 1" x',
    'qemu-io rw "read 0 1',
    'qemu-io rw "r\\x"',
    'qemu-io rw "abc\\',
    'qemu-io rw"length"',
    'qemu-io rw "read\\\\q 0 1"',
    'qemu-io rw "\\"quoted\\" \\n"',
    "qemu-io rw length",
    'qemu-io  "rw"   "l"   ',
    "qemu-io\trw\tl",
    'qemu-io nosuch "length"',
    'qemu-io "no such" length',
]


@pytest.mark.qemu
def test_hmp_outputs_match_qemu(qemu_system: str, tmp_path: Path) -> None:
    """HMP qemu-io: the monitor response, QEMU's stdout and stderr all match QEMU 7.2.

    "rw" is a writable raw node, "ro" a read-only one; our targets stand in for them.
    """
    for name in ("rw", "ro"):
        (tmp_path / f"{name}.raw").write_bytes(bytes(MiB))
    socket_path = tmp_path / "qmp.sock"
    process = subprocess.Popen(
        [qemu_system, "-M", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{socket_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV,
    )  # fmt: skip
    try:
        qmp = _Qmp(socket_path)
        for name in ("rw", "ro"):
            qmp.execute(
                "blockdev-add",
                driver="raw",
                # discard=unmap: the default (ignore) would keep discarded data.
                **{"node-name": name, "read-only": name == "ro", "discard": "unmap"},
                file={"driver": "file", "filename": str(tmp_path / f"{name}.raw")},
            )
        responses = [qmp.execute("human-monitor-command", **{"command-line": line}) for line in _HMP_LINES]
        qmp.execute("quit")
        qmp.close()
        real_stdout, real_stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    targets = {"rw": MemoryTarget(), "ro": MemoryTarget(read_only=True)}
    stdout: list[str] = []
    stderr: list[str] = []
    for line, response in zip(_HMP_LINES, responses, strict=True):
        expected = _emulate_hmp(line, targets, stdout, stderr)
        assert response == expected.replace("\n", "\r\n"), line
    assert normalize("".join(stdout)) == normalize(real_stdout)
    assert "".join(stderr) == real_stderr
    assert bytes(targets["rw"].data) == (tmp_path / "rw.raw").read_bytes()
    assert not any(call[0] in ("write", "write_zeroes", "discard") for call in targets["ro"].calls)


def _emulate_hmp(line: str, targets: dict[str, MemoryTarget], stdout: list[str], stderr: list[str]) -> str:
    """Our HMP response for ``line``; QEMU's stdout/stderr text goes to the lists."""
    try:
        _qdev, device, command = split_hmp_qemu_io_args(line[len("qemu-io") :])
    except HmpArgumentError as error:
        stdout.append(error.stdout)
        return error.monitor_text
    if device not in targets:
        # The node lookup is not this module's job; QEMU's error shows the parsed name.
        return f"Error: Cannot find device='' nor node-name='{device}'\n"
    output = execute_qemu_io(targets[device], command)
    stdout.append(output.stdout)
    stderr.append(output.stderr)
    return output.monitor


# ---------------------------------------------------------------------------------------
# Without QEMU


def test_report_format() -> None:
    """The statistics lines: sizes with cvtstr units, times, rates and the -C form."""
    assert format_report("read", 0, 65536, 65536, 0.5) == (
        "read 65536/65536 bytes at offset 0\n64 KiB, 1 ops; 00.50 sec (128 KiB/sec and 2.0000 ops/sec)\n"
    )
    assert format_report("wrote", 512, 1536, 1536, 0.001) == (
        "wrote 1536/1536 bytes at offset 512\n"
        "1.500 KiB, 1 ops; 00.00 sec (1.465 MiB/sec and 1000.0000 ops/sec)\n"
    )
    # cvtstr cuts at the first ".000", even in "0.000273".
    assert format_report("discard", 0, 1, 1, 3661.25).endswith(
        "1 bytes, 1 ops; 1:01:01.25 (0 bytes/sec and 0.0003 ops/sec)\n"
    )
    assert format_report("read", 0, 512, 512, 0.25, machine=True) == "512,1,0:00:00.25,2048.000,4.000\n"
    assert format_report("read", 0, 0, 0, 0.0) == (
        "read 0/0 bytes at offset 0\n0 bytes, 1 ops; 00.00 sec (-nan bytes/sec and inf ops/sec)\n"
    )


def test_format_size() -> None:
    """qemu-io's cvtstr: three decimals in binary units unless they are .000."""
    assert [format_size(value) for value in (0, 512, 1024, 1536, 1126, 2147483136, MiB, 4 << 60)] == [
        "0 bytes", "512 bytes", "1 KiB", "1.500 KiB", "1.100 KiB", "2 GiB", "1 MiB", "4 EiB",
    ]  # fmt: skip
    assert format_size(838.633497) == "838.633497 bytes"
    assert format_size(1000.0004) == "1000 bytes"


def test_clock_times_only_the_request() -> None:
    """The injected clock is read around the I/O request."""
    target = MemoryTarget()
    output = run_qemu_io(target, "write -P 1 0 1k", clock=fixed_clock(10.0, 10.25))
    assert (
        output
        == "wrote 1024/1024 bytes at offset 0\n1 KiB, 1 ops; 00.25 sec (4 KiB/sec and 4.0000 ops/sec)\n"
    )


def test_data_reaches_the_target(tmp_path: Path) -> None:
    """Writes, zero writes, discards and pattern files end up in the target as such."""
    target = MemoryTarget()
    run_qemu_io(target, "write -P 0x11 0 8k")
    run_qemu_io(target, "write -z -u 1k 1k")
    run_qemu_io(target, "write -z 3k 1k")
    run_qemu_io(target, "discard 6k 512")
    run_qemu_io(target, "writev -P 0x22 8k 1k 2")
    source = tmp_path / "source"
    source.write_bytes(b"abc")
    run_qemu_io(target, f"write -s {source} 9000 7")
    expected = bytearray(b"\x11" * 8192 + bytes(MiB - 8192))
    expected[1024:2048] = bytes(1024)
    expected[3072:4096] = bytes(1024)
    expected[6144:6656] = bytes(512)
    expected[8192:9218] = b"\x22" * 1026
    expected[9000:9007] = b"abcabca"
    assert target.data == expected
    assert ("write_zeroes", 1024, 1024, True) in target.calls
    assert ("write_zeroes", 3072, 1024, False) in target.calls
    assert ("discard", 6144, 512) in target.calls
    assert "Pattern verification failed" not in run_qemu_io(target, "read -P 0x11 4k 2k")


def test_requests_beyond_the_end_fail_without_reaching_the_target() -> None:
    """QEMU's BlockBackend rejects them with EIO; zero-length requests are not passed on."""
    target = MemoryTarget()
    assert run_qemu_io(target, "read 1M 1") == "read failed: Input/output error\n"
    assert run_qemu_io(target, "write 1023k 2k") == "write failed: Input/output error\n"
    assert run_qemu_io(target, "discard 2M 0") == "discard failed: Input/output error\n"
    assert run_qemu_io(target, "read 1M 0").startswith("read 0/0 bytes at offset 1048576\n")
    assert [call for call in target.calls if call[0] != "require_write"] == []


def test_io_errors() -> None:
    """errno gives strerror; an error without errno prints its message."""
    target = MemoryTarget()
    target.error = BlockError("Permission denied by policy", errno.EPERM)
    assert run_qemu_io(target, "write 0 512") == "write failed: Operation not permitted\n"
    assert run_qemu_io(target, "read 0 512") == "read failed: Operation not permitted\n"
    assert run_qemu_io(target, "writev 0 512") == "writev failed: Operation not permitted\n"
    assert run_qemu_io(target, "readv 0 512") == "readv failed: Operation not permitted\n"
    target.error = BlockError("Node is inactive")
    assert run_qemu_io(target, "discard 0 512") == "discard failed: Node is inactive\n"
    assert run_qemu_io(target, "write -z 0 512") == "write failed: Node is inactive\n"
    # qemu-io ignores the result of flush.
    assert run_qemu_io(target, "flush") == ""


def test_length_error() -> None:
    """A failing getlength prints qemu-io's "getlength:" line."""

    class NoMedium(MemoryTarget):
        def getlength(self) -> int:
            raise BlockError("No medium", errno.ENOMEDIUM)

    target = NoMedium()
    assert run_qemu_io(target, "length") == "getlength: No medium found\n"
    assert run_qemu_io(target, "read 0 1") == "read failed: No medium found\n"


def test_permission_is_taken_before_options_are_parsed() -> None:
    """QEMU takes the write permission after the argument count check, before the options."""
    target = MemoryTarget(read_only=True)
    for command in ("write 0 512", "write -u 0 1", "w 0x1k 1", "writev 0 1", "discard -x 0 1"):
        output = execute_qemu_io(target, command)
        assert output.chunks and output.monitor == "Block node is read-only\n", command
        assert output.stdout == output.stderr == "", command
    assert (
        execute_qemu_io(target, "write").stderr
        == "bad argument count 0 to write, expected at least 2 arguments\n"
    )
    target.calls.clear()
    assert run_qemu_io(target, "read -P 0 0 512").startswith("read 512/512 bytes at offset 0\n")
    run_qemu_io(target, "flush")
    run_qemu_io(target, "length")
    assert ("require_write",) not in target.calls
    assert not any(call[0] in ("write", "write_zeroes", "discard") for call in target.calls)


def test_output_channels() -> None:
    """stdout, stderr and monitor text are kept apart; ``text`` joins them in order."""
    target = MemoryTarget()
    output = execute_qemu_io(target, "read -x 0 1")
    assert output.stderr == "read: invalid option -- 'x'\n"
    assert output.stdout.startswith("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- ")
    assert output.text == output.stderr + output.stdout
    output = execute_qemu_io(target, "read 0x1k 1")
    assert output.monitor == "warning: Using a multiplier suffix on hex numbers is deprecated: 0x1k\n"
    assert output.stdout.startswith("read 1/1 bytes at offset 1024\n")
    assert execute_qemu_io(target, "bogus 1 2") == QemuIoOutput(
        ((Channel.STDERR, 'command "bogus" not found\n'),)
    )
    assert execute_qemu_io(target, "") == QemuIoOutput()


def test_dump_buffer() -> None:
    """Only ASCII letters and digits are shown as text."""
    assert dump_buffer(b"Az09 .\xe9\x00" + bytes(range(0x41, 0x52)), 0x1234) == (
        "00001234:  41 7a 30 39 20 2e e9 00 41 42 43 44 45 46 47 48  Az09....ABCDEFGH\n"
        "00001244:  49 4a 4b 4c 4d 4e 4f 50 51  IJKLMNOPQ\n"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1), ("1.", 1), ("1.k", 1024), ("1.e", 1 << 60), ("1.5e", 3 << 59), ("1.0005k", 1025),
        ("0x10", 16), ("0x1e", 30), (" 1", 1), ("+5", 5), ("00012", 12), ("12.345M", 12944671),
        ("1.99999999999999999999k", 1024), ("0.00048828125k", 1), ("0.000244140625k", 0),
        ("3.9999999999999999e", 4611686018427387776), ("0.000001t", 1099512), ("8e", 1 << 63),
    ],
)  # fmt: skip
def test_qemu_strtosz_values(text: str, value: int) -> None:
    """Values qemu-io 7.2 was seen to accept (rounding half up, fractions need a suffix)."""
    assert qemu_strtosz(text) == value


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("1.5", errno.EINVAL), ("1.5b", errno.EINVAL), ("1.5e3", errno.EINVAL), ("-0", errno.EINVAL),
        (".5k", errno.EINVAL), ("0x", errno.EINVAL), ("0x1.k", errno.EINVAL), ("7\t", errno.EINVAL),
        ("1kb", errno.EINVAL), ("", errno.EINVAL), ("99999999999999999999k", errno.EINVAL),
        ("18446744073709551616", errno.ERANGE), ("16e", errno.ERANGE),
    ],
)  # fmt: skip
def test_qemu_strtosz_errors(text: str, code: int) -> None:
    """Inputs qemu-io 7.2 rejects, with its error code."""
    with pytest.raises(SizeError) as caught:
        qemu_strtosz(text)
    assert caught.value.errno == code


def test_cvtnum_limits_to_int64_and_warns_for_hex_suffixes() -> None:
    """8e fits qemu_strtosz but not qemu-io's int64_t; "0x1k" works with a warning."""
    with pytest.raises(SizeError) as caught:
        cvtnum("8e")
    assert caught.value.errno == errno.ERANGE
    warnings: list[str] = []
    assert cvtnum("0x1k", warnings.append) == 1024
    assert warnings == ["Using a multiplier suffix on hex numbers is deprecated: 0x1k"]


@pytest.mark.parametrize(
    ("args", "parsed"),
    [
        (' rw "read 0 1"', (False, "rw", "read 0 1")),
        (" -d dev0 length", (True, "dev0", "length")),
        (' -ddev0 "l"', (True, "dev0", "l")),
        ('\t"my node"\t"write -P 1 0 1"  ', (False, "my node", "write -P 1 0 1")),
        (' rw "a\\"b\\\\c\\n\\r\\\'"', (False, "rw", "a\"b\\c\n\r'")),
        (' "rw"length', (False, "rw", "length")),
        (' rw ""', (False, "rw", "")),
        (" rw x\0 garbage", (False, "rw", "x")),
        (" rw " + "x" * 2000, (False, "rw", "x" * 1023)),
    ],
)
def test_split_hmp_arguments(args: str, parsed: tuple[bool, str, str]) -> None:
    """HMP's parsing of ``[-d] device "command"``: quotes, escapes, 1023-byte limit."""
    assert split_hmp_qemu_io_args(args) == parsed


@pytest.mark.parametrize(
    ("args", "message", "stdout"),
    [
        ("", "qemu-io: block device name expected", ""),
        (" rw", "qemu-io: string expected", ""),
        (' rw "read', "qemu-io: string expected", "unterminated string\n"),
        (' rw "a\\t"', "qemu-io: string expected", "unsupported escape code: '\\t'\n"),
        (' "r\\w" x', "qemu-io: block device name expected", "unsupported escape code: '\\w'\n"),
        (' rw "x" y', "qemu-io: extraneous characters at the end of line", ""),
        (' -x rw "x"', "qemu-io: unsupported option -x", ""),
        (" -", "qemu-io: unsupported option -", ""),
    ],
)
def test_split_hmp_argument_errors(args: str, message: str, stdout: str) -> None:
    """Malformed arguments raise ValueError with QEMU's monitor message."""
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        split_hmp_qemu_io_args(args)
    error = caught.value
    assert isinstance(error, HmpArgumentError)
    assert str(error) == message
    assert error.stdout == stdout
    newline = "" if message.endswith("-") else "\n"
    assert error.monitor_text == message + newline + 'Try "help qemu-io" for more information\n'
