"""A raw NBD client for tests that speak the protocol themselves (hostile clients,
byte-exact BLOCK_STATUS replies), shared by test_nbd and test_block_status."""

from __future__ import annotations

import socket
import struct

from qmp_server.nbd import protocol as nbd


def connect(sock: str, timeout: float = 10.0) -> socket.socket:
    """A socket connected to the NBD server at ``sock``; nothing read or sent yet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes; EOFError (with what came) if the server hangs up first."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


def handshake(s: socket.socket) -> None:
    """Read the fixed-newstyle greeting and answer with the client flags QEMU's client sends."""
    assert struct.unpack(">QQH", recv_exact(s, 18))[:2] == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))


def option(s: socket.socket, code: int, payload: bytes) -> list[tuple[int, bytes]]:
    """Send option ``code``; its replies as (type, payload), up to the ACK or an error."""
    s.sendall(struct.pack(">QII", nbd.IHAVEOPT, code, len(payload)) + payload)
    replies = []
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        replies.append((kind, recv_exact(s, length)))
        if kind == nbd.REP_ACK or kind & (1 << 31):
            return replies
