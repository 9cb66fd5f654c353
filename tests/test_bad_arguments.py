"""Bad arguments QEMU refuses: unsigned members given negative or too large numbers,
impossible image sizes and windows, odd file names. Each answer is compared with live
QEMU 7.2 where QEMU answers too (issue 8 §5)."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, Client]]:
    """(QEMU 7.2, qmp-server), both negotiated."""
    qemu_tools.require("qemu-system-x86_64")
    with running([], tmp_path_factory.mktemp("qemu"), qemu=True) as (_, qemu), \
            running([], tmp_path_factory.mktemp("ours")) as (_, ours):
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
