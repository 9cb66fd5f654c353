"""A QMP request as QEMU checks it before dispatch, and the reply to it.

Two steps, as in QEMU. When a message is read, :func:`read_request` takes what QEMU
looks at then: its ``id`` and whether it is out-of-band (``qmp_is_oob``). When it is
about to run, :func:`check_request` does what ``qmp_dispatch_check_obj`` does: walk the
members in QDict order and report the first fault, with QEMU's texts. Whether
``exec-oob`` is allowed depends on OOB being enabled at that moment, not when the
message was read. The reply's keys come in the order QEMU writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import QMPError
from .qdict import qdict_order


class _NoId:
    """The absence of ``id`` (distinct from ``"id": null``, which is echoed)."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()


@dataclass
class Request:
    """One message from the client, checked as far as QEMU checks before dispatch.

    If ``error`` is set, the reply is that error (with ``id`` when known) and nothing runs.
    ``oob`` requests jump the in-band queue, as QEMU's qmp_is_oob() decides: ``exec-oob``
    present and ``execute`` absent, whether or not OOB was negotiated. ``message`` is the
    object read, until :func:`check_request` has checked it.
    """

    command: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID
    oob: bool = False
    error: QMPError | None = None
    #: Waited in the session's in-band queue (OOB enabled) until its reply.
    queued: bool = False
    message: dict[str, Any] | None = None

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


def read_request(message: Any) -> Request:
    """A request for one parsed JSON value, as QEMU sees it when it is read."""
    if not isinstance(message, dict):
        return Request(error=QMPError("QMP input must be a JSON object"))
    # An object ``id`` stays in the order it was read: QEMU's parser inserts the members
    # in that order and the encoder writes the QDict order from it.
    request = Request(id=message.get("id", NO_ID), message=message)
    request.oob = "exec-oob" in message and "execute" not in message
    return request


def check_request(request: Request, oob_enabled: bool) -> None:
    """QEMU's checks of a read request before dispatch: set its command or its error."""
    message = request.message
    if message is None:
        return
    request.message = None
    keys = list(message)
    if len(keys) > 1:
        keys = qdict_order(keys)
    exec_key: str | None = None
    for key in keys:
        value = message[key]
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                request.error = QMPError(f"QMP input member '{key}' must be a string")
                return
            if exec_key is not None:
                request.error = QMPError(f"QMP input member '{key}' clashes with '{exec_key}'")
                return
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                request.error = QMPError("QMP input member 'arguments' must be an object")
                return
        elif key == "id":
            continue
        else:
            request.error = QMPError(f"QMP input member '{key}' is unexpected")
            return
    if exec_key is None:
        request.error = QMPError("QMP input lacks member 'execute'")
        return
    request.command = message[exec_key]
    request.arguments = message.get("arguments", {})
