"""block_resize (QMP and HMP) against live QEMU 7.2.

Each scenario runs on QEMU and on the server, each on its own copy of the same images
(made by qemu-img), and compares what a user sees: every reply, query-named-block-nodes'
virtual sizes, HMP's text, and the resulting image files byte for byte (which covers
QEMU's cluster choices when the L1 table grows or moves and when a shrink frees L2
tables and the file's tail), then ``qemu-img check`` and the data with ``qemu-io``.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from lock_probe import locked
from server_support import Client, running

Scenario = Callable[[Client, Path], list[Any]]


def _img(path: Path, fmt: str, size: str, *options: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(path), size], check=True)


def _io(path: Path, fmt: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run([*argv, str(path)], capture_output=True, text=True, check=False)
    return done.stdout + done.stderr


def _check(path: Path) -> str:
    done = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True,
                          check=False)
    return done.stdout + done.stderr


def _normalise(value: Any, directory: Path) -> Any:
    text = str(value).replace(str(directory), "DIR")
    return re.sub(r"#block\d+", "#block", text)


def compare(tmp_path: Path, prepare: Callable[[Path], None], scenario: Scenario,
            files: list[str]) -> list[Any]:
    """Run ``scenario`` on QEMU and on the server, each on images ``prepare`` made in its
    own directory; assert that they saw the same and left the same files behind."""
    qemu_tools.require("qemu-system-x86_64")
    results: list[list[Any]] = []
    images: list[list[bytes]] = []
    for who in ("qemu", "ours"):
        directory = tmp_path / who
        directory.mkdir()
        prepare(directory)
        with running([], directory, qemu=who == "qemu") as (_, client):
            seen = scenario(client, directory)
            client.cmd("query-status")
        results.append([_normalise(item, directory) for item in seen])
        images.append([(directory / name).read_bytes() for name in files])
    for qemu_seen, our_seen in zip(results[0], results[1], strict=True):
        assert our_seen == qemu_seen
    for name, qemu_bytes, our_bytes in zip(files, images[0], images[1], strict=True):
        assert len(our_bytes) == len(qemu_bytes), name
        assert our_bytes == qemu_bytes, name
    return results[1]


def _sizes(client: Client) -> dict[str, int]:
    return {n["node-name"]: n["image"]["virtual-size"]
            for n in client.cmd("query-named-block-nodes") if not n["node-name"].startswith("#")}


def _resize(client: Client, **args: Any) -> Any:
    return client.execute("block_resize", {k.replace("_", "-"): v for k, v in args.items()})


def test_errors_in_qemu_order(tmp_path: Path) -> None:
    """Lookup, size and op-blocker texts, raw windows, null-co, v2 snapshots, read-only,
    a parent that does not share resizing, an image too large."""

    def prepare(d: Path) -> None:
        _img(d / "a.qcow2", "qcow2", "1M")
        _img(d / "base.qcow2", "qcow2", "1M")
        _img(d / "top.qcow2", "qcow2", "1M", "-b", str(d / "base.qcow2"), "-F", "qcow2")
        _img(d / "v2.qcow2", "qcow2", "1M", "-o", "compat=0.10")
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(d / "v2.qcow2")], check=True)
        _img(d / "ro.qcow2", "qcow2", "1M")
        _img(d / "w.raw", "raw", "1M")

    def scenario(c: Client, d: Path) -> list[Any]:
        c.cmd("blockdev-add", driver="qcow2", node_name="q",
              file={"driver": "file", "node-name": "qf", "filename": str(d / "a.qcow2")})
        c.cmd("blockdev-add", driver="qcow2", node_name="top",
              file={"driver": "file", "filename": str(d / "top.qcow2")},
              backing={"driver": "qcow2", "node-name": "base",
                       "file": {"driver": "file", "filename": str(d / "base.qcow2")}})
        c.cmd("blockdev-add", driver="qcow2", node_name="v2",
              file={"driver": "file", "filename": str(d / "v2.qcow2")})
        c.cmd("blockdev-add", driver="qcow2", node_name="ro", read_only=True,
              file={"driver": "file", "filename": str(d / "ro.qcow2")})
        c.cmd("blockdev-add", driver="raw", node_name="win", offset=512, size=4096,
              file={"driver": "file", "filename": str(d / "w.raw")})
        c.cmd("blockdev-add", driver="null-co", node_name="n")
        return [
            _resize(c, size=1024),
            _resize(c, node_name="zz", size=1024),
            _resize(c, device="q", size=1024),
            _resize(c, device="zz", node_name="q", size=2 << 20),
            _resize(c, node_name="q", size=-1),
            _resize(c, node_name="q", size=1000),
            _resize(c, node_name="q", size=(1 << 63) - 1),
            _resize(c, node_name="q", size=1 << 62),
            _resize(c, node_name="qf", size=4 << 20),
            _resize(c, node_name="base", size=2 << 20),
            _resize(c, device="base", node_name="base", size=2 << 20),
            _resize(c, node_name="v2", size=2 << 20),
            _resize(c, node_name="ro", size=2 << 20),
            _resize(c, node_name="win", size=8192),
            _resize(c, node_name="n", size=8192),
            _sizes(c),
        ]

    # (v2.qcow2 differs anyway: its snapshot was taken at another time for each.)
    seen = compare(tmp_path, prepare, scenario, ["a.qcow2", "ro.qcow2", "w.raw"])
    assert "Device '(null)' is in use" in str(seen[9])
    assert "Cannot resize fixed-size raw disks" in str(seen[13])


@pytest.mark.parametrize(("steps", "write"), [
    # grow within the L1 table, grow past it (the L1 moves), shrink to nothing, grow again
    ([3 << 20, 1 << 20, 0, 4 << 20, 8 << 20, 8192], True),
    # a shrink over a range without an L2 table allocates one (get_cluster_table)
    ([3 << 20, 1 << 20, 0, 4 << 20, 8 << 20, 8192], False),
    # L2 tables past the new end freed, the file's tail cut
    ([1 << 30, (512 << 20) + 65536, 1536, 600 << 20], True),
])
def test_qcow2_grow_and_shrink_same_bytes(tmp_path: Path, steps: list[int], write: bool) -> None:
    """qcow2 after each resize is QEMU's, byte for byte; data before the old end stays,
    the new area reads zero."""

    def prepare(d: Path) -> None:
        _img(d / "d.qcow2", "qcow2", "1M")
        _io(d / "d.qcow2", "qcow2", "write -P 0x11 0 64k", "write -P 0x22 900k 124k")

    def scenario(c: Client, d: Path) -> list[Any]:
        # The file child takes discard=unmap by default (bdrv_inherited_options): the
        # clusters a shrink frees are punched, as the bytes compared below show.
        c.cmd("blockdev-add", driver="qcow2", node_name="d",
              file={"driver": "file", "filename": str(d / "d.qcow2")})
        seen: list[Any] = []
        for size in steps:
            seen.append(_resize(c, node_name="d", size=size))
            seen.append(_sizes(c))
            if write and size > 1 << 20:
                c.hmp(f'qemu-io d "write -P 0x33 {size - 65536} 64k"')
        c.cmd("blockdev-del", node_name="d")
        return seen

    compare(tmp_path, prepare, scenario, ["d.qcow2"])
    image = tmp_path / "ours" / "d.qcow2"
    assert "No errors were found on the image." in _check(image)


def test_qcow2_data_kept_and_new_area_zero(tmp_path: Path) -> None:
    """qemu-io sees the old data and zeroes past the old end after a grow; a shrink keeps
    what lies before the new end."""
    qemu_tools.require("qemu-system-x86_64")
    image = tmp_path / "d.qcow2"
    _img(image, "qcow2", "1M")
    _io(image, "qcow2", "write -P 0x11 0 64k", "write -P 0x22 900k 124k")
    with running([], tmp_path) as (_, c):
        c.cmd("blockdev-add", driver="qcow2", node_name="d",
              file={"driver": "file", "filename": str(image)})
        assert _resize(c, node_name="d", size=3 << 20) == {"return": {}}
        c.cmd("blockdev-del", node_name="d")
    out = _io(image, "qcow2", "read -P 0x11 0 64k", "read -P 0x22 900k 124k",
              "read -P 0 1M 2M")
    assert "Pattern verification failed" not in out and out.count("read ") == 3
    info = subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 3145728' in info
    with running([], tmp_path, "vm2") as (_, c):
        c.cmd("blockdev-add", driver="qcow2", node_name="d",
              file={"driver": "file", "filename": str(image)})
        assert _resize(c, node_name="d", size=960 << 10) == {"return": {}}
        c.cmd("blockdev-del", node_name="d")
    out = _io(image, "qcow2", "read -P 0x11 0 64k", "read -P 0x22 900k 60k")
    assert "Pattern verification failed" not in out and out.count("read ") == 2
    assert "No errors were found on the image." in _check(image)


def test_file_raw_and_backend(tmp_path: Path) -> None:
    """file nodes (any length, shown in whole sectors), raw over file, a -drive backend
    by name, HMP's block_resize (MiB without a suffix) and its errors."""

    def prepare(d: Path) -> None:
        _img(d / "f.raw", "raw", "1M")
        _img(d / "r.raw", "raw", "1M")
        _img(d / "drv.qcow2", "qcow2", "1M")

    def scenario(c: Client, d: Path) -> list[Any]:
        c.cmd("blockdev-add", driver="file", node_name="f", filename=str(d / "f.raw"))
        c.cmd("blockdev-add", driver="raw", node_name="r",
              file={"driver": "file", "filename": str(d / "r.raw")})
        c.hmp(f"drive_add 0 if=none,id=drive0,file={d / 'drv.qcow2'},format=qcow2,node-name=dn")
        return [
            _resize(c, node_name="f", size=5000),
            _resize(c, node_name="f", size=3000),
            _resize(c, node_name="r", size=2 << 20),
            _resize(c, node_name="r", size=700),
            _resize(c, device="drive0", size=3 << 20),
            c.hmp("block_resize drive0 2"),
            c.hmp("block_resize drive0 8k"),
            c.hmp("block_resize dn 8"),
            c.hmp("block_resize drive0 -1"),
            c.hmp("block_resize drive0 1000B"),
            c.hmp("block_resize drive0"),
            c.hmp("block_resize zz 1"),
            _sizes(c),
            [(b["device"], b["inserted"]["image"]["virtual-size"]) for b in c.cmd("query-block")],
        ]

    seen = compare(tmp_path, prepare, scenario, ["f.raw", "r.raw", "drv.qcow2"])
    assert "invalid size" in str(seen[8])


def test_resize_lock_held_elsewhere(tmp_path: Path) -> None:
    """Another process that does not share resizing (qemu-io on a qcow2 image) makes the
    resize permission fail with QEMU's lock text; once it is gone the resize works."""

    def prepare(d: Path) -> None:
        _img(d / "x.qcow2", "qcow2", "1M")

    def scenario(c: Client, d: Path) -> list[Any]:
        c.cmd("blockdev-add", driver="file", node_name="x", filename=str(d / "x.qcow2"))
        holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(d / "x.qcow2")],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            # Until the holder unshares resizing (byte 203). The probe takes no lock:
            # a qemu-img check here would itself keep qemu-io from its write lock.
            for _ in range(200):
                if 203 in locked(d / "x.qcow2"):
                    break
                time.sleep(0.05)
            blocked = _resize(c, node_name="x", size=2 << 20)
        finally:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait()
        return [blocked, _resize(c, node_name="x", size=2 << 20), _sizes(c)]

    seen = compare(tmp_path, prepare, scenario, ["x.qcow2"])
    assert "Failed to get \"resize\" lock" in str(seen[0])


def test_dirty_bitmaps_grow_with_the_node(tmp_path: Path) -> None:
    """A bitmap on a resized node covers the new size (bdrv_dirty_bitmap_truncate), and
    a persistent one is stored with it."""

    def prepare(d: Path) -> None:
        _img(d / "b.qcow2", "qcow2", "1M")

    def scenario(c: Client, d: Path) -> list[Any]:
        c.cmd("blockdev-add", driver="qcow2", node_name="b",
              file={"driver": "file", "filename": str(d / "b.qcow2")})
        c.cmd("block-dirty-bitmap-add", node="b", name="p", persistent=True)
        c.cmd("block-dirty-bitmap-add", node="b", name="t")
        seen: list[Any] = [_resize(c, node_name="b", size=3 << 20)]
        c.hmp('qemu-io b "write 2M 64k"')
        seen.append(c.cmd("query-named-block-nodes")[0]["dirty-bitmaps"])
        seen.append(c.cmd("x-debug-block-dirty-bitmap-sha256", node="b", name="t"))
        c.cmd("blockdev-del", node_name="b")
        return seen

    compare(tmp_path, prepare, scenario, ["b.qcow2"])
