"""Replies and events checked against schema/ with ``jsonschema``, the reference validator.

The server compiles the schema files into its own validator (QEMU's texts and visiting
order); ``jsonschema`` implements the standard the files are written in. The tests use it
to check that the files are valid draft 2020-12 schemas and that what the server sends
matches them. It is a test dependency only: serving never imports it.
"""

from __future__ import annotations

import importlib
import os
import socket
import struct
from pathlib import Path
from typing import Any

from referencing import Registry
from referencing.jsonschema import DRAFT202012

from qmp_server.protocol.qdict import BUCKETS, qdict_order, tdb_hash
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


# ------------------------------------------------------------------------ the tests' clients

_shared: Conformance | None = None


def shared() -> Conformance:
    """One :class:`Conformance` for the default schema, built on first use."""
    global _shared
    if _shared is None:
        _shared = Conformance(Schema.load())
    return _shared


def is_qmp_server(sock: socket.socket) -> bool:
    """Whether the process at the other end of a UNIX socket is this project's server.

    Tests talk to QEMU with the same client; QEMU's replies follow QEMU's own schema, not
    ours, so only our server's replies are checked. Its command line tells them apart.
    """
    if sock.family != socket.AF_UNIX:
        return False
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", raw)[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    program = os.path.basename(argv[0])
    if program == b"qmp-server":
        return True
    # python -m qmp_server, or the qmp-server script run by its interpreter (#! line)
    return program.startswith(b"python") and len(argv) > 2 and (
        b"qmp_server" in argv[1:3] or os.path.basename(argv[1]) == b"qmp-server")


def check_reply(command: str, reply: dict[str, Any]) -> None:
    """Raise ValueError unless a successful reply's ``return`` matches ``command``'s schema.

    Error replies and commands outside the default schema (a test's own schema copy) pass.
    """
    conformance = shared()
    if "return" in reply and command in conformance.schema.commands:
        conformance.check_return(command, reply["return"])


def check_event(message: dict[str, Any]) -> None:
    """Raise ValueError unless an event message's ``data`` matches the event's schema."""
    shared().check_event(message["event"], message.get("data"))


def check_member_order(message: Any) -> None:
    """Raise ValueError unless every object in ``message`` lists its members in QDict order.

    QEMU builds every reply and event as QDicts and writes each one's members in hash-bucket
    order (protocol/qdict.py), so a client can see the order; members sharing a bucket come
    newest first, which the wire alone does not tell, so only the buckets are compared.
    """
    stack: list[tuple[Any, str]] = [(message, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            buckets = [tdb_hash(key) % BUCKETS for key in value]
            if buckets != sorted(buckets):
                raise ValueError(f"members of {where or 'the message'} not in QEMU's order: {list(value)}; "
                                 f"QEMU: {qdict_order(list(value))}")
            stack.extend((item, f"{where}.{key}") for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{index}]") for index, item in enumerate(value))

