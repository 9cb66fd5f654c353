"""Every object's members come in QEMU's order, compared on the wire with live QEMU.

QEMU writes each object as the hash-bucket walk of its QDict gives it; members sharing a
bucket come newest first, so the order the QAPI visitor inserted them decides between
them (BlockDeviceInfo's ``backing_file`` and ``write_threshold``, VersionTriple's
``minor`` and ``micro``). Where QEMU 10.x added members (``active``, ``children``) or the
versions' key sets differ, the members both have are compared.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import Client, running

pytestmark = pytest.mark.qemu


def _orders(value: Any, where: str = "") -> list[tuple[str, list[str]]]:
    """Every object's member names, in wire order, with where it sits."""
    found: list[tuple[str, list[str]]] = []
    if isinstance(value, dict):
        found.append((where, list(value)))
        for key, item in value.items():
            found.extend(_orders(item, f"{where}.{key}"))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found.extend(_orders(item, f"{where}[{index}]"))
    return found


def _raw(client: Client, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """The reply's ``return`` as read from the wire, member order kept."""
    request: dict[str, Any] = {"execute": command}
    if arguments:
        request["arguments"] = arguments
    client.send_raw(json.dumps(request))
    while True:
        message = json.loads(client.read_line())
        if "event" not in message:
            assert "return" in message, message
            return message["return"]


def _same_order(theirs: Any, ours: Any) -> None:
    mine = dict(_orders(ours))
    for where, keys in _orders(theirs):
        assert where in mine, where
        common = [key for key in keys if key in mine[where]]
        assert [key for key in mine[where] if key in common] == common, where


@pytest.fixture
def images(tmp_path: Path) -> Path:
    qemu_img = qemu_tools.require("qemu-img")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
                   check=True)
    return top


QUERIES: list[tuple[str, dict[str, Any] | None]] = [
    ("query-version", None),
    ("query-named-block-nodes", None),
    ("query-named-block-nodes", {"flat": True}),
    ("query-iothreads", None),
    ("query-migrate-parameters", None),
    ("query-migrate-capabilities", None),
    ("query-status", None),
    ("query-blockstats", {"query-nodes": True}),
]


def test_replies_list_members_in_qemus_order(tmp_path: Path, images: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    answers: dict[str, list[Any]] = {}
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        with running(["-object", "iothread,id=io0"], folder, qemu=name == "qemu") as (_, client):
            answers[name] = [client.greeting]
            client.cmd("blockdev-add", driver="qcow2", node_name="top",
                       file={"driver": "file", "filename": str(images)})
            answers[name] += [_raw(client, command, arguments) for command, arguments in QUERIES]
    for (command, _), theirs, ours in zip([("greeting", None), *QUERIES], answers["qemu"], answers["ours"],
                                          strict=True):
        try:
            _same_order(theirs, ours)
        except AssertionError as err:
            raise AssertionError(f"{command}: {err}\nQEMU: {json.dumps(theirs)}\n"
                                 f"ours: {json.dumps(ours)}") from None


def test_an_echoed_id_keeps_qemus_order(tmp_path: Path) -> None:
    """An object ``id`` is echoed in QDict order of its members as they were read."""
    qemu_tools.require("qemu-system-x86_64")
    # "minor" and "micro" share a bucket: the one read last is written first.
    request = b'{"execute": "query-status", "id": {"minor": 1, "micro": 2, "b": {"micro": 3, "minor": 4}}}'
    lines = []
    for name in ("qemu", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        with running([], folder, qemu=name == "qemu") as (_, client):
            client.send_raw(request)
            line = client.read_line()
            while b'"event"' in line:
                line = client.read_line()
            lines.append(line[line.index(b'"id"'):])
    assert lines[1] == lines[0]
