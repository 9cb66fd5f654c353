"""The machine commands (libvirt's capability probe and domain start), against live QEMU 7.2.

Each test sends the same requests to QEMU (``-machine none``: no guest, like us) and to
the server. Where the server models less than QEMU has (machine types, QOM classes and
properties), every entry it does answer must be QEMU's entry unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import Client, running

# Machine types QEMU 7.2 has that we do not offer: no PC variant but i440fx and q35.
NOT_MODELLED_MACHINES = {"isapc", "microvm", "x-remote"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Client, Path]]:
    """(QEMU client, our client, scratch folder), both VMs started with -S."""
    qemu_tools.require("qemu-system-x86_64")
    folder = tmp_path_factory.mktemp("machine")
    with running(["-S"], folder, "qemu", qemu=True) as (_, qemu), \
            running(["-S"], folder, "ours") as (_, ours):
        yield qemu, ours, folder


def both(pair: tuple[Client, Client, Path], command: str, args: dict[str, Any] | None = None
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    qemu, ours, _ = pair
    return qemu.execute(command, args), ours.execute(command, args)


@pytest.mark.parametrize("command", ["query-target", "query-uuid", "query-cpus-fast", "query-iothreads",
                                     "query-jobs", "query-hotpluggable-cpus"])
def test_same_reply(pair: tuple[Client, Client, Path], command: str) -> None:
    theirs, ours = both(pair, command)
    assert ours == theirs


def test_query_kvm(pair: tuple[Client, Client, Path]) -> None:
    theirs, ours = both(pair, "query-kvm")
    assert ours["return"]["enabled"] is theirs["return"]["enabled"] is False
    # QEMU reports whether the host has /dev/kvm; we could never use it.
    assert ours == {"return": {"enabled": False, "present": False}}


def test_query_chardev(pair: tuple[Client, Client, Path]) -> None:
    _, _, folder = pair
    theirs, ours = both(pair, "query-chardev")
    # Only the socket paths differ (one per process).
    assert theirs["return"][0]["filename"] == f"unix:{folder / 'qemu.sock'},server=on"
    assert ours["return"][0]["filename"] == f"unix:{folder / 'ours.sock'},server=on"
    for reply in (theirs, ours):
        reply["return"][0]["filename"] = "SOCK"
    assert ours == theirs


def test_query_machines(pair: tuple[Client, Client, Path]) -> None:
    theirs, ours = both(pair, "query-machines")
    qemu_by_name = {entry["name"]: entry for entry in theirs["return"]}
    ours_by_name = {entry["name"]: entry for entry in ours["return"]}
    assert set(ours_by_name) == set(qemu_by_name) - NOT_MODELLED_MACHINES
    for name, entry in ours_by_name.items():
        assert entry == qemu_by_name[name]
    assert ours_by_name["pc-i440fx-7.2"]["alias"] == "pc" and ours_by_name["pc-q35-7.2"]["alias"] == "q35"


@pytest.mark.parametrize("args", [
    {}, {"abstract": True}, {"implements": "device"}, {"implements": "device", "abstract": True},
    {"implements": "machine"}, {"implements": "accel"}, {"implements": "virtio-blk-pci-base"},
    {"implements": "pci-express-device"}, {"implements": "hotplug-handler", "abstract": True},
    {"implements": "interface", "abstract": True},
])
def test_qom_list_types_subset_of_qemu(pair: tuple[Client, Client, Path], args: dict[str, Any]) -> None:
    theirs, ours = both(pair, "qom-list-types", args)
    qemu_by_name = {entry["name"]: entry for entry in theirs["return"]}
    assert ours["return"], args
    for entry in ours["return"]:
        assert entry == qemu_by_name.get(entry["name"]), args


def test_qom_list_types_what_we_model(pair: tuple[Client, Client, Path]) -> None:
    _, ours = both(pair, "qom-list-types")
    names = {entry["name"] for entry in ours["return"]}
    assert {"tcg-accel", "none-machine", "pc-i440fx-7.2-machine", "pc-q35-7.2-machine",
            "virtio-blk-pci", "virtio-blk-device", "scsi-hd", "ide-hd"} <= names
    assert "kvm-accel" not in names and "virtio-net-pci" not in names
    theirs, ours = both(pair, "qom-list-types", {"implements": "no-such-type"})
    assert ours == theirs == {"return": []}


@pytest.mark.parametrize("typename", ["virtio-blk-pci", "virtio-blk-device", "scsi-hd", "ide-hd"])
def test_device_list_properties(pair: tuple[Client, Client, Path], typename: str) -> None:
    theirs, ours = both(pair, "device-list-properties", {"typename": typename})
    qemu_by_name = {prop["name"]: prop for prop in theirs["return"]}
    names = [prop["name"] for prop in ours["return"]]
    assert {"drive", "share-rw", "write-cache", "logical_block_size", "serial"} <= set(names)
    for prop in ours["return"]:
        assert prop == qemu_by_name[prop["name"]]
    # In QEMU's order.
    assert names == [name for name in qemu_by_name if name in set(names)]


@pytest.mark.parametrize("typename", ["virtio-blk", "no-such", "pci-device", "none-machine", "device"])
def test_device_list_properties_refusals(pair: tuple[Client, Client, Path], typename: str) -> None:
    theirs, ours = both(pair, "device-list-properties", {"typename": typename})
    assert "error" in ours
    assert ours == theirs


def test_device_list_properties_not_modelled(pair: tuple[Client, Client, Path]) -> None:
    theirs, ours = both(pair, "device-list-properties", {"typename": "virtio-net-pci"})
    # QEMU has it; we answer as a QEMU built without it (what libvirt's probe expects).
    assert "return" in theirs
    assert ours == {"error": {"class": "DeviceNotFound", "desc": "Device 'virtio-net-pci' not found"}}


@pytest.mark.parametrize("typename", ["virtio-blk-pci", "ide-hd", "none-machine", "pc-i440fx-7.2-machine",
                                      "tcg-accel", "container", "memory-backend-file",
                                      "memory-backend-memfd", "memory-backend-ram", "iothread", "secret",
                                      "max-x86_64-cpu"])
def test_qom_list_properties(pair: tuple[Client, Client, Path], typename: str) -> None:
    theirs, ours = both(pair, "qom-list-properties", {"typename": typename})
    if typename == "max-x86_64-cpu":
        # Not modelled: the error of a QEMU built without them.
        assert ours == {"error": {"class": "DeviceNotFound", "desc": f"Class '{typename}' not found"}}
        return
    qemu_by_name = {prop["name"]: prop for prop in theirs["return"]}
    assert ours["return"]
    for prop in ours["return"]:
        assert prop == qemu_by_name[prop["name"]]


def test_qom_list_properties_unknown(pair: tuple[Client, Client, Path]) -> None:
    theirs, ours = both(pair, "qom-list-properties", {"typename": "no-such"})
    assert ours == theirs


@pytest.mark.parametrize("path", ["/", "/objects", "/machine/peripheral", "/machine/peripheral-anon",
                                  "/chardevs", "peripheral", "chardevs", "/machine/peripheral/"])
def test_qom_list_same(pair: tuple[Client, Client, Path], path: str) -> None:
    theirs, ours = both(pair, "qom-list", {"path": path})
    assert ours == theirs


@pytest.mark.parametrize("path", ["/machine", "machine", "/machine/unattached"])
def test_qom_list_subset(pair: tuple[Client, Client, Path], path: str) -> None:
    theirs, ours = both(pair, "qom-list", {"path": path})
    # The machine's own settings (kernel, smp, memory, ...) and the memory regions and
    # system bus under /machine/unattached belong to a guest we do not have.
    assert ours["return"][0] == {"name": "type", "type": "string"}
    for prop in ours["return"]:
        assert prop in theirs["return"]


@pytest.mark.parametrize("path", ["/nope", "", "nope", "/machine/nope"])
def test_qom_list_errors(pair: tuple[Client, Client, Path], path: str) -> None:
    theirs, ours = both(pair, "qom-list", {"path": path})
    assert "error" in ours
    assert ours == theirs


@pytest.mark.parametrize(("path", "prop"), [
    ("/machine", "type"), ("/machine/peripheral", "type"), ("/", "type"), ("/", "machine"),
    ("/machine", "peripheral"), ("/chardevs/compat_monitor0", "type"), ("peripheral-anon", "type"),
    ("/machine", "nope"), ("/nope", "type"), ("/objects", "nope"),
])
def test_qom_get(pair: tuple[Client, Client, Path], path: str, prop: str) -> None:
    theirs, ours = both(pair, "qom-get", {"path": path, "property": prop})
    assert ours == theirs


def _events(client: Client, names: set[str], timeout: float = 5.0) -> list[dict[str, Any]]:
    """The events received so far and up to all of ``names``, without timestamps."""
    pending = client.events
    client.events = []
    seen: list[dict[str, Any]] = []
    while {event["event"] for event in seen} != names:
        event = pending.pop(0) if pending else client.read(timeout=timeout)
        assert "event" in event, event
        seen.append({key: value for key, value in event.items() if key != "timestamp"})
    return seen


def _status(client: Client) -> dict[str, Any]:
    reply = client.execute("query-status")
    # QEMU 7.2 adds "singlestep", which QEMU 10.x (whose form we follow) dropped.
    reply["return"].pop("singlestep", None)
    return reply


def test_system_reset(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    seen = []
    for qemu in (True, False):
        with running([], tmp_path, "qemu" if qemu else "ours", qemu=qemu) as (_, client):
            record: list[Any] = [client.execute("system_reset")]
            record.append(_events(client, {"RESET"}))
            record.append(_status(client))
            record.append(client.execute("stop"))
            record.append(_events(client, {"STOP"}))
            record.append(client.execute("system_reset"))
            record.append(_events(client, {"RESET"}))
            # A reset VM that is not running comes back in prelaunch (main_loop_should_exit).
            record.append(_status(client))
            record.append(client.execute("cont"))
            record.append(_events(client, {"RESUME"}))
            record.append(_status(client))
            seen.append(record)
    assert seen[1] == seen[0]
    assert seen[1][2] == {"return": {"status": "running", "running": True}}
    assert seen[1][7] == {"return": {"status": "prelaunch", "running": False}}
    assert seen[1][6] == [{"event": "RESET", "data": {"guest": False, "reason": "host-qmp-system-reset"}}]


def test_system_powerdown(tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    with running([], tmp_path, "qemu", qemu=True) as (_, qemu):
        assert qemu.execute("system_powerdown") == {"return": {}}
        qemu_events = _events(qemu, {"POWERDOWN"})
    with running([], tmp_path, "ours") as (proc, ours):
        assert ours.execute("system_powerdown") == {"return": {}}
        our_events = _events(ours, {"POWERDOWN", "SHUTDOWN"})
        assert proc.wait(timeout=10) == 0
    assert our_events[0] == qemu_events[0] == {"event": "POWERDOWN"}
    # QEMU -machine none has no guest to answer the ACPI request; ours stands in for a
    # guest that powers off at once, and QEMU then exits (no -no-shutdown).
    assert our_events[1] == {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}}


def test_system_powerdown_paused_guest_does_not_react(tmp_path: Path) -> None:
    with running(["-S"], tmp_path) as (proc, ours):
        assert ours.execute("system_powerdown") == {"return": {}}
        assert _events(ours, {"POWERDOWN"}) == [{"event": "POWERDOWN"}]
        assert ours.execute("query-status") == {"return": {"status": "prelaunch", "running": False}}
        assert proc.poll() is None
