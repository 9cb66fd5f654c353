"""One-way migration streams (issue 11 §3): ``exec:CMD`` and ``file:PATH[,offset=N]``.

The source completes once the stream is written; the destination reads it whenever it
starts. QEMU's iotests (091, 196, 234, migrate-bitmaps-test) migrate this way. Where
QEMU 7.2 supports the transport (``exec:``) the same flow runs on QEMU and the
observations must agree; ``file:`` came with QEMU 8.2.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
from migration_support import (
    Server,
    blockdev,
    is_writer,
    qemu_img_check,
    qemu_img_create,
    read_pattern,
    start_server,
)
from qemu_tools import require


def _wait_status(server: Server, wanted: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := server.status()) != wanted:
        assert time.monotonic() < deadline, f"{server.name}: still {status}, not {wanted}"
        time.sleep(0.02)


def _wait_migration(server: Server, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (info := server.cmd("query-migrate")).get("status") not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"{server.name}: migration still {info}"
        time.sleep(0.02)
    result: dict[str, Any] = info
    return result


def _hand_over(tmp_path: Path, qemu: bool, outgoing: str, incoming: str,
               destination_first: bool) -> dict[str, Any]:
    """Source writes, migrates into ``outgoing``; a destination reading ``incoming``
    takes over. Returns what a user sees on both sides."""
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    seen: dict[str, Any] = {}
    src = start_server(blockdev(image), tmp_path, "src", qemu=qemu)
    dst: Server | None = None
    try:
        src.enable_events()
        src.hmp('qemu-io disk0 "write -P 0x5c 0 64k"')
        if destination_first:
            dst = start_server([*blockdev(image), "-incoming", incoming], tmp_path, "dst", qemu=qemu)
        src.cmd("migrate", uri=outgoing)
        seen["source"] = _wait_migration(src)["status"]
        seen["source-events"] = [label for label in src.settle() if label.startswith("MIGRATION:")]
        version = src.cmd("query-version")["qemu"]
        if (version["major"], version["minor"]) < (9, 1):
            # QEMU 9.1 made the 'device' state part of every switchover ("migration:
            # Always set DEVICE state"); we follow 10.x, so put it back for an older QEMU.
            seen["source-events"].insert(-1, "MIGRATION:device")
        seen["source-state"] = src.status()
        seen["source-writes"] = is_writer(src.proc.pid, image)
        if dst is None:
            dst = start_server([*blockdev(image), "-incoming", incoming], tmp_path, "dst", qemu=qemu)
        _wait_status(dst, "running")
        seen["destination"] = dst.cmd("query-migrate").get("status")
        seen["destination-writes"] = is_writer(dst.proc.pid, image)
        dst.hmp('qemu-io disk0 "write -P 0x5d 64k 64k"')
        dst.cmd("quit")
        dst.wait_exit()
    finally:
        src.close()
        if dst is not None:
            dst.close()
    seen["data"] = read_pattern(image, 0, 65536, 0x5C) and read_pattern(image, 65536, 65536, 0x5D)
    seen["check"] = qemu_img_check(image).returncode
    return seen


EXPECTED = {
    "source": "completed",
    "source-events": ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:device",
                      "MIGRATION:completed"],
    "source-state": "postmigrate",
    "source-writes": False,
    "destination": "completed",
    "destination-writes": True,
    "data": True,
    "check": 0,
}


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_exec_into_a_file_read_by_a_destination_started_later(tmp_path: Path, qemu: bool) -> None:
    # iotests 196/234's pattern: nobody reads the stream while the source migrates.
    if qemu:
        require("qemu-system-x86_64")
    stream = shlex.quote(str(tmp_path / "stream"))
    seen = _hand_over(tmp_path, qemu, f"exec:cat > {stream}", f"exec: cat {stream}",
                      destination_first=False)
    assert seen == EXPECTED


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_exec_through_a_fifo_to_a_waiting_destination(tmp_path: Path, qemu: bool) -> None:
    # iotest 091's pattern: the destination waits on a FIFO the source writes into.
    if qemu:
        require("qemu-system-x86_64")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    quoted = shlex.quote(str(fifo))
    seen = _hand_over(tmp_path, qemu, f"exec:cat > {quoted}", f"exec: cat {quoted}",
                      destination_first=True)
    assert seen == EXPECTED


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_destination_goes_active_when_the_source_writes(tmp_path: Path, qemu: bool) -> None:
    # iotest 234: events enabled on a destination already reading "exec: cat FIFO" see
    # 'active' (QEMU starts loading from a G_IO_IN watch, not when the command starts).
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    quoted = shlex.quote(str(fifo))
    src = start_server(blockdev(image), tmp_path, "src", qemu=qemu)
    dst = start_server([*blockdev(image), "-incoming", f"exec: cat {quoted}"], tmp_path, "dst", qemu=qemu)
    try:
        dst.enable_events()
        time.sleep(0.3)
        assert dst.settle() == []
        assert dst.status() == "inmigrate"
        src.cmd("migrate", uri=f"exec:cat > {quoted}")
        _wait_status(dst, "running")
        assert dst.wait_for("MIGRATION:completed") == "MIGRATION:completed"
        assert dst.settle() == ["MIGRATION:active", "RESUME", "MIGRATION:completed"]
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_an_exec_stream_that_ends_before_any_byte_never_starts(tmp_path: Path, qemu: bool) -> None:
    # iotest 060's last case: "exec:cat /dev/null" gives a hang-up and no data; QEMU's
    # G_IO_IN watch never fires, so the migration never starts and the VM stays in
    # inmigrate (it neither fails nor exits), its nodes inactive but readable.
    if qemu:
        require("qemu-system-x86_64")
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    dst = start_server([*blockdev(image), "-incoming", "exec:cat /dev/null"], tmp_path, "dst", qemu=qemu)
    try:
        dst.enable_events()
        time.sleep(0.5)
        assert dst.proc.poll() is None
        assert dst.status() == "inmigrate"
        assert dst.settle() == []
        # QEMU 7.2 reports nothing (no incoming state before the channel starts); 8.1+
        # and the server report 'setup' (qemu_start_incoming_migration sets it).
        assert dst.cmd("query-migrate") == ({} if qemu else {"status": "setup"})
        assert "read 512/512 bytes" in dst.qemu_io("disk0 \"read 0 512\"")
        assert not is_writer(dst.proc.pid, image)
        dst.cmd("quit")
        assert dst.wait_exit() == 0
    finally:
        dst.close()


def test_file_uri_with_an_offset(tmp_path: Path) -> None:
    # QEMU 8.2+'s file: transport; what precedes the offset is left alone.
    stream = tmp_path / "stream"
    stream.write_bytes(b"H" * 4096 + b"old tail that is cut off")
    seen = _hand_over(tmp_path, False, f"file:{stream},offset=4k", f"file:{stream},offset=4096",
                      destination_first=False)
    assert seen == EXPECTED
    assert stream.read_bytes()[:4096] == b"H" * 4096
    assert b"old tail" not in stream.read_bytes()


def test_migrate_incoming_reads_an_exec_stream(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    stream = tmp_path / "stream"
    src = start_server(blockdev(image), tmp_path, "src")
    try:
        src.cmd("migrate", uri=f"file:{stream}")
        assert _wait_migration(src)["status"] == "completed"
    finally:
        src.close()
    dst = start_server([*blockdev(image), "-incoming", "defer"], tmp_path, "dst")
    try:
        assert dst.status() == "inmigrate"
        dst.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(stream))}")
        _wait_status(dst, "running")
        assert is_writer(dst.proc.pid, image)
    finally:
        dst.close()


def test_unopenable_targets_fail_the_command_and_the_migration(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    src = start_server(blockdev(image), tmp_path, "src")
    try:
        target = tmp_path / "no" / "such" / "dir"
        assert src.error("migrate", uri=f"file:{target}") == (
            f"Unable to open {target}: No such file or directory")
        info = src.cmd("query-migrate")
        assert (info["status"], info["error-desc"]) == (
            "failed", f"Unable to open {target}: No such file or directory")
        assert src.error("migrate", uri="file:x,offset=lots") == "file URI has bad offset lots"
        # The VM was never stopped and keeps its images.
        assert src.status() == "running"
        assert is_writer(src.proc.pid, image)
    finally:
        src.close()


def test_a_destination_given_garbage_fails_and_exits(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a migration stream\n")
    dst = start_server([*blockdev(image), "-incoming", f"exec: cat {shlex.quote(str(garbage))}"],
                       tmp_path, "dst")
    try:
        assert dst.wait_exit() == 1
        assert "load of migration failed" in dst.log()
    finally:
        dst.close()


def test_mapped_ram_is_refused_clearly(tmp_path: Path) -> None:
    src = start_server([], tmp_path, "src")
    try:
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "mapped-ram", "state": True}])
        refusal = ("qmp-server does not implement the 'mapped-ram' migration stream format; "
                   "turn the capability off")
        assert src.error("migrate", uri=f"file:{tmp_path / 'stream'}") == refusal
        assert src.cmd("query-migrate") == {}  # nothing started
        assert src.status() == "running"
    finally:
        src.close()


@pytest.mark.parametrize("qemu", [False, True], ids=["ours", "qemu"])
def test_an_exec_command_starts_with_no_signal_blocked(tmp_path: Path, qemu: bool) -> None:
    """The ``exec:`` command can be stopped by SIGTERM as QEMU's: it starts with no signal
    blocked, although the server keeps its termination signals for a reporter thread."""
    image = tmp_path / "disk.qcow2"
    qemu_img_create(image)
    mask = tmp_path / "mask"
    src = start_server(blockdev(image), tmp_path, "src", qemu=qemu)
    try:
        src.cmd("migrate", uri=f"exec:grep SigBlk /proc/self/status > {mask}; cat > /dev/null")
        assert _wait_migration(src)["status"] == "completed"
    finally:
        src.close()
    assert mask.read_text().split() == ["SigBlk:", "0000000000000000"]
