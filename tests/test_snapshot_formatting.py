"""The ``Formatting ...`` line blockdev-snapshot-sync prints on stdout, against QEMU 7.2.

QEMU's bdrv_img_create prints it (not quiet) before it creates the overlay, so it is
there even when the creation then fails, and it is not there when nothing is created
(``mode: existing``, a format without backing files). iotest 182 compares it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from server_support import QEMU, SERVER, Client

from blocklayer.create import overlay_format_line


@contextmanager
def _process(qemu: bool, work: Path) -> Iterator[tuple[Client, Path]]:
    """A server (or QEMU) whose stdout goes to a file, apart from its stderr."""
    sock = work / "qmp.sock"
    out = work / "stdout"
    with out.open("wb") as sink:
        proc = subprocess.Popen((QEMU if qemu else SERVER)
                                + ["-qmp", f"unix:{sock},server=on,wait=off"],
                                stdout=sink, stderr=subprocess.DEVNULL)
    try:
        client = Client(sock)
        client.execute("qmp_capabilities")
        yield client, out
        client.execute("quit")
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _scenario(client: Client, work: Path) -> list[Any]:
    w = str(work)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"node-name": "f0", "driver": "file", "filename": f"{w}/base.qcow2"}),
        # a file node: its length, backing_fmt=file
        ("blockdev-snapshot-sync", {"node-name": "f0", "snapshot-file": f"{w}/a.ov",
                                    "snapshot-node-name": "o1"}),
        ("blockdev-add", {"node-name": "q0", "driver": "qcow2",
                          "file": {"driver": "file", "filename": f"{w}/b.qcow2"}}),
        # a qcow2 node: its virtual size rounded up to sectors; a comma in the name
        ("blockdev-snapshot-sync", {"node-name": "q0", "snapshot-file": f"{w}/b,c.ov",
                                    "snapshot-node-name": "o2"}),
        ("blockdev-add", {"node-name": "r0", "driver": "raw",
                          "file": {"driver": "file", "filename": f"{w}/base.img"}}),
        # printed, then the creation fails
        ("blockdev-snapshot-sync", {"node-name": "r0", "snapshot-file": f"{w}/nodir/c.ov",
                                    "snapshot-node-name": "o3"}),
        # not printed: raw has no backing file, existing creates nothing
        ("blockdev-snapshot-sync", {"node-name": "r0", "snapshot-file": f"{w}/d.ov",
                                    "snapshot-node-name": "o4", "format": "raw"}),
        ("blockdev-snapshot-sync", {"node-name": "r0", "snapshot-file": f"{w}/e.ov",
                                    "snapshot-node-name": "o5", "mode": "existing"}),
        # in a transaction too
        ("transaction", {"actions": [{"type": "blockdev-snapshot-sync", "data": {
            "node-name": "r0", "snapshot-file": f"{w}/f.ov", "snapshot-node-name": "o6"}}]}),
    ]
    return [client.execute(name, args) for name, args in steps]


def test_formatting_line_as_qemu(tmp_path: Path, qemu_system: str, qemu_img: str) -> None:
    results = []
    for qemu, name in ((True, "qemu"), (False, "ours")):
        work = tmp_path / name
        work.mkdir()
        for fmt, image, size in (("qcow2", "base.qcow2", "32M"), ("qcow2", "b.qcow2", "10000000"),
                                 ("raw", "base.img", "1000000")):
            subprocess.run([qemu_img, "create", "-q", "-f", fmt, str(work / image), size], check=True)
        with _process(qemu, work) as (client, out):
            replies = _scenario(client, work)
        results.append((str(replies).replace(str(work), "@"), out.read_text().replace(str(work), "@")))
    (their_replies, their_out), (our_replies, our_out) = results
    assert our_replies == their_replies
    assert our_out == their_out
    # what QEMU prints, so that the comparison cannot pass on two empty outputs
    assert our_out.splitlines() == [
        f"Formatting '@/{name}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
        f"size={size} backing_file=@/{backing} backing_fmt={fmt} lazy_refcounts=off refcount_bits=16"
        for name, size, backing, fmt in (("a.ov", 197120, "base.qcow2", "file"),
                                         ("b,c.ov", 10000384, "b.qcow2", "qcow2"),
                                         ("nodir/c.ov", 1000448, "base.img", "raw"),
                                         ("f.ov", 1000448, "base.img", "raw"))]


@pytest.mark.parametrize("value, printed", [("a,b", "a,,b"), ("plain", "plain")])
def test_option_values_double_their_commas(value: str, printed: str) -> None:
    # qemu_opts_print's escaped_print (QEMU shows it with a json: backing file name)
    line = overlay_format_line("x,y", 512, value, "raw")
    assert f"backing_file={printed} " in line and line.startswith("Formatting 'x,y',")
