"""The machine commands (libvirt's capability probe and domain start), against live QEMU 7.2.

Each test sends the same requests to QEMU (``-machine none``: no guest, like us) and to
the server. Where the server models less than QEMU has (machine types, QOM classes and
properties), every entry it does answer must be QEMU's entry unchanged.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import QEMU, SERVER, Client, running

# Machine types QEMU has that we do not offer: no PC variant but i440fx and q35.
NOT_MODELLED_MACHINES = {"isapc", "microvm", "x-remote"}

#: QEMU 10.1's query-machines, recorded by libvirt (the file says where from): the machine
#: types are those of the release the server reports.
RECORDED_10_1 = json.loads((Path(__file__).parent / "data" / "query-machines-10.1.json").read_text())
#: MachineInfo members QEMU 7.2 does not have (acpi: since 8.0).
NEWER_MEMBERS = {"acpi"}
#: Members of QEMU 10.1's reply that our schema does not declare yet (so we do not send them).
UNDECLARED_MEMBERS: set[str] = set()
#: The recorded entries of the machine types we model, in QEMU's order.
RECORDED_OURS = [{key: value for key, value in entry.items() if key not in UNDECLARED_MEMBERS}
                 for entry in RECORDED_10_1["return"] if entry["name"] not in NOT_MODELLED_MACHINES]
#: Members that depend on the release: the alias and the default move to its newest types,
#: and each release deprecates the types that grew too old.
VERSIONED_MEMBERS = {"alias", "is-default", "deprecated"}


def _release(client: Client) -> str:
    """``MAJOR.MINOR`` of the QEMU a client talks to (query-version): its newest types' suffix."""
    qemu = client.cmd("query-version")["qemu"]
    return f"{qemu['major']}.{qemu['minor']}"


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.rpartition("-")[2].split("."))


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


def test_query_machines_is_qemu_10_1s(pair: tuple[Client, Client, Path]) -> None:
    """Our machine types are those QEMU 10.1 has (the release we report), entry for entry,
    in its order and with its member order: the recorded reply without the types whose
    board is not modelled."""
    _, ours, _ = pair
    assert _release(ours) == "10.1"
    reply = ours.execute("query-machines")["return"]
    assert reply == RECORDED_OURS
    assert [list(entry) for entry in reply] == [list(entry) for entry in RECORDED_OURS]
    by_name = {entry["name"]: entry for entry in reply}
    assert by_name["pc-i440fx-10.1"]["alias"] == "pc" and by_name["pc-i440fx-10.1"]["is-default"]
    assert by_name["pc-q35-10.1"]["alias"] == "q35" and "is-default" not in by_name["pc-q35-10.1"]
    # QEMU 10.1 no longer has the types before 4.2.
    assert "pc-i440fx-4.1" not in by_name and "pc-q35-2.4" not in by_name


def test_query_machines_against_live_qemu(pair: tuple[Client, Client, Path]) -> None:
    """What does not depend on the release equals the live QEMU's (7.2 here): the types
    both have, member for member; the alias and the default naming each side's newest."""
    qemu, ours, _ = pair
    theirs, mine = both(pair, "query-machines")
    qemu_by_name = {entry["name"]: entry for entry in theirs["return"]}
    ours_by_name = {entry["name"]: entry for entry in mine["return"]}
    common = set(ours_by_name) & set(qemu_by_name)
    assert {"none", "pc-i440fx-7.2", "pc-q35-7.2", "pc-i440fx-4.2", "pc-q35-5.0"} <= common
    for name in common:
        keep = {key: value for key, value in ours_by_name[name].items()
                if key not in NEWER_MEMBERS | VERSIONED_MEMBERS}
        assert keep == {key: value for key, value in qemu_by_name[name].items()
                        if key not in VERSIONED_MEMBERS}, name
    for side, by_name in ((_release(qemu), qemu_by_name), (_release(ours), ours_by_name)):
        aliases = {entry["alias"]: name for name, entry in by_name.items() if "alias" in entry}
        assert aliases == {"pc": f"pc-i440fx-{side}", "q35": f"pc-q35-{side}"}
        assert [name for name, entry in by_name.items() if entry.get("is-default")] == [f"pc-i440fx-{side}"]
    # The live QEMU's other PC types are older than ours, or newer than any we have.
    newest = max(_version(name) for name in ours_by_name if name != "none")
    for name in set(qemu_by_name) - set(ours_by_name) - NOT_MODELLED_MACHINES:
        assert _version(name) < (4, 2) or _version(name) > newest, name


def _strcmp(a: str, b: str) -> int:
    return (a > b) - (a < b)


def _machine_class_cmp(a: dict[str, Any], b: dict[str, Any]) -> int:
    """QEMU's machine_class_cmp (system/vl.c) on recorded entries: families (the PC
    families are pc_piix and pc_q35) alphabetically, each by class name decreasing; the
    types without a family after them, increasing."""
    families = {"pc-i440fx": "pc_piix", "pc-q35": "pc_q35"}
    fa, fb = (families.get(e["name"].rpartition("-")[0]) for e in (a, b))
    ca, cb = (f"{e['name']}-machine" for e in (a, b))
    if fa is None or fb is None:
        return _strcmp(ca, cb) if fa is None and fb is None else (1 if fa is None else -1)
    return _strcmp(fa, fb) or _strcmp(cb, ca)


def _help_lines(entries: list[dict[str, Any]], descriptions: dict[str, str]) -> list[str]:
    """``-machine help`` as QEMU prints it (machine_help_func) for these MachineInfo entries."""
    lines = ["Supported machines are:"]
    for entry in sorted(entries, key=functools.cmp_to_key(_machine_class_cmp)):
        desc = descriptions[entry["name"].split("-")[1] if entry["name"] != "none" else "none"]
        if "alias" in entry:
            lines.append(f"{entry['alias']:<20} {desc} (alias of {entry['name']})")
        flags = " (default)" if entry.get("is-default") else ""
        flags += " (deprecated)" if entry["deprecated"] else ""
        lines.append(f"{entry['name']:<20} {desc}{flags}")
    return lines


def test_machine_help_lists_qemu_10_1s_types(tmp_path: Path) -> None:
    """``-machine help``: the recorded 10.1 types in QEMU's format and order (``pc`` and
    ``pc-i440fx-10.1`` after ``pc-i440fx-4.2``: strcmp puts "10.1" after "4.2"). Lines of
    types the live QEMU also has are its lines, once the release's flags are set aside."""
    ours = subprocess.run([*SERVER, "-machine", "help"], capture_output=True, text=True, timeout=30)
    assert ours.returncode == 0
    descriptions = {"i440fx": "Standard PC (i440FX + PIIX, 1996)", "q35": "Standard PC (Q35 + ICH9, 2009)",
                    "none": "empty machine"}
    lines = ours.stdout.splitlines()
    assert lines == _help_lines(RECORDED_OURS, descriptions)
    assert lines.index("pc-i440fx-10.1       Standard PC (i440FX + PIIX, 1996) (default)") == \
        lines.index("pc-i440fx-4.2        Standard PC (i440FX + PIIX, 1996) (deprecated)") + 2
    qemu_tools.require("qemu-system-x86_64")
    theirs = subprocess.run([QEMU[0], "-machine", "help"], capture_output=True, text=True, timeout=30)
    flags = re.compile(r"( \(default\)| \(deprecated\))+$")
    qemu_lines = {line.split()[0]: flags.sub("", line) for line in theirs.stdout.splitlines()[1:]}
    shared = [line for line in lines[1:] if line.split()[0] in qemu_lines and "(alias of" not in line]
    # 4.2 to 7.2 of each family, and none.
    assert len(shared) == 21
    for line in shared:
        assert flags.sub("", line) == qemu_lines[line.split()[0]]


@pytest.mark.parametrize(("machine", "maxcpus", "limit"), [
    ("pc", 256, 255), ("q35", 4097, 4096), ("pc-q35-9.0", 4097, 4096), ("pc-q35-8.2", 1025, 1024),
    ("pc-q35-8.0", 289, 288), ("pc-q35-4.2", 289, 288),
])
def test_smp_beyond_the_types_cpu_max(tmp_path: Path, machine: str, maxcpus: int, limit: int) -> None:
    """``maxcpus`` is checked against the type's cpu-max (QEMU 10.1's: q35 has 4096 from 9.0
    on, 1024 in 8.1 and 8.2, 288 before), with QEMU's text naming the resolved type."""
    resolved = {"pc": "pc-i440fx-10.1", "q35": "pc-q35-10.1"}.get(machine, machine)
    assert {e["name"]: e["cpu-max"] for e in RECORDED_OURS}[resolved] == limit
    sock = f"unix:{tmp_path / 'x.sock'},server=on,wait=off"
    result = subprocess.run([*SERVER, "-qmp", sock, "-machine", machine, "-smp", f"1,maxcpus={maxcpus}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == (f"qmp-server: Invalid SMP CPUs {maxcpus}. The max CPUs supported by "
                             f"machine '{resolved}' is {limit}\n")


def test_smp_up_to_the_types_cpu_max(tmp_path: Path) -> None:
    """q35 is 10.1's, which takes 4096 CPU slots (7.2's took 288)."""
    with running(["-S", "-machine", "q35", "-smp", "1,maxcpus=4096"], tmp_path) as (_, ours):
        assert ours.cmd("qom-get", path="/machine", property="type") == "pc-q35-10.1-machine"
        slots = ours.cmd("query-hotpluggable-cpus")
        assert len(slots) == 4096 and "qom-path" in slots[-1] and "qom-path" not in slots[0]


@pytest.mark.parametrize("smp", ["2,maxcpus=300", "256"])
def test_smp_limit_checks_maxcpus_as_qemu(tmp_path: Path, smp: str) -> None:
    """machine_parse_smp_config compares maxcpus (not cpus) with the limit, and names it;
    the same text as the live QEMU's, but for the type's name (each side's newest i440fx)."""
    qemu_tools.require("qemu-system-x86_64")
    sock = f"unix:{tmp_path / 'x.sock'},server=on,wait=off"
    args = ["-qmp", sock, "-machine", "pc", "-smp", smp]
    ours = subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=30)
    theirs = subprocess.run([*QEMU, "-accel", "tcg", *args], capture_output=True, text=True, timeout=30)
    assert ours.returncode == theirs.returncode == 1
    release = re.search(r"version (\d+\.\d+)", subprocess.run(
        [QEMU[0], "-version"], capture_output=True, text=True, timeout=30).stdout)
    assert release is not None
    expected = theirs.stderr.replace("qemu-system-x86_64: ", "qmp-server: ").replace(
        f"'pc-i440fx-{release[1]}'", "'pc-i440fx-10.1'")
    assert ours.stderr == expected
    assert "Invalid SMP CPUs 300." in expected or "Invalid SMP CPUs 256." in expected


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
    # A machine class newer than the live QEMU's types is compared with its family's newest
    # there (same parent, same flags).
    live = _release(pair[0])
    for entry in ours["return"]:
        name = entry["name"]
        match = re.fullmatch(r"(pc-i440fx|pc-q35)-([0-9.]+)-machine", name)
        if match and _version(f"x-{match[2]}") > _version(f"x-{live}"):
            name = f"{match[1]}-{live}-machine"
        assert {**entry, "name": name} == qemu_by_name.get(name), args


def test_qom_list_types_what_we_model(pair: tuple[Client, Client, Path]) -> None:
    _, ours = both(pair, "qom-list-types")
    names = {entry["name"] for entry in ours["return"]}
    assert {"tcg-accel", "none-machine", "pc-i440fx-7.2-machine", "pc-q35-7.2-machine",
            "virtio-blk-pci", "virtio-blk-device", "scsi-hd", "ide-hd"} <= names
    # A class for each machine type query-machines lists, and for no other.
    machines = {entry["name"] for entry in pair[1].cmd("qom-list-types", implements="machine")}
    assert machines == {f"{entry['name']}-machine" for entry in RECORDED_OURS}
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
