"""The guest options management tools pass (libvirt's command line, scripts written for
qemu-system-x86_64), each accepted as QEMU accepts it, compared with QEMU 7.2 live.

There is no guest: options that only shape one (``-vga``, ``-serial``, ``-rtc``,
``-overcommit``, ``-sandbox``, ...) must start the server as they start QEMU, and what a
monitor shows afterwards (run state, name, UUID, block devices) must be QEMU's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import qemu_tools
from server_support import running

UUID = "6f1e0d3a-5b7c-4c2e-9a8b-0d1c2e3f4a5b"

OPTIONS = [
    ["-no-user-config"],
    ["-nodefaults"],
    ["-nographic"],
    ["-display", "none"],
    ["-vga", "none"],
    ["-serial", "none"],
    ["-monitor", "none"],
    ["-parallel", "none"],
    ["-overcommit", "mem-lock=off"],
    ["-rtc", "base=utc,driftfix=slew"],
    ["-boot", "strict=on"],
    ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"],
    ["-name", "guest=vm1,debug-threads=on"],
    ["-uuid", UUID],
    ["-no-shutdown"],
    ["-m", "64"],
    ["-smp", "2,sockets=2,cores=1,threads=1"],
    ["-cpu", "qemu64"],
    ["-machine", "pc,usb=off,dump-guest-core=off"],
    ["-global", "kvm-pit.lost_tick_policy=delay"],
    ["-no-hpet"],
    ["-accel", "tcg"],
]


def _seen(args: list[str], tmp_path: Path, qemu: bool) -> dict[str, object]:
    name = "qemu" if qemu else "ours"
    with running(["-machine", "pc", "-S", *args], tmp_path, name, qemu=qemu) as (proc, client):
        seen: dict[str, object] = {
            "status": client.cmd("query-status")["status"],
            "name": client.cmd("query-name"),
            "uuid": client.cmd("query-uuid"),
            "cpus": len(client.cmd("query-cpus-fast")),
            "blocks": [(b["device"], b.get("inserted", {}).get("drv"), b.get("qdev"))
                       for b in client.cmd("query-block")],
        }
        client.execute("quit")
        seen["exit"] = proc.wait(timeout=20)
    return seen


@pytest.mark.parametrize("args", OPTIONS, ids=[" ".join(option) for option in OPTIONS])
def test_guest_option_accepted_as_qemu(tmp_path: Path, args: list[str]) -> None:
    qemu_tools.require("qemu-system-x86_64")
    assert _seen(args, tmp_path, qemu=False) == _seen(args, tmp_path, qemu=True)


def test_all_guest_options_together_and_a_virtio_drive(tmp_path: Path, qemu_img: str) -> None:
    """libvirt-like: every option at once, plus a legacy ``-drive if=virtio``."""
    qemu_tools.require("qemu-system-x86_64")
    image = tmp_path / "d.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    args = [word for option in OPTIONS for word in option]
    seen = []
    for qemu in (True, False):
        folder = tmp_path / ("qemu" if qemu else "ours")
        folder.mkdir()
        copy = folder / "d.qcow2"
        copy.write_bytes(image.read_bytes())
        seen.append(_seen([*args, "-drive", f"file={copy},format=qcow2,if=virtio"], folder, qemu))
    assert seen[0] == seen[1]
    assert seen[1]["uuid"] == {"UUID": UUID}
    assert seen[1]["blocks"] == [("virtio0", "qcow2", "/machine/peripheral-anon/device[0]/virtio-backend")]
