"""Bad arguments QEMU refuses: unsigned members given negative or too large numbers,
impossible image sizes and windows, odd file names. Each answer is compared with live
QEMU 7.2 where QEMU answers too (issue 8 §5)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import qemu_tools
from server_support import Client, running

from qmp_server.schema import Schema
from qmp_server.schema_validate import I64_MIN, U64_MAX, UIntNode

SCHEMA = Schema.load()


def _unsigned_parameters() -> list[tuple[str, int]]:
    """Every unsigned member of migrate-set-parameters with its largest value."""
    node = SCHEMA.argument_node("migrate-set-parameters")
    members = getattr(node, "members", ())
    return [(m.name, m.node.hi) for m in members if isinstance(m.node, UIntNode)]


UNSIGNED = _unsigned_parameters()
#: QEMU 7.2 neither range-checks nor stores these (its QMP handler drops them; QEMU 8.0
#: fixed that and we follow the fixed QEMU): checked against the fixed ranges below instead.
BROKEN_IN_72 = {"multifd-zlib-level": 9, "multifd-zstd-level": 20}
#: Parameters added after QEMU 7.2 (checked by the same schema types, but QEMU 7.2 cannot answer).
AFTER_72 = {"avail-switchover-bandwidth", "multifd-qatzip-level", "x-vcpu-dirty-limit-period",
            "vcpu-dirty-limit"}


def _cases() -> list[Any]:
    cases = []
    for name, hi in UNSIGNED:
        if name in BROKEN_IN_72 or name in AFTER_72:
            continue
        values = {-1, -300, 0, hi, hi + 1, I64_MIN, I64_MIN - 1}
        if hi == U64_MAX:
            values.add(2**63)
        for value in sorted(values):
            cases.append(pytest.param(name, value, id=f"{name}={value}"))
    return cases


IMAGE_SIZE = 1 << 20


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One directory per emulator, each with its own 1 MiB ``img.raw`` (no lock conflicts)."""
    out = []
    for name in ("qemu", "ours"):
        directory = tmp_path_factory.mktemp(name)
        with open(directory / "img.raw", "wb") as image:
            image.truncate(IMAGE_SIZE)
        out.append(directory)
    return out[0], out[1]


@pytest.fixture(scope="module")
def pair(dirs: tuple[Path, Path]) -> Iterator[tuple[Client, Client]]:
    """(QEMU 7.2, qmp-server), both negotiated."""
    qemu_tools.require("qemu-system-x86_64")
    with running([], dirs[0], qemu=True) as (_, qemu), running([], dirs[1]) as (_, ours):
        yield qemu, ours


def test_every_unsigned_parameter_is_listed() -> None:
    # The parametrization below walks the schema; an empty walk would test nothing.
    names = [name for name, _ in UNSIGNED]
    assert "downtime-limit" in names and "multifd-channels" in names and "max-bandwidth" in names


@pytest.mark.parametrize(("name", "value"), _cases())
def test_unsigned_parameter_range_like_qemu(pair: tuple[Client, Client], name: str, value: int) -> None:
    qemu, ours = pair
    before = {"qemu": qemu.cmd("query-migrate-parameters"), "ours": ours.cmd("query-migrate-parameters")}
    expected = qemu.execute("migrate-set-parameters", {name: value})
    got = ours.execute("migrate-set-parameters", {name: value})
    try:
        assert got == expected
        if "return" in expected:
            # The stored number, as QEMU reports it (a negative uint64 wraps around).
            assert ours.cmd("query-migrate-parameters")[name] == qemu.cmd("query-migrate-parameters")[name]
    finally:
        for client, key in ((qemu, "qemu"), (ours, "ours")):
            client.cmd("migrate-set-parameters", **{name.replace("-", "_"): before[key][name]})


@pytest.mark.parametrize("name", sorted(BROKEN_IN_72))
def test_compression_levels_range(pair: tuple[Client, Client], name: str) -> None:
    _, ours = pair
    top = BROKEN_IN_72[name]
    c_name = name.replace("-", "_")
    try:
        for value in (top + 1, 255):
            assert ours.execute("migrate-set-parameters", {name: value}) == {"error": {
                "class": "GenericError", "desc": f"Parameter '{c_name}' expects a value between 0 and {top}"}}
        for value in (0, top):
            assert ours.execute("migrate-set-parameters", {name: value}) == {"return": {}}
            assert ours.cmd("query-migrate-parameters")[name] == value
        for value in (-1, 256, U64_MAX):
            assert ours.execute("migrate-set-parameters", {name: value})["error"]["desc"] == \
                f"Parameter '{name}' expects uint8_t"
    finally:
        ours.cmd("migrate-set-parameters", **{c_name: 1})


def _raw(**options: Any) -> dict[str, Any]:
    return {"driver": "raw", **options, "file": {"driver": "file", "filename": "{dir}/img.raw"}}


#: blockdev-add arguments ("{dir}" is each emulator's directory); node-name is added per case.
BLOCKDEV_CASES = {
    "null-latency-minus-1": {"driver": "null-co", "latency-ns": -1},
    "null-latency-int64-max": {"driver": "null-co", "latency-ns": 2**63 - 1},
    "null-latency-2^63": {"driver": "null-co", "latency-ns": 2**63},
    "null-latency-u64-max": {"driver": "null-co", "latency-ns": U64_MAX},
    "null-size-int64-max": {"driver": "null-co", "size": 2**63 - 1},
    "null-size-largest": {"driver": "null-co", "size": 2**63 - 2**30},
    "null-size-largest+1": {"driver": "null-co", "size": 2**63 - 2**30 + 1},
    "null-size-2^63": {"driver": "null-co", "size": 2**63},
    "file-nul": {"driver": "file", "filename": "{dir}/img\0.raw"},
    "file-empty": {"driver": "file", "filename": ""},
    "file-proc-mem": {"driver": "file", "filename": "/proc/self/mem"},
    "raw-proc-mem": {"driver": "raw", "file": {"driver": "file", "filename": "/proc/self/mem"}},
    "raw-offset-minus-1": _raw(offset=-1),
    "raw-size-minus-512": _raw(size=-512),
    "raw-both-negative": _raw(size=-512, offset=-1),
    "raw-offset-at-end": _raw(offset=IMAGE_SIZE),
    "raw-offset-past-end": _raw(offset=IMAGE_SIZE + 1),
    "raw-offset-int64-max": _raw(offset=2**63 - 1, size=512),
    "raw-size-past-end": _raw(offset=512, size=IMAGE_SIZE),
    "raw-size-fits": _raw(offset=512, size=IMAGE_SIZE - 512),
    "raw-size-huge": _raw(offset=512, size=2**63 - 512),
    "raw-size-unaligned": _raw(size=1000),
    "raw-size-unaligned-past-end": _raw(size=IMAGE_SIZE + 1),
    "raw-size-unaligned-offset-past-end": _raw(size=1000, offset=2 * IMAGE_SIZE),
    "raw-negative-size-offset-past-end": _raw(size=-512, offset=2 * IMAGE_SIZE),
}


def _arguments(case: str, directory: Path) -> dict[str, Any]:
    text = json.dumps(BLOCKDEV_CASES[case]).replace("{dir}", str(directory))
    return {**json.loads(text), "node-name": "n" + str(abs(hash(case)))[:12]}


@pytest.mark.parametrize("case", sorted(BLOCKDEV_CASES))
def test_blockdev_add_like_qemu(pair: tuple[Client, Client], dirs: tuple[Path, Path], case: str) -> None:
    qemu, ours = pair
    expected = qemu.execute("blockdev-add", _arguments(case, dirs[0]))
    got = ours.execute("blockdev-add", _arguments(case, dirs[1]))
    for client, reply, directory in ((qemu, expected, dirs[0]), (ours, got, dirs[1])):
        if "return" in reply:
            client.cmd("blockdev-del", node_name=_arguments(case, directory)["node-name"])
    # Error texts name the file: compare with each side's own directory put back.
    assert json.loads(json.dumps(got).replace(str(dirs[1]), "{dir}")) == \
        json.loads(json.dumps(expected).replace(str(dirs[0]), "{dir}"))
    assert ours.cmd("query-status")["status"] == "running"


def test_null_co_negative_size(pair: tuple[Client, Client]) -> None:
    # QEMU 7.2 aborts here (error_abort in its size parser); we answer with the parser's text.
    _, ours = pair
    reply = ours.execute("blockdev-add", {"driver": "null-co", "node-name": "neg", "size": -1})
    assert reply == {"error": {"class": "GenericError",
                               "desc": "Parameter 'size' expects a non-negative number below 2^64"}}
    assert ours.cmd("query-named-block-nodes") == []
