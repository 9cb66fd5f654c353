"""Dirty bitmaps carried in the migration stream (the ``dirty-bitmaps`` capability).

Two servers, on a shared image or on one image each; the same flow runs on a QEMU 7.2
pair where the outcome is observable the same way, and the observations must agree:
the destination's bitmap has the source's name, granularity, persistence, enabled state
and hash; the source keeps it; a persistent bitmap is stored exactly once.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from migration_support import Server, blockdev, qemu_img_check, qemu_img_create, start_server
from qemu_tools import require

CAPS = [{"capability": "events", "state": True}, {"capability": "dirty-bitmaps", "state": True}]
WRITES = ((0, 0x10000), (0xF0000, 0x10000), (0xA0201, 0x1000))


def _wait_migration(server: Server, timeout: float = 20.0) -> dict[str, Any]:
    """The final query-migrate; ``{"status": "exited"}`` for a destination that exited
    because the migration failed (QEMU's behaviour, and ours with exit-on-error)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = server.cmd("query-migrate")
        except OSError:
            server.wait_exit()
            return {"status": "exited"}
        if info.get("status") in ("completed", "failed"):
            result: dict[str, Any] = info
            return result
        assert time.monotonic() < deadline, f"{server.name}: migration still {info}"
        time.sleep(0.02)


def _drive(image: Path) -> list[str]:
    # A named BlockBackend over an auto-named node: bitmaps travel under the device name,
    # and the images may differ (our block configuration check compares named nodes).
    return ["-drive", f"file={image},format=qcow2,if=none,id=drive0"]


def _bitmaps(server: Server) -> list[dict[str, Any]]:
    for info in server.cmd("query-block"):
        if info["device"] == "drive0":
            return [{k: b[k] for k in ("name", "granularity", "persistent", "recording", "count")}
                    for b in info["inserted"].get("dirty-bitmaps", [])]
    raise AssertionError("no drive0")


def _sha(server: Server, name: str = "bitmap0") -> str | None:
    reply = server.client.execute("x-debug-block-dirty-bitmap-sha256", {"node": "drive0", "name": name})
    if "error" in reply:
        return None
    sha: str = reply["return"]["sha256"]
    return sha


def _image_bitmaps(image: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


def _migrate(tmp_path: Path, qemu: bool, *, shared: bool, persistent: bool, disabled: bool = False,
             dst_caps: list[dict[str, Any]] | None = None,
             dst_setup: Any = None) -> dict[str, Any]:
    """Source: bitmap0 + writes; migrate over a UNIX socket; report both sides."""
    if qemu:
        require("qemu-system-x86_64")
    src_image = tmp_path / "a.qcow2"
    dst_image = src_image if shared else tmp_path / "b.qcow2"
    for image in {src_image, dst_image}:
        qemu_img_create(image, "1M")
    seen: dict[str, Any] = {}
    sock = tmp_path / "mig.sock"
    src = start_server(_drive(src_image), tmp_path, "src", qemu=qemu)
    dst = start_server([*_drive(dst_image), "-incoming", "defer"], tmp_path, "dst", qemu=qemu)
    try:
        src.cmd("migrate-set-capabilities", capabilities=CAPS)
        dst.cmd("migrate-set-capabilities", capabilities=CAPS if dst_caps is None else dst_caps)
        src.cmd("block-dirty-bitmap-add", node="drive0", name="bitmap0", granularity=512,
                persistent=persistent, disabled=disabled)
        for offset, length in WRITES:
            src.hmp(f'qemu-io drive0 "write {offset} {length}"')
        before = _bitmaps(src)
        sha = _sha(src)
        if dst_setup is not None:
            dst_setup(dst)
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        src.cmd("migrate", uri=f"unix:{sock}")
        seen["source"] = _wait_migration(src)["status"]
        seen["destination"] = _wait_migration(dst)["status"]
        if seen["destination"] == "completed":
            seen["destination-bitmaps"] = _bitmaps(dst)
            seen["destination-same-hash"] = _sha(dst) == sha
        seen["source-same-hash"] = _sha(src) == sha
        seen["before"] = before
        if seen["destination"] != "exited":
            dst.cmd("quit")
            dst.wait_exit()
    finally:
        src.close()
        dst.close()
    # What stays in the image the destination wrote (the source quit without storing).
    seen["image"] = [{k: b[k] for k in ("name", "granularity", "flags")}
                     for b in _image_bitmaps(dst_image)]
    seen["check"] = qemu_img_check(dst_image).returncode
    return seen


def _expected(persistent: bool, disabled: bool = False) -> dict[str, Any]:
    info = {"name": "bitmap0", "granularity": 512, "persistent": persistent,
            "recording": not disabled, "count": 0x21200}
    return {
        "source": "completed", "destination": "completed",
        "destination-bitmaps": [info], "destination-same-hash": True,
        "source-same-hash": True, "before": [info],
        "image": ([{"name": "bitmap0", "granularity": 512,
                    "flags": [] if disabled else ["auto"]}] if persistent else []),
        "check": 0,
    }


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "transient"])
def test_bitmap_travels(tmp_path: Path, qemu: bool, shared: bool, persistent: bool) -> None:
    assert _migrate(tmp_path, qemu, shared=shared, persistent=persistent) == _expected(persistent)


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_disabled_bitmap_stays_disabled(tmp_path: Path, qemu: bool) -> None:
    seen = _migrate(tmp_path, qemu, shared=False, persistent=True, disabled=True)
    expected = _expected(True, disabled=True)
    # Written while disabled: nothing recorded.
    for side in ("destination-bitmaps", "before"):
        expected[side][0]["count"] = 0
    assert seen == expected


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_bitmap_of_that_name_on_the_destination_fails_the_migration(tmp_path: Path, qemu: bool) -> None:
    def add(dst: Server) -> None:
        dst.cmd("block-dirty-bitmap-add", node="drive0", name="bitmap0")

    seen = _migrate(tmp_path, qemu, shared=False, persistent=False, dst_setup=add)
    assert seen["source"] == "failed" and seen["destination"] == "exited"
    assert seen["source-same-hash"] is True  # the source runs on with its bitmap
    log = (tmp_path / "dst.log").read_text()
    assert "Bitmap with the same name ('bitmap0') already exists on destination" in log


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_destination_without_the_capability_loads_them_anyway(tmp_path: Path, qemu: bool) -> None:
    # QEMU 7.2 registers its 'dirty-bitmap' section whatever the capability: only the
    # source's capability decides whether bitmaps travel.
    seen = _migrate(tmp_path, qemu, shared=False, persistent=False,
                    dst_caps=[{"capability": "events", "state": True}])
    assert seen == _expected(False)


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_without_the_capability_persistent_bitmaps_go_through_the_image(tmp_path: Path, qemu: bool) -> None:
    if qemu:
        require("qemu-system-x86_64")
    caps = [{"capability": "events", "state": True}]
    src_image = tmp_path / "a.qcow2"
    qemu_img_create(src_image, "1M")
    sock = tmp_path / "mig.sock"
    src = start_server(_drive(src_image), tmp_path, "src", qemu=qemu)
    dst = start_server([*_drive(src_image), "-incoming", f"unix:{sock}"], tmp_path, "dst", qemu=qemu)
    try:
        src.cmd("migrate-set-capabilities", capabilities=caps)
        src.cmd("block-dirty-bitmap-add", node="drive0", name="p", granularity=512, persistent=True)
        src.cmd("block-dirty-bitmap-add", node="drive0", name="t", granularity=512)
        src.hmp('qemu-io drive0 "write 0 64k"')
        src.cmd("migrate", uri=f"unix:{sock}")
        assert _wait_migration(src)["status"] == "completed"
        assert _wait_migration(dst)["status"] == "completed"
        assert [b["name"] for b in _bitmaps(dst)] == ["p"]
        assert [b["name"] for b in _bitmaps(src)] == ["t"]  # the stored one left memory
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_block_bitmap_mapping_renames(tmp_path: Path, qemu: bool) -> None:
    if qemu:
        require("qemu-system-x86_64")
    # Shared image, node names on both sides; the destination maps the alias elsewhere.
    image = tmp_path / "a.qcow2"
    qemu_img_create(image, "1M")
    sock = tmp_path / "mig.sock"
    src = start_server(blockdev(image), tmp_path, "src", qemu=qemu)
    dst = start_server([*blockdev(image), "-incoming", "defer"], tmp_path, "dst", qemu=qemu)
    try:
        for server, node, name in ((src, "disk0", "bitmap0"), (dst, "disk0", "renamed")):
            server.cmd("migrate-set-capabilities", capabilities=CAPS)
            server.cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
                {"node-name": node, "alias": "n", "bitmaps": [
                    {"name": name, "alias": "b", "transform": {"persistent": True}}]}]})
        src.cmd("block-dirty-bitmap-add", node="disk0", name="bitmap0", granularity=512)
        src.cmd("block-dirty-bitmap-add", node="disk0", name="unmapped")
        src.hmp('qemu-io disk0 "write 0 64k"')
        sha = src.cmd("x-debug-block-dirty-bitmap-sha256", node="disk0", name="bitmap0")["sha256"]
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        src.cmd("migrate", uri=f"unix:{sock}")
        assert _wait_migration(src)["status"] == "completed"
        assert _wait_migration(dst)["status"] == "completed"
        bitmaps = next(n for n in dst.cmd("query-named-block-nodes", flat=True)
                       if n["node-name"] == "disk0").get("dirty-bitmaps", [])
        assert [(b["name"], b["persistent"]) for b in bitmaps] == [("renamed", True)]
        reply = dst.client.execute("x-debug-block-dirty-bitmap-sha256",
                                   {"node": "disk0", "name": "renamed"})
        assert reply["return"]["sha256"] == sha
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("mapped", ["none", "source", "destination", "both"])
@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_node_names_differ_across_the_sides(tmp_path: Path, qemu: bool, mapped: str) -> None:
    # iotest 300's TestNodeAliasMigration on a shared qcow2 image: the node is 'node-src'
    # on the source and 'node-dst' on the destination. QEMU migrates regardless; without
    # a mapping the destination reports that it cannot find 'node-src' and drops the
    # bitmap; a mapping on either side (or an alias on both) carries it over.
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "a.qcow2"
    qemu_img_create(image, "1M")
    sock = tmp_path / "mig.sock"
    src = start_server(blockdev(image, node="node-src"), tmp_path, "src", qemu=qemu)
    dst = start_server([*blockdev(image, node="node-dst"), "-incoming", f"unix:{sock}"],
                       tmp_path, "dst", qemu=qemu)
    mappings = {
        "source": [(src, [{"node-name": "node-src", "alias": "node-dst", "bitmaps": [
            {"name": "bmap", "alias": "bmap"}]}])],
        "destination": [(dst, [{"node-name": "node-dst", "alias": "node-src", "bitmaps": [
            {"name": "bmap", "alias": "bmap"}]}])],
        "both": [(server, [{"node-name": node, "alias": "node-alias", "bitmaps": [
            {"name": "bmap", "alias": "bmap-alias"}]}]) for server, node in ((src, "node-src"),
                                                                           (dst, "node-dst"))],
    }
    try:
        for server in (src, dst):
            server.cmd("migrate-set-capabilities", capabilities=CAPS)
        for server, mapping in mappings.get(mapped, []):
            server.cmd("migrate-set-parameters", **{"block-bitmap-mapping": mapping})
        src.cmd("block-dirty-bitmap-add", node="node-src", name="bmap")
        src.hmp('qemu-io node-src "write 64k 64k"')
        sha = src.cmd("x-debug-block-dirty-bitmap-sha256", node="node-src", name="bmap")["sha256"]
        src.cmd("migrate", uri=f"unix:{sock}")
        assert _wait_migration(src)["status"] == "completed"
        assert _wait_migration(dst)["status"] == "completed"
        assert dst.status() == "running"
        reply = dst.client.execute("x-debug-block-dirty-bitmap-sha256", {"node": "node-dst", "name": "bmap"})
        got = reply.get("return", {}).get("sha256") or reply["error"]["desc"]
    finally:
        src.close()
        dst.close()
    log = (tmp_path / "dst.log").read_text()
    if mapped == "none":
        assert got == "Dirty bitmap 'bmap' not found"
        assert "Cannot find device='node-src' nor node-name='node-src'" in log
    else:
        assert got == sha
        assert "qemu-system-" not in log and "qmp-server:" not in log, log


MAPPINGS = [
    [{"node-name": "a", "alias": "1bad", "bitmaps": []}],
    [{"node-name": "a", "alias": "x", "bitmaps": []}, {"node-name": "a", "alias": "y", "bitmaps": []}],
    [{"node-name": "a", "alias": "x", "bitmaps": []}, {"node-name": "b", "alias": "x", "bitmaps": []}],
    [{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "c"}, {"name": "b", "alias": "d"}]}],
    [{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "c"}, {"name": "e", "alias": "c"}]}],
    [{"node-name": "a" * 32, "alias": "x", "bitmaps": []}],
    [{"node-name": "a", "alias": "x" * 256, "bitmaps": []}],
    [{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "c" * 256}]}],
    [{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "c"}]}],
]


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_block_bitmap_mapping_checks(tmp_path: Path, qemu: bool) -> None:
    if qemu:
        require("qemu-system-x86_64")
    server = start_server([], tmp_path, "vm", qemu=qemu)
    try:
        seen = [server.client.execute("migrate-set-parameters", {"block-bitmap-mapping": m})
                for m in MAPPINGS]
        reported = server.cmd("query-migrate-parameters")["block-bitmap-mapping"]
    finally:
        server.close()
    prefix = "Invalid mapping given for block-bitmap-mapping: "
    assert [r.get("error", {}).get("desc", r) for r in seen] == [
        prefix + "The node alias '1bad' is not well-formed",
        prefix + "The node name 'a' is mapped twice",
        prefix + "The node alias 'x' is used twice",
        prefix + "The bitmap 'a'/'b' is mapped twice",
        prefix + "The bitmap alias 'x'/'c' is used twice",
        prefix + f"The node name '{'a' * 32}' is longer than 31 bytes",
        prefix + f"The node alias '{'x' * 256}' is longer than 255 bytes",
        prefix + f"The bitmap alias '{'c' * 256}' is longer than 255 bytes",
        {"return": {}},
    ]
    assert reported == MAPPINGS[-1]


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_unknown_device_on_the_destination_skips_the_bitmaps(tmp_path: Path, qemu: bool) -> None:
    # QEMU reports the lookup failure and migrates on without the bitmaps.
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "a.qcow2"
    qemu_img_create(image, "1M")
    sock = tmp_path / "mig.sock"
    src = start_server(_drive(image), tmp_path, "src", qemu=qemu)
    dst = start_server(["-drive", f"file={image},format=qcow2,if=none,id=other",
                        "-incoming", f"unix:{sock}"], tmp_path, "dst", qemu=qemu)
    try:
        src.cmd("migrate-set-capabilities", capabilities=CAPS)
        src.cmd("block-dirty-bitmap-add", node="drive0", name="bitmap0")
        src.cmd("migrate", uri=f"unix:{sock}")
        assert _wait_migration(src)["status"] == "completed"
        assert _wait_migration(dst)["status"] == "completed"
        [info] = dst.cmd("query-block")
        assert "dirty-bitmaps" not in info["inserted"]
    finally:
        src.close()
        dst.close()
    assert "Cannot find device='drive0' nor node-name='drive0'" in (tmp_path / "dst.log").read_text()


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_bitmap_on_an_auto_named_node_fails_the_migration(tmp_path: Path, qemu: bool) -> None:
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "a.qcow2"
    qemu_img_create(image, "1M")
    sock = tmp_path / "mig.sock"
    src = start_server(_drive(image), tmp_path, "src", qemu=qemu)
    dst = start_server([*_drive(image), "-incoming", f"unix:{sock}"], tmp_path, "dst", qemu=qemu)
    try:
        src.cmd("migrate-set-capabilities", capabilities=CAPS)
        [file_node] = [n["node-name"] for n in src.cmd("query-named-block-nodes")
                       if n["drv"] == "file"]
        assert file_node.startswith("#block")
        src.cmd("block-dirty-bitmap-add", node=file_node, name="b")
        src.cmd("migrate", uri=f"unix:{sock}")
        assert _wait_migration(src)["status"] == "failed"
        assert src.status() == "running"
        src_log = (tmp_path / "src.log").read_text()
    finally:
        src.close()
        dst.close()
    assert (f"Bitmap 'b' in a node with auto-generated name '{file_node}' can't be migrated"
            in src_log)


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_hmp_shows_the_mapping(tmp_path: Path, qemu: bool) -> None:
    # iotest 300 reads the mapping back from HMP's info migrate_parameters.
    if qemu:
        require("qemu-system-x86_64")
    server = start_server([], tmp_path, "vm", qemu=qemu)
    try:
        assert "block-bitmap-mapping" not in server.hmp("info migrate_parameters")
        server.cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
            {"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "c"}]},
            {"node-name": "d", "alias": "y", "bitmaps": []}]})
        text = server.hmp("info migrate_parameters").replace("\r", "")
    finally:
        server.close()
    assert text.endswith("block-bitmap-mapping:\n  'a' -> 'x'\n    'b' -> 'c'\n  'd' -> 'y'\n")
    assert "downtime-limit: 300 ms\n" in text and "tls-creds: ''\n" in text
