"""The QEMU launch contract: how management tools and test harnesses start the server.

libvirt binds the monitor socket itself and passes the listening descriptor
(``-chardev socket,id=charmonitor,fd=N,server=on,wait=off -mon chardev=charmonitor,...``);
QEMU's Python harness listens and lets QEMU connect (``path=`` without ``server=on``),
or passes one end of a socketpair; both run help queries first. Every case is run against
QEMU too, in the same test, and what a user sees must be the same.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import qemu_tools
from server_support import QEMU, SERVER, Client

#: The program name starts QEMU's error lines; compared without it.
_PROGRAM = re.compile(r"^(qemu-system-x86_64|qmp-server): ", re.M)


@pytest.fixture
def qemu() -> list[str]:
    """QEMU's program alone (skips or fails without it, see qemu_tools)."""
    return [qemu_tools.require("qemu-system-x86_64")]


def run(argv: list[str], *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run to completion (help queries and start-up errors end at once)."""
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=30, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_machine_help_lists_our_machines_as_qemu_does(qemu: list[str]) -> None:
    ours, theirs = run(SERVER, "-machine", "help"), run(qemu, "-machine", "help")
    assert ours.returncode == theirs.returncode == 0
    lines = ours.stdout.splitlines()
    assert lines[0] == "Supported machines are:"
    names = [line.split()[0] for line in lines[1:]]
    assert {"pc", "q35", "pc-i440fx-10.1", "pc-q35-10.1", "none"} <= set(names)
    # The types both releases have are listed alike, but for the flags each release sets
    # (default, deprecated) and the aliases (each names its release's newest types);
    # tests/test_machine_commands.py checks the whole list against QEMU 10.1's.
    flags = re.compile(r"( \(default\)| \(deprecated\))+$")
    qemu_lines = {line.split()[0]: flags.sub("", line) for line in theirs.stdout.splitlines()[1:]}
    shared = [name for name in names if name in qemu_lines and name not in ("pc", "q35")]
    assert "pc-i440fx-7.2" in shared and "none" in shared
    for line in lines[1:]:
        if line.split()[0] in shared:
            assert flags.sub("", line) == qemu_lines[line.split()[0]]
    # QEMU's order for the types we share.
    assert [name for name in qemu_lines if name in shared] == shared


def test_device_help_lists_the_disk_devices_we_model(qemu: list[str]) -> None:
    ours, theirs = run(SERVER, "-M", "none", "-device", "help"), run(qemu, "-M", "none", "-device", "help")
    assert ours.returncode == theirs.returncode == 0
    def sections(text: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.endswith(":"):
                found[line] = section = []
            elif line:
                section.append(line)
        return found

    mine, qemus = sections(ours.stdout), sections(theirs.stdout)
    assert list(mine) == ["Controller/Bridge/Hub devices:", "Storage devices:"]
    # Each device under QEMU's heading for it, and the headings in QEMU's order.
    assert [h for h in qemus if h in mine] == list(mine)
    for heading, lines in mine.items():
        assert set(lines) <= set(qemus[heading]), heading
    # QEMUMachine-based tests skip themselves unless virtio-blk is listed.
    assert '"virtio-blk-pci"' in ours.stdout


def test_drive_format_help(qemu: list[str]) -> None:
    ours, theirs = run(SERVER, "-drive", "format=help"), run(qemu, "-drive", "format=help")
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout.startswith("Supported formats: ")
    qemu_formats = set(theirs.stdout.splitlines()[0].split(": ")[1].split())
    assert set(ours.stdout.split(": ")[1].split()) <= qemu_formats


@pytest.mark.parametrize("args", [
    ["-bogus"],
    ["-uuid", "bad"],
    ["-machine", "bogus"],
    ["-accel", "foo"],
    ["-chardev", "foo,id=x"],
    ["-chardev", "socket,path=/nonexistent/a"],
    ["-chardev", "socket,id=m"],
    ["-chardev", "socket,id=m,fd=99", "-mon", "chardev=m,mode=control"],
    ["-chardev", "socket,id=m,path=/nonexistent/x", "-mon", "chardev=m,mode=control"],
    ["-chardev", "null,id=m", "-chardev", "null,id=m"],
    ["-mon", "chardev=nope,mode=control"],
    ["-mon", "chardev=m,mode=bogus", "-chardev", "null,id=m"],
    ["-monitor", "bogus:1"],
    ["-m", "abc"],
    # -set: QEMU's parse, group and id errors; a -set device on an earlier -device only.
    ["-set", "device.x.y=z"],
    ["-set", "devicexy"],
    ["-set", "device.x.y"],
    ["-set", "bogus.x.y=1"],
    ["-set", "object.x.y=1"],
    ["-set", "device.v.drive=d", "-M", "pc", "-device", "virtio-blk-pci,id=v"],
    ["-M", "pc", "-device", "virtio-blk-pci,id=v", "-set", "device.v.drive=nosuch"],
    ["-M", "pc", "-device", '{"driver":"virtio-blk-pci","id":"v"}', "-set", "device.v.drive=d"],
    ["-M", "pc", "-device", "virtio-blk-pci,id=v", "-set", "device.v.bogus=1,2"],
    ["-drive", "if=none,id=d,file=/nonexistent", "-set", "drive.d.file=/nonexistent,,x"],
], ids=lambda args: " ".join(args))
def test_startup_errors_in_qemus_format(qemu: list[str], args: list[str]) -> None:
    ours, theirs = run(SERVER, *args), run(qemu, "-nodefaults", "-display", "none", *args)
    assert ours.returncode == theirs.returncode == 1
    # QEMU may print further lines (a parse error's echo); ours are the first of them.
    ours_lines = _PROGRAM.sub("", ours.stderr).splitlines()
    assert ours_lines == _PROGRAM.sub("", theirs.stderr).splitlines()[:len(ours_lines)]
    assert ours_lines and "Traceback" not in ours.stderr


def _qmp(sock: socket.socket) -> Iterator[dict[str, object]]:
    """The greeting and the replies (events skipped)."""
    for line in sock.makefile("rb"):
        message = json.loads(line)
        if "event" not in message:
            yield message


def _greeting_and_status(sock: socket.socket) -> list[object]:
    sock.settimeout(20)
    messages = _qmp(sock)
    greeting = next(messages)
    sock.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-status"}')
    seen = [sorted(greeting["QMP"]), next(messages), next(messages)]  # type: ignore[call-overload]
    sock.sendall(b'{"execute":"quit"}')
    seen.append(next(messages))
    return seen


def _start(argv: list[str], *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*argv, "-display", "none", *args], pass_fds=pass_fds,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("program", ["ours", "qemu"])
def test_inherited_listening_socket_as_libvirt_passes_it(program: str, tmp_path: Path) -> None:
    argv = SERVER if program == "ours" else QEMU
    if program == "qemu":
        qemu_tools.require("qemu-system-x86_64")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "mon.sock"))
    listener.listen(1)
    fd = listener.fileno()
    proc = _start(argv, "-S", "-chardev", f"socket,id=charmonitor,fd={fd},server=on,wait=off",
                  "-mon", "chardev=charmonitor,id=monitor,mode=control", pass_fds=(fd,))
    listener.close()
    try:
        # libvirt connects once, with no retry: the socket must be listening already.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(tmp_path / "mon.sock"))
        assert _greeting_and_status(client) == [
            ["capabilities", "version"], {"return": {}},
            {"return": {"status": "prelaunch", "running": False}} if program == "ours" else
            {"return": {"status": "prelaunch", "singlestep": False, "running": False}},
            {"return": {}}]
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("program", ["ours", "qemu"])
def test_socketpair_as_qemus_python_harness_passes_it(program: str) -> None:
    argv = SERVER if program == "ours" else QEMU
    if program == "qemu":
        qemu_tools.require("qemu-system-x86_64")
    mine, theirs = socket.socketpair()
    proc = _start(argv, "-chardev", f"socket,id=mon,fd={theirs.fileno()}", "-mon", "chardev=mon,mode=control",
                  pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        seen = _greeting_and_status(mine)
        assert seen[:2] == [["capabilities", "version"], {"return": {}}]
        assert seen[3] == {"return": {}}
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("program", ["ours", "qemu"])
def test_connects_out_to_a_path_without_server_on(program: str, tmp_path: Path) -> None:
    argv = SERVER if program == "ours" else QEMU
    if program == "qemu":
        qemu_tools.require("qemu-system-x86_64")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "harness.sock"))
    listener.listen(1)
    listener.settimeout(20)
    proc = _start(argv, "-chardev", f"socket,id=mon,path={tmp_path / 'harness.sock'}",
                  "-mon", "chardev=mon,mode=control")
    try:
        client, _ = listener.accept()
        seen = _greeting_and_status(client)
        assert seen[1] == {"return": {}} and seen[3] == {"return": {}}
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
        listener.close()


def _normalize_hmp(data: bytes) -> bytes:
    return re.sub(rb"QEMU \d+\.\d+\.\d+ monitor", b"QEMU X.Y.Z monitor", data)


def test_hmp_on_stdio_writes_what_qemu_writes(qemu: list[str]) -> None:
    commands = b"info name\nbogus\nquit\n"
    outputs = []
    for argv in (SERVER, qemu):
        proc = subprocess.run([*argv, "-display", "none", "-name", "vm0", "-monitor", "stdio"],
                              input=commands, capture_output=True, timeout=30)
        outputs.append(_normalize_hmp(proc.stdout))
    ours, theirs = outputs
    # Every byte: banner, prompts, echo, each command's output, and no prompt after quit.
    assert ours == theirs


def test_qmp_on_stdio(tmp_path: Path) -> None:
    proc = subprocess.run([*SERVER, "-qmp", "stdio"], input=b'{"execute":"qmp_capabilities"}\n'
                          b'{"execute":"quit"}\n', capture_output=True, timeout=30)
    lines = [message for message in map(json.loads, proc.stdout.splitlines()) if "event" not in message]
    assert sorted(lines[0]["QMP"]) == ["capabilities", "version"]
    assert lines[1:3] == [{"return": {}}, {"return": {}}]
    assert proc.returncode == 0


def test_qtest_channel_is_connected_and_answers(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "qtest.sock"))
    listener.listen(1)
    listener.settimeout(20)
    sock = tmp_path / "qmp.sock"
    proc = _start(SERVER, "-accel", "qtest", "-qtest", f"unix:path={tmp_path / 'qtest.sock'}",
                  "-qmp", f"unix:{sock},server=on,wait=off")
    try:
        channel, _ = listener.accept()
        channel.settimeout(20)
        channel.sendall(b"bogus 1 2\n")
        assert channel.recv(100) == b"FAIL Unknown command 'bogus'\n"
    finally:
        proc.kill()
        proc.wait()


def _qtest_session(tmp_path: Path, program: list[str], accel: str, lines: list[bytes],
                   monitor: list[str] | None = None) -> tuple[list[bytes], list[str]]:
    """Start ``program`` with a qtest channel; send ``lines`` one by one, then HMP
    ``monitor`` commands; the replies."""
    folder = Path(tempfile.mkdtemp(prefix="qt", dir="/tmp"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / "qtest.sock"))
    listener.listen(1)
    listener.settimeout(20)
    sock = folder / "qmp.sock"
    disk = tmp_path / f"{accel}-{Path(program[0]).name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    proc = _start(program, "-machine", "none", "-accel", accel, "-qtest",
                  f"unix:path={folder / 'qtest.sock'}", "-qmp", f"unix:{sock},server=on,wait=off",
                  "-drive", f"file={disk},format=qcow2,if=none,id=d0")
    replies: list[bytes] = []
    texts: list[str] = []
    try:
        channel, _ = listener.accept()
        channel.settimeout(20)
        reader = channel.makefile("rb")
        for line in lines:
            channel.sendall(line + b"\n")
            replies.append(reader.readline())
        if monitor:
            client = Client(str(sock))
            client.execute("qmp_capabilities")
            texts = [client.hmp(command) for command in monitor]
            client.close()
    finally:
        proc.kill()
        proc.wait()
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    return replies, texts


def test_qtest_clock_and_endianness(tmp_path: Path) -> None:
    """With -accel qtest the virtual clock moves only by qtest's clock_step/clock_set
    (forward only; no timers, so a bare clock_step stays), and a snapshot records it
    (QEMU 7.2's qtest_process_command; Debian's QEMU lacks the qtest accelerator, so not
    compared live)."""
    replies, texts = _qtest_session(
        tmp_path, SERVER, "qtest",
        [b"endianness", b"clock_step 1000", b"clock_step", b"clock_set 500", b"clock_set 0x1000000",
         b"clock_step 010", b"readb 0x0"],
        ["savevm a", "info snapshots"])
    assert replies == [b"OK little\n", b"OK 1000\n", b"OK 1000\n", b"OK 1000\n", b"OK 16777216\n",
                       b"OK 16777224\n", b"FAIL Unknown command 'readb'\n"]
    assert " 00:00:00.016 " in texts[1]


def test_qtest_without_the_qtest_accelerator_as_qemu(tmp_path: Path) -> None:
    """Under tcg the clock commands are unknown, endianness answers (compared live)."""
    lines = [b"endianness", b"clock_step 1000", b"clock_set 5"]
    ours, _ = _qtest_session(tmp_path, SERVER, "tcg", lines)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    theirs, _ = _qtest_session(tmp_path, [qemu, "-nodefaults", "-display", "none"], "tcg", lines)
    assert ours == theirs == [b"OK little\n", b"FAIL Unknown command 'clock_step'\n",
                              b"FAIL Unknown command 'clock_set'\n"]


HARNESS = os.environ.get("QMP_SERVER_QEMU_PYTHON")


@pytest.mark.skipif(not HARNESS and os.environ.get("QMP_SERVER_REQUIRE_QEMU") != "1",
                    reason="QEMU's python/ (apt-get source qemu) not given in QMP_SERVER_QEMU_PYTHON")
def test_qemu_machine_launches_and_shuts_down() -> None:
    assert HARNESS, "QMP_SERVER_QEMU_PYTHON must name QEMU's python/ directory"
    # The harness runs BINARY followed by its own options: a program of ours, no wrapper.
    launcher = Path(sys.executable).parent / "qmp-server"
    # Its socket paths live in base_temp_dir: short enough for AF_UNIX.
    base = tempfile.mkdtemp(prefix="qm", dir="/tmp")
    script = f"""
import sys
sys.path.insert(0, {HARNESS!r})
from qemu.machine import QEMUMachine
vm = QEMUMachine({str(launcher)!r}, base_temp_dir={base!r})
vm.launch()
print(vm.qmp("query-status"))
vm.shutdown()
print("exit", vm.exitcode())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "'status': 'running'" in done.stdout
    assert done.stdout.rstrip().endswith("exit 0")


def test_block_layer_warnings_in_qemus_format(tmp_path: Path) -> None:
    # warn_report's "<program>: warning: <text>": here the warnings of a qcow2 image whose
    # bitmaps a program without bitmap support left stale (autoclear bit cleared).
    qemu = qemu_tools.require("qemu-system-x86_64")
    stderr = {}
    for name, argv in (("ours", SERVER), ("qemu", [qemu, "-nodefaults", "-display", "none"])):
        image = tmp_path / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
        with open(image, "r+b") as f:
            f.seek(88)  # autoclear_features
            f.write(bytes(8))
        run_args = [*argv, "-S", "-blockdev",
                    f"driver=qcow2,node-name=d,file.driver=file,file.filename={image}",
                    "-qmp", "stdio"]
        done = subprocess.run(run_args, input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                              capture_output=True, timeout=30)
        stderr[name] = _PROGRAM.sub("PROG: ", done.stderr.decode()).replace(str(image), "IMG")
    assert stderr["ours"] == stderr["qemu"]
    assert stderr["ours"].startswith("PROG: -blockdev driver=qcow2,node-name=d,file.driver=file,"
                                     "file.filename=IMG: warning: a program lacking bitmap")
