"""Exports of inactive nodes (QEMU 10.0's ``allow-inactive``) and snapshots of them.

QEMU 7.2 has neither ``allow-inactive`` nor ``blockdev-set-active``, so the reference is
what QEMU 10.0's iotest ``inactive-node-nbd`` records in its ``.out`` file (its texts are
copied below): an export activates its node unless it allows inactive nodes; a writable
export keeps its node from being inactivated unless it allows that; an export of an
inactive node serves reads and fails everything else with EPERM (seen through QEMU's own
``qemu-io``); ``blockdev-snapshot`` inactivates an active overlay put on an inactive node.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from server_support import Client, running

EPERM = {"error": {"class": "GenericError", "desc": "Failed to inactivate node: Operation not permitted"}}


def _active(client: Client, node: str) -> bool:
    nodes = client.cmd("query-named-block-nodes", flat=True)
    return bool(next(n for n in nodes if n["node-name"] == node)["active"])


def _export(client: Client, **extra: Any) -> dict[str, Any]:
    return client.execute("block-export-add", {"id": "exp0", "type": "nbd", "node-name": "disk-fmt",
                                               "writable": True, **extra})


def _delete(client: Client) -> None:
    client.cmd("block-export-del", id="exp0")
    client.wait_event("BLOCK_EXPORT_DELETED")


@contextmanager
def _vm(tmp_path: Path) -> Iterator[Client]:
    for name in ("disk.img", "snap.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / name), "10M"], check=True)
    args = ["-S", "-blockdev", f"file,node-name=disk-file,filename={tmp_path / 'disk.img'}",
            "-blockdev", "qcow2,file=disk-file,node-name=disk-fmt,active=off",
            "-blockdev", f"file,node-name=snap-file,filename={tmp_path / 'snap.qcow2'}"]
    with running(args, tmp_path) as (_proc, client):
        client.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "nbd.sock")}})
        yield client


@pytest.mark.parametrize("allow", [None, False, True])
def test_an_export_activates_its_node_unless_it_allows_inactive(tmp_path: Path, qemu_utils: None,
                                                                allow: bool | None) -> None:
    with _vm(tmp_path) as client:
        assert not _active(client, "disk-fmt")
        assert _export(client, **({} if allow is None else {"allow-inactive": allow})) == {"return": {}}
        assert _active(client, "disk-fmt") is not allow
        assert client.cmd("query-block-exports") == [
            {"id": "exp0", "node-name": "disk-fmt", "shutting-down": False, "type": "nbd"}]
        _delete(client)


@pytest.mark.parametrize("allow", [None, False, True])
def test_inactivating_an_exported_node(tmp_path: Path, qemu_utils: None, allow: bool | None) -> None:
    with _vm(tmp_path) as client:
        client.cmd("blockdev-set-active", node_name="disk-fmt", active=True)
        assert _export(client, **({} if allow is None else {"allow-inactive": allow})) == {"return": {}}
        reply = client.execute("blockdev-set-active", {"node-name": "disk-fmt", "active": False})
        assert reply == ({"return": {}} if allow else EPERM)
        assert _active(client, "disk-fmt") is not allow
        _delete(client)


def test_an_inactive_export_serves_only_reads(tmp_path: Path, qemu_utils: None) -> None:
    with _vm(tmp_path) as client:
        assert _export(client, **{"allow-inactive": True}) == {"return": {}}
        url = f"nbd+unix:///disk-fmt?socket={tmp_path / 'nbd.sock'}"
        out = subprocess.run(["qemu-io", "-f", "raw", url, "-c", "read 0 64k", "-c", "write 0 64k",
                              "-c", "write -z 0 64k", "-c", "write -zu 0 64k", "-c", "discard 0 64k",
                              "-c", "flush", "-c", "map"],
                             capture_output=True, text=True, timeout=60, check=False)
        text = re.sub(r"\n64 KiB, .*\n", "\n64 KiB, TIMES\n", out.stdout + out.stderr)
        # QEMU 10.0's inactive-node-nbd.out, the same commands (its filters aside)
        assert text == ("read 65536/65536 bytes at offset 0\n64 KiB, TIMES\n"
                        + "write failed: Operation not permitted\n" * 3
                        + "discard failed: Operation not permitted\n"
                        "qemu-io: Failed to get allocation status: Operation not permitted\n")
        assert not _active(client, "disk-fmt")


def test_an_active_overlay_on_an_inactive_node_becomes_inactive(tmp_path: Path, qemu_utils: None) -> None:
    with _vm(tmp_path) as client:
        client.cmd("blockdev-add", driver="qcow2", node_name="snap-fmt", file="snap-file", backing=None)
        assert (_active(client, "disk-fmt"), _active(client, "snap-fmt")) == (False, True)
        reply = client.execute("blockdev-snapshot", {"node": "disk-fmt", "overlay": "snap-fmt"})
        assert reply == {"return": {}}
        assert (_active(client, "disk-fmt"), _active(client, "snap-fmt")) == (False, False)
        # and running the VM activates them all
        client.cmd("cont")
        assert (_active(client, "disk-fmt"), _active(client, "snap-fmt")) == (True, True)
