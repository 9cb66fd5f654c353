"""The protocol state of one QMP connection: bytes in, requests out; replies and events in, bytes out.

Like h11, a :class:`QMPSession` holds no socket and runs no task. The server feeds it
what the client sent (:meth:`~QMPSession.receive`), executes the requests it yields,
hands it their outcomes (:meth:`~QMPSession.reply`) and the machine's events
(:meth:`~QMPSession.event`), and writes whatever :meth:`~QMPSession.data_to_send`
returns, in that order. The session decides everything QMP decides:

- the greeting, queued when the session is made;
- negotiation: until ``qmp_capabilities`` succeeds only it runs, every other command is
  answered "Expecting capabilities negotiation with 'qmp_capabilities'", and no events
  are sent (:meth:`~QMPSession.begin`, :meth:`~QMPSession.negotiate`);
- the OOB policy: which requests run before further input is read and which wait in
  the in-band queue of :data:`INBAND_QUEUE_MAX` (:meth:`~QMPSession.runs_at_once`);
- the fast path: a chunk of input that is exactly one plain query, arriving when the
  general path would run it at once, is answered inside :meth:`~QMPSession.receive`
  (see :mod:`.fastpath`);
- the bytes: QEMU's encoding of every reply and event (:mod:`.encoding`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Final

from ..errors import CommandNotFound, QMPError
from ..version import version_info
from .encoding import encode, prettify
from .fastpath import FastPath
from .framing import JSONParseError, JSONStreamer
from .requests import Request, check_request, read_request

#: QEMU's in-band request queue per monitor (QMP_REQ_QUEUE_LEN_MAX): with OOB enabled,
#: input is not read further while this many in-band requests wait or run.
INBAND_QUEUE_MAX: Final = 8

#: What QEMU answers, in place of CommandNotFound's own text, before negotiation.
NEGOTIATION_HINT: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
#: ``qmp_capabilities`` once negotiation is over.
ALREADY_NEGOTIATED: Final = "Capabilities negotiation is already complete, command ignored"
#: The capabilities this server offers in its greeting and accepts in ``qmp_capabilities``.
CAPABILITIES: Final = ("oob",)


class Mode(enum.Enum):
    """Where the connection is in its life."""

    NEGOTIATION = "negotiation"
    COMMAND = "command"


def greeting() -> dict[str, Any]:
    """The greeting QEMU sends when a connection opens."""
    return {"QMP": {"version": version_info(), "capabilities": list(CAPABILITIES)}}


class QMPSession:
    """Protocol state of one connection: framing, negotiation, OOB policy, output bytes.

    ``queries``: side-effect-free, argument-free queries the session may answer itself
    (the fast path); each is called with no arguments and returns the result. The same
    commands must give the same result through the general path.
    """

    def __init__(self, queries: Mapping[str, Callable[[], Any]] | None = None, *,
                 pretty: bool = False) -> None:
        #: ``pretty=on`` (``-qmp-pretty``, ``-mon ...,pretty=on``): everything sent is
        #: pretty-printed (:func:`.encoding.prettify`) as it is handed out.
        self.pretty = pretty
        self._streamer = JSONStreamer()
        self.mode = Mode.NEGOTIATION
        self.oob_enabled = False
        self._fast = FastPath(queries) if queries else None
        # In-band requests handed to the queue and not answered yet (OOB enabled only).
        self._inband_pending = 0
        self._out: list[bytes] = [encode(greeting())]

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """The bytes produced since the last call, in order (empty if none)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return prettify(data) if self.pretty else data

    # ------------------------------------------------------------------- input

    def receive(self, data: bytes) -> list[Request]:
        """Feed bytes from the client; return the requests they completed, in order.

        A chunk that is exactly one plain query, arriving when nothing is pending before
        it, is answered here (its reply is in :meth:`data_to_send`) and yields nothing.
        """
        fast = self._fast
        if (fast is not None and self._inband_pending == 0 and self.mode is Mode.COMMAND
                and self._streamer.at_boundary()):
            # Nothing is ahead of this input, so answering it now is answering it in
            # order; the fast path takes only what the general path would run at once.
            try:
                reply = fast.answer(data)
            except Exception:
                # A failing query: the general path runs it again and reports the
                # failure as it does for any command.
                reply = None
            if reply is not None:
                self._out.append(reply)
                return []
        requests = []
        for item in self._streamer.feed(data):
            if isinstance(item, JSONParseError):
                requests.append(Request(error=QMPError(item.desc)))
            else:
                requests.append(read_request(item))
        return requests

    def between_messages(self) -> bool:
        """True when everything received so far was complete messages (nothing pending)."""
        return self._streamer.at_boundary()

    # --------------------------------------------------------------- execution

    def runs_at_once(self, request: Request) -> bool:
        """Whether ``request`` runs before any further input is read.

        Out-of-band requests do: QEMU dispatches them as soon as they are parsed, so they
        overtake queued in-band ones. So does every request while OOB is off: QEMU then
        reads no further input while a command runs. Otherwise the request waits in the
        in-band queue (of :data:`INBAND_QUEUE_MAX`) and counts as pending until its reply.
        """
        if request.oob or not self.oob_enabled:
            return True
        request.queued = True
        self._inband_pending += 1
        return False

    def begin(self, request: Request) -> bool:
        """``request`` is about to run: whether the server must dispatch it.

        False when the session answered it itself (the reply is in :meth:`data_to_send`):
        a request that fails QEMU's checks, or any command but ``qmp_capabilities``
        before negotiation. Checked when it runs, not when it was read, as QEMU does
        (QEMU reads no further input while an in-band command runs without OOB): what
        is read together with a ``qmp_capabilities`` is judged after it ran.
        """
        check_request(request, self.oob_enabled)
        if request.error is not None:
            self.reply(request, error=request.error)
            return False
        if self.mode is Mode.NEGOTIATION and request.command != "qmp_capabilities":
            self.reply(request, error=CommandNotFound(f"The command {request.command} has not been found"))
            return False
        return True

    def negotiate(self, enable: list[str]) -> None:
        """``qmp_capabilities`` with ``enable`` (checked against the schema): leave negotiation.

        Raises QEMU's CommandNotFound once negotiation is over.
        """
        if self.mode is Mode.COMMAND:
            raise CommandNotFound(ALREADY_NEGOTIATED)
        self.mode = Mode.COMMAND
        self.oob_enabled = "oob" in enable

    def reply(self, request: Request, result: Any = None, error: QMPError | None = None) -> None:
        """Queue the reply to ``request``: ``error`` if set, else ``result``.

        Before negotiation every CommandNotFound is answered with QEMU's hint instead.
        Raises (and changes nothing) if ``result`` cannot be encoded.
        """
        if error is not None and self.mode is Mode.NEGOTIATION and error.error_class == "CommandNotFound":
            error = CommandNotFound(NEGOTIATION_HINT)
        data = encode(request.response(result, error))
        if request.queued:
            request.queued = False
            self._inband_pending -= 1
        self._out.append(data)

    def event(self, message: dict[str, Any]) -> bool:
        """Queue an event for this client; False if it gets none (QEMU sends none before negotiation)."""
        if self.mode is not Mode.COMMAND:
            return False
        self._out.append(encode(message))
        return True
