"""User-creatable objects (-object, object-add, object-del), vCPUs (-smp) and the rest of
libvirt's probe, each against live QEMU 7.2: the same command line and the same requests
go to both, and the replies and start-up errors must be QEMU's.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import QEMU, SERVER, Client, running

# What libvirt passes (JSON) and what a user types (keyval), one of each type.
OBJECTS = [
    "-object", "iothread,id=io0",
    "-object", '{"qom-type":"iothread","id":"io1","poll-max-ns":100,"poll-grow":2}',
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw","data":"c2VjcmV0"}',
    "-object", '{"qom-type":"memory-backend-ram","id":"ram0","size":67108864}',
    "-object", "memory-backend-memfd,id=mem1,size=16M,share=on",
    "-object", "memory-backend-file,id=mem2,size=8M,mem-path=/dev/shm",
    "-object", "throttle-group,id=tg0,x-iops-total=100",
    "-object", '{"qom-type":"throttle-group","id":"tg1","limits":{"bps-read":4096}}',
]
IDS = ["io0", "io1", "masterKey0", "ram0", "mem1", "mem2", "tg0", "tg1"]


def _pair(folder: Path, args: list[str]) -> Iterator[tuple[Client, Client]]:
    qemu_tools.require("qemu-system-x86_64")
    with running(args, folder, "qemu", qemu=True) as (_, qemu), \
            running(["-nodefaults", *args], folder, "ours") as (_, ours):
        yield qemu, ours


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Client]]:
    """(QEMU client, our client), both ``-machine none`` with the objects above.

    (A pc machine would add QEMU's implicit guest RAM backend, /objects/pc.ram, which is
    not modelled; libvirt names its own with -machine memory-backend=.)
    """
    yield from _pair(tmp_path_factory.mktemp("objects"), ["-S", *OBJECTS])


@pytest.fixture(scope="module")
def pc_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Client]]:
    """(QEMU client, our client): a pc machine with two of three possible vCPUs."""
    # -machine after QEMU's -machine none (server_support's list starts with it): the last counts.
    yield from _pair(tmp_path_factory.mktemp("vcpus"), ["-S", "-machine", "pc", "-accel", "tcg",
                                                        "-smp", "2,maxcpus=3"])


def both(pair: tuple[Client, Client], command: str, args: dict[str, Any] | None = None
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    qemu, ours = pair
    return qemu.execute(command, args), ours.execute(command, args)


def _without_thread_ids(reply: dict[str, Any]) -> Any:
    return sorted(({key: value for key, value in entry.items() if key != "thread-id"}
                   for entry in reply["return"]), key=repr)


def test_qom_list_objects(pair: tuple[Client, Client]) -> None:
    theirs, ours = both(pair, "qom-list", {"path": "/objects"})
    # QEMU's order is a hash table's: compared as sets.
    assert sorted(ours["return"], key=repr) == sorted(theirs["return"], key=repr)
    assert {entry["name"] for entry in ours["return"]} == {"type", *IDS}


@pytest.mark.parametrize("object_id", IDS)
def test_each_object_lists_and_reads_as_qemu(pair: tuple[Client, Client], object_id: str) -> None:
    theirs, ours = both(pair, "qom-list", {"path": f"/objects/{object_id}"})
    # A RAM backend's memory region (a child object) is not modelled: there is no guest RAM.
    regions = [entry for entry in theirs["return"] if entry["type"] == "child<memory-region>"]
    assert ours["return"] == [entry for entry in theirs["return"] if entry not in regions]
    for entry in ours["return"]:
        theirs_value, ours_value = both(pair, "qom-get", {"path": f"/objects/{object_id}",
                                                          "property": entry["name"]})
        assert ours_value == theirs_value, entry["name"]
    theirs, ours = both(pair, "qom-get", {"path": f"/objects/{object_id}", "property": "nope"})
    assert ours == theirs


def test_query_iothreads(pair: tuple[Client, Client]) -> None:
    theirs, ours = both(pair, "query-iothreads")
    assert _without_thread_ids(ours) == _without_thread_ids(theirs)
    assert len(ours["return"]) == 2


def _group(arguments: dict[str, Any]) -> dict[str, Any]:
    return {"qom-type": "throttle-group", "id": "t", **arguments}


def test_object_add_and_del(pair: tuple[Client, Client]) -> None:
    requests: list[tuple[str, dict[str, Any]]] = [
        ("object-add", {"qom-type": "iothread", "id": "hot", "poll-max-ns": 5}),
        ("object-add", {"qom-type": "iothread", "id": "hot"}),
        ("object-add", {"qom-type": "iothread"}),
        ("object-add", {"qom-type": "nosuch", "id": "x"}),
        ("object-add", {"qom-type": "iothread", "id": "x", "bogus": 1}),
        ("object-add", {"qom-type": "iothread", "id": "1x"}),
        ("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": -1}),
        ("object-add", {"qom-type": "secret", "id": "s"}),
        ("object-add", {"qom-type": "secret", "id": "s", "data": "a", "file": "/etc/hostname"}),
        ("object-add", {"qom-type": "secret", "id": "s", "file": "/nonexistent/key"}),
        ("object-add", {"qom-type": "secret", "id": "s", "data": "QUJD", "format": "base64"}),
        ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": "1M"}),
        ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": 0}),
        ("object-add", {"qom-type": "memory-backend-file", "id": "m", "size": 4096}),
        ("object-add", _group({"limits": {"iops-total": -1}})),
        ("object-add", _group({"limits": {"iops-total": 1, "iops-read": 1}})),
        ("object-add", _group({"x-iops-total": 1, "limits": {"iops-read": 2}})),
        ("object-add", _group({"limits": {"iops-total-max": 5}})),
        ("object-add", _group({"limits": {"bps-read": 5, "bps-read-max": 2}})),
        ("object-add", _group({"limits": {"iops-total-max-length": 0}})),
        ("object-add", _group({"limits": {"bps-write-max-length": 3}})),
        ("object-add", _group({"limits": {"iops-size": 512}})),
        ("object-add", _group({"x-bps-total": -1})),
        ("object-add", _group({"limits": {"iops-total": 10}})),
        ("qom-get", {"path": "/objects/t", "property": "x-iops-total"}),
        ("qom-get", {"path": "/objects/s", "property": "data"}),
        ("object-del", {"id": "hot"}),
        ("object-del", {"id": "hot"}),
        ("object-del", {"id": "t"}),
        ("object-del", {"id": "s"}),
        ("object-del", {"id": "bad id"}),
    ]
    for command, args in requests:
        theirs, ours = both(pair, command, args)
        assert ours == theirs, (command, args)
    theirs, ours = both(pair, "query-iothreads")
    assert _without_thread_ids(ours) == _without_thread_ids(theirs)


def test_vcpus(pc_pair: tuple[Client, Client]) -> None:
    theirs, ours = both(pc_pair, "query-cpus-fast")
    assert _without_thread_ids(ours) == _without_thread_ids(theirs)
    assert len(ours["return"]) == 2
    theirs, ours = both(pc_pair, "query-hotpluggable-cpus")
    assert ours == theirs
    for entry in ours["return"]:
        if "qom-path" in entry:
            assert both(pc_pair, "qom-get", {"path": entry["qom-path"], "property": "type"})[1] == \
                {"return": "qemu64-x86_64-cpu"}


def test_default_ram_backend(pc_pair: tuple[Client, Client]) -> None:
    """A pc machine without memory-backend= makes its own, /objects/pc.ram, in use."""
    theirs, ours = both(pc_pair, "qom-list", {"path": "/objects"})
    assert ours == theirs == {"return": [{"name": "type", "type": "string"},
                                         {"name": "pc.ram", "type": "child<memory-backend-ram>"}]}
    for request in (("qom-get", {"path": "/objects/pc.ram", "property": "size"}),
                    ("object-del", {"id": "pc.ram"})):
        theirs, ours = both(pc_pair, *request)
        assert ours == theirs


@pytest.mark.parametrize("command", ["query-sev-capabilities", "query-sgx-capabilities"])
def test_kvm_only_queries_fail_as_qemu_under_tcg(pair: tuple[Client, Client], command: str) -> None:
    theirs, ours = both(pair, command)
    assert ours == theirs


def test_query_command_line_options(pair: tuple[Client, Client]) -> None:
    theirs, ours = both(pair, "query-command-line-options")
    qemu_options = {entry["option"]: entry["parameters"] for entry in theirs["return"]}
    for entry in ours["return"]:
        # QEMU's entry, without its help texts (and -machine only with what we accept).
        expected = [{"name": p["name"], "type": p["type"]} for p in qemu_options[entry["option"]]]
        if entry["option"] == "machine":
            expected = [p for p in expected if p in entry["parameters"]]
        assert entry["parameters"] == expected, entry["option"]
    # What libvirt reads: -sandbox exists (it then passes -sandbox on,...); -spice does not.
    options = [entry["option"] for entry in ours["return"]]
    assert "sandbox" in options and "spice" not in options
    for args in ({"option": "sandbox"}, {"option": "nosuch"}):
        theirs, ours = both(pair, "query-command-line-options", args)
        if "error" in theirs:
            assert ours == theirs
        else:
            assert [p["name"] for p in ours["return"][0]["parameters"]] == \
                [p["name"] for p in theirs["return"][0]["parameters"]]


def test_no_tpm_and_no_cpu_models(pair: tuple[Client, Client]) -> None:
    """Not modelled, so not listed (QEMU lists its TPMs and some 60 CPU models)."""
    _, ours = pair
    for command in ("query-tpm-models", "query-tpm-types", "query-cpu-definitions"):
        assert ours.execute(command) == {"return": []}


# ------------------------------------------------------------------------ start-up errors

_PROGRAM = re.compile(r"^(qemu-system-x86_64|qmp-server): ", re.M)


@pytest.mark.parametrize("args", [
    ["-object", "iothread"],
    ["-object", "nosuch,id=x"],
    ["-object", "memory-backend-ram,id=r"],
    ["-object", "secret,id=s"],
    ["-object", "secret,id=s", "-object", "iothread,id=a", "-object", "iothread,id=a"],
    ["-object", "iothread,id=io0,bogus=1"],
    ["-object", "iothread,id=io0,poll-max-ns=abc"],
    ["-object", "memory-backend-ram,id=r,size=1x"],
    ["-object", "memory-backend-ram,id=r,size=1M,prealloc-threads=x"],
    ["-object", "memory-backend-ram,id=r,size=0"],
    ["-object", "memory-backend-file,id=f,size=1M"],
    ["-object", '{"qom-type":"iothread"}'],
    ["-object", '{"id":"x"}'],
    ["-object", '{"qom-type":"iothread","id":"i","bogus":1}'],
    ["-object", '{"qom-type":"iothread","id":"i","poll-max-ns":"5"}'],
    ["-object", "iothread,id=1bad"],
    ["-object", "iothread,id=i,poll-max-ns=-1"],
    ["-object", "throttle-group,id=t,x-iops-total=-1"],
    ["-object", "secret,id=s,file=/nonexistent/key"],
    ["-machine", "pc,memory-backend=nope"],
    ["-machine", "pc,memory-backend=m0", "-object", "iothread,id=m0"],
    ["-machine", "pc,memory-backend=m0", "-object", "memory-backend-ram,id=m0,size=64M", "-m", "128"],
    ["-machine", "pc", "-object", "memory-backend-ram,id=pc.ram,size=64M"],
    ["-machine", "none", "-m", "64", "-object", "memory-backend-ram,id=ram,size=64M"],
    ["-machine", "pc", "-smp", "4,sockets=1,cores=1,threads=1"],
    ["-machine", "pc", "-smp", "4,maxcpus=2"],
    ["-machine", "pc", "-smp", "300"],
    ["-machine", "pc", "-smp", "2,bogus=1"],
    ["-machine", "pc", "-smp", "abc"],
], ids=lambda args: " ".join(args))
def test_startup_errors_in_qemus_format(args: list[str], tmp_path: Path) -> None:
    qemu_tools.require("qemu-system-x86_64")
    sock = f"unix:{tmp_path / 'x.sock'},server=on,wait=off"
    ours = subprocess.run([*SERVER, "-qmp", sock, *args], capture_output=True, text=True, timeout=30)
    theirs = subprocess.run([*QEMU, "-accel", "tcg", "-qmp", sock, *args], capture_output=True,
                            text=True, timeout=30)
    assert ours.returncode == theirs.returncode == 1
    # The machine an error names is each release's newest i440fx (pc resolved).
    def newest(text: str) -> str:
        return re.sub(r"'pc-i440fx-\d+\.\d+'", "'pc-i440fx-NEWEST'", _PROGRAM.sub("", text))
    assert newest(ours.stderr) == newest(theirs.stderr)
