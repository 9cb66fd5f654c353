"""The migration stream between two qmp-server processes: our own small, versioned format.

Both sides start with a header, then exchange frames::

    header = MAGIC (8 bytes) | version (u16, big endian)
    frame  = kind (1 ASCII byte) | length (u32, big endian) | payload (``length`` bytes of
             UTF-8 JSON, always an object)

The header and the ``F`` frame are frozen across versions, so that peers of different
versions can always refuse each other with a readable error. The other frames are frozen
too: a later need gets a new frame kind, which only the peers that use it send. ``B`` was
added that way: it travels only with the ``dirty-bitmaps`` capability, so servers that
predate it still migrate to each other without it (and refuse it readably: ``unknown
frame type``). Frames, in the order they travel:

==== ========= ========================================================================
kind direction payload
==== ========= ========================================================================
C    src->dst  ``{"nodes": [{"node-name", "driver", "filename", "virtual-size"}, ...]}``:
               the block configuration the source expects the destination to have
A    dst->src  ``{}``: configuration accepted (nothing has been handed over yet)
B    src->dst  one dirty bitmap (see :mod:`.bitmaps`), zero or more, after
               ``A`` and before ``G``
G    src->dst  ``{"runstate": str, "running": bool}``: QEMU's "global state", i.e. the
               run state the source had when it stopped and whether it was live
E    src->dst  ``{}``: end marker, sent only after the source inactivated its nodes
K    dst->src  ``{"runstate": str, "running": bool}``: acknowledgement, sent after the
               destination activated and started, or decided to stay paused
F    either    ``{"error": str}``: the sender gives up; ``error`` is its error-desc
==== ========= ========================================================================

This module is sans-I/O (:class:`Decoder`, :func:`encode_header`, :func:`encode_frame`)
plus a thin Trio adapter (:class:`Channel`).
"""

from __future__ import annotations

import enum
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import trio

MAGIC = b"QMPSMIG\n"
VERSION = 1
#: Versions this implementation can speak.
SUPPORTED_VERSIONS = frozenset({VERSION})
#: Frames carry a few kilobytes at most; anything larger is a corrupt or foreign stream.
MAX_PAYLOAD = 16 << 20

_HEADER = struct.Struct(">8sH")
_FRAME = struct.Struct(">cI")


class FrameKind(enum.Enum):
    """The frame types (see the module docstring)."""

    CONFIG = b"C"
    ACCEPT = b"A"
    BITMAP = b"B"
    GLOBAL = b"G"
    END = b"E"
    ACK = b"K"
    FAIL = b"F"


class StreamError(Exception):
    """The peer sent something that is not a valid stream, or the connection broke.

    The message is meant for ``error-desc``.
    """


class StreamClosed(StreamError):
    """The peer closed the connection cleanly between two frames."""


class PeerFailed(StreamError):
    """The peer sent an ``F`` frame; the message is the peer's own error text."""


@dataclass(frozen=True)
class Header:
    """The peer's header."""

    version: int


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    kind: FrameKind
    payload: dict[str, Any]


def encode_header(version: int = VERSION) -> bytes:
    """The header this side sends first."""
    return _HEADER.pack(MAGIC, version)


def encode_frame(kind: FrameKind, payload: dict[str, Any] | None = None) -> bytes:
    """One frame, ready to send."""
    body = json.dumps(payload if payload is not None else {}, separators=(",", ":")).encode()
    return _FRAME.pack(kind.value, len(body)) + body


class Decoder:
    """Turns received bytes into a :class:`Header`, then :class:`Frame` objects.

    Feed bytes with :meth:`feed`; :meth:`next` returns the next complete item or None.
    Protocol violations raise :class:`StreamError` as early as they can be seen (a wrong
    magic is reported on its first wrong byte, not after waiting for more input).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header_seen = False
        self._eof = False

    def feed(self, data: bytes | bytearray) -> None:
        """Add received bytes; ``b""`` means the peer closed the connection."""
        if not data:
            self._eof = True
        self._buffer += data

    def next(self) -> Header | Frame | None:
        """The next complete item; None if more bytes are needed.

        After end of stream, raises StreamError instead of returning None.
        """
        item = self._header() if not self._header_seen else self._frame()
        if item is None and self._eof:
            if self._buffer:
                raise StreamError("Migration stream truncated")
            raise StreamClosed("The peer closed the migration stream")
        return item

    def _header(self) -> Header | None:
        prefix = bytes(self._buffer[:len(MAGIC)])
        if not MAGIC.startswith(prefix):
            raise StreamError("Not a qmp-server migration stream (bad magic)")
        if len(self._buffer) < _HEADER.size:
            return None
        _, version = _HEADER.unpack_from(self._buffer)
        del self._buffer[:_HEADER.size]
        self._header_seen = True
        return Header(version)

    def _frame(self) -> Frame | None:
        if len(self._buffer) < _FRAME.size:
            return None
        raw_kind, length = _FRAME.unpack_from(self._buffer)
        try:
            kind = FrameKind(raw_kind)
        except ValueError:
            raise StreamError(f"Migration stream corrupt: unknown frame type {raw_kind!r}") from None
        if length > MAX_PAYLOAD:
            raise StreamError(f"Migration stream corrupt: frame of {length} bytes")
        end = _FRAME.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_FRAME.size:end])
        del self._buffer[:end]
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StreamError(f"Migration stream corrupt: bad '{kind.value.decode()}' frame") from None
        if not isinstance(payload, dict):
            raise StreamError(f"Migration stream corrupt: bad '{kind.value.decode()}' frame")
        return Frame(kind, payload)


def _io_error(action: str, err: BaseException) -> StreamError:
    code = getattr(err, "errno", None)
    if isinstance(err, OSError) and code:
        return StreamError(f"Unable to {action} socket: {os.strerror(code)}")
    cause = err.__cause__
    if isinstance(cause, OSError) and cause.errno:
        return StreamError(f"Unable to {action} socket: {os.strerror(cause.errno)}")
    return StreamError(f"Unable to {action} socket: Connection reset by peer")


class Channel:
    """A migration stream over a Trio stream: header handshake, frames, byte counts."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = Decoder()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, *chunks: bytes) -> None:
        """Send encoded header/frames in one write; StreamError if the peer is gone."""
        data = b"".join(chunks)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
            # A peer that gave up usually said why before hanging up: prefer its reason.
            await self._pending_failure()
            raise _io_error("write to", err) from err
        self.bytes_sent += len(data)

    async def _pending_failure(self) -> None:
        """Raise PeerFailed if an ``F`` frame is waiting to be read; else return."""
        with trio.move_on_after(0.1):
            while True:
                try:
                    item = self.decoder.next()
                except StreamError:
                    return
                if item is None:
                    try:
                        data = await self.stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        return
                    self.decoder.feed(data)
                    continue
                if isinstance(item, Frame) and item.kind is FrameKind.FAIL:
                    error = item.payload.get("error")
                    raise PeerFailed(error if isinstance(error, str) else "The peer failed the migration")

    async def _next(self) -> Header | Frame:
        while True:
            item = self.decoder.next()
            if item is not None:
                return item
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                raise _io_error("read from", err) from err
            self.bytes_received += len(data)
            self.decoder.feed(data)

    async def receive_header(self) -> int:
        """The peer's protocol version."""
        item = await self._next()
        assert isinstance(item, Header)
        return item.version

    async def receive(self, *expected: FrameKind) -> Frame:
        """The next frame, which must be one of ``expected`` (an ``F`` raises PeerFailed)."""
        item = await self._next()
        assert isinstance(item, Frame)
        if item.kind is FrameKind.FAIL:
            error = item.payload.get("error")
            raise PeerFailed(error if isinstance(error, str) else "The peer failed the migration")
        if item.kind not in expected:
            names = "/".join(k.value.decode() for k in expected)
            raise StreamError(f"Migration stream corrupt: expected a '{names}' frame, "
                              f"got '{item.kind.value.decode()}'")
        return item

    async def aclose(self) -> None:
        """Close without waiting for the peer."""
        await trio.aclose_forcefully(self.stream)
