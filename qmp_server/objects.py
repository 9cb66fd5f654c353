"""User-creatable objects: ``-object``, ``object-add``, ``object-del``, ``/objects`` in QOM.

The types libvirt creates (secrets, guest RAM backends, iothreads, throttle groups) are
created as objects that hold their settings and answer ``qom-list``, ``qom-get`` and
``query-iothreads`` as QEMU 7.2 does; none of them does work here: there is no guest RAM
to back, every block device runs in the main loop, no I/O is throttled. The arguments are
checked against ``ObjectOptions`` in ``schema/types.json`` (QEMU's texts); what QEMU checks
when it completes an object is checked here, with its texts.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import QMPError
from .keyval import parse_json_option, parse_keyval
from .machinemodel import NONE_MACHINE, OBJECT_PROPERTIES, MachineType

if TYPE_CHECKING:
    from .schema import Schema

#: QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'.
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_IDENTIFIER_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."

_THROTTLE_KEYS = [f"{kind}-{op}{suffix}" for kind in ("iops", "bps") for op in ("total", "read", "write")
                  for suffix in ("", "-max", "-max-length")] + ["iops-size"]

# What qom-get answers for a property nobody set, per type (QEMU 7.2, measured).
_MEMORY_DEFAULTS: dict[str, Any] = {
    "share": False, "dump": True, "prealloc-threads": 1, "x-use-canonical-path-for-ramblock-id": False,
    "policy": "default", "prealloc-context": "", "prealloc": False, "reserve": True, "host-nodes": [],
    "merge": True,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "memory-backend-ram": _MEMORY_DEFAULTS,
    "memory-backend-file": {**_MEMORY_DEFAULTS, "readonly": False, "align": 0, "pmem": False,
                            "mem-path": "", "discard-data": False},
    "memory-backend-memfd": {**_MEMORY_DEFAULTS, "hugetlb": False, "seal": True, "hugetlbsize": 0},
    "iothread": {"thread-pool-min": 0, "aio-max-batch": 0, "thread-pool-max": 64, "poll-max-ns": 32768,
                 "poll-grow": 0, "poll-shrink": 0},
    "secret": {"iv": "", "keyid": "", "loaded": True, "format": "raw", "file": "", "data": ""},
}


class IdleThread:
    """A thread that exists only to have an id: it waits until stopped.

    QEMU runs each vCPU and each iothread in a thread of its own, and management tools use
    those ids: libvirt pins them and reads their CPU time, and ignores a vCPU whose id is
    the process's own ("cpu affinity is not supported"). Nothing runs in these threads
    here, so pinning them changes nothing for the server's own work.
    """

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stop.wait, name=name, daemon=True)
        self._thread.start()
        assert self._thread.native_id is not None  # set once the thread has started
        self.native_id: int = self._thread.native_id

    def stop(self) -> None:
        """Let the thread end."""
        self._stop.set()


class CreationError(QMPError):
    """A failure while completing an object: QEMU prints it without the option's location."""


@dataclass
class UserObject:
    """One object under ``/objects``: its type, id and the properties it was given."""

    qom_type: str
    id: str
    properties: dict[str, Any] = field(default_factory=dict)
    #: An iothread's thread (idle: block I/O runs in the main loop).
    thread: IdleThread | None = None

    def property_types(self) -> list[dict[str, str]]:
        """``qom-list``'s entries: QEMU's properties of the class, without descriptions."""
        return [{"name": prop["name"], "type": prop["type"]} for prop in OBJECT_PROPERTIES[self.qom_type]]

    def limits(self) -> dict[str, int]:
        """A throttle group's limits: 0 (none) unless set, the burst lengths 1."""
        given: dict[str, int] = self.properties.get("limits", {})
        values = {key: 1 if key.endswith("-max-length") else 0 for key in _THROTTLE_KEYS}
        values.update(given)
        values.update({key: self.properties[f"x-{key}"] for key in _THROTTLE_KEYS
                       if f"x-{key}" in self.properties})
        return values

    def get(self, name: str) -> Any:
        """``qom-get``'s value of property ``name``; KeyError if the class has none."""
        if name == "type":
            return self.qom_type
        if self.qom_type == "throttle-group":
            limits = self.limits()
            if name == "limits":
                return limits
            if name.startswith("x-") and name[2:] in limits:
                return limits[name[2:]]
            raise KeyError(name)
        if name in self.properties:
            return self.properties[name]
        return _DEFAULTS[self.qom_type][name]

    def iothread_info(self) -> dict[str, Any]:
        """query-iothreads' IOThreadInfo for an iothread; its thread is idle (see IdleThread)."""
        polling = ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch")
        thread_id = self.thread.native_id if self.thread is not None else os.getpid()
        return {"id": self.id, "thread-id": thread_id, **{key: self.get(key) for key in polling}}


class Objects:
    """The user-created objects of one machine, by id, in creation order."""

    def __init__(self) -> None:
        self._objects: dict[str, UserObject] = {}
        #: Objects the machine uses (its RAM backend): object-del refuses them.
        self._in_use: set[str] = set()

    def __iter__(self) -> Any:
        return iter(list(self._objects.values()))

    def find(self, object_id: str) -> UserObject | None:
        """The object with id ``object_id``, or None."""
        return self._objects.get(object_id)

    def iothreads(self) -> list[UserObject]:
        """The iothread objects."""
        return [obj for obj in self._objects.values() if obj.qom_type == "iothread"]

    def add(self, options: dict[str, Any]) -> UserObject:
        """object-add: create an object from schema-checked arguments.

        QEMU's order: the id's form, its uniqueness, then the type's own completion checks.
        """
        object_id: str = options["id"]
        _check_identifier(object_id, hint=False)
        if object_id in self._objects:
            raise QMPError(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
        return self._create(options)

    def add_from_cli(self, schema: Schema, texts: list[str], machine: MachineType | None = None,
                     ram_size: int | None = None, memory_backend: str | None = None) -> None:
        """Create the objects the ``-object`` arguments describe (keyval or JSON), then the
        guest RAM's backend of ``machine`` (``-m ram_size``, ``-machine memory-backend=``).

        As QEMU: every argument is parsed (and its id checked) first, with the option's
        location in the text, ``-object TEXT: message``; then the objects are created, and
        what an object refuses is reported bare, as QEMU, which has left the option by then.
        """
        parsed: list[dict[str, Any]] = []
        for text in texts:
            try:
                options = _cli_options(schema, text)
                _check_identifier(options["id"], hint=True)
                if options["id"] in self._objects or any(options["id"] == other["id"] for other in parsed):
                    raise QMPError(f"Duplicate ID '{options['id']}' for object")
            except QMPError as err:
                raise QMPError(f"-object {text}: {err.desc}") from None
            parsed.append(options)
        for options in parsed:
            self._create(options)
        if machine is not None:
            self._machine_ram(machine, ram_size, memory_backend)

    def _machine_ram(self, machine: MachineType, ram_size: int | None, memory_backend: str | None) -> None:
        """The RAM backend a machine uses, as QEMU 7.2's machine_run_board_init finds or makes it.

        ``memory-backend=`` names a memory backend object (its size must be ``-m``'s when
        both are given); otherwise the machine makes its own, ``/objects/<default-ram-id>``,
        of ``-m``'s size (128 MiB for the PC machines; ``none`` has no RAM unless ``-m``),
        and no object may take that id.
        """
        if memory_backend is not None:
            backend = self._objects.get(memory_backend)
            if backend is None or not backend.qom_type.startswith("memory-backend-"):
                raise QMPError(f"Memory backend '{memory_backend}' not found")
            if ram_size is not None and backend.properties["size"] != ram_size:
                raise QMPError("Machine memory size does not match the size of the memory backend")
            self._in_use.add(memory_backend)
            return
        size = ram_size if ram_size is not None else (0 if machine.name == NONE_MACHINE else 128 << 20)
        if size == 0:
            return
        if machine.default_ram_id in self._objects:
            raise QMPError(f"object name '{machine.default_ram_id}' is reserved for the default RAM "
                           "backend, it can't be used for any other purposes. Change the object's "
                           "'id' to something else")
        self._create({"qom-type": "memory-backend-ram", "id": machine.default_ram_id, "size": size})
        self._in_use.add(machine.default_ram_id)

    def _create(self, options: dict[str, Any]) -> UserObject:
        properties = {key: value for key, value in options.items() if key not in ("qom-type", "id")}
        obj = UserObject(options["qom-type"], options["id"], properties)
        _complete(obj)
        if obj.qom_type == "iothread":
            obj.thread = IdleThread(f"IO {obj.id}")
        self._objects[obj.id] = obj
        return obj

    def delete(self, object_id: str) -> None:
        """object-del: remove the object, unless the machine uses it (its RAM backend)."""
        if object_id in self._in_use:
            raise QMPError(f"object '{object_id}' is in use, can not be deleted")
        obj = self._objects.pop(object_id, None)
        if obj is None:
            raise QMPError(f"object '{object_id}' not found")
        if obj.thread is not None:
            obj.thread.stop()


def _check_identifier(object_id: str, *, hint: bool) -> None:
    # The command line adds QEMU's hint line; QMP replies carry no hints.
    if not _IDENTIFIER.match(object_id):
        raise QMPError("Parameter 'id' expects an identifier" + (f"\n{_IDENTIFIER_HINT}" if hint else ""))


def _cli_options(schema: Schema, text: str) -> dict[str, Any]:
    """``-object``'s argument as object-add arguments: JSON, or keyval with qom-type implied."""
    if text.startswith("{"):
        options = parse_json_option(text)
        if not isinstance(options, dict):
            raise QMPError("Invalid parameter type for '<anonymous>', expected: object")
        schema.validate_arguments("object-add", options)
        return options
    try:
        return schema.keyval_arguments("object-add", parse_keyval(text, "qom-type"))
    except QMPError as err:
        raise QMPError(_opts_visitor_text(err.desc)) from None


#: Properties whose QAPI type is unsigned or a size: QEMU's option visitor names them so.
_UNSIGNED = {"prealloc-threads"}
_SIZES = {"size", "align", "hugetlbsize"}


def _opts_visitor_text(message: str) -> str:
    """QEMU 7.2 reads a keyval ``-object`` with its option visitor, whose texts differ
    from the keyval visitor's (``-blockdev``) for unknown and numeric parameters."""
    match = re.fullmatch(r"Parameter '([^']+)' (is unexpected|expects integer|expects size)", message)
    if match is None:
        return message
    name, problem = match.groups()
    if problem == "is unexpected":
        return f"Invalid parameter '{name}'"
    if name in _SIZES:
        return f"Parameter '{name}' expects a size value"
    return f"Parameter '{name}' expects {'a uint64' if name in _UNSIGNED else 'an int64'} value"


def _complete(obj: UserObject) -> None:
    """The checks QEMU makes when it completes an object (user_creatable_complete)."""
    props = obj.properties
    if obj.qom_type == "secret":
        _load_secret(props)
    elif obj.qom_type.startswith("memory-backend-"):
        if props["size"] == 0:
            raise CreationError(f"property 'size' of {obj.qom_type} doesn't take value '0'")
    elif obj.qom_type == "iothread":
        for key in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"):
            if props.get(key, 0) < 0:
                raise CreationError(f"{key} value must be in range [0, {2**63 - 1}]")
    elif obj.qom_type == "throttle-group":
        if any(value < 0 for key, value in props.items() if key.startswith("x-")):
            raise CreationError("Property values cannot be negative")
        _check_limits(obj.limits())


#: QEMU's THROTTLE_VALUE_MAX.
_THROTTLE_MAX = 1_000_000_000_000_000


def _check_limits(limits: dict[str, int]) -> None:
    """A throttle group's limits as QEMU's throttle_is_valid checks them, in its order."""
    for suffix in ("", "-max"):
        for kind in ("bps", "iops"):
            total, read, write = (limits[f"{kind}-{op}{suffix}"] for op in ("total", "read", "write"))
            if total and (read or write):
                raise CreationError("bps/iops/max total values and read/write values "
                                    "cannot be used at the same time")
    if limits["iops-size"] and not any(limits[f"iops-{op}"] for op in ("total", "read", "write")):
        raise CreationError("iops size requires an iops value to be set")
    for bucket in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write"):
        average, burst, length = limits[bucket], limits[f"{bucket}-max"], limits[f"{bucket}-max-length"]
        if not (0 <= average <= _THROTTLE_MAX and 0 <= burst <= _THROTTLE_MAX):
            raise CreationError(f"bps/iops/max values must be within [0, {_THROTTLE_MAX}]")
        if length == 0:
            raise CreationError("the burst length cannot be 0")
        if length > 1 and not burst:
            raise CreationError("burst length set without burst rate")
        if burst and not average:
            raise CreationError("bps_max/iops_max require corresponding bps/iops values")
        if burst and burst < average:
            raise CreationError("bps_max/iops_max cannot be lower than bps/iops")


def _load_secret(props: dict[str, Any]) -> None:
    """A secret needs its data inline or in a readable file (qcrypto_secret_load_data).

    The data is read, as QEMU reads it, so that a missing key file fails here too; it is
    not decrypted (``keyid``/``iv``): nothing here consumes secrets.
    """
    if "data" in props and "file" in props:
        raise CreationError("'file' and 'data' are mutually exclusive")
    if "file" in props:
        path: str = props["file"]
        try:
            with open(path, "rb") as handle:
                handle.read()
        except OSError as exc:
            # GLib's g_file_get_contents text, which QEMU passes on.
            reason = os.strerror(exc.errno or 0)
            raise CreationError(f"Unable to read {path}: "
                                f"Failed to open file \u201c{path}\u201d: {reason}") from None
    elif "data" not in props:
        raise CreationError("Either 'file' or 'data' must be provided")
