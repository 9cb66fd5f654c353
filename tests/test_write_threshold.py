"""block-set-write-threshold and BLOCK_WRITE_THRESHOLD against live QEMU 7.2.

The same commands and HMP qemu-io writes go to QEMU and to the server; replies,
``write_threshold`` in query-named-block-nodes and query-block, and the events (their
data byte for byte, timestamps aside) must be the same: one event per threshold, then the
threshold is 0 again; every node a write passes through checks its own threshold (a
qcow2 node with guest offsets, its file with host offsets, which depend on where QEMU's
allocator put the clusters); write-zeroes counts, an unperformed discard does not.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import qemu_tools
from server_support import Client, running


def _thresholds(c: Client) -> list[Any]:
    nodes = [(n["node-name"], n["write_threshold"]) for n in c.cmd("query-named-block-nodes")
             if not n["node-name"].startswith("#")]
    return [nodes, [(b["device"], b["inserted"]["write_threshold"]) for b in c.cmd("query-block")]]


def _events(c: Client) -> list[str]:
    c.cmd("query-status")  # every event of the commands before has been sent by now
    seen = [json.dumps({"event": e["event"], "data": e["data"]}) for e in c.events]
    c.events.clear()
    return seen


def _scenario(c: Client, d: Path) -> list[Any]:
    c.hmp(f"drive_add 0 if=none,id=drive0,file={d / 'd.qcow2'},format=qcow2,node-name=dn")
    c.cmd("blockdev-add", driver="file", node_name="f", filename=str(d / "f.raw"))
    c.cmd("blockdev-add", driver="raw", node_name="fr", file="f")
    c.cmd("blockdev-add", driver="qcow2", node_name="q",
          file={"driver": "file", "node-name": "qf", "filename": str(d / "q.qcow2")})
    seen: list[Any] = [
        c.execute("block-set-write-threshold", {"node-name": "zz", "write-threshold": 1}),
        c.execute("block-set-write-threshold", {"node-name": "drive0", "write-threshold": 1}),
        c.execute("block-set-write-threshold", {"node-name": "dn", "write-threshold": -1}),
        _thresholds(c),
        c.execute("block-set-write-threshold", {"node-name": "dn", "write-threshold": 4096}),
        _thresholds(c),
    ]
    c.hmp('qemu-io drive0 "write 0 4096"')
    seen.append(_events(c))
    c.hmp('qemu-io drive0 "write 4000 100"')
    seen += [_events(c), _thresholds(c)]
    c.hmp('qemu-io drive0 "write 8192 100"')
    seen.append(_events(c))
    c.cmd("block-set-write-threshold", node_name="f", write_threshold=100)
    c.cmd("block-set-write-threshold", node_name="fr", write_threshold=10)
    c.hmp('qemu-io fr "write -z 0 50"')
    c.hmp('qemu-io fr "discard 0 512"')
    c.hmp('qemu-io fr "write 200 50"')
    seen.append(_events(c))
    c.cmd("block-set-write-threshold", node_name="qf", write_threshold=100)
    c.cmd("block-set-write-threshold", node_name="q", write_threshold=70000)
    c.hmp('qemu-io q "write 0 50"')
    c.hmp('qemu-io q "write 65536 8192"')
    seen += [_events(c), _thresholds(c)]
    c.cmd("block-set-write-threshold", node_name="q", write_threshold=1)
    c.cmd("block-set-write-threshold", node_name="q", write_threshold=0)
    c.hmp('qemu-io q "write 0 50"')
    seen.append(_events(c))
    return seen


def test_write_threshold_as_qemu(tmp_path: Path) -> None:
    """Replies, thresholds and events as QEMU 7.2's, for the same writes."""
    qemu_tools.require("qemu-system-x86_64")
    results = []
    for who in ("qemu", "ours"):
        d = tmp_path / who
        d.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "d.qcow2"), "8k"],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "q.qcow2"), "1M"],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "f.raw"), "1M"],
                       check=True)
        with running([], d, qemu=who == "qemu") as (_, client):
            results.append(_scenario(client, d))
    for qemu_seen, our_seen in zip(results[0], results[1], strict=True):
        assert our_seen == qemu_seen
    events = [e for group in results[1] if isinstance(group, list) for e in group
              if isinstance(e, str) and "BLOCK_WRITE_THRESHOLD" in e]
    assert ('{"event": "BLOCK_WRITE_THRESHOLD", "data": {"node-name": "dn", '
            '"write-threshold": 4096, "amount-exceeded": 4}}') in events
