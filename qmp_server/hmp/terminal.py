"""HMP on a character device (``-monitor stdio``, ``-mon chardev=X,mode=readline``).

What the other end sees is what QEMU's readline monitor writes: a banner, the
``(qemu) `` prompt, every typed character echoed the way readline redraws its line
(``readline_show_prompt``/``readline_update``: back to the start of the line with
``ESC[D``, the line so far, ``ESC[K``), CRLF line ends, then the command's output.
"""

from __future__ import annotations

import os
import socket

import trio

from ..fdsets import MonitorFds, descriptors_in, set_current
from ..version import version_string
from .monitor import HumanMonitor

PROMPT = b"(qemu) "


def banner() -> bytes:
    """QEMU's first line on an HMP monitor (monitor_qmp... ``QEMU X.Y.Z monitor``)."""
    return f"QEMU {version_string()} monitor - type 'help' for more information\r\n".encode()


def echo(line: bytes) -> bytes:
    """The bytes QEMU's readline writes while ``line`` is typed, one character at a time."""
    out = bytearray()
    for typed in range(1, len(line) + 1):
        out += b"\x1b[D" * (typed - 1) + line[:typed] + b"\x1b[K"
    return bytes(out)


# Room for the descriptors one read may carry (QEMU's socket chardev: TCP_MAX_FDS).
_ANCILLARY = socket.CMSG_SPACE(16 * 4)


async def _receive(stream: trio.abc.Stream, fds: MonitorFds | None) -> bytes:
    """The next input; on a UNIX socket with the descriptors that came with it, which
    replace those still unclaimed (QEMU's tcp_chr_recv)."""
    if fds is None or not isinstance(stream, trio.SocketStream):
        return bytes(await stream.receive_some(65536))
    data, ancillary, _, _ = await stream.socket.recvmsg(65536, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
    received = descriptors_in(ancillary)
    for fd in received:
        os.set_blocking(fd, True)  # QEMU clears O_NONBLOCK on what it receives
    fds.receive(received)
    return data


async def serve_terminal(monitor: HumanMonitor, stream: trio.abc.Stream,
                         named: dict[str, int] | None = None) -> None:
    """Run HMP command lines read from ``stream`` until it ends.

    On a UNIX socket the client may pass descriptors (SCM_RIGHTS) for ``getfd``; they
    are named in ``named``, the monitor's names, which outlive one client as in QEMU.
    What the client sent and nobody claimed is closed when it goes.
    """
    fds: MonitorFds | None = None
    if isinstance(stream, trio.SocketStream) and stream.socket.family == socket.AF_UNIX:
        fds = MonitorFds(named)
        # HMP's migrate fd:NAME finds this monitor's names (monitor_get_fd).
        set_current(fds)
    try:
        await _serve(monitor, stream, fds)
    finally:
        if fds is not None:
            fds.close_received()


async def _serve(monitor: HumanMonitor, stream: trio.abc.Stream, fds: MonitorFds | None) -> None:
    try:
        await stream.send_all(banner() + PROMPT)
        pending = b""
        while True:
            data = await _receive(stream, fds)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                line = line.removesuffix(b"\r")
                # QEMU's readline has echoed the line by the time the command runs, so
                # what the command prints on stdout (qemu-io) comes after the echo.
                await stream.send_all(echo(line) + b"\r\n")
                output = await monitor.execute(line.decode("utf-8", errors="replace"), fds)
                if monitor.vm.exit_requested.is_set():
                    # quit: QEMU is gone before its monitor could show another prompt.
                    await stream.send_all(output.encode())
                    return
                await stream.send_all(output.encode() + PROMPT)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
