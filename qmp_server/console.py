"""The process's own stdout and stderr, as QEMU's ``printf()`` and ``fprintf(stderr)`` reach
them.

QEMU's HMP ``qemu-io`` prints qemu-io's results on the process's stdout and its usage
errors on stderr, not on the monitor (hmp_qemu_io -> qemuio_command; QEMU 7.2 to 10.x).
Users (QEMU's iotests among them) read them there, interleaved with what monitors on
stdio (``-qmp stdio``, ``-monitor stdio``) wrote before: QEMU, being one thread, has
written a monitor's earlier replies and events by the time ``printf`` runs. Here a
monitor's output may still sit in its queue, so the monitors that write to stdio register
a wait for their queue to drain (:meth:`ProcessConsole.shares_stdio`), and the console
runs those waits first.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

__all__ = ["STDERR", "STDOUT", "ProcessConsole"]

STDOUT = 1
STDERR = 2


def _write_all(fd: int, data: bytes) -> None:
    # A monitor on stdio makes the shared file description non-blocking (Trio's FdStream
    # sets O_NONBLOCK on it): wait for room rather than lose the text or fail.
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()
            continue
        except OSError:
            return  # a closed stdout (QEMU's printf fails silently too)
        data = data[written:]


class ProcessConsole:
    """Writes text on the process's stdout (fd 1) and stderr (fd 2), in order, after what
    monitors on stdio queued before."""

    def __init__(self) -> None:
        self._drains: list[Callable[[], Awaitable[None]]] = []

    def shares_stdio(self, drained: Callable[[], Awaitable[None]]) -> None:
        """Register a monitor on stdio: ``drained()`` returns once its queued output is
        written."""
        self._drains.append(drained)

    async def print(self, chunks: Sequence[tuple[int, str]]) -> None:
        """Write each ``(fd, text)`` (fd is :data:`STDOUT` or :data:`STDERR`) in order.

        Runs in a worker thread: a reader that does not keep up stalls the caller, as it
        stalls QEMU, but not the event loop.
        """
        if not chunks:
            return
        for drained in list(self._drains):
            with trio.move_on_after(1.0):  # a stalled stdio client must not hang us
                await drained()

        def write() -> None:
            # Whatever Python itself buffered for these descriptors goes first.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            for fd, text in chunks:
                _write_all(fd, text.encode("utf-8", errors="surrogateescape"))

        await trio.to_thread.run_sync(write)
