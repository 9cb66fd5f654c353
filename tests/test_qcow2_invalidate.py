"""invalidate_cache() re-reads everything; skipping it corrupts (the migration hazard)."""

from __future__ import annotations

from pathlib import Path

import pytest
from qcow2_support import (
    close_qcow2,
    open_qcow2,
    pattern,
    qemu_check,
    qemu_img_create,
    qemu_io,
    run,
)

from blocklayer.qcow2 import Qcow2Driver

pytestmark = [pytest.mark.qemu, pytest.mark.usefixtures("qemu_utils")]

MiB = 1 << 20


def _handover(img: Path, skip: bool) -> tuple[Qcow2Driver, bytes]:
    """A writes and hands over; B allocates (new L2 table + data); A takes back over."""
    qemu_img_create(img, 16 * MiB, opts="cluster_size=4096")
    a = open_qcow2(img, driver=Qcow2Driver(skip_invalidate_for_tests=skip))
    a.write(0, pattern(0xA1, 8192))
    a.read(8 * MiB, 4096)  # A caches "no L2 table here"
    a.flush()
    a.inactivate()  # migration source hands the image over

    b = open_qcow2(img, inactive=True)
    b.invalidate_cache()  # destination activates
    b.write(8 * MiB, pattern(0xB2, 8192))
    b.inactivate()
    close_qcow2(b)

    a.invalidate_cache()  # back to A (e.g. a failed migration)
    seen = a.read(8 * MiB, 8192)
    a.write(12 * MiB, pattern(0xA3, 8192))
    a.inactivate()
    close_qcow2(a)
    return a, seen


def test_invalidate_rereads_metadata(tmp_path: Path) -> None:
    img = tmp_path / "shared.qcow2"
    _, seen = _handover(img, skip=False)
    assert seen == pattern(0xB2, 8192)
    code, result = qemu_check(img)
    assert code == 0 and result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result
    qemu_io(img, "read -P 0xa1 0 8k", "read -P 0xb2 8M 8k", "read -P 0xa3 12M 8k",
            read_only=True)


def test_skipping_invalidate_corrupts(tmp_path: Path) -> None:
    img = tmp_path / "shared.qcow2"
    _, seen = _handover(img, skip=True)
    # A never saw B's data ...
    assert seen != pattern(0xB2, 8192)
    # ... and reused B's clusters: two L1 entries now share one L2 table.
    code, result = qemu_check(img)
    assert code == 2 and result.get("corruptions", 0) > 0, result
    out = run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xb2 8M 8k", str(img),
              check=False)
    assert "Pattern verification failed" in out.stdout + out.stderr
