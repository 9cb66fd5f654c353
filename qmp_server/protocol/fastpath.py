"""The session's shortcut: answering the commonest requests straight from their bytes.

Management tools poll: most of what they send is ``{"execute": "query-status", "id":
"tool-42"}`` and its like. For those the general path (QEMU-exact lexer and parser,
QEMU's member checks, schema validation, dispatch, encoding) is most of the server's
time per request, and on a VM whose idle CPUs are slow to wake, every microsecond a
reply takes makes the client's own wake-up dearer. So a read that holds exactly one
request of a strict shape is answered here, with the bytes the general path would
write:

- the object has ``execute`` naming a plain query the session was given (no arguments,
  no side effects: :meth:`~qmp_server.dispatcher.CommandTable.query`), and optionally ``id``, in
  either order, nothing else, with JSON whitespace anywhere between tokens;
- ``id`` is a string of printable ASCII without ``"`` or backslash, an integer of at
  most 18 digits, or ``true``/``false``/``null``: values that QEMU (and the general path)
  echo exactly as they were written, so the reply can splice the client's bytes.

Anything else (other members, escapes, floats, single quotes, a request split over two
reads or two requests in one read) returns None and takes the general path. The
session asks only when the general path would run the request at once and nothing is
pending before it (:meth:`~qmp_server.protocol.session.QMPSession.receive`). The test
suite checks that both paths give the same bytes for generated requests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .encoding import encode_text

_WS = rb"[ \t\r\n]*"
_NAME = rb'"([a-z][a-z0-9-]{0,63})"'
_ID = rb'("[ !#-\[\]-~]*"|0|-?[1-9][0-9]{0,17}|true|false|null)'
_EXECUTE = rb'"execute"' + _WS + rb":" + _WS + _NAME
_IDENT = rb'"id"' + _WS + rb":" + _WS + _ID
_COMMA = _WS + rb"," + _WS
# Groups: 1 name, 2 id (execute first); 3 id, 4 name (id first).
_REQUEST = re.compile(
    _WS + rb"\{" + _WS
    + rb"(?:" + _EXECUTE + rb"(?:" + _COMMA + _IDENT + rb")?"
    + rb"|" + _IDENT + _COMMA + _EXECUTE + rb")"
    + _WS + rb"\}" + _WS + rb"\Z"
)


class FastPath:
    """Replies to plain queries straight from the bytes a client sent."""

    def __init__(self, queries: Mapping[str, Callable[[], Any]]) -> None:
        self._queries = {name.encode("ascii"): query for name, query in queries.items()}

    def answer(self, data: bytes | bytearray) -> bytes | None:
        """The reply line if ``data`` is exactly one plain query of the strict shape, else None.

        A query that raises raises here; the session then leaves the request to the general
        path, which runs it again and reports the failure as it does for any command.
        """
        match = _REQUEST.match(data)
        if match is None:
            return None
        name, ident = match.group(1, 2)
        if name is None:
            ident, name = match.group(3, 4)
        query = self._queries.get(name)
        if query is None:
            return None
        result = query()
        body = b"{}" if result is None else encode_text(result).encode("ascii")
        if ident is None:
            return b'{"return": ' + body + b"}\r\n"
        return b'{"return": ' + body + b', "id": ' + ident + b"}\r\n"
