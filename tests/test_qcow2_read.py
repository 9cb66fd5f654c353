"""Images made by qemu-img/qemu-io read back the right bytes through Qcow2Driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from qcow2_support import (
    close_qcow2,
    open_qcow2,
    pattern,
    qemu_img_create,
    qemu_io,
    run,
)

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_utils")]

MiB = 1 << 20


def _apply(model: bytearray, ops: list[tuple[str, int, int, int]]) -> list[str]:
    """qemu-io commands for ``ops``, applied to ``model`` as well."""
    commands = []
    for op, byte, offset, length in ops:
        if op == "write":
            commands.append(f"write -P {byte:#x} {offset} {length}")
            model[offset:offset + length] = pattern(byte, length)
        elif op == "zero":
            commands.append(f"write -z {offset} {length}")
            model[offset:offset + length] = bytes(length)
    return commands


VARIANTS = [
    pytest.param("compat=1.1,cluster_size=65536", id="v3-64k"),
    pytest.param("compat=0.10,cluster_size=65536", id="v2-64k"),
    pytest.param("compat=0.10,cluster_size=512", id="v2-512"),
    pytest.param("compat=1.1,cluster_size=512,refcount_bits=16", id="v3-512"),
    pytest.param("compat=1.1,cluster_size=4096,refcount_bits=1", id="v3-4k-rc1"),
    pytest.param("compat=1.1,cluster_size=4096,refcount_bits=8", id="v3-4k-rc8"),
    pytest.param("compat=1.1,cluster_size=65536,refcount_bits=64", id="v3-64k-rc64"),
    pytest.param("compat=1.1,cluster_size=2097152,refcount_bits=2", id="v3-2m-rc2"),
    pytest.param("compat=1.1,cluster_size=16384,refcount_bits=4", id="v3-16k-rc4"),
    pytest.param("compat=1.1,cluster_size=32768,refcount_bits=32", id="v3-32k-rc32"),
    pytest.param("compat=1.1,lazy_refcounts=on", id="v3-lazy"),
]


@pytest.mark.parametrize("opts", VARIANTS)
def test_read_qemu_written_image(tmp_path: Path, opts: str) -> None:
    size = 12 * MiB
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, size, opts=opts)
    model = bytearray(size)
    ops = [
        ("write", 0x11, 0, 100_000),
        ("write", 0x22, MiB + 512, 70_000),
        ("write", 0x33, 5 * MiB - 1000, 3000),
        ("zero", 0, 4 * MiB, 2 * MiB + 4096),
        ("write", 0x44, 4 * MiB + 8192, 512),
        ("write", 0x55, size - 4096, 4096),
        ("write", 0x66, 7 * MiB, 2 * MiB + 1536),
    ]
    qemu_io(img, *_apply(model, ops))
    drv = open_qcow2(img, read_only=True)
    try:
        assert drv.getlength() == size
        assert drv.read(0, size) == bytes(model)
        # Unaligned reads crossing cluster and type boundaries.
        for off, length in [(99_990, 30), (MiB + 500, 70_100), (4 * MiB + 8000, 1000),
                            (size - 5000, 5000), (size - 10, 100)]:
            want = bytes(model[off:off + length]) + bytes(max(0, off + length - size))
            assert drv.read(off, length) == want
    finally:
        close_qcow2(drv)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_read_through_backing(tmp_path: Path, backing_fmt: str) -> None:
    base = tmp_path / f"base.{backing_fmt}"
    top = tmp_path / "top.qcow2"
    base_size = 3 * MiB
    size = 6 * MiB
    model = bytearray(size)
    if backing_fmt == "raw":
        base.write_bytes(bytes(base_size))
        qemu_io(base, *_apply(model, [("write", 0xA1, 0, base_size)]), fmt="raw")
    else:
        qemu_img_create(base, base_size, opts="cluster_size=4096")
        qemu_io(base, *_apply(model, [("write", 0xA1, 0, MiB), ("write", 0xA2, 2 * MiB, 100)]))
    qemu_img_create(top, size, backing=base.name, backing_fmt=backing_fmt)
    qemu_io(top, *_apply(model, [("write", 0xB1, 4096, 1000), ("write", 0xB2, 2 * MiB + 50, 10),
                                 ("zero", 0, 512 * 1024, 64 * 1024),
                                 ("write", 0xB3, 4 * MiB, 4096)]))
    drv = open_qcow2(top, read_only=True)
    try:
        req = drv.backing_request()
        assert req is not None and req.filename == base.name and req.format == backing_fmt
        assert req.path == str(base)
        info = drv.image_info()
        assert info["backing-filename"] == base.name
        assert info["backing-filename-format"] == backing_fmt
        assert info["full-backing-filename"] == str(base)
        assert drv.read(0, size) == bytes(model)
    finally:
        close_qcow2(drv)


def test_read_compressed_image(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    size = 4 * MiB + 12_345 // 512 * 512
    data = bytearray(size)
    for i in range(0, size, 4096):
        data[i:i + 100] = bytes([(i // 4096) % 251]) * 100
    data[MiB:2 * MiB] = bytes(range(256)) * 4096
    raw.write_bytes(bytes(data))
    out = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
        str(raw), str(out))
    drv = open_qcow2(out, read_only=True)
    try:
        assert drv.read(0, size) == bytes(data)
        assert drv.read(MiB + 1000, 70_000) == bytes(data[MiB + 1000:MiB + 71_000])
    finally:
        close_qcow2(drv)


def test_image_info_matches_qemu_shape(tmp_path: Path) -> None:
    v3 = tmp_path / "v3.qcow2"
    v2 = tmp_path / "v2.qcow2"
    qemu_img_create(v3, MiB, opts="lazy_refcounts=on,refcount_bits=8")
    qemu_img_create(v2, MiB, opts="compat=0.10,cluster_size=4096")
    d3 = open_qcow2(v3, read_only=True)
    d2 = open_qcow2(v2, read_only=True)
    try:
        assert d3.image_info() == {
            "cluster-size": 65536, "dirty-flag": False,
            "format-specific": {"type": "qcow2", "data": {
                "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": True,
                "refcount-bits": 8, "corrupt": False, "extended-l2": False}}}
        assert d2.image_info() == {
            "cluster-size": 4096, "dirty-flag": False,
            "format-specific": {"type": "qcow2", "data": {
                "compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}}}
    finally:
        close_qcow2(d3)
        close_qcow2(d2)
