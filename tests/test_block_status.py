"""Block status (which ranges hold data, read as zeroes, come from a backing file),
against QEMU 7.2 doing the same on the same images.

The images are made by qemu-img and qemu-io, once for QEMU and once for our server, in
directories whose paths have the same length: sparse raw files, qcow2 with holes, zero
clusters (plain and preallocated), compressed clusters, discarded ranges, a backing
chain whose base is shorter than its overlay, a v2 image, metadata preallocation, 512-byte
clusters with small L2 slices. Both processes export them over NBD and run HMP qemu-io on
them. Compared, byte for byte: ``qemu-img map --output=json`` through the export; raw
NBD_CMD_BLOCK_STATUS replies (with and without NBD_CMD_FLAG_REQ_ONE, across the end, over
the whole export); the map after writing zeroes and trimming through the export;
``qemu-img convert`` from the export (the copy's map and how much of it is data); HMP qemu-io
``map`` and ``alloc`` (what the process prints).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd_client
import pytest
from server_support import Client, running

from qmp_server.nbd import protocol as nbd

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _sh(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    return result.stdout + result.stderr


def _make_images(work: Path) -> None:
    w = str(work)
    # raw: data in the middle ending inside a block, a trailing hole
    with open(work / "sparse.raw", "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"x" * 100000)
    # raw: a size that is no multiple of 512, data up to its last byte
    with open(work / "odd.raw", "wb") as f:
        f.truncate(MiB + 1000)
        f.seek(300000)
        f.write(b"y" * 5000)
        f.seek(MiB - 3000)
        f.write(b"z" * 4000)
    # a backing chain; the overlay is longer than its base
    _sh("qemu-img", "create", "-q", "-f", "qcow2", f"{w}/base.qcow2", "4M")
    _sh("qemu-io", "-f", "qcow2", f"{w}/base.qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 64k",
        "-c", "write -z 3200k 64k")
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"{w}/top.qcow2", "6M")
    _sh("qemu-io", "-f", "qcow2", f"{w}/top.qcow2", "-c", "write -P 3 512k 128k", "-c", "write -z 1M 64k",
        "-c", "write -z -u 2M 192k", "-c", "write -c -P 4 5M 64k", "-c", "write -c -P 5 5184k 64k",
        "-c", "discard 0 64k", "-c", "write -P 6 3968k 256k")
    # no backing file: holes read as zeroes; zero clusters with and without a host cluster
    _sh("qemu-img", "create", "-q", "-f", "qcow2", f"{w}/plain.qcow2", "3M")
    _sh("qemu-io", "-f", "qcow2", f"{w}/plain.qcow2", "-c", "write -P 7 0 256k", "-c", "write -z 64k 64k",
        "-c", "write -z -u 128k 64k", "-c", "write -P 8 1M 100k", "-c", "discard 1M 64k",
        "-c", "write -c -P 9 2M 64k", "-c", "write -P 10 2880k 64k", "-c", "write -P 11 2816k 64k")
    # v2: no zero clusters
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", f"{w}/v2.qcow2", "2M")
    _sh("qemu-io", "-f", "qcow2", f"{w}/v2.qcow2", "-c", "write -P 1 0 128k", "-c", "write -z 64k 64k",
        "-c", "discard 256k 64k")
    # metadata preallocation: every cluster mapped, most of them holes in the file
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata",
        f"{w}/prealloc.qcow2", "2M")
    _sh("qemu-io", "-f", "qcow2", f"{w}/prealloc.qcow2", "-c", "write -P 1 64k 64k", "-c", "write -z 1M 64k")
    # 512-byte clusters: runs end at L2 slices; scattered writes make many extents
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", f"{w}/small.qcow2", "1M")
    commands = [arg for i in range(0, 200, 3)
                for arg in ("-c", f"write -P {i % 250 + 1} {i * 2560} {512 * (i % 4 + 1)}")]
    _sh("qemu-io", "-f", "qcow2", f"{w}/small.qcow2", *commands)
    # 4 KiB clusters read through 1 KiB L2 slices (512 KiB of guest each)
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", f"{w}/sliced.qcow2", "2M")
    _sh("qemu-io", "-f", "qcow2", f"{w}/sliced.qcow2", "-c", "write -P 1 256k 640k",
        "-c", "write -z 1000k 100k", "-c", "write -z -u 1536k 512k")


#: node name -> blockdev-add options (the filename relative to the work directory)
_NODES: dict[str, dict[str, Any]] = {
    "sparse": {"driver": "raw", "file": {"driver": "file", "filename": "sparse.raw"}},
    "odd": {"driver": "raw", "file": {"driver": "file", "filename": "odd.raw"}},
    "window": {"driver": "raw", "offset": 1024 * 1024 - 4096, "size": 1024 * 1024,
               "file": {"driver": "file", "filename": "sparse.raw"}},
    "top": {"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}},
    "plain": {"driver": "qcow2", "file": {"driver": "file", "filename": "plain.qcow2"}},
    "v2": {"driver": "qcow2", "file": {"driver": "file", "filename": "v2.qcow2"}},
    "prealloc": {"driver": "qcow2", "file": {"driver": "file", "filename": "prealloc.qcow2"}},
    "small": {"driver": "qcow2", "file": {"driver": "file", "filename": "small.qcow2"}},
    "sliced": {"driver": "qcow2", "l2-cache-entry-size": 1024,
               "file": {"driver": "file", "filename": "sliced.qcow2"}},
    "null": {"driver": "null-co", "size": 3 * MiB, "read-zeroes": True},
}


def _add_nodes(c: Client, work: Path) -> None:
    for name, options in _NODES.items():
        options = dict(options)
        if "file" in options:
            options["file"] = {**options["file"], "filename": str(work / options["file"]["filename"])}
        c.cmd("blockdev-add", node_name=name, **{k.replace("-", "_"): v for k, v in options.items()})


def _both(tmp_path: Path, scenario: Callable[[Client, Path], list[Any]]) -> tuple[list[Any], list[Any]]:
    results = []
    for qemu, name in ((True, "qemu"), (False, "ours")):
        work = tmp_path / name
        work.mkdir()
        _make_images(work)
        with running([], work, qemu=qemu) as (_, client):
            steps = scenario(client, work)
        results.append([_normalized(step, str(work)) for step in steps])
    return results[0], results[1]


def _normalized(value: Any, work: str) -> Any:
    if isinstance(value, str):  # paths, and qemu-io's timings
        return re.sub(r"; [0-9.]+ sec \([^)]*\)", "; TIME", value.replace(work, "@"))
    if isinstance(value, list):
        return [_normalized(v, work) for v in value]
    return value


def _url(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


# A raw NBD client: structured replies and base:allocation, then BLOCK_STATUS requests.

def _connect(sock: str, name: str) -> socket.socket:
    s = nbd_client.connect(sock, timeout=30)
    nbd_client.handshake(s)
    assert nbd_client.option(s, nbd.OPT_STRUCTURED_REPLY, b"")[-1][0] == nbd.REP_ACK
    query = nbd.BASE_ALLOCATION.encode()
    meta = struct.pack(">I", len(name)) + name.encode() + struct.pack(">II", 1, len(query)) + query
    replies = nbd_client.option(s, nbd.OPT_SET_META_CONTEXT, meta)
    assert [kind for kind, _ in replies] == [nbd.REP_META_CONTEXT, nbd.REP_ACK]
    go = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
    assert nbd_client.option(s, nbd.OPT_GO, go)[-1][0] == nbd.REP_ACK
    return s


def _block_status(s: socket.socket, handle: int, offset: int, length: int, flags: int) -> list[Any]:
    """The reply's chunks: extents as (length, flags) pairs, errors as their errno only
    (QEMU's texts for requests past the end name the sizes; ours do not)."""
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, nbd.CMD_BLOCK_STATUS, handle, offset,
                          length))
    chunks: list[Any] = []
    while True:
        magic, chunk_flags, kind, got, size = struct.unpack(">IHHQI", nbd_client.recv_exact(s, 20))
        assert (magic, got) == (nbd.STRUCTURED_REPLY_MAGIC, handle)
        payload = nbd_client.recv_exact(s, size)
        if kind == nbd.REPLY_TYPE_BLOCK_STATUS:
            words = struct.unpack(f">I{(size - 4) // 4}I", payload)
            chunks.append(("extents", words[0], list(zip(words[1::2], words[2::2], strict=True))))
        elif kind == nbd.REPLY_TYPE_ERROR:
            chunks.append(("error", struct.unpack(">I", payload[:4])[0]))
        else:
            chunks.append(("other", kind, payload))
        if chunk_flags & nbd.REPLY_FLAG_DONE:
            return chunks


def _probes(size: int) -> list[tuple[int, int, int]]:
    probes = [(0, size, 0), (0, size, nbd.CMD_FLAG_REQ_ONE), (1, 4095, 0), (4096, 1, nbd.CMD_FLAG_REQ_ONE),
              (size - 1, 1, 0), (size - 512, 512, nbd.CMD_FLAG_REQ_ONE), (size, 1, 0), (0, size + 1, 0),
              (12345, 1000000, 0), (12345, 1000000, nbd.CMD_FLAG_REQ_ONE), (0, 0, 0)]
    probes += [(offset, min(size - offset, 300000), nbd.CMD_FLAG_REQ_ONE)
               for offset in range(0, size, 196608)]
    return probes


def _data_bytes(path: Path) -> int:
    """How many bytes of ``path`` are data rather than holes (SEEK_DATA/SEEK_HOLE): the
    copy's sparseness without the file system's own metadata blocks, which ``du``
    counts and which vary from run to run."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:  # each pass moves past one data extent
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            total += hole - data
            pos = hole
    finally:
        os.close(fd)
    return total


def _export_scenario(c: Client, work: Path) -> list[Any]:
    sock = str(work / "nbd.sock")
    _add_nodes(c, work)
    c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    steps: list[Any] = []
    sizes = {}
    for name in _NODES:
        c.cmd("nbd-server-add", device=name, writable=name in ("plain", "sparse"))
        info = _sh("qemu-img", "info", "--output=json", "-f", "raw", _url(sock, name))
        sizes[name] = int(re.search(r'"virtual-size": (\d+)', info).group(1))  # type: ignore[union-attr]
    for name in _NODES:
        steps.append(f"map {name}: " + _sh("qemu-img", "map", "--output=json", "-f", "raw", _url(sock, name)))
        s = _connect(sock, name)
        for handle, (offset, length, flags) in enumerate(_probes(sizes[name])):
            steps.append((name, offset, length, flags, _block_status(s, handle, offset, length, flags)))
        s.close()
    # writes through the export change what it reports
    steps.append(_sh("qemu-io", "-f", "raw", _url(sock, "plain"), "-c", "write -z 256k 128k",
                     "-c", "write -z -u 512k 64k", "-c", "discard 1088k 36k", "-c", "discard 2M 64k",
                     "-c", "write -P 3 2560k 64k"))
    steps.append(_sh("qemu-io", "-f", "raw", _url(sock, "sparse"), "-c", "write -z -u 1M 64k",
                     "-c", "discard 1152k 4k", "-c", "write -P 1 3M 4k"))
    for name in ("plain", "sparse"):
        steps.append(f"map {name}: " + _sh("qemu-img", "map", "--output=json", "-f", "raw", _url(sock, name)))
    # a copy from the export is as sparse as the export says it can be
    for name in ("top", "plain", "sparse", "small"):
        for fmt in ("raw", "qcow2"):
            copy = work / f"copy-{name}.{fmt}"
            steps.append(_sh("qemu-img", "convert", "-f", "raw", "-O", fmt, _url(sock, name), str(copy)))
            copied = _sh("qemu-img", "map", "--output=json", "-f", fmt, str(copy))
            steps.append(f"copy {name} {fmt}: {copied}")
            steps.append((f"data {name} {fmt}", _data_bytes(copy)))
    return steps


def test_nbd_block_status_as_qemu(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    theirs, ours = _both(tmp_path, _export_scenario)
    for mine, qemu in zip(ours, theirs, strict=True):
        assert mine == qemu
    # the scenario sees holes, zeroes and data, not one kind everywhere
    text = "".join(step for step in ours if isinstance(step, str))
    assert '"data": false' in text and '"zero": true, "data": true' in text
    assert any(isinstance(s, tuple) and s[0] == "data top raw" and s[1] < 3 * MiB for s in ours)


_QEMU_IO = [
    "map", "map x", "alloc 0", "alloc 0 1M", "a 64k 1", "alloc 1M 100M", "alloc 2M 1", "alloc 100M",
    "alloc 0 0", "alloc -1", "alloc 0 x", "alloc 1 2 3", "alloc 3000k 1k", "alloc 0x1k",
]


def _qemu_io_scenario(c: Client, work: Path) -> list[Any]:
    _add_nodes(c, work)
    return [f"{name} {command}: " + c.qemu_io(f'{name} "{command}"')
            for name in _NODES for command in _QEMU_IO]


def test_hmp_qemu_io_map_and_alloc_as_qemu(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    theirs, ours = _both(tmp_path, _qemu_io_scenario)
    for mine, qemu in zip(ours, theirs, strict=True):
        assert mine == qemu
    assert any("not allocated" in step for step in ours)


def _corrupt_scenario(c: Client, work: Path) -> list[Any]:
    # An L2 entry whose host offset is not cluster-aligned: block status signals the
    # corruption as QEMU's qcow2_get_host_offset does (read-only: reported; read-write:
    # fatal, the node ejected), and the clients get EIO, then ENOMEDIUM.
    image = work / "bad.qcow2"
    _sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    _sh("qemu-io", "-f", "qcow2", str(image), "-c", "write -P 1 0 128k")
    with open(image, "r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        (l2_offset,) = struct.unpack(">Q", f.read(8))
        f.seek((l2_offset & 0x00FFFFFFFFFFFE00) + 8)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek((l2_offset & 0x00FFFFFFFFFFFE00) + 8)
        f.write(struct.pack(">Q", entry + 0x200))
    sock = str(work / "nbd.sock")
    c.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    steps: list[Any] = []
    for name in ("ro", "rw"):
        c.cmd("blockdev-add", node_name=name, driver="qcow2", read_only=name == "ro",
              file={"driver": "file", "filename": str(image)})
        c.cmd("nbd-server-add", device=name)
        steps.append(_sh("qemu-img", "map", "--output=json", "-f", "raw", _url(sock, name)))
        steps.append(c.qemu_io(f'{name} "map"'))
        steps.append(c.qemu_io(f'{name} "alloc 0 1M"'))
        steps.append(c.qemu_io(f'{name} "length"'))
        c.cmd("nbd-server-remove", name=name)
        steps.append([(e["event"], e.get("data")) for e in c.events])
        c.events.clear()
        c.cmd("blockdev-del", node_name=name)
    assert c.output is not None
    steps.append(c.output.all())
    steps.append(_sh("qemu-img", "check", str(image)))
    return steps


def test_corrupt_l2_entry_as_qemu(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    theirs, ours = _both(tmp_path, _corrupt_scenario)
    for mine, qemu in zip(ours, theirs, strict=True):
        assert mine == qemu
    assert any("unaligned (L2 offset: 0x" in str(step) for step in ours)
