"""Block devices over QMP: QEMU's transcript, lock interop, activation and inactivation."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import transcript
from lock_probe import locked
from server_support import SERVER, Client, running


def run_qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def run_qemu_io(image: Path, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *extra, "-c", command, str(image)], capture_output=True, text=True)


def qcow2(tmp_path: Path, name: str = "disk.qcow2", size: str = "64M") -> Path:
    path = tmp_path / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def blockdev(path: Path, name: str = "disk0", **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": str(path)}, **extra}


def nodes(client: Client) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in client.cmd("query-named-block-nodes", flat=True)}


def _normalize(record: dict[str, Any]) -> dict[str, Any]:
    text = re.sub(r"#block\d+", "#block", json.dumps(record, sort_keys=True))
    record = json.loads(text)
    reply = record.get("reply")
    if isinstance(reply, dict) and isinstance(reply.get("return"), list):
        for info in reply["return"]:
            # QEMU 10.x members that 7.2 does not have.
            info.pop("active", None)
            info.pop("children", None)
    return record


def test_blockdev_scenario_matches_qemu(qemu_img: str) -> None:
    ours = [_normalize(r) for r in transcript.run(transcript.scenario("blockdev"), SERVER)]
    expected = [_normalize(r) for r in transcript.recorded("blockdev")]
    assert ours == expected


def test_active_image_is_locked_against_qemu_tools(tmp_path: Path, qemu_io: str) -> None:
    image = qcow2(tmp_path)
    with running(["-blockdev", json.dumps(blockdev(image))], tmp_path) as (_, client):
        assert locked(image) == [100, 101, 103, 201, 203]
        info = run_qemu_img("info", str(image))
        assert info.returncode == 1 and 'Failed to get shared "write" lock' in info.stderr
        assert run_qemu_img("info", "-U", str(image)).returncode == 0
        probe = run_qemu_io(image, "write 0 512")
        assert 'Failed to get "write" lock' in probe.stderr

        client.cmd("blockdev-set-active", node_name="disk0", active=False)
        assert locked(image) == [100]
        assert not nodes(client)["disk0"]["active"]
        assert run_qemu_img("check", str(image)).returncode == 0
        assert run_qemu_io(image, "write -P 0x11 0 64k").returncode == 0

        client.cmd("blockdev-set-active", node_name="disk0", active=True)
        assert locked(image) == [100, 101, 103, 201, 203]
        out = client.qemu_io('disk0 "read -P 0x11 0 64k"')
        assert "read 65536/65536 bytes at offset 0" in out


def test_qemu_io_holding_the_image_blocks_blockdev_add(tmp_path: Path, qemu_io: str) -> None:
    image = qcow2(tmp_path)
    holder = subprocess.Popen([qemu_io, "-c", "sleep 60000", str(image)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with running([], tmp_path) as (_, client):
            for _ in range(500):
                if locked(image):
                    break
                subprocess.run(["sleep", "0.01"])
            reply = client.execute("blockdev-add", blockdev(image))
            assert reply == {"error": {"class": "GenericError", "desc": 'Failed to get "write" lock'}}
            assert nodes(client) == {}
            # Read-only with force-share works next to a writer, as `qemu-img info -U` does.
            client.cmd("blockdev-add", **blockdev(image, **{"read-only": True, "force-share": True}))
            assert nodes(client)["disk0"]["ro"]
    finally:
        holder.kill()
        holder.wait()


def test_two_servers_one_image(tmp_path: Path, qemu_img: str) -> None:
    image = qcow2(tmp_path)
    with running(["-blockdev", json.dumps(blockdev(image))], tmp_path, "a") as (_, a), \
            running([], tmp_path, "b") as (_, b):
        reply = b.execute("blockdev-add", blockdev(image))
        assert reply["error"]["desc"] == 'Failed to get "write" lock'
        # An inactive node takes no locks, so the second server may open it that way...
        b.cmd("blockdev-add", **blockdev(image, active=False))
        # ...but activating it while the first one writes is refused and changes nothing.
        reply = b.execute("blockdev-set-active", {"node-name": "disk0", "active": True})
        assert reply["error"]["desc"] == 'Failed to get "write" lock'
        assert not nodes(b)["disk0"]["active"]
        a.hmp('qemu-io disk0 "write -P 0x22 0 1M"')
        a.cmd("blockdev-set-active", active=False)
        b.cmd("blockdev-set-active", active=True)
        assert "read 1048576/1048576 bytes" in b.qemu_io('disk0 "read -P 0x22 0 1M"')
        reply = a.execute("blockdev-set-active", {"active": True})
        assert reply["error"]["desc"] == 'Failed to get "write" lock'
    assert run_qemu_img("check", str(image)).returncode == 0


def test_inmigrate_opens_inactive(tmp_path: Path, qemu_img: str) -> None:
    image = qcow2(tmp_path)
    with running(["-incoming", "defer", "-blockdev", json.dumps(blockdev(image))], tmp_path) as (_, client):
        assert client.cmd("query-status") == {"status": "inmigrate", "running": False}
        client.cmd("blockdev-add", **blockdev(qcow2(tmp_path, "two.qcow2"), "disk1"))
        info = nodes(client)
        assert {name: n["active"] for name, n in info.items() if not name.startswith("#")} == {
            "disk0": False, "disk1": False}
        assert locked(image) == []
        assert client.qemu_io('disk0 "write 0 4k"') == "Block node is read-only\r\n"
        assert "read 4096/4096" in client.qemu_io('disk0 "read 0 4k"')
        # QEMU 10.x: cont during inmigrate only sets autostart; nothing is activated.
        client.cmd("cont")
        assert client.cmd("query-status")["status"] == "inmigrate"
        assert locked(image) == []


def test_handoff_invalidates_cached_metadata(tmp_path: Path, qemu_io: str) -> None:
    """The seeds' hazard, on the safe path: another writer allocates while we are inactive."""
    image = qcow2(tmp_path)
    with running(["-blockdev", json.dumps(blockdev(image))], tmp_path) as (_, client):
        client.hmp('qemu-io disk0 "write -P 0x01 0 64k"')
        client.cmd("blockdev-set-active", active=False)
        # The other side allocates clusters our caches know nothing about.
        assert run_qemu_io(image, "write -P 0x02 1M 256k").returncode == 0
        client.cmd("blockdev-set-active", active=True)
        assert "read 262144/262144" in client.qemu_io('disk0 "read -P 0x02 1M 256k"')
        client.hmp('qemu-io disk0 "write -P 0x03 8M 512k"')
        client.cmd("stop")
        client.cmd("blockdev-set-active", active=False)
        check = run_qemu_img("check", "--output=json", str(image))
        assert check.returncode == 0, check.stdout
        result = json.loads(check.stdout)
        assert result.get("leaks", 0) == 0 and result.get("corruptions", 0) == 0
        for pattern, offset, length in (("0x01", "0", "64k"), ("0x02", "1M", "256k"), ("0x03", "8M", "512k")):
            probe = run_qemu_io(image, f"read -P {pattern} {offset} {length}", "-r", "-U")
            assert "Pattern verification failed" not in probe.stdout, probe.stdout


def test_set_active_errors(tmp_path: Path) -> None:
    image = qcow2(tmp_path)
    with running(["-blockdev", json.dumps(blockdev(image))], tmp_path) as (_, client):
        file_node = next(n for n in nodes(client) if n.startswith("#block"))
        reply = client.execute("blockdev-set-active", {"node-name": file_node, "active": False})
        assert reply["error"]["desc"] == "Node has active parent node"
        reply = client.execute("blockdev-set-active", {"node-name": "nope", "active": False})
        assert reply["error"]["desc"] == "Failed to find node with node-name='nope'"
        client.cmd("x-blockdev-inactivate", node_name="disk0")
        assert {n["active"] for n in nodes(client).values()} == {False}
        # cont activates everything before running.
        client.cmd("cont")
        assert {n["active"] for n in nodes(client).values()} == {True}
        client.cmd("x-blockdev-invalidate-cache")
        reply = client.execute("blockdev-del", {"node-name": file_node})
        assert reply["error"]["desc"] == f"Node {file_node} is not owned by the monitor"
        client.cmd("blockdev-del", node_name="disk0")
        assert nodes(client) == {}
        assert locked(image) == []


def test_sigkill_during_write_storm_keeps_flushed_writes(tmp_path: Path, qemu_img: str) -> None:
    """A killed server can leak clusters, never corrupt, and loses nothing it flushed."""
    image = qcow2(tmp_path, size="256M")
    durable: list[tuple[int, int]] = []
    written: list[tuple[int, int]] = []
    with running(["-blockdev", json.dumps(blockdev(image))], tmp_path) as (proc, client):
        rng = __import__("random").Random(7)
        for i in range(380):
            # Spread over many clusters and L2 tables so allocation metadata keeps changing.
            offset = rng.randrange(0, (256 << 20) // 4096) * 4096
            pattern = i % 250 + 1
            out = client.qemu_io(f'disk0 "write -q -P {pattern} {offset} 4k"')
            assert out == "", out
            written.append((offset, pattern))
            if i % 50 == 49:
                assert client.qemu_io('disk0 "flush"') == ""
                durable = list(written)
        # More writes in flight when the kill lands: dirty caches, half-done allocations.
        storm = [{"execute": "human-monitor-command",
                  "arguments": {"command-line": f'qemu-io disk0 "write -q -P 0xee {o << 16} 64k"'}}
                 for o in range(100)]
        client.send_raw("".join(json.dumps(m) for m in storm))
        client.reply()
        proc.kill()  # SIGKILL: no flush, no clean close
        proc.wait()
    check = run_qemu_img("check", "--output=json", str(image))
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaks only
    assert json.loads(check.stdout).get("corruptions", 0) == 0
    latest: dict[int, int] = {}
    for offset, pattern in durable:
        latest[offset] = pattern
    # A later, unflushed write may or may not have landed on the same offset.
    unflushed = {offset for offset, _ in written[len(durable):]}
    unflushed |= {o for o in range(0, 100 << 16, 4096)}  # the storm's range
    for offset, pattern in latest.items():
        if offset in unflushed:
            continue
        probe = run_qemu_io(image, f"read -P {pattern} {offset} 4k", "-r")
        assert "Pattern verification failed" not in probe.stdout, (offset, pattern, probe.stdout)
