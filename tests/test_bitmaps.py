"""Dirty bitmaps: persistent ones kept in qcow2 images, the QMP commands, writes marking
them — each compared with QEMU 7.2 run on a copy of the same image (same commands, same
writes), and with what qemu-img says about the image afterwards.

QEMU's ``x-debug-block-dirty-bitmap-sha256`` hashes the bitmap's memory, so equal hashes
mean equal bitmaps; the expected values are always computed by QEMU itself here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from migration_support import Server, blockdev
from server_support import Client, running
from test_durability import PowerLossDisk

from blocklayer import bitmapops
from blocklayer.graph import BlockGraph

MiB = 1 << 20


def _img(*args: str) -> str:
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _info(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_img("info", "--output=json", str(path)))
    return data


def _bitmaps_in_image(path: Path) -> list[dict[str, Any]]:
    spec = _info(path)["format-specific"]["data"]
    bitmaps: list[dict[str, Any]] = spec.get("bitmaps", [])
    return bitmaps


def _check(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                         text=True, check=False)
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _add(client: Client, path: Path, name: str = "d", **extra: Any) -> dict[str, Any]:
    return client.execute("blockdev-add", {"driver": "qcow2", "node-name": name, **extra,
                                           "file": {"driver": "file", "filename": str(path)}})


def _hmp_io(client: Client, node: str, command: str) -> None:
    # What the monitor said and what the process printed (qemu-io's results).
    out = client.qemu_io(f'{node} "{command}"')
    assert "rror" not in out and "failed" not in out, out


def _dirty(client: Client, node: str = "d") -> list[dict[str, Any]]:
    for info in client.cmd("query-named-block-nodes", flat=True):
        if info["node-name"] == node:
            bitmaps: list[dict[str, Any]] = info.get("dirty-bitmaps", [])
            return bitmaps
    raise AssertionError(f"no node {node}")


def _sha(client: Client, name: str, node: str = "d") -> str:
    digest: str = client.cmd("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"]
    return digest


@contextmanager
def both(tmp_path: Path, image: Path) -> Iterator[tuple[tuple[Client, Path], tuple[Client, Path]]]:
    """QEMU and the server, each with its own copy of ``image``."""
    qemu_tools.require("qemu-system-x86_64")
    with ExitStack() as stack:
        pairs = []
        for name in ("qemu", "ours"):
            copy = tmp_path / f"{name}-{image.name}"
            shutil.copyfile(image, copy)
            _, client = stack.enter_context(running([], tmp_path, name, qemu=name == "qemu"))
            pairs.append((client, copy))
        yield pairs[0], pairs[1]


@pytest.fixture
def image(tmp_path: Path, qemu_utils: None) -> Path:
    """A 4 MiB qcow2 v3 image with three bitmaps made by qemu-img."""
    path = tmp_path / "base.qcow2"
    _img("create", "-q", "-f", "qcow2", str(path), "4M")
    _img("bitmap", "--add", str(path), "b0")
    _img("bitmap", "--add", "-g", "128k", str(path), "b1")
    _img("bitmap", "--add", "-g", "4k", "--disable", str(path), "off")
    return path


WRITES = ("write 0 4k", "write 1M 200k", "write -z 3M 64k", "write 4095k 1k")


def test_qemu_img_bitmaps_survive_our_writes_as_in_qemu(tmp_path: Path, image: Path) -> None:
    """Bitmaps qemu-img made: loaded, marked by our writes exactly as QEMU marks them,
    stored back on close; qemu-img info then lists what it lists after QEMU, check is clean."""
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            assert _add(client, path) == {"return": {}}
            loaded = _dirty(client)
            for command in WRITES:
                _hmp_io(client, "d", command)
            shas = {b: _sha(client, b) for b in ("b0", "b1", "off")}
            after = _dirty(client)
            in_use = _bitmaps_in_image_shared(path)
            assert client.execute("blockdev-del", {"node-name": "d"}) == {"return": {}}
            results.append((loaded, after, shas, in_use, _bitmaps_in_image(path)))
    qemu, ours = results
    assert ours == qemu
    loaded, after, shas, in_use, stored = ours
    assert [b["name"] for b in loaded] == ["off", "b1", "b0"]  # newest first, as QEMU
    assert {b["name"]: b["count"] for b in after} == {"off": 0, "b1": 5 * 128 * 1024,
                                                      "b0": 7 * 65536}
    assert all("in-use" in b["flags"] for b in in_use)
    assert stored == [{"flags": ["auto"], "name": "b0", "granularity": 65536},
                      {"flags": ["auto"], "name": "b1", "granularity": 131072},
                      {"flags": [], "name": "off", "granularity": 4096}]
    for _, path in pairs:
        result = _check(path)
        assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result


def _bitmaps_in_image_shared(path: Path) -> list[dict[str, Any]]:
    data = json.loads(_img("info", "-U", "--output=json", str(path)))
    bitmaps: list[dict[str, Any]] = data["format-specific"]["data"].get("bitmaps", [])
    return bitmaps


def test_stored_bitmap_data_reloads_in_qemu(tmp_path: Path, image: Path) -> None:
    """What we store is what QEMU loads: same hash in QEMU after our close, and back in
    the server after QEMU's; qemu-img bitmap --merge reads it too."""
    with both(tmp_path, image) as ((qemu, _), (ours, path)):
        assert _add(ours, path) == {"return": {}}
        for command in WRITES:
            _hmp_io(ours, "d", command)
        expected = {b: _sha(ours, b) for b in ("b0", "b1", "off")}
        assert ours.cmd("blockdev-del", **{"node-name": "d"}) == {}
        assert _add(qemu, path) == {"return": {}}
        assert {b: _sha(qemu, b) for b in ("b0", "b1", "off")} == expected
        _hmp_io(qemu, "d", "write 2M 4k")
        expected["b0"] = _sha(qemu, "b0")
        assert qemu.cmd("blockdev-del", **{"node-name": "d"}) == {}
        assert _add(ours, path) == {"return": {}}
        assert _sha(ours, "b0") == expected["b0"]
        assert ours.cmd("blockdev-del", **{"node-name": "d"}) == {}
    # qemu-img merges what we stored: b0 into a new bitmap of the same granularity.
    _img("bitmap", "--add", str(path), "copy")
    _img("bitmap", "--merge", "b0", str(path), "copy")
    with running([], tmp_path, "again", qemu=True) as (_, qemu):
        assert _add(qemu, path) == {"return": {}}
        assert _sha(qemu, "copy") == expected["b0"]


def test_persistent_bitmaps_we_add(tmp_path: Path, qemu_utils: None) -> None:
    """block-dirty-bitmap-add persistent: in qemu-img info with QEMU's flags and
    granularity after close, check clean, same image state as after QEMU."""
    path = tmp_path / "new.qcow2"
    _img("create", "-q", "-f", "qcow2", str(path), "8M")
    results = []
    with both(tmp_path, path) as pairs:
        for client, copy in pairs:
            assert _add(client, copy) == {"return": {}}
            client.cmd("block-dirty-bitmap-add", node="d", name="full", persistent=True)
            client.cmd("block-dirty-bitmap-add", node="d", name="fine", persistent=True,
                       granularity=512)
            client.cmd("block-dirty-bitmap-add", node="d", name="frozen", persistent=True,
                       disabled=True)
            client.cmd("block-dirty-bitmap-add", node="d", name="memory")
            _hmp_io(client, "d", "write 100k 300k")
            _hmp_io(client, "d", "write 7M 1M")
            shas = {b["name"]: _sha(client, b["name"]) for b in _dirty(client)}
            queried = _dirty(client)
            client.cmd("blockdev-del", **{"node-name": "d"})
            results.append((shas, queried, _bitmaps_in_image(copy), _check(copy)))
    assert results[0][:3] == results[1][:3]
    shas, queried, stored, check = results[1]
    assert [b["name"] for b in stored] == ["frozen", "fine", "full"]
    assert stored[0] == {"flags": [], "name": "frozen", "granularity": 65536}
    assert stored[1] == {"flags": ["auto"], "name": "fine", "granularity": 512}
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check


def test_inactivate_stores_activate_reloads(tmp_path: Path, image: Path) -> None:
    """blockdev-set-active false stores the bitmaps (in_use cleared, lock released: a
    plain qemu-img info reads them); activation loads them again, in_use again."""
    with running([], tmp_path, "ours") as (_, ours):
        assert _add(ours, image) == {"return": {}}
        ours.cmd("block-dirty-bitmap-add", node="d", name="mine", persistent=True)
        ours.cmd("block-dirty-bitmap-add", node="d", name="ram")
        _hmp_io(ours, "d", "write 64k 64k")
        before = {b["name"]: _sha(ours, b["name"]) for b in _dirty(ours)}
        assert ours.cmd("blockdev-set-active", **{"node-name": "d"}, active=False) == {}
        stored = _bitmaps_in_image(image)  # no -U: the write lock is gone
        assert [(b["name"], b["flags"]) for b in stored] == [
            ("b0", ["auto"]), ("b1", ["auto"]), ("off", []), ("mine", ["auto"])]
        # Stored persistent bitmaps left memory; the non-persistent one stays (QEMU).
        assert [b["name"] for b in _dirty(ours)] == ["ram"]
        assert _check(image).get("leaks", 0) == 0
        assert ours.cmd("blockdev-set-active", **{"node-name": "d"}, active=True) == {}
        assert {b["name"]: _sha(ours, b["name"]) for b in _dirty(ours)} == before
        assert all("in-use" in b["flags"] for b in _bitmaps_in_image_shared(image))
        assert ours.cmd("blockdev-del", **{"node-name": "d"}) == {}
    assert _check(image).get("leaks", 0) == 0


def _kill_with_bitmaps_loaded(tmp_path: Path, image: Path) -> None:
    """Leave ``image`` as a crash leaves it: bitmaps marked in_use, never stored."""
    with running([], tmp_path, "crash") as (proc, ours):
        assert _add(ours, image) == {"return": {}}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_in_use_bitmaps_are_inconsistent_as_in_qemu(tmp_path: Path, image: Path) -> None:
    """A bitmap left in_use (crash) loads as inconsistent, refuses use with QEMU's texts,
    stays in the image on close, and block-dirty-bitmap-remove deletes it."""
    _kill_with_bitmaps_loaded(tmp_path, image)
    assert all("in-use" in b["flags"] for b in _bitmaps_in_image(image))
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            replies: list[Any] = [_add(client, path), _dirty(client)]
            for command in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                            "block-dirty-bitmap-disable"):
                replies.append(client.execute(command, {"node": "d", "name": "b0"}))
            replies.append(client.execute("block-dirty-bitmap-merge", {
                "node": "d", "target": "b0", "bitmaps": ["b1"]}))
            client.cmd("block-dirty-bitmap-add", node="d", name="t")
            replies.append(client.execute("block-dirty-bitmap-merge", {
                "node": "d", "target": "t", "bitmaps": ["b1"]}))
            replies.append(client.execute("block-dirty-bitmap-remove", {"node": "d",
                                                                         "name": "b1"}))
            client.cmd("blockdev-del", **{"node-name": "d"})
            replies.append(_bitmaps_in_image(path))
            results.append(replies)
    assert results[1] == results[0]
    assert results[1][1][2] == {"name": "b0", "recording": False, "persistent": True,
                                "busy": False, "granularity": 65536, "count": 0,
                                "inconsistent": True}
    assert results[1][2]["error"]["desc"] == "Bitmap 'b0' is inconsistent and cannot be used"


def test_read_only_node_bitmaps(tmp_path: Path, image: Path) -> None:
    """On a read-only node loaded bitmaps are readonly: QEMU's texts, nothing written."""
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            before = path.read_bytes()
            replies: list[Any] = [_add(client, path, **{"read-only": True})]
            for command in ("block-dirty-bitmap-clear", "block-dirty-bitmap-remove",
                            "block-dirty-bitmap-disable", "block-dirty-bitmap-enable"):
                replies.append(client.execute(command, {"node": "d", "name": "b0"}))
            replies.append(_dirty(client))
            client.cmd("blockdev-del", **{"node-name": "d"})
            replies.append(path.read_bytes() == before)
            results.append(replies)
    assert results[1] == results[0]
    assert results[1][1]["error"]["desc"] == "Bitmap 'b0' is readonly and cannot be modified"
    assert results[1][-1] is True


ERROR_CASES: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-add", {"node": "d", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "d", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nowhere", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "d", "name": "x", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "d", "name": "x", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "d", "name": "x", "granularity": 1 << 31,
                                "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d", "name": "x" * 1024, "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "raw", "name": "x", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "v2", "name": "x", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "d", "name": "big", "granularity": 1 << 31}),
    ("block-dirty-bitmap-add", {"node": "raw", "name": "r"}),
    ("block-dirty-bitmap-remove", {"node": "d", "name": "nope"}),
    ("block-dirty-bitmap-clear", {"node": "nowhere", "name": "b0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "d", "name": "nope"}),
    ("block-dirty-bitmap-merge", {"node": "d", "target": "b0", "bitmaps": ["nope"]}),
    ("block-dirty-bitmap-merge", {"node": "d", "target": "b0",
                                  "bitmaps": ["b1", {"node": "nowhere", "name": "x"}]}),
    ("block-dirty-bitmap-merge", {"node": "d", "target": "b0",
                                  "bitmaps": [{"node": "raw", "name": "r"}]}),
    ("block-dirty-bitmap-merge", {"node": "d", "target": "b0", "bitmaps": ["b1", "off"]}),
    ("block-dirty-bitmap-remove", {"node": "d", "name": "b1"}),
    ("block-dirty-bitmap-disable", {"node": "d", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "d", "name": "off"}),
    ("block-dirty-bitmap-clear", {"node": "d", "name": "big"}),
]


def test_commands_and_errors_as_qemu(tmp_path: Path, image: Path) -> None:
    """Replies of every command, failures included, and the final state, as QEMU's."""
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            raw = path.with_suffix(".raw")
            small = path.with_suffix(".small")
            v2 = path.with_suffix(".v2")
            _img("create", "-q", "-f", "raw", str(raw), "4M")
            _img("create", "-q", "-f", "raw", str(small), "1M")
            _img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(v2), "4M")
            _add(client, path)
            _add(client, v2, "v2")
            for name, file in (("raw", raw), ("small", small)):
                client.cmd("blockdev-add", driver="raw", **{"node-name": name},
                           file={"driver": "file", "filename": str(file)})
            client.cmd("block-dirty-bitmap-add", node="small", name="s")
            _hmp_io(client, "d", "write 0 300k")
            _hmp_io(client, "raw", "write 1M 4k")
            replies = [client.execute(cmd, args) for cmd, args in ERROR_CASES]
            replies.append(client.execute("block-dirty-bitmap-merge", {
                "node": "d", "target": "b0", "bitmaps": [{"node": "small", "name": "s"}]}))
            replies.append(_dirty(client))
            replies.append({b["name"]: _sha(client, b["name"]) for b in _dirty(client)})
            replies.append(_dirty(client, "raw"))
            replies.append(client.execute("block-dirty-bitmap-merge", {
                "node": "raw", "target": "r", "bitmaps": [{"node": "d", "name": "b1"}]}))
            replies.append(_sha(client, "r", "raw"))
            client.cmd("blockdev-del", **{"node-name": "d"})
            replies.append(_bitmaps_in_image(path))
            results.append(replies)
    for case, qemu, ours in zip(ERROR_CASES + [("end", {})] * 7, results[0], results[1],
                                strict=True):
        assert ours == qemu, case


def test_stale_bitmaps_extension_dropped_as_qemu(tmp_path: Path, image: Path) -> None:
    """Autoclear bit cleared by a program that knows no bitmaps: a writer drops the
    extension (the bitmaps are stale), which leaks their clusters exactly as QEMU does."""
    with open(image, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 0))
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            reply = _add(client, path)
            results.append((reply, _dirty(client), _bitmaps_in_image_shared(path)))
            client.cmd("blockdev-del", **{"node-name": "d"})
            check = _check(path)
            results[-1] += (check.get("leaks"), check.get("corruptions", 0))
    assert results[1] == results[0]
    # The directory and the three (empty) bitmaps' tables leak.
    assert results[1][2] == [] and results[1][3] == 4


def _directory_offset(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:65536]
    pos = 112
    while pos < len(data):
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0x23852875:
            _, _, size, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            return offset, size
        if magic == 0:
            break
        pos += 8 + (length + 7) // 8 * 8
    raise AssertionError("no bitmaps extension")


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _crafted(image: Path, case: str) -> None:
    directory, size = _directory_offset(image)
    header = image.read_bytes()[:4096]
    ext = header.index(struct.pack(">I", 0x23852875))
    if case == "count":
        _patch(image, ext + 8, struct.pack(">I", 4))
    elif case == "fewer":
        _patch(image, ext + 8, struct.pack(">I", 2))
    elif case == "flags":
        _patch(image, directory + 12, struct.pack(">I", 0x100))
    elif case == "granularity":
        _patch(image, directory + 17, bytes([40]))
    elif case == "table_offset":
        _patch(image, directory, struct.pack(">Q", 12345))
    elif case == "extra":
        _patch(image, directory + 20, struct.pack(">I", 8))
    elif case == "zero_count":
        _patch(image, ext + 8, struct.pack(">I", 0))
    elif case == "dir_align":
        _patch(image, ext + 24, struct.pack(">Q", directory + 8))
    elif case == "dir_size":
        _patch(image, ext + 16, struct.pack(">Q", size - 8))
    elif case == "table_entry":
        table = struct.unpack_from(">Q", image.read_bytes(), directory)[0]
        _patch(image, table, struct.pack(">Q", 0x300))
    elif case == "table_size":
        _patch(image, directory + 8, struct.pack(">I", 2))


@pytest.mark.parametrize("case", ["count", "fewer", "flags", "granularity", "table_offset",
                                  "extra", "zero_count", "dir_align", "dir_size",
                                  "table_entry", "table_size"])
def test_bad_bitmap_directories_as_qemu(tmp_path: Path, image: Path, case: str) -> None:
    """Crafted extensions, directories and tables: QEMU's verdict and text, read-write and
    read-only, and the image untouched when the open fails."""
    _img("bitmap", "--enable", str(image), "off")  # b0 first in the directory
    _crafted(image, case)
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            before = path.read_bytes()
            replies = [_add(client, path, "ro", **{"read-only": True})]
            if "error" not in replies[0]:
                client.cmd("blockdev-del", **{"node-name": "ro"})
            rw = _add(client, path)
            replies.append(rw)
            if "error" in rw:
                replies.append(path.read_bytes() == before)
            else:
                replies.append(_dirty(client))
                client.cmd("blockdev-del", **{"node-name": "d"})
            results.append(replies)
    assert results[1] == results[0]


def test_dirty_image_repair_keeps_bitmap_clusters(tmp_path: Path, qemu_utils: None) -> None:
    """A crashed lazy-refcounts image with bitmaps: the repair on a read-write open counts
    the bitmaps' directory, tables and data (qcow2_check_bitmaps_refcounts), so nothing
    is freed under them; the image then checks clean, as after QEMU's repair."""
    path = tmp_path / "lazy.qcow2"
    _img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "4M")
    _img("bitmap", "--add", str(path), "b0")
    subprocess.run(["qemu-io", "-c", "write 0 64k", str(path)], check=True,
                   capture_output=True)
    _img("bitmap", "--add", str(path), "b1")
    subprocess.run(["qemu-io", "-c", "write 1M 64k", "-c", "abort", str(path)],
                   capture_output=True, check=False)
    assert _info(path)["dirty-flag"] is True
    results = []
    with both(tmp_path, path) as pairs:
        for client, copy in pairs:
            reply = _add(client, copy)
            queried = _dirty(client)
            _hmp_io(client, "d", "write 2M 64k")
            client.cmd("blockdev-del", **{"node-name": "d"})
            check = _check(copy)
            results.append((reply, queried, _bitmaps_in_image(copy), check.get("leaks", 0),
                            check.get("corruptions", 0)))
    assert results[1] == results[0]
    assert results[1][3:] == (0, 0)


def test_bitmaps_move_with_migration_on_shared_storage(tmp_path: Path, image: Path) -> None:
    """The source stores its persistent bitmaps when migration inactivates the image; the
    destination (opened inactive, so nothing loaded yet) loads them when it activates."""
    src = Server("src", blockdev(image), tmp_path)
    dst = Server("dst", ["-incoming", "defer", *blockdev(image)], tmp_path)
    try:
        for server in (src, dst):
            server.connect()
            server.enable_events()
        src.cmd("block-dirty-bitmap-add", node="disk0", name="mine", persistent=True)
        _hmp_io(src.client, "disk0", "write 0 300k")
        expected = {b["name"]: _sha(src.client, b["name"], "disk0")
                    for b in _dirty(src.client, "disk0")}
        assert _dirty(dst.client, "disk0") == []
        uri = f"unix:{tmp_path / 'mig.sock'}"
        assert dst.cmd("migrate-incoming", uri=uri) == {}
        assert src.cmd("migrate", uri=uri) == {}
        assert src.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert dst.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert _dirty(src.client, "disk0") == []  # stored, then released
        assert {b["name"]: _sha(dst.client, b["name"], "disk0")
                for b in _dirty(dst.client, "disk0")} == expected
        assert [b["name"] for b in _dirty(dst.client, "disk0")] == ["mine", "off", "b1", "b0"]
        assert all("in-use" in b["flags"] for b in _bitmaps_in_image_shared(image))
    finally:
        src.close()
        dst.close()
    assert _check(image).get("leaks", 0) == 0


def test_device_names_and_query_block(tmp_path: Path, image: Path) -> None:
    """``node`` may name a -drive backend (bdrv_lookup_bs); query-block's ``inserted``
    carries the bitmaps; the node behind the backend is the one that records."""
    qemu_tools.require("qemu-system-x86_64")
    results = []
    with ExitStack() as stack:
        for name in ("qemu", "ours"):
            copy = tmp_path / f"{name}.qcow2"
            shutil.copyfile(image, copy)
            drive = ["-drive", f"if=none,id=drive0,node-name=n0,format=qcow2,file={copy}"]
            _, client = stack.enter_context(running(drive, tmp_path, name, qemu=name == "qemu"))
            replies: list[Any] = [client.execute("block-dirty-bitmap-add",
                                                 {"node": "drive0", "name": "via-drive"})]
            _hmp_io(client, "drive0", "write 64k 64k")  # through the backend
            replies.append(client.execute("x-debug-block-dirty-bitmap-sha256",
                                          {"node": "drive0", "name": "via-drive"}))
            replies.append(client.execute("block-dirty-bitmap-clear",
                                          {"node": "n0", "name": "via-drive"}))
            [info] = client.cmd("query-block")
            replies.append(info["inserted"]["dirty-bitmaps"])
            results.append(replies)
    assert results[1] == results[0]
    assert [b["name"] for b in results[1][-1]] == ["via-drive", "off", "b1", "b0"]


def test_bitmap_on_the_file_node_follows_its_growth(tmp_path: Path, qemu_utils: None) -> None:
    """A bitmap on a qcow2 node's file: the format's writes, metadata included, mark it,
    and it grows with the file (bdrv_co_write_req_finish), as in QEMU."""
    path = tmp_path / "grow.qcow2"
    _img("create", "-q", "-f", "qcow2", str(path), "16M")
    results = []
    with both(tmp_path, path) as pairs:
        for client, copy in pairs:
            client.cmd("blockdev-add", driver="file", **{"node-name": "f0"},
                       filename=str(copy))
            client.cmd("block-dirty-bitmap-add", node="f0", name="f", granularity=4096)
            client.cmd("blockdev-add", driver="qcow2", **{"node-name": "d"}, file="f0")
            _hmp_io(client, "d", "write 0 64k")
            _hmp_io(client, "d", "write 8M 128k")
            results.append((_dirty(client, "f0"), _sha(client, "f", "f0")))
            client.cmd("blockdev-del", **{"node-name": "d"})
    assert results[1] == results[0]
    assert results[1][0][0]["count"] > 0


def test_power_loss_while_bitmaps_are_stored(tmp_path: Path, image: Path) -> None:
    """At every fdatasync of the store (inactivation), a power loss keeping all, none, or
    only the header among the volatile writes leaves an image QEMU opens with no
    corruption: the header switches to a new directory only once it, the bitmaps' tables
    and data and their refcounts are durable (update_ext_header_and_dir)."""
    candidates: list[bytes] = []
    with pytest.MonkeyPatch.context() as mp:
        disk = PowerLossDisk(image, mp)
        graph = BlockGraph()
        node = graph.open({"driver": "qcow2", "node-name": "d",
                           "file": {"driver": "file", "filename": str(image)}})
        bitmapops.add(node, "mine", 4096, True, False)
        for i in range(40):
            node.pwrite(i * 97 * 1024, b"x" * 3000)
        node.flush()

        def snapshot(disk: PowerLossDisk) -> None:
            for keep in (lambda o, d: True, lambda o, d: False, lambda o, d: o == 0):
                candidates.append(bytes(disk.crash_image(keep)))

        disk.on_sync = snapshot
        try:
            graph.inactivate(node)
        finally:
            graph.close_all()
            disk.close()
    assert len(candidates) >= 6
    crashed = tmp_path / "crashed.qcow2"
    for n, data in enumerate(candidates):
        crashed.write_bytes(data)
        check = _check(crashed)
        assert check.get("corruptions", 0) == 0 and check.get("check-errors", 0) == 0, (n, check)
        # QEMU loads whatever bitmaps the header vouches for, with readable tables.
        with running([], tmp_path, f"p{n}", qemu=True) as (_, qemu):
            assert _add(qemu, crashed, **{"read-only": True}) == {"return": {}}, n


def test_persistent_bitmap_on_read_only_node_is_lost_with_qemus_message(
        tmp_path: Path, qemu_utils: None) -> None:
    """QEMU accepts a persistent bitmap on a read-only node and reports it lost when the
    node closes (qcow2_close's store: No write access); the image stays untouched."""
    qemu_tools.require("qemu-system-x86_64")
    message = "Lost persistent bitmaps during inactivation of node 'd': No write access"
    for name in ("qemu", "ours"):
        path = tmp_path / f"{name}.qcow2"
        _img("create", "-q", "-f", "qcow2", str(path), "4M")
        before = path.read_bytes()
        with running([], tmp_path, name, qemu=name == "qemu") as (proc, client):
            assert _add(client, path, **{"read-only": True}) == {"return": {}}
            client.cmd("block-dirty-bitmap-add", node="d", name="p", persistent=True)
            client.cmd("blockdev-del", **{"node-name": "d"})
            client.cmd("quit")
            proc.wait(timeout=10)
            assert client.output is not None
            output = client.output.all()
        assert message in output, (name, output)
        assert path.read_bytes() == before


def test_writes_through_an_nbd_export_mark_the_bitmaps_as_in_qemu(tmp_path: Path, image: Path) -> None:
    """A writable NBD export is a user of the node like a device: a client's writes and
    zeroes through it mark every enabled bitmap (not the disabled one), exactly as QEMU's."""
    seen = []
    with both(tmp_path, image) as ((qemu, theirs), (ours, mine)):
        for client, copy, name in ((qemu, theirs, "qemu"), (ours, mine, "ours")):
            assert _add(client, copy) == {"return": {}}
            sock = tmp_path / f"{name}-nbd.sock"
            client.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
            client.cmd("block-export-add", type="nbd", id="e1", **{"node-name": "d"}, writable=True)
            uri = f"nbd+unix:///d?socket={sock}"
            out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 64k 4k", "-c",
                                  "write -z 2M 256k", "-c", "write -P 0x5b 4095k 1k", uri],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "failed" not in out.stdout + out.stderr, out.stderr
            seen.append({"dirty": _dirty(client), "sha": {b: _sha(client, b) for b in ("b0", "b1", "off")}})
            client.cmd("block-export-del", id="e1")
            client.cmd("nbd-server-stop")
    assert seen[1] == seen[0]
    counts = {b["name"]: b["count"] for b in seen[1]["dirty"]}  # type: ignore[index]
    assert counts["off"] == 0 and counts["b0"] > 0 and counts["b1"] > 0


def _action(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


#: Transactions of bitmap actions (what libvirt sends for checkpoints and incremental
#: backups): one that commits, ones whose last action fails or aborts, so that every
#: change before is taken back, and a removal that only happens on commit.
TRANSACTIONS: list[list[dict[str, Any]]] = [
    [_action("block-dirty-bitmap-add", node="d", name="t1", granularity=65536),
     _action("block-dirty-bitmap-add", node="d", name="t2", disabled=True),
     _action("block-dirty-bitmap-merge", node="d", target="t2", bitmaps=["b0"]),
     _action("block-dirty-bitmap-clear", node="d", name="b1")],
    # (With a disable of b0 in the transaction above too, QEMU 7.2 crashes.)
    [_action("block-dirty-bitmap-disable", node="d", name="b0")],
    [_action("block-dirty-bitmap-add", node="d", name="t3"),
     _action("block-dirty-bitmap-enable", node="d", name="b0"),
     _action("block-dirty-bitmap-clear", node="d", name="t2"),
     _action("block-dirty-bitmap-merge", node="d", target="t1", bitmaps=["t2"]),
     _action("block-dirty-bitmap-remove", node="d", name="off"),
     {"type": "abort", "data": {}}],
    [_action("block-dirty-bitmap-clear", node="d", name="t2"),
     _action("block-dirty-bitmap-add", node="d", name="t1")],
    # (QEMU 7.2 crashes when an enable, disable or remove action fails its lookup.)
    [_action("block-dirty-bitmap-enable", node="d", name="off"),
     _action("block-dirty-bitmap-clear", node="d", name="nope")],
    [_action("block-dirty-bitmap-remove", node="d", name="t1")],
    [_action("block-dirty-bitmap-add", node="d", name="t4")],
]


def test_bitmap_transactions_as_qemu(tmp_path: Path, image: Path) -> None:
    """transaction with bitmap actions: replies, then the bitmaps (names, counts,
    recording, SHA-256 of their data) after each, as QEMU's."""
    results = []
    with both(tmp_path, image) as pairs:
        for client, path in pairs:
            _add(client, path)
            _hmp_io(client, "d", "write 0 300k")
            seen: list[Any] = []
            for actions in TRANSACTIONS:
                seen.append(client.execute("transaction", {"actions": actions}))
                seen.append(_dirty(client))
                seen.append({b["name"]: _sha(client, b["name"]) for b in _dirty(client)})
            seen.append(client.execute("transaction", {
                "actions": TRANSACTIONS[-1], "properties": {"completion-mode": "grouped"}}))
            results.append(seen)
    assert results[1] == results[0]
