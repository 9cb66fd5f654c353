"""The qtest channel's log on stderr, against QEMU 7.2.

Without ``-qtest-log`` QEMU logs the qtest traffic on stderr: ``[I T] OPENED``, then
``[R +T] COMMAND`` and ``[S +T] REPLY`` per exchange, ``[I +T] CLOSED`` when the harness
hangs up. QEMU's iotests read the emulator's output with it (``iotests.filter_qtest``
and the older tests' own ``re.sub`` drop the OPENED and CLOSED lines; QEMU 10.0's
inactive-node-nbd prints what is left). Compared live with the times normalized.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import qemu_tools
from server_support import QEMU, SERVER


def _log(program: list[str]) -> str:
    """Start ``program`` with a qtest channel as QEMU 7.2's harness opens it, exchange a
    few lines, hang up, quit over QMP on stdio; its stderr, times normalized."""
    folder = Path(tempfile.mkdtemp(prefix="qtl", dir="/tmp"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(folder / "qtest.sock"))
        listener.listen(1)
        listener.settimeout(20)
        proc = subprocess.Popen([*program, "-qtest", f"unix:path={folder / 'qtest.sock'}", "-qmp", "stdio"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        channel, _ = listener.accept()
        channel.settimeout(20)
        reader = channel.makefile("rb")
        for line in (b"endianness", b"bogus  1 2"):
            channel.sendall(line + b"\n")
            reader.readline()
        reader.close()
        channel.close()
        time.sleep(0.5)  # the hang-up is seen before quit
        _, err = proc.communicate(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', timeout=20)
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    return re.sub(r"\[(I|R|S) (\+?)\d+\.\d{6}\]", r"[\1 \2T]", err.decode())


def test_qtest_traffic_is_logged_on_stderr_as_qemu_does() -> None:
    qemu_tools.require("qemu-system-x86_64")
    ours, theirs = _log(SERVER), _log(QEMU)
    expected = ("[I T] OPENED\n[R +T] endianness\n[S +T] OK little\n"
                "[R +T] bogus  1 2\n[S +T] FAIL Unknown command 'bogus'\n[I +T] CLOSED\n")
    assert ours == expected
    # QEMU 7.2 reports the hang-up twice, the second time with a GLib assertion about
    # its timer (gone by QEMU 10.0: inactive-node-nbd's log is only OPENED and CLOSED).
    assert theirs.startswith(expected)
    assert theirs[len(expected):] in (
        "", "qemu-system-x86_64: GLib: g_timer_elapsed: assertion 'timer != NULL' failed\n[I +T] CLOSED\n")
