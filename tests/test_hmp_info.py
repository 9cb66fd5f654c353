"""HMP ``info cpus``, ``info iothreads`` and ``info blockstats`` against QEMU 7.2.

Thread ids differ between any two processes; each is checked against the same process's
query-cpus-fast / query-iothreads instead, and the rest of the text compared with QEMU's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import qemu_tools
from server_support import running

ARGS = ["-S", "-smp", "3", "-object", "iothread,id=io1",
        "-object", "iothread,id=io2,poll-max-ns=100,poll-grow=2,poll-shrink=3,aio-max-batch=5"]


def _texts(args: list[str], tmp_path: Path, qemu: bool) -> dict[str, object]:
    with running(args, tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
        return {
            "cpus": client.hmp("info cpus"),
            "iothreads": client.hmp("info iothreads"),
            "cpu-threads": [c["thread-id"] for c in client.cmd("query-cpus-fast")],
            "io-threads": [t["thread-id"] for t in client.cmd("query-iothreads")],
            "help": [line for line in client.hmp("help info").splitlines()
                     if line.split(" ")[1] in ("cpus", "iothreads", "blockstats")],
        }


@pytest.mark.parametrize("machine", ["pc", "none"])
def test_info_cpus_and_iothreads(tmp_path: Path, machine: str) -> None:
    qemu_tools.require("qemu-system-x86_64")
    args = ["-machine", machine, *ARGS] if machine == "pc" else ["-machine", "none", "-S",
                                                                 "-object", "iothread,id=io1"]
    theirs = _texts(args, tmp_path, qemu=True)
    mine = _texts(args, tmp_path, qemu=False)
    for texts in (theirs, mine):
        # Each process's text names its own threads, in query order.
        for text, ids in (("cpus", "cpu-threads"), ("iothreads", "io-threads")):
            assert re.findall(r"thread_id=(\d+)", str(texts[text])) == [str(t) for t in texts[ids]]
    for key in ("cpus", "iothreads"):
        assert re.sub(r"thread_id=\d+", "thread_id=N", str(mine[key])) == \
            re.sub(r"thread_id=\d+", "thread_id=N", str(theirs[key]))
    assert mine["help"] == theirs["help"]
    if machine == "pc":
        assert str(mine["cpus"]).startswith("* CPU #0: thread_id=")
        assert "\r\n  CPU #2: thread_id=" in str(mine["cpus"])
        assert "io2:\r\n  thread_id=" in str(mine["iothreads"])
        assert "  poll-max-ns=100\r\n  poll-grow=2\r\n  poll-shrink=3\r\n  aio-max-batch=5\r\n" \
            in str(mine["iothreads"])
    else:
        assert mine["cpus"] == ""


def test_iothread_added_and_deleted_at_run_time(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    texts = []
    for qemu in (True, False):
        with running(["-machine", "none", "-S"], tmp_path, "qemu" if qemu else "ours",
                     qemu=qemu) as (_, client):
            client.cmd("object-add", qom_type="iothread", id="late", poll_max_ns=7)
            added = client.hmp("info iothreads")
            client.cmd("object-del", id="late")
            texts.append((re.sub(r"thread_id=\d+", "thread_id=N", added), client.hmp("info iothreads")))
    assert texts[1] == texts[0]
    assert texts[1][0].startswith("late:\r\n  thread_id=N\r\n  poll-max-ns=7\r\n")
