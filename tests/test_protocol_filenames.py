"""Protocol filenames and force-share on -drive, HMP drive_add and blockdev-add, against
live QEMU 7.2 (iotest 153's start-up case and its neighbours).

QEMU finds a filename's protocol driver (bdrv_find_protocol): ``null-co://`` is the
null-co driver (and nothing else with that prefix), ``file:PATH`` the file driver, a
``:`` before any ``/`` names a protocol (``Unknown protocol 'foo'`` when there is none).
``force-share=on`` on a writable node is refused before the file is opened or a format
probed. Each case runs QEMU and the server with the same command line over ``-qmp
stdio`` and compares exit status, standard error (after the program name) and
query-block.

Normalised, by design: query-block's ``active``/``children`` (QEMU 10.1 members we
report) and generated node names. The ``image`` member's ``dirty-flag`` is compared: QEMU
reports it only where the driver answers bdrv_get_info (not on null-co, nor on raw over
null-co).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qemu_tools

BASE = ["-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"]


def _run(program: list[str], args: list[str], commands: list[dict[str, Any]]) -> tuple[int, str, list[Any]]:
    """Exit status, stderr without the program name, and the replies to ``commands``."""
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    result = subprocess.run([*program, *BASE, *args], input=stdin, capture_output=True, text=True,
                            timeout=30)
    replies = []
    for line in result.stdout.splitlines():
        message = json.loads(line)
        if "return" in message or "error" in message:
            replies.append(message)
    stderr = re.sub(r"^(qemu-system-x86_64|qmp-server): ", "PROG: ", result.stderr, flags=re.M)
    return result.returncode, stderr, replies[1:-1]


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        out = {k: _normal(v) for k, v in value.items()
               if k not in ("active", "children")}
        if isinstance(out.get("node-name"), str) and out["node-name"].startswith("#block"):
            out["node-name"] = "#block"
        return out
    if isinstance(value, str):
        return re.sub(r"#block\d+", "#block", value)
    return value


def _both(args: list[str], commands: list[dict[str, Any]]) -> tuple[Any, Any]:
    qemu = qemu_tools.require("qemu-system-x86_64")
    theirs = _run([qemu], args, commands)
    ours = _run([sys.executable, "-m", "qmp_server"], args, commands)
    return _normal(ours), _normal(theirs)


@pytest.fixture
def image(tmp_path: Path, qemu_img: str) -> Path:
    path = tmp_path / "x.raw"
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(path), "1M"], check=True)
    return path


QUERY = [{"execute": "query-block"}]


@pytest.mark.parametrize("drive", [
    # iotest 153: refused before the null-co node is opened or a format probed.
    "if=none,file=null-co://,readonly=off,force-share=on",
    "if=none,file=null-co://,readonly=on,force-share=on",
    "if=none,file=null-co://",
    "if=none,file=null-co://,format=raw",
    "if=none,file=null-co://,format=null-co",
    "if=none,driver=null-co",
    "if=none,file=null-co://foo",
    "if=none,file=null-co:,format=raw",
    "if=none,file=IMG,format=null-co",
    "if=none,file=null-co://,format=qcow2",
    "if=none,file=null-co://,format=file",
    "if=none,file=file:IMG,format=raw",
    "if=none,file=file:IMG",
    "if=none,file=foo:bar",
    "if=none,file=foo:bar,format=raw,force-share=on",
    "if=none,file=./foo:bar",
    "if=none,file=IMG,force-share=on",
    "if=none,file=IMG,format=raw,force-share=on",
    "if=none,file=IMG,format=raw,readonly=on,force-share=on",
    "if=none,file=/nonexistent,force-share=on",
    "if=none,file=/nonexistent,format=qcow2,force-share=on",
    "if=none,driver=file",
])
def test_drive_filenames_as_qemu(image: Path, drive: str) -> None:
    ours, theirs = _both(["-drive", drive.replace("IMG", str(image))], QUERY)
    assert ours == theirs


def test_hmp_drive_add_with_protocol_filenames_as_qemu(image: Path) -> None:
    commands = [{"execute": "human-monitor-command", "arguments": {"command-line": line}} for line in (
        "drive_add 0 if=none,id=d0,file=null-co://,readonly=off,force-share=on",
        "drive_add 0 if=none,id=d0,file=null-co://nope",
        "drive_add 0 if=none,id=d0,file=foo:bar",
        "drive_add 0 if=none,id=d0,file=null-co://,format=raw",
        f"drive_add 0 if=none,id=d1,file=file:{image},readonly=on,force-share=on,format=raw",
        "drive_del d0",
    )]
    ours, theirs = _both([], [*commands, *QUERY])
    assert ours == theirs


@pytest.mark.parametrize("options", [
    {"driver": "null-co", "node-name": "n0", "force-share": True},
    {"driver": "null-co", "node-name": "n0", "force-share": True, "read-only": True},
    {"driver": "raw", "node-name": "n0", "force-share": True, "file": {"driver": "null-co"}},
    {"driver": "raw", "node-name": "n0", "force-share": True, "read-only": True,
     "file": {"driver": "null-co"}},
])
def test_blockdev_add_force_share_as_qemu(options: dict[str, Any]) -> None:
    commands = [{"execute": "blockdev-add", "arguments": options},
                {"execute": "query-named-block-nodes", "arguments": {"flat": True}}]
    ours, theirs = _both([], commands)
    (rc, err, (added, nodes)), (qrc, qerr, (qadded, qnodes)) = ours, theirs
    assert (rc, err, added) == (qrc, qerr, qadded)
    # query-named-block-nodes: compare the members both report.
    assert [(n["node-name"], n["ro"], n["drv"]) for n in nodes["return"]] == \
        [(n["node-name"], n["ro"], n["drv"]) for n in qnodes["return"]]


def test_short_form_booleans_warn_as_qemu(image: Path) -> None:
    # QemuOpts' get_opt_name_value: a bare NAME is NAME=on, noNAME is NAME=off, each
    # with a deprecation warning and a hint (on stderr under the option's location; in
    # the monitor's output for drive_add).
    commands = [{"execute": "human-monitor-command", "arguments": {"command-line": line}} for line in (
        f"drive_add 0 if=none,id=d9,file={image},format=raw,readonly",
        f"drive_add 0 if=none,id=d8,file={image},format=raw,noreadonly,force-share",
        f"drive_add 0 if=none,id=d7,file={image},format=raw,help",
    )]
    ours, theirs = _both(["-drive", f"if=none,file={image},format=raw,readonly"], [*commands, *QUERY])
    assert ours == theirs
    ours, theirs = _both(["-drive", f"if=none,file={image},format=raw,readonly,nodelay,force-share"], [])
    assert ours == theirs


@pytest.mark.parametrize("drive", [
    # A filename given as an option (file.filename) is the file driver's, unparsed.
    "if=none,format=raw,file.filename=null-co://",
    "if=none,file.filename=IMG",
    "if=none,file.filename=file:IMG,format=raw",
    # json: filenames: their options below those given directly; -drive's read-only and
    # format win.
    'if=none,file=json:{"file":{"driver":"file",,"filename":"QCOW"}}',
    'if=none,file=json:{"driver":"qcow2",,"file":{"driver":"file",,"filename":"QCOW"}},readonly=on',
    'if=none,file=json:{"driver":"qcow2",,"file.filename":"QCOW",,"read-only":true}',
    'if=none,file=json:{"driver":"raw",,"file":{"driver":"file",,"filename":"IMG"}},file.locking=off',
    'if=none,file=json:{"filename":"IMG"}',
    "if=none,file=json:[1]",
    'if=none,file=json:{"driver":"null-co"}',
    'if=none,file=json:{"driver":"raw",,"file.driver":"null-co"},readonly=on,force-share=on',
    'if=none,file=json:{"driver":"raw",,"file.driver":"null-co",,"force-share":true}',
])
def test_drive_option_filenames_and_json_as_qemu(image: Path, qemu_img: str, drive: str) -> None:
    qcow2 = image.with_suffix(".qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(qcow2), "1M"], check=True)
    ours, theirs = _both(["-drive", drive.replace("QCOW", str(qcow2)).replace("IMG", str(image))], QUERY)
    assert ours == theirs
