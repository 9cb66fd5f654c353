"""HMP on a character device (``-monitor stdio``, ``-mon chardev=X,mode=readline``).

What the other end sees is what QEMU's readline monitor writes: a banner, the
``(qemu) `` prompt, every typed character echoed the way readline redraws its line
(``readline_show_prompt``/``readline_update``: back to the start of the line with
``ESC[D``, the line so far, ``ESC[K``), CRLF line ends, then the command's output.
"""

from __future__ import annotations

import trio

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


async def serve_terminal(monitor: HumanMonitor, stream: trio.abc.Stream) -> None:
    """Run HMP command lines read from ``stream`` until it ends."""
    try:
        await stream.send_all(banner() + PROMPT)
        pending = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                line = line.removesuffix(b"\r")
                # QEMU's readline has echoed the line by the time the command runs, so
                # what the command prints on stdout (qemu-io) comes after the echo.
                await stream.send_all(echo(line) + b"\r\n")
                output = await monitor.execute(line.decode("utf-8", errors="replace"))
                if monitor.vm.exit_requested.is_set():
                    # quit: QEMU is gone before its monitor could show another prompt.
                    await stream.send_all(output.encode())
                    return
                await stream.send_all(output.encode() + PROMPT)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return
