"""The sans-I/O side of one QMP connection: bytes in, checked requests out.

Like h11, this holds no socket: :meth:`QMPSession.receive` is fed the bytes a client sent
and returns :class:`Request` objects in arrival order, each either ready to dispatch or
carrying the error QEMU would answer with. The Trio server does the I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from . import QEMU_VERSION, __version__
from .errors import QMPError
from .jsonstream import JSONParseError, JSONStreamer


class _NoId:
    """The absence of ``id`` (distinct from ``"id": null``, which is echoed)."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()


class Mode(enum.Enum):
    """Where the connection is in its life."""

    NEGOTIATION = "negotiation"
    COMMAND = "command"


@dataclass
class Request:
    """One message from the client, checked as far as QEMU checks before dispatch.

    If ``error`` is set, the reply is that error (with ``id`` when known) and nothing runs.
    ``oob`` requests jump the in-band queue, as QEMU's qmp_is_oob() decides: ``exec-oob``
    present and ``execute`` absent, whether or not OOB was negotiated.
    """

    command: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID
    oob: bool = False
    error: QMPError | None = None

    def response(self, result: Any = None, error: QMPError | None = None) -> dict[str, Any]:
        """The reply to this request, keys in the order QEMU writes them."""
        if error is not None:
            reply: dict[str, Any] = {}
            if self.id is not NO_ID:
                reply["id"] = self.id
            reply["error"] = error.to_wire()
            return reply
        reply = {"return": {} if result is None else result}
        if self.id is not NO_ID:
            reply["id"] = self.id
        return reply


def _tdb_hash(key: str) -> int:
    # QEMU's QDict hash; replicated only to iterate request members in QEMU's order, which
    # decides which error is reported when a request has several faults.
    data = key.encode("utf-8", "surrogatepass")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: list[str]) -> list[str]:
    """``keys`` (in insertion order) in the order QEMU's qdict_first/qdict_next visit them.

    Buckets in ascending order; within a bucket the newest insertion comes first.
    """
    signature = tuple(keys)
    order = _ORDER_CACHE.get(signature)
    if order is None:
        indexed = [(_tdb_hash(key) % 512, -position, key) for position, key in enumerate(keys)]
        indexed.sort()
        order = [key for _, _, key in indexed]
        if len(_ORDER_CACHE) >= 4096:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[signature] = order
    return list(order)


# Requests of one client repeat the same few key sets ("execute", "arguments", "id").
_ORDER_CACHE: dict[tuple[str, ...], list[str]] = {}


def qemu_ordered(value: Any) -> Any:
    """A copy of ``value`` with every object's members in the order QEMU writes them.

    QEMU parses input into QDicts and writes them back in hash order, so an ``id`` like
    ``{"b": 1, "a": 2}`` is echoed as ``{"a": 2, "b": 1}``. Iterative, because input may
    nest up to 1024 deep.
    """
    if not isinstance(value, dict | list):
        return value
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while stack:
        source, parent, slot = stack.pop()
        if isinstance(source, dict):
            keys = qdict_order(list(source)) if len(source) > 1 else list(source)
            copy: dict[str, Any] = dict.fromkeys(keys)
            parent[slot] = copy
            for key in keys:
                item = source[key]
                if isinstance(item, dict | list):
                    stack.append((item, copy, key))
                else:
                    copy[key] = item
        else:
            items = list(source)
            parent[slot] = items
            for index, item in enumerate(items):
                if isinstance(item, dict | list):
                    stack.append((item, items, index))
    return root[0]


def check_request(message: Any, oob_enabled: bool) -> Request:
    """Turn one parsed JSON value into a Request, with QEMU's pre-dispatch checks."""
    if not isinstance(message, dict):
        return Request(error=QMPError("QMP input must be a JSON object"))
    request = Request(id=message.get("id", NO_ID))
    if isinstance(request.id, dict | list):
        request.id = qemu_ordered(request.id)
    request.oob = "exec-oob" in message and "execute" not in message
    keys = list(message)
    if len(keys) > 1:
        keys = qdict_order(keys)
    exec_key: str | None = None
    for key in keys:
        value = message[key]
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                request.error = QMPError(f"QMP input member '{key}' must be a string")
                return request
            if exec_key is not None:
                request.error = QMPError(f"QMP input member '{key}' clashes with '{exec_key}'")
                return request
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                request.error = QMPError("QMP input member 'arguments' must be an object")
                return request
        elif key == "id":
            continue
        else:
            request.error = QMPError(f"QMP input member '{key}' is unexpected")
            return request
    if exec_key is None:
        request.error = QMPError("QMP input lacks member 'execute'")
        return request
    request.command = message[exec_key]
    request.oob = exec_key == "exec-oob"
    request.arguments = message.get("arguments", {})
    return request


class QMPSession:
    """Protocol state of one connection: framing, negotiation mode, OOB capability."""

    def __init__(self) -> None:
        self._streamer = JSONStreamer()
        self.mode = Mode.NEGOTIATION
        self.oob_enabled = False

    @staticmethod
    def greeting() -> dict[str, Any]:
        """The greeting sent when the connection opens."""
        major, minor, micro = QEMU_VERSION
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": f"qmp-server {__version__}",
                },
                "capabilities": ["oob"],
            }
        }

    def between_messages(self) -> bool:
        """True when everything received so far was complete messages (nothing pending)."""
        return self._streamer.at_boundary()

    def receive(self, data: bytes) -> list[Request]:
        """Feed bytes from the client; return the requests they completed, in order."""
        requests = []
        for item in self._streamer.feed(data):
            if isinstance(item, JSONParseError):
                requests.append(Request(error=QMPError(item.desc)))
            else:
                requests.append(check_request(item, self.oob_enabled))
        return requests

    def negotiated(self, enable: list[str]) -> None:
        """``qmp_capabilities`` succeeded: leave negotiation mode."""
        self.mode = Mode.COMMAND
        self.oob_enabled = "oob" in enable
