"""The block graph: node names, references, permissions and lock bytes, deletion."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from lock_probe import locked

from blocklayer.errors import BlockError
from blocklayer.graph import BlockGraph
from blocklayer.perm import ALL, CONSISTENT_READ, WRITE


@pytest.fixture
def raw_image(tmp_path: Path) -> Path:
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(1 << 20))
    return path


def file_spec(path: Path, **extra: object) -> dict[str, object]:
    return {"driver": "file", "filename": str(path), **extra}


def test_names_and_references(raw_image: Path) -> None:
    graph = BlockGraph()
    graph.open(file_spec(raw_image, **{"node-name": "af"}))
    for bad in ("9lives", "_x", "a#b", ""):
        with pytest.raises(BlockError, match=f"Invalid node-name: '{bad}'"):
            graph.open({"driver": "raw", "node-name": bad, "file": "af"})
    with pytest.raises(BlockError, match="Duplicate nodes with node-name='af'"):
        graph.open({"driver": "raw", "node-name": "af", "file": "af"})
    with pytest.raises(BlockError, match="^Node name too long$"):
        graph.open({"driver": "raw", "node-name": "a" * 32, "file": "af"})
    with pytest.raises(BlockError, match="Cannot find device='nowhere' nor node-name='nowhere'"):
        graph.open({"driver": "raw", "node-name": "r", "file": "nowhere"})
    graph.open({"driver": "raw", "node-name": "a" * 31, "file": "af"})
    assert set(graph.nodes) == {"af", "a" * 31}


def test_failed_open_leaves_nothing_behind(raw_image: Path, tmp_path: Path) -> None:
    graph = BlockGraph()
    with pytest.raises(BlockError, match="Could not open '.*missing': No such file or directory"):
        graph.open({"driver": "raw", "node-name": "r", "file": file_spec(tmp_path / "missing")})
    with pytest.raises(BlockError, match="Invalid node-name"):
        graph.open({"driver": "raw", "node-name": "9", "file": file_spec(raw_image)})
    assert graph.nodes == {}
    assert locked(raw_image) == []


def test_delete_checks_in_qemu_order(raw_image: Path) -> None:
    graph = BlockGraph()
    graph.open(file_spec(raw_image, **{"node-name": "af"}))
    graph.open({"driver": "raw", "node-name": "ar", "file": "af"})
    graph.open({"driver": "raw", "node-name": "inline", "file": file_spec(raw_image)})
    implicit = graph.nodes["inline"].child("file")
    assert implicit is not None and implicit.child.name.startswith("#block")
    with pytest.raises(BlockError, match="^Failed to find node with node-name='nope'$"):
        graph.delete("nope")
    with pytest.raises(BlockError, match="^Block device af is in use$"):
        graph.delete("af")
    with pytest.raises(BlockError, match=f"^Node {implicit.child.name} is not owned by the monitor$"):
        graph.delete(implicit.child.name)
    graph.delete("inline")
    assert implicit.child.name not in graph.nodes
    graph.delete("ar")
    graph.delete("af")
    assert graph.nodes == {}




def test_raw_is_a_filter_and_users_take_locks(raw_image: Path) -> None:
    # QEMU 7.2 holds no lock bytes for a raw node over a file until someone uses it.
    graph = BlockGraph()
    node = graph.open({"driver": "raw", "node-name": "r", "file": file_spec(raw_image)})
    assert locked(raw_image) == []
    user = graph.add_user(node, "block device 'qemu-io'", CONSISTENT_READ | WRITE, ALL)
    assert locked(raw_image) == [100, 101]
    graph.remove_user(user)
    assert locked(raw_image) == []


def test_lock_conflict_with_qemu_io(raw_image: Path, qemu_io: str) -> None:
    holder = subprocess.Popen([qemu_io, "-f", "raw", "-c", "sleep 20000", str(raw_image)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 10
        while locked(raw_image) != [100, 101] and time.monotonic() < deadline:
            time.sleep(0.02)
        graph = BlockGraph()
        node = graph.open({"driver": "raw", "node-name": "r", "file": file_spec(raw_image)})
        with pytest.raises(BlockError) as conflict:
            # qemu-io holds 'write' (byte 101), and we would not share it.
            graph.add_user(node, "block device 'qemu-io'", CONSISTENT_READ | WRITE, CONSISTENT_READ)
        assert conflict.value.message == 'Failed to get shared "write" lock'
        # The failed request changed nothing: a read-only user that shares writing still fits.
        graph.add_user(node, "reader", CONSISTENT_READ, ALL)
    finally:
        holder.kill()
        holder.wait()


def test_inactive_nodes_refuse_writers_and_active_parents(raw_image: Path) -> None:
    graph = BlockGraph()
    node = graph.open({"driver": "raw", "node-name": "r", "file": file_spec(raw_image)}, inactive=True)
    with pytest.raises(BlockError, match="^Permission 'write' unavailable on inactive node$"):
        graph.add_user(node, "writer", WRITE, ALL)
    with pytest.raises(BlockError, match="^Inactive 'r' can't be a file child of active 'top'$"):
        graph.open({"driver": "raw", "node-name": "top", "file": "r"})
    top = graph.open({"driver": "raw", "node-name": "top", "file": "r", "active": False})
    graph.activate(top)
    assert not node.inactive and not top.inactive
    with pytest.raises(BlockError, match="^Node has active parent node$"):
        graph.inactivate(node)
    graph.inactivate(top)
    assert node.inactive and top.inactive


def test_activation_prefetches_what_each_format_node_rereads(
    tmp_path: Path, qemu_img: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blocklayer.drivers.file import FileDriver
    from blocklayer.qcow2 import Qcow2Driver
    from blocklayer.qcow2.header import parse_header

    graph = BlockGraph()
    expected: dict[str, list[tuple[int, int]]] = {}
    for i in range(2):
        path = tmp_path / f"d{i}.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
        hdr = parse_header(path.read_bytes()[:4096])
        expected[str(path)] = [(0, 4096), (hdr.l1_table_offset, hdr.l1_size * 8),
                               (hdr.refcount_table_offset, hdr.refcount_table_clusters * hdr.cluster_size)]
        graph.open({"driver": "qcow2", "node-name": f"d{i}", "file": file_spec(path)}, inactive=True)
    graph.open({"driver": "raw", "node-name": "r", "file": file_spec(tmp_path / "d0.qcow2", locking="off")},
               inactive=True)

    calls: list[tuple[str, str, list[tuple[int, int]]]] = []
    prefetch, reread = FileDriver.prefetch, Qcow2Driver.invalidate_cache

    def spy_prefetch(self: FileDriver, ranges: list[tuple[int, int]]) -> None:
        calls.append(("prefetch", self.filename, list(ranges)))
        prefetch(self, ranges)

    def spy_reread(self: Qcow2Driver) -> None:
        assert self.file is not None
        calls.append(("reread", self.file.filename, []))
        reread(self)

    monkeypatch.setattr(FileDriver, "prefetch", spy_prefetch)
    monkeypatch.setattr(Qcow2Driver, "invalidate_cache", spy_reread)
    graph.activate_all()
    # Every image's metadata is asked for before any of it is re-read (a raw parent
    # reads no metadata: nothing to ask for).
    assert calls == [("prefetch", name, ranges) for name, ranges in expected.items()] + \
        [("reread", name, []) for name in expected]

    calls.clear()
    graph.invalidate_cache(graph.nodes["d1"])
    assert calls == [("prefetch", str(tmp_path / "d1.qcow2"), expected[str(tmp_path / "d1.qcow2")]),
                     ("reread", str(tmp_path / "d1.qcow2"), [])]


def test_invalidating_an_active_node_keeps_what_was_written(tmp_path: Path, qemu_img: str) -> None:
    image = tmp_path / "a.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    graph = BlockGraph()
    node = graph.open({"driver": "qcow2", "node-name": "a", "file": file_spec(image)})
    # Allocating writes leave dirty L2 and refcount blocks in the caches.
    for i in range(16):
        node.pwrite(i << 20, bytes([i + 1]) * 4096)
    graph.invalidate_cache(node)
    for i in range(16):
        assert node.pread(i << 20, 4096) == bytes([i + 1]) * 4096
    graph.close_all()
    check = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
