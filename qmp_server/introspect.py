"""``query-qmp-schema``: the schema in QEMU's SchemaInfo format (qapi/introspect.json).

Like QEMU (which masks type names unless built for debugging), every type other than the
built-ins gets an opaque number as its name; ``"0"`` is the empty object, used as the argument
type of commands without arguments, the return type of commands that return ``{}`` and the
data type of events without data. All integer types appear as the built-in ``int``.
Optional object members carry ``"default": null``; ``allow-oob`` appears only when true.
"""

from __future__ import annotations

from typing import Any

from .schema import Schema
from .schema_validate import (
    AlternateNode,
    EnumNode,
    ListNode,
    Member,
    Node,
    StructNode,
)

_BUILTINS = (
    ("str", "string"),
    ("any", "value"),
    ("bool", "boolean"),
    ("int", "int"),
    ("null", "null"),
    ("number", "number"),
)
EMPTY = "0"


class _Builder:
    """Assigns entity names and collects the type entities in order of first use."""

    def __init__(self) -> None:
        self.types: list[dict[str, Any]] = [{"name": EMPTY, "members": [], "meta-type": "object"}]
        self._names: dict[int, str] = {}
        self._arrays: set[str] = set()
        self._counter = 1
        # Keeps every node we named alive so that id() values stay unique.
        self._keep: list[object] = []

    def _new_name(self, thing: object) -> str:
        name = str(self._counter)
        self._counter += 1
        self._names[id(thing)] = name
        self._keep.append(thing)
        return name

    def name(self, node: Node) -> str:
        """The entity name of ``node``, emitting its entity (and those it uses) on first sight."""
        builtin = type(node).builtin
        if builtin is not None:
            return builtin
        known = self._names.get(id(node))
        if known is not None:
            return known
        if isinstance(node, ListNode):
            element = self.name(node.element)
            name = f"[{element}]"
            if name not in self._arrays:
                self._arrays.add(name)
                self.types.append({"name": name, "element-type": element, "meta-type": "array"})
            return name
        if isinstance(node, StructNode) and not node.members and not node.variants:
            return EMPTY
        name = self._new_name(node)
        entity: dict[str, Any] = {"name": name}
        # Reserve the slot before recursing so that the output follows first use.
        self.types.append(entity)
        if isinstance(node, EnumNode):
            entity["members"] = [self._enum_member(node, value) for value in node.values]
            entity["values"] = list(node.values)
            entity["meta-type"] = "enum"
        elif isinstance(node, AlternateNode):
            entity["members"] = [{"type": self.name(branch)} for branch in node.branches]
            entity["meta-type"] = "alternate"
        elif isinstance(node, StructNode):
            entity["members"] = [self._member(member) for member in node.members]
            if node.discriminator is not None:
                entity["tag"] = node.discriminator
                entity["variants"] = [
                    {"case": case, "type": self._variant(members)} for case, members in node.variants.items()
                ]
            entity["meta-type"] = "object"
        else:
            raise TypeError(f"cannot introspect {type(node).__name__}")
        if node.features:
            entity["features"] = list(node.features)
        return name

    @staticmethod
    def _enum_member(node: EnumNode, value: str) -> dict[str, Any]:
        member: dict[str, Any] = {"name": value}
        features = node.value_features.get(value)
        if features:
            member["features"] = list(features)
        return member

    def _member(self, member: Member) -> dict[str, Any]:
        out: dict[str, Any] = {"name": member.name}
        if not member.required:
            out["default"] = None
        out["type"] = self.name(member.node)
        if member.features:
            out["features"] = list(member.features)
        return out

    def _variant(self, members: tuple[Member, ...]) -> str:
        if not members:
            return EMPTY
        known = self._names.get(id(members))
        if known is not None:
            return known
        name = self._new_name(members)
        entity: dict[str, Any] = {"name": name}
        self.types.append(entity)
        entity["members"] = [self._member(member) for member in members]
        entity["meta-type"] = "object"
        return name


def schema_info(schema: Schema) -> list[dict[str, Any]]:
    """The complete SchemaInfo list for ``schema``: commands, events, then types and built-ins."""
    builder = _Builder()
    entities: list[dict[str, Any]] = []
    for name, info in schema.commands.items():
        command: dict[str, Any] = {
            "name": name,
            "arg-type": builder.name(schema.argument_node(name)),
            "ret-type": builder.name(schema.return_node(name)),
            "meta-type": "command",
        }
        if info.allow_oob:
            command["allow-oob"] = True
        if info.features:
            command["features"] = list(info.features)
        entities.append(command)
    for name, event_info in schema.events.items():
        node = schema.event_node(name)
        event: dict[str, Any] = {
            "name": name,
            "arg-type": EMPTY if node is None else builder.name(node),
            "meta-type": "event",
        }
        if event_info.features:
            event["features"] = list(event_info.features)
        entities.append(event)
    entities.extend(builder.types)
    entities.extend(
        {"name": name, "json-type": json_type, "meta-type": "builtin"} for name, json_type in _BUILTINS
    )
    return entities
