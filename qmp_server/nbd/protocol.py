"""One NBD server connection without sockets: bytes in, events out, replies in, bytes out.

The protocol is NBD's fixed newstyle (the NBD project's doc/proto.md): the greeting, the
option haggling (``NBD_OPT_EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``, ``GO``,
``STRUCTURED_REPLY``, ``LIST_META_CONTEXT``, ``SET_META_CONTEXT`` with
``base:allocation``), then transmission. Everything the protocol alone can decide is
decided here, as QEMU's nbd/server.c decides it: malformed options get their error
replies, requests past the end of the export, with unknown flags or types, or writing a
read-only export get an error reply without ever reaching the block layer. What is left
for the service (:class:`Request`) is valid I/O on the export the client chose.

Memory is bounded: option payloads are limited (longer ones are skipped, not buffered),
a request's payload may not exceed :data:`MAX_BUFFER_SIZE` (QEMU's
NBD_MAX_BUFFER_SIZE; a longer write ends the connection, since its payload cannot be
skipped safely), so the input buffer never holds more than one request and a read chunk.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

#: QEMU's NBD_MAX_BUFFER_SIZE: the longest read or write a request may ask for.
MAX_BUFFER_SIZE = 32 << 20
#: QEMU's NBD_MAX_STRING_SIZE: export names and descriptions.
MAX_STRING_SIZE = 4096
#: The longest option payload we buffer (names, info requests, meta-context queries).
MAX_OPTION_SIZE = 64 << 10

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_TOO_BIG = (1 << 31) + 9

# NBD_OPT_INFO/GO information types.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply chunks.
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

#: The one metadata context served, and its id (QEMU's NBD_META_ID_BASE_ALLOCATION).
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 0
#: base:allocation's flags: not allocated (reading may be slow to tell zeroes), reads
#: as zeroes.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
#: QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS: at most 1 MiB of extents in one reply.
MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8
_UINT32_MAX = (1 << 32) - 1

class ExtentArray:
    """The extents of one block-status reply (QEMU's NBDExtentArray).

    Adjacent extents with the same flags are merged while the sum fits 32 bits; once
    ``capacity`` extents are held, :meth:`add` refuses and the reply ends there (a
    client asking with NBD_CMD_FLAG_REQ_ONE gets a capacity of one).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.extents: list[tuple[int, int]] = []

    def add(self, length: int, flags: int) -> bool:
        """Append ``length`` bytes with ``flags``; False (nothing added) when full."""
        if not length:
            return True
        if self.extents and self.extents[-1][1] == flags:
            merged = self.extents[-1][0] + length
            if merged <= _UINT32_MAX:
                self.extents[-1] = (merged, flags)
                return True
        if len(self.extents) >= self.capacity:
            return False
        self.extents.append((length, flags))
        return True


#: The flags each command accepts (anything else: EINVAL, as nbd_co_receive_request).
_VALID_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}
_WRITING = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})

#: Errors on the wire are NBD's values, which are Linux's for these; others are EINVAL
#: (QEMU's system_errno_to_nbd_errno; EROFS is EPERM, EDQUOT and EFBIG are ENOSPC).
_WIRE_ERRNO = {errno.EPERM: 1, errno.EROFS: 1, errno.EIO: 5, errno.ENOMEM: 12, errno.EINVAL: 22,
               errno.ENOSPC: 28, errno.EDQUOT: 28, errno.EFBIG: 28, errno.EOVERFLOW: 75,
               errno.ENOTSUP: 95, errno.ESHUTDOWN: 108}


def wire_errno(code: int) -> int:
    """The NBD error value for the system error ``code``."""
    return _WIRE_ERRNO.get(code, 22)


@dataclass(frozen=True)
class ExportInfo:
    """What the protocol needs to know of an export."""

    name: str
    description: str
    size: int
    #: Transmission flags (NBD_FLAG_SEND_DF is added per connection).
    flags: int
    #: Minimum block size announced (QEMU: the node's request alignment).
    min_block: int = 1

    @property
    def read_only(self) -> bool:
        """The export refuses writes."""
        return bool(self.flags & FLAG_READ_ONLY)


@dataclass(frozen=True)
class Selected:
    """Negotiation chose ``export``: transmission starts."""

    export: ExportInfo


@dataclass(frozen=True)
class Request:
    """A valid request on the selected export; the service answers it with one of the
    connection's ``reply_*`` methods."""

    command: int
    handle: int
    offset: int
    length: int
    flags: int
    data: bytes = b""


@dataclass(frozen=True)
class Closed:
    """The connection ends (after what :meth:`Connection.data_to_send` still holds)."""

    reason: str


Event = Selected | Request | Closed

_HANDSHAKE, _OPTIONS, _TRANSMISSION, _CLOSED = range(4)


@dataclass
class _Pending:
    """A request header whose write payload is still arriving."""

    header: tuple[int, int, int, int, int]
    data: bytearray = field(default_factory=bytearray)


class Connection:
    """The server side of one NBD connection.

    ``find`` looks an export up by name (None: no such export); ``listing`` gives every
    export for NBD_OPT_LIST. Feed :meth:`receive_data`, take :meth:`next_event` until it
    returns None, write :meth:`data_to_send`.
    """

    def __init__(self, find: Callable[[str], ExportInfo | None],
                 listing: Callable[[], list[ExportInfo]]) -> None:
        self._find = find
        self._listing = listing
        self._in = bytearray()
        self._out = bytearray()
        self._state = _HANDSHAKE
        self._skip = 0
        self._skipped_option: tuple[int, int] | None = None
        self._no_zeroes = False
        self.structured = False
        #: The export SET_META_CONTEXT selected base:allocation for (its name), if any.
        self._meta_export: str | None = None
        self.export: ExportInfo | None = None
        self._block_status = False
        self._pending: _Pending | None = None
        # The greeting: NBDMAGIC, IHAVEOPT, the handshake flags.
        self._out += struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    # Bytes -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes the client sent (``b""``: it closed its side)."""
        if not data:
            if self._state != _CLOSED:
                self._eof = True
            return
        if self._state == _CLOSED:
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._in += data

    _eof = False

    def data_to_send(self) -> bytes:
        """The bytes to write to the client now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        """The connection is over."""
        return self._state == _CLOSED

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    def _close(self, reason: str) -> Closed:
        self._state = _CLOSED
        self._in.clear()
        return Closed(reason)

    # Events ------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        while True:  # every pass consumes input, or returns
            if self._state == _CLOSED:
                return None
            if self._skip:
                break
            if self._skipped_option is not None:
                option, code = self._skipped_option
                self._skipped_option = None
                self._option_reply(option, code, _unsupported_text(option) if code == REP_ERR_UNSUP
                                   else "option too long")
                continue
            if self._state == _HANDSHAKE:
                event = self._client_flags()
            elif self._state == _OPTIONS:
                event = self._option()
            else:
                event = self._request()
            if event is _MORE:
                break
            if event is not None:
                return event  # type: ignore[return-value]
        if self._eof and self._state != _CLOSED:
            return self._close("client closed the connection")
        return None

    def _client_flags(self) -> object:
        raw = self._take(4)
        if raw is None:
            return _MORE
        (flags,) = struct.unpack(">I", raw)
        if flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) or not flags & FLAG_FIXED_NEWSTYLE:
            # QEMU: "Unknown client flags" / old style clients are not served
            return self._close(f"Unknown client flags 0x{flags:x} received")
        self._no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self._state = _OPTIONS
        return None

    def _option_reply(self, option: int, kind: int, text: str = "", data: bytes = b"") -> None:
        payload = data or text.encode()
        self._out += struct.pack(">QIII", OPTION_REPLY_MAGIC, option, kind, len(payload)) + payload

    def _option(self) -> object:
        if len(self._in) < 16:
            return _MORE
        magic, option, length = struct.unpack(">QII", self._in[:16])
        if magic != IHAVEOPT:
            return self._close("Bad option magic")
        known = option in (OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO,
                           OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT,
                           OPT_STARTTLS)
        if not known or length > MAX_OPTION_SIZE:
            # nbd_opt_drop: the payload is read and thrown away, then the error reply
            del self._in[:16]
            dropped = min(length, len(self._in))
            del self._in[:dropped]
            self._skip = length - dropped
            if option == OPT_EXPORT_NAME:
                return self._close("export name too long")
            self._skipped_option = (option, REP_ERR_UNSUP if not known else REP_ERR_TOO_BIG)
            return None
        if len(self._in) < 16 + length:
            return _MORE
        payload = bytes(self._in[16:16 + length])
        del self._in[:16 + length]
        return self._handle_option(option, payload)

    def _handle_option(self, option: int, payload: bytes) -> object:
        if option == OPT_EXPORT_NAME:
            export = self._find(payload.decode(errors="replace"))
            if export is None:
                return self._close("export not found")
            flags = self._transmission_flags(export)
            self._out += struct.pack(">QH", export.size, flags)
            if not self._no_zeroes:
                self._out += bytes(124)
            return self._select(export)
        if option == OPT_ABORT:
            self._option_reply(option, REP_ACK)
            return self._close("client aborted")
        if option == OPT_STARTTLS:
            self._option_reply(option, REP_ERR_POLICY, "TLS not configured")
            return None
        if option == OPT_LIST:
            if payload:
                self._option_reply(option, REP_ERR_INVALID, "no argument expected for option")
                return None
            for export in self._listing():
                name, desc = export.name.encode(), export.description.encode()
                self._option_reply(option, REP_SERVER, data=struct.pack(">I", len(name)) + name + desc)
            self._option_reply(option, REP_ACK)
            return None
        if option == OPT_STRUCTURED_REPLY:
            if payload:
                self._option_reply(option, REP_ERR_INVALID, "no argument expected for option")
            elif self.structured:
                self._option_reply(option, REP_ERR_INVALID, "structured reply already negotiated")
            else:
                self.structured = True
                self._option_reply(option, REP_ACK)
            return None
        if option in (OPT_INFO, OPT_GO):
            return self._info(option, payload)
        return self._meta_context(option, payload)

    def _transmission_flags(self, export: ExportInfo) -> int:
        return export.flags | (FLAG_SEND_DF if self.structured else 0)

    def _select(self, export: ExportInfo) -> Selected:
        self.export = export
        self._block_status = self._meta_export == export.name
        self._state = _TRANSMISSION
        return Selected(export)

    def _info(self, option: int, payload: bytes) -> object:
        # nbd_negotiate_handle_info: name length, name, count of info requests, requests.
        if len(payload) < 6:
            self._option_reply(option, REP_ERR_INVALID, "request data too short")
            return None
        (name_len,) = struct.unpack(">I", payload[:4])
        if name_len > MAX_STRING_SIZE or 4 + name_len + 2 > len(payload):
            self._option_reply(option, REP_ERR_INVALID, "name length is incorrect")
            return None
        name = payload[4:4 + name_len].decode(errors="replace")
        (count,) = struct.unpack(">H", payload[4 + name_len:6 + name_len])
        rest = payload[6 + name_len:]
        if len(rest) != 2 * count:
            self._option_reply(option, REP_ERR_INVALID, "request data has incorrect length")
            return None
        wanted = set(struct.unpack(f">{count}H", rest))
        export = self._find(name)
        if export is None:
            self._option_reply(option, REP_ERR_UNKNOWN, f"export '{name}' not present")
            return None
        if INFO_NAME in wanted:
            self._option_reply(option, REP_INFO, data=struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in wanted and export.description:
            self._option_reply(option, REP_INFO,
                               data=struct.pack(">H", INFO_DESCRIPTION) + export.description.encode())
        # Always sent; the minimum is 1 unless the client said it honours block sizes
        # (or only asks, NBD_OPT_INFO), as QEMU.
        minimum = export.min_block if option == OPT_INFO or INFO_BLOCK_SIZE in wanted else 1
        self._option_reply(option, REP_INFO, data=struct.pack(
            ">HIII", INFO_BLOCK_SIZE, minimum, max(4096, minimum), MAX_BUFFER_SIZE))
        self._option_reply(option, REP_INFO, data=struct.pack(
            ">HQH", INFO_EXPORT, export.size, self._transmission_flags(export)))
        self._option_reply(option, REP_ACK)
        if option == OPT_GO:
            return self._select(export)
        return None

    def _meta_context(self, option: int, payload: bytes) -> object:
        # nbd_negotiate_meta_queries
        if option == OPT_SET_META_CONTEXT and not self.structured:
            self._option_reply(option, REP_ERR_INVALID,
                               "request option 'NBD_OPT_SET_META_CONTEXT' when structured reply "
                               "is not negotiated")
            return None
        queries: list[str] = []
        try:
            (name_len,) = struct.unpack(">I", payload[:4])
            if name_len > MAX_STRING_SIZE:
                raise ValueError
            name = payload[4:4 + name_len].decode(errors="replace")
            pos = 4 + name_len
            (count,) = struct.unpack(">I", payload[pos:pos + 4])
            pos += 4
            for _ in range(min(count, len(payload))):  # each query takes 4+ bytes
                (qlen,) = struct.unpack(">I", payload[pos:pos + 4])
                if pos + 4 + qlen > len(payload):
                    raise ValueError
                queries.append(payload[pos + 4:pos + 4 + qlen].decode(errors="replace"))
                pos += 4 + qlen
            if len(queries) != count or pos != len(payload):
                raise ValueError
        except (struct.error, ValueError):
            self._option_reply(option, REP_ERR_INVALID, "invalid meta context request")
            return None
        if self._find(name) is None:
            self._option_reply(option, REP_ERR_UNKNOWN, f"export '{name}' not present")
            return None
        if option == OPT_LIST_META_CONTEXT and not queries:
            matched = True
        else:
            matched = any(q == BASE_ALLOCATION or (option == OPT_LIST_META_CONTEXT and q == "base:")
                          for q in queries)
        if matched:
            self._option_reply(option, REP_META_CONTEXT,
                               data=struct.pack(">I", BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        if option == OPT_SET_META_CONTEXT:
            self._meta_export = name if matched else None
        self._option_reply(option, REP_ACK)
        return None

    # Transmission ------------------------------------------------------------------

    def _request(self) -> object:
        if self._pending is not None:
            return self._payload()
        if len(self._in) < 28:
            return _MORE
        magic, flags, command, handle, offset, length = struct.unpack(">IHHQQI", self._in[:28])
        del self._in[:28]
        if magic != REQUEST_MAGIC:
            return self._close(f"invalid magic (got 0x{magic:x})")
        if command == CMD_DISC:
            return self._close("client requested disconnect")
        if command == CMD_WRITE:
            if length > MAX_BUFFER_SIZE:
                # The payload cannot be skipped safely: QEMU ends the connection too.
                return self._close(f"len ({length}) is larger than max len ({MAX_BUFFER_SIZE})")
            self._pending = _Pending((flags, command, handle, offset, length))
            return self._payload()
        return self._check((flags, command, handle, offset, length), b"")

    def _payload(self) -> object:
        assert self._pending is not None
        flags, command, handle, offset, length = self._pending.header
        if len(self._in) < length:
            return _MORE
        data = bytes(self._in[:length])
        del self._in[:length]
        self._pending = None
        return self._check((flags, command, handle, offset, length), data)

    def _check(self, header: tuple[int, int, int, int, int], data: bytes) -> Request | None:
        # nbd_co_receive_request's checks, in its order; a failed one is answered here.
        flags, command, handle, offset, length = header
        export = self.export
        assert export is not None
        if command not in _VALID_FLAGS:
            self._error(handle, errno.EINVAL, f"unsupported command {command}")
            return None
        if command == CMD_READ and length > MAX_BUFFER_SIZE:
            self._error(handle, errno.EINVAL,
                        f"len ({length}) is larger than max len ({MAX_BUFFER_SIZE})")
            return None
        if command in _WRITING and export.read_only:
            self._error(handle, errno.EPERM, "Export is read-only")
            return None
        if command != CMD_FLUSH and (offset > export.size or length > export.size - offset):
            self._error(handle, errno.EINVAL, "operation past EOF")
            return None
        if flags & ~_VALID_FLAGS[command]:
            self._error(handle, errno.EINVAL, f"unsupported flags 0x{flags:x}")
            return None
        if command == CMD_BLOCK_STATUS and not self._block_status:
            self._error(handle, errno.EINVAL, "CMD_BLOCK_STATUS not negotiated")
            return None
        return Request(command, handle, offset, length, flags, data)

    # Replies -----------------------------------------------------------------------

    def _chunk(self, handle: int, kind: int, payload: bytes) -> None:
        self._out += struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, kind, handle,
                                 len(payload)) + payload

    def _error(self, handle: int, code: int, message: str) -> None:
        if self.structured:
            text = message.encode()[:4096]
            self._chunk(handle, REPLY_TYPE_ERROR, struct.pack(">IH", wire_errno(code), len(text)) + text)
        else:
            self._out += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, wire_errno(code), handle)

    def reply_error(self, request: Request, code: int, message: str = "") -> None:
        """``request`` failed with the system error ``code``."""
        self._error(request.handle, code, message)

    def reply_done(self, request: Request) -> None:
        """``request`` (not a read) succeeded."""
        if self.structured:
            self._chunk(request.handle, REPLY_TYPE_NONE, b"")
        else:
            self._out += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, request.handle)

    def reply_read(self, request: Request, data: bytes) -> None:
        """A read's data."""
        if self.structured:
            self._chunk(request.handle, REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", request.offset) + data)
        else:
            self._out += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, request.handle) + data

    def reply_block_status(self, request: Request, extents: list[tuple[int, int]]) -> None:
        """``base:allocation`` extents: (length, flags) from the request's offset on (see
        :class:`ExtentArray` for how many)."""
        payload = struct.pack(">I", BASE_ALLOCATION_ID) + b"".join(
            struct.pack(">II", length, flags) for length, flags in extents)
        self._chunk(request.handle, REPLY_TYPE_BLOCK_STATUS, payload)


#: next_event's marker for "need more bytes".
_MORE = object()


def _unsupported_text(option: int) -> str:
    return f"Unsupported option {option}"
