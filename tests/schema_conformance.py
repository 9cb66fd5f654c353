"""Replies and events checked against schema/ with ``jsonschema``, the reference validator.

The server compiles the schema files into its own validator (QEMU's texts and visiting
order); ``jsonschema`` implements the standard the files are written in. The tests use it
to check that the files are valid draft 2020-12 schemas and that what the server sends
matches them. It is a test dependency only: serving never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any

from referencing import Registry
from referencing.jsonschema import DRAFT202012

from qmp_server.schema import TYPES_URI, Schema

# jsonschema ships no type information; loaded as a plain module so that it needs no stubs.
_jsonschema: Any = importlib.import_module("jsonschema")


def _strict_integer(checker: Any, instance: Any) -> bool:
    # jsonschema counts 1.0 as an integer; QEMU (and therefore we) do not.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator: Any = _jsonschema.validators.extend(
    _jsonschema.Draft202012Validator,
    type_checker=_jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)


def check_schema(document: Any) -> None:
    """Raise if ``document`` is not a valid draft 2020-12 JSON Schema."""
    _jsonschema.Draft202012Validator.check_schema(document)


def _where(path: Any) -> str:
    parts = list(path)
    return "at " + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts) if parts else "at top"


class Conformance:
    """``jsonschema`` validators for every command's parts and every event's data."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._registry: Any = Registry().with_resource(
            TYPES_URI, DRAFT202012.create_resource(schema.types_document))
        self._validators: dict[tuple[str, str], Any] = {}

    def validator(self, uri: str, part: str, document: dict[str, Any]) -> Any:
        """A validator for ``document``, one part of the file at ``uri`` (cached)."""
        key = (uri, part)
        validator = self._validators.get(key)
        if validator is None:
            rooted = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": uri, **document}
            validator = _Validator(rooted, registry=self._registry)
            self._validators[key] = validator
        return validator

    def check_arguments(self, command: str, value: Any) -> None:
        """Raise ValueError unless ``value`` matches the ``arguments`` schema of ``command``."""
        info = self.schema.commands[command]
        error = _jsonschema.exceptions.best_match(
            self.validator(info.uri, "arguments", info.arguments).iter_errors(value))
        if error is not None:
            raise ValueError(f"{command} arguments {_where(error.absolute_path)}: {error.message}")

    def check_return(self, command: str, value: Any) -> None:
        """Raise ValueError unless ``value`` matches the ``returns`` schema of ``command``."""
        info = self.schema.commands.get(command)
        if info is None:
            raise ValueError(f"unknown command {command!r}")
        error = _jsonschema.exceptions.best_match(
            self.validator(info.uri, "returns", info.returns).iter_errors(value))
        if error is not None:
            raise ValueError(f"{command} return {_where(error.absolute_path)}: {error.message}")

    def check_event(self, event: str, data: dict[str, Any] | None) -> None:
        """Raise ValueError unless ``data`` matches the schema of ``event``."""
        info = self.schema.events.get(event)
        if info is None:
            raise ValueError(f"unknown event {event!r}")
        if info.data is None:
            if data is not None:
                raise ValueError(f"event {event} carries no data, got {data!r}")
            return
        if data is None:
            raise ValueError(f"event {event} needs data")
        validator = self.validator(info.uri, "data", info.data)
        error = _jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            raise ValueError(f"{event} data {_where(error.absolute_path)}: {error.message}")
