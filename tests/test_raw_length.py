"""A raw node's length over a file whose size is no multiple of 512, against QEMU 7.2.

QEMU counts every node's length in 512-byte sectors (bdrv_getlength: total_sectors,
rounded up), so raw over a 1000-byte file is 1024 bytes long, its last 24 bytes read as
zeroes, and raw's offset/size checks compare with the rounded length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import running

pytestmark = pytest.mark.qemu


def _raw(image: Path, name: str, **window: int) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name, **window, "file": {"driver": "file", "filename": str(image)}}


def _session(tmp_path: Path, image: Path, qemu: bool) -> list[Any]:
    seen: list[Any] = []
    with running([], tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
        seen.append(client.execute("blockdev-add", _raw(image, "r")))
        nodes = client.cmd("query-named-block-nodes", flat=True)
        seen.append({n["drv"]: n["image"]["virtual-size"] for n in nodes})
        seen.append(client.qemu_io('r "length"'))
        seen.append(client.qemu_io('r "read -P 0 1000 24"').split("\n")[0])
        for name, window in (("a", {"offset": 1000}), ("b", {"offset": 1024}), ("c", {"offset": 1025}),
                             ("d", {"offset": 512, "size": 512}), ("e", {"offset": 513, "size": 512})):
            seen.append(client.execute("blockdev-add", _raw(image, name, **window)))
    return seen


def test_raw_over_an_odd_sized_file_is_sector_rounded(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    image = tmp_path / "odd.raw"
    image.write_bytes(b"\x11" * 1000)
    theirs = _session(tmp_path, image, qemu=True)
    ours = _session(tmp_path, image, qemu=False)
    assert ours == theirs
    assert theirs[1] == {"raw": 1024, "file": 1024}
    assert image.stat().st_size == 1000
