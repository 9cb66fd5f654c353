"""Live migration between two qmp-server processes over shared storage (issue 4).

Everything here is observed from outside, as a management tool sees it: QMP replies and
events, process exit status and messages, image bytes read by QEMU's qemu-io, qemu-img
check, and the lock bytes each process holds (from /proc). Phases that are too short to
act in are stretched with the documented test hook ``QMP_SERVER_TEST_MIGRATION_DELAY``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
import transcript
from migration_support import (
    Server,
    blockdev,
    external_write,
    held_lock_bytes,
    is_writer,
    qemu_img_check,
    qemu_img_create,
    read_pattern,
    start_server,
    start_servers,
)
from server_support import SERVER

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.qemu


@pytest.fixture
def image(tmp_path: Path) -> Path:
    qemu_tools.require("qemu-img")
    qemu_tools.require("qemu-io")
    path = tmp_path / "disk.qcow2"
    qemu_img_create(path)
    return path


@contextlib.contextmanager
def pair(tmp_path: Path, image: Path, *, src_args: tuple[str, ...] = (), dst_args: tuple[str, ...] = (),
         src_delays: str | None = None, dst_delays: str | None = None,
         dst_blockdev: list[str] | None = None, events: bool = True) -> Iterator[tuple[Server, Server]]:
    """A running source and a destination started with ``-incoming defer``, both on ``image``."""
    src = Server("src", [*blockdev(image), *src_args], tmp_path, delays=src_delays)
    dst = Server("dst", ["-incoming", "defer", *(dst_blockdev or blockdev(image)), *dst_args],
                 tmp_path, delays=dst_delays)
    try:
        for server in (src, dst):
            server.connect()
            if events:
                server.enable_events()
        yield src, dst
    finally:
        src.close()
        dst.close()


def listen(dst: Server, tmp_path: Path, name: str = "mig", *, exit_on_error: bool = True) -> str:
    """``migrate-incoming`` on a UNIX socket in ``tmp_path``; returns the URI."""
    uri = f"unix:{tmp_path / name}.sock"
    assert dst.cmd("migrate-incoming", uri=uri, exit_on_error=exit_on_error) == {}
    return uri


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def qemu_io(server: Server, command: str, node: str = "disk0") -> str:
    """A qemu-io command through HMP, as the guest's I/O stand-in."""
    return server.qemu_io(f'{node} "{command}"')


def completed(server: Server) -> bool:
    """Whether the server's last migration completed."""
    return bool(server.cmd("query-migrate").get("status") == "completed")


def check_clean(image: Path) -> None:
    """``qemu-img check`` finds nothing wrong."""
    result = qemu_img_check(image)
    assert result.returncode == 0 and "No errors were found on the image." in result.stdout, result.stdout


# The reference scenario --------------------------------------------------------------------


def _normalize(transcript: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop what differs by design between QEMU 7.2 and a guest-less QEMU 10.x look-alike.

    * MIGRATION_PASS: RAM iteration passes; there is no RAM here.
    * MIGRATION ``device``: the switchover state, always present since QEMU 10.0.
    * ``singlestep`` in query-status: removed in QEMU 9.0.
    """
    out = []
    for record in json.loads(json.dumps(transcript)):
        if "events" in record:
            record["events"] = [
                e for e in record["events"]
                if e["event"] != "MIGRATION_PASS"
                and not (e["event"] == "MIGRATION" and e["data"]["status"] == "device")]
            if not record["events"]:
                del record["events"]
        reply = record.get("reply")
        if isinstance(reply, dict) and isinstance(reply.get("return"), dict):
            reply["return"].pop("singlestep", None)
        out.append(record)
    return out


def test_reference_scenario_matches_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    qemu_tools.require("qemu-img")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours = transcript.run(transcript.scenario("migration"), SERVER)
    qemu = transcript.recorded("migration")
    assert _normalize(ours) == _normalize(qemu)


# The handoff ---------------------------------------------------------------------------------


def test_handoff_events_data_and_locks(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image) as (src, dst):
        assert dst.status() == "inmigrate"
        assert is_writer(src.pid, image) and held_lock_bytes(dst.pid, image) == set()
        assert "Failed to get" in external_write(image).stderr
        assert "wrote 65536/65536 bytes at offset 0" in qemu_io(src, "write -P 0xab 0 64k")
        assert "wrote 65536/65536 bytes at offset 1048576" in qemu_io(src, "write -P 0xac 1M 64k")
        assert src.cmd("query-migrate") == {}

        uri = listen(dst, tmp_path)
        assert dst.cmd("query-migrate") == {
            "socket-address": [{"path": str(tmp_path / "mig.sock"), "type": "unix"}], "status": "setup"}
        assert src.cmd("migrate", uri=uri) == {}
        assert src.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert dst.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:device",
                                "MIGRATION:completed"]
        assert dst.settle() == ["MIGRATION:setup", "MIGRATION:active", "RESUME", "MIGRATION:completed"]
        assert src.cmd("query-status") == {"status": "postmigrate", "running": False}
        assert dst.cmd("query-status") == {"status": "running", "running": True}

        info = src.cmd("query-migrate")
        assert info["status"] == "completed" and {"total-time", "downtime", "setup-time", "ram"} <= set(info)
        assert info["downtime"] <= info["total-time"]
        assert dst.cmd("query-migrate") == {"status": "completed"}

        # Exactly one writer: the destination. The source keeps only the shared read lock.
        assert is_writer(dst.pid, image) and not is_writer(src.pid, image)
        assert held_lock_bytes(src.pid, image) <= {100}
        assert "Failed to get" in external_write(image).stderr

        out = qemu_io(dst, "read -P 0xab 0 64k") + qemu_io(dst, "read -P 0xac 1M 64k")
        assert out.count("read 65536/65536 bytes") == 2 and "verification failed" not in out
        assert "wrote 65536/65536 bytes" in qemu_io(dst, "write -P 0xcd 2M 64k")
        assert "wrote" not in qemu_io(src, "write -P 0xee 0 64k")

        # The source cannot take the images back while the destination holds them.
        assert src.error("cont") == 'Failed to get "write" lock'
        assert src.status() == "postmigrate"
        assert src.error("migrate", uri=uri) == (
            "Can't migrate the vm that was paused due to previous migration")

        for server in (dst, src):
            server.cmd("quit")
            assert server.wait_exit() == 0
    check_clean(image)
    assert read_pattern(image, 0, 65536, 0xab)
    assert read_pattern(image, 1 << 20, 65536, 0xac)
    assert read_pattern(image, 2 << 20, 65536, 0xcd)


def test_stale_metadata_is_invalidated(tmp_path: Path, image: Path) -> None:
    # The destination opens the image (inactive) before the source allocates anything, so
    # everything it cached (L1, refcounts, free space) is stale by the time it takes over.
    dst = start_server(["-incoming", "defer", *blockdev(image)], tmp_path, "dst")
    src = start_server(blockdev(image), tmp_path, "src")
    try:
        offsets = [0, 9 << 20, 17 << 20, 33 << 20, 63 << 20]
        for i, offset in enumerate(offsets):
            assert "wrote" in qemu_io(src, f"write -P {0x10 + i:#x} {offset} 192k")
        dst.enable_events()
        src.cmd("migrate", uri=listen(dst, tmp_path))
        assert dst.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        for i, offset in enumerate(offsets):
            out = qemu_io(dst, f"read -P {0x10 + i:#x} {offset} 192k")
            assert "read 196608/196608" in out and "verification failed" not in out, out
        # New clusters must not land on the source's: the refcounts were re-read.
        more = [4 << 20, 12 << 20, 40 << 20, 50 << 20]
        for i, offset in enumerate(more):
            assert "wrote" in qemu_io(dst, f"write -P {0x40 + i:#x} {offset} 128k")
        dst.cmd("quit")
        dst.wait_exit()
    finally:
        src.close()
        dst.close()
    check_clean(image)
    for i, offset in enumerate(offsets):
        assert read_pattern(image, offset, 192 << 10, 0x10 + i)
    for i, offset in enumerate(more):
        assert read_pattern(image, offset, 128 << 10, 0x40 + i)


def test_no_split_brain_at_any_phase(tmp_path: Path, image: Path) -> None:
    """Sample both processes' lock bytes throughout a stretched handoff."""
    samples: list[tuple[bool, bool]] = []
    stop = threading.Event()
    with pair(tmp_path, image, src_delays="active=0.5,device=0.5,inactivated=0.3",
              dst_delays="incoming-end=0.3") as (src, dst):
        def sample() -> None:
            while not stop.is_set():
                samples.append((is_writer(src.pid, image), is_writer(dst.pid, image)))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            src.cmd("migrate", uri=listen(dst, tmp_path))
            src.wait_for("MIGRATION:active")
            assert "Failed to get" in external_write(image).stderr  # source still runs
            src.wait_for("MIGRATION:device")
            assert src.status() == "finish-migrate" and src.error("cont") == "Migration is not finalized yet"
            assert "Failed to get" in external_write(image).stderr  # stopped, not yet let go
            wait_until(lambda: not is_writer(src.pid, image), what="source inactivation")
            assert held_lock_bytes(dst.pid, image) == set() and dst.status() == "inmigrate"
            assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
            assert "Failed to get" in external_write(image).stderr  # destination runs
        finally:
            stop.set()
            sampler.join()
    assert not any(s and d for s, d in samples), "both sides held the write lock"
    # The order of ownership: source, nobody, destination.
    owners = [("src" if s else "dst" if d else "-") for s, d in samples]
    compact = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
    assert compact == ["src", "-", "dst"], compact
    check_clean(image)


def test_tcp_loopback_and_command_line_incoming(tmp_path: Path, image: Path) -> None:
    src, dst = start_servers([("src", blockdev(image)),
                              ("dst", ["-incoming", "tcp:127.0.0.1:0", *blockdev(image)])], tmp_path)
    try:
        address = dst.cmd("query-migrate")["socket-address"][0]
        assert address["type"] == "inet" and address["host"] == "127.0.0.1" and address["ipv4"] is True
        assert dst.error("migrate-incoming", uri="tcp:127.0.0.1:0") == (
            "The incoming migration has already been started")
        src.enable_events()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{address['port']}")
        assert src.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        wait_until(lambda: dst.status() == "running", what="destination running")
        assert dst.cmd("query-migrate") == {"status": "completed"}
    finally:
        src.close()
        dst.close()


def test_paused_destination_keeps_nodes_inactive_until_cont(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, dst_args=("-S",)) as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert src.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.cmd("query-status") == {"status": "paused", "running": False}
        assert "RESUME" not in dst.settle()
        # Nobody holds the images now: the handover waits for the management tool.
        assert held_lock_bytes(dst.pid, image) == set() and not is_writer(src.pid, image)
        assert dst.cmd("cont") == {}
        assert dst.wait_for("RESUME") == "RESUME" and is_writer(dst.pid, image)


def test_cont_and_stop_during_inmigrate_decide_autostart(tmp_path: Path, image: Path) -> None:
    # QEMU 10.x: cont during inmigrate only sets autostart; stop clears it.
    with pair(tmp_path, image, dst_args=("-S",)) as (src, dst):
        assert dst.cmd("cont") == {} and dst.status() == "inmigrate"
        src.cmd("migrate", uri=listen(dst, tmp_path))
        assert dst.wait_for("RESUME", "MIGRATION:completed") == "RESUME"
    with pair(tmp_path, image) as (src, dst):
        assert dst.cmd("stop") == {} and dst.status() == "inmigrate"
        src.cmd("migrate", uri=listen(dst, tmp_path))
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.status() == "paused"


def test_paused_source_hands_over_a_paused_vm(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image) as (src, dst):
        src.cmd("stop")
        src.cmd("migrate", uri=listen(dst, tmp_path))
        assert src.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert src.settle().count("STOP") == 1  # from `stop`; the migration itself is silent
        assert dst.status() == "paused" and "RESUME" not in dst.settle()
        assert held_lock_bytes(dst.pid, image) == set()


def test_events_only_with_the_capability(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, events=False) as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        dst.wait_for("RESUME")
        wait_until(lambda: src.status() == "postmigrate", what="postmigrate")
        assert src.cmd("query-migrate")["status"] == "completed"
        # Only the destination's setup event, which QEMU sends regardless.
        assert src.settle() == ["STOP"] and dst.settle() == ["MIGRATION:setup", "RESUME"]


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
@pytest.mark.parametrize("events", [False, True], ids=["plain", "events"])
def test_migrate_incoming_announces_its_setup(tmp_path: Path, qemu: bool, events: bool) -> None:
    # qemu_start_incoming_migration: MIGRATION setup goes out once whether or not the
    # 'events' capability is on (kept for compatibility), and nothing else before a source.
    if qemu:
        qemu_tools.require("qemu-system-x86_64")
    server = start_server(["-incoming", "defer"], tmp_path, "dst", qemu=qemu)
    try:
        if events:
            server.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        assert server.cmd("migrate-incoming", uri=f"unix:{tmp_path / 'mig.sock'}") == {}
        assert server.settle(0.3) == ["MIGRATION:setup"]
    finally:
        server.close()


# Command errors -------------------------------------------------------------------------------


def test_command_errors(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, src_delays="active=1") as (src, dst):
        assert dst.error("migrate", uri="unix:/nowhere") == "Guest is waiting for an incoming migration"
        assert src.error("migrate-incoming", uri="unix:/nowhere") == (
            "'-incoming' was not specified on the command line")
        assert src.error("migrate", uri="bogus:x") == "unknown migration protocol: bogus:x"
        assert src.error("migrate", uri="unix:") == "invalid Unix socket address"
        assert src.error("migrate", uri="tcp:foo") == "error parsing address 'foo'"
        assert dst.error("migrate-incoming", uri="unix:/nonexistent/dir/x.sock") == (
            "Failed to bind socket to /nonexistent/dir/x.sock: No such file or directory")
        assert src.cmd("migrate_cancel") == {}
        assert src.cmd("query-migrate") == {} and src.settle() == []

        src.cmd("migrate", uri=listen(dst, tmp_path))
        src.wait_for("MIGRATION:active")
        assert src.error("migrate", uri="unix:/x") == "There's a migration process in progress"
        xbzrle = [{"capability": "xbzrle", "state": True}]
        assert src.error("migrate-set-capabilities", capabilities=xbzrle) == (
            "There's a migration process in progress")
        info = src.cmd("query-migrate")
        assert info["status"] == "active" and "expected-downtime" in info and "downtime" not in info
        assert src.wait_for("MIGRATION:completed") == "MIGRATION:completed"


def test_capabilities_and_parameters_round_trip(tmp_path: Path) -> None:
    server = start_server(["-incoming", "defer"], tmp_path, "vm")
    try:
        caps = server.cmd("query-migrate-capabilities")
        names = [c["capability"] for c in caps]
        assert {"events", "late-block-activate", "postcopy-ram", "multifd"} <= set(names)
        late = [{"capability": "late-block-activate", "state": True}]
        server.cmd("migrate-set-capabilities", capabilities=late)
        assert {c["capability"] for c in server.cmd("query-migrate-capabilities") if c["state"]} == {
            "late-block-activate"}
        assert server.error("migrate-set-capabilities",
                            capabilities=[{"capability": "postcopy-preempt", "state": True}]) == (
            "Postcopy preempt requires postcopy-ram")
        assert server.cmd("query-migrate-parameters")["downtime-limit"] == 300
        server.cmd("migrate-set-parameters", downtime_limit=100, max_bandwidth=1 << 20)
        params = server.cmd("query-migrate-parameters")
        assert params["downtime-limit"] == 100 and params["max-bandwidth"] == 1 << 20
        assert server.error("migrate-set-parameters", downtime_limit=3000000) == (
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms")
    finally:
        server.close()


def test_bad_incoming_on_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "qmp_server", "-qmp",
                             f"unix:{tmp_path}/q.sock,server=on,wait=off", "-incoming", "bogus:x"],
                            capture_output=True, text=True, cwd=REPO, timeout=20)
    assert result.returncode == 1
    assert result.stderr == "qmp-server: -incoming bogus:x: unknown migration protocol: bogus:x\n"


# Failure paths --------------------------------------------------------------------------------


def test_nobody_listening(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image) as (src, _dst):
        missing = tmp_path / "nobody-listens.sock"
        src.cmd("migrate", uri=f"unix:{missing}")
        assert src.wait_for("MIGRATION:failed") == "MIGRATION:failed"
        # QEMU 7.2's text, checked by experiment.
        assert src.cmd("query-migrate") == {
            "status": "failed", "error-desc": f"Failed to connect to '{missing}': No such file or directory"}
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:failed"]
        assert src.status() == "running" and is_writer(src.pid, image)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # bound, never listening: connection refused
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            src.wait_for("MIGRATION:failed")
        assert src.cmd("query-migrate")["error-desc"] == (
            f"Failed to connect to '127.0.0.1:{port}': Connection refused")


def test_mismatching_block_configuration_fails_cleanly(tmp_path: Path, image: Path) -> None:
    other = tmp_path / "other.qcow2"
    qemu_img_create(other)
    with pair(tmp_path, image, dst_blockdev=blockdev(other)) as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        assert src.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        expected = (f"Block configuration mismatch: node 'disk0' opens '{image}' on the source "
                    f"but '{other}' on the destination")
        assert src.cmd("query-migrate") == {"status": "failed", "error-desc": expected}
        # Nothing was handed over: the source never stopped.
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"]
        assert src.status() == "running" and is_writer(src.pid, image)
        # Default exit-on-error: the destination exits like QEMU, status 1, error on stderr.
        assert dst.wait_exit() == 1
        assert f"qmp-server: load of migration failed: {expected}\n" in dst.log()
        # Its clients were told before it went (QEMU flushes its monitors on exit).
        assert dst.settle()[-1] == "MIGRATION:failed"


def test_failed_incoming_without_exit_can_be_retried(tmp_path: Path, image: Path) -> None:
    other = tmp_path / "other.qcow2"
    qemu_img_create(other)
    with pair(tmp_path, image, dst_blockdev=blockdev(other, node="disk1")) as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path, exit_on_error=False))
        assert dst.wait_for("MIGRATION:failed") == "MIGRATION:failed"
        error = (f"Block configuration mismatch: node 'disk0' of the source opens '{image}', "
                 "which no node of the destination opens")
        assert dst.cmd("query-migrate") == {"status": "failed", "error-desc": error}
        assert src.wait_for("MIGRATION:failed") == "MIGRATION:failed"
        assert src.cmd("query-migrate")["error-desc"] == error
        assert dst.status() == "inmigrate" and held_lock_bytes(dst.pid, image) == set()
        # Fix the configuration and try again (a deliberate extension: QEMU allows one try).
        dst.cmd("blockdev-del", node_name="disk1")
        dst.cmd("blockdev-add", driver="qcow2", node_name="disk0",
                file={"driver": "file", "filename": str(image)})
        src.cmd("migrate", uri=listen(dst, tmp_path, "mig2"))
        assert src.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.status() == "running" and is_writer(dst.pid, image)


def test_migrate_cancel_while_active(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, src_delays="active=10") as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        src.wait_for("MIGRATION:active")
        assert src.cmd("migrate_cancel") == {}
        assert src.wait_for("MIGRATION:cancelled") == "MIGRATION:cancelled"
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:cancelling",
                                "MIGRATION:cancelled"]
        assert src.cmd("query-migrate") == {"status": "cancelled"}
        assert src.status() == "running" and is_writer(src.pid, image)
        assert dst.wait_exit() == 1
        assert "qmp-server: load of migration failed: Migration cancelled by the source\n" in dst.log()


def test_cancel_after_inactivation_resumes_the_source(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, src_delays="inactivated=10") as (src, dst):
        qemu_io(src, "write -P 0x77 0 64k")
        src.cmd("migrate", uri=listen(dst, tmp_path))
        src.wait_for("MIGRATION:device")
        wait_until(lambda: not is_writer(src.pid, image), what="source inactivation")
        assert src.cmd("migrate_cancel") == {}
        src.wait_for("MIGRATION:cancelled")
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:device",
                                "MIGRATION:cancelling", "RESUME", "MIGRATION:cancelled"]
        assert src.status() == "running" and is_writer(src.pid, image)
        out = qemu_io(src, "read -P 0x77 0 64k") + qemu_io(src, "write -P 0x78 64k 64k")
        assert "verification failed" not in out and "wrote 65536/65536" in out
        assert dst.wait_exit() == 1
        assert "RESUME" not in dst.labels()
    check_clean(image)


def test_destination_killed_after_source_inactivated(tmp_path: Path, image: Path) -> None:
    # The source watches the stream during the delay: the kill ends it early.
    with pair(tmp_path, image, src_delays="inactivated=5") as (src, dst):
        qemu_io(src, "write -P 0x31 0 128k")
        src.cmd("migrate", uri=listen(dst, tmp_path))
        src.wait_for("MIGRATION:device")
        wait_until(lambda: not is_writer(src.pid, image), what="source inactivation")
        dst.kill()
        assert src.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        src.wait_for("RESUME")
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:device",
                                "MIGRATION:failed", "RESUME"]
        info = src.cmd("query-migrate")
        assert info["status"] == "failed" and info["error-desc"]
        assert src.status() == "running" and is_writer(src.pid, image)
        out = qemu_io(src, "read -P 0x31 0 128k") + qemu_io(src, "write -P 0x32 128k 64k")
        assert "verification failed" not in out and "wrote 65536/65536" in out
        src.cmd("quit")
        src.wait_exit()
    check_clean(image)
    assert read_pattern(image, 0, 128 << 10, 0x31) and read_pattern(image, 128 << 10, 64 << 10, 0x32)


def test_destination_killed_while_active(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, src_delays="active=5") as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        src.wait_for("MIGRATION:active")
        dst.kill()
        assert src.wait_for("MIGRATION:failed") == "MIGRATION:failed"
        # Caught before the switchover: the VM never stopped.
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"]
        assert src.status() == "running" and is_writer(src.pid, image)


def test_source_stays_stopped_when_it_cannot_take_the_images_back(tmp_path: Path, image: Path) -> None:
    # The worst race: the destination already runs, the source has not heard so yet.
    with pair(tmp_path, image, dst_delays="incoming-ack=1") as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        dst.wait_for("RESUME")
        assert src.cmd("migrate_cancel") == {}
        src.wait_for("MIGRATION:cancelled")
        assert src.settle() == ["MIGRATION:setup", "MIGRATION:active", "STOP", "MIGRATION:device",
                                "MIGRATION:cancelling", "MIGRATION:cancelled"]
        assert src.cmd("query-migrate") == {
            "status": "cancelled",
            "error-desc": 'Could not re-activate the block devices: Failed to get "write" lock'}
        # Not resumed, and cont is refused: the destination's copy is the live one now.
        assert src.status() == "finish-migrate" and src.error("cont") == "Migration is not finalized yet"
        assert is_writer(dst.pid, image) and not is_writer(src.pid, image)
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.status() == "running"


def test_source_killed_after_inactivation(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, src_delays="inactivated=10") as (src, dst):
        qemu_io(src, "write -P 0x41 0 64k")
        src.cmd("migrate", uri=listen(dst, tmp_path, exit_on_error=False))
        src.wait_for("MIGRATION:device")
        wait_until(lambda: not is_writer(src.pid, image), what="source inactivation")
        src.kill()
        assert dst.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        # The destination never runs on a half-handed-over image and never takes the locks.
        assert dst.settle() == ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"]
        assert dst.status() == "inmigrate" and held_lock_bytes(dst.pid, image) == set()
        assert dst.cmd("query-migrate") == {
            "status": "failed",
            "error-desc": ("Migration stream truncated: the source closed the connection "
                           "before the end marker")}
    # The source flushed before letting go, so the image is consistent.
    check_clean(image)
    assert read_pattern(image, 0, 65536, 0x41)


def test_destination_activation_failure(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image, dst_delays="incoming-end=2") as (src, dst):
        src.cmd("migrate", uri=listen(dst, tmp_path))
        src.wait_for("MIGRATION:device")
        wait_until(lambda: not is_writer(src.pid, image), what="source inactivation")
        # A third party grabs the image in the gap where nobody holds it.
        intruder = subprocess.Popen(["qemu-io", "-c", "sleep 20000", str(image)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: is_writer(intruder.pid, image), what="intruder lock")
            assert dst.wait_for("MIGRATION:completed", timeout=20) == "MIGRATION:completed"
            assert dst.status() == "paused" and "RESUME" not in dst.settle()
            # Inactive again: at most the shared "consistent read" byte, as on a source.
            assert held_lock_bytes(dst.pid, image) <= {100}
            assert 'qmp-server: Failed to get "write" lock' in dst.log()
            assert dst.cmd("query-migrate") == {"status": "completed",
                                                "error-desc": 'Failed to get "write" lock'}
            assert dst.error("cont") == 'Failed to get "write" lock'
            assert src.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        finally:
            intruder.kill()
            intruder.wait()
        assert dst.cmd("cont") == {} and dst.wait_for("RESUME") == "RESUME"


def test_garbage_and_foreign_versions_are_refused(tmp_path: Path, image: Path) -> None:
    with pair(tmp_path, image) as (src, dst):
        uri = listen(dst, tmp_path)
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(uri[len("unix:"):])
            peer.sendall(b"QEVM\x00\x00\x00\x03")  # a QEMU stream
        assert dst.wait_exit() == 1
        assert "load of migration failed: Not a qmp-server migration stream (bad magic)" in dst.log()

        # A destination speaking another version answers with its header; the source refuses.
        fake = tmp_path / "fake.sock"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(fake))
            server.listen(1)
            src.cmd("migrate", uri=f"unix:{fake}")
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"QMPSMIG\n\x00\x02")
                assert src.wait_for("MIGRATION:failed") == "MIGRATION:failed"
        assert src.cmd("query-migrate")["error-desc"] == (
            "The destination speaks migration stream version 2, this server speaks version 1")
        assert src.status() == "running"


def test_destination_refuses_another_version(tmp_path: Path) -> None:
    dst = start_server(["-incoming", "defer"], tmp_path, "dst")
    try:
        uri = listen(dst, tmp_path, exit_on_error=False)
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(uri[len("unix:"):])
            peer.sendall(b"QMPSMIG\n\x00\x09")
            peer.settimeout(10)
            data = b""
            while chunk := peer.recv(4096):
                data += chunk
        assert data.startswith(b"QMPSMIG\n\x00\x01F")
        body = json.loads(data[15:])
        assert body == {"error": "Unsupported migration stream version 9 (this server supports version 1)"}
        assert dst.cmd("query-migrate")["error-desc"] == body["error"]
    finally:
        dst.close()


# Ping-pong ------------------------------------------------------------------------------------


def test_ping_pong_twenty_rounds(tmp_path: Path, image: Path) -> None:
    rounds = 20
    current = start_server(blockdev(image), tmp_path, "vm0")
    servers = [current]
    try:
        nxt = Server("vm1", ["-incoming", f"unix:{tmp_path}/in1.sock", *blockdev(image)], tmp_path)
        for n in range(1, rounds + 1):
            servers.append(nxt)
            dst = nxt
            # Start the following destination now, so its start-up overlaps this round.
            if n < rounds:
                incoming = (["-incoming", f"unix:{tmp_path}/in{n + 1}.sock"] if n % 2 else
                            ["-incoming", "defer"])
                nxt = Server(f"vm{n + 1}", [*incoming, *blockdev(image)], tmp_path)
            assert "wrote 65536/65536" in qemu_io(current, f"write -P {n:#x} {n * 65536} 64k")
            dst.connect()
            dst.enable_events()
            uri = f"unix:{tmp_path}/in{n}.sock"
            if dst.cmd("query-migrate") == {}:
                uri = listen(dst, tmp_path, f"in{n}")
            current.cmd("migrate", uri=uri)
            assert dst.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
            assert dst.status() == "running" and is_writer(dst.pid, image)
            assert not is_writer(current.pid, image)
            wait_until(functools.partial(completed, current), what="source completion")
            current.cmd("quit")
            assert current.wait_exit() == 0
            current = dst
        assert "wrote" in qemu_io(current, "write -P 0xff 0 64k")
        current.cmd("quit")
        assert current.wait_exit() == 0
    finally:
        for server in servers:
            server.close()
        if nxt not in servers:
            nxt.close()
    check_clean(image)
    assert read_pattern(image, 0, 65536, 0xff)
    for n in range(1, rounds + 1):
        assert read_pattern(image, n * 65536, 65536, n), f"round {n}"


# The example ----------------------------------------------------------------------------------


def test_example_script(tmp_path: Path) -> None:
    qemu_tools.require("qemu-img")
    pytest.importorskip("qemu.qmp")
    script = REPO / "examples" / "migrate.py"
    result = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "destination read back the source's data" in result.stdout
    assert 'source can no longer take the image: Failed to get "write" lock' in result.stdout


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_migrate_start_postcopy(tmp_path: Path, qemu: bool) -> None:
    # QEMU's qmp_migrate_start_postcopy: a postcopy capability (postcopy-ram or
    # dirty-bitmaps) and a started migration, else its texts; a finished migration is no
    # error. Without guest RAM the migration completes as precopy on both.
    if qemu:
        qemu_tools.require("qemu-system-x86_64")
    server = start_server([], tmp_path, "vm", qemu=qemu)

    def attempt() -> tuple[Any, str]:
        reply = server.client.execute("migrate-start-postcopy")
        return reply.get("error", {}).get("desc", reply), server.hmp("migrate_start_postcopy")

    try:
        seen = [attempt()]
        for capability in ("postcopy-ram", "dirty-bitmaps"):
            server.cmd("migrate-set-capabilities", capabilities=[
                {"capability": name, "state": name == capability}
                for name in ("postcopy-ram", "dirty-bitmaps")])
            seen.append(attempt())
        server.cmd("migrate", uri=f"exec:cat > {tmp_path / 'stream'}")
        deadline = time.monotonic() + 20
        while server.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        seen.append(attempt())
        assert server.client.execute("migrate-start-postcopy", {"x": 1})["error"]["desc"] == (
            "Parameter 'x' is unexpected")
    finally:
        server.close()
    enable = "Enable postcopy with migrate_set_capability before the start of migration"
    started = "Postcopy must be started after migration has been started"
    assert seen == [(enable, f"Error: {enable}\r\n"), (started, f"Error: {started}\r\n"),
                    (started, f"Error: {started}\r\n"), ({"return": {}}, "")]
