"""The compiled argument checker accepts exactly what ``jsonschema`` accepts.

``qmp_server.schema_validate`` compiles ``schema/`` into nodes that walk arguments in
QEMU's order with QEMU's texts; ``jsonschema`` is the reference implementation of draft
2020-12, the standard the files are written in. For every command, hypothesis draws
arguments from the command's compiled argument type, valid ones and ones broken at some
depth (a wrong JSON type, a required member dropped, an extra member, an integer just out
of its range, a near-miss enum value, a variant member under another discriminator value),
and both checkers must agree on accept/reject. Where they disagree, one of them reads the
files differently from the other: QEMU (which the files encode) settles which.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schema_conformance import Conformance

from qmp_server.errors import QMPError
from qmp_server.schema import Schema
from qmp_server.schema_validate import (
    I64_MAX,
    I64_MIN,
    U64_MAX,
    AlternateNode,
    AnyNode,
    BoolNode,
    EnumNode,
    Failure,
    IntNode,
    ListNode,
    Node,
    NullNode,
    NumberNode,
    StrNode,
    StructNode,
    UIntNode,
)

SCHEMA = Schema.load()
CONFORMANCE = Conformance(SCHEMA)

#: How deep generated values nest (BlockdevOptions -> BlockdevRef -> BlockdevOptions ...).
MAX_DEPTH = 4

#: Values of every JSON type, with the integers at the edges of QAPI's integer types.
_EDGE_INTS = (
    0, 1, -1, 127, 128, -128, -129, 255, 256, 32767, 32768, -32769, 65535, 65536,
    2**31 - 1, 2**31, -(2**31) - 1, 2**32 - 1, 2**32, I64_MAX, I64_MAX + 1, I64_MIN, I64_MIN - 1,
    U64_MAX, U64_MAX + 1,
)  # fmt: skip
_ODD_VALUES: tuple[Any, ...] = (
    None, True, False, "", "x", "on", 0.0, 1.0, 1.5, -0.0, 1e300, [], [1], {}, {"x": 1},
    *_EDGE_INTS,
)  # fmt: skip


def _names(node: Node) -> list[str]:
    """Member names a struct knows (common and of any variant): plausible wrong extras."""
    if not isinstance(node, StructNode):
        return []
    names = [m.name for m in node.members]
    for members in node.variants.values():
        names += [m.name for m in members]
    return names


class Generator:
    """Draws a value for a node; with ``noise`` each position may be broken."""

    def __init__(self, data: st.DataObject, noise: bool) -> None:
        self.data = data
        self.noise = noise
        #: How often a position is broken: from almost everywhere to rarely.
        self.rate = data.draw(st.sampled_from([1, 2, 4])) if noise else 0

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    def chance(self, one_in: int) -> bool:
        return bool(self.noise and self.draw(st.integers(0, one_in * self.rate - 1)) == 0)

    def value(self, node: Node, depth: int = 0) -> Any:
        if depth and self.chance(6):
            return self.draw(st.sampled_from(_ODD_VALUES))
        if isinstance(node, AnyNode):
            return self.draw(st.sampled_from(_ODD_VALUES))
        if isinstance(node, StrNode):
            return self.draw(st.text(max_size=6))
        if isinstance(node, BoolNode):
            return self.draw(st.booleans())
        if isinstance(node, NullNode):
            return None
        if isinstance(node, NumberNode):
            return self.draw(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers()))
        if isinstance(node, IntNode):
            return self._integer(node.lo, node.hi)
        if isinstance(node, UIntNode):
            return self._integer(I64_MIN if node.hi == U64_MAX else 0, node.hi)
        if isinstance(node, EnumNode):
            value: str = self.draw(st.sampled_from(node.values))
            if self.chance(4):
                return self.draw(st.sampled_from([value.upper(), value + " ", value[:-1], "no-such"]))
            return value
        if isinstance(node, ListNode):
            size = 0 if depth >= MAX_DEPTH else self.draw(st.integers(0, 2))
            return [self.value(node.element, depth + 1) for _ in range(size)]
        if isinstance(node, AlternateNode):
            branches = list(node.branches)
            if depth >= MAX_DEPTH:
                # Prefer a scalar branch so recursion ends.
                branches = [b for b in branches if not isinstance(b, StructNode | ListNode)] or branches
            return self.value(self.draw(st.sampled_from(branches)), depth + 1)
        if isinstance(node, StructNode):
            return self._struct(node, depth)
        raise AssertionError(f"no generator for {type(node).__name__}")

    def _integer(self, lo: int, hi: int) -> int:
        inside = st.integers(lo, hi)
        if not self.noise:
            return int(self.draw(st.one_of(inside, st.sampled_from([lo, hi]))))
        return int(self.draw(st.one_of(inside, st.sampled_from([lo - 1, hi + 1, *_EDGE_INTS]))))

    def _struct(self, node: StructNode, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        members = list(node.members)
        if node.discriminator is not None:
            tag = next(m for m in node.members if m.name == node.discriminator)
            case = self.value(tag.node, depth + 1)
            out[tag.name] = case
            if isinstance(case, str) and case in node.variants:
                members += node.variants[case]
        for member in members:
            if member.name in out:
                continue
            deep = depth >= MAX_DEPTH
            wanted = member.required or (not deep and self.draw(st.booleans()))
            if member.required and self.chance(5):
                wanted = False  # a required member missing
            if wanted:
                out[member.name] = self.value(member.node, depth + 1)
        if self.chance(4):
            others = [name for name in _names(node) if name not in out] + ["no-such", "Driver", ""]
            out[self.draw(st.sampled_from(others))] = self.draw(st.sampled_from(_ODD_VALUES))
        # Member order must not matter for acceptance.
        keys = self.draw(st.permutations(list(out)))
        return {key: out[key] for key in keys}


def _ours(command: str, arguments: Any) -> str | None:
    try:
        SCHEMA.validate_arguments(command, copy.deepcopy(arguments))
    except QMPError as err:
        return err.desc
    return None


def _reference(command: str, arguments: Any) -> str | None:
    try:
        CONFORMANCE.check_arguments(command, arguments)
    except ValueError as err:
        return str(err)
    return None


# A command's arguments are always a JSON object (the dispatcher refuses anything else).
COMMANDS = sorted(SCHEMA.commands)
#: Commands whose argument types are big enough to need more examples.
_RICH = {"blockdev-add": 400, "migrate-set-parameters": 150, "migrate-set-capabilities": 60}


@pytest.mark.parametrize("command", COMMANDS)
def test_compiled_checker_agrees_with_jsonschema(command: str) -> None:
    node = SCHEMA.argument_node(command)
    seen = {"valid": 0, "invalid": 0}

    @settings(max_examples=_RICH.get(command, 25), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data(), st.booleans())
    def agree(data: st.DataObject, noise: bool) -> None:
        arguments = Generator(data, noise).value(node)
        if not isinstance(arguments, dict):
            return
        ours, reference = _ours(command, arguments), _reference(command, arguments)
        assert (ours is None) == (reference is None), (
            f"{command} {arguments!r}: ours says {ours!r}, jsonschema says {reference!r}")
        seen["valid" if ours is None else "invalid"] += 1

    agree()
    if node is not None and isinstance(node, StructNode) and (node.members or node.variants):
        assert seen["invalid"], f"{command}: no invalid arguments were drawn"
    assert seen["valid"], f"{command}: no valid arguments were drawn"


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        # Found while writing the property: each is a boundary one checker could get wrong.
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": -1}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": U64_MAX}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": U64_MAX + 1}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": I64_MIN - 1}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1.0}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n", "read-only": 0}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": "f", "filename": "x"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": {"driver": "file"}}),
        ("migrate-set-parameters", {"tls-creds": None}),
        ("migrate-set-parameters", {"cpu-throttle-initial": 256}),
        ("migrate-set-parameters", {"multifd-channels": 65536}),
        ("qmp_capabilities", {"enable": []}),
        ("device_add", {"driver": "virtio-blk-pci", "drive": "x", "anything": [1]}),
    ],
)
def test_boundaries_agree(command: str, arguments: dict[str, Any]) -> None:
    assert (_ours(command, arguments) is None) == (_reference(command, arguments) is None)


def _node_accepts(node: Node, value: Any) -> bool:
    try:
        node.check(copy.deepcopy(value))
    except Failure:
        return False
    return True


PARTS = [("return", name) for name in COMMANDS] + [
    ("event", name) for name in sorted(SCHEMA.events) if SCHEMA.events[name].data is not None]


@pytest.mark.parametrize(("part", "name"), PARTS)
def test_compiled_model_of_replies_and_events_agrees_with_jsonschema(part: str, name: str) -> None:
    """Return and event types compile to the same model (introspection and docs walk it)."""
    node = SCHEMA.return_node(name) if part == "return" else SCHEMA.event_node(name)
    assert node is not None
    reference = CONFORMANCE.check_return if part == "return" else CONFORMANCE.check_event

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data(), st.booleans())
    def agree(data: st.DataObject, noise: bool) -> None:
        value = Generator(data, noise).value(node)
        if part == "event" and not isinstance(value, dict):
            return
        try:
            reference(name, value)
            theirs = True
        except ValueError:
            theirs = False
        assert _node_accepts(node, value) == theirs, (part, name, value)

    agree()
