"""Behaviours a user relies on that no other test pinned down (issue 8, section 6).

Each test here was written against a bug planted on purpose (a flipped condition, a
dropped flush, a swapped step, an off-by-one range) that the rest of the suite let
through; docs/testing.md lists them. Everything is observed from outside where possible:
QMP replies, image bytes read by ``qemu-io -r -U``, ``qemu-img check``, lock bytes seen
from another open file or from /proc.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lock_probe import locked
from migration_support import (
    Server,
    blockdev,
    held_lock_bytes,
    is_writer,
    qemu_img_check,
    qemu_img_create,
    read_pattern,
    start_server,
)
from qemu_tools import require
from server_support import running

from blocklayer.errors import BlockError
from blocklayer.lockbytes import (
    LockState,
    byte_locked_by_other,
    check_lock_bytes,
    lock_byte,
    lock_holder,
    unlock_byte,
)
from blocklayer.perm import ALL, CONSISTENT_READ, RESIZE, WRITE, WRITE_UNCHANGED
from qmp_server.errors import QMPError
from qmp_server.machine import Machine, MachineConfig

pytestmark = pytest.mark.qemu

WRITER = {100, 101, 103, 201, 203}


@pytest.fixture
def image(tmp_path: Path, qemu_utils: None) -> Path:
    path = tmp_path / "disk.qcow2"
    qemu_img_create(path, "16M")
    return path


@pytest.fixture
def server(tmp_path: Path, image: Path) -> Iterator[Server]:
    srv = start_server(blockdev(image), tmp_path)
    try:
        yield srv
    finally:
        srv.close()


def qemu_io(server: Server, command: str, node: str = "disk0") -> str:
    return server.qemu_io(f'{node} "{command}"')


def wait_until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def dirty_bit(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(72)
        return int(struct.unpack(">Q", f.read(8))[0] & 1)


def check_clean(path: Path) -> None:
    result = qemu_img_check(path)
    assert result.returncode == 0 and "No errors were found on the image." in result.stdout, result.stdout


# --- stop flushes for real --------------------------------------------------------------


def test_stop_writes_back_metadata_so_other_readers_see_the_data(server: Server, image: Path) -> None:
    qemu_io(server, "write -P 0x3c 1M 64k")
    # The new cluster's L2 entry is still only in the server's cache ...
    assert not read_pattern(image, 1 << 20, 65536, 0x3C)
    server.cmd("stop")
    # ... until `stop` flushes every node.
    assert read_pattern(image, 1 << 20, 65536, 0x3C)
    assert server.status() == "paused"


def _machine(**config: Any) -> Machine:
    machine = Machine(MachineConfig(**config))
    machine.vm.start_after_launch()
    return machine


async def test_stop_reaches_fdatasync(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = os.path.realpath(image)
    synced: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    machine = _machine()
    try:
        await machine.block.blockdev_add({"driver": "qcow2", "node-name": "disk0",
                                          "file": {"driver": "file", "filename": str(image)}})
        await machine.hmp.execute('qemu-io disk0 "write -P 0x11 0 4k"')
        synced.clear()
        await machine.vm.stop()
        assert target in synced
    finally:
        machine.block.close_all()


async def test_failed_fdatasync_keeps_failing_for_later_flushes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    calls: list[int] = []
    real = os.fdatasync

    def eio_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    machine = _machine()
    try:
        await machine.block.blockdev_add({"driver": "raw", "node-name": "disk0",
                                          "file": {"driver": "file", "filename": str(raw)}})
        await machine.hmp.execute('qemu-io disk0 "write -P 0x22 0 4k"')
        monkeypatch.setattr(os, "fdatasync", eio_once)
        # qemu-io prints nothing for a failed flush (its flush_f result is ignored) ...
        assert await machine.hmp.execute('qemu-io disk0 "flush"') == ""
        assert await machine.hmp.execute('qemu-io disk0 "flush"') == ""
        # ... but the failure sticks (QEMU's page_cache_inconsistent): the data may be
        # gone from the page cache, so nothing may claim it is durable now.
        with pytest.raises(QMPError, match="^Failed to inactivate all nodes: Input/output error$"):
            await machine.block.set_active(None, False)
        assert len(calls) == 1
    finally:
        machine.block.close_all()


# --- lazy refcounts: inactivation leaves a clean image ----------------------------------


def test_inactivating_a_lazy_refcounts_image_leaves_it_clean(tmp_path: Path, qemu_utils: None) -> None:
    path = tmp_path / "lazy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                    str(path), "16M"], check=True)
    srv = start_server([], tmp_path)
    try:
        srv.cmd("blockdev-add", driver="qcow2", node_name="disk0", lazy_refcounts=True,
                file={"driver": "file", "filename": str(path)})
        qemu_io(srv, "write -P 0x44 0 192k")
        qemu_io(srv, "flush")
        assert dirty_bit(path) == 1
        srv.cmd("blockdev-set-active", node_name="disk0", active=False)
        assert dirty_bit(path) == 0
        check_clean(path)
        assert read_pattern(path, 0, 192 * 1024, 0x44)
        assert held_lock_bytes(srv.pid, path) == {100}
    finally:
        srv.close()


# --- activation that fails after the locks were taken gives them back -------------------


def test_failed_activation_gives_the_locks_back(tmp_path: Path, qemu_utils: None) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img_create(a, "1M")
    qemu_img_create(b, "1M")
    srv = start_server(["-incoming", "defer", *blockdev(a, "disk0"), *blockdev(b, "disk1")], tmp_path)
    try:
        assert held_lock_bytes(srv.pid, a) == held_lock_bytes(srv.pid, b) == set()
        # The image changes under us while we are inactive.
        with open(b, "r+b") as f:
            f.write(b"XXXX")
        assert (srv.error("blockdev-set-active", node_name="disk1", active=True)
                == "Could not reopen qcow2 layer: Image is not in qcow2 format")
        # The write locks taken before the image was re-read are released again; only the
        # "consistent read" byte of the (now active) file node stays. QEMU 7.2 keeps all
        # five bytes on a node it has marked inactive again; see docs/testing.md.
        assert held_lock_bytes(srv.pid, b) == {100}
        assert locked(b) == [100]
        # Another process can write it.
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x51 0 4",
                              str(b)], capture_output=True, text=True)
        assert out.returncode == 0 and "Failed" not in out.stderr, out.stderr
    finally:
        srv.close()


def _reopen_failure(tmp_path: Path, *, qemu: bool) -> dict[str, Any]:
    """Activate a qcow2 node whose image went bad while inactive, then query it."""
    side = tmp_path / ("qemu" if qemu else "ours")
    side.mkdir()
    a, b = side / "a.qcow2", side / "b.qcow2"
    qemu_img_create(a, "1M")
    qemu_img_create(b, "1M")
    out: dict[str, Any] = {}
    with running(["-incoming", "defer", *blockdev(a, "disk0"), *blockdev(b, "disk1")], side,
                 qemu=qemu) as (proc, client):
        with open(b, "r+b") as f:
            f.write(b"XXXX")

        def activate() -> dict[str, Any]:
            # QEMU 7.2 activates on cont during inmigrate; we follow 10.x there (cont only
            # sets autostart), so blockdev-set-active (10.0) does it for us.
            if qemu:
                return client.execute("cont")
            return client.execute("blockdev-set-active", {"node-name": "disk1", "active": True})

        out["activate"] = activate()
        out["nodes"] = [client.execute("query-named-block-nodes", {"flat": flat})
                        for flat in (False, True)]
        out["info"] = client.hmp("info block -n")
        out["again"] = activate()
        out["del"] = client.execute("blockdev-del", {"node-name": "disk1"})
        nodes = client.execute("query-named-block-nodes")["return"]
        out["left"] = sorted(n["node-name"] for n in nodes if not n["node-name"].startswith("#"))
        client.execute("quit")
        proc.wait(timeout=10)
    return out


def test_a_qcow2_node_that_fails_to_reopen_is_ejected(tmp_path: Path, qemu_utils: None) -> None:
    require("qemu-system-x86_64")
    got, want = _reopen_failure(tmp_path, qemu=False), _reopen_failure(tmp_path, qemu=True)
    assert got == want
    assert want["activate"]["error"]["desc"] == (
        "Could not reopen qcow2 layer: Image is not in qcow2 format")
    # qcow2_co_invalidate_cache dropped the driver: the node cannot be described ...
    assert want["nodes"] == [{"error": {"class": "GenericError",
                                        "desc": "Block device disk1 is ejected"}}] * 2
    assert want["info"] == ""  # (HMP prints nothing at all then)
    # ... activating it again is silently nothing, and it can still be deleted.
    assert want["again"] == want["del"] == {"return": {}}
    assert want["left"] == ["disk0"]


def test_destination_whose_second_disk_fails_activation_gives_back_the_first(
        tmp_path: Path, qemu_utils: None) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img_create(a, "1M")
    qemu_img_create(b, "1M")
    disks = [*blockdev(a, "disk0"), *blockdev(b, "disk1")]
    src = Server("src", disks, tmp_path)
    dst = Server("dst", ["-incoming", "defer", *disks], tmp_path, delays="incoming-end=1.5")
    try:
        for side in (src, dst):
            side.connect()
            side.enable_events()
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        src.wait_for("MIGRATION:device")
        wait_until(lambda: not is_writer(src.pid, b), "source inactivation")
        with open(b, "r+b") as f:  # the second disk goes bad in the handover gap
            f.write(b"XXXX")
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.status() == "paused"
        assert held_lock_bytes(dst.pid, a) <= {100}
        assert held_lock_bytes(dst.pid, b) <= {100}
        assert dst.cmd("query-migrate")["error-desc"] == (
            "Could not reopen qcow2 layer: Image is not in qcow2 format")
        # Nobody writes the first disk now: another process can.
        out = subprocess.run(["qemu-io", "-c", "write -P 0x52 0 4k", str(a)],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "Failed" not in out.stderr, out.stderr
        check_clean(a)
    finally:
        src.close()
        dst.close()


# --- two format nodes on one file node ------------------------------------------------------


def test_two_format_nodes_on_one_file_node_conflict(server: Server, tmp_path: Path) -> None:
    other = tmp_path / "other.qcow2"
    qemu_img_create(other, "1M")
    server.cmd("blockdev-add", driver="file", node_name="f", filename=str(other))
    server.cmd("blockdev-add", driver="qcow2", node_name="a", file="f")
    # QEMU 7.2's texts, checked live. Both nodes use one descriptor, so the lock bytes
    # cannot see this: the graph's permission check must.
    assert server.error("blockdev-add", driver="qcow2", node_name="b", file="f") == (
        "Permission conflict on node 'f': permissions 'write, resize' are both required by "
        "node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node 'f' "
        "as 'file' child).")
    assert server.error("blockdev-add", driver="qcow2", node_name="c", file="f", read_only=True) == (
        "Permission conflict on node 'f': permissions 'write, resize' are both required by "
        "node 'a' (uses node 'f' as 'file' child) and unshared by node 'c' (uses node 'f' "
        "as 'file' child).")
    server.cmd("blockdev-add", driver="raw", node_name="r", file="f")  # a filter asks nothing
    names = {n["node-name"] for n in server.cmd("query-named-block-nodes")}
    assert "b" not in names and "c" not in names
    assert locked(other) == sorted(WRITER)


# --- a paused source whose migration fails after switchover -------------------------------


def test_paused_source_failing_after_switchover_stays_paused_and_can_continue(
        tmp_path: Path, image: Path) -> None:
    src = Server("src", blockdev(image), tmp_path, delays="inactivated=10")
    dst = Server("dst", ["-incoming", "defer", *blockdev(image)], tmp_path)
    try:
        for side in (src, dst):
            side.connect()
            side.enable_events()
        qemu_io(src, "write -P 0x61 0 64k")
        src.cmd("stop")
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        src.wait_for("MIGRATION:device")
        wait_until(lambda: not is_writer(src.pid, image), "source inactivation")
        dst.kill()
        assert src.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        # Re-activation takes the locks first, then leaves finish-migrate.
        wait_until(lambda: src.status() != "finish-migrate", "source re-activation")
        assert src.status() == "paused"
        assert held_lock_bytes(src.pid, image) == WRITER
        assert "RESUME" not in src.settle()
        assert src.cmd("cont") == {} and src.wait_for("RESUME") == "RESUME"
        assert src.status() == "running"
        out = qemu_io(src, "read -P 0x61 0 64k") + qemu_io(src, "write -P 0x62 64k 64k")
        assert "verification failed" not in out and "wrote 65536/65536" in out
    finally:
        src.close()
        dst.close()
    check_clean(image)


# --- lock probes over a range see the highest byte --------------------------------------


def _hold_bytes(path: Path, *offsets: int) -> subprocess.Popen[str]:
    code = ("import os, sys, time\n"
            "from blocklayer.lockbytes import lock_byte\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "for off in sys.argv[2:]: lock_byte(fd, int(off))\n"
            "print('held', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), *map(str, offsets)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.parametrize(("held", "error"), [
    (203, 'Failed to get "resize" lock'),
    (200, 'Failed to get "consistent read" lock'),
    (101, 'Failed to get shared "write" lock'),
    (103, 'Failed to get shared "resize" lock'),
])
def test_a_single_byte_at_either_end_of_the_probed_range_is_seen(
        tmp_path: Path, qemu_utils: None, held: int, error: str) -> None:
    path = tmp_path / "held.qcow2"
    qemu_img_create(path, "1M")
    holder = _hold_bytes(path, held)
    srv = start_server([], tmp_path)
    try:
        reply = srv.error("blockdev-add", driver="qcow2", node_name="d",
                          file={"driver": "file", "filename": str(path)})
        assert reply == error
        assert locked(path) == [held]  # our failed open left nothing behind
    finally:
        srv.close()
        holder.kill()
        holder.wait()


def test_check_sees_the_top_byte_of_each_range(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(bytes(4096))
    a, b = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        for offset, perm, shared, name in [
            (203, CONSISTENT_READ | RESIZE, ALL, 'Failed to get "resize" lock'),
            (203, WRITE | RESIZE, ALL, 'Failed to get "resize" lock'),
            (103, 0, CONSISTENT_READ | WRITE_UNCHANGED, 'Failed to get shared "resize" lock'),
            (102, 0, CONSISTENT_READ, 'Failed to get shared "write unchanged" lock'),
        ]:
            lock_byte(a, offset)
            with pytest.raises(BlockError, match=f"^{name}$"):
                check_lock_bytes(b, perm, shared)
            LockState(a).release_all()
            os.close(a)
            a = os.open(path, os.O_RDWR)
            check_lock_bytes(b, perm, shared)
    finally:
        os.close(a)
        os.close(b)


# --- lock bytes: what the mutation run of lockbytes.py found unpinned ---------------------


@pytest.fixture
def two_fds(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    path = tmp_path / "locks"
    path.write_bytes(bytes(4096))
    a, b = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    yield path, a, b
    os.close(a)
    os.close(b)


def test_releasing_one_byte_keeps_its_neighbour(two_fds: tuple[Path, int, int]) -> None:
    path, a, _ = two_fds
    state = LockState(a)
    state.apply(CONSISTENT_READ | WRITE, 0, unlock=True)
    state.apply(WRITE, 0, unlock=True)
    assert locked(path) == [101]
    lock_byte(a, 100)
    unlock_byte(a, 100)
    assert locked(path) == [101]


def test_shared_probe_ignores_shared_locks_and_reports_the_type(two_fds: tuple[Path, int, int]) -> None:
    _, a, b = two_fds
    lock_byte(a, 101)
    assert lock_holder(b, 101, exclusive=False) is None
    holder = lock_holder(b, 101)
    assert holder is not None and holder.type == fcntl.F_RDLCK


def test_lock_failures_carry_text_and_errno(two_fds: tuple[Path, int, int]) -> None:
    _, a, b = two_fds
    lock_byte(b, 100, exclusive=True)  # not what QEMU does, but someone might
    with pytest.raises(BlockError) as info:
        LockState(a).apply(CONSISTENT_READ, 0, unlock=False)
    assert (str(info.value), info.value.errno) == ("Failed to lock byte 100", errno.EAGAIN)
    fd = os.dup(a)
    os.close(fd)
    with pytest.raises(BlockError) as info:
        LockState(fd).apply(CONSISTENT_READ, 0, unlock=False)
    assert (str(info.value), info.value.errno) == ("Failed to lock byte 100: Bad file descriptor",
                                                   errno.EBADF)


def _locked_seen_from_another_process(path: Path) -> list[int]:
    # Probing from this process would close a descriptor of the file, and closing any
    # descriptor drops every POSIX lock the process holds on it.
    code = "import sys; from lock_probe import locked; print(locked(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent)
    return list(json.loads(out.stdout))


def test_posix_fallback_keeps_posix_semantics(two_fds: tuple[Path, int, int]) -> None:
    # Without OFD locks (old kernels) QEMU falls back to POSIX locks, which belong to the
    # process: our own descriptors never conflict, other processes see everything.
    path, a, b = two_fds
    state = LockState(a, ofd=False)
    state.apply(CONSISTENT_READ | WRITE, WRITE, unlock=True)
    LockState(b, ofd=False).check(ALL, 0)
    assert not byte_locked_by_other(b, 101, ofd=False)
    assert _locked_seen_from_another_process(path) == [100, 101, 201]
    state.apply(0, 0, unlock=True)
    assert _locked_seen_from_another_process(path) == []
    lock_byte(a, 102, ofd=False)
    unlock_byte(a, 102, ofd=False)
    assert _locked_seen_from_another_process(path) == []
    # Our own POSIX lock on 201 is no conflict; another process's 203 is, and is named.
    state.apply(0, WRITE, unlock=True)
    holder = _hold_bytes(path, 203)
    try:
        with pytest.raises(BlockError, match='^Failed to get "resize" lock$'):
            check_lock_bytes(b, WRITE | RESIZE, ALL, ofd=False)
    finally:
        holder.kill()
        holder.wait()


# --- backing chains: what a backing child asks and shares ----------------------------------


def test_backing_chain_locks_and_a_writable_shared_backing_node(tmp_path: Path, qemu_utils: None) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img_create(base, "1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    srv = start_server([], tmp_path)
    try:
        # The implicit backing node is read-only: it reads consistently and lets nobody
        # write or resize under it (QEMU 7.2, checked live).
        srv.cmd("blockdev-add", driver="qcow2", node_name="top",
                file={"driver": "file", "filename": str(top)})
        assert locked(base) == [100, 201, 203] and locked(top) == sorted(WRITER)
        srv.cmd("blockdev-del", node_name="top")
        # A writable node used as a backing child may still be written by others: the
        # overlay only reads it and shares write (QEMU 7.2 writes it too).
        srv.cmd("blockdev-add", driver="qcow2", node_name="b",
                file={"driver": "file", "filename": str(base)})
        srv.cmd("blockdev-add", driver="qcow2", node_name="top", backing="b",
                file={"driver": "file", "filename": str(top)})
        assert "wrote 4096/4096" in qemu_io(srv, "write -P 0x11 0 4k", "b")
        assert "verification failed" not in qemu_io(srv, "read -P 0x11 0 4k", "top")
    finally:
        srv.close()


# --- -incoming unix: removes only its own socket file ------------------------------------


def _stranger_socket(path: Path) -> socket.socket:
    """Another program's listening socket at ``path`` (after ours was moved away)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


def test_incoming_unix_socket_file_is_removed_only_while_ours(tmp_path: Path) -> None:
    mig, moved = tmp_path / "mig.sock", tmp_path / "moved.sock"
    # Nobody touches it: the migration takes its one connection and the file goes.
    srv = start_server(["-incoming", f"unix:{mig}"], tmp_path, name="plain")
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(mig))
            conn.sendall(b"not a migration stream")
            assert srv.wait_exit() == 1
        assert not mig.exists()
    finally:
        srv.close()
    # Ours is moved away and another socket put in its place before the source connects
    # (through the moved name): the migration ends, the stranger's socket stays.
    srv = start_server(["-incoming", f"unix:{mig}"], tmp_path, name="moved")
    try:
        mig.rename(moved)
        with _stranger_socket(mig), socket.socket(socket.AF_UNIX) as conn:
            identity = mig.stat().st_ino
            conn.connect(str(moved))
            conn.sendall(b"not a migration stream")
            assert srv.wait_exit() == 1
            assert mig.is_socket() and mig.stat().st_ino == identity
    finally:
        srv.close()
    mig.unlink()
    # The same when the server quits while still listening.
    srv = start_server(["-incoming", f"unix:{mig}"], tmp_path, name="quit")
    try:
        mig.unlink()
        with _stranger_socket(mig):
            identity = mig.stat().st_ino
            srv.client.execute("quit")
            assert srv.wait_exit() == 0
            assert mig.is_socket() and mig.stat().st_ino == identity
    finally:
        srv.close()


# --- a raw node with a window is a data child, not a filter ---------------------------------


def _raw_window_locks(tmp_path: Path, *, qemu: bool) -> list[list[int]]:
    side = tmp_path / ("qemu" if qemu else "ours")
    side.mkdir()
    image = side / "d.raw"
    image.write_bytes(bytes(1 << 20))
    seen = []
    with running([], side, qemu=qemu) as (_, client):
        for read_only in (False, True):
            for window in ({}, {"offset": 65536, "size": 524288}, {"offset": 65536}):
                reply = client.execute("blockdev-add", {
                    "driver": "raw", "node-name": "w", "read-only": read_only, **window,
                    "file": {"driver": "file", "filename": str(image)}})
                assert reply == {"return": {}}, reply
                seen.append(locked(image))
                client.execute("blockdev-del", {"node-name": "w"})
    return seen


def test_raw_node_with_a_window_keeps_the_file_from_being_resized(tmp_path: Path) -> None:
    require("qemu-system-x86_64")
    # raw_open: with offset/size the file child is DATA, not FILTERED; as data (not
    # metadata) it asks nothing without users and only refuses to share "resize".
    want = _raw_window_locks(tmp_path, qemu=True)
    assert want == [[], [203], [203]] * 2
    assert _raw_window_locks(tmp_path, qemu=False) == want


def _raw_backing_locks(tmp_path: Path, *, qemu: bool) -> list[tuple[list[int], list[int]]]:
    side = tmp_path / ("qemu" if qemu else "ours")
    side.mkdir()
    base, top = side / "base.raw", side / "top.qcow2"
    base.write_bytes(bytes(1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    seen = []
    with running([], side, qemu=qemu) as (_, client):
        for read_only in (False, True):
            reply = client.execute("blockdev-add", {
                "driver": "qcow2", "node-name": "top", "read-only": read_only,
                "file": {"driver": "file", "filename": str(top)}})
            assert reply == {"return": {}}, reply
            seen.append((locked(base), locked(top)))
            client.execute("blockdev-del", {"node-name": "top"})
    return seen


def test_raw_backing_file_of_an_overlay_nobody_reads_is_not_locked(
        tmp_path: Path, qemu_utils: None) -> None:
    require("qemu-system-x86_64")
    # A backing child reads consistently only if the overlay's users do (bdrv_default_perms
    # for COW children); a raw backing node adds no metadata read of its own (unlike a
    # qcow2 one), so nothing at all is locked on the base file.
    want = _raw_backing_locks(tmp_path, qemu=True)
    assert want == [([], sorted(WRITER)), ([], [100, 201, 203])]
    assert _raw_backing_locks(tmp_path, qemu=False) == want


# --- what a guest device refuses to share reaches the files below ---------------------------


def _device_locks(tmp_path: Path, share_rw: str, *, qemu: bool) -> list[list[int]]:
    side = tmp_path / f"{'qemu' if qemu else 'ours'}-{share_rw}"
    side.mkdir()
    window, base, top = side / "d.raw", side / "base.raw", side / "top.qcow2"
    window.write_bytes(bytes(1 << 20))
    base.write_bytes(bytes(1 << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    with running(["-machine", "pc", "-S"], side, qemu=qemu) as (_, client):
        client.cmd("blockdev-add", driver="raw", node_name="w", offset=65536,
                   file={"driver": "file", "filename": str(window)})
        client.cmd("blockdev-add", driver="qcow2", node_name="top",
                   file={"driver": "file", "filename": str(top)})
        for i, node in enumerate(("w", "top")):
            client.cmd("device_add", driver="virtio-blk-pci", drive=node, id=f"vd{i}",
                       **{"share-rw": share_rw})
        return [locked(window), locked(base), locked(top)]


@pytest.mark.parametrize("share_rw", ["off", "on"])
def test_devices_on_a_window_and_on_an_overlay_with_a_raw_backing_file(
        tmp_path: Path, qemu_utils: None, share_rw: str) -> None:
    require("qemu-system-x86_64")
    want = _device_locks(tmp_path, share_rw, qemu=True)
    # raw_child_perm: the window passes "write" down but adds no "resize" (no 103). A
    # device that does not share "write" keeps others from writing the window's file
    # (201) and, through the overlay's backing child, the raw backing file (201, 203).
    assert want == ([[100, 101, 201, 203], [100, 201, 203], sorted(WRITER)] if share_rw == "off"
                    else [[100, 101, 203], [100], sorted(WRITER)])
    assert _device_locks(tmp_path, share_rw, qemu=False) == want
