"""Random operation sequences checked byte for byte against a model, then by qemu-img."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import qemu_tools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_support import assert_clean, close_qcow2, open_qcow2, qemu_compare, qemu_img_create

from blocklayer.qcow2 import Qcow2Driver

pytestmark = pytest.mark.qemu

SIZE = 1 << 21

FORMATS = st.sampled_from([
    ("compat=1.1,cluster_size=512,refcount_bits=16", 512),
    ("compat=1.1,cluster_size=4096,refcount_bits=1", 4096),
    ("compat=1.1,cluster_size=4096,refcount_bits=64,lazy_refcounts=on", 4096),
    ("compat=1.1,cluster_size=65536,refcount_bits=8", 65536),
    ("compat=0.10,cluster_size=1024", 1024),
])

OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 150_000),
              st.integers(1, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 200_000), st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SIZE - 1), st.integers(1, 300_000),
              st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("cycle"), st.just(0), st.just(0), st.just(0)),
), min_size=1, max_size=25)


def _discard_model(model: bytearray, offset: int, length: int, cluster: int,
                   v2_backed: bool) -> None:
    if v2_backed:
        return
    end = offset + length
    start = -(-offset // cluster) * cluster
    stop = end if end == SIZE else end // cluster * cluster
    if start < stop:
        model[start:stop] = bytes(stop - start)


@pytest.fixture(autouse=True)
def _need_qemu() -> None:
    qemu_tools.require("qemu-img")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=FORMATS, backed=st.booleans(), ops=OPS)
def test_random_operations_match_model(fmt: tuple[str, int], backed: bool,
                                       ops: list[tuple[str, int, int, int]]) -> None:
    opts, cluster = fmt
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "img.qcow2"
        model = bytearray(SIZE)
        if backed:
            base = Path(tmp) / "base.raw"
            base_data = bytes((i * 7 + 3) % 256 for i in range(256)) * (SIZE // 2 // 256)
            base.write_bytes(base_data)
            model[:len(base_data)] = base_data
            qemu_img_create(img, SIZE, opts=opts, backing="base.raw", backing_fmt="raw")
        else:
            qemu_img_create(img, SIZE, opts=opts)
        v2_backed = backed and "compat=0.10" in opts
        drv: Qcow2Driver = open_qcow2(img)
        try:
            for op, offset, length, arg in ops:
                length = min(length, SIZE - offset)
                if op == "write":
                    data = bytes([arg]) * length
                    drv.write(offset, data)
                    model[offset:offset + length] = data
                elif op == "zero":
                    drv.write_zeroes(offset, length, may_unmap=bool(arg))
                    model[offset:offset + length] = bytes(length)
                elif op == "discard":
                    drv.discard(offset, length)
                    _discard_model(model, offset, length, cluster, v2_backed)
                elif op == "flush":
                    drv.flush()
                elif op == "reopen":
                    close_qcow2(drv)
                    drv = open_qcow2(img)
                else:
                    drv.inactivate()
                    drv.invalidate_cache()
                if op in ("write", "zero", "discard"):
                    lo = max(0, offset - 1000)
                    hi = min(SIZE, offset + length + 1000)
                    assert drv.read(lo, hi - lo) == bytes(model[lo:hi])
            assert drv.read(0, SIZE) == bytes(model)
        finally:
            close_qcow2(drv)
        assert_clean(img)
        raw = Path(tmp) / "model.raw"
        raw.write_bytes(bytes(model))
        qemu_compare(img, raw)
