"""Migration behaviours the mutation audit found unpinned (issue 8, section 6).

Each test here kills mutants of ``qmp_server/migration/source.py`` or ``destination.py``
that the rest of the suite let through (docs/testing.md, "Mutation testing"). Where QEMU
shows the behaviour, the test runs QEMU 7.2 beside our server and compares what a
management tool sees: QMP replies, events, run states, stderr, lock bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from migration_support import (
    Server,
    blockdev,
    held_lock_bytes,
    is_writer,
    qemu_img_create,
    start_server,
)
from server_support import Client

pytestmark = pytest.mark.qemu

#: What each program puts before an error_report line.
PREFIX = {True: "qemu-system-x86_64: ", False: "qmp-server: "}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    qemu_tools.require("qemu-img")
    path = tmp_path / "disk.qcow2"
    qemu_img_create(path)
    return path


def error_lines(server: Server, qemu: bool) -> list[str]:
    """The error_report lines the process printed, without the program's prefix."""
    prefix = PREFIX[qemu]
    return [line[len(prefix):] for line in server.log().splitlines() if line.startswith(prefix)]


# --- the stderr line of a failed migration ----------------------------------------------


def _wait_for_error_line(server: Server, qemu: bool) -> None:
    # QEMU prints from migrate_fd_cleanup, a bottom half that may run after the event.
    deadline = time.monotonic() + 10
    while not error_lines(server, qemu):
        assert time.monotonic() < deadline, f"{server.name}: no error line: {server.log()!r}"
        time.sleep(0.01)


def _failed_migration(tmp_path: Path, qemu: bool, how: str) -> tuple[str, list[str]]:
    """Fail an outgoing migration ``how``; return its error-desc and the stderr lines."""
    src = start_server([], tmp_path, f"{'qemu' if qemu else 'ours'}-{how}", qemu=qemu)
    try:
        src.enable_events()
        target = tmp_path / f"{how}.sock"  # the same path for both programs
        if how == "nobody-listens":
            src.cmd("migrate", uri=f"unix:{target}")
        else:  # the destination accepts, then hangs up without a word
            with socket.socket(socket.AF_UNIX) as listener:
                listener.bind(str(target))
                listener.listen(1)
                src.cmd("migrate", uri=f"unix:{target}")
                conn, _ = listener.accept()
                conn.close()
            target.unlink()
        assert src.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        desc: str = src.cmd("query-migrate")["error-desc"]
        assert src.status() == "running"
        _wait_for_error_line(src, qemu)
        src.cmd("quit")
        src.wait_exit()
        return desc, error_lines(src, qemu)
    finally:
        src.close()


def test_a_failed_migration_prints_its_error_once_on_stderr_like_qemu(tmp_path: Path) -> None:
    # QEMU 7.2's migrate_fd_cleanup prints the migration's error (its error-desc) with
    # error_report, once, when the migration ends failed; checked live here.
    qemu_tools.require("qemu-system-x86_64")
    qemu_desc, qemu_lines = _failed_migration(tmp_path, True, "nobody-listens")
    our_desc, our_lines = _failed_migration(tmp_path, False, "nobody-listens")
    assert qemu_lines == [qemu_desc]
    assert our_lines == qemu_lines == [our_desc]


def test_a_destination_that_hangs_up_is_reported_once_on_stderr(tmp_path: Path) -> None:
    # QEMU 7.2 prints "Unable to write to socket: Broken pipe" when its write comes after
    # the hang-up (it may also finish writing first, and complete); our handshake always
    # notices. The text depends on who wins the race (QEMU's, a read error, or "The
    # destination closed the migration stream"); the line is always the error-desc, once.
    desc, lines = _failed_migration(tmp_path, False, "destination-hangs-up")
    assert desc and lines == [desc]


def test_a_cancelled_migration_prints_nothing(tmp_path: Path, image: Path) -> None:
    # A cancel is no error: QEMU's migrate_fd_cancel sets none, so nothing is printed.
    src = Server("src", blockdev(image), tmp_path, delays="active=10")
    dst = Server("dst", ["-incoming", "defer", *blockdev(image)], tmp_path)
    try:
        src.enable_events()
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri, exit_on_error=False)
        src.cmd("migrate", uri=uri)
        src.wait_for("MIGRATION:active")
        src.cmd("migrate_cancel")
        assert src.wait_for("MIGRATION:cancelled", "MIGRATION:failed") == "MIGRATION:cancelled"
        src.cmd("quit")
        src.wait_exit()
        assert error_lines(src, False) == []
    finally:
        src.close()
        dst.close()


# --- a source that was never started ------------------------------------------------------


@contextlib.contextmanager
def _migrate_never_started(tmp_path: Path, image: Path, qemu: bool) -> Iterator[tuple[Server, Server]]:
    tag = "qemu" if qemu else "ours"
    src = Server(f"{tag}-src", ["-S", *blockdev(image)], tmp_path, qemu=qemu)
    dst = Server(f"{tag}-dst", ["-incoming", "defer", *blockdev(image)], tmp_path, qemu=qemu)
    try:
        for server in (src, dst):
            server.enable_events()
        assert src.status() == "prelaunch"
        uri = f"unix:{tmp_path / tag}-mig.sock"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        assert src.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert dst.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        yield src, dst
    finally:
        src.close()
        dst.close()


def _observe(src: Server, dst: Server) -> dict[str, Any]:
    def status(server: Server) -> dict[str, Any]:
        reply: dict[str, Any] = server.cmd("query-status")
        reply.pop("singlestep", None)  # removed in QEMU 9.0
        return reply

    def kinds(server: Server) -> list[str]:
        # MIGRATION_PASS (RAM passes) and MIGRATION "device" (QEMU >= 10.0) differ by design.
        return [e for e in server.settle() if e not in ("MIGRATION_PASS", "MIGRATION:device")]

    return {"src": status(src), "dst": status(dst), "src-events": kinds(src), "dst-events": kinds(dst)}


def test_a_never_started_source_hands_over_prelaunch(tmp_path: Path, image: Path) -> None:
    # QEMU 7.2, checked live: the destination takes the run state from the global state
    # (process_incoming_migration_bh: runstate_set(global_state_get_runstate())), so a
    # source started with -S and never continued leaves the destination in prelaunch, not
    # paused; `cont` then runs it.
    qemu_tools.require("qemu-system-x86_64")
    with _migrate_never_started(tmp_path, image, qemu=True) as (src, dst):
        qemu = _observe(src, dst)
    with _migrate_never_started(tmp_path, image, qemu=False) as (src, dst):
        ours = _observe(src, dst)
        assert ours == qemu
        assert ours["dst"] == {"status": "prelaunch", "running": False}
        assert ours["src"] == {"status": "postmigrate", "running": False}
        # QEMU 10.x (not 7.2) keeps a destination that does not run inactive: no write
        # lock until `cont`, which activates and runs it.
        assert not is_writer(dst.pid, image)
        assert dst.cmd("cont") == {}
        assert dst.wait_for("RESUME") == "RESUME"
        assert dst.status() == "running" and is_writer(dst.pid, image)
        assert held_lock_bytes(src.pid, image) <= {100}


# --- a global state the destination cannot take ---------------------------------------------


#: Our stream's header, version 1 (qmp_server/migration/stream.py).
HEADER = b"QMPSMIG\n\x00\x01"


def _frame(kind: bytes, payload: object) -> bytes:
    """One frame of our stream, encoded as the server encodes it (compact JSON)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return kind + struct.pack(">I", len(body)) + body


def _read_frames(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize("runstate", ["debug", "save-vm", "no-such-state"])
def test_a_run_state_the_destination_cannot_enter_leaves_it_paused(tmp_path: Path, runstate: str) -> None:
    # A peer that is not our source may send a run state that QEMU's transition table
    # forbids from inmigrate (QEMU would abort()), or one we do not know (QEMU's
    # global_state_post_load fails the load). Our destination takes neither and does not
    # crash: it completes paused and keeps serving QMP.
    dst = start_server(["-incoming", "defer"], tmp_path, "dst")
    try:
        dst.enable_events()
        path = tmp_path / "mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{path}")
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(str(path))
            peer.sendall(HEADER + _frame(b"C", {"nodes": []}))
            peer.sendall(_frame(b"G", {"runstate": runstate, "running": False}) + _frame(b"E", {}))
            data = _read_frames(peer)
        # Accepted, then acknowledged from the state it did enter.
        assert data == HEADER + _frame(b"A", {}) + _frame(b"K", {"runstate": "paused", "running": False})
        assert dst.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert dst.cmd("query-status") == {"status": "paused", "running": False}
        assert "RESUME" not in dst.settle()
    finally:
        dst.close()


# --- a failed inactivation fails the migration with QEMU's text --------------------------

#: Loaded by every Python process started with this directory on PYTHONPATH: once the
#: file named by QMP_TEST_EIO_FLAG exists, fdatasync fails with EIO (a disk error).
EIO_HOOK = '''
import errno, os
_flag = os.environ.get("QMP_TEST_EIO_FLAG")
if _flag:
    _real = os.fdatasync
    def _fdatasync(fd):
        if os.path.exists(_flag):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        _real(fd)
    os.fdatasync = _fdatasync
'''


def test_a_disk_error_while_inactivating_fails_the_migration_and_resumes_the_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qemu_tools.require("qemu-img")
    qemu_tools.require("qemu-io")
    path = tmp_path / "lazy.qcow2"
    # Lazy refcounts: the dirty bit stays set until inactivation clears it, so inactivation
    # writes the header and syncs it after the switchover's flush has succeeded.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(path), "16M"],
                   check=True)
    args = ["-blockdev", f"driver=qcow2,node-name=disk0,lazy-refcounts=on,file.driver=file,"
                         f"file.filename={path}"]
    dst = Server("dst", ["-incoming", "defer", *args], tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(EIO_HOOK)
    flag = tmp_path / "eio"
    monkeypatch.setenv("PYTHONPATH", f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("QMP_TEST_EIO_FLAG", str(flag))
    src = Server("src", args, tmp_path, delays="device=3")
    try:
        for server in (src, dst):
            server.enable_events()
        src.hmp('qemu-io disk0 "write -P 0x55 0 64k"')
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        src.wait_for("MIGRATION:device")  # stopped and flushed; inactivation next
        flag.touch()
        assert src.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        # QEMU 10.x's migration_switchover_start text.
        error = "Block inactivate failed during switchover"
        assert src.cmd("query-migrate") == {"status": "failed", "error-desc": error}
        assert src.wait_for("RESUME") == "RESUME" and src.status() == "running"
        assert error_lines(src, False) == ["migration_block_inactivate: Input/output error", error]
        assert is_writer(src.pid, path) and not is_writer(dst.pid, path)
        # The destination is told why and exits as QEMU does on a failed load.
        assert dst.wait_exit() == 1
        assert (f"qmp-server: load of migration failed: The source failed the migration: {error}\n"
                in dst.log())
    finally:
        src.close()
        dst.close()


# --- query-migrate while a cancel takes the images back ----------------------------------


def test_query_migrate_answers_while_a_cancel_takes_the_images_back(tmp_path: Path, image: Path) -> None:
    # Management tools poll query-migrate until a cancel is over. Here the re-activation
    # has to wait for the graph (a qemu-io command on another monitor holds it), so the
    # poll lands in "cancelling": it must still answer, with the stream's figures.
    src = Server("src", blockdev(image), tmp_path, delays="inactivated=10")
    dst = Server("dst", ["-incoming", "defer", *blockdev(image)], tmp_path)
    other = None
    try:
        for server in (src, dst):
            server.enable_events()
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri, exit_on_error=False)
        src.cmd("migrate", uri=uri)
        src.wait_for("MIGRATION:device")
        deadline = time.monotonic() + 10
        while is_writer(src.pid, image):
            assert time.monotonic() < deadline, "source inactivation"
            time.sleep(0.01)
        before = src.cmd("query-migrate")
        assert before["status"] == "device" and before["ram"]["transferred"] > 0
        other = Client(src.sock)
        other.cmd("qmp_capabilities")
        other.send_raw(json.dumps({"execute": "human-monitor-command",
                                   "arguments": {"command-line": 'qemu-io disk0 "sleep 5000"'}}))
        time.sleep(1)  # the sleep holds the graph from now on
        src.cmd("migrate_cancel")
        # The destination heard of the cancel: the source is in its undo now, waiting.
        deadline = time.monotonic() + 10
        while dst.cmd("query-migrate").get("status") != "failed":
            assert time.monotonic() < deadline, "destination told of the cancel"
            time.sleep(0.01)
        assert dst.cmd("query-migrate")["error-desc"] == "Migration cancelled by the source"
        during = src.cmd("query-migrate")
        assert during["status"] == "cancelling"
        assert during["ram"]["transferred"] == before["ram"]["transferred"]
        assert src.wait_for("MIGRATION:cancelled", timeout=20) == "MIGRATION:cancelled"
        assert src.settle()[-3:] == ["MIGRATION:cancelling", "RESUME", "MIGRATION:cancelled"]
        assert src.status() == "running" and is_writer(src.pid, image)
        assert other.reply() == {"return": ""}
    finally:
        if other is not None:
            other.close()
        src.close()
        dst.close()


# --- a malformed stream is refused with its reason -----------------------------------------


@pytest.mark.parametrize(("frames", "error"), [
    (_frame(b"C", {"nodes": "disk0"}), "Migration stream corrupt: bad 'C' frame"),
    (_frame(b"C", {"nodes": [{"node-name": "disk0"}]}),
     "Migration stream corrupt: bad 'C' frame (node entry lacks node-name, driver or filename)"),
    (_frame(b"C", {"nodes": []}) + _frame(b"G", {"runstate": "running"}) + _frame(b"E", {}),
     "Migration stream corrupt: bad 'G' frame"),
])
def test_a_malformed_stream_is_refused_with_its_reason(tmp_path: Path, frames: bytes, error: str) -> None:
    # Our own stream format (docs/migration.md): the destination answers a frame it cannot
    # use with an 'F' frame naming the problem, and reports the same text in query-migrate.
    dst = start_server(["-incoming", "defer"], tmp_path, "dst")
    try:
        dst.enable_events()
        path = tmp_path / "mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{path}", exit_on_error=False)
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(str(path))
            peer.sendall(HEADER + frames)
            data = _read_frames(peer)
        accepted = b"G" in frames  # the configuration was fine
        assert data == HEADER + (_frame(b"A", {}) if accepted else b"") + _frame(b"F", {"error": error})
        assert dst.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        assert dst.cmd("query-migrate") == {"status": "failed", "error-desc": error}
        assert dst.status() == "inmigrate"
    finally:
        dst.close()


# --- a destination that already runs finishes the handover even when told to quit ----------


def test_quit_on_a_destination_that_already_runs_still_completes_the_source(
        tmp_path: Path, image: Path) -> None:
    # Once the destination has taken the images and run, the source must never resume:
    # its guest state is older than the disk now. A `quit` arriving before the
    # acknowledgement went out (stretched here with the test hook) must not swallow it.
    # QEMU's source does not even wait for the destination: it has completed already.
    src = Server("src", blockdev(image), tmp_path)
    dst = Server("dst", ["-incoming", "defer", *blockdev(image)], tmp_path, delays="incoming-ack=2")
    try:
        for server in (src, dst):
            server.enable_events()
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        assert dst.wait_for("RESUME") == "RESUME"
        assert is_writer(dst.pid, image)
        assert dst.cmd("quit") == {}
        assert dst.wait_exit() == 0
        assert src.wait_for("MIGRATION:completed", "MIGRATION:failed") == "MIGRATION:completed"
        assert src.status() == "postmigrate" and not is_writer(src.pid, image)
        assert "RESUME" not in src.settle()
    finally:
        src.close()
        dst.close()


# --- a failed load: the event first, one line, exit status 1 ---------------------------------


def test_a_failed_load_reports_once_and_exits_after_its_event(tmp_path: Path, image: Path) -> None:
    # QEMU (exit-on-error, the default) prints "load of migration failed: ..." and exits
    # with status 1. We let the clients read MIGRATION "failed" first, and print nothing
    # else: no traceback.
    other = tmp_path / "other.qcow2"
    qemu_img_create(other)
    src = Server("src", blockdev(image), tmp_path)
    dst = Server("dst", ["-incoming", "defer", *blockdev(other)], tmp_path)
    try:
        for server in (src, dst):
            server.enable_events()
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate", uri=uri)
        assert dst.wait_for("MIGRATION:failed", "MIGRATION:completed") == "MIGRATION:failed"
        assert dst.wait_exit() == 1
        error = (f"Block configuration mismatch: node 'disk0' opens '{image}' on the source "
                 f"but '{other}' on the destination")
        assert dst.log() == f"qmp-server: load of migration failed: {error}\n"
        assert src.wait_for("MIGRATION:failed") == "MIGRATION:failed" and src.status() == "running"
    finally:
        src.close()
        dst.close()
