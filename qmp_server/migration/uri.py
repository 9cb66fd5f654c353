"""Migration URIs: parsing, connecting, listening.

``unix:PATH`` and ``tcp:HOST:PORT`` carry the two-way stream between a running source
and a running destination; ``exec:CMD`` and ``file:PATH[,offset=N]`` carry a one-way
stream that needs no live peer (see :mod:`.oneway`). ``fd:NAME`` is a descriptor the
client passed with ``getfd`` (or, for ``-incoming``, one inherited by number): a socket
carries the two-way stream, anything else (a pipe, a file) a one-way one.

Error texts are QEMU's (``migration/migration.c: migrate_uri_parse``,
``util/qemu-sockets.c``), so a management tool that matches on them keeps working.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import QMPError
from ..unixsocket import ListenError, SocketFile, bind_unix_file

#: Transports QEMU knows but a process without a guest cannot offer.
_UNSUPPORTED = ("rdma:", "vsock:")


@dataclass(frozen=True)
class UnixAddress:
    """``unix:PATH``."""

    path: str

    def __str__(self) -> str:
        return self.path

    def socket_address(self) -> dict[str, Any]:
        """QEMU's SocketAddress for query-migrate."""
        return {"path": self.path, "type": "unix"}


@dataclass(frozen=True)
class InetAddress:
    """``tcp:HOST:PORT`` (the port may be a service name, as in QEMU)."""

    host: str
    port: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def socket_address(self) -> dict[str, Any]:
        """QEMU's SocketAddress for query-migrate (the port is a string there)."""
        family = "ipv6" if ":" in self.host else "ipv4"
        return {"port": self.port, family: True, "host": self.host, "type": "inet"}


@dataclass(frozen=True)
class ExecAddress:
    """``exec:CMD``: the stream goes to the command's stdin (outgoing) or comes from its
    stdout (incoming); the command runs under ``/bin/sh -c`` as QEMU runs it."""

    command: str

    def __str__(self) -> str:
        return self.command


@dataclass(frozen=True)
class FileAddress:
    """``file:PATH[,offset=N]`` (QEMU 8.2+): the stream is written at, or read from,
    byte ``offset`` of a regular file."""

    path: str
    offset: int = 0

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class FdAddress:
    """``fd:NAME``: a descriptor named with ``getfd``, or a number (``-incoming fd:N``).
    ``fd`` is the descriptor once taken from the monitor (-1 before)."""

    name: str
    fd: int = -1

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class ConnectedSocket:
    """An ``fd:`` descriptor that is a connected stream socket: the two-way stream,
    already connected (``connect`` only hands it over). Held as a stream from the
    start, so that a migration cancelled before it is used still closes it."""

    stream: trio.SocketStream

    def __str__(self) -> str:
        return f"fd {self.stream.socket.fileno()}"


Address = UnixAddress | InetAddress | ExecAddress | FileAddress | FdAddress
ListenAddress = UnixAddress | InetAddress
SocketAddress = UnixAddress | InetAddress | ConnectedSocket
OneWayAddress = ExecAddress | FileAddress | FdAddress


def _parse_file(spec: str) -> FileAddress:
    # QEMU's file_parse_offset: the last ",offset=" suffix is a size (k/M/G suffixes too).
    path, sep, option = spec.rpartition(",offset=")
    if not sep:
        return FileAddress(spec)
    offset = _size(option)
    if offset is None:
        raise QMPError(f"file URI has bad offset {option}")
    return FileAddress(path, offset)


def _size(text: str) -> int | None:
    # qemu_strtosz's common forms: a decimal number with an optional binary suffix.
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    digits = text.rstrip("bBkKmMgGtT")
    suffix = text[len(digits):].lower()
    if not digits.isdigit() or suffix not in units:
        return None
    return int(digits) * units[suffix]


class ConnectError(Exception):
    """Connecting failed; the message is QEMU's error-desc for it."""


def _parse_inet(text: str) -> InetAddress:
    # QEMU's inet_parse: "[v6]:port", "host:port" or ":port", with optional ",opts".
    if text.startswith("["):
        close = text.find("]")
        if close < 1 or text[close + 1:close + 2] != ":" or close + 2 >= len(text):
            raise QMPError(f"error parsing IPv6 address '{text}'")
        host, rest = text[1:close], text[close + 2:]
    elif text.startswith(":"):
        host, rest = "", text[1:]
        if not rest or rest.startswith(","):
            raise QMPError(f"error parsing port in address '{text}'")
    else:
        host, sep, rest = text.partition(":")
        if not sep or not host or not rest or rest.startswith(","):
            raise QMPError(f"error parsing address '{text}'")
    port = rest.split(",", 1)[0]
    return InetAddress(host, port)


def parse_uri(uri: str) -> Address:
    """Parse a migration URI; raise QMPError with QEMU's text if it is not usable."""
    if uri.startswith("unix:"):
        path = uri[len("unix:"):]
        if not path:
            raise QMPError("invalid Unix socket address")
        return UnixAddress(path)
    if uri.startswith("tcp:"):
        return _parse_inet(uri[len("tcp:"):])
    if uri.startswith("exec:"):
        return ExecAddress(uri[len("exec:"):])
    if uri.startswith("file:"):
        return _parse_file(uri[len("file:"):])
    if uri.startswith("fd:"):
        return FdAddress(uri[len("fd:"):])
    for prefix in _UNSUPPORTED:
        if uri.startswith(prefix):
            raise QMPError(f"migration transport '{prefix[:-1]}' is not supported by qmp-server "
                           "(use 'unix:', 'tcp:', 'exec:', 'file:' or 'fd:')")
    raise QMPError(f"unknown migration protocol: {uri}")


async def connect(address: SocketAddress) -> trio.SocketStream:
    """Connect to a listening destination; raise ConnectError with QEMU's text."""
    if isinstance(address, ConnectedSocket):
        return address.stream
    if isinstance(address, UnixAddress):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(address.path)
        except OSError as err:
            sock.close()
            raise ConnectError(f"Failed to connect to '{address.path}': "
                               f"{os.strerror(err.errno or errno.EIO)}") from err
        return trio.SocketStream(sock)
    host = address.host or "localhost"
    try:
        infos = await trio.socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConnectError(f"address resolution failed for {host}:{address.port}: "
                           f"{err.strerror}") from err
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, kind, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as err:
            sock.close()
            last = err
            continue
        # trio.SocketStream sets TCP_NODELAY: each small frame leaves at once.
        return trio.SocketStream(sock)
    code = last.errno if last is not None and last.errno else errno.ECONNREFUSED
    raise ConnectError(f"Failed to connect to '{host}:{address.port}': {os.strerror(code)}")


def stream_socket(fd: int) -> trio.SocketStream:
    """A connected stream socket passed as a descriptor (``fd:``), as a Trio stream."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise ConnectError(f"Failed to use descriptor {fd}: {os.strerror(err.errno or errno.EIO)}") from err
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        raise ConnectError(f"Descriptor {fd} is not a stream socket")
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


@dataclass
class Listening:
    """A bound listening socket for an incoming migration."""

    listener: trio.SocketListener
    address: ListenAddress
    #: The UNIX socket file we created (removed again once we stop listening, and only if
    #: it is still the one we bound: someone may have put another socket in its place).
    socket_file: SocketFile | None = None

    def socket_address(self) -> dict[str, Any]:
        """What query-migrate reports under ``socket-address`` (the real port for tcp:…:0)."""
        if isinstance(self.address, InetAddress):
            host, port = self.listener.socket.getsockname()[:2]
            return InetAddress(self.address.host or str(host), str(port)).socket_address()
        return self.address.socket_address()

    def close(self) -> None:
        """Stop listening (QEMU takes exactly one connection) and remove the socket file."""
        self.listener.socket.close()
        if self.socket_file is not None:
            self.socket_file.remove()
            self.socket_file = None


def listen(address: ListenAddress) -> Listening:
    """Bind and listen now, so that errors reach the command (or the command line)."""
    if isinstance(address, UnixAddress):
        try:
            listener, socket_file = bind_unix_file(address.path)
        except ListenError as err:
            raise QMPError(str(err)) from err
        return Listening(listener, address, socket_file=socket_file)
    host = address.host
    try:
        port = int(address.port)
    except ValueError:
        try:
            port = socket.getservbyname(address.port, "tcp")
        except OSError as err:
            raise QMPError(f"Failed to parse port '{address.port}'") from err
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise QMPError(f"address resolution failed for {host}:{address.port}: {err.strerror}") from err
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(1)
        except OSError as err:
            sock.close()
            last = err
            continue
        return Listening(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), address)
    code = last.errno if last is not None and last.errno else errno.EADDRNOTAVAIL
    raise QMPError(f"Failed to bind socket: {os.strerror(code)}")
