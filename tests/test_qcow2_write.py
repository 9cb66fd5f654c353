"""Images written by Qcow2Driver pass qemu-img check and compare equal to the model."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from qcow2_support import (
    assert_clean,
    close_qcow2,
    open_qcow2,
    pattern,
    qemu_check,
    qemu_compare,
    qemu_img_create,
    qemu_io,
    run,
)

from blocklayer.errors import BlockError
from blocklayer.qcow2.header import parse_header

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_utils")]

MiB = 1 << 20


def _verify(img: Path, model: bytearray, tmp_path: Path, fmt_model: str = "raw") -> None:
    assert_clean(img)
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    qemu_compare(img, raw)


def _header(path: Path) -> dict[str, int]:
    hdr = parse_header(path.read_bytes()[:65536])
    return {"reftable": hdr.refcount_table_offset, "reftable_clusters": hdr.refcount_table_clusters,
            "incompat": hdr.incompatible_features, "autoclear": hdr.autoclear_features}


WRITE_VARIANTS = [
    pytest.param("compat=1.1", id="v3-64k"),
    pytest.param("compat=0.10", id="v2-64k"),
    pytest.param("compat=1.1,cluster_size=512,refcount_bits=64", id="v3-512-rc64"),
    pytest.param("compat=1.1,cluster_size=4096,refcount_bits=1", id="v3-4k-rc1"),
    pytest.param("compat=1.1,cluster_size=4096,refcount_bits=2", id="v3-4k-rc2"),
    pytest.param("compat=1.1,cluster_size=8192,refcount_bits=4", id="v3-8k-rc4"),
    pytest.param("compat=1.1,cluster_size=4096,refcount_bits=8", id="v3-4k-rc8"),
    pytest.param("compat=1.1,cluster_size=2097152", id="v3-2m"),
    pytest.param("compat=0.10,cluster_size=512", id="v2-512"),
]


@pytest.mark.parametrize("opts", WRITE_VARIANTS)
def test_random_writes_check_clean(tmp_path: Path, opts: str) -> None:
    size = 16 * MiB
    img = tmp_path / "img.qcow2"
    qemu_img_create(img, size, opts=opts)
    model = bytearray(size)
    rnd = random.Random(opts)
    drv = open_qcow2(img)
    for i in range(120):
        length = rnd.choice([1, 512, 4096, 5000, 65536, 300_000])
        offset = rnd.randrange(0, size - length)
        data = bytes([i % 250 + 1]) * length
        drv.write(offset, data)
        model[offset:offset + length] = data
        if i % 40 == 0:
            drv.flush()
    assert drv.read(0, size) == bytes(model)
    close_qcow2(drv)
    _verify(img, model, tmp_path)


@pytest.mark.parametrize("lazy", [False, True])
def test_refcount_table_growth_and_new_l2_tables(tmp_path: Path, lazy: bool) -> None:
    # 512-byte clusters with 64-bit refcounts: one refblock covers 64 clusters and the
    # initial one-cluster reftable only 2 MiB of file, so it has to grow repeatedly.
    # With lazy refcounts the close rewrites the whole header (mark_clean): it must carry
    # the moved table's offset and size.
    size = 8 * MiB
    img = tmp_path / "grow.qcow2"
    qemu_img_create(img, size, opts="cluster_size=512,refcount_bits=64"
                    + (",lazy_refcounts=on" if lazy else ""))
    before = _header(img)
    model = bytearray(size)
    drv = open_qcow2(img)
    for i, offset in enumerate(range(0, size - 40_000, 96 * 1024)):
        data = bytes([i % 200 + 1]) * 40_000
        drv.write(offset, data)
        model[offset:offset + len(data)] = data
    close_qcow2(drv)
    after = _header(img)
    assert after["reftable"] != before["reftable"]
    assert after["reftable_clusters"] > before["reftable_clusters"]
    assert img.stat().st_size > 3 * MiB
    _verify(img, model, tmp_path)


def test_growth_survives_reopen_and_more_writes(tmp_path: Path) -> None:
    size = 4 * MiB
    img = tmp_path / "g.qcow2"
    qemu_img_create(img, size, opts="cluster_size=512,refcount_bits=16")
    model = bytearray(size)
    for round_ in range(3):
        drv = open_qcow2(img)
        for offset in range(round_ * 4096, size, 16384):
            drv.write(offset, pattern(round_ + 1, 3000))
            model[offset:offset + 3000] = pattern(round_ + 1, 3000)
        close_qcow2(drv)
        assert_clean(img)
    _verify(img, model, tmp_path)


def test_partial_writes_cow_from_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    size = 4 * MiB
    base_data = bytearray(random.Random(1).randbytes(3 * MiB))
    base.write_bytes(bytes(base_data))
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, size, backing="base.raw", backing_fmt="raw")
    model = bytearray(size)
    model[:len(base_data)] = base_data
    drv = open_qcow2(top)
    for offset, length in [(100, 10), (65536 + 4000, 70000), (3 * MiB - 100, 300),
                           (2 * MiB, 65536), (3 * MiB + 512, 1)]:
        drv.write(offset, pattern(0xEE, length))
        model[offset:offset + length] = pattern(0xEE, length)
    assert drv.read(0, size) == bytes(model)
    close_qcow2(drv)
    assert_clean(top)
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    qemu_compare(top, raw)


def test_qcow2_backing_chain_cow(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img_create(base, 2 * MiB, opts="cluster_size=4096")
    qemu_io(base, "write -P 0x5a 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, 2 * MiB, opts="cluster_size=65536", backing="base.qcow2",
                    backing_fmt="qcow2")
    drv = open_qcow2(top)
    drv.write(1000, pattern(0x01, 10))
    close_qcow2(drv)
    assert_clean(top)
    qemu_io(top, "read -P 0x5a 0 1000", "read -P 0x01 1000 10", "read -P 0x5a 1010 64526",
            "read -P 0x5a 64k 1984k", read_only=True)


def test_write_zeroes_and_discard_v3(tmp_path: Path) -> None:
    size = 4 * MiB
    img = tmp_path / "z.qcow2"
    qemu_img_create(img, size, opts="cluster_size=65536")
    drv = open_qcow2(img)
    drv.write(0, pattern(0x77, size))
    drv.write_zeroes(65536, 3 * 65536, may_unmap=False)  # zero clusters, kept allocated
    drv.write_zeroes(MiB, 2 * 65536, may_unmap=True)  # freed
    drv.write_zeroes(2 * MiB + 100, 1000)  # partial: explicit zeroes
    drv.discard(3 * MiB, 65536 + 100)  # one whole cluster discarded, the rest ignored
    drv.discard(3 * MiB + 2 * 65536 + 5, 100)  # no whole cluster: nothing
    model = bytearray(pattern(0x77, size))
    model[65536:4 * 65536] = bytes(3 * 65536)
    model[MiB:MiB + 2 * 65536] = bytes(2 * 65536)
    model[2 * MiB + 100:2 * MiB + 1100] = bytes(1000)
    model[3 * MiB:3 * MiB + 65536] = bytes(65536)
    assert drv.read(0, size) == bytes(model)
    close_qcow2(drv)
    _verify(img, model, tmp_path)
    mapping = run("qemu-img", "map", "--output=json", str(img)).stdout
    assert '"zero": true' in mapping
    # Writing into a preallocated zero cluster reuses it; into a freed one allocates.
    drv = open_qcow2(img)
    drv.write(65536 + 10, pattern(0x12, 20))
    drv.write(MiB + 10, pattern(0x13, 20))
    model[65536 + 10:65536 + 30] = pattern(0x12, 20)
    model[MiB + 10:MiB + 30] = pattern(0x13, 20)
    close_qcow2(drv)
    _verify(img, model, tmp_path)


def test_discard_over_backing_masks_it(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(0x42, MiB))
    top = tmp_path / "top.qcow2"
    qemu_img_create(top, MiB, opts="cluster_size=65536", backing="base.raw", backing_fmt="raw")
    drv = open_qcow2(top)
    drv.discard(0, 2 * 65536)
    drv.write_zeroes(4 * 65536, 65536, may_unmap=True)
    assert drv.read(0, 2 * 65536) == bytes(2 * 65536)
    assert drv.read(2 * 65536, 100) == pattern(0x42, 100)
    assert drv.read(4 * 65536, 65536) == bytes(65536)
    close_qcow2(drv)
    assert_clean(top)
    qemu_io(top, "read -P 0 0 128k", "read -P 0x42 128k 128k", "read -P 0 256k 64k",
            read_only=True)


def test_v2_discard_and_zeroes(tmp_path: Path) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_img_create(img, 2 * MiB, opts="compat=0.10,cluster_size=65536")
    drv = open_qcow2(img)
    drv.write(0, pattern(0x31, 2 * MiB))
    drv.discard(65536, 65536)
    drv.write_zeroes(4 * 65536, 2 * 65536, may_unmap=True)
    model = bytearray(pattern(0x31, 2 * MiB))
    model[65536:2 * 65536] = bytes(65536)
    model[4 * 65536:6 * 65536] = bytes(2 * 65536)
    assert drv.read(0, 2 * MiB) == bytes(model)
    close_qcow2(drv)
    _verify(img, model, tmp_path)


def test_discard_punches_file(tmp_path: Path) -> None:
    img = tmp_path / "p.qcow2"
    qemu_img_create(img, 8 * MiB)
    drv = open_qcow2(img)
    drv.write(0, pattern(0x1, 8 * MiB))
    drv.flush()
    used = img.stat().st_blocks
    drv.discard(0, 8 * MiB)
    close_qcow2(drv)
    assert img.stat().st_blocks < used // 2
    assert_clean(img)
    qemu_io(img, "read -P 0 0 8M", read_only=True)


def test_write_over_compressed_clusters(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data = bytearray(2 * MiB)
    for i in range(0, len(data), 1000):
        data[i] = i % 256
    raw.write_bytes(bytes(data))
    img = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(img))
    drv = open_qcow2(img)
    drv.write(1000, pattern(0xCC, 10))  # partial: COW from the compressed cluster
    drv.write(65536, pattern(0xDD, 65536))  # whole cluster replaced
    drv.write_zeroes(3 * 65536, 65536)  # compressed -> zero, frees its sectors
    drv.discard(4 * 65536, 65536)
    data[1000:1010] = pattern(0xCC, 10)
    data[65536:2 * 65536] = pattern(0xDD, 65536)
    data[3 * 65536:5 * 65536] = bytes(2 * 65536)
    assert drv.read(0, 2 * MiB) == bytes(data)
    close_qcow2(drv)
    _verify(img, data, tmp_path)


def test_internal_snapshot_cow(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img_create(img, 2 * MiB, opts="cluster_size=65536")
    qemu_io(img, "write -P 0x10 0 2M")
    run("qemu-img", "snapshot", "-c", "snap1", str(img))
    drv = open_qcow2(img)
    drv.write(100, pattern(0x20, 100))  # shared L2 and data cluster: both COWed
    drv.write(MiB, pattern(0x21, 65536))
    drv.discard(5 * 65536, 65536)
    drv.write_zeroes(7 * 65536, 65536, may_unmap=True)
    close_qcow2(drv)
    assert_clean(img)
    model = bytearray(pattern(0x10, 2 * MiB))
    model[100:200] = pattern(0x20, 100)
    model[MiB:MiB + 65536] = pattern(0x21, 65536)
    model[5 * 65536:6 * 65536] = bytes(65536)
    model[7 * 65536:8 * 65536] = bytes(65536)
    _verify(img, model, tmp_path)
    snap = tmp_path / "snap.raw"
    run("qemu-img", "convert", "-l", "snapshot.name=snap1", "-O", "raw", str(img), str(snap))
    assert snap.read_bytes() == pattern(0x10, 2 * MiB)


def test_lazy_refcounts_dirty_until_inactivate(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    qemu_img_create(img, 4 * MiB, opts="lazy_refcounts=on,cluster_size=4096")
    drv = open_qcow2(img)
    drv.write(0, pattern(0x61, 100_000))
    drv.flush()
    assert _header(img)["incompat"] & 1
    assert drv.image_info()["dirty-flag"] is True
    drv.inactivate()
    assert not _header(img)["incompat"] & 1
    close_qcow2(drv)
    assert_clean(img)
    qemu_io(img, "read -P 0x61 0 100000", read_only=True)


def test_lazy_option_on_plain_image(tmp_path: Path) -> None:
    img = tmp_path / "l.qcow2"
    qemu_img_create(img, 4 * MiB)
    drv = open_qcow2(img, options={"lazy-refcounts": True})
    drv.write(0, pattern(0x62, 300_000))
    drv.flush()
    assert _header(img)["incompat"] & 1
    close_qcow2(drv)
    assert _header(img)["incompat"] == 0
    assert_clean(img)


def test_repair_dirty_image_from_qemu_crash(tmp_path: Path) -> None:
    img = tmp_path / "crash.qcow2"
    qemu_img_create(img, 4 * MiB, opts="lazy_refcounts=on,cluster_size=4096")
    qemu_io(img, "write -P 0x71 0 200k", "write -P 0x72 1M 64k", "abort", check=False)
    code, result = qemu_check(img)
    assert code != 0 and result.get("corruptions", 0) > 0
    drv = open_qcow2(img)
    assert drv.image_info()["dirty-flag"] is False
    drv.write(2 * MiB, pattern(0x73, 50_000))
    close_qcow2(drv)
    assert_clean(img)
    qemu_io(img, "read -P 0x71 0 200k", "read -P 0x72 1M 64k", "read -P 0x73 2M 50000",
            read_only=True)


def test_dirty_image_read_only_is_not_repaired(tmp_path: Path) -> None:
    img = tmp_path / "dirty.qcow2"
    qemu_img_create(img, MiB, opts="lazy_refcounts=on")
    qemu_io(img, "write -P 0x75 0 64k", "abort", check=False)
    before = img.read_bytes()
    drv = open_qcow2(img, read_only=True)
    assert drv.image_info()["dirty-flag"] is True
    assert drv.read(0, 65536) == pattern(0x75, 65536)
    close_qcow2(drv)
    assert img.read_bytes() == before


def test_small_l2_cache_evictions(tmp_path: Path) -> None:
    size = 64 * MiB
    img = tmp_path / "ev.qcow2"
    qemu_img_create(img, size, opts="cluster_size=4096")
    drv = open_qcow2(img, options={"l2-cache-size": 8192, "refcount-cache-size": 4096,
                                   "l2-cache-entry-size": 1024})
    model = bytearray(size)
    rnd = random.Random(5)
    for i in range(300):
        offset = rnd.randrange(0, size - 9000)
        drv.write(offset, bytes([i % 255 + 1]) * 9000)
        model[offset:offset + 9000] = bytes([i % 255 + 1]) * 9000
    assert drv.read(0, size) == bytes(model)
    close_qcow2(drv)
    _verify(img, model, tmp_path)


def test_l1_entries_written_through(tmp_path: Path) -> None:
    img = tmp_path / "l1.qcow2"
    qemu_img_create(img, 64 * MiB, opts="cluster_size=4096")
    drv = open_qcow2(img)
    drv.write(40 * MiB, pattern(0x09, 10))
    # The L1 entry is durable as soon as the new L2 table exists.
    hdr = parse_header(img.read_bytes()[:4096])
    l1 = img.read_bytes()[hdr.l1_table_offset:hdr.l1_table_offset + hdr.l1_size * 8]
    entries = struct.unpack(f">{hdr.l1_size}Q", l1)
    assert sum(1 for e in entries if e) == 1
    assert entries[(40 * MiB) // (4096 * 512)] >> 63 == 1
    close_qcow2(drv)
    assert_clean(img)


def test_tiny_caches_many_refblocks(tmp_path: Path) -> None:
    size = 8 * MiB
    img = tmp_path / "tiny.qcow2"
    qemu_img_create(img, size, opts="cluster_size=512,refcount_bits=64")
    drv = open_qcow2(img, options={"l2-cache-size": 1024, "refcount-cache-size": 512})
    model = bytearray(size)
    rnd = random.Random(9)
    for i in range(400):
        length = rnd.choice([300, 512, 2000, 9000])
        offset = rnd.randrange(0, size - length)
        if i % 7 == 0:
            drv.write_zeroes(offset // 512 * 512, 4096, may_unmap=True)
            model[offset // 512 * 512:offset // 512 * 512 + 4096] = bytes(4096)
        else:
            drv.write(offset, bytes([i % 255 + 1]) * length)
            model[offset:offset + length] = bytes([i % 255 + 1]) * length
    assert drv.read(0, size) == bytes(model)
    close_qcow2(drv)
    _verify(img, model, tmp_path)


def test_discard_no_unref_keeps_allocation(tmp_path: Path) -> None:
    img = tmp_path / "nounref.qcow2"
    qemu_img_create(img, MiB)
    drv = open_qcow2(img, options={"discard-no-unref": True})
    drv.write(0, pattern(0x3C, 4 * 65536))
    drv.discard(65536, 2 * 65536)
    assert drv.read(0, 4 * 65536) == pattern(0x3C, 65536) + bytes(2 * 65536) + pattern(0x3C, 65536)
    close_qcow2(drv)
    assert_clean(img)
    mapping = run("qemu-img", "map", "--output=json", str(img)).stdout
    assert '"zero": true, "data": false, "offset"' in mapping.replace("\n", " ")


def test_overlap_check_marks_image_corrupt(tmp_path: Path) -> None:
    img = tmp_path / "ov.qcow2"
    qemu_img_create(img, MiB)
    qemu_io(img, "write -P 0x10 0 64k")
    raw = bytearray(img.read_bytes())
    hdr = parse_header(bytes(raw[:65536]))
    (l1_entry,) = struct.unpack_from(">Q", raw, hdr.l1_table_offset)
    l2_offset = l1_entry & 0x00FFFFFFFFFFFE00
    # Point guest cluster 0 at the L1 table itself (a corrupted L2 entry).
    struct.pack_into(">Q", raw, l2_offset, hdr.l1_table_offset | (1 << 63))
    img.write_bytes(bytes(raw))
    drv = open_qcow2(img)
    with pytest.raises(BlockError, match=r"Preventing invalid write on metadata \(overlaps with "
                       r"active L1 table\)"):
        drv.write(100, b"boom")
    with pytest.raises(BlockError):
        drv.write(65536, b"more")
    close_qcow2(drv)
    assert parse_header(img.read_bytes()[:65536]).incompatible_features & 2
    assert struct.unpack_from(">Q", img.read_bytes(), hdr.l1_table_offset)[0] == l1_entry


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10"])
def test_unaligned_virtual_size_tail(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "odd.qcow2"
    qemu_img_create(img, 1_000_000, opts=opts)  # rounded up to 1000448 bytes
    drv = open_qcow2(img)
    size = drv.getlength()
    assert size == 1_000_448
    drv.write(size - 70_000, pattern(0x4D, 70_000))
    model = bytearray(size)
    model[size - 70_000:] = pattern(0x4D, 70_000)
    last = size // 65536 * 65536
    drv.discard(last, size - last)  # the partial last cluster counts as whole
    model[last:] = bytes(size - last)
    drv.write_zeroes(size - 100_000, 10_000, may_unmap=True)
    model[size - 100_000:size - 90_000] = bytes(10_000)
    assert drv.read(0, size + 4096) == bytes(model) + bytes(4096)
    close_qcow2(drv)
    _verify(img, model, tmp_path)


def test_write_zeroes_on_a_v2_overlay_as_qemu(tmp_path: Path) -> None:
    """qcow2 v2 has no zero flag: with a backing file, zeroes are written out, partial
    clusters copied from the backing file around them; the image equals QEMU's after the
    same requests (qemu-io on a copy) and reads back as the model."""
    size = 2 * MiB
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(random.Random(2).randbytes(size)))
    requests = [(4096, 8192), (65536, 65536), (200_000, 70_000)]
    images = {}
    for side in ("ours", "qemu"):
        top = tmp_path / f"{side}.qcow2"
        qemu_img_create(top, size, opts="compat=0.10", backing="base.raw", backing_fmt="raw")
        images[side] = top
    drv = open_qcow2(images["ours"])
    for offset, length in requests:
        drv.write_zeroes(offset, length)
    close_qcow2(drv)
    qemu_io(images["qemu"], *(f"write -z {offset} {length}" for offset, length in requests))
    model = bytearray(base.read_bytes())
    for offset, length in requests:
        model[offset:offset + length] = bytes(length)
    assert_clean(images["ours"])
    raw = tmp_path / "model.raw"
    raw.write_bytes(bytes(model))
    qemu_compare(images["ours"], raw)
    qemu_compare(images["ours"], images["qemu"], fmt_b="qcow2")


def test_unmapping_zeroes_then_an_l2_allocation_in_one_request_as_qemu(tmp_path: Path) -> None:
    """One write_zeroes with unmap over data (its clusters freed, their discards queued)
    and on into a region without an L2 table (a table allocated, maybe in a cluster just
    freed: its queued discard must be cancelled, QEMU's update_refcount). The image
    equals QEMU's after the same request, maps alike and checks clean."""
    size = 1024 * MiB
    images = {}
    for side in ("ours", "qemu"):
        img = tmp_path / f"{side}.qcow2"
        qemu_img_create(img, size)
        qemu_io(img, "write -P 0x11 0 192k", "write -P 0x12 256k 64k")
        images[side] = img
    drv = open_qcow2(images["ours"], options={"discard": "unmap"})
    drv.write_zeroes(0, 600 * MiB, may_unmap=True)
    close_qcow2(drv)
    qemu_io(images["qemu"], "write -z -u 0 600M")
    assert_clean(images["ours"])
    qemu_compare(images["ours"], images["qemu"], fmt_b="qcow2")
    maps = [run("qemu-img", "map", "--output=json", str(images[side])).stdout for side in ("ours", "qemu")]
    assert maps[0] == maps[1]
