"""Node file names as QEMU's bdrv_refresh_filename makes them, against live QEMU 7.2.

A node's file name (BlockDeviceInfo ``file``, ImageInfo ``filename``, ``backing_file``,
HMP ``info block``, the backing file name blockdev-snapshot-sync writes into the overlay)
is the exact file name when the node's data is what opening that file gives, else
``json:`` and the node's full open options: ``driver``, ``filename`` and the driver's
strong options (null-co's ``size``/``read-zeroes``, raw's ``offset``/``size``) as given
(strings from ``-drive``), every child's options, the backing child's only when it is not
the one the image header names. Each case runs QEMU and the server with the same command
line and commands over ``-qmp stdio`` in the same directory and compares exit status,
standard error and every reply; where a case creates an overlay, its header too.

Normalised, by design: query results' ``active``/``children`` (QEMU 10.1 members we
report) and generated node names.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from migration_support import Server
from server_support import running

from blocklayer.graph import BlockGraph

BASE = ["-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"]
NODES = {"execute": "query-named-block-nodes"}
BLOCK = {"execute": "query-block"}
INFO_BLOCK = {"execute": "human-monitor-command", "arguments": {"command-line": "info block"}}


def _normal(value: Any) -> Any:
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in ("active", "children")}
    if isinstance(value, str):
        return re.sub(r"#block\d+", "#block", value)
    return value


def _run(program: list[str], cwd: Path, args: list[str], commands: list[dict[str, Any]]) -> Any:
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    # stdout goes to a file, not a pipe: QEMU drops monitor output still queued behind a
    # full pipe when it quits (a 130-node reply cut at 64 KiB, seen in CI).
    with tempfile.TemporaryFile("w+") as out:
        result = subprocess.run([*program, *BASE, *args], input=stdin, stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=60, cwd=cwd)
        out.seek(0)
        stdout = out.read()
    replies = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    replies = [r for r in replies if "return" in r or "error" in r]
    stderr = re.sub(r"^(qemu-system-x86_64|qmp-server): ", "PROG: ", result.stderr, flags=re.M)
    return _normal([result.returncode, stderr, replies[1:-1]])


def _both(cwd: Path, args: list[str], commands: list[dict[str, Any]],
          created: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(ours, QEMU's): the run, then the header of every file in ``created`` (removed
    before each run, so that both start from the same directory)."""
    qemu = qemu_tools.require("qemu-system-x86_64")
    qemu_img = qemu_tools.require("qemu-img")
    results = []
    for program in ([qemu], [sys.executable, "-m", "qmp_server"]):
        for name in created:
            (cwd / name).unlink(missing_ok=True)
        run = _run(program, cwd, args, commands)
        for name in created:
            info = subprocess.run([qemu_img, "info", "--output=json", name], cwd=cwd,
                                  capture_output=True, text=True, check=True)
            header = json.loads(info.stdout)
            run.append({k: header.get(k) for k in ("backing-filename", "backing-filename-format",
                                                   "full-backing-filename")})
        results.append(run)
    theirs, ours = results
    return ours, theirs


@pytest.fixture
def images(tmp_path: Path, qemu_img: str) -> Path:
    """r.raw (1 MiB), base.qcow2, top.qcow2 (backing base.qcow2), other.qcow2."""
    def create(*args: str) -> None:
        subprocess.run([qemu_img, "create", "-q", *args], check=True, cwd=tmp_path)

    create("-f", "raw", "r.raw", "1M")
    create("-f", "qcow2", "base.qcow2", "1M")
    create("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "1M")
    create("-f", "qcow2", "other.qcow2", "1M")
    return tmp_path


def _add(**arguments: Any) -> dict[str, Any]:
    return {"execute": "blockdev-add", "arguments": arguments}


def _file(filename: str, **options: Any) -> dict[str, Any]:
    return {"driver": "file", "filename": filename, **options}


@pytest.mark.parametrize("options", [
    {"driver": "null-co", "size": 1000},
    {"driver": "null-co", "read-zeroes": True},
    {"driver": "null-co", "read-zeroes": True, "size": 1024, "latency-ns": 5},
    {"driver": "null-co", "latency-ns": 5},  # not strong: null-co:// stays
    {"driver": "null-co"},
    {"driver": "raw", "offset": 512, "size": 1024, "file": _file("r.raw")},
    {"driver": "raw", "size": 1024, "file": _file("r.raw", locking="off")},
    {"driver": "raw", "offset": 0, "file": _file("r.raw")},
    {"driver": "raw", "file": {"driver": "null-co"}},
    {"driver": "raw", "size": 512, "file": {"driver": "null-co", "latency-ns": 3}},
    {"driver": "raw", "file": {"driver": "null-co", "size": 4096}},
    {"driver": "qcow2", "backing": None, "file": _file("top.qcow2")},
    {"driver": "qcow2", "backing": {"driver": "qcow2", "file": _file("other.qcow2")},
     "file": _file("top.qcow2")},
    {"driver": "qcow2", "backing": {"driver": "qcow2", "file": _file("base.qcow2")},
     "file": _file("top.qcow2")},
    {"driver": "qcow2", "file": _file("top.qcow2")},
])
def test_blockdev_add_names_as_qemu(images: Path, options: dict[str, Any]) -> None:
    ours, theirs = _both(images, [], [_add(**{"node-name": "n", **options}), NODES, BLOCK, INFO_BLOCK])
    assert ours == theirs


def test_backing_given_as_node_as_qemu(images: Path) -> None:
    # A backing node counts as the header's when its file name is the header's name
    # (or, opened from the header, whatever it became): bdrv_backing_overridden.
    commands = [
        _add(**{"node-name": "o", "driver": "qcow2", "file": _file("other.qcow2")}),
        _add(**{"node-name": "b", "driver": "qcow2", "read-only": True,
                "file": _file("base.qcow2", locking="off")}),
        _add(**{"node-name": "t1", "driver": "qcow2", "backing": "o", "read-only": True,
                "file": _file("top.qcow2", locking="off")}),
        _add(**{"node-name": "t2", "driver": "qcow2", "backing": "b", "read-only": True,
                "file": _file("top.qcow2", locking="off")}),
        _add(**{"node-name": "t3", "driver": "qcow2", "backing": "b", "read-only": True,
                "file": _file(str(images / "top.qcow2"), locking="off")}),
        _add(**{"node-name": "t4", "driver": "qcow2", "read-only": True,
                "file": _file(str(images / "top.qcow2"), locking="off")}),
        NODES, INFO_BLOCK,
    ]
    ours, theirs = _both(images, [], commands)
    assert ours == theirs


def test_format_over_a_format_node_as_qemu(images: Path) -> None:
    # Only a protocol child lends its exact name: raw over a qcow2 node is json:. (Only
    # the names are compared: ImageInfo of raw over qcow2 differs in cluster-size.)
    commands = [_add(**{"node-name": "o", "driver": "qcow2", "file": _file("other.qcow2")}),
                _add(**{"node-name": "r", "driver": "raw", "file": "o"}), NODES]
    ours, theirs = _both(images, [], commands)
    assert [[n["file"], n["image"]["filename"]] for n in ours[2][-1]["return"]] == \
        [[n["file"], n["image"]["filename"]] for n in theirs[2][-1]["return"]]
    assert ours[2][-1]["return"][0]["file"].startswith('json:{"driver": "raw", "file": {"driver": "qcow2"')


def test_blockdev_and_drive_names_as_qemu(images: Path) -> None:
    # -blockdev's values are typed (keyval visited into BlockdevOptions); -drive's are
    # QemuOpts strings, and bs->options keeps them so: "size": "1000".
    args = [
        "-blockdev", "driver=null-co,node-name=n,size=1000,read-zeroes=on",
        "-blockdev", "driver=raw,node-name=r,offset=512,file.driver=file,file.filename=r.raw",
        "-drive", "driver=null-co,size=1000,if=none,id=d",
        "-drive", "driver=null-co,read-zeroes=on,latency-ns=7,if=none,id=d1",
        "-drive", "file=r.raw,format=raw,offset=512,size=1024,if=none,id=d2,file.locking=off",
        "-drive", "file=top.qcow2,if=none,id=d3,backing.driver=qcow2,backing.file.driver=file,"
                  "backing.file.filename=other.qcow2",
        "-drive", 'if=none,id=d4,file=json:{"driver":"raw",,"size":512,,"file":{"driver":"null-co"}}',
    ]
    ours, theirs = _both(images, args, [NODES, BLOCK, INFO_BLOCK])
    assert ours == theirs


def test_snapshot_sync_writes_the_json_name_as_qemu(images: Path) -> None:
    # external_snapshot_prepare refreshes the old top's name and creates the overlay with
    # it as backing file: a json: name goes into the header as it is. The overlay then
    # names its backing node exactly, so its own name is plain.
    args = ["-drive", f"if=none,id=d,driver=raw,offset=0,file.driver=file,file.filename={images}/r.raw"]
    commands = [NODES,
                {"execute": "blockdev-snapshot-sync",
                 "arguments": {"device": "d", "snapshot-file": "ov.qcow2", "format": "qcow2"}},
                NODES, BLOCK, INFO_BLOCK]
    ours, theirs = _both(images, args, commands, created=("ov.qcow2",))
    assert ours == theirs


def test_blockdev_snapshot_names_as_qemu(images: Path, qemu_img: str) -> None:
    # The overlay's header against its new backing node's name: equal (plain name) or
    # not (json: with the backing's options); the users moved up see the new names, and
    # query-named-block-nodes' cache is refreshed with them.
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", f"{images}/r.raw", "-F", "raw",
                    "ov2.qcow2", "1M"], check=True, cwd=images)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "ov3.qcow2", "1M"], check=True, cwd=images)
    args = []
    for index, path in enumerate((f"{images}/r.raw", f"{images}/r.raw", "r.raw"), 1):
        args += ["-drive", f"if=none,id=d{index},node-name=x{index},driver=raw,file.driver=file,"
                           f"file.filename={path},file.locking=off"]
    commands = [
        _add(**{"node-name": "o2", "driver": "qcow2", "backing": None, "file": _file("ov2.qcow2")}),
        _add(**{"node-name": "o3", "driver": "qcow2", "backing": None, "file": _file("ov3.qcow2")}),
        _add(**{"node-name": "o4", "driver": "qcow2", "backing": None, "read-only": True,
                "file": _file("ov2.qcow2", locking="off")}),
        NODES, BLOCK,
        {"execute": "blockdev-snapshot", "arguments": {"node": "x1", "overlay": "o2"}},
        {"execute": "blockdev-snapshot", "arguments": {"node": "x2", "overlay": "o3"}},
        {"execute": "blockdev-snapshot", "arguments": {"node": "x3", "overlay": "o4"}},
        NODES, BLOCK, INFO_BLOCK,
    ]
    ours, theirs = _both(images, args, commands)
    assert ours == theirs


def test_long_names_are_cut_as_qemu(images: Path) -> None:
    # bs->filename is a PATH_MAX buffer: a longer json: name ends in "..." at 4095 bytes.
    commands = [_add(**{"node-name": "r0", "driver": "null-co", "size": 1 << 20})]
    for index in range(1, 130):
        commands.append(_add(**{"node-name": f"r{index}", "driver": "raw", "size": 512 * (200 - index),
                                "file": f"r{index - 1}"}))
    ours, theirs = _both(images, [], [*commands, {"execute": "query-named-block-nodes",
                                                  "arguments": {"flat": True}}])
    assert ours == theirs
    names = [node["file"] for node in theirs[2][-1]["return"]]
    assert any(len(name) == 4095 and name.endswith("...") for name in names)


def test_backing_of_an_image_in_a_raw_window_as_qemu(images: Path, qemu_img: str) -> None:
    # bdrv_dirname follows the primary chain down to the file: a relative backing name in
    # a qcow2 image inside a raw window resolves against the file's directory, not
    # against the window's json: name.
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", "big.raw", "4M"], check=True, cwd=images)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    "inner.qcow2", "1M"], check=True, cwd=images)
    data = (images / "inner.qcow2").read_bytes()
    with open(images / "big.raw", "r+b") as big:
        big.seek(1 << 20)
        big.write(data)
    window = {"driver": "raw", "offset": 1 << 20, "size": 2 << 20,
              "file": _file(f"{images}/big.raw")}
    ours, theirs = _both(images, [], [_add(**{"node-name": "q", "driver": "qcow2", "file": window}),
                                      NODES, INFO_BLOCK])
    assert ours == theirs
    top = next(node for node in theirs[2][1]["return"] if node["node-name"] == "q")
    assert top["backing_file"] == f"{images}/base.qcow2"


def test_block_layer_alone_writes_plain_json(tmp_path: Path) -> None:
    # Without a monitor's encoder the graph writes the options with json.dumps, in the
    # order they were put in (QEMU's member order is the monitor's business).
    graph = BlockGraph()
    try:
        node = graph.open({"driver": "null-co", "node-name": "n", "size": 1000, "read-zeroes": True})
        assert node.filename == 'json:{"driver": "null-co", "size": 1000, "read-zeroes": true}'
        plain = graph.open({"driver": "null-co", "node-name": "p", "latency-ns": 1})
        assert plain.filename == "null-co://"
    finally:
        graph.close_all()


def test_header_changed_while_inactive_overrides_the_backing(images: Path, qemu_img: str) -> None:
    # qcow2_do_open on activation: a header that now names another backing file sets
    # bs->backing_file and auto_backing_file anew, so the backing node still attached no
    # longer counts as the header's. (QEMU 7.2 has no blockdev-set-active to compare with;
    # this follows qcow2_co_invalidate_cache.)
    top = images / "top.qcow2"
    node = {"node-name": "t", "driver": "qcow2", "file": _file(str(top))}
    with running(["-blockdev", json.dumps(node)], images) as (_, client):
        names = {n["node-name"]: n["file"] for n in client.cmd("query-named-block-nodes", flat=True)}
        assert names["t"] == str(top)
        client.cmd("blockdev-set-active", node_name="t", active=False)
        subprocess.run([qemu_img, "rebase", "-q", "-u", "-b", "other.qcow2", "-F", "qcow2", str(top)],
                       check=True, cwd=images)
        client.cmd("blockdev-set-active", node_name="t", active=True)
        info = next(n for n in client.cmd("query-named-block-nodes") if n["node-name"] == "t")
        backing = {"driver": "qcow2", "file": {"driver": "file", "filename": f"{images}/base.qcow2"}}
        assert info["file"] == "json:" + json.dumps(
            {"backing": backing, "driver": "qcow2", "file": {"driver": "file", "filename": str(top)}})
        assert info["backing_file"] == f"{images}/base.qcow2"
        assert info["image"]["backing-filename"] == "other.qcow2"


@pytest.mark.parametrize("backing", [
    ("file:{dir}/base.qcow2", "qcow2"),
    ("file:base.qcow2", "qcow2"),  # relative to the working directory, as QEMU opens it
    ("null-co://", "raw"),
    ("null-co://x", "raw"),
    ("foo:bar", "raw"),
])
def test_protocol_prefixed_backing_names_as_qemu(images: Path, qemu_img: str,
                                                 backing: tuple[str, str]) -> None:
    # iotest 228's "funny" header name: bdrv_fill_options finds the protocol of a header
    # name that has one; the backing node then has the plain name, and the overlay's
    # name stays plain (auto_backing_file is the backing node's name).
    name, fmt = backing
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-u", "-b", name.format(dir=images), "-F", fmt,
                    "odd.qcow2", "1M"], check=True, cwd=images)
    commands = [_add(**{"node-name": "t", "driver": "qcow2", "file": _file(f"{images}/odd.qcow2")}),
                NODES, INFO_BLOCK]
    ours, theirs = _both(images, [], commands)
    assert ours == theirs


def test_migration_compares_image_files_not_json_names(images: Path) -> None:
    # The block configuration check compares the image each named node opens, not its
    # file name: a raw window is json:{...} on both sides, naming the same file by
    # different paths (here through a symlink).
    (images / "link").symlink_to(images)
    windows = [{"node-name": "disk0", "driver": "raw", "offset": 4096,
                "file": _file(f"{directory}/r.raw")} for directory in (images, images / "link")]
    src = Server("src", ["-blockdev", json.dumps(windows[0])], images)
    dst = Server("dst", ["-incoming", "defer", "-blockdev", json.dumps(windows[1])], images)
    try:
        for server in (src, dst):
            server.enable_events()
        uri = f"unix:{images / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        assert dst.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:completed"
    finally:
        src.close()
        dst.close()
