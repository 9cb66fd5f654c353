"""A start-up that fails after the monitors exist: their greeting comes first.

QEMU creates its monitors (qemu_create_late_backends) after -blockdev and -drive, and
before it creates the -device frontends, loads -loadvm and starts -incoming
(qmp_x_exit_preconfig). A monitor on stdio has then already written its greeting (QMP)
or banner and prompt (HMP) when one of those fails, and the error follows it on the
terminal. QEMU 10.0's iotest qcow2-internal-snapshots records it for ``-loadvm`` of a
missing snapshot. Each case runs against QEMU 7.2 with stdout and stderr on one pipe, as
the iotests read it, and compares the bytes (versions and program name normalized).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from server_support import QEMU, SERVER

#: The QMP greeting, compact or pretty-printed (its version differs between the two).
#: QEMU writes it from its monitor I/O thread, so on one pipe it may land anywhere in
#: the error line (even after the program name): it is taken out wherever it is.
_QMP_GREETING = re.compile(r'\{"QMP": [^\r\n]*\r\n|\{\r\n    "QMP": .*?\r\n\}\r\n', re.S)


def _normalized(output: bytes) -> tuple[str, int]:
    """The output without the QMP greetings (versions and program name normalized),
    and how many greetings there were."""
    text = output.decode()
    text = re.sub(r"QEMU \S+ monitor - ", "QEMU X.Y.Z monitor - ", text)
    text, greetings = _QMP_GREETING.subn("", text)
    return text.replace("qemu-system-x86_64: ", "qmp-server: "), greetings


def _run(argv: list[str], options: list[str], cwd: Path) -> tuple[int, bytes]:
    done = subprocess.run([*argv, *options], cwd=cwd, input=b"quit\n", stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=30, check=False)
    return done.returncode, done.stdout


IMAGE = ["-blockdev", "file,filename=t.qcow2,node-name=disk0-file",
         "-blockdev", "qcow2,file=disk0-file,node-name=disk0"]

CASES = {
    "hmp-loadvm": ["-monitor", "stdio", *IMAGE, "-loadvm", "snap1"],
    "qmp-loadvm": ["-qmp", "stdio", *IMAGE, "-loadvm", "snap1"],
    "qmp-device": ["-qmp", "stdio", "-device", "foo"],
    "hmp-device": ["-monitor", "stdio", "-device", "virtio-blk-pci,drive=nope"],
    "pretty-incoming": ["-qmp-pretty", "stdio", "-incoming", "foo:bar"],
    "hmp-incoming": ["-monitor", "stdio", "-incoming", "exec"],
    # before the monitors: no greeting
    "hmp-blockdev": ["-monitor", "stdio", "-blockdev", "file,filename=nope.qcow2,node-name=x"],
    "qmp-drive": ["-qmp", "stdio", "-drive", "file=nope.qcow2,if=none"],
}
BEFORE_THE_MONITORS = ("hmp-blockdev", "qmp-drive")


@pytest.mark.parametrize("name", CASES)
def test_failure_after_the_monitors_follows_their_greeting(tmp_path: Path, qemu_system: str,
                                                           qemu_utils: None, name: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), "64M"],
                   check=True)
    options = CASES[name]
    ours, qemu = _run(SERVER, options, tmp_path), _run(QEMU, options, tmp_path)
    (text, greetings), (qemu_text, qemu_greetings) = _normalized(ours[1]), _normalized(qemu[1])
    assert (ours[0], text) == (qemu[0], qemu_text)
    assert ours[0] == 1
    if name in BEFORE_THE_MONITORS:
        assert greetings == qemu_greetings == 0
    elif "qmp" in options[0]:
        # QEMU's greeting races with its exit: it may be missing. Ours is always
        # written, first and whole.
        assert qemu_greetings <= 1 and greetings == 1 and ours[1].startswith(b"{")
    else:
        assert greetings == qemu_greetings == 0
    if name == "hmp-loadvm":
        # what QEMU 10.0's qcow2-internal-snapshots.out records (after its filters)
        assert _normalized(ours[1])[0] == (
            "QEMU X.Y.Z monitor - type 'help' for more information\r\n"
            "(qemu) qmp-server: Snapshot 'snap1' does not exist in one or more devices\n")
