"""A -drive's ``backing.*`` options, against live QEMU 7.2.

QEMU's bdrv_open_backing_file takes a -drive's ``backing.node-name=``, ``backing.file.
filename=``, ``backing.driver=`` (any option under ``backing.``) as options for the backing
file the image names itself: the header's file and format, with these over them
(iotests 030, 040 and 130 start their VMs so). Each test runs QEMU and the server on their
own copies of the same images and compares what a user sees: query-named-block-nodes
(node names, file names, read-only), data read through the drive, start-up errors, and
the image header afterwards (``qemu-img info``).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import PC, Client, both


def _image(qemu_img: str, path: Path, *options: str, size: str = "1M") -> None:
    subprocess.run([qemu_img, "create", "-q", *options, str(path), size], check=True)


@pytest.fixture
def chains(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    """In ``qemu/`` and ``ours/`` alike: base.raw <- mid.qcow2 <- top.qcow2 (relative
    backing names), lone.qcow2 without a backing file, other.qcow2 with data (0x5a), and
    orig.qcow2 naming a raw backing file (orig.raw)."""
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        _image(qemu_img, folder / "base.raw", "-f", "raw")
        _image(qemu_img, folder / "mid.qcow2", "-f", "qcow2", "-b", "base.raw", "-F", "raw")
        _image(qemu_img, folder / "top.qcow2", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2")
        _image(qemu_img, folder / "lone.qcow2", "-f", "qcow2")
        _image(qemu_img, folder / "other.qcow2", "-f", "qcow2")
        subprocess.run([qemu_io, "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(folder / "other.qcow2")],
                       check=True, capture_output=True)
        _image(qemu_img, folder / "orig.raw", "-f", "raw")
        _image(qemu_img, folder / "orig.qcow2", "-f", "qcow2", "-b", "orig.raw", "-F", "raw")


def _normal(value: Any) -> Any:
    """Folders and generated node names (``#blockNNN``, random in both) taken out, and
    query-block's QEMU 10.1 members (``active``, ``children``: the version we report)."""
    if isinstance(value, str):
        return re.sub(r"#block\d+", "#block", re.sub(r"[^\s\"']*/(qemu|ours)/", "/DIR/", value))
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in ("active", "children")}
    return value


def _nodes(client: Client) -> list[tuple[Any, ...]]:
    """(node-name, drv, file, ro, backing_file) of every node, newest first."""
    return [tuple(_normal([n["node-name"], n["drv"], n["file"], n["ro"], n.get("backing_file")]))
            for n in client.cmd("query-named-block-nodes")]


def test_backing_node_names_down_the_chain(tmp_path: Path, chains: None) -> None:
    # iotest 040's drive: each level's backing.node-name names the node its image's header
    # opens; options given make the backing file an explicit one, so the file names above
    # it turn into json: names (QEMU's implicit_backing is false).
    args = ["-drive", "if=none,id=drive0,file={dir}/top.qcow2,node-name=top,"
                      "backing.node-name=mid,backing.backing.node-name=base"]
    with both(args, tmp_path) as (qemu, ours):
        mine = _nodes(ours)
        assert mine == _nodes(qemu)
        assert _normal(ours.cmd("query-block")) == _normal(qemu.cmd("query-block"))
    named = {n[0]: n for n in mine}
    assert named["base"][1:4] == ("raw", "/DIR/base.raw", True)
    assert named["mid"][1] == "qcow2" and named["mid"][3] is True
    top = named["top"][2]
    assert top.startswith("json:") and json.loads(top[len("json:"):]) == {
        "backing": {"backing": {"driver": "raw", "file": {"driver": "file", "filename": "/DIR/base.raw"}},
                    "driver": "qcow2", "file": {"driver": "file", "filename": "/DIR/mid.qcow2"}},
        "driver": "qcow2", "file": {"driver": "file", "filename": "/DIR/top.qcow2"}}


@pytest.mark.parametrize("extra", [
    # An image without a backing file reads through the one given (format probed).
    "file={dir}/lone.qcow2,backing.file.filename={dir}/other.qcow2",
    # iotest 130: the header names orig.raw as raw; another file, in the format given.
    "file={dir}/orig.qcow2,backing.file.filename={dir}/other.qcow2,backing.driver=qcow2",
])
def test_backing_file_given_on_the_command_line(tmp_path: Path, chains: None, qemu_img: str,
                                                extra: str) -> None:
    args = ["-drive", f"if=none,id=drive0,node-name=top,{extra}"]
    with both(args, tmp_path) as (qemu, ours):
        assert _nodes(ours) == _nodes(qemu)
        # The guest sees the data of the backing file given, not of the header's.
        for client in (qemu, ours):
            # qemu-io's results go to the process's stdout (client.qemu_io reads them).
            printed = client.qemu_io('drive0 "read -P 0x5a 0 64k"')
            assert "read 65536/65536 bytes at offset 0" in printed
            assert "Pattern verification failed" not in printed
    # Nothing is written into the image: its header still names what it named.
    infos = [json.loads(subprocess.run([qemu_img, "info", "--output=json", "-U",
                                        str(tmp_path / name / extra.split(",")[0][len("file={dir}/"):])],
                                       check=True, capture_output=True, text=True).stdout)
             for name in ("qemu", "ours")]
    assert infos[1].get("backing-filename") == infos[0].get("backing-filename")


@pytest.mark.parametrize("extra", [
    "backing.read-only=off,backing.node-name=m",        # the backing node writable
    "backing.lazy-refcounts=on,backing.file.locking=off",  # a format and a protocol option
    "backing.driver=raw",                               # another format than the header's
    "backing=",                                         # the old spelling of no backing file
])
def test_options_for_the_backing_node(tmp_path: Path, chains: None, extra: str) -> None:
    args = ["-drive", f"if=none,id=drive0,node-name=top,file={{dir}}/top.qcow2,{extra}"]
    with both(args, tmp_path) as (qemu, ours):
        assert _nodes(ours) == _nodes(qemu)
        outputs = [c.output.all() if c.output else "" for c in (qemu, ours)]
    assert _normal(outputs[1].replace("qmp-server", "qemu-system-x86_64")) == _normal(outputs[0])


@pytest.mark.parametrize("extra", [
    "file={dir}/top.qcow2,backing.foo=bar",
    "file={dir}/top.qcow2,backing.lazy-refcounts=maybe",
    "file={dir}/top.qcow2,backing.node-name=9x",
    "file={dir}/top.qcow2,backing.file.filename={dir}/nope",
    "file={dir}/top.qcow2,backing=nonexist",
    "file={dir}/top.qcow2,backing.backing.backing.node-name=q",  # raw has no backing child
    "file={dir}/lone.qcow2,backing.node-name=x",
    "file={dir}/lone.qcow2,backing.driver=qcow2",
])
def test_startup_errors_as_qemu(tmp_path: Path, chains: None, extra: str) -> None:
    qemu_tools.require("qemu-system-x86_64")
    outputs = []
    for name, argv in (("qemu", ["qemu-system-x86_64", "-nodefaults", "-display", "none"]),
                       ("ours", ["python3", "-m", "qmp_server"])):
        drive = f"if=none,id=drive0,{extra}".replace("{dir}", str(tmp_path / name))
        result = subprocess.run([*argv, *PC, "-drive", drive], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        outputs.append(_normal(result.stderr.split(": ", 1)[1]))
    assert outputs[1] == outputs[0]
    assert "Could not open backing file: " in outputs[1] or "Driver doesn't support" in outputs[1]


def test_a_missing_file_down_the_chain_is_prefixed_per_level(tmp_path: Path, chains: None) -> None:
    # bdrv_open_backing_file prefixes its error once for each level it passes through.
    for name in ("qemu", "ours"):
        (tmp_path / name / "base.raw").unlink()
    outputs = []
    for name, argv in (("qemu", ["qemu-system-x86_64", "-nodefaults", "-display", "none"]),
                       ("ours", ["python3", "-m", "qmp_server"])):
        drive = f"if=none,id=drive0,file={tmp_path / name}/top.qcow2"
        result = subprocess.run([*argv, *PC, "-drive", drive], capture_output=True, text=True, timeout=30)
        outputs.append(_normal(result.stderr.split(": ", 1)[1]))
    assert outputs[1] == outputs[0]
    assert outputs[1].count("Could not open backing file: ") == 2


def test_blockdev_add_backing_errors_are_prefixed(tmp_path: Path, chains: None) -> None:
    # blockdev-add goes through bdrv_open_backing_file too: a backing reference or inline
    # backing node that fails says so.
    with both([], tmp_path) as (qemu, ours):
        replies = []
        for client, name in ((qemu, "qemu"), (ours, "ours")):
            top = {"driver": "file", "filename": str(tmp_path / name / "lone.qcow2")}
            replies.append(_normal([client.execute("blockdev-add", add) for add in (
                {"driver": "qcow2", "node-name": "t1", "file": top, "backing": "nonexist"},
                {"driver": "qcow2", "node-name": "t2", "file": top,
                 "backing": {"driver": "qcow2", "file": {"driver": "file",
                                                         "filename": str(tmp_path / name / "nope")}}},
            )]))
    assert replies[1] == replies[0]
    assert [r["error"]["desc"] for r in replies[1]] == [
        "Could not open backing file: Cannot find device='nonexist' nor node-name='nonexist'",
        "Could not open backing file: Could not open '/DIR/nope': No such file or directory"]


def test_hmp_drive_add_takes_backing_options(tmp_path: Path, chains: None) -> None:
    with both([], tmp_path) as (qemu, ours):
        for client, name in ((qemu, "qemu"), (ours, "ours")):
            reply = client.hmp(f"drive_add 0 if=none,id=d1,file={tmp_path / name}/top.qcow2,"
                               "backing.node-name=m1")
            assert reply.strip() == "OK", reply
        assert _nodes(ours) == _nodes(qemu)
        assert "m1" in [n[0] for n in _nodes(ours)]
