"""The QMP schema: every command's arguments and return value and every event's data.

The single source of truth is the JSON Schema (draft 2020-12) under ``schema/``:

* ``schema/types.json``: named types under ``$defs`` (QEMU's QAPI names), including the
  QAPI built-ins (``str``, ``int``, ``uint8``, ``size``, ...);
* ``schema/commands/<name>.json``: ``description``, ``allow-oob``, ``allow-preconfig``,
  optional ``features``, and the ``arguments`` and ``returns`` schemas;
* ``schema/events/<NAME>.json``: ``description``, optional ``features`` and the ``data``
  schema (null for events without data).

``schema/README.md`` describes the conventions. :class:`Schema` loads the files once and
answers the dispatcher: argument checks with QEMU's exact error texts
(:mod:`qmp_server.schema_validate`); :mod:`qmp_server.introspect` derives
``query-qmp-schema`` and :mod:`qmp_server.keyval` the command-line forms from it.
The tests check replies and events against the same files with ``jsonschema``, the
reference implementation of the standard they are written in; serving does not need it.

An installed package carries the files as ``qmp_server/_schema`` (``setup.py`` copies
them into the wheel); a source checkout reads the repository's ``schema/``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from .errors import CommandNotFound, QMPError
from .schema_validate import Compiler, Failure, Node

__all__ = [
    "DEFAULT_DIRECTORY",
    "CommandInfo",
    "EventInfo",
    "Schema",
]

#: Base URI of the schema files; ``$ref`` values resolve against it like relative paths.
SCHEMA_BASE: Final = "https://qmp-server.invalid/schema/"
TYPES_URI: Final = SCHEMA_BASE + "types.json"
_PACKAGE: Final = Path(__file__).resolve().parent
#: The schema files: inside an installed package, else the source checkout's ``schema/``.
DEFAULT_DIRECTORY: Final = (_PACKAGE / "_schema" if (_PACKAGE / "_schema").is_dir()
                            else _PACKAGE.parent / "schema")

_COMMAND_KEYS: Final = {"description", "allow-oob", "allow-preconfig", "features", "arguments", "returns"}
_EVENT_KEYS: Final = {"description", "features", "data"}


# CommandInfo and EventInfo are plain classes, not dataclasses: creating a dataclass
# compiles its generated methods, ~0.5 ms each at every start (issue 9 §5).
class CommandInfo:
    """One command as described in ``schema/commands/<name>.json``."""

    __slots__ = ("allow_oob", "allow_preconfig", "arguments", "description", "features", "name",
                 "returns", "uri")

    def __init__(self, name: str, description: str, allow_oob: bool, allow_preconfig: bool,
                 arguments: dict[str, Any], returns: dict[str, Any], features: tuple[str, ...] = (),
                 uri: str = "") -> None:
        self.name = name
        self.description = description
        self.allow_oob = allow_oob
        self.allow_preconfig = allow_preconfig
        self.arguments = arguments
        self.returns = returns
        self.features = features
        self.uri = uri

    def __repr__(self) -> str:
        return f"CommandInfo({self.name!r})"


class EventInfo:
    """One event as described in ``schema/events/<NAME>.json``; ``data`` is None without data."""

    __slots__ = ("data", "description", "features", "name", "uri")

    def __init__(self, name: str, description: str, data: dict[str, Any] | None,
                 features: tuple[str, ...] = (), uri: str = "") -> None:
        self.name = name
        self.description = description
        self.data = data
        self.features = features
        self.uri = uri

    def __repr__(self) -> str:
        return f"EventInfo({self.name!r})"


def _read_json(path: str | Path) -> Any:
    with open(path, "rb") as stream:
        return json.loads(stream.read())


class Schema:
    """The loaded schema. Immutable after :meth:`load`; safe to share between sessions."""

    def __init__(
        self,
        directory: Path,
        types: dict[str, Any],
        commands: dict[str, CommandInfo],
        events: dict[str, EventInfo],
    ) -> None:
        self.directory = directory
        #: Whether this is the schema shipped with the code (see :meth:`load`).
        self.shipped = False
        self.types_document = types
        self.commands: Mapping[str, CommandInfo] = commands
        self.events: Mapping[str, EventInfo] = events
        documents: dict[str, Any] = {TYPES_URI: types}
        documents.update({info.uri: _command_document(info) for info in commands.values()})
        documents.update({info.uri: {"data": info.data} for info in events.values()})
        self._compiler = Compiler(documents, TYPES_URI)
        # Nodes are compiled on first use (a command's first call, its first keyval
        # conversion): compiling every argument type up front took ~8 ms of each start
        # (issue 9 §5). See load() for when they are all compiled at once. Compilation may
        # be asked for from the block service's worker thread too (keyval conversions),
        # hence the lock.
        self._compile_lock = threading.Lock()
        self._argument_nodes: dict[str, Node] = {}
        self._return_nodes: dict[str, Node] = {}
        self._event_nodes: dict[str, Node | None] = {}

    @classmethod
    def load(cls, directory: Path | None = None) -> Schema:
        """Load ``directory`` (default: ``$QMP_SERVER_SCHEMA_DIR``, else the repository's schema/).

        Raises :class:`~qmp_server.schema_validate.SchemaError` for a schema that breaks
        the conventions of ``schema/README.md``. The schema shipped with the package is
        compiled lazily (tests/test_schema.py compiles all of it); any other, named here
        or by ``$QMP_SERVER_SCHEMA_DIR``, has its argument types compiled right away.
        """
        shipped = False
        if directory is None:
            override = os.environ.get("QMP_SERVER_SCHEMA_DIR")
            shipped = not override
            directory = Path(override) if override else DEFAULT_DIRECTORY
        types = _read_json(directory / "types.json")
        commands: dict[str, CommandInfo] = {}
        for stem, name, raw in _documents(directory / "commands", _COMMAND_KEYS):
            commands[stem] = CommandInfo(
                name=stem,
                description=raw["description"],
                allow_oob=bool(raw["allow-oob"]),
                allow_preconfig=bool(raw["allow-preconfig"]),
                arguments=raw["arguments"],
                returns=raw["returns"],
                features=tuple(raw.get("features", ())),
                uri=f"{SCHEMA_BASE}commands/{name}",
            )
        events: dict[str, EventInfo] = {}
        for stem, name, raw in _documents(directory / "events", _EVENT_KEYS):
            events[stem] = EventInfo(
                name=stem,
                description=raw["description"],
                data=raw["data"],
                features=tuple(raw.get("features", ())),
                uri=f"{SCHEMA_BASE}events/{name}",
            )
        schema = cls(directory, types, commands, events)
        schema.shipped = shipped
        if not shipped:
            for name in commands:
                schema.argument_node(name)
        return schema

    # ------------------------------------------------------------------ arguments

    def validate_arguments(self, command: str, arguments: dict[str, Any]) -> None:
        """Check ``arguments`` as QEMU's generated marshaller would.

        Raises :class:`QMPError` (GenericError) with QEMU's exact text for the first problem
        in QEMU's visiting order, or :class:`CommandNotFound` for an unknown command.
        """
        node = self._argument_node(command)
        try:
            node.check(arguments)
        except Failure as failure:
            raise QMPError(failure.message()) from None

    def keyval_arguments(self, command: str, tree: dict[str, Any]) -> dict[str, Any]:
        """Convert a keyval tree (see :func:`qmp_server.keyval.parse_keyval`) to typed arguments.

        Strings become booleans, integers and numbers where the schema wants them, with the
        texts of QEMU's keyval input visitor on failure (list elements named ``a.0``).
        """
        node = self._argument_node(command)
        try:
            converted: dict[str, Any] = node.keyval(tree)
        except Failure as failure:
            raise QMPError(failure.message(keyval=True)) from None
        return converted

    def argument_node(self, command: str) -> Node:
        """The compiled argument type of ``command`` (KeyError for an unknown command)."""
        node = self._argument_nodes.get(command)
        if node is None:
            info = self.commands[command]
            with self._compile_lock:
                node = self._argument_nodes.get(command) or self._compiler.compile(info.arguments, info.uri)
                self._argument_nodes[command] = node
        return node

    def _argument_node(self, command: str) -> Node:
        try:
            return self.argument_node(command)
        except KeyError:
            raise CommandNotFound(f"The command {command} has not been found") from None

    def return_node(self, command: str) -> Node:
        """The compiled return type of ``command``."""
        node = self._return_nodes.get(command)
        if node is None:
            info = self.commands[command]
            with self._compile_lock:
                node = self._return_nodes.get(command) or self._compiler.compile(info.returns, info.uri)
                self._return_nodes[command] = node
        return node

    def event_node(self, event: str) -> Node | None:
        """The compiled data type of ``event`` (None for events without data)."""
        if event not in self._event_nodes:
            info = self.events[event]
            data = info.data
            with self._compile_lock:
                if event not in self._event_nodes:
                    self._event_nodes[event] = (None if data is None
                                                else self._compiler.compile(data, info.uri))
        return self._event_nodes[event]

    def resolve(self, base: str, ref: str) -> tuple[str, Any]:
        """The absolute URI and contents a ``$ref`` in the document at ``base`` points to."""
        return self._compiler.resolve(base, ref)

    def type_name(self, uri: str) -> str | None:
        """The name of a ``types.json#/$defs/NAME`` URI, else None."""
        return self._compiler.def_name(uri)

    # ------------------------------------------------------------------ returns and events


def _documents(folder: Path, allowed: set[str]) -> Iterator[tuple[str, str, Any]]:
    """Each ``*.json`` in ``folder`` (by stem): its stem, file name and content, which may
    use only ``allowed`` keys. (os.listdir and bytes: pathlib's glob took a third of the
    schema's loading time at start-up.)"""
    names = sorted((name[:-5], name) for name in os.listdir(folder) if name.endswith(".json"))
    for stem, name in names:
        path = os.path.join(folder, name)
        raw = _read_json(path)
        unknown = set(raw) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        yield stem, name, raw


def _command_document(info: CommandInfo) -> dict[str, Any]:
    return {"arguments": info.arguments, "returns": info.returns}
