"""HMP ``info cpus``, ``info iothreads`` and ``info blockstats`` against QEMU 7.2.

Thread ids differ between any two processes; each is checked against the same process's
query-cpus-fast / query-iothreads instead, and the rest of the text compared with QEMU's.
"""

from __future__ import annotations

import re
import subprocess
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


#: ``help`` arguments whose answer is the same in QEMU 7.2 and here (commands we have
#: with 7.2's help text, aliases, info subcommands, unknown names).
HELP_LINES = ["help help", "help ?", "help c", "help s", "help stop x", "help  quit ",
              "help nosuch", "help nosuch more", "help info status", "help info nosuch",
              "help info status x", "? cont", "help info cpus"]


def test_help_with_a_command_prints_only_that_command(tmp_path: Path) -> None:
    """help_cmd_dump: ``help CMD`` prints CMD's line (an alias finds its command), ``help
    info NAME`` the subcommand's, an unknown name QEMU's "unknown command" text."""
    qemu_tools.require("qemu-system-x86_64")
    seen = {}
    for name in ("qemu", "ours"):
        with running([], tmp_path, name, qemu=name == "qemu") as (_, client):
            seen[name] = [client.hmp(line) for line in HELP_LINES]
    assert seen["ours"] == seen["qemu"]
    assert seen["ours"][2] == "cont|c  -- resume emulation\r\n"
    assert seen["ours"][7] == "unknown command: 'nosuch'\r\n"


#: info subcommands without arguments, given one (or, for ``info migrate``, anything but
#: 10.1's ``-a``), and the migration info commands without one.
EXTRA_ARGUMENT_LINES = ["info status x", "info name x", "info version x", "info cpus x",
                        "info iothreads x", "info blockstats x", "info block-jobs x",
                        "info snapshots x", "info migrate x", "info migrate -d",
                        "info migrate -a x", "info migrate_capabilities x",
                        "info migrate_parameters on", "help info migrate_capabilities",
                        "help info migrate_parameters"]


def test_info_commands_refuse_arguments_as_qemu(tmp_path: Path) -> None:
    """monitor_parse_arguments: "NAME: extraneous characters at the end of line" and the
    "Try help" line, as QEMU 7.2 answers."""
    qemu_tools.require("qemu-system-x86_64")
    seen = {}
    for name in ("qemu", "ours"):
        with running([], tmp_path, name, qemu=name == "qemu") as (_, client):
            seen[name] = [client.hmp(line) for line in EXTRA_ARGUMENT_LINES]
    assert seen["ours"] == seen["qemu"]
    assert seen["ours"][0] == ('status: extraneous characters at the end of line\r\n'
                               'Try "help info status" for more information\r\n')


def test_info_block_verbose_nodes_and_node_names_as_qemu(tmp_path: Path, qemu_img: str) -> None:
    """``info block`` with ``-v`` (the images as qemu-img info prints them: backing chain,
    snapshot list, format-specific data in QEMU's QDict order, bitmaps), with ``-n``, and
    with a node name that is no backend (QEMU then lists that node, after a blank line
    when it is not the first node): the same text as QEMU 7.2 prints."""
    qemu_tools.require("qemu-system-x86_64")

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run([qemu_img, "snapshot", "-c", "snap1", str(base)], check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
                   check=True)
    subprocess.run([qemu_img, "bitmap", "--add", str(top), "bm0"], check=True)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(65536))
    # Both processes open the same files read-only, without locks: the same sizes and dates.
    args = ["-machine", "pc", "-S",
            "-blockdev", f"driver=file,node-name=f,filename={top},locking=off,read-only=on",
            "-blockdev", "driver=qcow2,node-name=q,file=f,read-only=on",
            "-device", "virtio-blk-pci,drive=q,id=vd0",
            "-drive", f"if=none,id=dr,file={raw},format=raw,readonly=on,file.locking=off"]
    lines = ["info block", "info block -v", "info block -n", "info block -n -v", "info block q",
             "info block -v q", "info block f", "info block dr", "info block -n dr", "info block nosuch"]
    texts = []
    for qemu in (True, False):
        with running(args, tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
            texts.append([re.sub(r"#block\d+", "#block", client.hmp(line)) for line in lines])
    for line, theirs, mine in zip(lines, *texts, strict=True):
        assert mine == theirs, line
    assert "\r\nImages:\r\nimage: " in texts[1][1]
    assert texts[1][4].startswith("\r\nq: ")
