"""Generates docs/qmp-reference.md from the schema files.

``python -m qmp_server.docgen`` rewrites the file; ``--check`` only compares and exits 1 when
the file is stale (the test suite runs the same comparison).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urldefrag

from .schema import Schema

DEFAULT_OUTPUT: Final = Path(__file__).resolve().parent.parent / "docs" / "qmp-reference.md"
_BUILTINS: Final = frozenset(
    (
        "str",
        "bool",
        "number",
        "null",
        "any",
        "int",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "size",
    )
)


def _anchor(name: str) -> str:
    # GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped.
    return re.sub(r"[^a-z0-9_-]", "", name.lower().replace(" ", "-"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code_list(values: Sequence[Any]) -> str:
    return ", ".join(f"`{value}`" for value in values)


class _Renderer:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.lines: list[str] = []

    def out(self, *lines: str) -> None:
        self.lines.extend(lines)

    # ------------------------------------------------------------------ type names

    def type_of(self, fragment: Any, base: str) -> str:
        """A short markdown rendering of a member's type."""
        if not isinstance(fragment, dict) or not fragment:
            return "any"
        if "$ref" in fragment:
            uri, target = self.schema.resolve(base, fragment["$ref"])
            name = self.schema.type_name(uri)
            if name is None:
                return self.type_of(target, urldefrag(uri)[0])
            if name in _BUILTINS:
                return f"`{name}`"
            return f"[`{name}`](#{_anchor(name)})"
        if "enum" in fragment:
            return "one of " + _code_list(fragment["enum"])
        kind = fragment.get("type")
        if kind == "array":
            return "array of " + self.type_of(fragment.get("items", {}), base)
        simple = {"string": "str", "boolean": "bool", "null": "null", "number": "number"}
        if kind in simple:
            return f"`{simple[kind]}`"
        if kind == "integer":
            return "`int`"
        if kind == "object":
            return "object"
        if "oneOf" in fragment:
            return " or ".join(self.type_of(branch, base) for branch in fragment["oneOf"])
        return "any"

    @staticmethod
    def _notes(fragment: dict[str, Any]) -> str:
        notes = []
        if "default" in fragment:
            notes.append(f"Default: `{_json(fragment['default'])}`.")
        features = fragment.get("x-features")
        if features:
            notes.append("Features: " + _code_list(features) + ".")
        return " ".join(notes)

    def members_table(self, schema: dict[str, Any], base: str) -> None:
        """A table of an object's members, or a note that it has none."""
        properties: dict[str, Any] = schema.get("properties", {})
        if not properties:
            self.out("None.", "")
            return
        required = set(schema.get("required", ()))
        self.out("| Name | Type | Required | Description |", "| --- | --- | --- | --- |")
        for name, fragment in properties.items():
            description = fragment.get("description", "") if isinstance(fragment, dict) else ""
            notes = self._notes(fragment) if isinstance(fragment, dict) else ""
            text = f"{description} {notes}".strip()
            self.out(
                f"| `{name}` | {_cell(self.type_of(fragment, base))} | "
                f"{'yes' if name in required else 'no'} | {_cell(text)} |"
            )
        self.out("")

    def describe(self, schema: Any, base: str) -> None:
        """Arguments, return value or event data: a reference, a table or a type."""
        if isinstance(schema, dict) and "$ref" in schema:
            self.out(f"The members of {self.type_of(schema, base)}.", "")
        elif isinstance(schema, dict) and schema.get("type") == "object":
            self.members_table(schema, base)
        else:
            self.out(self.type_of(schema, base) + ".", "")

    # ------------------------------------------------------------------ sections

    def commands(self) -> None:
        self.out("## Commands", "")
        for name, info in self.schema.commands.items():
            self.out(f"### `{name}`", "", info.description, "")
            flags = [
                f"- Out-of-band execution (`exec-oob`): {'yes' if info.allow_oob else 'no'}",
                f"- Allowed before machine initialization: {'yes' if info.allow_preconfig else 'no'}",
            ]
            if info.features:
                flags.append("- Features: " + _code_list(info.features))
            self.out(*flags, "")
            self.out("**Arguments**", "")
            self.describe(info.arguments, info.uri)
            self.out("**Returns**", "")
            returns = info.returns
            if returns.get("type") == "object" and not returns.get("properties") and "$ref" not in returns:
                self.out("An empty object.", "")
            else:
                self.describe(returns, info.uri)

    def events(self) -> None:
        self.out("## Events", "")
        for name, info in self.schema.events.items():
            self.out(f"### `{name}` event", "", info.description, "")
            if info.features:
                self.out("Features: " + _code_list(info.features) + ".", "")
            self.out("**Data**", "")
            if info.data is None:
                self.out("None.", "")
            else:
                self.describe(info.data, info.uri)

    def types(self) -> None:
        self.out("## Types", "")
        base = self.schema.types_document["$id"]
        definitions: dict[str, Any] = self.schema.types_document["$defs"]
        builtins = [name for name in definitions if name in _BUILTINS]
        self.out("### Built-in types", "", "| Name | Description |", "| --- | --- |")
        for name in builtins:
            self.out(f"| `{name}` | {_cell(definitions[name].get('description', ''))} |")
        self.out("")
        for name, definition in definitions.items():
            if name in _BUILTINS:
                continue
            self.out(f"### {name}", "", definition.get("description", ""), "")
            features = definition.get("x-features")
            if features:
                self.out("Features: " + _code_list(features) + ".", "")
            if "enum" in definition:
                self.enum(definition)
            elif "oneOf" in definition:
                branches = [self.type_of(branch, base) for branch in definition["oneOf"]]
                self.out("Alternate: one of " + ", ".join(branches) + ", told apart by JSON type.", "")
            elif "x-discriminator" in definition:
                self.union(definition, base)
            else:
                self.members_table(definition, base)

    def enum(self, definition: dict[str, Any]) -> None:
        value_features: dict[str, list[str]] = definition.get("x-value-features", {})
        values = [
            f"`{value}`" + (f" ({', '.join(value_features[value])})" if value in value_features else "")
            for value in definition["enum"]
        ]
        self.out("Values: " + ", ".join(values) + ".", "")

    def union(self, definition: dict[str, Any], base: str) -> None:
        tag = definition["x-discriminator"]
        self.out(f"Common members (`{tag}` selects the variant):", "")
        self.members_table(definition, base)
        self.out(f"Further members by `{tag}`:", "")
        for clause in definition.get("allOf", ()):
            case = clause["if"]["properties"][tag]["const"]
            self.out(f"- `{case}`: the members of {self.type_of(clause['then'], base)}")
        self.out("")

    def render(self) -> str:
        self.out(
            "# QMP reference",
            "",
            "<!-- Generated from schema/ by `python -m qmp_server.docgen`; do not edit. -->",
            "",
            "Every command and event the server implements, with the types they use. Type names "
            "follow QEMU's QAPI schema; in `query-qmp-schema` they appear as opaque numbers.",
            "",
            "Commands: " + ", ".join(f"[`{name}`](#{_anchor(name)})" for name in self.schema.commands) + ".",
            "",
            "Events: "
            + ", ".join(f"[`{name}`](#{_anchor(name)}-event)" for name in self.schema.events)
            + ".",
            "",
        )
        self.commands()
        self.events()
        self.types()
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        return "\n".join(self.lines) + "\n"


def _json(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def render(schema: Schema | None = None) -> str:
    """The reference document for ``schema`` (default: the repository's schema)."""
    return _Renderer(schema or Schema.load()).render()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m qmp_server.docgen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale, change nothing")
    parser.add_argument("--schema", type=Path, help="schema directory (default: the repository's)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the markdown file")
    args = parser.parse_args(argv)
    text = render(Schema.load(args.schema))
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run python -m qmp_server.docgen", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
