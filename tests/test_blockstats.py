"""query-blockstats and HMP ``info blockstats`` against QEMU 7.2.

Both processes get the same command line and the same HMP ``qemu-io`` commands on copies
of the same images; what they report must be the same, apart from what cannot be:
generated node names (``#blockNNN``), and the nanosecond times, which are compared as
"zero or not" (``*_total_time_ns``, ``idle_time_ns``).

As in QEMU, only qemu-io's ``aio_read``/``aio_write``/``aio_flush`` are accounted on a
BlockBackend (QEMU's device models account guest requests the same way); plain ``read``,
``write`` and ``flush`` are not, though their writes move the nodes' ``wr_highest_offset``.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import Client, running

PC = ["-machine", "pc", "-S"]


def _normal(value: Any) -> Any:
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key.endswith("_time_ns"):
                out[key] = "zero" if item == 0 else "nonzero"
            elif key == "node-name" and item.startswith("#block"):
                out[key] = "#block"
            else:
                out[key] = _normal(item)
        return out
    if isinstance(value, str):
        value = re.sub(r"_time_ns=[1-9][0-9]*", "_time_ns=N", value)
        return re.sub(r"#block[0-9]+", "#block", value)
    return value


def _ordered_keys(value: Any) -> Any:
    """The member order as sent (the comparisons above are order-insensitive)."""
    if isinstance(value, list):
        return [_ordered_keys(v) for v in value]
    if isinstance(value, dict):
        return [(key, _ordered_keys(item)) for key, item in value.items()]
    return None


def _images(folder: Path) -> None:
    qemu_img = qemu_tools.require("qemu-img")
    folder.mkdir()
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(folder / "r.img"), "1M"], check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(folder / "base.qcow2"), "1M"], check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(folder / "base.qcow2"),
                    "-F", "qcow2", str(folder / "top.qcow2")], check=True)


@contextmanager
def both(args: list[str], tmp_path: Path) -> Iterator[tuple[Client, Client]]:
    """QEMU and the server, each on its own copy of the images (``{dir}`` in ``args``)."""
    qemu_tools.require("qemu-system-x86_64")
    with ExitStack() as stack:
        clients = []
        for name in ("qemu", "ours"):
            _images(tmp_path / name)
            own = [a.replace("{dir}", str(tmp_path / name)) for a in args]
            _, client = stack.enter_context(running(PC + own, tmp_path, name, qemu=name == "qemu"))
            clients.append(client)
        yield clients[0], clients[1]


def _same(qemu: Client, ours: Client, step: str) -> None:
    for arguments in ({}, {"query-nodes": False}, {"query-nodes": True}):
        mine = ours.execute("query-blockstats", arguments)
        # QEMU accounts an aio request when it completes, which may be after its monitor
        # replied (a quiet "-q" one prints nothing to wait for): give it a moment.
        deadline = time.monotonic() + 5
        while True:
            theirs = qemu.execute("query-blockstats", arguments)
            if _normal(mine) == _normal(theirs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert _normal(mine) == _normal(theirs), (step, arguments)
        assert _ordered_keys(mine) == _ordered_keys(theirs), (step, arguments)
    assert _normal(ours.hmp("info blockstats")) == _normal(qemu.hmp("info blockstats")), step


IO_STEPS = [
    "read 0 4k",            # not accounted
    "write 0 4k",           # not accounted; wr_highest_offset moves
    "flush",                # not accounted
    "aio_read 0 4k",
    "aio_write 512 1k 1k",  # two buffers, one request
    "aio_flush",
    "aio_read -i 0 4k",     # invalid
    "aio_write -i 0 4k",
    "aio_read 0 1x",        # a bad length: invalid too
    "aio_write 2M 1k",      # beyond the end: failed
    "aio_read 1048575 2",
    "aio_write -z 8k 4k",   # write-zeroes: not accounted (QEMU starts no accounting)
    "aio_write -q -P 0x11 64k 512",
    "aio_read -q -P 0x11 64k 512",
    "aio_flush",
]


def _timeless(text: str) -> str:
    """qemu-io's output without the timing figures of its statistics line."""
    return re.sub(r"ops; .*", "ops; TIME", text)


def _printed(client: Client, line: str, step: str) -> str:
    """What ``qemu-io`` printed for ``step``. QEMU prints an aio_read/aio_write's result
    when the request completes, which may be after the monitor replied; ours completes
    before."""
    text = client.qemu_io(line)
    words = step.split()
    if words[0] in ("aio_read", "aio_write") and "-q" not in words:
        deadline = time.monotonic() + 5
        while "ops/sec" not in text and time.monotonic() < deadline:
            time.sleep(0.01)
            assert client.output is not None
            text += client.output.new()
    return text


def _run_steps(qemu: Client, ours: Client, target: str) -> None:
    _same(qemu, ours, "start")
    for step in IO_STEPS:
        # Both print qemu-io's results on their stdout and reply "".
        line = f'{target} "{step}"'
        assert _timeless(_printed(ours, line, step)) == _timeless(_printed(qemu, line, step)), step
        _same(qemu, ours, step)


def test_drive_with_device(tmp_path: Path) -> None:
    """-drive + -device: the backend is named and attached; qemu-io by backend name."""
    args = ["-drive", "file={dir}/r.img,format=raw,if=none,id=drive0",
            "-device", "virtio-blk-pci,drive=drive0,id=vd0"]
    with both(args, tmp_path) as (qemu, ours):
        _run_steps(qemu, ours, "drive0")


def test_blockdev_and_device_add(tmp_path: Path) -> None:
    """-blockdev nodes, device_add at run time (an anonymous backend: device ''), qemu-io
    with -d on the device; a -drive without a device and a node nobody uses alongside."""
    args = ["-blockdev", "driver=file,node-name=f0,filename={dir}/r.img",
            "-blockdev", "driver=raw,node-name=d0,file=f0",
            "-drive", "file={dir}/base.qcow2,if=none,id=spare,readonly=on",
            "-blockdev", "driver=null-co,node-name=n0"]
    with both(args, tmp_path) as (qemu, ours):
        _same(qemu, ours, "no device yet")
        for client in (qemu, ours):
            client.cmd("device_add", driver="virtio-blk-pci", drive="d0", id="vd0")
        # -d takes the id of the device that holds the backend: for virtio-blk-pci that
        # is its virtio-backend child, which has no id; its QOM path then.
        assert ours.qemu_io('-d vd0 "aio_read 0 512"') == \
            qemu.qemu_io('-d vd0 "aio_read 0 512"') == \
            "Error: Device does not have a block device backend\r\n"
        _run_steps(qemu, ours, "-d /machine/peripheral/vd0/virtio-backend")
        assert ours.cmd("query-blockstats")[-1]["stats"]["rd_operations"] == 2
        for client in (qemu, ours):
            client.cmd("device_del", id="vd0")
        # QEMU's guest never acknowledges the unplug; ours does at once. Compare only the
        # backends that remain in both.
        theirs = [s for s in qemu.cmd("query-blockstats") if s["device"]]
        assert _normal(ours.cmd("query-blockstats")) == _normal(theirs)


def test_backing_chain(tmp_path: Path) -> None:
    """A qcow2 overlay: the backend's node has its file as ``parent`` and the backing
    image as ``backing``, each nested the same way."""
    args = ["-drive", "file={dir}/top.qcow2,if=none,id=drive0",
            "-device", "virtio-blk-pci,drive=drive0,id=vd0"]
    with both(args, tmp_path) as (qemu, ours):
        _same(qemu, ours, "start")
        for step in ("aio_read 0 64k", "aio_flush"):
            for client in (qemu, ours):
                client.hmp(f'qemu-io drive0 "{step}"')
            _same(qemu, ours, step)


def test_read_only_write_is_refused_unaccounted(tmp_path: Path) -> None:
    """aio_write on a read-only backend fails at the permission, before any accounting."""
    args = ["-drive", "file={dir}/r.img,format=raw,if=none,id=drive0,readonly=on",
            "-device", "virtio-blk-pci,drive=drive0,id=vd0"]
    with both(args, tmp_path) as (qemu, ours):
        line = 'qemu-io drive0 "aio_write 0 4k"'
        assert ours.hmp(line) == qemu.hmp(line)
        _same(qemu, ours, "refused write")


def test_no_backends(tmp_path: Path) -> None:
    with both([], tmp_path) as (qemu, ours):
        _same(qemu, ours, "empty")
        assert ours.hmp("info blockstats") == ""


@pytest.mark.parametrize("arguments", [{"query-nodes": "yes"}, {"nodes": True}])
def test_bad_arguments(tmp_path: Path, arguments: dict[str, Any]) -> None:
    with both([], tmp_path) as (qemu, ours):
        assert ours.execute("query-blockstats", arguments) == qemu.execute("query-blockstats", arguments)


def test_qdev_is_the_device_id_when_it_has_one(tmp_path: Path) -> None:
    """blk_get_attached_dev_id: an ide-hd with an id is named by it (query-blockstats and
    query-block alike); without one, or behind a virtio proxy, by QOM path."""
    args = ["-drive", "file={dir}/r.img,format=raw,if=none,id=drive0",
            "-device", "ide-hd,drive=drive0,id=ide0",
            "-blockdev", "driver=file,node-name=f1,filename={dir}/base.qcow2",
            "-device", "ide-hd,drive=f1",
            "-blockdev", "driver=file,node-name=f2,filename={dir}/top.qcow2",
            "-device", "virtio-blk-pci,drive=f2,id=vv"]
    with both(args, tmp_path) as (qemu, ours):
        _same(qemu, ours, "start")
        for command in ("query-block", "query-blockstats"):
            qdevs = [entry.get("qdev") for entry in ours.cmd(command)]
            assert qdevs == [entry.get("qdev") for entry in qemu.cmd(command)]
            assert qdevs == ["ide0", "/machine/peripheral-anon/device[0]",
                             "/machine/peripheral/vv/virtio-backend"]
        line = 'qemu-io -d ide0 "aio_read 0 512"'
        for client in (qemu, ours):
            client.hmp(line)
        _same(qemu, ours, line)
