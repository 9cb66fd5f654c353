"""The qtest protocol (``-qtest``), as far as a machine without a guest can answer it.

QEMU's test harnesses (``QEMUQtestMachine``) open a qtest channel beside the monitor and
wait for the emulator to connect to it. Its commands read and write guest memory and
I/O ports, step the virtual clock, and so on (QEMU's qtest_process_command). There is no
guest here: every command gets QEMU's answer to a command it cannot run, ``FAIL`` with a
reason, so a harness that only opens the channel works and one that needs a guest fails
loudly instead of hanging.
"""

from __future__ import annotations

import trio


def answer(line: bytes) -> bytes:
    """The reply to one qtest command line."""
    words = line.decode("utf-8", errors="replace").split()
    if not words:
        return b""
    return f"FAIL Unknown command '{words[0]}'\n".encode()


async def serve_qtest(stream: trio.abc.Stream) -> None:
    """Answer qtest command lines from ``stream`` until it ends."""
    pending = b""
    async with stream:
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                pending += data
                replies = b""
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    replies += answer(line)
                if replies:
                    await stream.send_all(replies)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
